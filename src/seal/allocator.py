"""The memory allocator seal's processes run on: jemalloc where it is at hand, else glibc's.

A training pass allocates and frees thousands of tensors; on glibc's malloc, a process that
has run seal's batched inner loop is left with a heap that makes every later allocation
slower: measured on SmolLM2 (docs/benchmarks.md, session 13), a bf16 linear layer took 13-30%
longer, a forward pass 17-28% and small elementwise ops 29-45% after one in-process loop than
before it, and the sequential PEFT loop 15-22% longer, with the model, threads and torch's state
unchanged. jemalloc does not degrade that way and is faster from the start (the in-process
loop 5.95 against 6.62-7.33 s per self-edit).

jemalloc cannot be switched to once a process runs, so `seal`'s command line re-executes
itself once with jemalloc preloaded (`reexec_with_jemalloc`); the worker processes it spawns
inherit it. The library comes with Ray (`ray/core/libjemalloc.so`; pinned in
requirements.lock, which `make` installs, and the `ray` extra), so nothing is built or
downloaded; without Ray the system's allocator stays; `SEAL_MALLOC=/path/to/lib.so` names another one and
`SEAL_MALLOC=system` keeps the system's allocator. Python code that imports seal as a
library keeps the allocator its own process started with (run it under
`LD_PRELOAD=$(python -c 'import seal.allocator as a; print(a.library())')` for the same
gain).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ENV = "SEAL_MALLOC"
SYSTEM = ("system", "glibc", "off", "0", "none")
# Set in the re-executed process: one attempt, never a loop (if the preload is refused).
_DONE = "_SEAL_MALLOC_REEXEC"


def chose_system() -> bool:
    """Whether `SEAL_MALLOC` asks for the system's allocator."""
    return os.environ.get(ENV, "").strip().lower() in SYSTEM


def library() -> str | None:
    """The jemalloc library to preload: `SEAL_MALLOC`'s path, else Ray's bundled copy; None
    where there is none (or `SEAL_MALLOC=system`)."""
    choice = os.environ.get(ENV, "").strip()
    if chose_system():
        return None
    if choice:
        if not Path(choice).is_file():
            raise FileNotFoundError(f"{ENV}={choice}: no such library file")
        return choice
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        lib = Path(folder) / "core" / "libjemalloc.so"
        if lib.is_file():
            return str(lib)
    return None


def loaded() -> str | None:
    """The path of the jemalloc library mapped into this process, if any (Linux)."""
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                if "jemalloc" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return None


def describe() -> str:
    """One line for `seal doctor` and the bench: which allocator this process runs on."""
    lib = loaded()
    if lib:
        return f"jemalloc ({lib})"
    return "system malloc"


def reexec_with_jemalloc(argv: list[str]) -> None:
    """Replace this process by `python -m seal argv` with jemalloc preloaded, when there is
    one, this process does not have it, and this is not already the re-executed process.
    Returns (doing nothing) otherwise: off Linux, under `SEAL_MALLOC=system`, or without a
    library."""
    if not sys.platform.startswith("linux") or os.environ.get(_DONE) or loaded():
        return
    try:
        lib = library()
    except FileNotFoundError as e:
        print(f"seal: {e}; running on the system's allocator", file=sys.stderr)
        return
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env[_DONE] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "seal", *argv], env)
