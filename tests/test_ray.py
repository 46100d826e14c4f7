"""The Ray executor on a local Ray cluster of 2 CPUs with the tiny model: the same rewards and
metrics as the in-process executor, a killed worker costs nothing, a killed driver resumes,
and a persistent failure is reported with its jobs and the worker's error."""

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
from seal.runs import read_jsonl

ray = pytest.importorskip("ray", reason="the Ray executor needs `pip install seal-lm[ray]`")

RAY = {"kind": "ray", "workers": 2, "cpus_per_worker": 1}


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for this module; its address lets subprocesses join."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return inprocess_reference(tmp_path_factory)


def test_ray_run_equals_inprocess_run(cluster, reference, tmp_path):
    logs: list[str] = []
    run(tmp_path / "run", run_config(**RAY), logs)
    out = outcome(tmp_path / "run")
    assert [m["round"] for m in out["metrics"]] == [0, 1]
    assert out == reference
    assert any("ray executor: 2 worker(s)" in m for m in logs)


def test_killed_worker_loses_nothing(cluster, reference, tmp_path, monkeypatch):
    # The first worker to start a chunk SIGKILLs itself; its chunk must be retried elsewhere.
    (tmp_path / "once").mkdir()
    monkeypatch.setenv("SEAL_FAILPOINT", "worker_run")
    monkeypatch.setenv("SEAL_FAILPOINT_ONCE", str(tmp_path / "once"))
    logs: list[str] = []
    run(tmp_path / "run", run_config(**RAY), logs)
    assert (tmp_path / "once" / "worker_run").exists()  # the fault did fire
    assert any("died on jobs" in m for m in logs), logs
    assert outcome(tmp_path / "run") == reference


def test_driver_sigkill_then_resume(cluster, reference, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**CONFIG, "executor": {**RAY, "address": cluster}}))
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEAL_FAILPOINT": "after_chunk"}
    cmd = [sys.executable, "-m", "seal", "run", str(cfg), "--run-dir", str(run_dir)]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    done_before = len(read_jsonl(run_dir / "eval" / "round_0.jobs.jsonl"))
    assert done_before >= 1 and not (run_dir / "metrics.jsonl").exists()
    env.pop("SEAL_FAILPOINT")
    resumed = subprocess.run(
        [sys.executable, "-m", "seal", "run", "--resume", str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert outcome(run_dir) == reference


def test_persistent_failure_names_jobs_and_error(cluster):
    from seal.executors import ExecutorError, RayExecutor, WorkerSpec

    spec = WorkerSpec("tiny-random", "cpu", "auto", knowledge_runner_factory(), updates=[])
    ex = RayExecutor(spec, workers=2, cpus_per_worker=1, max_retries=1, log=lambda _: None)
    try:
        bad = [Job(f"ctx/{i}/0", "ctx", i, 0, i, payload={"nonsense": True}) for i in range(2)]
        with pytest.raises(ExecutorError, match=r"\[ctx/0/0, ctx/1/0\] failed 2 times"):
            ex.run(bad, lambda *_: None)
    finally:
        ex.close()


def test_without_ray_the_error_says_how_to_install(monkeypatch, tmp_path):
    from seal.cli import main
    from seal.executors import MissingDependency, _import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(MissingDependency, match=r"pip install 'seal-lm\[ray\]'"):
        _import_ray()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**CONFIG, "rounds": 0}))
    code = main(["run", str(cfg), "--executor", "ray", "--run-dir", str(tmp_path / "r")])
    assert code == 2


def test_bench_ray_scaling_figures(cluster, tmp_path):
    from seal.cli import main

    out = tmp_path / "bench.json"
    code = main(
        [
            "bench", "--model", "tiny-random", "--executor", "ray", "--workers", "1,2",
            "--n", "4", "inner_loop.epochs=1", "sample_passages=0", "capacity=2",
            "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    res = json.loads(out.read_text())
    rows = res["ray"]["workers"]
    assert [r["workers"] for r in rows] == [1, 2]
    assert rows[0]["scaling_efficiency"] == 1.0
    assert all(r["evals_per_hour"] > 0 and r["accuracy"]["n"] > 0 for r in rows)
    assert set(res["ray_scaling_efficiency"]) == {"1", "2"}
