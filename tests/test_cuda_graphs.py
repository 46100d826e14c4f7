"""Graphed training's static passes (cuda_graphs.py), run eagerly on the CPU: the same losses,
adapter weights and token counts as `training.train_adapters`, slots without a job untouched,
and the same again when the cached optimizer and passes are reused."""

import pytest
import torch

from seal.cuda_graphs import train_adapters_graphed
from seal.lora import LoRASpec, MultiLoRA
from seal.training import AdapterJob, TrainHP, text_example, train_adapters

TEXTS = [
    ["Alpha beta gamma delta.", "The Varrow lighthouse was built in 1843.", "A third line."],
    ["Some other text about a river called Pell.", "x y z"],
    ["Third job, one line only"],
]
SPEC = LoRASpec(r=4, alpha=8)


def _run(tiny, trainer, hp, slots, lora=None, seed0=100):
    tok = tiny.tokenizer
    lora = lora or MultiLoRA(tiny.model, 4, SPEC)
    jobs = []
    for slot, texts in zip(slots, TEXTS, strict=True):
        lora.reset(slot, seed0 + slot)
        jobs.append(AdapterJob(slot, [text_example(tok, t, 64) for t in texts], seed0 + slot, hp))
    stats = trainer(tiny.model, lora, jobs, tok.pad_token_id)
    return lora, stats


@pytest.mark.parametrize("batch_size", [1, 2])
def test_static_passes_train_as_train_adapters(tiny, batch_size):
    hp = TrainHP(lr=5e-3, epochs=3, batch_size=batch_size, warmup_ratio=0.2)
    slots = [2, 0, 3]  # slot 1 has no job: it must come back as it was

    def graphed(*a):
        return train_adapters_graphed(*a, bucket=16, capture=False)

    ref, ref_stats = _run(tiny, train_adapters, hp, slots)
    ref_states = [ref.state(s) for s in range(4)]
    ref.remove()
    lora = MultiLoRA(tiny.model, 4, SPEC)
    with torch.no_grad():
        lora.reset(1, 7)
    before = lora.state(1)
    try:
        for _ in range(2):  # the second call reuses the cached optimizer and passes
            lora, stats = _run(tiny, graphed, hp, slots, lora=lora)
            for a, b in zip(ref_stats, stats, strict=True):
                torch.testing.assert_close(a.losses, b.losses, rtol=1e-4, atol=1e-5)
                assert (a.steps, a.tokens, a.input_tokens, a.attention_pairs) == (
                    b.steps, b.tokens, b.input_tokens, b.attention_pairs
                )  # fmt: skip
            for s in slots:
                for k, v in lora.state(s).items():
                    torch.testing.assert_close(v, ref_states[s][k], rtol=1e-4, atol=1e-5)
            for k, v in lora.state(1).items():
                assert torch.equal(v, before[k])
    finally:
        lora.remove()


def test_graphed_training_refuses_what_it_cannot_do(tiny):
    from dataclasses import replace

    hp = replace(TrainHP(epochs=1), checkpoint=True)
    lora = MultiLoRA(tiny.model, 4, SPEC)
    try:
        with pytest.raises(ValueError, match="checkpoint"):
            _run(tiny, lambda *a: train_adapters_graphed(*a, capture=False), hp, [0, 1, 2], lora)
    finally:
        lora.remove()


def test_cuda_graphs_flag_is_ignored_off_cuda(tiny):
    """`train_adapters(..., cuda_graphs=True)` on a CPU is the default trainer."""
    hp = TrainHP(lr=5e-3, epochs=2)
    a, sa = _run(tiny, train_adapters, hp, [0, 1, 2])
    a.remove()
    b, sb = _run(tiny, lambda *x: train_adapters(*x, cuda_graphs=True), hp, [0, 1, 2])
    b.remove()
    assert [s.losses for s in sa] == [s.losses for s in sb]


def test_failed_capture_falls_back_to_eager_passes(tiny):
    """A pass that cannot be captured (here: no CUDA at all) warns once and trains eagerly,
    with the results of the default trainer and nothing left of the failed attempt."""
    hp = TrainHP(lr=5e-3, epochs=2, batch_size=1)
    ref, ref_stats = _run(tiny, train_adapters, hp, [0, 1, 2])
    ref_states = [ref.state(s) for s in range(3)]
    ref.remove()

    def graphed(*a):
        return train_adapters_graphed(*a, bucket=16, capture=True)

    with pytest.warns(UserWarning, match="capture of a training pass failed") as caught:
        lora, stats = _run(tiny, graphed, hp, [0, 1, 2])
    try:
        assert len([w for w in caught if "capture" in str(w.message)]) == 1
        for a, b in zip(ref_stats, stats, strict=True):
            torch.testing.assert_close(a.losses, b.losses, rtol=1e-4, atol=1e-5)
        for s in range(3):
            for k, v in lora.state(s).items():
                torch.testing.assert_close(v, ref_states[s][k], rtol=1e-4, atol=1e-5)
    finally:
        lora.remove()


def test_why_not_graphed_names_what_static_passes_cannot_do():
    """What `train_adapters(..., cuda_graphs=True)` checks before it takes the graphed path
    (jobs that need checkpointing train eagerly instead)."""
    from dataclasses import replace

    from seal.cuda_graphs import why_not_graphed

    hp = replace(TrainHP(lr=5e-3, epochs=1), checkpoint=True)
    jobs = [AdapterJob(0, [], 0, hp)]
    assert "checkpoint" in why_not_graphed(jobs)
    assert why_not_graphed([AdapterJob(0, [], 0, TrainHP())]) is None
