"""The batched multi-adapter LoRA: K adapters trained together equal each trained alone."""

import pytest
import torch

from seal.generation import SamplingParams, generate
from seal.lora import BatchedAdamW, LoRASpec, MultiLoRA
from seal.training import AdapterJob, TrainHP, lr_factor, text_example, train_adapters

TEXTS = [
    ["Alpha beta gamma delta.", "The Varrow lighthouse was built in 1843.", "A third line."],
    ["Some other text about a river called Pell.", "x y z"],
    ["Third job, one line only"],
]
SPEC = LoRASpec(r=4, alpha=8)


def _train(lm, job_texts, capacity, hp, slots=None, seeds=None):
    tok = lm.tokenizer
    lora = MultiLoRA(lm.model, capacity, SPEC)
    slots = slots or list(range(len(job_texts)))
    seeds = seeds or [100 + i for i in range(len(job_texts))]
    jobs = []
    for slot, texts, seed in zip(slots, job_texts, seeds, strict=True):
        lora.reset(slot, seed)
        jobs.append(AdapterJob(slot, [text_example(tok, t, 64) for t in texts], seed, hp))
    stats = train_adapters(lm.model, lora, jobs, tok.pad_token_id)
    return lora, stats


def test_batched_equals_solo(tiny):
    hp = TrainHP(lr=5e-3, epochs=3, batch_size=1)
    lora, stats_all = _train(tiny, TEXTS, 4, hp, slots=[2, 0, 3])  # slots need not be in order
    states_all = [lora.state(s) for s in (2, 0, 3)]
    lora.remove()
    for i, texts in enumerate(TEXTS):
        solo, stats = _train(tiny, [texts], 1, hp, seeds=[100 + i])
        state = solo.state(0)
        solo.remove()
        assert len(stats[0].losses) == len(stats_all[i].losses) == 3 * len(texts)
        torch.testing.assert_close(stats[0].losses, stats_all[i].losses, rtol=1e-4, atol=1e-5)
        for k in state:
            torch.testing.assert_close(state[k], states_all[i][k], rtol=1e-4, atol=1e-5)


def test_answers_through_rows_equal_solo(tiny):
    hp = TrainHP(lr=2e-2, epochs=2)
    tok = tiny.tokenizer
    prompts = [tok("The Varrow lighthouse", add_special_tokens=False)["input_ids"]] * 3
    lora, _ = _train(tiny, TEXTS, 3, hp)
    both = generate(tiny.model, tok, prompts, SamplingParams(8), rows=[0, 1, -1], lora=lora)
    lora.remove()
    base = generate(tiny.model, tok, prompts[:1], SamplingParams(8))
    assert both[2] == base[0]  # row -1 is the bare base model
    for i in (0, 1):
        solo, _ = _train(tiny, TEXTS[i : i + 1], 1, hp, seeds=[100 + i])
        alone = generate(tiny.model, tok, prompts[:1], SamplingParams(8), rows=[0], lora=solo)
        solo.remove()
        assert alone[0] == both[i]


