"""Fine-tuning mechanics shared by the inner loop and the ReST-EM generator update.

`train_adapters` trains several LoRA adapters of a `MultiLoRA` in the same forward/backward
passes: at global step s every adapter that still has steps contributes its own batch s. On a
CPU a pass's sequences lie end to end in one row (no 2,048-token pads, no padding at all),
each attending only within itself (packed_attention.py) and each token going through its own
adapter, and logits are computed only where the loss is, so the vocabulary projection of
prompt positions is never paid for. On a GPU, where a pass costs host time per tensor op
rather than arithmetic, each sequence has a padded row of its own, so that every adapter's
tokens form one block (see `train_adapters`; CUDA graphs of whole passes: cuda_graphs.py).
"""

from __future__ import annotations

import contextlib
import math
import random
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from seal import packed_attention
from seal.lora import BatchedAdamW, MultiLoRA, to_device


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
    # Recompute each decoder layer's activations in the backward pass instead of keeping
    # them (activation checkpointing): about a third more compute for much less memory on
    # long sequences. A pass checkpoints if any of its adapters asks for it.
    checkpoint: bool = False


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
    input_tokens: int  # tokens run through the model (prompt tokens included, padding not)
    attention_pairs: int = 0  # causal (query, key) pairs within its sequences


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


def batch_plan(job: AdapterJob) -> list[list[Example]]:
    """The job's batches, epoch after epoch, each epoch shuffled by the job's seed."""
    rng = random.Random(job.seed)
    batches = []
    for _ in range(job.hp.epochs):
        order = list(range(len(job.examples)))
        rng.shuffle(order)
        for i in range(0, len(order), job.hp.batch_size):
            batches.append([job.examples[j] for j in order[i : i + job.hp.batch_size]])
    return batches


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of `h @ w.T` against `targets`, chunk by chunk of tokens,
    without keeping the [tokens, vocabulary] logits (1.2 GB in fp32 for 2,048 tokens of a
    151k vocabulary, and as much again for the log-softmax and its gradient): each chunk's
    gradient with respect to h (softmax minus one-hot, times w) is computed in the forward
    pass and only scaled by the incoming per-token gradient in the backward. `w` is frozen.

    The chunk's logits live in `workspace` (see `CEWorkspace`) where one is given."""

    @staticmethod
    def forward(ctx, h, w, targets, chunk, workspace):
        n = h.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        rows = torch.arange(min(n, chunk), device=h.device)
        if workspace is None:
            workspace = CEWorkspace()
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            r, tgt = rows[: e - s], targets[s:e]
            raw, spare = workspace.buffers(e - s, chunk, w, h.dtype)
            torch.mm(h[s:e], w.t(), out=raw)
            logits = raw if spare is None else spare.copy_(raw)  # the softmax in fp32
            # Softmax and log-sum-exp in three in-place passes over the chunk's logits.
            top = logits.amax(dim=-1, keepdim=True)
            target_logit = logits[r, tgt] - top[:, 0]
            probs = logits.sub_(top).exp_()
            total = probs.sum(dim=-1, keepdim=True)
            loss[s:e] = total[:, 0].log() - target_logit
            probs.div_(total)
            probs[r, tgt] -= 1.0
            if spare is not None:
                raw.copy_(probs)
            torch.mm(raw, w, out=grad_h[s:e])
        ctx.save_for_backward(grad_h)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_loss[:, None].to(grad_h.dtype), None, None, None, None


