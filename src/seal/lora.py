"""LoRA for K adapters at once over one frozen base model.

Every SEAL reward is one small LoRA fine-tune. Training the K adapters of K self-edits one after
another repeats the frozen base computation K times over; here the K adapters live stacked in
each wrapped linear layer (A: [K, in, r], B: [K, r, out]) and every batch row is routed through
its own adapter with a batched matmul, so one forward/backward pass trains all K. Each adapter
has its own AdamW state, learning-rate schedule, gradient clipping and step count, so training
K adapters together gives the same result as training each alone (tests/test_lora.py).

PEFT cannot do this (its mixed-adapter batches are inference-only, and its optimiser state is
not per adapter), which is why this is written by hand; adapters export to PEFT's format.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from seal import cpu_kernels
from seal.models import cpu_has_amx

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Route:
    """How the batch rows of one pass map onto adapters, worked out once per pass (not per
    layer): the rows are grouped by adapter, and each group goes through its adapter with one
    batched matmul over the distinct adapters used — the adapter weights are never copied per
    row. `rows[i]` is row i's adapter slot, -1 for the bare base model.

    Three ways: rows already group after group in equal groups (a reshape and one `bmm`, the
    common case when each adapter owns its rows); otherwise on CPU, each run of consecutive
    rows with one adapter multiplies by that adapter's weights in place (`runs`, see
    `_RunLoRA`); elsewhere (GPU), groups padded to the largest size `m` for one `bmm`:
    `gather[g * m + j]` is the row at place j of group g (padding points at any row; its
    output is never read) and `scatter[i]` is where row i's result lands (one past the end
    for base rows, whose LoRA delta is zero)."""

    def __init__(self, rows: list[int], n_adapters: int, device):
        self.n = len(rows)
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(rows):
            if not -1 <= s < n_adapters:
                raise ValueError(f"row {i} routed to adapter {s}; slots are 0..{n_adapters - 1}")
            if s >= 0:
                groups.setdefault(s, []).append(i)
        self.n_groups = len(groups)
        self.m = max((len(g) for g in groups.values()), default=0)
        flat = [i for g in groups.values() for i in g]
        self.has_base = len(flat) < self.n
        # Rows already sit group after group, all groups equal, no base rows: a reshape.
        self.contiguous = flat == list(range(self.n)) and all(
            len(g) == self.m for g in groups.values()
        )
        self.gather = self.scatter = None
        self.runs: list[tuple[int, int, int]] | None = None
        if not self.contiguous and self.n_groups and _is_cpu(device):
            # CPU: the runs of consecutive rows with one adapter, as the rows stand (nothing
            # moved, no weights copied); base rows' runs are skipped.
            runs, start = [], 0
            for i in range(1, self.n + 1):
                if i == self.n or rows[i] != rows[start]:
                    if rows[start] >= 0:
                        runs.append((start, i, rows[start]))
                    start = i
            self.runs = runs
        elif not self.contiguous and self.n_groups:
            gather, scatter = [], [self.n_groups * self.m] * self.n
            for g, members in enumerate(groups.values()):
                for j in range(self.m):
                    i = members[j] if j < len(members) else members[0]
                    gather.append(i)
                    if j < len(members):
                        scatter[i] = g * self.m + j
            self.gather = to_device(torch.tensor(gather, dtype=torch.long), device)
            self.scatter = to_device(torch.tensor(scatter, dtype=torch.long), device)
        self.rows, self.n_adapters, self.device = rows, n_adapters, device
        self._masks: dict = {}
        # The adapter weights used, one per group (None: all K in slot order).
        self.slot_index = (
            None
            if list(groups) == list(range(n_adapters)) or self.runs is not None
            else to_device(torch.tensor(list(groups), dtype=torch.long), device)
        )

    def token_mask(self, n_tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """[tokens, K, 1]: 1 at each token's own adapter, 0 elsewhere (base rows: all 0);
        made once per route, then shared by every layer."""
        key = (n_tokens, dtype)
        if key not in self._masks:
            t = n_tokens // self.n
            mask = torch.zeros(self.n, self.n_adapters, dtype=dtype)
            for i, s in enumerate(self.rows):
                if s >= 0:
                    mask[i, s] = 1
            mask = mask.repeat_interleave(t, dim=0) if t > 1 else mask
            self._masks[key] = to_device(mask.unsqueeze(-1), self.device)
        return self._masks[key]


def init_lora_a(d_in: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """A fresh LoRA A matrix, [d_in, r], U(±1/sqrt(d_in)) (PEFT's Kaiming-uniform default)
    drawn from `gen`. Adapters are initialised module by module in the model's module order,
    so PEFT adapters initialised with the same draws start equal (see bench.py)."""
    bound = 1.0 / math.sqrt(d_in)
    return torch.rand(d_in, r, generator=gen) * (2 * bound) - bound


# The read-only route takes every slot's low-rank term at once (`MultiLoRALinear.forward`)
# while tokens x slots stays under this: decode steps, not prefills or training passes.
DENSE_MAX = 2048
# CPU training passes and prefills in these dtypes take every slot at once (_DenseLoRA) while
# K r stays under DENSE_TRAIN_MAX_RANK, instead of a run of tokens at a time (_RunLoRA). With
# AMX, a small bf16 matmul of a run costs ~30 us whatever its size while large ones run at
# 1-2 TFLOP/s a core, so K times the low-rank arithmetic in large matmuls is the cheaper; with
# AVX512-BF16 alone (~0.2 TFLOP/s a core) the K-fold arithmetic costs more than the runs do:
# a SmolLM2 epoch of 8 adapters 25.4 s dense against 19.4 s in runs (docs/benchmarks.md).
DENSE_DTYPES = (torch.bfloat16, torch.float16) if cpu_has_amx() else ()
DENSE_TRAIN_MAX_RANK = 512


def _is_cpu(device) -> bool:
    return torch.device(device).type == "cpu"


def cpu_training_route(dtype: torch.dtype) -> str:
    """How a CPU training pass in `dtype` computes its adapters' low-rank terms (for `seal
    doctor` and `seal bench`'s JSON)."""
    if dtype in DENSE_DTYPES:
        return "dense: every adapter in one matmul a layer (AMX)"
    if dtype == torch.bfloat16 and cpu_kernels.run_lora_library() is not None:
        return "runs, seal's native AVX512-BF16 kernels"
    return "runs, torch matmuls"


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without a host sync: a plain `.to("cuda")` of pageable memory
    waits for the GPU to finish its queued work, so each one per training pass stalls the
    host that should be queueing the pass's kernels. Through pinned memory the copy is queued
    like a kernel (the pinned block is not reused before the copy has run)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class _Router:
    """The route of the current pass, shared by every wrapped layer (None: no adapters)."""

    def __init__(self) -> None:
        self.route: _Route | None = None


class MultiLoRALinear(nn.Module):
    """A frozen nn.Linear plus K low-rank adapters; row i of the batch uses adapter rows[i]."""

    def __init__(self, base: nn.Linear, n_adapters: int, r: int, alpha: float, router: _Router):
        super().__init__()
        self.base = base
        self.r, self.scaling = r, alpha / r
        self.__dict__["router"] = router  # shared, not a submodule
        self.lora_A = nn.Parameter(torch.zeros(n_adapters, base.in_features, r))
        self.lora_B = nn.Parameter(torch.zeros(n_adapters, r, base.out_features))
        # (A, B, A of every slot side by side [in, K r]) cast once, see MultiLoRA.frozen
        self.frozen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.frozen is not None and self.frozen[0].dtype == dtype:
            return self.frozen[0], self.frozen[1]
        return self.lora_A.to(dtype), self.lora_B.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.router.route
        frozen = self.frozen is not None and self.frozen[0].dtype == x.dtype
        k = self.lora_A.shape[0]
        if (
            route is not None
            and route.n_groups
            and (
                # A few tokens (a decode step) through read-only adapters: three tensor ops
                # instead of two per run; the extra arithmetic (K times the low-rank term's) is
                # small next to the base layer.
                (frozen and not route.contiguous and x.numel() // x.shape[-1] * k <= DENSE_MAX)
                # CPU with AMX in bf16/fp16 (training passes, prefills), where each small matmul
                # of a run costs ~30 us: larger matmuls for all slots (see DENSE_DTYPES).
                or (
                    route.runs is not None
                    and x.dtype in DENSE_DTYPES
                    and k * self.r <= DENSE_TRAIN_MAX_RANK
                )
            )
        ):
            # Every slot at once: y += scaling * mask(x [A_1 .. A_K]) [B_1; ..; B_K], the mask
            # keeping each token's own adapter's r columns (see _DenseLoRA).
            x2 = x.reshape(-1, x.shape[-1])
            mask = route.token_mask(x2.shape[0], x.dtype)
            if torch.is_grad_enabled():
                # Training: the fp32 masters go in, cast and laid out side by side in one copy.
                y2 = _DenseLoRA.apply(
                    x2, self.base(x2), self.lora_A, self.lora_B, mask, self.scaling
                )
            else:  # generation: the same arithmetic without an autograd node per layer
                if frozen:
                    _, b, a_cat = self.frozen  # the copies cast for generation
                else:
                    a, b = self._weights(x.dtype)
                    a_cat = a.permute(1, 0, 2).reshape(a.shape[1], k * self.r)
                args = (x2, self.base(x2), a_cat, b.view(k * self.r, -1))
                y2 = _dense_lora_(*args, mask, self.scaling)[0]
            return y2.view(*x.shape[:-1], y2.shape[-1])
        if route is not None and route.runs is not None:
            # CPU runs: the base output (a fresh [tokens, out] matrix, not a view) takes each
            # run's low-rank term in place.
            x2 = x.reshape(-1, x.shape[-1])
            if cpu_kernels.usable(x2, self.lora_A, self.lora_B):
                # AVX512-BF16: every run in one native call a direction, the masters cast
                # inside it (see cpu_kernels).
                y2 = cpu_kernels.NativeRunLoRA.apply(
                    x2, self.base(x2), self.lora_A, self.lora_B, self.scaling, route.runs, route.n
                )
            else:
                a, b = self._weights(x.dtype)
                y2 = _RunLoRA.apply(x2, self.base(x2), a, b, self.scaling, route.runs, route.n)
            return y2.view(*x.shape[:-1], y2.shape[-1])
        if route is None or route.n_groups == 0:
            return self.base(x)
        if frozen and route.n_groups == 1 and not route.has_base:
            # Every row through one adapter (a row decoding alone at the end of a batch):
            # that adapter's cast copies, two plain matmuls, no gather and no autograd node.
            a, b = self.frozen[0][route.rows[0]], self.frozen[1][route.rows[0]]
            x2 = x.reshape(-1, x.shape[-1])
            y2 = self.base(x2).addmm_(torch.mm(x2, a), b, alpha=self.scaling)
            return y2.view(*x.shape[:-1], y2.shape[-1])
        a, b = self._weights(x.dtype)
        if route.slot_index is not None:
            a, b = a.index_select(0, route.slot_index), b.index_select(0, route.slot_index)
        if route.contiguous:
            # One block of rows per adapter: y += scaling * (x A) B, two batched matmuls
            # written into the base output.
            x2 = x.reshape(-1, x.shape[-1])
            y2 = _BlockLoRA.apply(x2, self.base(x2), a, b, self.scaling)
            return y2.view(*x.shape[:-1], y2.shape[-1])
        y = self.base(x)
        g, m, d_in, d_out = route.n_groups, route.m, x.shape[-1], y.shape[-1]
        x3 = x.reshape(route.n, -1, d_in)  # [rows, tokens, in]
        t = x3.shape[1]
        # Elsewhere: pad the groups to equal size for one batched matmul.
        xg = x3.index_select(0, route.gather).view(g, m * t, d_in)
        delta = torch.bmm(torch.bmm(xg, a), b).view(g * m, t, d_out)
        if route.has_base:
            delta = torch.cat([delta, delta.new_zeros(1, t, d_out)])
        delta = delta.index_select(0, route.scatter)
        return torch.add(y, delta.view(y.shape), alpha=self.scaling)


class _BlockLoRA(torch.autograd.Function):
    """y += scaling * x_g A_g B_g in place, where x ([tokens, in]) and y ([tokens, out]) are
    K equal blocks of consecutive tokens and block g goes through adapter g (a: [K, in, r],
    b: [K, r, out]).

    One autograd node instead of the dozen views, transposes and products autograd would
    record for `baddbmm(y, bmm(x, a), b)`: on a GPU each of those is host time per layer
    and pass (see docs/benchmarks.md, "On a GPU")."""

    @staticmethod
    def forward(ctx, x, y, a, b, scaling):
        k = a.shape[0]
        x3 = x.view(k, -1, x.shape[-1])
        xa = torch.bmm(x3, a)
        y.view(k, -1, y.shape[-1]).baddbmm_(xa, b, alpha=scaling)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x3, xa, a, b)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, g):
        x3, xa, a, b = ctx.saved_tensors
        g3 = g.view(a.shape[0], -1, g.shape[-1])
        gxa = torch.bmm(g3, b.transpose(1, 2)).mul_(ctx.scaling)
        gb = torch.bmm(xa.transpose(1, 2), g3).mul_(ctx.scaling)
        ga = torch.bmm(x3.transpose(1, 2), gxa)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.bmm(gxa, a.transpose(1, 2)).view(-1, a.shape[1])
        return gx, g, ga, gb, None


def _dense_lora_(x, y, a_cat, b_cat, mask, scaling):
    """y += scaling * mask(x A_cat) B_cat in place; returns (y, the masked x A_cat)."""
    xa = torch.mm(x, a_cat)
    xa.view(x.shape[0], mask.shape[1], -1).mul_(mask)
    return y.addmm_(xa, b_cat, alpha=scaling), xa


class _DenseLoRA(torch.autograd.Function):
    """y += scaling * mask(x A_cat) B_cat in place, where A_cat = [A_1 .. A_K] ([in, K r]),
    B_cat = [B_1; ..; B_K] ([K r, out]) and mask ([tokens, K, 1]) keeps each token's own
    adapter's r columns (all zero for base tokens).

    On a CPU with AMX in bf16, each small matmul of a run (`_RunLoRA`: two forward, four
    backward per run) costs ~30 us whatever its size, ~40% of a SmolLM2 training pass of 8
    adapters; here a layer is two matmuls forward and four backward for all adapters at
    once, K times the low-rank arithmetic in larger, efficient matmuls. Exact: masked columns contribute
    zeros and receive zero gradients.

    Takes the adapters' fp32 masters ([K, in, r], [K, r, out]) and returns their gradients
    in fp32: the cast and the side-by-side layout of A_cat are one copy each way, instead of
    a cast, a layout copy and autograd's reverse of both per layer and pass (-8% of a bf16
    SmolLM2 training epoch of 8 adapters, docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, x, y, lora_a, lora_b, mask, scaling):
        # lora_a [K, in, r] and lora_b [K, r, out] are the fp32 masters: A_cat is cast and
        # laid out in one copy, and the weight gradients come back in fp32 the same way.
        k, d_in, r = lora_a.shape
        a_cat = x.new_empty(d_in, k * r)
        a_cat.view(d_in, k, r).copy_(lora_a.permute(1, 0, 2))
        b_cat = lora_b.reshape(k * r, -1).to(x.dtype)
        y, xa = _dense_lora_(x, y, a_cat, b_cat, mask, scaling)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, xa, a_cat, b_cat, mask)
        ctx.scaling, ctx.master_dtype = scaling, lora_a.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        x, xa, a_cat, b_cat, mask = ctx.saved_tensors
        n, k = x.shape[0], mask.shape[1]
        d_in, r = a_cat.shape[0], a_cat.shape[1] // k
        gxa = torch.mm(g, b_cat.t())
        gxa.view(n, k, r).mul_(mask * ctx.scaling)  # d loss / d(x A_cat), scaling included
        gx = torch.mm(gxa, a_cat.t()) if ctx.needs_input_grad[0] else None
        ga = torch.empty(k, d_in, r, dtype=ctx.master_dtype, device=x.device)
        ga.permute(1, 0, 2).copy_(torch.mm(x.t(), gxa).view(d_in, k, r))
        gb = torch.mm(xa.t(), g).view(k, r, -1).to(ctx.master_dtype).mul_(ctx.scaling)
        return gx, g, ga, gb, None, None


class _RunLoRA(torch.autograd.Function):
    """y += scaling * x A_k B_k, in place, for each run (start, end, k) of the `n_rows` rows
    of x ([n_rows * tokens, in]); other rows keep y.

    Written as one autograd function so that no adapter weight is ever gathered or copied
    per row, the base output is not copied, and the backward accumulates each run's weight
    gradient in place (indexing the stacked weights under autograd would allocate a
    full-size zero gradient per run). A run costs two small matmuls forward and four
    backward: its slices are taken once per tensor (`split`, `unbind`), and the scaling is
    applied once per layer, not per run."""

    @staticmethod
    def forward(ctx, x, y, a, b, scaling, runs, n_rows):
        t = x.shape[0] // n_rows
        # The tokens cut into pieces: each run, and the gaps (base rows) between them.
        sizes, owner, at = [], [], 0
        for s, e, k in runs:
            if s * t > at:
                sizes.append(s * t - at)
                owner.append(-1)
            sizes.append((e - s) * t)
            owner.append(k)
            at = e * t
        if x.shape[0] > at:
            sizes.append(x.shape[0] - at)
            owner.append(-1)
        xa = x.new_empty(x.shape[0], a.shape[-1])
        xs, xas, ys = x.split(sizes), xa.split(sizes), y.split(sizes)
        a_k, b_k = a.unbind(0), b.unbind(0)
        for j, k in enumerate(owner):
            if k >= 0:
                torch.mm(xs[j], a_k[k], out=xas[j])
                ys[j].addmm_(xas[j], b_k[k], alpha=scaling)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, xa, a, b)
        ctx.scaling, ctx.sizes, ctx.owner = scaling, sizes, owner
        return y

    @staticmethod
    def backward(ctx, g):
        x, xa, a, b = ctx.saved_tensors
        sizes, owner, scaling = ctx.sizes, ctx.owner, ctx.scaling
        gs, xs, xas = g.split(sizes), x.split(sizes), xa.split(sizes)
        bt_k = (b * scaling).transpose(1, 2).unbind(0)
        at_k = a.transpose(1, 2).unbind(0)
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gxs = gx.split(sizes) if gx is not None else None
        # Written once per slot or piece, so allocated uninitialised; only what no run
        # writes (base rows, unused slots) is zeroed.
        ga, gb = torch.empty_like(a), torch.empty_like(b)
        ga_k, gb_k = ga.unbind(0), gb.unbind(0)
        seen: set[int] = set()
        for j, k in enumerate(owner):
            if k < 0:
                if gxs is not None:
                    gxs[j].zero_()
                continue
            gxa = torch.mm(gs[j], bt_k[k])  # d loss / d(x A), scaling included
            if k in seen:
                gb_k[k].addmm_(xas[j].t(), gs[j])
                ga_k[k].addmm_(xs[j].t(), gxa)
            else:
                torch.mm(xas[j].t(), gs[j], out=gb_k[k])
                torch.mm(xs[j].t(), gxa, out=ga_k[k])
                seen.add(k)
            if gxs is not None:
                torch.mm(gxa, at_k[k], out=gxs[j])
        gb.mul_(scaling)
        for k in range(a.shape[0]):
            if k not in seen:
                ga_k[k].zero_()
                gb_k[k].zero_()
        return gx, g, ga, gb, None, None, None


@dataclass
class LoRASpec:
    """The shape of the adapters: rank, alpha and which linear layers they touch."""

    r: int = 32
    alpha: float = 64.0
    target_modules: tuple[str, ...] = ALL_LINEAR


class MultiLoRA:
    """K LoRA adapter slots wrapped into `model` in place; `remove()` restores the model.

    The base weights are never written (they stay bit-identical); adapter weights are fp32
    master copies, cast to the activations' dtype in the forward pass."""

    def __init__(self, model: nn.Module, n_adapters: int, spec: LoRASpec):
        self.model, self.k, self.spec = model, n_adapters, spec
        self.router = _Router()
        self.modules: list[tuple[nn.Module, str, MultiLoRALinear]] = []
        targets = set(spec.target_modules)
        found = [
            (parent, name, child)
            for parent in model.modules()
            for name, child in parent.named_children()
            if name in targets and isinstance(child, nn.Linear)
        ]
        if not found:
            raise ValueError(
                f"no linear layer named any of {sorted(targets)} in {type(model).__name__}"
            )
        device = next(model.parameters()).device
        for parent, name, child in found:
            wrapped = MultiLoRALinear(child, n_adapters, spec.r, spec.alpha, self.router).to(device)
            setattr(parent, name, wrapped)
            self.modules.append((parent, name, wrapped))
        self.names = [self._qualname(w) for _, _, w in self.modules]
        if device.type == "cpu" and next(model.parameters()).dtype == torch.bfloat16:
            cpu_kernels.run_lora_library()  # built (once per machine) or loaded before any pass

    def _qualname(self, module: nn.Module) -> str:
        for n, m in self.model.named_modules():
            if m is module:
                return n
        raise KeyError(module)

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, _, m in self.modules for p in (m.lora_A, m.lora_B)]

    def n_params_per_adapter(self) -> int:
        return sum(p[0].numel() for p in self.parameters())

    @torch.no_grad()
    def reset(self, slot: int, seed: int) -> None:
        """Fresh adapter in `slot`: A ~ U(±1/sqrt(in)) (PEFT's Kaiming default) drawn from a
        generator seeded by `seed` alone, B = 0 — so the same seed gives the same adapter in
        any slot, and the adapted model starts equal to the base model."""
        gen = torch.Generator().manual_seed(int(seed))
        for _, _, m in self.modules:
            m.lora_A[slot].copy_(init_lora_a(m.lora_A.shape[1], m.lora_A.shape[2], gen))
            m.lora_B[slot].zero_()

    @contextlib.contextmanager
    def route(self, rows: torch.Tensor | list[int] | None):
        """Within the block, batch row i goes through adapter rows[i] (-1: no adapter)."""
        prev = self.router.route
        if rows is not None:
            device = next(iter(self.parameters())).device
            rows = rows.tolist() if isinstance(rows, torch.Tensor) else [int(r) for r in rows]
            self.router.route = _Route(rows, self.k, device)
        else:
            self.router.route = None
        try:
            yield
        finally:
            self.router.route = prev

    @contextlib.contextmanager
    def frozen(self):
        """Within the block the adapters are read, not trained (generation): each layer uses
        copies of its adapter weights cast to the base model's dtype once, instead of casting
        them in every forward pass (two tensor ops per layer and decode step in bf16)."""
        with torch.no_grad():
            for _, _, m in self.modules:
                dtype = m.base.weight.dtype
                a = m.lora_A.to(dtype)
                a_cat = a.permute(1, 0, 2).reshape(a.shape[1], -1)  # [in, K r]
                m.frozen = (a, m.lora_B.to(dtype).contiguous(), a_cat)
        try:
            yield
        finally:
            for _, _, m in self.modules:
                m.frozen = None

    def state(self, slot: int) -> dict[str, torch.Tensor]:
        """A copy of one adapter, keyed by module name (A: [in, r], B: [r, out])."""
        out = {}
        for name, (_, _, m) in zip(self.names, self.modules, strict=True):
            out[f"{name}.lora_A"] = m.lora_A[slot].detach().clone()
            out[f"{name}.lora_B"] = m.lora_B[slot].detach().clone()
        return out

    @torch.no_grad()
    def load_state(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        for name, (_, _, m) in zip(self.names, self.modules, strict=True):
            m.lora_A[slot].copy_(state[f"{name}.lora_A"])
            m.lora_B[slot].copy_(state[f"{name}.lora_B"])

    @torch.no_grad()
    def merge(self, slot: int) -> None:
        """Add adapter `slot` into the base weights (W += scale * (A B)^T) — used only for the
        generator's ReST-EM update, never in the inner loop."""
        for _, _, m in self.modules:
            delta = (m.lora_A[slot] @ m.lora_B[slot]).T * m.scaling
            m.base.weight.add_(delta.to(m.base.weight.dtype))

    def save_peft(self, slot: int, path: str | Path, base_model_name: str = "") -> None:
        """Write adapter `slot` as a PEFT LoRA checkpoint (adapter_config.json +
        adapter_model.safetensors), loadable with `peft.PeftModel.from_pretrained`."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, (_, _, m) in zip(self.names, self.modules, strict=True):
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = m.lora_A[slot].detach().T.contiguous().cpu()
            tensors[f"{key}.lora_B.weight"] = m.lora_B[slot].detach().T.contiguous().cpu()
        save_file(tensors, str(path / "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.spec.r,
            "lora_alpha": self.spec.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": sorted(self.spec.target_modules),
            "fan_in_fan_out": False,
            "base_model_name_or_path": base_model_name,
            "inference_mode": True,
        }
        (path / "adapter_config.json").write_text(json.dumps(config, indent=2))

    def remove(self) -> None:
        """Unwrap every layer, leaving the model exactly as it was before wrapping."""
        for parent, name, wrapped in self.modules:
            setattr(parent, name, wrapped.base)
        self.modules = []


class BatchedAdamW:
    """AdamW over stacked adapter parameters ([K, ...]) with per-adapter state.

    Each adapter has its own step count and learning rate; adapters not in `active` are left
    untouched (not even their moments decay), so an adapter's trajectory does not depend on
    which others share its batches. Matches torch.optim.AdamW's update rule, including
    per-adapter global-norm gradient clipping as in HF Trainer (max_grad_norm)."""

    def __init__(
        self,
        params: list[nn.Parameter],
        n_adapters: int,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
    ):
        self.params, self.k = params, n_adapters
        self.b1, self.b2 = betas
        self.eps, self.wd, self.max_grad_norm = eps, weight_decay, max_grad_norm
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        # Each adapter's step count, where the parameters live, as the fused kernel reads it
        # (a host count copied per step would be one host sync per adapter per step on a GPU).
        device = params[0].device if params else torch.device("cpu")
        self.step_t = torch.zeros(n_adapters, dtype=torch.float32, device=device)
        # Each adapter's slices of the weights, moments and step count, made once: slicing
        # them per step cost ~4 x K x (number of tensors) tensor ops per pass (13,000 for
        # 8 adapters on a 30-layer model), each paid in host time on a GPU.
        self._slices = [
            (
                [p.data[k] for p in params],
                [m[k] for m in self.m],
                [v[k] for v in self.v],
                self.step_t[k],
            )
            for k in range(n_adapters)
        ]

    def reset(self, slot: int) -> None:
        for m, v in zip(self.m, self.v, strict=True):
            m[slot].zero_()
            v[slot].zero_()
        self.step_t[slot] = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step_all(self, lrs: torch.Tensor) -> torch.Tensor:
        """One update of every adapter at learning rates `lrs` ([K], on the parameters'
        device): nothing read back to the host, so a CUDA graph can record it (see
        cuda_graphs.py). Returns the per-adapter gradient norms before clipping."""
        return self._update(range(self.k), lambda k: lrs[k])

    @torch.no_grad()
    def step(self, active: torch.Tensor, lrs: torch.Tensor) -> torch.Tensor:
        """One update of the `active` adapters ([K] bool) at learning rates `lrs` ([K]).
        Returns the per-adapter gradient norms before clipping, on the parameters' device."""
        slots = [int(k) for k in torch.nonzero(active.cpu()).flatten()]
        return self._update(slots, lambda k: float(lrs[k]))

    def _update(self, slots, lr_of) -> torch.Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        if len(grads) != len(self.params):
            raise RuntimeError("BatchedAdamW.step: some adapter parameters have no gradient")
        # Every adapter's gradient slices (one view op per tensor), and per-adapter global
        # gradient norms: on a GPU one multi-tensor norm over the slices (one launch); on a
        # CPU, where that is a loop over K x tensors, one norm over dims 1.. per tensor.
        per_slot = [g.unbind(0) for g in grads]
        if grads and grads[0].device.type == "cpu":
            parts = [torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]
        else:
            flat = [gk for g in per_slot for gk in g]
            parts = torch._foreach_norm(flat, 2, dtype=torch.float32)
        norms = torch.linalg.vector_norm(torch.stack(parts).view(len(grads), -1), dim=0)
        # Clipping as a divisor of the gradients, max(1, norm / max_norm) (HF's coefficient
        # min(1, max_norm / (norm + 1e-6)) inverted), left on the device: no host sync.
        if self.max_grad_norm is not None:
            scales = ((norms + 1e-6) / self.max_grad_norm).clamp(min=1.0)
        else:
            scales = torch.ones_like(norms)
        for k in slots:
            weights, m, v, step_t = self._slices[k]
            step_t.add_(1)
            # torch's fused AdamW kernel, run on adapter k's slices: one pass over the memory,
            # exactly torch.optim.AdamW's rule. grad_scale divides the gradients (clipping).
            torch._fused_adamw_(
                weights,
                [g[k] for g in per_slot],
                m,
                v,
                [],
                [step_t] * len(weights),
                lr=lr_of(k),
                beta1=self.b1,
                beta2=self.b2,
                weight_decay=self.wd,
                eps=self.eps,
                amsgrad=False,
                maximize=False,
                grad_scale=scales[k],
                found_inf=None,
            )
        return norms
