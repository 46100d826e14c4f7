"""The inner loop on the tiny model: base weights untouched, base answers cached, CPT jobs."""

import torch

from seal.domains.knowledge import PROMPTS, training_texts
from seal.inner_loop import InnerLoop, InnerLoopConfig, KnowledgeJob

CFG = InnerLoopConfig(r=4, alpha=8, epochs=2, lr=1e-2, max_new_tokens=8, capacity=3)


def test_inner_loop_leaves_base_weights_bit_identical(tiny, demo_eval):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    inner = InnerLoop(tiny, CFG)
    p = demo_eval[0]
    texts = training_texts(p, ["1. An implication.\n2. Another one."], PROMPTS["implications"])
    res = inner.run([KnowledgeJob("a", [p], texts, seed=1), KnowledgeJob("b", [p], [], seed=1)])
    inner.close()
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert res[0].n_sequences == 3 and len(res[0].losses) == 2 * 3
    assert len(res[0].answers) == len(p.questions) == len(res[0].grades)
    assert res[1].losses == [] and res[1].train_tokens == 0
    assert res[0].reward is not None


def test_base_answers_computed_once(tiny, demo_eval, monkeypatch):
    inner = InnerLoop(tiny, CFG)
    calls = []
    real = inner._answer

    def counting(prompts, rows):
        calls.append(len(prompts))
        return real(prompts, rows)

    monkeypatch.setattr(inner, "_answer", counting)
    jobs = [KnowledgeJob(f"base{i}", [demo_eval[0]], [], seed=i) for i in range(3)]
    inner.run(jobs)
    inner.run(jobs[:1])
    inner.close()
    assert calls == [len(demo_eval[0].questions)]


def test_more_jobs_than_capacity_and_cpt(tiny, demo_eval):
    inner = InnerLoop(tiny, CFG)
    ps = demo_eval[:4]
    jobs = [
        KnowledgeJob(f"p{i}", [p], training_texts(p, [], PROMPTS["none"]), seed=i)
        for i, p in enumerate(ps)
    ]
    cpt = KnowledgeJob("cpt", ps, [t for p in ps for t in training_texts(p, [], PROMPTS["none"])])
    res = inner.run(jobs + [cpt])
    inner.close()
    assert [r.key for r in res] == ["p0", "p1", "p2", "p3", "cpt"]
    assert len(res[-1].answers) == sum(len(p.questions) for p in ps)


def test_same_seed_same_result(tiny, demo_eval):
    p = demo_eval[1]
    texts = training_texts(p, [], PROMPTS["none"])
    a = InnerLoop(tiny, CFG)
    r1 = a.run([KnowledgeJob("x", [p], texts, seed=5)])[0]
    a.close()
    b = InnerLoop(tiny, CFG)
    r2 = b.run([KnowledgeJob("y", [p], texts, seed=5), KnowledgeJob("z", [p], texts, seed=6)])[0]
    b.close()
    assert r1.answers == r2.answers
    torch.testing.assert_close(r1.losses, r2.losses)


def test_auto_capacity_counts_checkpointed_activations(tiny, monkeypatch):
    """With activation checkpointing a row keeps only each layer's input, so more adapters
    fit in the same memory; the limit still caps the count."""
    from seal import inner_loop
    from seal.inner_loop import auto_capacity
    from seal.lora import LoRASpec

    monkeypatch.setattr(inner_loop, "available_memory_bytes", lambda _device: 1 << 30)
    # A GPU's count (a row per adapter; the device itself is never touched here), where the
    # activations weigh most.
    spec, dev = LoRASpec(r=8, alpha=16), torch.device("cuda")
    plain = auto_capacity(tiny.model, spec, 2048, dev, limit=1000)
    ckpt = auto_capacity(tiny.model, spec, 2048, dev, limit=1000, checkpoint=True)
    assert 1 <= plain < ckpt
    assert auto_capacity(tiny.model, spec, 2048, dev, limit=2, checkpoint=True) == 2
    # A worker of two on one machine (executors.ProcessExecutor) sizes from half the memory.
    monkeypatch.setenv("SEAL_MEMORY_SHARE", "0.5")
    half = auto_capacity(tiny.model, spec, 2048, dev, limit=1000)
    assert 1 <= half < plain


