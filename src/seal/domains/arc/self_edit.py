"""The ARC self-edit: a JSON test-time-training configuration the model writes for a task.

The paper's form (SEAL, few-shot domain)::

    {"data_generation": {"use_basic_augmentations": true, "use_size_augmentations": false,
                         "use_chain_augmentations": false, "use_repeat_augmentations": true},
     "training": {"strategy": "train_using_output_tokens", "learning_rate": 0.0001,
                  "num_train_epochs": 2}}

`parse_self_edit` turns arbitrary model text into a validated `TTTConfig` or a reason why not;
it never raises. `cost_steps` and `COST_CAP_STEPS` implement the paper's cost cap: a
configuration needing more than 375 optimizer steps gets reward 0, as does a malformed one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .augment import FAMILIES
from .grids import GridFormat, format_example

STRATEGIES: tuple[str, ...] = ("train_using_all_tokens", "train_using_output_tokens")
LEARNING_RATE_BOUNDS: tuple[float, float] = (1e-6, 1e-2)
EPOCH_BOUNDS: tuple[int, int] = (1, 10)
COST_CAP_STEPS = 375
# Input guards: a 1B model's answer is a few hundred characters; anything past these limits is
# junk or adversarial, and bounding it keeps parsing fast and recursion-free.
MAX_SELF_EDIT_CHARS = 20_000
MAX_JSON_DEPTH = 32
MAX_JSON_CANDIDATES = 32


@dataclass(frozen=True)
class TTTConfig:
    """A validated self-edit: augmentation families, loss strategy and optimizer settings.

    Construction raises ValueError for a wrong type or a value out of bounds: `strategy` must
    be one of `STRATEGIES`, `learning_rate` a float in [1e-6, 1e-2], `num_train_epochs` an int
    in [1, 10].
    """

    use_basic_augmentations: bool
    use_size_augmentations: bool
    use_chain_augmentations: bool
    use_repeat_augmentations: bool
    strategy: str
    learning_rate: float
    num_train_epochs: int

    def __post_init__(self) -> None:
        for key in FAMILIES:
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be a bool, got {getattr(self, key)!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        lr = self.learning_rate
        lo, hi = LEARNING_RATE_BOUNDS
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
            raise ValueError(f"learning_rate must be a finite number, got {lr!r}")
        if not lo <= lr <= hi:
            raise ValueError(f"learning_rate {lr!r} is outside [{lo:g}, {hi:g}]")
        ep = self.num_train_epochs
        if isinstance(ep, bool) or not isinstance(ep, int):
            raise ValueError(f"num_train_epochs must be an integer, got {ep!r}")
        if not EPOCH_BOUNDS[0] <= ep <= EPOCH_BOUNDS[1]:
            raise ValueError(
                f"num_train_epochs {ep} is outside {EPOCH_BOUNDS[0]}..{EPOCH_BOUNDS[1]}"
            )
        object.__setattr__(self, "learning_rate", float(lr))

    def families(self) -> frozenset[str]:
        """The enabled augmentation families (for `augment.augmenters_for`)."""
        return frozenset(k for k in FAMILIES if getattr(self, k))

    @property
    def output_tokens_only(self) -> bool:
        """True when the loss is on the answer (output grid) tokens only."""
        return self.strategy == "train_using_output_tokens"

    def to_dict(self) -> dict[str, Any]:
        """The paper's nested JSON form ("data_generation" / "training")."""
        return {
            "data_generation": {k: getattr(self, k) for k in FAMILIES},
            "training": {
                "strategy": self.strategy,
                "learning_rate": self.learning_rate,
                "num_train_epochs": self.num_train_epochs,
            },
        }

    def to_json(self) -> str:
        """`to_dict()` as JSON text; `parse_self_edit(c.to_json()).config == c`."""
        return json.dumps(self.to_dict())


