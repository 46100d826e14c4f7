"""Shared by the executor tests (test_processes.py, test_ray.py): one small ReST-EM run on the
tiny model, and everything it computed without timings, to compare executors' runs."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from seal import rest_em
from seal.config import from_dict, to_dict, validate_tree
from seal.runs import RunDir, read_jsonl

# One ReST-EM round; selection "threshold 0" keeps every self-edit, so the generator is
# fine-tuned and the round-1 evaluation runs on the updated model — on the workers too.
CONFIG = {
    "seed": 3,
    "model": "tiny-random",
    "rounds": 1,
    "data": {"n_train": 2, "n_eval": 3},
    "self_edit": {"n_samples": 2, "max_new_tokens": 24},
    "inner_loop": {"epochs": 2, "capacity": 2, "max_new_tokens": 8},
    "rest_em": {"selection": "threshold", "threshold": 0.0, "sft": {"epochs": 1}},
    "logging": {"progress": False},
}


def run_config(**executor) -> rest_em.RunConfig:
    cfg = from_dict(rest_em.RunConfig, {**CONFIG, "executor": executor or {"kind": "inprocess"}})
    validate_tree(cfg)
    return cfg


def run(path: Path, cfg, logs: list | None = None) -> list[dict]:
    """A run whose driver computes on one thread, as the workers do: sampling and the
    generator's fine-tune then do the same arithmetic in every run."""
    rd = RunDir(path)
    rd.path.mkdir(parents=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return rest_em.run(cfg, rd, log=(logs.append if logs is not None else lambda _: None))
    finally:
        torch.set_num_threads(threads)


def _strip(recs):
    drop = {"seconds", "seconds_per_phase"}
    return [{k: v for k, v in r.items() if k not in drop} for r in recs]


def outcome(path: Path) -> dict:
    """Everything a run computed, without timings: metrics, every scored job (rewards,
    answers, per-question scores), the kept self-edits."""
    jobs = {}
    for rel in sorted(path.glob("**/*.jobs.jsonl")):
        for r in _strip(read_jsonl(rel)):
            jobs[f"{rel.relative_to(path)}:{r['key']}"] = r
    return {
        "metrics": _strip(read_jsonl(path / "metrics.jsonl")),
        "jobs": jobs,
        "scored": read_jsonl(path / "self_edits" / "round_1.jsonl"),
    }


def knowledge_runner_factory():
    return functools.partial(rest_em.runner_from_config, to_dict(run_config()))


def inprocess_reference(tmp_path_factory) -> dict:
    """The in-process run, on one thread as the workers are (same arithmetic)."""
    path = tmp_path_factory.mktemp("inprocess") / "run"
    run(path, run_config())
    out = outcome(path)
    assert out["metrics"][1]["n_kept"] == 4 and out["metrics"][1]["sft"]["n_pairs"] == 4
    return out


def run_with_a_killed_worker(tmp_path: Path, monkeypatch, executor: dict) -> dict:
    """A run in which the first worker to start a chunk SIGKILLs itself (its chunk must be
    retried on another): asserts the fault fired and was reported; returns the outcome."""
    (tmp_path / "once").mkdir()
    monkeypatch.setenv("SEAL_FAILPOINT", "worker_run")
    monkeypatch.setenv("SEAL_FAILPOINT_ONCE", str(tmp_path / "once"))
    logs: list[str] = []
    run(tmp_path / "run", run_config(**executor), logs)
    assert (tmp_path / "once" / "worker_run").exists()  # the fault did fire
    assert any("died on jobs" in m for m in logs), logs
    return outcome(tmp_path / "run")


def kill_driver_then_resume(tmp_path: Path, executor: dict) -> dict:
    """`python -m seal run` SIGKILLed after its first chunk, then `--resume`d: asserts the kill
    left finished work and no metrics, and the resume succeeded; returns the outcome."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**CONFIG, "executor": executor}))
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEAL_FAILPOINT": "after_chunk"}
    cmd = [sys.executable, "-m", "seal", "run", str(cfg), "--run-dir", str(run_dir)]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len(read_jsonl(run_dir / "eval" / "round_0.jobs.jsonl")) >= 1
    assert not (run_dir / "metrics.jsonl").exists()
    env.pop("SEAL_FAILPOINT")
    resume = [sys.executable, "-m", "seal", "run", "--resume", str(run_dir)]
    resumed = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return outcome(run_dir)


def sleep_as_worker(ready: str, seconds: float) -> None:
    """A worker process that only waits: `exit_with_parent`, then a file at `ready`, then
    sleep (tests/test_processes.py kills its driver)."""
    import time

    from seal.executors import exit_with_parent

    exit_with_parent()
    Path(ready).write_text(str(os.getpid()))
    time.sleep(seconds)
