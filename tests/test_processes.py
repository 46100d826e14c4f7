"""The process executor (local worker processes, one thread each) with the tiny model: the
same rewards and metrics as the in-process executor, a killed worker costs nothing, a
persistent failure is reported with its jobs and the worker's error, and `seal bench` runs
seal's mode on workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from executor_runs import (
    CONFIG,
    inprocess_reference,
    knowledge_runner_factory,
    outcome,
    run,
    run_config,
)

from seal.domains.base import Job
from seal.executors import ExecutorError, ProcessExecutor, WorkerSpec
from seal.runs import read_jsonl

PROCESSES = {"kind": "processes", "workers": 2, "cpus_per_worker": 1}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return inprocess_reference(tmp_path_factory)


def test_process_run_equals_inprocess_run(reference, tmp_path):
    logs: list[str] = []
    run(tmp_path / "run", run_config(**PROCESSES), logs)
    out = outcome(tmp_path / "run")
    assert [m["round"] for m in out["metrics"]] == [0, 1]
    assert out == reference  # the round-1 jobs ran on workers that applied the update
    assert any("process executor: 2 worker(s) x 1 thread(s)" in m for m in logs), logs


def test_killed_worker_loses_nothing(reference, tmp_path, monkeypatch):
    # The first worker to start a chunk SIGKILLs itself; its chunk is retried on a fresh one.
    (tmp_path / "once").mkdir()
    monkeypatch.setenv("SEAL_FAILPOINT", "worker_run")
    monkeypatch.setenv("SEAL_FAILPOINT_ONCE", str(tmp_path / "once"))
    logs: list[str] = []
    run(tmp_path / "run", run_config(**PROCESSES), logs)
    assert (tmp_path / "once" / "worker_run").exists()  # the fault did fire
    assert any("died on jobs" in m for m in logs), logs
    assert outcome(tmp_path / "run") == reference


def test_driver_sigkill_then_resume_from_the_command_line(reference, tmp_path):
    """`python -m seal run` with worker processes (spawned workers import the package, not
    the command line), killed after its first chunk, then resumed: nothing lost or changed."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**CONFIG, "executor": PROCESSES}))
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEAL_FAILPOINT": "after_chunk"}
    cmd = [sys.executable, "-m", "seal", "run", str(cfg), "--run-dir", str(run_dir)]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len(read_jsonl(run_dir / "eval" / "round_0.jobs.jsonl")) >= 1
    env.pop("SEAL_FAILPOINT")
    resume = [sys.executable, "-m", "seal", "run", "--resume", str(run_dir)]
    resumed = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert outcome(run_dir) == reference


def test_persistent_failure_names_jobs_and_error():
    spec = WorkerSpec("tiny-random", "cpu", "auto", knowledge_runner_factory(), updates=[])
    ex = ProcessExecutor(spec, workers=2, max_retries=1, log=lambda _: None)
    try:
        bad = [Job(f"ctx/{i}/0", "ctx", i, 0, i, payload={"nonsense": True}) for i in range(2)]
        # two jobs on two workers: a chunk each; the first to fail twice stops the run
        expected = r"jobs \[ctx/[01]/0\] failed 2 times; last worker error: KeyError"
        with pytest.raises(ExecutorError, match=expected):
            ex.run(bad, lambda *_: None)
        # The run stopped while the other worker was busy: that one was stopped (its answer
        # would come for a chunk no one waits for) and starts again when next needed.
        assert len(ex.pids()) >= 1
        with pytest.raises(ExecutorError, match=expected):
            ex.run(bad, lambda *_: None)
    finally:
        ex.close()
    assert all(p is None for p in ex._procs)


def test_a_worker_that_cannot_start_says_why():
    spec = WorkerSpec("no-such-model-xyz", "cpu", "auto", knowledge_runner_factory())
    with pytest.raises(ExecutorError, match="worker 0 failed to start: .*no-such-model-xyz"):
        ProcessExecutor(spec, workers=1, log=lambda _: None)


def test_bench_seal_mode_on_workers(tmp_path):
    from seal.cli import main

    out = tmp_path / "bench.json"
    code = main(
        [
            "bench", "--model", "tiny-random", "--n", "4", "modes=[seal]",
            "workers=2", "inner_loop.epochs=1", "sample_passages=0", "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    res = json.loads(out.read_text())
    seal = res["modes"]["seal"]
    assert seal["workers"] == 2 and seal["threads_per_worker"] >= 1
    assert seal["capacity"] == 2  # 4 self-edits spread over both workers
    assert seal["self_edits"] == 4 and seal["accuracy"]["n"] > 0
    assert seal["train_tokens"] > 0 and 0 < seal["mfu"] < 1
    assert seal["startup_seconds"] > 0 and seal["worker_peak_rss_gb"] > 0


def test_chunks_give_every_worker_an_equal_share():
    from seal.executors import balanced_capacity

    # (jobs, capacity, workers) -> chunk size
    assert balanced_capacity(9, 9, 2) == 5  # 5 + 4, not 9 and an idle worker
    assert balanced_capacity(16, 8, 2) == 8  # already even
    assert balanced_capacity(16, 6, 2) == 4  # 4 x 4, not 6 + 6 + 4 (one worker twice)
    assert balanced_capacity(3, 2, 2) == 2
    assert balanced_capacity(1, 8, 2) == 1
    assert balanced_capacity(100, 8, 1) == 8  # one worker: the in-process chunks
