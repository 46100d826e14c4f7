"""The batched multi-adapter LoRA: K adapters trained together equal each trained alone."""

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
