"""The paper's knowledge-incorporation rows (Table 2) for any model and passage set.

Rows: base model; train on the passage only; passage + the model's own self-edits; passage +
a teacher's self-edits — in the single-passage setting (one adapter per passage and self-edit)
and in continued pretraining (one adapter for all N passages at once). Each row is a mean over
questions with a bootstrap 95% CI; paired differences compare rows question by question.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from seal import stats
from seal.config import JudgeConfig, SelfEditConfig, f
from seal.domains.knowledge import (
    DataError,
    Passage,
    load_passages,
    load_teacher_self_edits,
    prompt_variant,
    self_edit_prompt_text,
    training_texts,
)
from seal.generation import SamplingParams, sample_completions
from seal.inner_loop import InnerLoop, InnerLoopConfig, KnowledgeJob
from seal.models import DEFAULT_MODEL

ROWS = ("base", "passage", "own", "teacher")
ROW_TITLES = {
    "base": "base model",
    "passage": "train on passage only",
    "own": "passage + own self-edits",
    "teacher": "passage + teacher self-edits",
}


@dataclass
class BaselinesConfig:
    """`seal baselines`: which model, passages, rows and settings."""

    model: str = f(DEFAULT_MODEL, "preset, local directory, .gguf file or hub id")
    data: str = f("demo:eval", "passages: demo[:split], a SEAL/SQuAD JSON path, or hf:squad")
    limit: int = f(0, "use the first N passages (0 = all)")
    teacher: str = f(
        "",
        "teacher self-edits file ({title, context, completions}); "
        "default for demo data: the shipped demo teacher file",
    )
    teacher_url: str = f(
        "",
        "or: an OpenAI-compatible endpoint whose model writes the teacher self-edits "
        "(e.g. https://api.openai.com/v1)",
    )
    teacher_model: str = f("gpt-4.1", "the teacher model at teacher_url")
    teacher_api_key_env: str = f("OPENAI_API_KEY", "environment variable with its API key")
    modes: tuple[str, ...] = f(("single",), "single and/or cpt (continued pretraining)")
    rows: tuple[str, ...] = f(ROWS, "which rows to compute")
    repeats: int = f(1, "inner-loop runs per (passage, self-edit), different seeds")
    seed: int = f(0, "seed for sampling and adapter initialisation")
    device: str = f("auto", "auto, cpu or cuda")
    dtype: str = f("auto", "auto, bf16, fp16 or fp32")
    self_edit: SelfEditConfig = field(default_factory=SelfEditConfig)
    inner_loop: InnerLoopConfig = field(default_factory=InnerLoopConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def validate(self) -> None:
        from seal.config import _check

        _check(self.limit >= 0, "limit", "must be >= 0")
        _check(self.repeats >= 1, "repeats", "must be >= 1")
        bad = [m for m in self.modes if m not in ("single", "cpt")]
        _check(not bad, "modes", f"unknown mode(s) {bad}; use single, cpt")
        bad = [r for r in self.rows if r not in ROWS]
        _check(not bad, "rows", f"unknown row(s) {bad}; use {', '.join(ROWS)}")


def _teacher_file(cfg: BaselinesConfig) -> str:
    if cfg.teacher:
        return cfg.teacher
    if cfg.data.startswith("demo"):
        from seal.domains.knowledge import demo_path

        return str(demo_path("teacher_self_edits"))
    return ""


def question_scores(results, passages: list[Passage], metric: str) -> list[float | None]:
    """Per-question score, averaged over the inner loops (self-edits x repeats) that asked it."""
    n_q = sum(len(p.questions) for p in passages)
    sums, counts = [0.0] * n_q, [0] * n_q
    for res_list in results:
        for i, g in enumerate(res_list.grades):
            v = g.get(metric)
            if v is not None:
                sums[i] += v
                counts[i] += 1
    return [s / c if c else None for s, c in zip(sums, counts, strict=True)]


def run_baselines(cfg: BaselinesConfig, lm=None, log=print, progress=None) -> dict:
    """Compute the rows; returns a JSON-ready dict with `rows` and `paired`."""
    from seal.models import load_model

    t_start = time.time()
    passages = load_passages(cfg.data)
    if cfg.limit:
        passages = passages[: cfg.limit]
    passages = [p for p in passages if p.questions]
    if not passages:
        raise DataError(f"{cfg.data}: no passages with questions")
    lm = lm or load_model(cfg.model, cfg.device, cfg.dtype, progress=log)
    judge = cfg.judge.build()
    inner = InnerLoop(lm, cfg.inner_loop, judge=judge)
    variant = prompt_variant(cfg.self_edit.prompt, cfg.self_edit.variants())
    metric = cfg.inner_loop.reward_metric
    n_questions = sum(len(p.questions) for p in passages)

    # Self-edits: the model's own (sampled) and the teacher's (from a file).
    own: dict[str, list[str]] = {}
    if "own" in cfg.rows and variant.split != "none":
        log(f"[seal] sampling {cfg.self_edit.n_samples} self-edits x {len(passages)} passages")
        params = SamplingParams(
            cfg.self_edit.max_new_tokens, True, cfg.self_edit.temperature, cfg.self_edit.top_p
        )
        texts = [
            self_edit_prompt_text(p, variant, lm.tokenizer, cfg.self_edit.chat) for p in passages
        ]
        comps = sample_completions(
            lm.model,
            lm.tokenizer,
            texts,
            cfg.self_edit.n_samples,
            params,
            cfg.seed,
            cfg.self_edit.batch_size,
        )
        own = {p.id: c for p, c in zip(passages, comps, strict=True)}
    teacher: dict[str, list[str]] = {}
    tfile = _teacher_file(cfg) if not cfg.teacher_url else ""
    if "teacher" in cfg.rows and cfg.teacher_url:
        teacher = write_teacher_self_edits(cfg, passages, variant, log)
    elif "teacher" in cfg.rows and tfile:
        teacher = load_teacher_self_edits(tfile, passages)
        missing = len(passages) - len(teacher)
        if missing:
            log(f"[seal] teacher file {tfile}: no self-edits for {missing} of the passages")

    sources = {"passage": {p.id: [] for p in passages}, "own": own, "teacher": teacher}
    rows_out, per_row_scores, per_row_metrics = [], {}, {}
    for mode in cfg.modes:
        for row in cfg.rows:
            if row in ("own", "teacher") and not sources[row]:
                log(f"[seal] row {row!r} ({mode}) skipped: no self-edits")
                continue
            if row == "base" and mode == "cpt" and "single" in cfg.modes:
                continue  # the same numbers as the single-passage base row
            t0 = time.time()
            jobs = _jobs(row, mode, passages, sources, variant, cfg)
            results = inner.run(jobs, progress=progress)
            seconds = time.time() - t0
            # Group results per passage (single) or keep the one CPT job's questions.
            if mode == "single":
                by_passage: dict[str, list] = {}
                for job, res in zip(jobs, results, strict=True):
                    by_passage.setdefault(job.passages[0].id, []).append(res)
                scores_by_metric = {}
                for m in ("em", "f1", "contains", "strict", "judge", "recitation"):
                    qs = []
                    for p in passages:
                        qs.extend(
                            question_scores(by_passage.get(p.id, []), [p], m)
                            if p.id in by_passage
                            else [None] * len(p.questions)
                        )
                    scores_by_metric[m] = qs
            else:
                scores_by_metric = {
                    m: question_scores(results, passages, m)
                    for m in ("em", "f1", "contains", "strict", "judge", "recitation")
                }
            main = scores_by_metric[metric]
            graded = [s for s in main if s is not None]
            ci = stats.mean_ci(graded, seed=cfg.seed)
            n_inner = sum(1 for j in jobs if j.texts)
            entry = {
                "row": row,
                "title": ROW_TITLES[row],
                "mode": mode,
                "metric": metric,
                "mean": ci["mean"],
                "n": ci["n"],
                "ci_low": ci["ci_low"],
                "ci_high": ci["ci_high"],
                "metrics": {
                    m: stats.mean_ci([s for s in v if s is not None], seed=cfg.seed)
                    for m, v in scores_by_metric.items()
                },
                "inner_loops": n_inner,
                "seconds": round(seconds, 2),
                "seconds_per_inner_loop": round(seconds / n_inner, 2) if n_inner else None,
            }
            rows_out.append(entry)
            per_row_scores[(row, mode)] = main
            per_row_metrics[(row, mode)] = scores_by_metric
            log(f"[seal] {mode:6s} {ROW_TITLES[row]:30s} {metric} {_fmt(entry)}")

    paired = []
    keys = list(per_row_scores)
    for i, a in enumerate(keys):
        for b in keys[:i]:
            xa, xb = per_row_scores[a], per_row_scores[b]
            pairs = [(x, y) for x, y in zip(xa, xb, strict=True) if x is not None and y is not None]
            if not pairs:
                continue
            d = stats.paired_diff([x for x, _ in pairs], [y for _, y in pairs], seed=cfg.seed)
            paired.append({"a": f"{a[0]}/{a[1]}", "b": f"{b[0]}/{b[1]}", "metric": metric, **d})
    return {
        "model": cfg.model,
        "data": cfg.data,
        "passages": len(passages),
        "questions": n_questions,
        "metric": metric,
        "rows": rows_out,
        "paired": paired,
        "seconds": round(time.time() - t_start, 1),
        "self_edits": {"own": own, "teacher_file": tfile},
    }


def write_teacher_self_edits(cfg: BaselinesConfig, passages, variant, log) -> dict[str, list[str]]:
    """Self-edits written by a teacher model behind an OpenAI-compatible endpoint, with the
    same (raw) prompt the model itself gets; failed requests are reported, not fatal."""
    from seal.remote import OpenAITeacher

    se = cfg.self_edit
    with OpenAITeacher(
        cfg.teacher_url, cfg.teacher_model, api_key_env=cfg.teacher_api_key_env
    ) as teacher:
        prompts = [self_edit_prompt_text(p, variant, None, chat=False) for p in passages]
        outs = teacher.write(prompts, se.n_samples, se.temperature, se.top_p, se.max_new_tokens)
        for i, err in teacher.errors.items():
            log(f"[seal] teacher: no self-edits for passage {passages[i].title!r}: {err}")
    return {p.id: o for p, o in zip(passages, outs, strict=True) if o}


def _jobs(
    row: str, mode: str, passages: list[Passage], sources, variant, cfg
) -> list[KnowledgeJob]:
    """The inner loops behind one row."""
    include = cfg.inner_loop.include_passage
    if row == "base":
        return [KnowledgeJob(f"base/{p.id}", [p], [], cfg.seed) for p in passages]
    edits = sources[row]
    if mode == "single":
        jobs = []
        for p in passages:
            comps = edits.get(p.id)
            if comps is None:
                continue
            # Passage only: one job; self-edits: one job per self-edit.
            for s, comp in enumerate(comps or [None]):
                texts = training_texts(p, [comp] if comp else [], variant, include)
                for r in range(cfg.repeats):
                    jobs.append(
                        KnowledgeJob(f"{row}/{p.id}/{s}/{r}", [p], texts, cfg.seed + 1000 * r + s)
                    )
        return jobs
    texts = [
        t
        for p in passages
        if p.id in edits
        for t in training_texts(p, edits[p.id], variant, include)
    ]
    return [
        KnowledgeJob(f"{row}/cpt/{r}", passages, texts, cfg.seed + 1000 * r)
        for r in range(cfg.repeats)
    ]


def _fmt(e: dict) -> str:
    if e["mean"] is None:
        return "n/a"
    return f"{100 * e['mean']:.1f} [{100 * e['ci_low']:.1f}, {100 * e['ci_high']:.1f}] (n={e['n']})"


def render_table(result: dict):
    """A rich table of the rows (all metrics) for the terminal."""
    from rich.table import Table

    t = Table(
        title=f"{result['model']} on {result['data']}: {result['passages']} passages, "
        f"{result['questions']} questions (95% CI)"
    )
    for col in ("mode", "row", "strict", "contains", "f1", "em", "judge", "recite", "s/inner"):
        t.add_column(col, justify="left" if col in ("mode", "row") else "right")
    for e in result["rows"]:
        cells = []
        for m in ("strict", "contains", "f1", "em", "judge", "recitation"):
            ci = e["metrics"][m]
            cells.append(
                "-"
                if ci["mean"] is None
                else f"{100 * ci['mean']:.1f} [{100 * ci['ci_low']:.0f}-{100 * ci['ci_high']:.0f}]"
            )
        spl = e["seconds_per_inner_loop"]
        t.add_row(e["mode"], e["title"], *cells, "-" if spl is None else f"{spl:.1f}")
    return t
