"""The hand-written decode loop: same tokens as transformers' generate, rows that stop leave the
batch without changing the others, and rows with one prompt share one prefill."""

import contextlib
import functools

import torch

from seal import generation
from seal.generation import SamplingParams, generate, sample_completions


def _prompts(tok):
    texts = [
        "The Varrow lighthouse",
        "A river called Pell runs",
        "x",
        "Some longer prompt text here",
    ]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_greedy_equals_transformers_generate(tiny, monkeypatch):
    tok, model = tiny.tokenizer, tiny.model
    monkeypatch.setattr(generation, "stop_token_ids", lambda _tok: [])  # decode all 10 tokens
    prompts = _prompts(tok)
    ours = generate(model, tok, prompts, SamplingParams(10))
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    ref = model.generate(
        input_ids=ids,
        attention_mask=att,
        max_new_tokens=10,
        min_new_tokens=10,
        do_sample=False,
        pad_token_id=0,
    )
    assert ours == ref[:, width:].tolist()


def test_rows_that_stop_leave_without_changing_the_others(tiny, monkeypatch):
    tok, model = tiny.tokenizer, tiny.model
    prompts = _prompts(tok)
    monkeypatch.setattr(generation, "stop_token_ids", lambda _tok: [])
    params = SamplingParams(12, do_sample=True, temperature=2.0)
    seeds = [11, 12, 13, 14]
    full = generate(model, tok, prompts, params, row_seeds=seeds)
    # Row 0 stops after k >= 2 tokens; the others wherever this token first appears (if at all).
    k = next(k for k in range(2, 12) if full[0][k] not in full[0][:k])
    stop = full[0][k]
    monkeypatch.setattr(generation, "stop_token_ids", lambda _tok: [stop])
    cut = generate(model, tok, prompts, params, row_seeds=seeds)
    for f, c in zip(full, cut, strict=True):
        assert c == (f[: f.index(stop)] if stop in f else f)
    assert len(cut[0]) == k


def test_same_prompt_rows_share_one_prefill_and_equal_rows_alone(tiny, monkeypatch):
    tok, model = tiny.tokenizer, tiny.model
    texts = ["The Varrow lighthouse was", "A river called Pell"]
    params = SamplingParams(8, do_sample=True, temperature=1.0, top_p=0.9)
    widths = []
    real = type(model).forward

    @functools.wraps(real)  # keeps the signature, so the cache goes in as `cache`
    def spy(self, *a, **kw):
        widths.append(tuple(kw["input_ids"].shape))
        return real(self, *a, **kw)

    monkeypatch.setattr(type(model), "forward", spy)
    together = sample_completions(model, tok, texts, 3, params, seed=5)
    assert widths[0][0] == 2  # one prefill row per distinct prompt, not 6
    assert all(w[0] <= 6 and w[1] == 1 for w in widths[1:])  # then one token per live row
    # Each sample equals that row sampled on its own, with its own seed.
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    for i, p in enumerate(prompts):
        for j in range(3):
            seed = (5 + i) * 1_000_003 + j
            alone = generate(model, tok, [p], params, row_seeds=[seed])
            assert generation.decode(tok, alone)[0] == together[i][j]


def test_sampling_is_reproducible_under_a_seed(tiny):
    tok, model = tiny.tokenizer, tiny.model
    params = SamplingParams(8, do_sample=True, temperature=0.8, top_p=0.95)
    a = generate(model, tok, _prompts(tok), params, seed=3)
    b = generate(model, tok, _prompts(tok), params, seed=3)
    c = generate(model, tok, _prompts(tok), params, seed=4)
    assert a == b and a != c


