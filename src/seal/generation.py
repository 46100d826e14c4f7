"""Batched generation, optionally with a different LoRA adapter per batch row.

The K adapted models of an inner-loop batch answer their questions in one batched `generate`
call: row i runs through adapter rows[i] (-1: the bare base model)."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from seal.lora import MultiLoRA


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    # Greedy decoding of a row left alone in its batch drafts up to this many tokens by
    # prompt lookup and checks them in one forward pass (0: one token per pass; see
    # `_decode_alone`). Ignored when sampling.
    lookup_tokens: int = 10


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


class _PerRowSampler:
    """Samples each row with its own torch.Generator (temperature, then nucleus top-p). A row's
    draws then depend on its own seed only, not on what else is in the batch or on the global
    RNG."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.gens = [torch.Generator().manual_seed(int(s) & 0x7FFF_FFFF_FFFF_FFFF) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, scores: torch.Tensor, live: list[int]) -> torch.Tensor:
        """The next token of each live row (`live[r]`: which generator row r of `scores` uses)."""
        probs = torch.softmax(scores.float() / self.temperature, dim=-1).cpu()
        choice = torch.empty(len(live), dtype=torch.long)
        for r, g in enumerate(live):
            choice[r] = torch.multinomial(_top_p(probs[r], self.top_p), 1, generator=self.gens[g])
        return choice.to(scores.device)