def test_base_weights_unchanged_and_remove_restores(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    lora, _ = _train(tiny, TEXTS, 3, TrainHP(lr=1e-2, epochs=2))
    lora.remove()
    after = tiny.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_batched_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    k, steps = 3, 6
    p = torch.nn.Parameter(torch.randn(k, 5, 4))
    ref = [torch.nn.Parameter(p[i].detach().clone()) for i in range(k)]
    opt = BatchedAdamW([p], k, weight_decay=0.01, max_grad_norm=0.5)
    ref_opts = [torch.optim.AdamW([r], lr=1e-2, weight_decay=0.01) for r in ref]
    total = {0: 6, 1: 4, 2: 2}  # adapters stop at different steps
    for s in range(steps):
        grads = torch.randn(k, 5, 4)
        active = torch.tensor([s < total[i] for i in range(k)])
        for i in range(k):
            if not active[i]:
                grads[i] = 0
        p.grad = grads.clone()
        lrs = torch.tensor([1e-2 * lr_factor("linear", s, total[i], 0) for i in range(k)])
        opt.step(active, lrs)
        for i in range(k):
            if active[i]:
                ref[i].grad = grads[i].clone()
                torch.nn.utils.clip_grad_norm_([ref[i]], 0.5)
                for g in ref_opts[i].param_groups:
                    g["lr"] = float(lrs[i])
                ref_opts[i].step()
    for i in range(k):
        torch.testing.assert_close(p[i].detach(), ref[i].detach(), rtol=1e-5, atol=1e-6)


def test_reset_is_slot_independent(tiny):
    lora = MultiLoRA(tiny.model, 3, SPEC)
    lora.reset(0, 7)
    lora.reset(2, 7)
    a, b = lora.state(0), lora.state(2)
    lora.remove()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not v.any() for k, v in a.items() if k.endswith("lora_B"))


def test_peft_export_and_merge_agree(tiny, tmp_path):
    from peft import PeftModel

    lora, _ = _train(tiny, TEXTS[:1], 1, TrainHP(lr=2e-2, epochs=2))
    ids = tiny.tokenizer("The Varrow lighthouse was", return_tensors="pt")["input_ids"]
    with torch.no_grad(), lora.route([0]):
        ours = tiny.model(ids).logits
    lora.save_peft(0, tmp_path / "adapter")
    lora.remove()
    peft_model = PeftModel.from_pretrained(tiny.model, tmp_path / "adapter")
    with torch.no_grad():
        theirs = peft_model(ids).logits
    peft_model.unload()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _per_row_reference(layer, x, rows):
    """y_i = base(x_i) + scaling * x_i A_{rows[i]} B_{rows[i]} (0 for rows[i] = -1), row by row."""
    out = []
    for i, s in enumerate(rows):
        y = layer.base(x[i])
        if s >= 0:
            y = y + layer.scaling * (x[i] @ layer.lora_A[s]) @ layer.lora_B[s]
        out.append(y)
    return torch.stack(out)


def _random_layer():
    """One MultiLoRALinear (8 -> 12, 4 slots, r 4) with random adapters, and a MultiLoRA
    wired to it (only route() and frozen() are used)."""
    from seal.lora import MultiLoRALinear, _Router

    torch.manual_seed(0)
    router = _Router()
    layer = MultiLoRALinear(torch.nn.Linear(8, 12), 4, r=4, alpha=8.0, router=router)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    lora = MultiLoRA.__new__(MultiLoRA)
    lora.router, lora.k, lora.modules = router, 4, [(None, "", layer)]
    return layer, lora


@pytest.mark.parametrize("path", ["cpu_runs", "cpu_dense", "gpu"])
def test_every_route_shape_equals_per_row_reference(path, monkeypatch):
    """Identity, grouped and contiguous, unequal groups, unordered rows, base rows, a subset
    of the slots: outputs and gradients (x, A, B) equal the row-by-row definition, with runs
    of rows (CPU), every slot at once under a mask (CPU in bf16: `_DenseLoRA`, here forced
    for fp32) and with groups padded to equal size (GPU)."""
    from seal import lora as lora_mod

    monkeypatch.setattr(lora_mod, "_is_cpu", lambda _device: path != "gpu")
    if path == "cpu_dense":
        monkeypatch.setattr(lora_mod, "DENSE_DTYPES", (torch.float32,))

        def not_runs(*_args):
            raise AssertionError("runs taken instead of the dense route")

        monkeypatch.setattr(lora_mod._RunLoRA, "apply", not_runs)

    layer, lora = _random_layer()
    cases = [
        [0, 1, 2, 3],  # identity
        [1, 1, 3, 3],  # contiguous equal groups over a subset of the slots
        [2, 0, 2, 0, 2],  # unordered, unequal groups
        [3, -1, 3, 1, -1],  # base rows mixed in
        [2, 2, 0, -1],  # group order already, base rows last
        [0, 0, 1, 2, 2, 2],  # runs of unequal length, no base rows
        [-1, -1],  # base rows only
        [0, 0, 0],  # one adapter (the sequential inner loop)
    ]
    for rows in cases:
        x = torch.randn(len(rows), 7, 8, requires_grad=True)
        with lora.route(rows):
            got = layer(x)
        want_x = x.detach().clone().requires_grad_(True)
        want = _per_row_reference(layer, want_x, rows)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        w = torch.randn_like(got)
        params = [layer.lora_A, layer.lora_B]
        ga = torch.autograd.grad((got * w).sum(), [x, *params], allow_unused=True)
        gb = torch.autograd.grad((want * w).sum(), [want_x, *params], allow_unused=True)
        for a, b, like in zip(ga, gb, [x, *params], strict=True):
            zero = torch.zeros_like(like)
            torch.testing.assert_close(
                zero if a is None else a, zero if b is None else b, rtol=1e-4, atol=1e-4
            )


