"""The paper's ARC rows (SEAL, few-shot table) for any model and task set.

    icl     in-context learning only: the base model answers from the demonstrations
    own     TTT with the model's own self-edit configurations, no RL: n self-edits per task
            (resampled until they parse, as the paper), each trained and scored
    oracle  TTT with the best hand configuration (ORACLE_CONFIG: every augmentation family,
            loss on output tokens, lr 1e-4, 2 epochs)

Each row's success rate is over its (task, self-edit, repeat) runs, binary, with a Wilson 95%
interval (it treats runs as independent; runs of one task are not, so read it as a rough
guide). Each row also yields an ARC-Prize submission: per test input, the 2 attempts voted
over every prediction of the row's runs on that task.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from seal import stats
from seal.config import (
    ConfigError,
    SelfEditConfig,
    deep_merge,
    f,
    from_dict,
    parse_overrides,
    read_yaml,
    to_dict,
    validate_tree,
)
from seal.inner_loop import InnerLoopConfig
from seal.models import DEFAULT_MODEL

from .domain import ArcDomain, load_task_pool, resolve_tasks
from .self_edit import ORACLE_CONFIG
from .ttt import ArcInnerLoop, TTTOutcome, TTTRequest, parse_arc_settings
from .vote import task_submission

ROWS = ("icl", "own", "oracle")
ROW_TITLES = {
    "icl": "ICL only (no TTT)",
    "own": "TTT + own self-edits (no RL)",
    "oracle": "Oracle TTT (paper's configuration)",
}

# ARC defaults that differ from the shared sections' (the paper: self-edits at temperature
# 0.8, 5 per evaluation task; TTT LoRA r=128 alpha=16). Applied under any YAML / flags, so a
# partial `self_edit:` section keeps them.
ARC_DEFAULTS: dict = {
    "self_edit": {"n_samples": 5, "temperature": 0.8, "max_new_tokens": 256},
    "inner_loop": {"r": 128, "alpha": 16.0},
}


@dataclass
class ArcBaselinesConfig:
    """`seal baselines --domain arc`: which model, tasks, rows and settings."""

    model: str = f(DEFAULT_MODEL, "preset, local directory, .gguf file or hub id")
    tasks: tuple[str, ...] = f(
        ("paper-eval",),
        "task ids or named sets (paper-train, paper-eval, paper-train-small, paper-eval-small)",
    )
    rows: tuple[str, ...] = f(ROWS, "which rows to compute: icl, own, oracle")
    repeats: int = f(1, "TTT runs per (task, configuration), different seeds (ICL: once)")
    seed: int = f(0, "seed for sampling, TTT data and adapter initialisation")
    device: str = f("auto", "auto, cpu or cuda")
    dtype: str = f("auto", "auto, bf16, fp16 or fp32")
    self_edit: SelfEditConfig = field(
        default_factory=lambda: SelfEditConfig(**ARC_DEFAULTS["self_edit"])
    )
    inner_loop: InnerLoopConfig = field(
        default_factory=lambda: InnerLoopConfig(**ARC_DEFAULTS["inner_loop"])
    )
    arc: dict = f({}, "ARC settings (the `arc:` section of configs/arc-*.yaml)")

    def validate(self) -> None:
        from seal.config import _check

        bad = [r for r in self.rows if r not in ROWS]
        _check(not bad, "rows", f"unknown row(s) {bad}; use {', '.join(ROWS)}")
        _check(self.repeats >= 1, "repeats", "must be >= 1")
        _check(len(self.tasks) > 0, "tasks", "name at least one task or set")
        parse_arc_settings(self.arc)


def from_run_config(data: dict) -> dict:
    """A `seal run` config (configs/arc-*.yaml) as baselines settings: its model, seed, device,
    self_edit, inner_loop and arc sections; its held-out tasks; `eval.n_samples` self-edits
    per task."""
    out = {
        k: data[k]
        for k in ("model", "seed", "device", "dtype", "self_edit", "inner_loop", "arc")
        if k in data
    }
    tasks = (data.get("data") or {}).get("tasks_eval")
    if tasks:
        out["tasks"] = tasks
    n = (data.get("eval") or {}).get("n_samples")
    if n:
        out["self_edit"] = {**out.get("self_edit", {}), "n_samples": n}
    return out


def _row(name: str, outcomes: list[TTTOutcome], seconds: float) -> dict:
    wins = sum(1 for o in outcomes if o.reward == 1.0)
    ci = stats.wilson_ci(wins, len(outcomes))
    runs = sum(1 for o in outcomes if o.trained)
    status: dict[str, int] = {}
    per_task: dict[str, list[float]] = {}
    for o in outcomes:
        status[o.status] = status.get(o.status, 0) + 1
        per_task.setdefault(o.task_id, []).append(o.reward)
    n_tasks = len(per_task)
    return {
        "row": name,
        "title": ROW_TITLES[name],
        "mean": ci["mean"],
        "n": ci["n"],
        "successes": wins,
        "ci_low": ci["ci_low"],
        "ci_high": ci["ci_high"],
        "ttt_runs": runs,
        "seconds": round(seconds, 2),
        "seconds_per_ttt_run": round(seconds / runs, 2) if runs else None,
        "seconds_per_task": round(seconds / n_tasks, 2) if n_tasks else None,
        "status": status,
        "per_task": per_task,
    }


def _submission(tasks, outcomes: list[TTTOutcome]) -> dict:
    """Per task and test input, the 2 attempts voted over all the row's predictions."""
    runs: dict[str, list] = {}
    for o in outcomes:
        if o.prediction:
            runs.setdefault(o.task_id, []).append(o.prediction.predictions)
    return task_submission(tasks, runs)