def test_auto_capacity_counts_a_cpu_pass_once(tiny, monkeypatch):
    """On a CPU, where train_adapters cuts a step into passes that fit, one pass's
    activations are counted whatever the number of adapters (a GPU counts a row per
    adapter): more adapters fit, and the passes get what the adapters leave."""
    from seal import inner_loop
    from seal.inner_loop import InnerLoop, auto_capacity, pass_token_budget
    from seal.lora import LoRASpec

    monkeypatch.setattr(inner_loop, "available_memory_bytes", lambda _device: 1 << 30)
    spec, cpu, gpu = LoRASpec(r=8, alpha=16), torch.device("cpu"), torch.device("cuda")
    per_row = auto_capacity(tiny.model, spec, 512, gpu, limit=10**6)
    per_pass = auto_capacity(tiny.model, spec, 512, cpu, limit=10**6)
    assert 1 <= per_row < per_pass
    assert pass_token_budget(tiny.model, spec, per_pass, 512, gpu) is None
    # The most adapters that fit leave a pass of max_tokens at least; fewer leave more.
    full = pass_token_budget(tiny.model, spec, per_pass, 512, cpu)
    assert 512 <= full < pass_token_budget(tiny.model, spec, per_pass // 2, 512, cpu)
    assert pass_token_budget(tiny.model, spec, 10 * per_pass, 512, cpu) == 512
    loop = InnerLoop(tiny, CFG)
    expect = pass_token_budget(tiny.model, CFG.lora_spec(), loop.capacity, 512, cpu)
    assert loop.pass_tokens == expect
    loop.close()


def test_checkpointed_inner_loop_gives_the_same_result(tiny, demo_eval):
    """`inner_loop.checkpoint` reaches the trainer and changes memory, not results."""
    from dataclasses import replace

    p = demo_eval[0]
    texts = training_texts(p, ["1. An implication.\n2. Another one."], PROMPTS["implications"])
    out = []
    for checkpoint in (False, True):
        cfg = replace(CFG, checkpoint=checkpoint)
        assert cfg.train_hp().checkpoint is checkpoint
        inner = InnerLoop(tiny, cfg)
        try:
            out.append(inner.run([KnowledgeJob("a", [p], texts, seed=1)])[0])
        finally:
            inner.close()
    plain, ckpt = out
    torch.testing.assert_close(plain.losses, ckpt.losses, rtol=1e-5, atol=1e-6)
    assert plain.answers == ckpt.answers


def test_jobs_with_as_many_sequences_share_a_chunk(tiny, demo_eval, monkeypatch):
    """Chunks are cut from the jobs ordered by training sequences (so a chunk's adapters
    finish together); results come back in job order, each as it would be alone."""
    from seal.executors import chunks_of_similar_cost

    assert chunks_of_similar_cost([3, 1, 2, 1, 3], 2) == [[1, 3], [2, 0], [4]]
    p = demo_eval[0]
    edits = ["1. One.", "1. One.\n2. Two.\n3. Three.", "1. One.\n2. Two."]
    jobs = [
        KnowledgeJob(f"j{i}", [p], training_texts(p, [e], PROMPTS["implications"]), seed=i)
        for i, e in enumerate(edits + edits[:1])
    ]
    inner = InnerLoop(tiny, InnerLoopConfig(**{**CFG.__dict__, "capacity": 2}))
    chunks = []
    real = inner._run_chunk
    monkeypatch.setattr(
        inner, "_run_chunk", lambda js: chunks.append([j.key for j in js]) or real(js)
    )
    res = inner.run(jobs)
    inner.close()
    assert chunks == [["j0", "j3"], ["j2", "j1"]]
    assert [r.key for r in res] == ["j0", "j1", "j2", "j3"]
    alone = InnerLoop(tiny, CFG)
    solo = alone.run(jobs[1:2])[0]
    alone.close()
    assert res[1].answers == solo.answers
    torch.testing.assert_close(res[1].losses, solo.losses)