@pytest.mark.parametrize("tokens", [1, 5])
def test_read_only_route_equals_per_row_reference(tokens, monkeypatch):
    """Generation's route (adapters frozen, few tokens): every slot's low-rank term at once,
    masked to each row's own adapter, equals the row-by-row definition."""
    from seal import lora as lora_mod

    def other_route(*_args):
        raise AssertionError("not the read-only route")

    layer, lora = _random_layer()
    for rows in ([2, 0, 2, 0, 2], [3, -1, 3, 1, -1], [1, 1, 0, 3]):
        x = torch.randn(len(rows), tokens, 8)
        with lora.frozen(), lora.route(rows), torch.no_grad(), monkeypatch.context() as m:
            m.setattr(lora_mod._RunLoRA, "apply", other_route)
            m.setattr(lora_mod._BlockLoRA, "apply", other_route)
            got = layer(x)
        torch.testing.assert_close(got, _per_row_reference(layer, x, rows).detach())
    assert layer.frozen is None


def test_route_rejects_unknown_slot(tiny):
    lora = MultiLoRA(tiny.model, 2, SPEC)
    try:
        with pytest.raises(ValueError, match="row 1 routed to adapter 2"), lora.route([0, 2]):
            pass
    finally:
        lora.remove()


def test_training_flops_counts_decoder_adapter_and_head(tiny):
    """MFU's numerator: 4 FLOPs per frozen decoder weight and 6 per adapter weight for every
    input token, 4 per head weight for every loss token; embedding lookups count nothing."""
    from seal.bench import training_flops

    model = tiny.model
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight.data_ptr() == (
        model.get_input_embeddings().weight.data_ptr()
    )
    decoder = n - embed - (0 if tied else head)
    assert training_flops(model, 0, 10, 0) == 10 * 4 * decoder
    assert training_flops(model, 100, 10, 3) == 10 * (4 * decoder + 600) + 3 * 4 * head
    # Attention: 12 FLOPs per (query, key) pair, query-head dimension and layer.
    c = model.config
    per_pair = (
        12 * c.num_hidden_layers * c.num_attention_heads * (c.hidden_size // c.num_attention_heads)
    )
    assert training_flops(model, 0, 0, 0, attention_pairs=5) == 5 * per_pair


def test_train_stats_count_tokens_and_causal_pairs(tiny):
    """What MFU is computed from: tokens run (no padding) and causal pairs per sequence."""
    lora, stats = _train(tiny, TEXTS, 3, TrainHP(epochs=2))
    lora.remove()
    for texts, st in zip(TEXTS, stats, strict=True):
        lengths = [len(text_example(tiny.tokenizer, t, 64).input_ids) for t in texts]
        assert st.input_tokens == 2 * sum(lengths)
        assert st.attention_pairs == 2 * sum(n * (n + 1) // 2 for n in lengths)
        assert st.tokens == 2 * sum(n - 1 for n in lengths)  # every next token is a target


def test_packed_training_equals_unpacked(tiny):
    """Sequences of different adapters packed end to end into one row, each attending only
    within itself (packed_attention.py), train exactly as when each has a padded row of its
    own (batch size 2: an adapter's two sequences lie in one pass)."""
    from seal.training import supports_packing

    assert supports_packing(tiny.model)
    tok = tiny.tokenizer
    hp = TrainHP(lr=5e-3, epochs=2, batch_size=2)
    results = []
    for pack in (True, False):
        lora = MultiLoRA(tiny.model, 3, SPEC)
        jobs = []
        for slot, texts in enumerate(TEXTS):
            lora.reset(slot, 100 + slot)
            jobs.append(AdapterJob(slot, [text_example(tok, t, 64) for t in texts], 100 + slot, hp))
        stats = train_adapters(tiny.model, lora, jobs, tok.pad_token_id, pack=pack)
        results.append(([s.losses for s in stats], [lora.state(s) for s in range(3)]))
        lora.remove()
    assert tiny.model.config._attn_implementation != "seal_packed"  # restored
    (la, sa), (lb, sb) = results
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
    for a, b in zip(sa, sb, strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_pass_groups_cut_a_step_at_the_token_budget():
    """A step's adapters go into passes in order, each within the budget, each adapter whole,
    one that is over the budget alone in its pass."""
    from seal.training import pass_groups

    batches = {0: [([1] * 30, [True] * 30)], 1: [([1] * 50, [True] * 50)],
               2: [([1] * 10, [True] * 10), ([1] * 15, [True] * 15)], 3: [([1] * 90, [True] * 90)]}  # fmt: skip
    active = [0, 1, 2, 3]
    assert pass_groups(active, batches, None, True) == [[0, 1, 2, 3]]
    assert pass_groups(active, batches, 1000, True) == [[0, 1, 2, 3]]
    assert pass_groups(active, batches, 80, True) == [[0, 1], [2], [3]]
    assert pass_groups(active, batches, 105, True) == [[0, 1, 2], [3]]
    assert pass_groups(active, batches, 20, True) == [[0], [1], [2], [3]]
    # Unpacked, a pass costs its rows times the longest: 0 and 1 take 2 x 50 tokens.
    assert pass_groups(active, batches, 150, False) == [[0, 1], [2], [3]]
    assert pass_groups(active, batches, 150, True) == [[0, 1, 2], [3]]
    assert pass_groups(active, batches, 99, False) == [[0], [1], [2], [3]]


@pytest.mark.parametrize("pack", [True, False])
def test_a_step_cut_into_passes_trains_as_one_pass(tiny, pack):
    """`max_pass_tokens` below a step's tokens trains it in several passes and one optimizer
    step: the same losses and adapter weights as one pass."""
    tok = tiny.tokenizer
    hp = TrainHP(lr=5e-3, epochs=2, batch_size=2)
    results = []
    for budget in (None, 12):
        lora = MultiLoRA(tiny.model, 3, SPEC)
        jobs = []
        for slot, texts in enumerate(TEXTS):
            lora.reset(slot, 100 + slot)
            jobs.append(AdapterJob(slot, [text_example(tok, t, 64) for t in texts], 100 + slot, hp))
        stats = train_adapters(
            tiny.model, lora, jobs, tok.pad_token_id, pack=pack, max_pass_tokens=budget
        )
        results.append((stats, [lora.state(s) for s in range(3)]))
        lora.remove()
    (sa, wa), (sb, wb) = results
    torch.testing.assert_close([s.losses for s in sa], [s.losses for s in sb], rtol=1e-4, atol=1e-5)
    assert [(s.steps, s.tokens, s.input_tokens) for s in sa] == [
        (s.steps, s.tokens, s.input_tokens) for s in sb
    ]
    for a, b in zip(wa, wb, strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_bf16_cpu_training_takes_the_dense_route_and_trains_as_runs(tiny, monkeypatch):
    """In bf16 on a CPU with AMX, packed passes train every slot at once (`_DenseLoRA`): the
    losses and adapter weights of the run-by-run route, to bf16 rounding."""
    import copy

    from seal import lora as lora_mod

    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    tok = tiny.tokenizer
    hp = TrainHP(lr=5e-3, epochs=2, batch_size=1)
    calls = {"dense": 0}
    dense_apply = lora_mod._DenseLoRA.apply

    def counted(*args):
        calls["dense"] += 1
        return dense_apply(*args)

    results = []
    for dense in (True, False):
        with monkeypatch.context() as m:
            m.setattr(lora_mod._DenseLoRA, "apply", counted)
            m.setattr(lora_mod, "DENSE_DTYPES", (torch.bfloat16,) if dense else ())
            lora = MultiLoRA(model, 3, SPEC)
            jobs = []
            for slot, texts in enumerate(TEXTS):
                lora.reset(slot, 100 + slot)
                examples = [text_example(tok, t, 64) for t in texts]
                jobs.append(AdapterJob(slot, examples, 100 + slot, hp))
            stats = train_adapters(model, lora, jobs, tok.pad_token_id, pack=True)
            results.append(([s.losses for s in stats], [lora.state(s) for s in range(3)]))
            lora.remove()
        if dense:
            assert calls["dense"] > 0
            calls["dense"] = 0
    assert calls["dense"] == 0
    (la, sa), (lb, sb) = results
    torch.testing.assert_close(la, lb, rtol=2e-2, atol=2e-2)
    for a, b in zip(sa, sb, strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=5e-2, atol=5e-3)


def test_bf16_cpu_prefill_through_the_dense_route_equals_runs(tiny, monkeypatch):
    """A bf16 prefill too long for the read-only route takes the dense one, with the copies
    cast for generation: the logits of the run-by-run route, to bf16 rounding."""
    import copy

    from seal import lora as lora_mod

    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    lora = MultiLoRA(model, 3, SPEC)
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            for _, _, m in lora.modules:
                m.lora_A.normal_(std=0.1)
                m.lora_B.normal_(std=0.1)
        ids = torch.randint(5, 200, (3, 6))
        monkeypatch.setattr(lora_mod, "DENSE_MAX", 0)  # not the few-token route
        logits = []

        def not_runs(*_args):
            raise AssertionError("runs taken instead of the dense route")

        for dense in (True, False):
            with monkeypatch.context() as m:
                m.setattr(lora_mod, "DENSE_DTYPES", (torch.bfloat16,) if dense else ())
                if dense:
                    m.setattr(lora_mod._RunLoRA, "apply", not_runs)
                with lora.frozen(), lora.route([2, 0, 2]), torch.no_grad():
                    logits.append(model(input_ids=ids).logits.float())
        torch.testing.assert_close(logits[0], logits[1], rtol=3e-2, atol=3e-2)
    finally:
        lora.remove()


def test_gpu_layout_gives_each_adapter_one_block(tiny, monkeypatch):
    """Unpacked (the default on a GPU), each pass has one row per sequence and the padding
    goes through its row's adapter, so every LoRA layer takes the reshape-and-bmm route
    (no gathers); training equals the packed CPU layout."""
    from seal import lora as lora_mod

    tok = tiny.tokenizer
    hp = TrainHP(lr=5e-3, epochs=2, batch_size=1)
    results, contiguous = [], []
    real_init = lora_mod._Route.__init__

    def spy(self, *a, **kw):
        real_init(self, *a, **kw)
        contiguous.append(self.contiguous)

    for gpu in (False, True):
        if gpu:
            monkeypatch.setattr(lora_mod, "_is_cpu", lambda _device: False)
            monkeypatch.setattr(lora_mod._Route, "__init__", spy)
        lora = MultiLoRA(tiny.model, 3, SPEC)
        jobs = []
        for slot, texts in enumerate(TEXTS):
            lora.reset(slot, 100 + slot)
            jobs.append(AdapterJob(slot, [text_example(tok, t, 64) for t in texts], 100 + slot, hp))
        stats = train_adapters(tiny.model, lora, jobs, tok.pad_token_id, pack=not gpu)
        results.append(([s.losses for s in stats], [lora.state(s) for s in range(3)]))
        lora.remove()
    assert contiguous and all(contiguous)
    (la, sa), (lb, sb) = results
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
    for a, b in zip(sa, sb, strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_checkpointed_training_equals_plain(tiny):
    """Activation checkpointing recomputes each layer in the backward pass with the same
    adapter routing: same losses and adapter weights as keeping the activations; the
    layers are restored afterwards."""
    from dataclasses import replace

    from seal.training import supports_packing

    supports_packing(tiny.model)  # its own forward passes, once per model, out of the count
    results, calls = [], []
    mlp = tiny.model.model.layers[0].mlp
    for checkpoint in (True, False):
        hp = replace(TrainHP(lr=5e-3, epochs=2, batch_size=2), checkpoint=checkpoint)
        n = [0]
        hook = mlp.register_forward_pre_hook(lambda *_, n=n: n.__setitem__(0, n[0] + 1))
        try:
            lora, stats = _train(tiny, TEXTS, 3, hp)
        finally:
            hook.remove()
        calls.append(n[0])
        results.append(([s.losses for s in stats], [lora.state(s) for s in range(3)]))
        lora.remove()
    assert calls[0] == 2 * calls[1] > 0  # recomputed in the backward pass
    (la, sa), (lb, sb) = results
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    for a, b in zip(sa, sb, strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert all("forward" not in vars(layer) for layer in tiny.model.model.layers)


def test_checkpointing_needs_a_layer_stack():
    from seal.training import decoder_layers

    with pytest.raises(ValueError, match="no list of decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_linear_cross_entropy_equals_torch():
    """The chunked cross-entropy of a frozen head: same per-token losses and the same gradient
    with respect to the hidden states as F.cross_entropy on the full logits, chunk sizes that
    do and do not divide the tokens."""
    import torch.nn.functional as F

    from seal.training import linear_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    targets = torch.randint(0, 50, (13,))
    weights = torch.rand(13)  # an uneven incoming gradient, as per-adapter means give
    h0 = torch.randn(13, 16)
    h_ref = h0.clone().requires_grad_(True)
    ref = F.cross_entropy(head(h_ref), targets, reduction="none")
    (ref * weights).sum().backward()
    for chunk_rows in (1, 4, 13, 64):
        h = h0.clone().requires_grad_(True)
        got = linear_cross_entropy(h, head, targets, chunk_bytes=chunk_rows * 4 * 50)
        (got * weights).sum().backward()
        torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_workspace_reused(dtype):
    """A workspace kept across calls (as train_adapters keeps one across its passes) gives the
    losses and gradients of fresh buffers, bit for bit, whatever the calls' token counts; its
    buffers grow when a call needs more rows and are reused, not remade, otherwise."""
    from seal.training import CEWorkspace, linear_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False).to(dtype)
    ws = CEWorkspace()
    chunk_bytes = 8 * 4 * 50  # 8 rows a chunk
    seen = []
    for n in (5, 3, 13, 7, 13):
        targets = torch.randint(0, 50, (n,))
        h0 = torch.randn(n, 16, dtype=dtype)
        out = []
        for workspace in (None, ws):
            h = h0.clone().requires_grad_(True)
            loss = linear_cross_entropy(h, head, targets, chunk_bytes, workspace=workspace)
            loss.sum().backward()
            out.append((loss.detach(), h.grad))
        assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
        seen.append(ws._raw.data_ptr())
    assert ws._raw.shape[0] == 8  # grew from 5 rows to a whole chunk, never beyond
    assert seen[3] == seen[2] and seen[4] == seen[2]  # no new buffer once big enough
