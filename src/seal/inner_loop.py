"""The inner loop: apply a self-edit to the base model and score it — the reward.

    (base model, passage, self-edit)
      -> training sequences (the paper's splitting rules)
      -> a fresh LoRA adapter, fine-tuned on them
      -> closed-book answers to the passage's questions
      -> grades -> reward

Up to `capacity` inner loops run at once: their adapters are trained in the same batched
passes (see lora.py) and answer in the same batched generation. The base model is loaded once
and never written; its own answers are computed once per passage and cached.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch

from seal import grading, packed_attention
from seal.domains.knowledge import Passage, answer_prompt_text
from seal.executors import chunks_of_similar_cost
from seal.generation import SamplingParams, decode, generate
from seal.lora import ALL_LINEAR, LoRASpec, MultiLoRA
from seal.training import CE_CHUNK_BYTES, AdapterJob, TrainHP, text_example, train_adapters


@dataclass
class InnerLoopConfig:
    """How one self-edit is applied and scored (defaults: the paper's knowledge inner loop)."""

    r: int = 32
    alpha: float = 64.0
    target_modules: tuple[str, ...] = ALL_LINEAR
    lr: float = 1e-3
    epochs: int = 10
    batch_size: int = 1
    schedule: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_seq_len: int = 2048
    max_new_tokens: int = 64
    chat: bool = True  # answer in the model's chat template (better for small instruct models)
    include_passage: bool = True  # the passage itself is one more training sequence
    reward_metric: str = "strict"  # em | f1 | contains | strict | judge
    capacity: int = 0  # adapters trained at once; 0 = chosen from available memory
    answer_batch_size: int = 64
    checkpoint: bool = False  # activation checkpointing in training (see TrainHP)
    # On a CUDA device, replay training passes as CUDA graphs (cuda_graphs.py): same results,
    # 8x faster training on an H100 (docs/benchmarks.md). Ignored on other devices.
    cuda_graphs: bool = True

    def train_hp(self) -> TrainHP:
        return TrainHP(
            lr=self.lr,
            epochs=self.epochs,
            batch_size=self.batch_size,
            schedule=self.schedule,
            warmup_ratio=self.warmup_ratio,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            max_seq_len=self.max_seq_len,
            checkpoint=self.checkpoint,
        )

    def lora_spec(self) -> LoRASpec:
        return LoRASpec(r=self.r, alpha=self.alpha, target_modules=tuple(self.target_modules))


@dataclass
class KnowledgeJob:
    """One inner loop: adapt on `texts`, then answer every question of `passages`.

    One passage for the single-passage setting; N for continued pretraining. Empty `texts`
    means no adaptation (the base model answers)."""

    key: str
    passages: list[Passage]
    texts: list[str]
    seed: int = 0

    @property
    def cost(self) -> int:
        """Its training work, for batching (see executors.chunks_of_similar_cost)."""
        return len(self.texts)


@dataclass
class InnerLoopResult:
    key: str
    reward: float | None
    answers: list[str]
    grades: list[dict]
    metrics: dict[str, float | None]
    n_sequences: int
    train_tokens: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def _training_memory(model, spec: LoRASpec, max_tokens: int, device, checkpoint: bool):
    """(bytes to train in, bytes per adapter, bytes per token of a pass); see auto_capacity."""
    cfg = model.config
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    per_param = 16 * spec.r * layers * (4 * 2 * hidden + 3 * (hidden + inter))
    per_layer = (12 * hidden + 3 * inter) * 2 + packed_attention.bytes_per_token(cfg, max_tokens)
    kept = (layers * hidden * 4 + per_layer) if checkpoint else layers * per_layer
    share = float(os.environ.get("SEAL_MEMORY_SHARE") or 1.0)
    budget = 0.5 * share * available_memory_bytes(device) - 3 * CE_CHUNK_BYTES
    return budget, per_param, kept


def auto_capacity(
    model,
    spec: LoRASpec,
    max_tokens: int,
    device: torch.device,
    limit: int | None = None,
    checkpoint: bool = False,
) -> int:
    """Adapters to train at once: as many as fit in half the free memory, at most `limit`
    (default: 16 on a GPU; 8 on a CPU, where a pass is compute-bound and more rows per pass
    add memory but measured no further speed).

    Per adapter: fp32 weights, gradients and two AdamW moments (16 bytes a parameter). The
    activations kept for the backward pass, attention probabilities included, of `max_tokens`
    tokens (with activation checkpointing: each layer's input, plus one layer's activations
    at a time): on a GPU per adapter, a padded row each; on a CPU once, for one pass,
    since train_adapters cuts a step into passes that fit what the adapters leave
    (`pass_token_budget`). The bench's passes of 8 adapters hold ~200-700 tokens, which 512
    tokens counted per adapter had overstated up to 20x (Qwen2.5-Coder-0.5B: 5 adapters a
    worker of two on 23 GB, now 8; docs/benchmarks.md).
    Per pass: the vocabulary projection's logits, which exist one chunk at a time
    (training.linear_cross_entropy). A worker process of several on one machine
    (executors.ProcessExecutor) counts only its share of the free memory
    ($SEAL_MEMORY_SHARE)."""
    if limit is None:
        limit = 16 if device.type == "cuda" else 8
    budget, per_param, kept = _training_memory(model, spec, max_tokens, device, checkpoint)
    if device.type == "cpu":
        k = int((budget - max_tokens * kept) // per_param)
    else:
        k = int(budget // (per_param + max_tokens * kept))
    return max(1, min(limit, k))


def pass_token_budget(
    model,
    spec: LoRASpec,
    n_adapters: int,
    max_tokens: int,
    device: torch.device,
    checkpoint: bool = False,
) -> int | None:
    """On a CPU, the most tokens one training pass may hold (train_adapters'
    `max_pass_tokens`): the activations that fit in what `n_adapters` adapters leave of the
    memory auto_capacity counts, and `max_tokens` at least. None on a GPU, whose passes are
    padded rows replayed as static CUDA graphs and counted per adapter."""
    if device.type != "cpu":
        return None
    budget, per_param, kept = _training_memory(model, spec, max_tokens, device, checkpoint)
    return max(max_tokens, int((budget - n_adapters * per_param) // kept))


class InnerLoop:
    """Runs knowledge inner loops on one loaded model, `capacity` at a time."""

    def __init__(self, lm, cfg: InnerLoopConfig, judge=None):
        self.lm, self.cfg, self.judge = lm, cfg, judge
        if cfg.reward_metric not in grading.METRICS:
            raise ValueError(f"reward_metric must be one of {grading.METRICS}")
        if cfg.reward_metric == "judge" and judge is None:
            raise ValueError("reward_metric 'judge' needs a judge endpoint")
        tokens = min(cfg.max_seq_len, 512)  # a row's activations to count (sequences are short)
        self.capacity = cfg.capacity or auto_capacity(
            lm.model, cfg.lora_spec(), tokens, lm.device, checkpoint=cfg.checkpoint
        )
        # On a CPU, a step's batches beyond this many tokens train in several passes.
        self.pass_tokens = pass_token_budget(
            lm.model, cfg.lora_spec(), self.capacity, tokens, lm.device, cfg.checkpoint
        )
        self.lora: MultiLoRA | None = None
        self._base_answers: dict[tuple[str, int], str] = {}

    # -- the adapters live as long as this object (nothing reloaded inside a round)
    def _adapters(self) -> MultiLoRA:
        if self.lora is None:
            self.lora = MultiLoRA(self.lm.model, self.capacity, self.cfg.lora_spec())
        return self.lora

    def close(self) -> None:
        """Unwrap the adapters, leaving the model as loaded."""
        if self.lora is not None:
            self.lora.remove()
            self.lora = None

    def _prompts(self, passages: list[Passage]) -> list[tuple[Passage, int, list[int]]]:
        tok = self.lm.tokenizer
        out = []
        for p in passages:
            for qi, q in enumerate(p.questions):
                text = answer_prompt_text(p.title, q.question, tok, chat=self.cfg.chat)
                out.append((p, qi, tok(text, add_special_tokens=False)["input_ids"]))
        return out

    def _answer(self, prompts: list[list[int]], rows: list[int] | None) -> list[str]:
        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens)
        lora = self.lora if rows is not None else None
        seqs = generate(
            self.lm.model,
            self.lm.tokenizer,
            prompts,
            params,
            rows=rows,
            lora=lora,
            batch_size=self.cfg.answer_batch_size,
        )
        return decode(self.lm.tokenizer, seqs)

    def base_answers(self, passages: list[Passage]) -> dict[tuple[str, int], str]:
        """The unadapted model's answers, computed once per passage and cached."""
        todo = [t for t in self._prompts(passages) if (t[0].id, t[1]) not in self._base_answers]
        if todo:
            rows = [-1] * len(todo) if self.lora is not None else None
            answers = self._answer([t[2] for t in todo], rows)
            for (p, qi, _), a in zip(todo, answers, strict=True):
                self._base_answers[(p.id, qi)] = a
        return {
            (p.id, qi): self._base_answers[(p.id, qi)]
            for p in passages
            for qi in range(len(p.questions))
        }

    def grade(self, passages: list[Passage], answers: list[str]) -> list[grading.Grade]:
        items = [(p, q) for p in passages for q in p.questions]
        verdicts = [None] * len(items)
        if self.judge is not None:
            verdicts = self.judge.judge(
                [
                    grading.JudgeItem(q.question, q.answer, a)
                    for (p, q), a in zip(items, answers, strict=True)
                ]
            )
        return [
            grading.grade_answer(a, list(q.answers), p.context, judge_verdict=v)
            for (p, q), a, v in zip(items, answers, verdicts, strict=True)
        ]

    def run(self, jobs: list[KnowledgeJob], progress=None) -> list[InnerLoopResult]:
        """Run every job, `capacity` at a time, jobs with as many training sequences
        together (see executors.chunks_of_similar_cost); results in job order."""
        results: list[InnerLoopResult | None] = [None] * len(jobs)
        for idx in chunks_of_similar_cost([j.cost for j in jobs], self.capacity):
            for i, res in zip(idx, self._run_chunk([jobs[i] for i in idx]), strict=True):
                results[i] = res
            if progress is not None:
                progress(len(idx))
        return results

    def _run_chunk(self, jobs: list[KnowledgeJob]) -> list[InnerLoopResult]:
        t0 = time.time()
        tok, cfg = self.lm.tokenizer, self.cfg
        lora = self._adapters()
        hp = cfg.train_hp()

        # 1. Training sequences -> a fresh adapter per job, all trained together.
        train_jobs, slot_of = [], {}
        for slot, job in enumerate(jobs):
            if not job.texts:
                continue
            examples = [text_example(tok, t, cfg.max_seq_len) for t in job.texts]
            lora.reset(slot, job.seed)
            train_jobs.append(AdapterJob(slot, examples, job.seed, hp))
            slot_of[job.key] = slot
        stats = {}
        if train_jobs:
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            for tj, st in zip(
                train_jobs,
                train_adapters(
                    self.lm.model,
                    lora,
                    train_jobs,
                    pad,
                    cuda_graphs=cfg.cuda_graphs,
                    max_pass_tokens=self.pass_tokens,
                ),
                strict=True,
            ):
                stats[tj.slot] = st

        # 2. Closed-book answers: every adapted model in one batched generation; jobs without
        #    training reuse the cached base answers.
        prompts, rows, owner = [], [], []
        for job in jobs:
            if job.key in slot_of:
                for _, _, ids in self._prompts(job.passages):
                    prompts.append(ids)
                    rows.append(slot_of[job.key])
                    owner.append(job.key)
        answers_flat = self._answer(prompts, rows) if prompts else []
        by_job: dict[str, list[str]] = {}
        for key, a in zip(owner, answers_flat, strict=True):
            by_job.setdefault(key, []).append(a)

        # 3. Grades and reward.
        seconds = (time.time() - t0) / max(1, len(jobs))
        out = []
        for job in jobs:
            if job.key in slot_of:
                answers = by_job.get(job.key, [])
            else:
                base = self.base_answers(job.passages)
                answers = [base[(p.id, qi)] for p in job.passages for qi in range(len(p.questions))]
            grades = self.grade(job.passages, answers)
            metrics = summarize(grades)
            st = stats.get(slot_of.get(job.key, -1))
            out.append(
                InnerLoopResult(
                    key=job.key,
                    reward=metrics.get(cfg.reward_metric),
                    answers=answers,
                    grades=[asdict(g) for g in grades],
                    metrics=metrics,
                    n_sequences=len(job.texts),
                    train_tokens=st.tokens if st else 0,
                    losses=st.losses if st else [],
                    seconds=seconds,
                )
            )
        return out


def summarize(grades: list[grading.Grade]) -> dict[str, float | None]:
    """Mean of each metric over the graded answers (None where nothing was graded)."""
    lists = grading.collect_scores(grades)
    out: dict[str, float | None] = {
        k: (sum(v) / len(v) if v else None) for k, v in lists.scores.items()
    }
    out["n_ungraded"] = lists.n_ungraded
    return out
