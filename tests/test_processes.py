"""The process executor (local worker processes, one thread each) with the tiny model: the
same rewards and metrics as the in-process executor, a killed worker costs nothing, a killed
driver resumes, a persistent failure is reported with its jobs and the worker's error, chunks
give every worker an equal share, and `seal bench` runs seal's mode on workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from executor_runs import (
    inprocess_reference,
    kill_driver_then_resume,
    knowledge_runner_factory,
    outcome,
    run,
    run_config,
    run_with_a_killed_worker,
    sleep_as_worker,
)

from seal.domains.base import Job
from seal.executors import ExecutorError, ProcessExecutor, WorkerSpec

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
    assert run_with_a_killed_worker(tmp_path, monkeypatch, PROCESSES) == reference


def test_driver_sigkill_then_resume_from_the_command_line(reference, tmp_path):
    """`python -m seal run` with worker processes (spawned workers import the package, not
    the command line), killed after its first chunk, then resumed: nothing lost or changed."""
    assert kill_driver_then_resume(tmp_path, PROCESSES) == reference


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie left for its new parent to reap counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_exit_with_a_driver_killed_outright(tmp_path):
    """A driver killed by SIGKILL (no clean-up of its own runs) takes its worker processes
    with it (`executors.exit_with_parent`, which seal's workers and the bench's per-mode
    processes call), instead of leaving them computing on."""
    ready = tmp_path / "ready"
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent(
            f"""
            import multiprocessing, sys, time
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from executor_runs import {sleep_as_worker.__name__}
            if __name__ == "__main__":
                ctx = multiprocessing.get_context("spawn")
                ctx.Process(target={sleep_as_worker.__name__}, args=({str(ready)!r}, 300)).start()
                time.sleep(300)
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(driver)])
    try:
        deadline = time.time() + 120
        while not ready.exists() or not ready.read_text():
            assert time.time() < deadline and proc.poll() is None, "the worker never started"
            time.sleep(0.1)
        worker = int(ready.read_text())
        assert _alive(worker)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 30
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)


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
