"""The `seal` command: thin sub-commands that parse, build objects and call.

seal models                      presets, availability, size, licence
seal prompts                     the self-edit prompt variants
seal baselines [opts] [k=v ...]  the paper's knowledge rows for a model and passage set
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from seal.config import (
    ConfigError,
    deep_merge,
    from_dict,
    parse_overrides,
    read_yaml,
    validate_tree,
)


def _console():
    import shutil

    from rich.console import Console

    return Console(width=max(120, shutil.get_terminal_size((120, 40)).columns))


def cmd_models(args) -> int:
    from rich.table import Table

    from seal.models import describe_presets

    rows = describe_presets()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    t = Table(title="seal model presets (also: any hub id, local directory or .gguf file)")
    for c in ("name", "available", "params", "size", "licence", "description"):
        t.add_column(c)
    for r in rows:
        t.add_row(
            r["name"],
            "yes" + (" (converted)" if r["cached"] else "") if r["available"] else "no",
            r["params"],
            r["size"],
            r["licence"],
            r["description"],
        )
    _console().print(t)
    for r in rows:
        if not r["available"]:
            print(f"to install {r['name']}: {r['install']}")
    return 0


def cmd_prompts(args) -> int:
    from seal.domains.knowledge import PROMPTS

    for p in PROMPTS.values():
        print(f"== {p.name} (split: {p.split})")
        print(
            p.render("{title}", "{context}") + p.cue
            if p.split != "none"
            else "(no self-edit: train on the passage alone)"
        )
    return 0


def _load_config(cls, path: str | None, flag_values: dict, overrides: list[str]):
    data = read_yaml(path) if path else {}
    try:
        from_dict(cls, data)  # the file alone first, so its errors name it
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    data = deep_merge(data, {k: v for k, v in flag_values.items() if v is not None})
    data = deep_merge(data, parse_overrides(overrides))
    cfg = from_dict(cls, data)
    validate_tree(cfg)
    return cfg


def cmd_baselines(args) -> int:
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from seal.baselines import BaselinesConfig, render_table, run_baselines

    if args.domain == "arc":
        from seal.domains.arc.baselines import cli_arc_baselines

        return cli_arc_baselines(args)
    flags = {
        "model": args.model,
        "data": args.data,
        "limit": args.limit,
        "teacher": args.teacher,
        "teacher_url": args.teacher_url,
        "teacher_model": args.teacher_model,
        "seed": args.seed,
        "modes": args.modes.split(",") if args.modes else None,
    }
    cfg = _load_config(BaselinesConfig, args.config, flags, args.overrides)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task("inner loops", total=None)

        def progress(n):
            bar.update(task, advance=n)

        result = run_baselines(
            cfg,
            log=lambda m: bar.console.print(m, markup=False, highlight=False),
            progress=progress,
        )
    _console().print(render_table(result))
    if args.json:
        _write_json(args.json, result)
    return 0


def _progress_factory(bar):
    def make(desc, total):
        task = bar.add_task(desc, total=total)

        class Advance:
            def __call__(self, n=1):
                bar.update(task, advance=n)

            def __setattr__(self, name, value):
                if name == "total":
                    bar.update(task, total=value)

        return Advance()

    return make


def cmd_run(args) -> int:
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from seal import rest_em
    from seal.report import write_report
    from seal.runs import RunDir, atomic_write_text

    if args.resume:
        rd = RunDir(args.resume)
        if not rd.exists():
            raise ConfigError(f"--resume {args.resume}: not a run directory (no config.yaml)")
        if args.config or args.overrides:
            raise ConfigError("--resume takes the run's own config; give no CONFIG or overrides")
        cfg = _load_config(rest_em.RunConfig, str(rd.path / "config.yaml"), {}, [])
    else:
        if not args.config:
            raise ConfigError("seal run needs a CONFIG.yaml (or --resume RUN_DIR)")
        executor = {"kind": args.executor, "workers": args.workers, "address": args.ray_address}
        executor = {k: v for k, v in executor.items() if v is not None}
        flags = {"executor": executor} if executor else {}
        cfg = _load_config(rest_em.RunConfig, args.config, flags, args.overrides)
        rd = RunDir(args.run_dir) if args.run_dir else RunDir.fresh("runs", Path(args.config).stem)
        if rd.exists():
            raise ConfigError(f"{rd.path} already holds a run; use --resume {rd.path}")
        rd.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(rd.path / "config.yaml", rest_em.resolved_config_yaml(cfg))
    print(f"run directory: {rd.path}")
    con = _console()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=con,
        transient=True,
        disable=not cfg.logging.progress,
    ) as bar:
        metrics = rest_em.run(
            cfg,
            rd,
            log=lambda m: bar.console.print(m, markup=False, highlight=False),
            progress_factory=_progress_factory(bar),
        )
    rd.set_state(phase="report")
    report = write_report(rd)
    rd.set_state(phase="finished")
    con.print(_round_table(metrics))
    print(f"report: {report}")
    return 0


def _round_table(metrics):
    from rich.table import Table

    t = Table(title="SEAL rounds (held-out accuracy, 95% CI)")
    for c in ("round", "eval %", "95% CI", "n", "reward mean %", "kept", "seconds"):
        t.add_column(c, justify="right")
    for m in metrics:

        def pct(x):
            return "n/a" if x is None else f"{100 * x:.1f}"

        t.add_row(
            str(m["round"]),
            pct(m["eval_mean"]),
            f"[{pct(m['eval_ci_low'])}, {pct(m['eval_ci_high'])}]",
            str(m["eval_n"]),
            pct(m["reward_mean"]),
            str(m["n_kept"]),
            f"{m['seconds']:.0f}",
        )
    return t


def cmd_report(args) -> int:
    from seal.report import write_report
    from seal.runs import RunDir

    rd = RunDir(args.run_dir)
    if not rd.exists():
        raise ConfigError(f"{args.run_dir}: not a run directory (no config.yaml)")
    print(write_report(rd))
    return 0


def cmd_bench(args) -> int:
    from seal.bench import BenchConfig, run_bench

    flags = {"model": args.model, "data": args.data, "n": args.n}
    if args.executor == "ray":
        flags["modes"] = ["ray"]
        flags["ray_workers"] = [int(w) for w in (args.workers or "1,2").split(",")]
        flags["ray_address"] = args.ray_address
    cfg = _load_config(BenchConfig, args.config, flags, args.overrides)
    # The JSON is rewritten after every mode: a long bench stopped part-way keeps its figures.
    res = run_bench(cfg, on_mode=(lambda r: _write_json(args.json, r)) if args.json else None)
    if "ray" in res:
        print(json.dumps(res["ray"]["workers"], indent=1))
    print(
        json.dumps(
            {
                k: res[k]
                for k in (
                    "speedup_vs_reference",
                    "speedup_vs_sequential",
                    "speedup_vs_capacity1",
                    "speedup_vs_seal_inprocess",
                    "mfu",
                    "frozen_base_mfu",
                    "peak_rss_gb",
                )
                if k in res
            },
            indent=1,
        )
    )
    if args.json:
        _write_json(args.json, res)
    return 0


def _write_json(path: str, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)
    print(f"wrote {path}")


def cmd_doctor(args) -> int:
    from seal.doctor import checks

    bad = 0
    for what, ok, detail in checks(args.judge_url or "", args.api_key_env):
        print(f"{'ok ' if ok else 'FIX'}  {what:34s} {detail}")
        bad += not ok
    print("all good" if not bad else f"{bad} thing(s) to fix")
    return 0 if not bad else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seal", description="SEAL: self-adapting language models")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list model presets")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    pr = sub.add_parser("prompts", help="show the self-edit prompt variants")
    pr.set_defaults(func=cmd_prompts)

    b = sub.add_parser("baselines", help="the paper's knowledge-incorporation rows")
    b.add_argument("overrides", nargs="*", help="key=value overrides (e.g. inner_loop.epochs=5)")
    b.add_argument("--config", help="YAML config (BaselinesConfig fields)")
    b.add_argument("--domain", default="knowledge", choices=["knowledge", "arc"])
    b.add_argument("--model")
    b.add_argument("--data", help="demo[:train|eval], a JSON path, or hf:squad")
    b.add_argument("--limit", type=int)
    b.add_argument("--teacher", help="teacher self-edits JSON")
    b.add_argument("--teacher-url", help="OpenAI-compatible endpoint of a teacher model")
    b.add_argument("--teacher-model", help="the teacher model's name at --teacher-url")
    b.add_argument("--modes", help="single,cpt")
    b.add_argument("--tasks", help="ARC task ids, comma-separated (--domain arc)")
    b.add_argument("--seed", type=int)
    b.add_argument("--json", help="write the rows to this JSON file")
    b.set_defaults(func=cmd_baselines)

    r = sub.add_parser("run", help="a SEAL experiment: ReST-EM rounds in a run directory")
    r.add_argument("config", nargs="?", help="YAML config (see configs/)")
    r.add_argument("overrides", nargs="*", help="key=value overrides (e.g. rounds=2)")
    r.add_argument("--run-dir", help="run directory (default: runs/<time>-<config name>)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run")
    r.add_argument("--executor", choices=["inprocess", "processes", "ray"], help="= executor.kind")
    r.add_argument("--workers", type=int, help="= executor.workers (worker processes, ray actors)")
    r.add_argument("--ray-address", help="= executor.address ('auto' joins a running cluster)")
    r.set_defaults(func=cmd_run)

    be = sub.add_parser("bench", help="inner-loop throughput vs the reference design")
    be.add_argument("overrides", nargs="*", help="key=value (e.g. inner_loop.epochs=2 n=8)")
    be.add_argument("--config")
    be.add_argument("--model")
    be.add_argument("--data")
    be.add_argument("--n", type=int, help="self-edits for every mode but reference")
    be.add_argument(
        "--executor", choices=["inprocess", "ray"], help="ray: throughput per worker count"
    )
    be.add_argument("--workers", help="ray worker counts to measure, e.g. 1,2 (default 1,2)")
    be.add_argument("--ray-address", help="join this Ray cluster ('auto') instead of a local one")
    be.add_argument("--json", help="write the figures to this JSON file")
    be.set_defaults(func=cmd_bench)

    do = sub.add_parser("doctor", help="check the environment and say what to fix")
    do.add_argument("--judge-url", help="also check this judge endpoint")
    do.add_argument("--api-key-env", default="OPENAI_API_KEY")
    do.set_defaults(func=cmd_doctor)

    rp = sub.add_parser("report", help="regenerate report.md and plots of a run")
    rp.add_argument("run_dir")
    rp.set_defaults(func=cmd_report)
    return p


def entry() -> int:
    """The `seal` command: re-executed once on jemalloc where there is one (allocator.py:
    glibc's malloc slows a process down after a batched inner loop), then `main`."""
    from seal import allocator

    allocator.reexec_with_jemalloc(sys.argv[1:])
    return main()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after options; argparse takes positionals in one
    # run, so later ones are picked up here.
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides or []) + extra
    try:
        return args.func(args) or 0
    except ConfigError as e:
        print(f"seal: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("seal: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user-facing errors from data and models: one line, no traceback
        from seal.domains.knowledge import DataError
        from seal.executors import ExecutorError, MissingDependency
        from seal.models import ModelUnavailable
        from seal.runs import CorruptFile

        user = (DataError, ModelUnavailable, FileNotFoundError, MissingDependency, CorruptFile)
        if isinstance(e, user):
            print(f"seal: {e}", file=sys.stderr)
            return 2
        if isinstance(e, ExecutorError):  # finished inner loops are on disk: --resume
            print(f"seal: {e}", file=sys.stderr)
            return 1
        raise
