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
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=2)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return 0


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
    b.add_argument("--modes", help="single,cpt")
    b.add_argument("--tasks", help="ARC task ids, comma-separated (--domain arc)")
    b.add_argument("--seed", type=int)
    b.add_argument("--json", help="write the rows to this JSON file")
    b.set_defaults(func=cmd_baselines)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        from seal.models import ModelUnavailable

        if isinstance(e, (DataError, ModelUnavailable, FileNotFoundError)):
            print(f"seal: {e}", file=sys.stderr)
            return 2
        raise