def test_adapters_are_cast_once_per_generate_in_bf16(tiny, monkeypatch):
    """In a bf16 model, generation reads adapter copies cast once (`MultiLoRA.frozen`), with
    the same tokens as casting in every forward; the copies are gone afterwards."""
    import copy

    from seal.lora import LoRASpec, MultiLoRA

    tok = tiny.tokenizer
    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    monkeypatch.setattr(generation, "stop_token_ids", lambda _tok: [])
    lora = MultiLoRA(model, 2, LoRASpec(r=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.5)
    prompts, rows = _prompts(tok), [1, 0, 1, -1]
    casts = []
    real_to = torch.Tensor.to
    adapter_weights = {id(p) for p in lora.parameters()}

    def counting_to(self, *a, **kw):
        if id(self) in adapter_weights:
            casts.append(self.dtype)
        return real_to(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    once = generate(model, tok, prompts, SamplingParams(6), rows=rows, lora=lora)
    n_once = casts.count(torch.float32)
    monkeypatch.setattr(MultiLoRA, "frozen", lambda self: contextlib.nullcontext())
    casts.clear()
    every = generate(model, tok, prompts, SamplingParams(6), rows=rows, lora=lora)
    assert once == every
    assert n_once == 2 * len(lora.modules) < casts.count(torch.float32)
    assert all(m.frozen is None for _, _, m in lora.modules)


def test_prefill_gives_the_vocabulary_projection_a_contiguous_input(tiny):
    """`logits_to_keep=1` hands the head a non-contiguous [rows, 1, d] view, which torch
    multiplies as a batched matmul over the broadcast head (seconds in bf16 on a CPU):
    within `contiguous_head_input` the head sees a contiguous tensor, same logits."""
    from seal.generation import contiguous_head_input

    model = tiny.model
    seen = []
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    outs = []
    for wrapped in (False, True):
        seen.clear()
        ctx = contiguous_head_input(model) if wrapped else contextlib.nullcontext()
        with ctx, torch.no_grad():
            # Registered inside the block: runs after the block's own pre-hook.
            h = model.get_output_embeddings().register_forward_pre_hook(
                lambda _m, args: seen.append(args[0].is_contiguous())
            )
            try:
                outs.append(model(input_ids=ids, logits_to_keep=1).logits)
            finally:
                h.remove()
        assert seen == [wrapped]
    torch.testing.assert_close(outs[0], outs[1])
    assert not model.get_output_embeddings()._forward_pre_hooks


def _spy_widths(model, monkeypatch) -> list:
    """The input shape of every forward pass of `model` from here on."""
    widths = []
    real = type(model).forward

    @functools.wraps(real)
    def spy(self, *a, **kw):
        widths.append(tuple(kw["input_ids"].shape))
        return real(self, *a, **kw)

    monkeypatch.setattr(type(model), "forward", spy)
    return widths


def _random_adapters(model, k=2):
    from seal.lora import LoRASpec, MultiLoRA

    lora = MultiLoRA(model, k, LoRASpec(r=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.5)
    return lora


def test_draft_follows_the_latest_ngram_and_repeats_a_loop():
    from seal.generation import _draft

    # [2, 3, 1] last seen 3 back: a loop of period 3 goes on.
    assert _draft([1, 2, 3, 1, 2, 3, 1], 5) == [2, 3, 1, 2, 3]
    # Far back: the tokens that followed it there.
    assert _draft([7, 8, 9, 4, 5, 6, 0, 7, 8], 3) == [9, 4, 5]
    assert _draft([5, 5], 4) == [5, 5, 5, 5]
    assert _draft([1, 2, 3], 4) == [] and _draft([1], 4) == []


def test_a_row_left_alone_checks_drafts_with_the_same_tokens(tiny, monkeypatch):
    """Greedy decoding of a row alone in its batch checks prompt-lookup drafts (several
    tokens a pass): the same tokens as one token a pass, in fewer passes, with or without
    adapters, whatever the token budget."""
    tok, model = tiny.tokenizer, tiny.model
    monkeypatch.setattr(generation, "stop_token_ids", lambda _tok: [])
    widths = _spy_widths(model, monkeypatch)
    lora = _random_adapters(model)
    try:
        for p in _prompts(tok):
            for n in (1, 2, 7, 40):
                for rows in (None, [1]):
                    kw = {"rows": rows, "lora": lora if rows else None}
                    widths.clear()
                    one = generate(model, tok, [p], SamplingParams(n, lookup_tokens=0), **kw)
                    n_one = len(widths)
                    widths.clear()
                    drafted = generate(model, tok, [p], SamplingParams(n), **kw)
                    assert drafted == one and len(one[0]) == n
                    assert len(widths) <= n_one
                    if n == 40 and rows is None:  # the tiny model loops: drafts hit
                        assert len(widths) < n_one / 2
    finally:
        lora.remove()


def test_drafted_decoding_stops_where_one_token_a_pass_does(tiny, monkeypatch):
    tok, model = tiny.tokenizer, tiny.model
    monkeypatch.setattr(generation, "stop_token_ids", lambda _tok: [])
    lora = _random_adapters(model, 1)
    widths = _spy_widths(model, monkeypatch)
    try:
        p = _prompts(tok)[0]
        full = generate(model, tok, [p], SamplingParams(30, lookup_tokens=0), [0], lora)[0]
        # Here the adapted model loops on one token (drafts of it are checked) and then
        # breaks the loop with a new token: that token is the stop.
        k = next(i for i in range(8, 30) if full[i] not in full[:i])
        assert full[k - 3 : k] == [full[k - 1]] * 3
        monkeypatch.setattr(generation, "stop_token_ids", lambda _tok: [full[k]])
        widths.clear()
        cut = generate(model, tok, [p], SamplingParams(30), [0], lora)[0]
        assert cut == full[:k]
        assert any(w[1] > 1 for w in widths[1:])  # drafts were checked
    finally:
        lora.remove()


def test_a_shared_prompt_prefix_runs_once_per_adapter(tiny, monkeypatch):
    """Prompts that start alike (a chat template) run their common start once per adapter,
    then the rest of each: the same tokens as whole prompts (fp32)."""
    tok, model = tiny.tokenizer, tiny.model
    monkeypatch.setattr(generation, "stop_token_ids", lambda _tok: [])
    start = tok("System: answer briefly and well, please. Question:", add_special_tokens=False)
    start = start["input_ids"]
    assert len(start) >= generation.SHARED_PREFIX_MIN
    prompts = [start + q for q in _prompts(tok)] + [start + _prompts(tok)[1]]
    rows = [0, 1, 0, -1, 1]
    lora = _random_adapters(model)
    widths = _spy_widths(model, monkeypatch)
    try:
        shared = generate(model, tok, prompts, SamplingParams(6), rows=rows, lora=lora)
        rests = max(len(p) for p in prompts) - len(start)
        assert widths[:2] == [(3, len(start)), (4, rests)]  # slots 0, 1, base; 4 distinct rests
        monkeypatch.setattr(generation, "SHARED_PREFIX_MIN", 10**9)
        widths.clear()
        whole = generate(model, tok, prompts, SamplingParams(6), rows=rows, lora=lora)
        assert widths[0] == (4, max(map(len, prompts)))
        assert shared == whole
    finally:
        lora.remove()
