"""Packed attention: sequences end to end in one row, each attending only within itself."""

import pytest
import torch
import torch.nn.functional as F

from seal import packed_attention as pa


def _alone(q, k, v, spans, scale):
    """Each span (flat start, length) through torch's own causal attention, alone."""
    b, h, t, d = q.shape
    flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (q, k, v)]
    out = torch.zeros(b * t, h, d, dtype=q.dtype)
    for s, n in spans:
        qs, ks, vs = (x[s : s + n].transpose(0, 1)[None] for x in flat)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        out[s : s + n] = o[0].transpose(0, 1)
    return out.view(b, t, h, d)


@pytest.mark.parametrize("call_cost,written_max", [(pa.CALL_COST, 256), (0, 256), (0, 4)])
def test_equals_each_sequence_alone_forward_and_backward(call_cost, written_max, monkeypatch):
    """Two rows with padding at the end of the second, sequences of 1 to 9 tokens (in one
    bucket, or with free calls one bucket per length; attention written out, or through
    torch's kernel for buckets over 4 tokens), grouped query heads: outputs and gradients
    equal attention over each sequence alone; padding gets no gradient."""
    monkeypatch.setattr(pa, "CALL_COST", call_cost)
    monkeypatch.setattr(pa, "WRITTEN_OUT_MAX_LEN", written_max)
    monkeypatch.setattr(pa, "SEQ_COST", 0)
    torch.manual_seed(0)
    b, h, hkv, t, d = 2, 4, 2, 12, 8
    spans = [(0, 9), (9, 3), (12, 1), (13, 5), (18, 4)]  # row 2: tokens 22, 23 are padding
    seg = pa.Segments([s for s, _ in spans], [n for _, n in spans], b * t, "cpu")
    assert len(seg.buckets) == (1 if call_cost else 5)
    q = torch.randn(b, h, t, d, requires_grad=True)
    k = torch.randn(b, hkv, t, d, requires_grad=True)
    v = torch.randn(b, hkv, t, d, requires_grad=True)
    g = torch.randn(b, t, h, d)
    with pa.segments(seg):
        out, weights = pa.packed_attention_forward(None, q, k, v, None, scaling=0.3)
    assert weights is None
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ref = _alone(q2, k2, v2, spans, 0.3)
    real = torch.ones(b * t, dtype=torch.bool)
    real[22:] = False
    torch.testing.assert_close(out.reshape(b * t, h, d)[real], ref.reshape(b * t, h, d)[real])
    ref_grads = torch.autograd.grad((ref * g).sum(), (q2, k2, v2))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)
    assert grads[0][1, :, 10:].abs().sum() == 0  # padding's queries feed nothing


def test_buckets_cover_every_sequence_once_and_keep_short_ones_apart_from_long():
    lengths = [40, 41, 38, 45, 160, 39, 44, 42]
    buckets = pa._buckets(lengths)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert [4] in buckets  # the long one alone: padding 7 short ones to 160 costs more
    assert pa._buckets([30] * 6) == [list(range(6))]  # equal lengths: one call
    assert pa._buckets([50, 49]) == [[0, 1]]  # a call costs more than a token of padding


def test_misuse_is_refused():
    q, kv = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(RuntimeError, match="outside"):
        pa.packed_attention_forward(None, q, kv, kv, None)
    with pa.segments(pa.Segments([0, 2], [2, 3], 5, "cpu")):
        with pytest.raises(ValueError, match="sliding window"):
            pa.packed_attention_forward(None, q, kv, kv, None, sliding_window=2)
        with pytest.raises(ValueError, match="dropout"):
            pa.packed_attention_forward(None, q, kv, kv, None, dropout=0.1)
    with pa.segments(pa.Segments([0], [4], 4, "cpu")), pytest.raises(ValueError, match="has 4"):
        pa.packed_attention_forward(None, q, kv, kv, None)
    with pytest.raises(ValueError, match="one start per length"):
        pa.Segments([0], [2, 3], 5, "cpu")


def test_models_attention_is_switched_for_the_block_only(tiny):
    before = tiny.model.config._attn_implementation
    with pa.installed(tiny.model):
        assert tiny.model.config._attn_implementation == pa.NAME
    assert tiny.model.config._attn_implementation == before


def test_supports_packing_in_bf16(tiny):
    """In bf16 the packed row rounds differently from the model's own kernel; the check
    still accepts it (and still refuses a row whose sequences see each other)."""
    import copy

    from seal import training

    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    assert training.supports_packing(model)

    class Leaky(pa.Segments):  # one sequence over the whole row: attends across the boundary
        def __init__(self, starts, lengths, n_tokens, device):
            super().__init__([0], [n_tokens], n_tokens, device)

    leaky = copy.deepcopy(tiny.model)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(training.packed_attention, "Segments", Leaky)
        assert not training.supports_packing(leaky)