def _top_p(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of the most likely tokens whose mass reaches `top_p`."""
    if top_p >= 1.0:
        return p
    sp, si = torch.sort(p, descending=True)
    keep = torch.cumsum(sp, 0) - sp < top_p
    return torch.zeros_like(p).scatter_(0, si[keep], sp[keep])


class _GrowingLayer(DynamicLayer):
    """A KV-cache layer that appends into a preallocated buffer (doubled when full) instead of
    `torch.cat`-ing the whole cache at every step, and drops finished rows on request."""

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self._len, self._k, self._v = 0, None, None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self._len + key_states.shape[-2]
        if self._k is None or end > self._k.shape[-2]:
            cap = max(end, 2 * (0 if self._k is None else self._k.shape[-2]), 64)
            k = key_states.new_empty(*key_states.shape[:-2], cap, key_states.shape[-1])
            v = value_states.new_empty(*value_states.shape[:-2], cap, value_states.shape[-1])
            if self._len:
                k[..., : self._len, :] = self._k[..., : self._len, :]
                v[..., : self._len, :] = self._v[..., : self._len, :]
            self._k, self._v = k, v
        self._k[..., self._len : end, :] = key_states
        self._v[..., self._len : end, :] = value_states
        self._len = end
        self.keys, self.values = self._k[..., :end, :], self._v[..., :end, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._len if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length():
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[..., : self._len, :], self._v[..., : self._len, :]

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("use batch_select_indices")

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last |tokens_to_remove| positions (DynamicLayer.crop's convention); the
        buffer stays, to be written over by the next positions."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes the negative number of positions to remove")
        if self.is_initialized and tokens_to_remove:
            self._len = max(0, self._len + tokens_to_remove)
            self.keys, self.values = self._k[..., : self._len, :], self._v[..., : self._len, :]


def _new_cache(model) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    cache.layers = [_GrowingLayer() if type(x) is DynamicLayer else x for x in cache.layers]
    return cache


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
    token. Sampling is reproducible under `seed`; with `row_seeds`, each row samples from its
    own generator, so its completion does not depend on the other rows' draws (only, through
    float rounding, on what it is batched with).

    Written by hand rather than with `model.generate` for what an inner loop pays for: rows
    with the same prompt and adapter (n samples of one self-edit prompt) share one prefill; a
    row that has stopped leaves the batch (its KV cache rows are dropped) instead of decoding
    padding until the longest row ends; the KV cache grows in place instead of being
    concatenated at every step; the vocabulary projection runs on the last position only; a
    prefix all prompts share runs once per adapter (`_prefill`); and in greedy decoding a row
    left alone checks prompt-lookup drafts, several tokens a pass (`_decode_alone`)."""
    if rows is not None and lora is None:
        raise ValueError("rows given without a MultiLoRA")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    device = next(model.parameters()).device
    stops = torch.tensor(stop_token_ids(tokenizer), dtype=torch.long, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    sampler = None
    if params.do_sample and row_seeds is not None:
        sampler = _PerRowSampler(row_seeds, params.temperature, params.top_p)
    # Longest first, so each batch pads little; equal prompts stay side by side.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    rng_ctx = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    frozen = lora.frozen() if lora is not None else contextlib.nullcontext()
    with rng_ctx, frozen, contiguous_head_input(model):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if rows is not None:  # one adapter's rows side by side: long runs (see lora.py)
                idx = sorted(idx, key=lambda i: rows[i])
            batch_rows = [rows[i] for i in idx] if rows is not None else None
            for i, toks in zip(
                idx,
                _decode_batch(
                    model, prompts, idx, batch_rows, lora, params, stops, sampler, device
                ),
                strict=True,
            ):
                out[i] = toks
    return out


def _decode_batch(model, prompts, idx, batch_rows, lora, params, stops, sampler, device):
    """New tokens for prompts[idx] (one batch), stop token excluded."""
    # One prefill per distinct (prompt, adapter); rows are expanded from it.
    keys = [(tuple(prompts[i]), batch_rows[r] if batch_rows else -1) for r, i in enumerate(idx)]
    uniq: dict[tuple, int] = {}
    firsts: list[int] = []  # the prompt index of each distinct key
    expand = []
    for k, i in zip(keys, idx, strict=True):
        if k not in uniq:
            uniq[k] = len(firsts)
            firsts.append(i)
        expand.append(uniq[k])
    cache = _new_cache(model)
    cache_arg = {_cache_kwarg(model): cache}
    route_rows = [k[1] for k in uniq] if batch_rows else None
    logits, att = _prefill(model, [prompts[i] for i in firsts], route_rows, lora, cache_arg, device)
    sel = torch.tensor(expand, dtype=torch.long, device=device)
    if len(uniq) < len(idx):
        cache.batch_select_indices(sel)
    logits, att = logits[sel], att[sel]
    live = list(range(len(idx)))  # batch row -> place in idx
    live_rows = batch_rows
    new: list[list[int]] = [[] for _ in idx]
    lookup = (
        params.lookup_tokens > 0
        and not params.do_sample
        and all(isinstance(x, _GrowingLayer) for x in cache.layers)
    )
    for step in range(params.max_new_tokens):
        tok = _next_tokens(logits, params, sampler, [idx[r] for r in live])
        done = torch.isin(tok, stops)
        for r, t, d in zip(live, tok.tolist(), done.tolist(), strict=True):
            if not d:
                new[r].append(t)
        if step == params.max_new_tokens - 1:
            break
        keep = (~done).nonzero().flatten()
        if len(keep) == 0:
            break
        if len(keep) < len(live):  # finished rows leave the batch
            keep_l = keep.tolist()
            cache.batch_select_indices(keep)
            tok, att = tok[keep], att[keep]
            live = [live[k] for k in keep_l]
            live_rows = [live_rows[k] for k in keep_l] if live_rows else None
        if lookup and len(live) == 1:
            r = live[0]
            new[r] += _decode_alone(
                model,
                cache_arg,
                int(tok[0]),
                att,
                prompts[idx[r]] + new[r],
                params.max_new_tokens - len(new[r]),
                set(stops.tolist()),
                params.lookup_tokens,
                lora,
                live_rows,
            )
            break
        att = torch.cat([att, att.new_ones(len(live), 1)], dim=1)
        with _route(lora, live_rows):
            logits = model(
                input_ids=tok[:, None],
                attention_mask=att,
                position_ids=att.sum(1, keepdim=True) - 1,
                **cache_arg,
                use_cache=True,
            ).logits[:, -1]
    return new


# A batch's prompts share their first tokens (the chat template, the instruction) when at
# least this many: those are run once per adapter, not once per prompt (see `_prefill`).
SHARED_PREFIX_MIN = 8


def _prefill(model, prompts, route_rows, lora, cache_arg, device):
    """Runs `prompts` (row r through adapter route_rows[r]) into the cache of `cache_arg`
    (the model's cache keyword and the cache); returns the logits of each prompt's last
    position and the attention mask over the cache.

    The inner loop's answer prompts share a long prefix (the chat template and the
    instruction: ~45 of SmolLM2's ~65 tokens). That prefix is run once per distinct adapter,
    its cache rows copied to every prompt, and only the rest of each prompt is run after it,
    padded in the middle ([prefix][padding][rest], masked), so a batch of 35 prompts over 8
    adapters runs ~900 tokens instead of ~2,400. The same tokens as one pass over whole
    prompts, up to float rounding."""
    n = min(map(len, prompts))
    shared = 0
    while shared < n - 1 and all(p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    slots = list(dict.fromkeys(route_rows)) if route_rows else [-1]
    if shared >= SHARED_PREFIX_MIN and len(slots) < len(prompts):
        pre = torch.tensor([prompts[0][:shared]] * len(slots), dtype=torch.long, device=device)
        with _route(lora, slots if route_rows else None):
            model(input_ids=pre, **cache_arg, use_cache=True, logits_to_keep=1)
        where = [slots.index(s) for s in route_rows] if route_rows else [0] * len(prompts)
        (cache,) = cache_arg.values()
        cache.batch_select_indices(torch.tensor(where, dtype=torch.long, device=device))
        rests = [p[shared:] for p in prompts]
    else:
        shared, rests = 0, prompts
    width = max(map(len, rests))
    ids = torch.zeros((len(rests), width), dtype=torch.long)
    att = torch.zeros((len(rests), shared + width), dtype=torch.long)
    att[:, :shared] = 1
    for r, rest in enumerate(rests):
        ids[r, width - len(rest) :] = torch.tensor(rest)
        att[r, shared + width - len(rest) :] = 1
    ids, att = ids.to(device), att.to(device)
    with _route(lora, route_rows):
        logits = model(
            input_ids=ids,
            attention_mask=att,
            position_ids=(att.cumsum(1) - 1).clamp(min=0)[:, shared:],
            **cache_arg,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
    return logits, att


def _draft(history: list[int], n: int, longest_ngram: int = 3) -> list[int]:
    """Prompt lookup: `n` tokens guessed to follow `history`, from the latest earlier
    occurrence of its last 3 (else 2, else 1) tokens: the tokens that followed it, repeated
    with its distance from the end if they run into the present (a loop of period d goes
    on repeating its last d tokens); none if no such occurrence."""
    end = len(history)
    for g in range(min(longest_ngram, end - 1), 0, -1):
        tail = history[end - g :]
        for s in range(end - g - 1, -1, -1):
            if history[s : s + g] == tail:
                d = end - g - s  # distance back to the occurrence
                return [history[s + g + i % d] for i in range(n)]
    return []


def _decode_alone(model, cache_arg, tok, att, history, budget, stops, n_draft, lora, rows):
    """Greedy decoding of the one row left in its batch, `tok` its last token (not yet in
    the cache): up to `budget` more tokens, stop token excluded.

    A row left alone pays a whole forward pass per token, which on a CPU streams every weight
    of the model for one token; and the rows still running at the end of a batch are mostly
    the small models' loops ("... in Corwen Ashlake House in Corwen Ashlake House ..."). So
    each pass also checks a draft, the tokens that followed the last occurrence of the
    row's latest n-gram (prompt lookup decoding, as transformers' `prompt_lookup_num_tokens`):
    the pass's greedy choice at each drafted position accepts the draft up to its first
    miss, and the cache is cut back to what was accepted. Greedy tokens as one token a pass
    would give, up to float rounding (a pass over several positions may round differently)."""
    out: list[int] = []
    device = att.device
    (cache,) = cache_arg.values()
    while budget > 0:
        draft = _draft(history, min(n_draft, budget - 1))
        ids = torch.tensor([[tok, *draft]], dtype=torch.long, device=device)
        n = ids.shape[1]
        pos = att.sum(1, keepdim=True) + torch.arange(n, device=device)
        att = torch.cat([att, att.new_ones(1, n)], dim=1)
        with _route(lora, rows):
            logits = model(
                input_ids=ids,
                attention_mask=att,
                position_ids=pos,
                **cache_arg,
                use_cache=True,
            ).logits[0]
        pred = logits.argmax(-1).tolist()
        a = 0
        while a < len(draft) and draft[a] == pred[a]:
            a += 1
        if a < len(draft):  # the cache keeps tok and the accepted drafts only
            for layer in cache.layers:
                layer.crop(a - len(draft))
            att = att[:, : att.shape[1] - (len(draft) - a)]
        for t in [*draft[:a], pred[a]]:
            if t in stops:
                return out
            out.append(t)
            history.append(t)
            budget -= 1
        tok = pred[a]
    return out


@contextlib.contextmanager
def contiguous_head_input(model):
    """Within the block, the vocabulary projection gets a contiguous input.

    The prefill asks for the last position's logits only (`logits_to_keep=1`), and the model
    slices its hidden states to a non-contiguous [rows, 1, d] view. torch 2.13 multiplies
    such a view by the [vocab, d] head as a batched matmul over the weight broadcast to every
    row: on a CPU, 38 rows of SmolLM2 took 2.5 s in bf16 (112 ms in fp32) against 5.6 ms
    (14 ms) for a contiguous copy of the view (docs/benchmarks.md)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(
        lambda _m, args: (args[0].contiguous(), *args[1:]) if args else None
    )
    try:
        yield
    finally:
        handle.remove()


def _cache_kwarg(model) -> str:
    """The forward argument that takes the KV cache: `cache` in recent transformers (which
    deprecates `past_key_values`), `past_key_values` before."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _route(lora, rows):
    return lora.route(rows) if lora is not None and rows is not None else contextlib.nullcontext()


def _next_tokens(logits, params: SamplingParams, sampler, live: list[int]) -> torch.Tensor:
    if sampler is not None:
        return sampler(logits, live)
    if not params.do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        probs = torch.stack([_top_p(p, params.top_p) for p in probs])
    return torch.multinomial(probs, 1).flatten()


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
