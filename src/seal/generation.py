"""Batched generation, optionally with a different LoRA adapter per batch row.

The K adapted models of an inner-loop batch answer their questions in one batched `generate`
call: row i runs through adapter rows[i] (-1: the bare base model)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from seal.lora import MultiLoRA


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the chat end-of-turn token where the tokenizer has one."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(ids)


class _PerRowSampler(LogitsProcessor):
    """Samples each row with its own torch.Generator (temperature, then nucleus top-p) and
    returns scores that make greedy decoding pick that token. A row's draws then depend on its
    own seed only, not on what else is in the batch or on the global RNG."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.gens = [torch.Generator().manual_seed(int(s) & 0x7FFF_FFFF_FFFF_FFFF) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
        probs = torch.softmax(scores.float() / self.temperature, dim=-1).cpu()
        choice = torch.empty(len(self.gens), dtype=torch.long)
        for r, gen in enumerate(self.gens):
            p = probs[r]
            if self.top_p < 1.0:
                sp, si = torch.sort(p, descending=True)
                keep = torch.cumsum(sp, 0) - sp < self.top_p  # smallest set reaching top_p
                p = torch.zeros_like(p).scatter_(0, si[keep], sp[keep])
            choice[r] = torch.multinomial(p, 1, generator=gen)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(choice)), choice.to(scores.device)] = 0.0
        return out


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    params: SamplingParams,
    rows: list[int] | None = None,
    lora: MultiLoRA | None = None,
    batch_size: int = 32,
    seed: int | None = None,
    row_seeds: list[int] | None = None,
) -> list[list[int]]:
    """Complete each tokenised prompt; returns the new tokens of each, cut at the first stop
    token. Prompts are left-padded per batch; sampling is reproducible under `seed`. With
    `row_seeds`, each row samples from its own generator, so its completion does not depend on
    the other rows' draws (only, through float rounding, on what it is batched with)."""
    if rows is not None and lora is None:
        raise ValueError("rows given without a MultiLoRA")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = stop_token_ids(tokenizer)
    out: list[list[int]] = [[] for _ in prompts]
    # Longest first, so each batch pads little.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    gen_kwargs = dict(
        max_new_tokens=params.max_new_tokens,
        do_sample=params.do_sample,
        pad_token_id=pad,
        eos_token_id=stops,
    )
    per_row = params.do_sample and row_seeds is not None
    if per_row:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    elif params.do_sample:
        gen_kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    rng_ctx = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with rng_ctx:
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                p = prompts[i]
                ids[r, width - len(p) :] = torch.tensor(p)
                att[r, width - len(p) :] = 1
            batch_rows = [rows[i] for i in idx] if rows is not None else None
            ctx = lora.route(batch_rows) if lora is not None else contextlib.nullcontext()
            extra = {}
            if per_row:
                from transformers import LogitsProcessorList

                sampler = _PerRowSampler(
                    [row_seeds[i] for i in idx], params.temperature, params.top_p
                )
                extra["logits_processor"] = LogitsProcessorList([sampler])
            with ctx:
                res = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=att.to(device),
                    **gen_kwargs,
                    **extra,
                )
            for r, i in enumerate(idx):
                new = res[r, width:].tolist()
                for k, t in enumerate(new):
                    if t in stops:
                        new = new[:k]
                        break
                out[i] = new
    return out


def decode(tokenizer, seqs: list[list[int]]) -> list[str]:
    return [tokenizer.decode(s, skip_special_tokens=True).strip() for s in seqs]


def sample_completions(
    model,
    tokenizer,
    prompt_texts: list[str],
    n: int,
    params: SamplingParams,
    seed: int,
    batch_size: int = 16,
) -> list[list[str]]:
    """`n` sampled completions of each prompt text, all prompts batched together. Sample j of
    prompt i draws from its own generator, seeded by (seed + i, j): the same call always gives
    the same self-edits, and prompt i's do not depend on the others' draws."""
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompt_texts]
    flat = [p for p in prompts for _ in range(n)]
    seeds = [(seed + i) * 1_000_003 + j for i in range(len(prompts)) for j in range(n)]
    seqs = generate(model, tokenizer, flat, params, batch_size=batch_size, row_seeds=seeds)
    texts = decode(tokenizer, seqs)
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]
