"""The `seal` command runs on jemalloc (Ray's bundled copy) unless told otherwise."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from seal import allocator


def test_library_is_rays_jemalloc_or_the_one_named(monkeypatch, tmp_path):
    monkeypatch.delenv(allocator.ENV, raising=False)
    lib = allocator.library()
    assert lib is not None and Path(lib).is_file() and "jemalloc" in Path(lib).name
    monkeypatch.setenv(allocator.ENV, "system")
    assert allocator.library() is None and allocator.chose_system()
    monkeypatch.setenv(allocator.ENV, str(tmp_path / "missing.so"))
    with pytest.raises(FileNotFoundError, match="missing.so"):
        allocator.library()


def _doctor(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator._DONE)}
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-m", "seal", "doctor"], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    return next(line for line in out.stdout.splitlines() if "memory allocator" in line)


def test_the_command_reexecutes_itself_on_jemalloc_once():
    """`python -m seal` (like the `seal` script) replaces itself by a process with jemalloc
    preloaded, which does not re-execute again; SEAL_MALLOC=system keeps the system's."""
    assert "jemalloc (" in _doctor({allocator.ENV: ""})
    assert "system malloc (SEAL_MALLOC=system)" in _doctor({allocator.ENV: "system"})
