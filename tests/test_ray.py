"""The Ray executor on a local Ray cluster of 2 CPUs with the tiny model: the same rewards and
metrics as the in-process executor, a killed worker costs nothing, a killed driver resumes,
and a persistent failure is reported with its jobs and the worker's error."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from executor_runs import (
    CONFIG,
    inprocess_reference,
    kill_driver_then_resume,
    knowledge_runner_factory,
    outcome,
    run,
    run_config,
    run_with_a_killed_worker,
)

from seal.domains.base import Job

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
    assert run_with_a_killed_worker(tmp_path, monkeypatch, RAY) == reference


def test_driver_sigkill_then_resume(cluster, reference, tmp_path):
    assert kill_driver_then_resume(tmp_path, {**RAY, "address": cluster}) == reference


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
