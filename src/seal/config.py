"""Typed configs: dataclasses loaded from commented YAML, overridable as `key=value`.

Every field has a docstring-like `help` in its metadata; unknown keys and wrong types are
errors that name the key (with a suggestion) before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from seal.inner_loop import InnerLoopConfig


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and what is wrong."""


def f(default, help: str, **kw):  # noqa: A002 - mirrors dataclasses.field
    """A dataclass field with help text."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class SelfEditConfig:
    """How self-edits are written."""

    prompt: str = f("implications", "self-edit prompt variant (see `seal prompts`)")
    chat: bool = f(True, "wrap prompts in the model's chat template (raw text otherwise)")
    n_samples: int = f(5, "self-edits sampled per context (M)")
    temperature: float = f(1.0, "sampling temperature")
    top_p: float = f(0.95, "nucleus sampling")
    max_new_tokens: int = f(384, "length cap of one self-edit, in tokens")
    batch_size: int = f(16, "sequences generated at once")
    extra_prompts: dict = f({}, "user prompt variants: name -> {instruction, cue, split}")

    def validate(self) -> None:
        _check(self.n_samples >= 1, "self_edit.n_samples", "must be >= 1")
        _check(0 < self.temperature <= 5, "self_edit.temperature", "must be in (0, 5]")
        _check(0 < self.top_p <= 1, "self_edit.top_p", "must be in (0, 1]")
        _check(self.max_new_tokens >= 1, "self_edit.max_new_tokens", "must be >= 1")
        from seal.domains.knowledge import PROMPTS

        for name, spec in self.extra_prompts.items():
            _check(
                isinstance(name, str), f"self_edit.extra_prompts.{name}", "name must be a string"
            )
            _check(
                isinstance(spec, dict) and "instruction" in spec and "cue" in spec,
                f"self_edit.extra_prompts.{name}",
                "needs 'instruction' and 'cue'",
            )
            for k in ("instruction", "cue", "split", "cue_marker"):
                _check(
                    isinstance(spec.get(k, ""), str),
                    f"self_edit.extra_prompts.{name}.{k}",
                    "must be a string",
                )
            _check(
                spec.get("split", "lines") in ("lines", "qa", "after_cue", "whole", "none"),
                f"self_edit.extra_prompts.{name}.split",
                "must be lines, qa, after_cue, whole or none",
            )
        _check(
            self.prompt in PROMPTS or self.prompt in self.extra_prompts,
            "self_edit.prompt",
            f"unknown variant {self.prompt!r}; known: "
            f"{', '.join(sorted([*PROMPTS, *self.extra_prompts]))}",
        )

    def variants(self):
        from seal.domains.knowledge import SelfEditPrompt

        return {
            name: SelfEditPrompt(
                name, s["instruction"], s["cue"], s.get("split", "lines"), s.get("cue_marker", "")
            )
            for name, s in self.extra_prompts.items()
        }


@dataclass
class JudgeConfig:
    """An LLM judge behind any OpenAI-compatible endpoint (off when base_url is empty)."""

    base_url: str = f("", "e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    model: str = f("gpt-4.1", "judge model name at that endpoint")
    api_key_env: str = f("OPENAI_API_KEY", "environment variable holding the API key")
    timeout: float = f(30.0, "seconds per request")
    max_retries: int = f(4, "retries on timeouts, connection errors, 429 and 5xx")
    local_model: str = f("", "judge with a local model (preset, dir or hub id) instead")

    def validate(self) -> None:
        _check(self.timeout > 0, "judge.timeout", "must be > 0")
        _check(self.max_retries >= 0, "judge.max_retries", "must be >= 0")

    def build(self):
        if self.local_model:
            return local_judge(self.local_model)
        if not self.base_url:
            return None
        from seal.grading import OpenAIJudge

        return OpenAIJudge(
            self.base_url,
            self.model,
            api_key_env=self.api_key_env,
            timeout=self.timeout,
            max_retries=self.max_retries,
        )


def local_judge(spec: str, device: str = "auto", dtype: str = "auto"):
    """A local model as the LLM judge: greedy, a few tokens, its chat template when it has one;
    same prompt, parsing and verdict cache as the remote judge."""
    from seal.generation import SamplingParams, decode, generate
    from seal.grading import CallableJudge, default_cache_dir
    from seal.models import load_model

    lm = load_model(spec, device, dtype)
    tok = lm.tokenizer

    def ask(prompt: str) -> str:
        if getattr(tok, "chat_template", None):
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        return decode(tok, generate(lm.model, tok, [ids], SamplingParams(max_new_tokens=4)))[0]

    return CallableJudge(ask, name=f"local:{spec}", cache_dir=default_cache_dir())


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate_inner_loop(c: InnerLoopConfig, prefix: str = "inner_loop") -> None:
    from seal import grading
    from seal.lora import ALL_LINEAR

    _check(c.r >= 1, f"{prefix}.r", "must be >= 1")
    _check(c.alpha > 0, f"{prefix}.alpha", "must be > 0")
    _check(0 < c.lr <= 1, f"{prefix}.lr", "must be in (0, 1]")
    _check(c.epochs >= 1, f"{prefix}.epochs", "must be >= 1")
    _check(c.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
    _check(
        c.schedule in ("linear", "cosine", "constant"),
        f"{prefix}.schedule",
        "must be linear, cosine or constant",
    )
    _check(0 <= c.warmup_ratio < 1, f"{prefix}.warmup_ratio", "must be in [0, 1)")
    _check(c.max_seq_len >= 8, f"{prefix}.max_seq_len", "must be >= 8")
    _check(c.max_new_tokens >= 1, f"{prefix}.max_new_tokens", "must be >= 1")
    _check(c.capacity >= 0, f"{prefix}.capacity", "must be >= 0 (0 = automatic)")
    _check(c.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
    _check(
        c.max_grad_norm is None or c.max_grad_norm > 0,
        f"{prefix}.max_grad_norm",
        "must be > 0 (or null: no clipping)",
    )
    _check(
        c.reward_metric in grading.METRICS,
        f"{prefix}.reward_metric",
        f"must be one of {', '.join(grading.METRICS)}",
    )
    _check(len(c.target_modules) > 0, f"{prefix}.target_modules", "must not be empty")
    unknown = [m for m in c.target_modules if m not in ALL_LINEAR]
    _check(
        not unknown,
        f"{prefix}.target_modules",
        f"unknown module(s) {unknown}; choose from {', '.join(ALL_LINEAR)}",
    )


# --------------------------------------------------------------------------------------------
# Generic loading


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _short(value: Any, n: int = 80) -> str:
    r = repr(value) if not isinstance(value, int) or abs(value) < 10**60 else "a huge integer"
    return r if len(r) <= n else r[: n - 3] + "..."


def _coerce(value: Any, tp, key: str):
    """Check `value` against the annotation `tp`, converting where safe (int -> float,
    list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_short(value)}")
        try:
            out = float(value)
        except OverflowError:
            raise ConfigError(f"{key}: number too large") from None
        if not math.isfinite(out):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return out
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and bad types."""
    hints = typing.get_type_hints(cls)
    names = {fl.name for fl in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in (data or {}).items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), sorted(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: unknown key{hint}; known: {', '.join(sorted(names))}")
        kwargs[k] = _coerce(v, hints[k], key)
    obj = cls(**kwargs)
    return obj


def to_dict(obj) -> dict:
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {fl.name: conv(getattr(v, fl.name)) for fl in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(obj)


def parse_overrides(items: list[str]) -> dict:
    """`a.b=1 c=x` -> {'a': {'b': 1}, 'c': 'x'}; values are parsed as YAML scalars/lists."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        except (RecursionError, ValueError) as e:  # absurd nesting; integers past 4,300 digits
            raise ConfigError(
                f"override {key.strip()!r}: unreadable value ({_reason(e)})"
            ) from None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return out


def _reason(e: Exception) -> str:
    return "nested too deeply" if isinstance(e, RecursionError) else "a number too long"


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    except (RecursionError, ValueError) as e:  # absurd nesting; integers past 4,300 digits
        raise ConfigError(f"{path}: invalid YAML ({_reason(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def validate_tree(obj, prefix: str = "") -> None:
    """Call `validate()` on a config and each nested config."""
    for fl in dataclasses.fields(obj):
        v = getattr(obj, fl.name)
        if isinstance(v, InnerLoopConfig):
            validate_inner_loop(v, f"{prefix}{fl.name}")
        elif dataclasses.is_dataclass(v):
            validate_tree(v, f"{prefix}{fl.name}.")
    if hasattr(obj, "validate"):
        obj.validate()


def field_help(cls) -> dict[str, str]:
    return {fl.name: fl.metadata.get("help", "") for fl in dataclasses.fields(cls)}
