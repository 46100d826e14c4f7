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

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Router:
    """Which adapter each batch row uses: rows[i] = slot, -1 = the bare base model."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        self.base_mask: torch.Tensor | None = None
        self.identity = False


class MultiLoRALinear(nn.Module):
    """A frozen nn.Linear plus K low-rank adapters; row i of the batch uses adapter rows[i]."""

    def __init__(self, base: nn.Linear, n_adapters: int, r: int, alpha: float, router: _Router):
        super().__init__()
        self.base = base
        self.r, self.scaling = r, alpha / r
        self.__dict__["router"] = router  # shared, not a submodule
        self.lora_A = nn.Parameter(torch.zeros(n_adapters, base.in_features, r))
        self.lora_B = nn.Parameter(torch.zeros(n_adapters, r, base.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.router.rows
        if rows is None:
            return y
        n = x.shape[0]
        if self.router.identity:  # row i uses adapter i for every i: no gather needed
            a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        else:
            a = self.lora_A.index_select(0, rows.clamp(min=0)).to(x.dtype)
            b = self.lora_B.index_select(0, rows.clamp(min=0)).to(x.dtype)
        delta = torch.bmm(torch.bmm(x.reshape(n, -1, x.shape[-1]), a), b).view(y.shape)
        if self.router.base_mask is not None:
            delta = delta * self.router.base_mask.view(n, *([1] * (delta.dim() - 1))).to(x.dtype)
        return y + self.scaling * delta


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
            bound = 1.0 / math.sqrt(m.lora_A.shape[1])
            init = torch.rand(m.lora_A.shape[1:], generator=gen) * (2 * bound) - bound
            m.lora_A[slot].copy_(init)
            m.lora_B[slot].zero_()

    @contextlib.contextmanager
    def route(self, rows: torch.Tensor | list[int] | None):
        """Within the block, batch row i goes through adapter rows[i] (-1: no adapter)."""
        prev = (self.router.rows, self.router.base_mask, self.router.identity)
        identity = False
        if rows is not None:
            identity = list(rows) == list(range(self.k))
            device = next(iter(self.parameters())).device
            rows = torch.as_tensor(rows, dtype=torch.long, device=device)
            self.router.base_mask = (rows >= 0) if bool((rows < 0).any()) else None
        else:
            self.router.base_mask = None
        self.router.rows, self.router.identity = rows, identity
        try:
            yield
        finally:
            self.router.rows, self.router.base_mask, self.router.identity = prev

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
        self.steps = torch.zeros(n_adapters, dtype=torch.float64)

    def reset(self, slot: int) -> None:
        for m, v in zip(self.m, self.v, strict=True):
            m[slot].zero_()
            v[slot].zero_()
        self.steps[slot] = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, active: torch.Tensor, lrs: torch.Tensor) -> torch.Tensor:
        """One update of the `active` adapters ([K] bool) at learning rates `lrs` ([K]).
        Returns the per-adapter gradient norms before clipping."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if len(grads) != len(self.params):
            raise RuntimeError("BatchedAdamW.step: some adapter parameters have no gradient")
        # Per-adapter global gradient norm (one pass over the gradients).
        sq = torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads]).sum(0)
        norms = sq.sqrt().cpu()
        slots = [int(k) for k in torch.nonzero(active.cpu()).flatten()]
        for k in slots:
            self.steps[k] += 1
            coef = 1.0
            if self.max_grad_norm is not None:
                coef = min(1.0, self.max_grad_norm / (float(norms[k]) + 1e-6))
            # torch's fused AdamW kernel, run on adapter k's slices: one pass over the memory,
            # exactly torch.optim.AdamW's rule. grad_scale divides the gradients (clipping).
            step_t = torch.tensor(float(self.steps[k]), device=grads[0].device)
            scale = torch.tensor(1.0 / coef, device=grads[0].device)
            torch._fused_adamw_(
                [p.data[k] for p in self.params],
                [g[k] for g in grads],
                [m[k] for m in self.m],
                [v[k] for v in self.v],
                [],
                [step_t] * len(self.params),
                lr=float(lrs[k]),
                beta1=self.b1,
                beta2=self.b2,
                weight_decay=self.wd,
                eps=self.eps,
                amsgrad=False,
                maximize=False,
                grad_scale=scale,
                found_inf=None,
            )
        return norms
