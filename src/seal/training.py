"""Fine-tuning mechanics shared by the inner loop and the ReST-EM generator update.

`train_adapters` trains several LoRA adapters of a `MultiLoRA` in the same forward/backward
passes: at global step s every adapter that still has steps contributes its own batch s; rows
are right-padded to the longest row of that step only (dynamic padding — no 2,048-token pads),
and logits are computed only where the loss is, so the vocabulary projection of prompt and
padding positions is never paid for.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from seal.lora import BatchedAdamW, MultiLoRA


@dataclass
class Example:
    """One training sequence: token ids and, per token, whether it is a loss target."""

    input_ids: list[int]
    loss_mask: list[bool]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError("input_ids and loss_mask differ in length")


@dataclass
class TrainHP:
    """Optimisation hyperparameters of one adapter fine-tune (defaults: the paper's inner loop)."""

    lr: float = 1e-3
    epochs: int = 10
    batch_size: int = 1
    schedule: str = "linear"  # linear | cosine | constant
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_seq_len: int = 2048


@dataclass
class AdapterJob:
    """Train adapter `slot` on `examples` (shuffled per epoch by `seed`)."""

    slot: int
    examples: list[Example]
    seed: int
    hp: TrainHP = field(default_factory=TrainHP)


@dataclass
class TrainStats:
    losses: list[float]
    steps: int
    tokens: int  # loss tokens seen
    padded_tokens: int  # tokens computed, padding included


def text_example(tokenizer, text: str, max_len: int, add_eos: bool = True) -> Example:
    """A plain-text sequence with the loss on every token (continued-pretraining style)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    ids = ids[:max_len]
    return Example(ids, [True] * len(ids))


def prompt_completion_example(
    tokenizer, prompt: str, completion: str, max_len: int, add_eos: bool = True
) -> Example:
    """Loss on the completion tokens only (the ReST-EM step and TTT on output tokens)."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    ids = (p + c)[:max_len]
    mask = ([False] * len(p) + [True] * len(c))[:max_len]
    return Example(ids, mask)


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """HF-style schedules: the factor for the update made at 0-based `step` of `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup if schedule != "constant" else 1.0
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def _plan(job: AdapterJob) -> list[list[Example]]:
    rng = random.Random(job.seed)
    batches = []
    for _ in range(job.hp.epochs):
        order = list(range(len(job.examples)))
        rng.shuffle(order)
        for i in range(0, len(order), job.hp.batch_size):
            batches.append([job.examples[j] for j in order[i : i + job.hp.batch_size]])
    return batches


def causal_lm_parts(model):
    """(decoder, lm_head) of a Hugging Face causal LM."""
    return model.base_model, model.get_output_embeddings()


def pad_right(seqs: list[tuple[list[int], list[bool]]], pad_id: int, device):
    """(token ids, loss mask) rows right-padded to the longest one, as tensors on `device`."""
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, (s, m) in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(m)] = torch.tensor(m)
    return ids.to(device), mask.to(device)


def _batch_len(batch: list[Example], max_len: int) -> int:
    return max(min(len(e.input_ids), max_len) for e in batch)


def pick_adapters(next_lens: dict[int, tuple[int, int]], overhead_tokens: int) -> list[int]:
    """Which adapters take their next step in this pass.

    `next_lens[i] = (padded length, rows)` of adapter i's next batch. Adapters are independent,
    so any subset may advance — each still sees its own batches in its own order. A pass
    costs about `overhead_tokens + rows * longest` token-equivalents; this picks the subset
    {i : length_i <= L} with the most real tokens per unit of cost. Adapters waiting at a long
    sequence gather until they can run together, so short and long rows rarely share a pass
    and little compute goes to padding."""
    order = sorted(next_lens, key=lambda i: next_lens[i][0])
    best, best_score, useful, rows = order[:1], -1.0, 0, 0
    for n, i in enumerate(order, 1):
        length, r = next_lens[i]
        useful += length * r
        rows += r
        score = useful / (overhead_tokens + rows * length)
        if score >= best_score:
            best, best_score = order[:n], score
    return best


def train_adapters(
    model,
    lora: MultiLoRA,
    jobs: list[AdapterJob],
    pad_id: int = 0,
    progress=None,
    overhead_tokens: int = 64,
) -> list[TrainStats]:
    """Train each job's adapter slot; adapters are independent, as if trained one by one.

    Slots must have been `reset` by the caller. Each pass trains a subset of the adapters on
    their next batch (see `pick_adapters`); every adapter's own sequence of batches, learning
    rates and optimizer steps is exactly what it would be alone. Returns per-job loss curves
    and token counts."""
    if len({j.slot for j in jobs}) != len(jobs):
        raise ValueError("two jobs share an adapter slot")
    for j in jobs:
        if not j.examples:
            raise ValueError(f"adapter job in slot {j.slot} has no training examples")
    decoder, head = causal_lm_parts(model)
    device = next(model.parameters()).device
    plans = [_plan(j) for j in jobs]
    totals = [len(p) for p in plans]
    done = [0] * len(jobs)  # steps taken by each adapter
    opt = BatchedAdamW(
        lora.parameters(),
        lora.k,
        weight_decay=jobs[0].hp.weight_decay,
        max_grad_norm=jobs[0].hp.max_grad_norm,
    )
    stats = [TrainStats([], 0, 0, 0) for _ in jobs]
    n_jobs = len(jobs)
    # The model stays in eval mode: LoRA dropout is 0 and the base's dropout must stay off.
    try:
        while True:
            waiting = {
                i: (_batch_len(plans[i][done[i]], jobs[i].hp.max_seq_len), len(plans[i][done[i]]))
                for i in range(n_jobs)
                if done[i] < totals[i]
            }
            if not waiting:
                break
            active = sorted(pick_adapters(waiting, overhead_tokens))
            rows, seqs, owners = [], [], []
            for i in active:
                for ex in plans[i][done[i]]:
                    n = min(len(ex.input_ids), jobs[i].hp.max_seq_len)
                    rows.append(jobs[i].slot)
                    seqs.append((ex.input_ids[:n], ex.loss_mask[:n]))
                    owners.append(i)
            ids, mask = pad_right(seqs, pad_id, device)
            width = ids.shape[1]
            # Right padding under a causal mask: real tokens never attend to the pads after
            # them, so no attention mask is needed (and the fast causal kernel is used).
            with lora.route(rows):
                hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
            target_mask = mask[:, 1:]
            h = hidden[:, :-1][target_mask]
            targets = ids[:, 1:][target_mask]
            # Logits only where the loss is: prompt and padding positions never pay for the
            # vocabulary projection.
            tok_loss = F.cross_entropy(head(h).float(), targets, reduction="none")
            row_of_tok = torch.arange(len(seqs), device=device)[:, None].expand_as(target_mask)
            owner = torch.tensor(owners, device=device)[row_of_tok[target_mask]]
            loss_sum = torch.zeros(n_jobs, device=device).index_add(0, owner, tok_loss)
            n_tok = torch.zeros(n_jobs, device=device).index_add(
                0, owner, torch.ones_like(tok_loss)
            )
            per_job = loss_sum / n_tok.clamp(min=1)
            # Sum (not mean) over adapters: each adapter's gradient is then exactly the one it
            # would get alone.
            per_job.sum().backward()
            active_slots = torch.zeros(lora.k, dtype=torch.bool)
            lrs = torch.zeros(lora.k)
            for i in active:
                hp = jobs[i].hp
                warm = int(hp.warmup_ratio * totals[i])
                active_slots[jobs[i].slot] = True
                lrs[jobs[i].slot] = hp.lr * lr_factor(hp.schedule, done[i], totals[i], warm)
            opt.step(active_slots, lrs)
            opt.zero_grad()
            per_job = per_job.detach().cpu()
            for i in active:
                stats[i].losses.append(float(per_job[i]))
                stats[i].steps += 1
                stats[i].tokens += int(n_tok[i])
                done[i] += 1
            for i in owners:
                stats[i].padded_tokens += width
            if progress is not None:
                progress(sum(done), sum(totals))
    finally:
        opt.zero_grad()
    return stats