def _runs(outcomes: list[TTTOutcome]) -> list[dict]:
    return [
        {
            "key": o.key,
            "task_id": o.task_id,
            "reward": o.reward,
            "status": o.status,
            "reason": o.reason,
            "config": o.config,
            "correct": o.correct,
            "n_examples": o.n_examples,
            "steps": o.steps,
            "seconds": round(o.seconds, 2),
        }
        for o in outcomes
    ]


def run_arc_baselines(cfg: ArcBaselinesConfig, lm=None, log=print) -> dict:
    """Compute the rows; returns a JSON-ready dict: `rows` (each with mean, n, ci_low,
    ci_high, timings), `runs` (per inner loop), `self_edits`, and `submissions` (row ->
    ARC-Prize submission)."""
    from seal.models import load_model

    t_start = time.time()
    settings = parse_arc_settings(cfg.arc)
    tasks = resolve_tasks(cfg.tasks, load_task_pool(settings), settings.small_max_side, key="tasks")
    if not tasks:
        raise ConfigError(f"tasks: {list(cfg.tasks)} selects no task")
    lm = lm or load_model(cfg.model, cfg.device, cfg.dtype, progress=log)
    domain = ArcDomain(tasks, tasks, cfg.self_edit, cfg.inner_loop, settings)
    inner = ArcInnerLoop(lm, cfg.inner_loop, settings)
    rows, runs, subs, own = [], {}, {}, {}
    try:
        for row in cfg.rows:
            t0 = time.time()
            if row == "icl":
                reqs = [TTTRequest(f"icl/{t.id}", t, None, cfg.seed) for t in tasks]
            elif row == "oracle":
                reqs = [
                    TTTRequest(f"oracle/{t.id}/{r}", t, ORACLE_CONFIG, cfg.seed + 1000 * r)
                    for t in tasks
                    for r in range(cfg.repeats)
                ]
            else:
                n = cfg.self_edit.n_samples
                log(f"[seal] sampling {n} self-edits x {len(tasks)} tasks")
                comps = domain.sample_self_edits(lm, tasks, n, cfg.seed)
                own = {t.id: c for t, c in zip(tasks, comps, strict=True)}
                reqs = [
                    TTTRequest.from_self_edit(
                        f"own/{t.id}/{s}/{r}", t, text, cfg.seed + 1000 * r + s
                    )
                    for t in tasks
                    for s, text in enumerate(own[t.id])
                    for r in range(cfg.repeats)
                ]
            outcomes = inner.run(reqs)
            entry = _row(row, outcomes, time.time() - t0)
            rows.append(entry)
            runs[row] = _runs(outcomes)
            subs[row] = _submission(tasks, outcomes)
            log(f"[seal] {ROW_TITLES[row]:36s} {_fmt(entry)}")
    finally:
        inner.close()
    return {
        "domain": "arc",
        "model": cfg.model,
        "tasks": [t.id for t in tasks],
        "rows": rows,
        "runs": runs,
        "self_edits": own,
        "submissions": subs,
        "config": to_dict(cfg),
        "seconds": round(time.time() - t_start, 1),
    }