# The best hand configuration ("Oracle TTT"): every augmentation family, loss on the output
# tokens only, and the TTT paper's optimizer settings (learning rate 1e-4, 2 epochs). With the
# 250-example cap that is at most 250 steps at batch size 2, within the 375-step cost cap.
ORACLE_CONFIG = TTTConfig(
    use_basic_augmentations=True,
    use_size_augmentations=True,
    use_chain_augmentations=True,
    use_repeat_augmentations=True,
    strategy="train_using_output_tokens",
    learning_rate=1e-4,
    num_train_epochs=2,
)


@dataclass(frozen=True)
class ParseResult:
    """The outcome of `parse_self_edit`: exactly one of `config` and `reason` is not None."""

    config: TTTConfig | None
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.config is not None


def cost_steps(config: TTTConfig, n_examples: int, batch_size: int = 2) -> int:
    """Optimizer steps the configuration costs: ceil(epochs * n_examples / batch_size)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return -(-config.num_train_epochs * max(n_examples, 0) // batch_size)


def within_cost_cap(config: TTTConfig, n_examples: int, batch_size: int = 2) -> bool:
    """False when the configuration needs more than `COST_CAP_STEPS` steps (reward 0)."""
    return cost_steps(config, n_examples, batch_size) <= COST_CAP_STEPS


# ---------------------------------------------------------------- extracting the JSON object

_SIGNIFICANT = re.compile(r'[{}\[\]"\\]')


def _balanced_end(text: str, start: int) -> tuple[int | None, str]:
    """End (exclusive) of the bracket-balanced span opening at text[start] == "{".

    Returns (end, "ok"), or (None, why): "unclosed" or "nested too deeply". String-aware, so
    braces inside JSON strings do not count; it jumps between significant characters only.
    """
    depth = 0
    in_string = False
    i = start
    while True:
        m = _SIGNIFICANT.search(text, i)
        if m is None:
            return None, "unclosed"
        c, j = m.group(), m.start()
        i = j + 1
        if in_string:
            if c == "\\":
                i = j + 2
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return None, "nested too deeply"
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1, "ok"


def _first_json_object(text: str) -> tuple[dict | None, str]:
    """The first "{" ... "}" span that parses as a JSON object, or (None, reason)."""
    reason = "no JSON object found"
    start = text.find("{")
    tries = 0
    while start >= 0 and tries < MAX_JSON_CANDIDATES:
        tries += 1
        end, why = _balanced_end(text, start)
        if end is None:
            reason = f"JSON object {why}"
        else:
            try:
                obj = json.loads(text[start:end])
            except (ValueError, RecursionError) as e:
                reason = f"invalid JSON: {e}"
            else:
                if isinstance(obj, dict):
                    return obj, ""
        start = text.find("{", start + 1)
    return None, reason


# ---------------------------------------------------------------- reading the fields


def _norm_key(key: str) -> str:
    return re.sub(r"[\s\-]+", "_", key.strip().lower())


class _Reject(Exception):
    pass


def _flatten(obj: Mapping[str, Any]) -> dict[str, Any]:
    # The paper nests fields under "data_generation" and "training"; models also write them
    # flat, or under other section names. Merge the top level with one level of sub-objects.
    flat: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        k = _norm_key(key)
        if k in flat and flat[k] != value:
            raise _Reject(f"conflicting values for '{k}'")
        flat[k] = value

    for key, value in obj.items():
        if isinstance(value, Mapping):
            for sub_key, sub_value in value.items():
                put(sub_key, sub_value)
        else:
            put(key, value)
    return flat


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _Reject(f"'{key}' must be true or false, got {_short(value)}")


def _as_number(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise _Reject(f"'{key}' must be a number, got {_short(value)}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _Reject(f"'{key}' must be a number, got {_short(value)}") from None
    if not isinstance(value, (int, float)):
        raise _Reject(f"'{key}' must be a number, got {_short(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise _Reject(f"'{key}' is out of range") from None
    if not math.isfinite(number):
        raise _Reject(f"'{key}' must be finite, got {_short(value)}")
    return number


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _pick(flat: Mapping[str, Any], names: Iterable[str]) -> tuple[str, Any] | None:
    found = [(n, flat[n]) for n in names if n in flat]
    if len(found) > 1 and any(v != found[0][1] for _, v in found):
        raise _Reject(f"conflicting values for {', '.join(repr(n) for n, _ in found)}")
    return found[0] if found else None


def _strategy_from_value(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    v = _norm_key(value)
    for strategy in STRATEGIES:
        short = strategy.removeprefix("train_using_")  # "all_tokens" / "output_tokens"
        if v in (strategy, short, short.removesuffix("_tokens")):
            return strategy
    return None


def _read_strategy(flat: Mapping[str, Any]) -> str:
    # Liberal on purpose: the paper's form is {"strategy": "<name>"}, but small models also
    # write the name as a key set to true ({"train_using_output_tokens": true}) or call the
    # field "loss". Every form that names exactly one strategy is accepted, since the reward
    # should measure the configuration's effect, not its spelling; an absent, unknown or
    # contradictory choice is rejected.
    chosen: set[str] = set()
    for key in ("strategy", "loss", "loss_strategy", "training_strategy"):
        if key in flat:
            strategy = _strategy_from_value(flat[key])
            if strategy is None:
                raise _Reject(
                    f"'{key}' must be one of {', '.join(STRATEGIES)}, got {_short(flat[key])}"
                )
            chosen.add(strategy)
    for strategy in STRATEGIES:
        if strategy in flat and _as_bool(strategy, flat[strategy]):
            chosen.add(strategy)
    if not chosen:
        raise _Reject(f"missing the training strategy ('strategy': one of {', '.join(STRATEGIES)})")
    if len(chosen) > 1:
        raise _Reject("both training strategies chosen")
    return chosen.pop()


def _config_from_object(obj: Mapping[str, Any]) -> TTTConfig:
    flat = _flatten(obj)
    flags = {}
    for key in FAMILIES:
        if key not in flat:
            raise _Reject(f"missing '{key}'")
        flags[key] = _as_bool(key, flat[key])
    strategy = _read_strategy(flat)

    lr_item = _pick(flat, ("learning_rate", "lr"))
    if lr_item is None:
        raise _Reject("missing 'learning_rate'")
    lr = _as_number("learning_rate", lr_item[1])
    lo, hi = LEARNING_RATE_BOUNDS
    if not lo <= lr <= hi:
        raise _Reject(f"learning_rate {lr:g} is outside [{lo:g}, {hi:g}]")

    ep_item = _pick(flat, ("num_train_epochs", "epochs", "num_epochs"))
    if ep_item is None:
        raise _Reject("missing 'num_train_epochs'")
    epochs = _as_number("num_train_epochs", ep_item[1])
    if epochs != int(epochs):
        raise _Reject(f"num_train_epochs must be a whole number, got {_short(ep_item[1])}")
    if not EPOCH_BOUNDS[0] <= epochs <= EPOCH_BOUNDS[1]:
        raise _Reject(
            f"num_train_epochs {int(epochs)} is outside {EPOCH_BOUNDS[0]}..{EPOCH_BOUNDS[1]}"
        )
    return TTTConfig(**flags, strategy=strategy, learning_rate=lr, num_train_epochs=int(epochs))


def parse_self_edit(text: Any) -> ParseResult:
    """Read a self-edit from arbitrary model text.

    Takes the first JSON object in the text (inside a ```json fence, after prose, with nested
    objects) and validates it: the four `use_*_augmentations` flags, the strategy, a
    learning_rate in [1e-6, 1e-2] and a whole num_train_epochs in 1..10, either flat or nested
    one level (the paper's "data_generation" / "training" sections). Keys are matched
    case-insensitively; unknown keys are ignored.

    Returns a ParseResult with `config` set, or with `config` None and a human-readable
    `reason`. Never raises and never evaluates code; only the first `MAX_SELF_EDIT_CHARS`
    characters are read, and objects nested deeper than `MAX_JSON_DEPTH` are rejected.
    """
    try:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text[: MAX_SELF_EDIT_CHARS * 4]).decode("utf-8", errors="replace")
        if not isinstance(text, str):
            return ParseResult(None, f"expected text, got {type(text).__name__}")
        obj, why = _first_json_object(text[:MAX_SELF_EDIT_CHARS])
        if obj is None:
            return ParseResult(None, why)
        return ParseResult(_config_from_object(obj), None)
    except _Reject as e:
        return ParseResult(None, str(e))
    except Exception as e:  # noqa: BLE001 - the promise is "never raises"
        return ParseResult(None, f"unreadable self-edit ({type(e).__name__})")


# ---------------------------------------------------------------- the prompt

_INSTRUCTIONS = """\
You are configuring test-time training for this task: a model will be fine-tuned on data made
from the demonstrations above, then asked to solve the task. Choose the tools to use.

1. Data generation. For each of the following, choose true or false:
    - use_basic_augmentations: rotations, flips, transpositions, reflections and a random
      translation of every grid
    - use_size_augmentations: doubling the resolution, the height or the width of every grid
    - use_chain_augmentations: a rotation, flip or transposition followed by doubling the
      resolution
    - use_repeat_augmentations: tiling every grid twice vertically, horizontally or both

2. Training. Choose the loss strategy, one of:
    - "train_using_all_tokens": learn from every token of each training example
    - "train_using_output_tokens": learn from the output grid tokens only
   and also specify:
    - learning_rate (a float between 0.000001 and 0.01)
    - num_train_epochs (an integer between 1 and {max_epochs})

Respond with a JSON object only, with no explanation or markdown, using lowercase true/false,
in this form:

{{
  "data_generation": {{
    "use_basic_augmentations": ...,
    "use_size_augmentations": ...,
    "use_chain_augmentations": ...,
    "use_repeat_augmentations": ...
  }},
  "training": {{
    "strategy": ...,
    "learning_rate": ...,
    "num_train_epochs": ...
  }}
}}
"""


def budget_epochs(cost_cap_steps: int, batch_size: int, max_examples: int) -> int:
    """The most epochs that fit the cost cap when the TTT data fills `max_examples`:
    floor(cap * batch_size / max_examples) within the 1..10 bounds (with fewer examples more
    would fit)."""
    fit = cost_cap_steps * batch_size // max(max_examples, 1)
    return max(EPOCH_BOUNDS[0], min(EPOCH_BOUNDS[1], fit))


def self_edit_prompt(task: Any, fmt: GridFormat = "compact", max_epochs: int | None = None) -> str:
    """The instruction the model sees to write a self-edit for `task`.

    `task` is a `data.Task` or a sequence of (input, output) demonstration pairs. The prompt
    shows the demonstrations, describes the configuration keys (as in the paper), and asks
    for a JSON configuration only. With `max_epochs` (see `budget_epochs`) the epoch range it
    states ends there instead of at 10, so the model sees what the cost cap allows; the paper's
    prompt states 1..10 (`arc.prompt_budget` off). Small models tend to pick the top of the
    stated range, so on a tight cap the paper's prompt yields only over-cap configurations.
    """
    pairs = task.train if hasattr(task, "train") else task
    demos = "".join(format_example(i, o, fmt) for i, o in pairs)
    top = EPOCH_BOUNDS[1] if max_epochs is None else max_epochs
    return (
        "Here are the demonstrations of a grid puzzle. Each shows an input grid and the output "
        "grid the same hidden rule produces from it.\n\n"
        + demos
        + _INSTRUCTIONS.format(max_epochs=top)
    )
