"""Run directories: resolved config, state, append-only results, atomic writes, resume.

Everything a run computes is written as it finishes: whole files atomically (write a temporary
file, fsync, rename), results one JSON line at a time (append, flush, fsync). A line cut short
by a crash is detected on reading, reported, and its work redone; nothing else is lost.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def safe_child(root: Path, *parts: str) -> Path:
    """`root / parts...`, refusing any part that could leave `root` (names from data — task
    ids, titles — must never make a path outside the run directory)."""
    for p in parts:
        if not SAFE_NAME.match(p) or ".." in p:
            raise ValueError(f"refusing unsafe path component {p!r}")
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"refusing path outside {root}: {path}")
    return path


def failpoint(name: str) -> None:
    """Testing hook: SIGKILL this process at the named point when $SEAL_FAILPOINT lists it
    (comma-separated). The fault-injection tests use it to crash a run at every phase. With
    $SEAL_FAILPOINT_ONCE=DIR a point fires once across all processes (the first to create
    DIR/name), e.g. to kill one of several Ray workers."""
    points = os.environ.get("SEAL_FAILPOINT", "")
    if points and name in points.split(","):
        once = os.environ.get("SEAL_FAILPOINT_ONCE")
        if once:
            try:
                os.close(os.open(os.path.join(once, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Replace `path` with these records as JSON lines, atomically."""
    atomic_write_text(path, _jsonl(records))


def append_jsonl(path: Path, records: list[dict]) -> None:
    """Append records as JSON lines, durably (fsync) before returning."""
    if not records:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _jsonl(records)
    with open(path, "a+b") as f:
        # A crash may have left the file without a final newline: start on a fresh line.
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        raw = data.encode("utf-8")
        if "torn_write" in os.environ.get("SEAL_FAILPOINT", "").split(","):
            f.write(raw[: len(raw) // 2])  # a crash in the middle of a write
            f.flush()
            os.fsync(f.fileno())
            failpoint("torn_write")
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path, warn=None) -> list[dict]:
    """Every complete, valid line; a truncated or corrupt line (from a crash) is skipped with
    a message naming the file and line, so its work is redone."""
    if not path.exists():
        return []
    out = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
                out.append(rec)
            except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
                (warn or _stderr)(
                    f"[seal] {path}: line {n} is truncated or corrupt ({e}); "
                    "its work will be redone"
                )
    return out


class CorruptFile(ValueError):
    """A run-directory file that cannot be read; the message names it and what to do."""


def read_json(path: Path, default=None):
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise CorruptFile(f"{path}: corrupt JSON ({e}); delete it to recompute") from None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


class RunDir:
    """The files of one run. Layout:

    config.yaml              the resolved config
    state.json               round, phase, seeds
    metrics.jsonl            one line per round
    self_edits/round_N.samples.jsonl   sampled self-edits (training contexts)
    self_edits/round_N.jobs.jsonl      every finished inner loop, as it finishes
    self_edits/round_N.jsonl           every self-edit with its reward and selection
    eval/round_N.samples.jsonl, eval/round_N.jobs.jsonl
    checkpoints/round_N/     the generator update (PEFT adapter or full weights)
    report.md, plots/
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @staticmethod
    def fresh(root: str | Path = "runs", name: str = "") -> RunDir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return RunDir(Path(root) / (f"{stamp}-{name}" if name else stamp))

    def exists(self) -> bool:
        return (self.path / "config.yaml").exists()

    def file(self, *parts: str) -> Path:
        return safe_child(self.path, *parts)

    # state
    def state(self) -> dict:
        """Where the run stands (informational: resume works from the files themselves, so
        an unreadable state.json is reported and rewritten, never fatal)."""
        try:
            st = read_json(self.file("state.json"), default={})
        except CorruptFile as e:
            _stderr(f"[seal] {e} (ignored: it is rewritten)")
            return {}
        return st if isinstance(st, dict) else {}

    def set_state(self, **updates) -> None:
        st = self.state()
        st.update(updates, updated=time.time())
        atomic_write_json(self.file("state.json"), st)
        if "phase" in updates:
            failpoint(f"phase:{updates['phase']}")

    def metrics(self) -> list[dict]:
        return read_jsonl(self.file("metrics.jsonl"))