class CEWorkspace:
    """The logits buffers of `linear_cross_entropy` ([chunk, vocabulary] in the model's dtype,
    and in fp32 for a model that is not), kept from one training pass to the next. Made
    afresh each pass, these are the largest tensors a CPU pass allocates (100 MB for
    SmolLM2's 341-token chunks), large enough that jemalloc hands them back to the system as
    soon as they are freed, so every pass paid ~25,000 page faults to fault them in again
    (docs/benchmarks.md, session 15)."""

    def __init__(self) -> None:
        self._raw: torch.Tensor | None = None
        self._fp32: torch.Tensor | None = None  # None when the model's dtype is fp32

    def buffers(self, rows: int, chunk: int, w: torch.Tensor, dtype: torch.dtype):
        """`rows` rows (at most `chunk`) of each buffer for w's vocabulary: (model's dtype,
        fp32 or None). They grow as needed, by a quarter at least (up to `chunk` rows), and
        never shrink."""
        raw = self._raw
        if (
            raw is None
            or raw.shape[0] < rows
            or raw.shape[1] != w.shape[0]
            or raw.dtype != dtype
            or raw.device != w.device
        ):
            have = raw.shape[0] if raw is not None else 0
            n = min(chunk, max(rows, have + have // 4))
            self._raw = torch.empty(n, w.shape[0], dtype=dtype, device=w.device)
            self._fp32 = (
                None
                if dtype == torch.float32
                else torch.empty(n, w.shape[0], dtype=torch.float32, device=w.device)
            )
        return self._raw[:rows], (None if self._fp32 is None else self._fp32[:rows])


# The most fp32 logits `linear_cross_entropy` holds at once (besides their softmax's copy).
CE_CHUNK_BYTES = 64 << 20


def linear_cross_entropy(
    h,
    head: torch.nn.Linear,
    targets,
    chunk_bytes: int = CE_CHUNK_BYTES,
    workspace: CEWorkspace | None = None,
):
    """Per-token cross-entropy of the frozen vocabulary projection `head` applied to hidden
    states `h` ([tokens, hidden]); equal to `F.cross_entropy(head(h).float(), targets,
    reduction="none")` with its gradient, in chunks of at most `chunk_bytes` of logits
    (held in `workspace` if given, to be reused by the next call)."""
    w = head.weight
    if w.requires_grad or getattr(head, "bias", None) is not None:
        return F.cross_entropy(head(h).float(), targets, reduction="none")
    chunk = max(1, chunk_bytes // (4 * w.shape[0]))
    return _LinearCrossEntropy.apply(h, w, targets, chunk, workspace)


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


_PACKING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def supports_packing(model) -> bool:
    """Whether `model` takes its attention from transformers' AttentionInterface, so that
    sequences packed into one row can be kept apart (packed_attention.py): checked once per
    model by comparing two sequences packed in one row with each run alone."""
    if model not in _PACKING:
        decoder, _ = causal_lm_parts(model)
        device = next(model.parameters()).device
        a, b = torch.tensor([[5, 9, 7, 3]], device=device), torch.tensor([[4, 8, 6]], device=device)
        pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device)
        try:
            apart = packed_attention.Segments([0, 4], [4, 3], 7, device)
            with packed_attention.installed(model), packed_attention.segments(apart):
                packed = decoder(
                    input_ids=torch.cat([a, b], 1), position_ids=pos, use_cache=False
                ).last_hidden_state
            alone = [decoder(input_ids=x, use_cache=False).last_hidden_state for x in (a, b)]
            ref = torch.cat(alone, 1).float()
            err = (packed.float() - ref).norm(dim=-1) / ref.norm(dim=-1)
            # In bf16 / fp16 the rounding differs from the model's own attention kernel's, by
            # ~3% per token on SmolLM2 after 30 layers; a sequence that attends across the
            # boundary is off by 20-76% (docs/benchmarks.md).
            ok = bool(err.max() < (1e-3 if packed.dtype == torch.float32 else 0.1))
        except (TypeError, ValueError, RuntimeError, AttributeError):
            ok = False
        _PACKING[model] = ok
    return _PACKING[model]


def decoder_layers(decoder) -> torch.nn.ModuleList:
    """The stack of transformer blocks of a Hugging Face decoder (`.layers`, `.h` or
    `.blocks`)."""
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return layers
    raise ValueError(
        f"{type(decoder).__name__} has no list of decoder layers (.layers, .h or .blocks) "
        "to checkpoint; set checkpoint: false"
    )


@contextlib.contextmanager
def checkpointed(decoder, on: bool):
    """Within the block (forward and backward), each decoder layer keeps only its inputs
    and recomputes its activations when the backward pass reaches it (non-reentrant
    `torch.utils.checkpoint`; no dropout runs, so the recomputation is exact)."""
    if not on:
        yield
        return
    layers = decoder_layers(decoder)
    for layer in layers:
        real = layer.forward

        def forward(*args, _real=real, **kwargs):
            return torch.utils.checkpoint.checkpoint(_real, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def check_jobs(jobs: list[AdapterJob]) -> None:
    """ValueError unless every job has its own slot and some examples."""
    if len({j.slot for j in jobs}) != len(jobs):
        raise ValueError("two jobs share an adapter slot")
    for j in jobs:
        if not j.examples:
            raise ValueError(f"adapter job in slot {j.slot} has no training examples")


def pass_groups(
    active: list[int], batches: dict[int, list], max_tokens: int | None, packed: bool
) -> list[list[int]]:
    """The adapters taking a step, cut in order into passes of at most `max_tokens` tokens
    (a pass takes at least one adapter, however long its batch). Packed, a pass's tokens are
    its sequences' lengths summed; unpacked, its rows times the longest."""
    if max_tokens is None:
        return [list(active)]
    groups: list[list[int]] = []
    group: list[int] = []
    lengths: list[int] = []
    for i in active:
        own = [len(ids) for ids, _ in batches[i]]
        more = lengths + own
        size = sum(more) if packed else len(more) * max(more)
        if group and size > max_tokens:
            groups.append(group)
            group, more = [], own
        group.append(i)
        lengths = more
    groups.append(group)
    return groups


def train_adapters(
    model,
    lora: MultiLoRA,
    jobs: list[AdapterJob],
    pad_id: int = 0,
    progress=None,
    pack: bool | None = None,
    cuda_graphs: bool = False,
    max_pass_tokens: int | None = None,
) -> list[TrainStats]:
    """Train each job's adapter slot; adapters are independent, as if trained one by one.

    Slots must have been `reset` by the caller. Each pass trains every unfinished adapter on
    its next batch (packed into one row on a CPU); every adapter's own sequence of batches,
    learning rates and optimizer steps is exactly what it would be alone. Returns per-job loss
    curves and token counts.

    `max_pass_tokens` bounds a pass's activations: a step whose batches hold more tokens
    (padding included, unpacked) runs as several passes of whole batches, in slot order, and
    the optimizer steps once after the last (each adapter's gradient is its own batch's
    either way). Ignored on the CUDA-graph path, whose passes are static."""
    check_jobs(jobs)
    device = next(model.parameters()).device
    if cuda_graphs and device.type == "cuda":
        # Static passes replayed as CUDA graphs (cuda_graphs.py): same results, no host cost
        # per tensor op. Jobs that need what static passes cannot do (activation
        # checkpointing, mixed weight decays) train eagerly below.
        from seal.cuda_graphs import train_adapters_graphed, why_not_graphed

        if why_not_graphed(jobs) is None:
            return train_adapters_graphed(model, lora, jobs, pad_id, progress)
    decoder, head = causal_lm_parts(model)
    if pack is None:
        # Packing saves the FLOPs of padding, which is what a CPU pass costs. A GPU pass of
        # the inner loop's few hundred tokens is bound by the host's per-op overhead instead:
        # there one row per sequence, rows in slot order and the padding routed with its row,
        # lets every LoRA layer run as a reshape and two batched matmuls (see lora._Route).
        pack = device.type == "cpu" and supports_packing(model)
    checkpoint = any(j.hp.checkpoint for j in jobs)
    attention = packed_attention.installed(model) if pack else contextlib.nullcontext()
    plans = [batch_plan(j) for j in jobs]
    totals = [len(p) for p in plans]
    done = [0] * len(jobs)  # steps taken by each adapter
    opt = BatchedAdamW(
        lora.parameters(),
        lora.k,
        weight_decay=jobs[0].hp.weight_decay,
        max_grad_norm=jobs[0].hp.max_grad_norm,
    )
    stats = [TrainStats([], 0, 0, 0) for _ in jobs]
    workspace = CEWorkspace()  # the loss's logits buffers, reused pass after pass
    pass_losses: list[tuple[list[int], torch.Tensor]] = []
    n_jobs = len(jobs)

    def one_pass(group: list[int], batches: dict) -> torch.Tensor:
        """Forward and backward of the `group` adapters' batches in one pass (the gradients
        accumulate into their slots); returns each job's mean loss ([n_jobs], 0 outside the
        group), left on the device."""
        seqs, owners = [], []
        for i in group:
            seqs += batches[i]
            owners += [i] * len(batches[i])
        lengths = [len(ids) for ids, _ in seqs]
        layout = [list(range(len(seqs)))] if pack else [[k] for k in range(len(seqs))]
        width = max(sum(lengths[k] for k in members) for members in layout)
        ids = torch.full((len(layout), width), pad_id, dtype=torch.long)
        pos = torch.zeros((len(layout), width), dtype=torch.long)
        slots = torch.full((len(layout), width), -1, dtype=torch.long)
        src, tgt, tok_owner, starts = [], [], [], []
        for r, members in enumerate(layout):
            at = 0
            for k in members:
                s_ids, s_mask = seqs[k]
                n = len(s_ids)
                starts.append(r * width + at)
                ids[r, at : at + n] = torch.tensor(s_ids)
                pos[r, at : at + n] = torch.arange(n)
                slots[r, at : at + n] = jobs[owners[k]].slot
                # Position p predicts token p + 1 where that token is a loss target.
                for p in range(n - 1):
                    if s_mask[p + 1]:
                        src.append(r * width + at + p)
                        tgt.append(s_ids[p + 1])
                        tok_owner.append(owners[k])
                at += n
            # The row's padding continues the last sequence's positions: real tokens never
            # attend to it (causal), and it needs no mask of its own. Unpacked, it goes
            # through its row's adapter too (its output is never used), so that each
            # adapter's tokens form one block.
            pos[r, at:] = torch.arange(pos[r, at - 1] + 1, pos[r, at - 1] + 1 + width - at)
            if not pack:
                slots[r, at:] = jobs[owners[members[0]]].slot
        # Copied without a host sync (see lora.to_device): on a GPU the host goes on queueing
        # this pass while the last one runs.
        ids = to_device(ids, device)
        # Unpacked, every row counts 0, 1, 2, ...: the model's own default positions, which
        # also spare it looking for packed sequences (a host sync on a GPU).
        pos = to_device(pos, device) if pack else None
        src_t = to_device(torch.tensor(src, dtype=torch.long), device)
        targets = to_device(torch.tensor(tgt, dtype=torch.long), device)
        owner = to_device(torch.tensor(tok_owner, dtype=torch.long), device)
        # The route and the sequences stay set through the backward pass: checkpointed layers
        # rerun their forward there.
        apart = (
            packed_attention.segments(
                packed_attention.Segments(starts, lengths, ids.numel(), device)
            )
            if pack
            else contextlib.nullcontext()
        )
        with lora.route(slots.flatten().tolist()), apart:
            hidden = decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
            h = hidden.reshape(-1, hidden.shape[-1])[src_t]
            # Logits only where the loss is: prompt and padding positions never pay for the
            # vocabulary projection.
            tok_loss = linear_cross_entropy(h, head, targets, workspace=workspace)
            loss_sum = torch.zeros(n_jobs, device=device).index_add(0, owner, tok_loss)
            n_tok = torch.zeros(n_jobs, device=device).index_add(
                0, owner, torch.ones_like(tok_loss)
            )
            per_job = loss_sum / n_tok.clamp(min=1)
            # Sum (not mean) over adapters: each adapter's gradient is then exactly the one
            # it would get alone.
            per_job.sum().backward()
        for i in tok_owner:
            stats[i].tokens += 1
        for k, i in enumerate(owners):
            stats[i].input_tokens += lengths[k]
            stats[i].attention_pairs += lengths[k] * (lengths[k] + 1) // 2
        return per_job.detach()

    # The model stays in eval mode: LoRA dropout is 0 and the base's dropout must stay off.
    try:
        # Layers are checkpointed (if asked) and packed attention installed for the whole
        # run, not set up per pass.
        with checkpointed(decoder, checkpoint), attention:
            while True:
                # Every adapter with steps left takes its next step in this pass (in several
                # passes beyond max_pass_tokens); packed, all sequences lie end to end in one
                # row, each attending only within itself.
                active = [i for i in range(n_jobs) if done[i] < totals[i]]
                if not active:
                    break
                batches = {}
                for i in active:
                    n = jobs[i].hp.max_seq_len
                    batches[i] = [(ex.input_ids[:n], ex.loss_mask[:n]) for ex in plans[i][done[i]]]
                groups = pass_groups(active, batches, max_pass_tokens, pack)
                per_pass = [one_pass(group, batches) for group in groups]
                step_losses = per_pass[0] if len(per_pass) == 1 else torch.stack(per_pass).sum(0)
                active_slots = torch.zeros(lora.k, dtype=torch.bool)
                lrs = torch.zeros(lora.k)
                for i in active:
                    hp = jobs[i].hp
                    warm = int(hp.warmup_ratio * totals[i])
                    active_slots[jobs[i].slot] = True
                    lrs[jobs[i].slot] = hp.lr * lr_factor(hp.schedule, done[i], totals[i], warm)
                opt.step(active_slots, lrs)
                opt.zero_grad()
                # Losses stay on the device until training ends (no host sync per pass).
                pass_losses.append((active, step_losses))
                for i in active:
                    stats[i].steps += 1
                    done[i] += 1
                if progress is not None:
                    progress(sum(done), sum(totals))
    finally:
        opt.zero_grad()
    if pass_losses:
        all_losses = torch.stack([loss for _, loss in pass_losses]).cpu().tolist()
        for (active, _), row in zip(pass_losses, all_losses, strict=True):
            for i in active:
                stats[i].losses.append(row[i])
    return stats
