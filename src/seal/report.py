"""report.md and plots for a run directory: accuracy per round (as the paper's Figure 4) and
the reward distribution per round. Regenerated from files alone (`seal report RUN_DIR`)."""

from __future__ import annotations

from pathlib import Path

from seal import stats
from seal.runs import RunDir, atomic_write_text, read_json, read_jsonl


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def write_report(run_dir: RunDir | str | Path) -> Path:
    """Write plots/ and report.md for the run; returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    metrics = rd.metrics()
    plots = rd.path / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    rounds = [m["round"] for m in metrics]

    # Accuracy per round with 95% CIs.
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if metrics:
        means = [100 * (m["eval_mean"] or 0) for m in metrics]
        lo = [100 * ((m["eval_mean"] or 0) - (m["eval_ci_low"] or 0)) for m in metrics]
        hi = [100 * ((m["eval_ci_high"] or 0) - (m["eval_mean"] or 0)) for m in metrics]
        ax.errorbar(rounds, means, yerr=[lo, hi], marker="o", capsize=4)
    ax.set_xlabel("ReST-EM round")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_xticks(rounds or [0])
    ax.set_title("Held-out accuracy per round (95% CI)")
    fig.tight_layout()
    fig.savefig(plots / "accuracy.png", dpi=120)
    plt.close(fig)

    # Reward distribution per round.
    dists = {}
    for r in rounds:
        if r == 0:
            continue
        recs = read_jsonl(rd.path / "self_edits" / f"round_{r}.jsonl")
        dists[r] = [x["reward"] for x in recs if x.get("reward") is not None]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if dists and any(dists.values()):
        ax.boxplot([v or [0] for v in dists.values()], tick_labels=[str(r) for r in dists])
    ax.set_xlabel("round")
    ax.set_ylabel("reward of a self-edit")
    ax.set_title("Reward distribution of sampled self-edits")
    fig.tight_layout()
    fig.savefig(plots / "rewards.png", dpi=120)
    plt.close(fig)

    lines = ["# SEAL run report", "", f"Run directory: `{rd.path}`", ""]
    cfg_text = (rd.path / "config.yaml").read_text() if (rd.path / "config.yaml").exists() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cfg_text.splitlines() if ln.startswith("model:")),
        "?",
    )
    lines += [
        f"Model: `{model}`",
        "",
        "| round | held-out accuracy % [95% CI] | n | reward mean % | reward max % | "
        "kept | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in metrics:
        lines.append(
            f"| {m['round']} | {_pct(m['eval_mean'])} [{_pct(m['eval_ci_low'])}, "
            f"{_pct(m['eval_ci_high'])}] | {m['eval_n']} | {_pct(m['reward_mean'])} | "
            f"{_pct(m.get('reward_max'))} | {m['n_kept']} | {m['seconds']:.0f} |"
        )
    # Is the change from round 0 to the last round significant? Paired over held-out items.
    if len(metrics) > 1:
        first = read_json(rd.path / "eval" / "round_0.scores.json")
        last_r = metrics[-1]["round"]
        last = read_json(rd.path / "eval" / f"round_{last_r}.scores.json")
        if first and last and len(first) == len(last):
            d = stats.paired_diff(last, first)
            lines += [
                "",
                f"Round {last_r} vs round 0 (paired over {d['n']} held-out items): "
                f"{100 * d['diff']:+.1f} points, 95% CI [{100 * d['ci_low']:+.1f}, "
                f"{100 * d['ci_high']:+.1f}], p = {d['p_value']:.3f} "
                f"({'significant' if d['p_value'] < 0.05 else 'not significant'} at 0.05).",
            ]
    lines += [
        "",
        "![accuracy per round](plots/accuracy.png)",
        "",
        "![reward distribution](plots/rewards.png)",
        "",
        "Files: `metrics.jsonl` (one line per round), `self_edits/round_N.jsonl` (every "
        "self-edit with its reward; `.jobs.jsonl`: every inner loop), `eval/`, "
        "`checkpoints/round_N/` (the generator update, PEFT format), `config.yaml`.",
        "",
    ]
    path = rd.path / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
