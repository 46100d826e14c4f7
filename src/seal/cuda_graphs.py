"""Training passes replayed as CUDA graphs (`inner_loop.cuda_graphs`, on by default on CUDA).

On a GPU, a pass of the inner loop is bound by the host, not the arithmetic: ~10k tensor ops,
each some microseconds of Python and dispatch, against well under a millisecond of GPU work for
a small model (docs/benchmarks.md, "On a GPU"). A CUDA graph records a pass's kernels once and
replays them with one call. That needs every pass of a graph to have the same shapes and to
never wait on the GPU, so `train_adapters_graphed` runs *static* passes:

- every pass has B rows per adapter slot (B = the largest batch size), slot after slot, as
  wide as its longest sequence rounded up to `bucket` tokens: one graph per width;
- the loss is over every position, weighted on the host's side: 1 / (the adapter's target
  count) at target positions, 0 at padding and non-targets; so each adapter's gradient is
  the one it gets alone, as in `training.train_adapters`;
- every slot is updated at every replay, at learning rates written into a device tensor
  before it: a slot with no job, or whose job has taken all its steps, has its weights saved
  then and put back when training ends (its later updates, from zero gradients and decaying
  moments, are discarded);
- capture needs warm-up passes first; they run on the real buffers, so the adapters and the
  optimizer state are saved before and restored after.

Graphs are kept with their optimizer across calls (keyed by the adapters, rows, width and
optimizer settings), so a round of inner loops captures each width once. `capture=False` runs
the same static passes eagerly: the tests check on a CPU that they train exactly as
`training.train_adapters` does. The arithmetic of padding and finished adapters is paid, which
a GPU that waits on its host can afford; on a CPU it cannot, so the inner loop uses graphs on
CUDA devices only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from seal.lora import BatchedAdamW, MultiLoRA
from seal.training import (
    AdapterJob,
    TrainStats,
    batch_plan,
    causal_lm_parts,
    check_jobs,
    linear_cross_entropy,
    lr_factor,
)


@dataclass
class _Pass:
    """The static tensors of one width, and its graph once captured."""

    ids: torch.Tensor  # [rows, width] token ids
    targets: torch.Tensor  # [rows * width] next token (0 where there is none)
    weights: torch.Tensor  # [rows * width] loss weight
    per_slot: torch.Tensor | None = None  # [K] each slot's mean loss (written by the pass)
    graph: object = None


@dataclass
class _Graphs:
    """What a graphed trainer keeps between calls for one MultiLoRA."""

    key: tuple
    opt: BatchedAdamW
    lrs: torch.Tensor  # [K] learning rates of the next replay
    passes: dict[int, _Pass] = field(default_factory=dict)
    pool: object = None
    eager: bool = False  # capture failed once: every pass runs eagerly


_CACHE_ATTR = "_seal_cuda_graphs"


def _fill(static: torch.Tensor, host: torch.Tensor) -> None:
    """Write a host tensor into a pass's static tensor: one copy, queued without a host
    sync on a GPU (from pinned memory)."""
    static.copy_(host.pin_memory() if static.is_cuda else host, non_blocking=True)


def _run_pass(decoder, head, lora: MultiLoRA, opt: BatchedAdamW, p: _Pass, lrs, rows: int):
    """One static pass: forward, weighted loss, backward, every slot's AdamW step."""
    k = lora.k
    width = p.ids.shape[1]
    route = [s for s in range(k) for _ in range(rows // k * width)]
    with lora.route(route):
        hidden = decoder(input_ids=p.ids, use_cache=False).last_hidden_state
        tok_loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head, p.targets)
        per_slot = (tok_loss * p.weights).view(k, -1).sum(1)
        per_slot.sum().backward()
    opt.step_all(lrs)
    opt.zero_grad()
    return per_slot.detach()


def _state(lora: MultiLoRA, opt: BatchedAdamW) -> list[torch.Tensor]:
    tensors = [*lora.parameters(), *opt.m, *opt.v, opt.step_t]
    return [t.detach().clone() for t in tensors]


@torch.no_grad()
def _restore(lora: MultiLoRA, opt: BatchedAdamW, saved: list[torch.Tensor]) -> None:
    tensors = [*lora.parameters(), *opt.m, *opt.v, opt.step_t]
    for t, s in zip(tensors, saved, strict=True):
        t.copy_(s)


def _prepare(model, lora: MultiLoRA, g: _Graphs, width: int, rows: int, capture: bool) -> _Pass:
    """The static pass of `width`, captured as a graph when `capture` (warm-up first)."""
    if width in g.passes:
        return g.passes[width]
    device = next(model.parameters()).device
    p = _Pass(
        ids=torch.zeros((rows, width), dtype=torch.long, device=device),
        targets=torch.zeros(rows * width, dtype=torch.long, device=device),
        weights=torch.zeros(rows * width, dtype=torch.float32, device=device),
    )
    if capture and not g.eager:
        saved = _state(lora, g.opt)
        try:
            _capture(model, lora, g, p, rows, device)
        except Exception as e:  # a model whose pass cannot be captured: run it eagerly
            p.graph, p.per_slot = None, None
            g.eager = True
            g.opt.zero_grad()
            warnings.warn(
                f"CUDA graph capture of a training pass failed ({type(e).__name__}: {e}); "
                "this model's passes run eagerly (same results, slower). Set "
                "inner_loop.cuda_graphs: false to skip the attempt.",
                stacklevel=3,
            )
        finally:
            _restore(lora, g.opt, saved)
    g.passes[width] = p
    return p


def _capture(model, lora: MultiLoRA, g: _Graphs, p: _Pass, rows: int, device) -> None:
    decoder, head = causal_lm_parts(model)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: cuBLAS workspaces, autograd's lazy state
            _run_pass(decoder, head, lora, g.opt, p, g.lrs, rows)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    g.opt.zero_grad()
    with torch.cuda.graph(graph, pool=g.pool):
        p.per_slot = _run_pass(decoder, head, lora, g.opt, p, g.lrs, rows)
    g.pool = graph.pool()
    p.graph = graph


def _graphs_for(lora: MultiLoRA, jobs: list[AdapterJob], rows: int, device) -> _Graphs:
    hp = jobs[0].hp
    key = (rows, hp.weight_decay, hp.max_grad_norm)
    g = getattr(lora, _CACHE_ATTR, None)
    if g is None or g.key != key:
        opt = BatchedAdamW(
            lora.parameters(), lora.k, weight_decay=hp.weight_decay, max_grad_norm=hp.max_grad_norm
        )
        g = _Graphs(key, opt, torch.zeros(lora.k, dtype=torch.float32, device=device))
        setattr(lora, _CACHE_ATTR, g)
    for s in range(lora.k):  # a fresh optimizer state for every slot, in place
        g.opt.reset(s)
    return g


def why_not_graphed(jobs: list[AdapterJob]) -> str | None:
    """Why these jobs cannot train in static passes, or None if they can."""
    if len({(j.hp.weight_decay, j.hp.max_grad_norm) for j in jobs}) > 1:
        return "graphed training needs one weight decay and one max_grad_norm"
    if any(j.hp.checkpoint for j in jobs):
        return "graphed training does not checkpoint activations; set checkpoint off"
    return None


def train_adapters_graphed(
    model,
    lora: MultiLoRA,
    jobs: list[AdapterJob],
    pad_id: int = 0,
    progress=None,
    bucket: int = 64,
    capture: bool | None = None,
) -> list[TrainStats]:
    """`training.train_adapters` with static passes, replayed as CUDA graphs when `capture`
    (default: on CUDA devices). Same contract: slots `reset` by the caller, adapters
    independent, per-job loss curves and token counts returned."""
    check_jobs(jobs)
    if reason := why_not_graphed(jobs):
        raise ValueError(reason)
    device = next(model.parameters()).device
    capture = device.type == "cuda" if capture is None else capture
    decoder, head = causal_lm_parts(model)
    b = max(j.hp.batch_size for j in jobs)
    rows = lora.k * b
    g = _graphs_for(lora, jobs, rows, device)
    plans = [batch_plan(j) for j in jobs]
    totals = [len(pl) for pl in plans]
    done = [0] * len(jobs)
    stats = [TrainStats([], 0, 0, 0) for _ in jobs]
    used = {j.slot for j in jobs}
    # Slots without a job are put back as they are now; a job's slot as at its last step.
    keep = {s: lora.state(s) for s in range(lora.k) if s not in used}
    pass_losses: list[tuple[list[int], torch.Tensor]] = []
    try:
        while True:
            active = [i for i in range(len(jobs)) if done[i] < totals[i]]
            if not active:
                break
            batches = {i: plans[i][done[i]] for i in active}
            longest = max(
                min(len(ex.input_ids), jobs[i].hp.max_seq_len) for i in active for ex in batches[i]
            )
            width = -(-longest // bucket) * bucket
            ids = torch.full((rows, width), pad_id, dtype=torch.long)
            targets = torch.zeros((rows, width), dtype=torch.long)
            weights = torch.zeros((rows, width), dtype=torch.float32)
            lrs = torch.zeros(lora.k, dtype=torch.float32)
            for i in active:
                job = jobs[i]
                n_targets = 0
                for r, ex in enumerate(batches[i]):
                    n = min(len(ex.input_ids), job.hp.max_seq_len)
                    row = job.slot * b + r
                    ids[row, :n] = torch.tensor(ex.input_ids[:n])
                    targets[row, : n - 1] = ids[row, 1:n]
                    is_target = ex.loss_mask[1:n]
                    weights[row, : n - 1] = torch.tensor(is_target, dtype=torch.float32)
                    n_targets += sum(is_target)
                    stats[i].input_tokens += n
                    stats[i].attention_pairs += n * (n + 1) // 2
                stats[i].tokens += n_targets
                rows_of = slice(job.slot * b, (job.slot + 1) * b)
                weights[rows_of] /= max(1, n_targets)
                warm = int(job.hp.warmup_ratio * totals[i])
                lrs[job.slot] = job.hp.lr * lr_factor(job.hp.schedule, done[i], totals[i], warm)
            p = _prepare(model, lora, g, width, rows, capture)
            _fill(p.ids, ids)
            _fill(p.targets, targets.flatten())
            _fill(p.weights, weights.flatten())
            _fill(g.lrs, lrs)
            if p.graph is not None:
                p.graph.replay()
                per_slot = p.per_slot.clone()
            else:
                per_slot = _run_pass(decoder, head, lora, g.opt, p, g.lrs, rows)
            pass_losses.append((active, per_slot))
            for i in active:
                stats[i].steps += 1
                done[i] += 1
                if done[i] == totals[i]:
                    keep[jobs[i].slot] = lora.state(jobs[i].slot)
            if progress is not None:
                progress(sum(done), sum(totals))
    finally:
        g.opt.zero_grad()
        for s, st in keep.items():
            lora.load_state(s, st)
    if pass_losses:
        all_losses = torch.stack([loss for _, loss in pass_losses]).cpu().tolist()
        for (active, _), row in zip(pass_losses, all_losses, strict=True):
            for i in active:
                stats[i].losses.append(row[jobs[i].slot])
    return stats
