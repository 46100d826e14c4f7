"""Native CPU kernels: the adapters' run products of a training pass (kernels/run_lora.cpp).

Built on first use with the system's C++ compiler (`$CXX`, else g++ or c++) into the seal cache
(`models.cache_root()/kernels`, keyed by the source and flags, so an edit rebuilds it) and
loaded with ctypes: no torch headers, so a build takes ~2 s, not the ~30 s of a torch
extension. Used on CPUs with AVX512-BF16 for bf16 passes (the kernels run on one thread: a
SmolLM2 epoch on two torch threads still took 11.9-14.8 s with them against 14.7-17.6 s through
torch, docs/benchmarks.md); anywhere else, or when the build fails (the reason is printed
once), or with `SEAL_NATIVE=0`, the same products run through torch (`lora._RunLoRA`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from seal.models import _cpu_flags, cache_root

SOURCE = Path(__file__).with_name("kernels") / "run_lora.cpp"
FLAGS = (
    "-O3",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-fno-math-errno",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512bf16",
    "-mfma",
)

_P = ctypes.c_void_p
_I, _I64, _F = ctypes.c_int, ctypes.c_int64, ctypes.c_float


def cpu_has_avx512_bf16() -> bool:
    return "avx512_bf16" in _cpu_flags()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(source: Path = SOURCE, out_dir: Path | None = None) -> Path:
    """Compile `source` into a shared library in `out_dir` (default: the seal cache), once
    per source and flags; returns its path. Raises RuntimeError with the compiler's message."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    text = source.read_bytes()
    key = hashlib.sha256(text + " ".join((cxx, *FLAGS)).encode()).hexdigest()[:16]
    out_dir = out_dir or cache_root() / "kernels"
    lib = out_dir / f"{source.stem}-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: workers starting together never load a
    # half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        try:
            proc = subprocess.run(
                [cxx, *FLAGS, str(source), "-o", tmp], capture_output=True, text=True, timeout=300
            )
        except OSError as e:
            raise RuntimeError(f"cannot run the C++ compiler {cxx!r}: {e}") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {source}:\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def run_lora_library() -> ctypes.CDLL | None:
    """The run-LoRA kernels, or None where they cannot run here (see the module's doc)."""
    if os.environ.get("SEAL_NATIVE", "1") == "0" or not cpu_has_avx512_bf16():
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"[seal] native run-LoRA kernels unavailable, using torch: {e}", file=sys.stderr)
        return None
    lib.seal_run_lora_forward.argtypes = [_P] * 5 + [_P, _I, _I, _I, _I, _I, _F]
    lib.seal_run_lora_forward.restype = None
    lib.seal_run_lora_backward.argtypes = [_P] * 8 + [_P, _I, _I64, _I, _I, _I, _I, _F]
    lib.seal_run_lora_backward.restype = None
    return lib


def usable(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the kernels can take this layer's pass: bf16 activations on a CPU, fp32
    masters, and every dimension a multiple of 16."""
    return (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and a.dtype == torch.float32
        and b.dtype == torch.float32
        and x.shape[-1] % 16 == 0
        and b.shape[-1] % 16 == 0
        and a.shape[-1] % 16 == 0
        and run_lora_library() is not None
    )


def _runs_tensor(runs, t: int) -> torch.Tensor:
    return torch.tensor([(s * t, e * t, k) for s, e, k in runs], dtype=torch.int64)


class NativeRunLoRA(torch.autograd.Function):
    """`lora._RunLoRA` in one native call a direction: y += scaling * x A_k B_k in place for
    each run (start, end, k) of the `n_rows` rows of x, from the fp32 masters A [K, in, r]
    and B [K, r, out] (cast to bf16 inside the kernel), whose gradients come back in fp32."""

    @staticmethod
    def forward(ctx, x, y, a, b, scaling, runs, n_rows):
        lib = run_lora_library()
        x = x.contiguous()
        if not y.is_contiguous():  # written in place through its pointer
            raise ValueError("NativeRunLoRA needs a contiguous base output y")
        n_slots, d_in, r = a.shape
        d_out = b.shape[-1]
        t = x.shape[0] // n_rows
        if any(not (0 <= k < n_slots and 0 <= s <= e <= n_rows) for s, e, k in runs):
            raise ValueError(f"runs {runs} out of range ({n_rows} rows, {n_slots} slots)")
        rt = _runs_tensor(runs, t)
        xa = x.new_empty(x.shape[0], r)
        args = (x, y, xa, a.detach().contiguous(), b.detach().contiguous(), rt)
        lib.seal_run_lora_forward(
            *[p.data_ptr() for p in args], len(runs), n_slots, d_in, d_out, r, float(scaling)
        )
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, xa, a, b, rt)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, g):
        x, xa, a, b, rt = ctx.saved_tensors
        lib = run_lora_library()
        g = g.contiguous()
        k, d_in, r = a.shape
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        ga, gb = torch.empty_like(a), torch.empty_like(b)
        lib.seal_run_lora_backward(
            g.data_ptr(),
            x.data_ptr(),
            xa.data_ptr(),
            a.data_ptr(),
            b.data_ptr(),
            gx.data_ptr() if gx is not None else None,
            ga.data_ptr(),
            gb.data_ptr(),
            rt.data_ptr(),
            rt.shape[0],
            x.shape[0],
            k,
            d_in,
            b.shape[-1],
            r,
            float(ctx.scaling),
        )
        return gx, g, ga, gb, None, None, None
