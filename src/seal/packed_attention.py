"""Attention for packed training passes: every sequence attends within itself only.

A CPU training pass puts all its sequences end to end in one row, with no padding (see
`training.train_adapters`), so that the linear layers, most of a pass's arithmetic, see only
real tokens: rows of 256 with several sequences each, the layout before, left 18% of the
bench's training tokens padding. Attention over such a row as a whole (a block-diagonal
mask over its width) would cost the square of its length; here each sequence attends alone:
the sequences are grouped into a few buckets of similar length (`Segments`), each bucket
gathered into a [sequences, length, heads, head dim] batch padded at the end, attended
causally (`_causal_attention`), and gathered back into the row. Padding at the end of a
causal sequence is never attended by its real tokens. On the bench's passes (8 self-edits'
sequences of 25-170 tokens) that is 3.7x fewer (query, key) pairs than the rows of 256.

The function is registered with transformers' `AttentionInterface` and switched on for a
model while `installed(model)` is entered, each pass naming its sequences with `segments`.
Models that do not take their attention from that interface are found out by
`training.supports_packing` and trained unpacked (a padded row per sequence).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "seal_packed"

# Buckets up to this many tokens wide go through `_causal_attention`, which keeps a bucket's
# [heads, L, L] probabilities for the backward pass (see `bytes_per_token`); wider ones go
# through torch's fused kernel, whose memory is linear in L and which is about as fast there
# (one sequence of 270 tokens, forward + backward, one core: 6.9-7.3 against 7.0 ms).
WRITTEN_OUT_MAX_LEN = 256


def bytes_per_token(config, max_len: int) -> int:
    """Memory per token and layer that packed attention keeps for the backward pass, for
    sequences of up to `max_len` tokens: the probabilities of every head over at most
    WRITTEN_OUT_MAX_LEN keys, in the model's dtype (counted at 2 bytes: a model trained in
    fp32 on a CPU counts its activations at 2 bytes too, see `auto_capacity`)."""
    heads = getattr(config, "num_attention_heads", None) or 1
    return 2 * heads * min(max_len, WRITTEN_OUT_MAX_LEN)


# A bucket's attention (forward and backward) costs about CALL + n (SEQ + L^2) units for n
# sequences padded to L tokens, a unit being one (query, key) score: fitted on SmolLM2's
# shapes on one CPU core (0.70 ms a call, 0.11 ms a sequence, ~0.1 us a score over 9 heads).
CALL_COST = 7000
SEQ_COST = 1150


def _buckets(lengths: list[int]) -> list[list[int]]:
    """Indices of `lengths` grouped into buckets of similar length at the least cost (see
    CALL_COST): the best split of the lengths sorted longest first, found exactly."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    # best[j]: least cost of the first j sequences in order; cut[j]: where its last bucket starts
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            top = lengths[order[i]]
            cost = best[i] + CALL_COST + (j - i) * (SEQ_COST + top * top)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets, j = [], n
    while j:
        buckets.append(order[cut[j] : j])
        j = cut[j]
    return buckets[::-1]


class Segments:
    """Where a pass's sequences lie in its flattened [rows x width] tokens, and how they are
    bucketed: `starts[i]`, `lengths[i]` of sequence i. Gather indices are made once per pass
    and shared by every layer."""

    def __init__(self, starts: list[int], lengths: list[int], n_tokens: int, device):
        if len(starts) != len(lengths) or not lengths:
            raise ValueError("segments need one start per length, and at least one")
        for s, n in zip(starts, lengths, strict=True):
            if n < 1 or s < 0 or s + n > n_tokens:
                raise ValueError(f"segment of {n} tokens at {s} is not within {n_tokens} tokens")
        self.n_tokens = n_tokens
        self.longest = max(lengths)
        self.buckets = []  # (sequences, padded length, gather index on the device)
        back = [-1] * n_tokens  # where each token's output lands in the buckets' outputs
        at = 0
        for members in _buckets(lengths):
            width = max(lengths[i] for i in members)
            gather = []
            for i in members:
                s, n = starts[i], lengths[i]
                back[s : s + n] = range(at + len(gather), at + len(gather) + n)
                # padding repeats the sequence's last token: after every real query, unseen
                gather += list(range(s, s + n)) + [s + n - 1] * (width - n)
            at += len(gather)
            self.buckets.append((len(members), width, torch.tensor(gather, device=device)))
        # tokens outside every sequence (row padding) get zeros, one row past the buckets'
        self.has_padding = sum(lengths) < n_tokens
        if self.has_padding:
            back = [at if i < 0 else i for i in back]
        self.back = torch.tensor(back, device=device)
        self.device = device
        self._masks: dict = {}

    def mask(self, width: int, groups: int) -> torch.Tensor:
        """[groups x width, width] fp32: -inf above the diagonal, made once per pass."""
        key = (width, groups)
        if key not in self._masks:
            causal = torch.full((width, width), float("-inf")).triu(1)
            self._masks[key] = causal.repeat(groups, 1).to(self.device)
        return self._masks[key]