def _fmt(e: dict) -> str:
    if e["mean"] is None:
        return "n/a"
    return (
        f"{100 * e['mean']:.1f}% [{100 * e['ci_low']:.1f}, {100 * e['ci_high']:.1f}] (n={e['n']})"
    )


def render_arc_table(result: dict):
    """A rich table of the rows for the terminal."""
    from rich.table import Table

    t = Table(
        title=f"{result['model']} on {len(result['tasks'])} ARC tasks: success rate (Wilson 95% CI)"
    )
    for col in ("row", "success %", "95% CI", "n", "TTT runs", "s/TTT run", "failures"):
        t.add_column(col, justify="left" if col in ("row", "failures") else "right")
    for e in result["rows"]:
        fails = ", ".join(
            f"{k} {v}" for k, v in sorted(e["status"].items()) if k not in ("solved", "unsolved")
        )
        spr = e["seconds_per_ttt_run"]
        t.add_row(
            e["title"],
            "-" if e["mean"] is None else f"{100 * e['mean']:.1f}",
            "-" if e["mean"] is None else f"[{100 * e['ci_low']:.1f}, {100 * e['ci_high']:.1f}]",
            str(e["n"]),
            str(e["ttt_runs"]),
            "-" if spr is None else f"{spr:.1f}",
            fails or "-",
        )
    return t


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def submission_path(json_path: str | Path, row: str) -> Path:
    """Where a row's submission goes beside the results: out.json -> out.submission_<row>.json."""
    p = Path(json_path)
    stem = p.name[: -len(".json")] if p.name.endswith(".json") else p.name
    return p.with_name(f"{stem}.submission_{row}.json")


def load_arc_baselines_config(
    path: str | None, flags: dict, overrides: list[str]
) -> ArcBaselinesConfig:
    """ARC defaults, then the YAML at `path` (an ArcBaselinesConfig, or a `seal run` config
    such as configs/arc-cpu.yaml, read with `from_run_config`), then flags, then key=value
    overrides; validated."""
    data = read_yaml(path) if path else {}
    if {"domain", "data", "rounds", "rest_em", "eval"} & data.keys():
        if data.get("domain", "arc") != "arc":
            raise ConfigError(f"{path}: a {data['domain']!r} run config, not an ARC one")
        data = from_run_config(data)
    data = deep_merge(ARC_DEFAULTS, data)
    data = deep_merge(data, {k: v for k, v in flags.items() if v is not None})
    data = deep_merge(data, parse_overrides(overrides))
    cfg = from_dict(ArcBaselinesConfig, data)
    validate_tree(cfg)
    return cfg


def cli_arc_baselines(args) -> int:
    """`seal baselines --domain arc`: run the rows, print the table, and with `--json OUT`
    write the results there and each row's ARC-Prize submission beside them."""
    from seal.cli import _console

    for flag in ("data", "limit", "teacher", "teacher_url", "teacher_model", "modes"):
        if getattr(args, flag, None) is not None:
            name = flag.replace("_", "-")
            raise ConfigError(
                f"--{name} is for the knowledge domain; with --domain arc use --tasks"
            )
    flags = {
        "model": args.model,
        "seed": args.seed,
        "tasks": [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None,
    }
    cfg = load_arc_baselines_config(args.config, flags, list(args.overrides or []))
    result = run_arc_baselines(cfg)
    subs = result.pop("submissions")
    _console().print(render_arc_table(result))
    if args.json:
        files = {}
        for row, sub in subs.items():
            path = submission_path(args.json, row)
            _write_json(path, sub)
            files[row] = str(path)
        result["submission_files"] = files
        _write_json(Path(args.json), result)
        print(f"wrote {args.json} and {len(files)} submission file(s)")
    return 0
