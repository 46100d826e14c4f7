"""Shared by the executor tests (test_processes.py, test_ray.py): one small ReST-EM run on the
tiny model, and everything it computed without timings, to compare executors' runs."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

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