class _Current:
    segments: Segments | None = None


_CURRENT = _Current()


class _Attention(torch.autograd.Function):
    """softmax(scale q k^T + mask) v for [B, M, d] queries and [B, L, d] keys and values,
    keeping only the probabilities, in the values' dtype, for the backward pass (2 bytes a
    score in bf16, where autograd would keep the fp32 softmax and its bf16 copy, 6)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        scores = torch.baddbmm(
            mask.expand(q.shape[0], -1, -1), q.float(), k.float().mT, alpha=scale
        )
        p = torch.softmax(scores, -1).to(v.dtype)
        ctx.save_for_backward(q, k, v, p)
        ctx.scale = scale
        return torch.bmm(p, v)

    @staticmethod
    def backward(ctx, g):
        q, k, v, p = ctx.saved_tensors
        dv = torch.bmm(p.mT, g)
        dp = torch.bmm(g, v.mT).float()
        pf = p.float()
        ds = (dp - (dp * pf).sum(-1, keepdim=True)).mul_(pf).mul_(ctx.scale)  # softmax backward
        dq = torch.bmm(ds, k.float()).to(q.dtype)
        dk = torch.bmm(ds.mT, q.float()).to(k.dtype)
        return dq, dk, dv, None, None


def _causal_attention(q, k, v, mask, scale):
    """Causal attention of n equal-length sequences: q [n, L, H, d], k and v [n, L, Hkv, d] ->
    [n L, H, d]; `mask` [g L, L] (fp32) adds -inf above the diagonal for each of the g = H /
    Hkv query heads sharing a key head. Written out (`_Attention`: two batched matmuls and a
    softmax) because on a CPU torch's fused attention kernel takes 5-15 ms for the backward
    of a few short sequences that this does, forward and backward, in 2-4 ms
    (docs/benchmarks.md). Scores and softmax are fp32 (in bf16 a first token's large scores
    swamp the rest); the probabilities multiply the values in the values' dtype."""
    n, length, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    # query heads grouped under their key head: [n Hkv, g L, d]
    qg = q.view(n, length, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(n * hkv, g * length, d)
    kg = k.permute(0, 2, 1, 3).reshape(n * hkv, length, d)
    vg = v.permute(0, 2, 1, 3).reshape(n * hkv, length, d)
    out = _Attention.apply(qg, kg, vg, mask, scale)
    return out.view(n, hkv, g, length, d).permute(0, 3, 1, 2, 4).reshape(n * length, h, d)


def packed_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    """transformers' attention signature: query [B, H, T, D], key/value [B, Hkv, T, D] ->
    ([B, T, H, D], None), each sequence of the current `Segments` attending within itself."""
    seg = _CURRENT.segments
    if seg is None:
        raise RuntimeError(f"{NAME} attention used outside `packed_attention.segments`")
    if dropout:
        raise ValueError("packed attention has no dropout (training runs in eval mode)")
    window = kwargs.get("sliding_window")
    if window is not None and window < seg.longest:
        raise ValueError(f"packed attention has no sliding window ({window} < {seg.longest})")
    b, h, t, d = query.shape
    if b * t != seg.n_tokens:
        raise ValueError(f"packed attention got {b * t} tokens, the pass has {seg.n_tokens}")
    hkv = key.shape[1]
    scale = d**-0.5 if scaling is None else scaling
    q = query.transpose(1, 2).reshape(b * t, h, d)
    k = key.transpose(1, 2).reshape(b * t, hkv, d)
    v = value.transpose(1, 2).reshape(b * t, hkv, d)
    outs = []
    for n, width, gather in seg.buckets:

        def take(x, gather=gather, n=n, width=width):
            return x.index_select(0, gather).view(n, width, x.shape[1], d)

        if width <= WRITTEN_OUT_MAX_LEN:
            mask = seg.mask(width, h // hkv)
            o = _causal_attention(take(q), take(k), take(v), mask, scale)
        else:  # torch's fused kernel: memory linear in the length, and as fast here
            qb, kb, vb = (take(x).transpose(1, 2) for x in (q, k, v))
            o = F.scaled_dot_product_attention(
                qb, kb, vb, is_causal=True, scale=scale, enable_gqa=hkv != h
            )
            o = o.transpose(1, 2).reshape(n * width, h, d)
        outs.append(o)
    if seg.has_padding:
        outs.append(q.new_zeros(1, h, d))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.index_select(0, seg.back).view(b, t, h, d), None


AttentionInterface.register(NAME, packed_attention_forward)


@contextlib.contextmanager
def installed(model):
    """Within the block, `model` takes its attention from `packed_attention_forward`; each pass
    names its sequences with `segments`."""
    before = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@contextlib.contextmanager
def segments(seg: Segments):
    """The sequences of the pass run within the block (its forward and backward)."""
    previous, _CURRENT.segments = _CURRENT.segments, seg
    try:
        yield
    finally:
        _CURRENT.segments = previous
