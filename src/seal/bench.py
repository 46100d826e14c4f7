"""`seal bench`: inner-loop throughput, measured against the reference design.

Five ways to run the same inner loops (model, passages, self-edits, hyperparameters, initial
adapter weights), one after another:

  reference   (a) the paper's code's design with PEFT: a fresh PEFT model per self-edit,
              every sequence padded to `ref_pad` tokens (2,048 there), batch 1, one
              self-edit at a time, questions answered one at a time with the base model's
              answer recomputed for every self-edit (as the reference server does)
  sequential  (b) careful sequential code a user would write with PEFT and transformers:
              one PEFT model reused (its adapter re-initialised per self-edit), dynamic
              padding, torch AdamW, the passage's questions answered in one batched greedy
              `generate`; one self-edit at a time
  capacity1   seal's own engine with one adapter at a time (packing, the decode loop, the
              fused optimizer and cross-entropy): what batching adapters alone adds
  seal_inprocess
              the batched multi-adapter inner loop (capacity K) in this process
  seal        (c) the same on `workers` local worker processes (executors.ProcessExecutor;
              on a CPU one single-threaded worker per core, whose start-up is timed apart;
              on a GPU, or with workers=1, this process), each running its share of the
              self-edits K at a time

It prints self-edit evaluations per hour, the ratios c/a and c/b (and c/capacity1, and
c/seal_inprocess: what the worker processes add), the
post-adaptation accuracy of each with its 95% CI (speed must not change the result), the
model FLOPs utilisation of seal's training passes against a matmul peak measured in the same
run in the model's dtype (beside it, for scale, `frozen_base_mfu`: what PyTorch itself reaches
running the frozen base alone, no adapters, forward and back over passes of the same length),
peak RSS, and self-edit sampling tokens per second. The PEFT modes
keep the loss off the padding (the reference code's loss on padding is an accident that
changes results, not a cost).

On a CPU every mode runs in a fresh process of its own (`isolate`; seal's mode already runs
on fresh worker processes): in one process on glibc's malloc, a mode run after another was
measured 10-25% slower than in a fresh one (glibc's heap after seal's loop slows every
allocation; the `seal` command now runs on jemalloc, allocator.py, docs/benchmarks.md),
which flattered the ratios of whatever ran later. Each such process
loads the model before its mode's clock starts. With `repeats=R`, every mode but reference
(and ray) runs R times, the order reversed every other round, and reports its median round:
modes run minutes apart, and a shared machine's speed drifts by tens of percent over that,
which one round per mode puts straight into the ratios.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import time
from dataclasses import asdict, dataclass, replace

import torch

from seal import allocator, grading, stats
from seal.config import f, from_dict, to_dict
from seal.domains.knowledge import (
    PROMPTS,
    answer_prompt_text,
    demo_path,
    load_passages,
    load_teacher_self_edits,
    self_edit_prompt_text,
    training_texts,
)
from seal.executors import default_workers
from seal.generation import (
    SamplingParams,
    decode,
    generate,
    sample_completions,
    stop_token_ids,
)
from seal.inner_loop import InnerLoop, InnerLoopConfig, KnowledgeJob
from seal.lora import cpu_training_route, init_lora_a
from seal.models import DEFAULT_MODEL
from seal.training import text_example

MODES = ("reference", "sequential", "capacity1", "seal_inprocess", "seal")
SEAL_MODES = ("seal_inprocess", "seal")


@dataclass
class BenchConfig:
    """`seal bench` settings."""

    model: str = f(DEFAULT_MODEL, "model to benchmark")
    data: str = f("demo:eval", "passages")
    teacher: str = f("", "self-edits file (default: the demo teacher file for demo data)")
    n: int = f(
        16,
        "self-edits evaluated by every mode but reference (16: two CPU workers of 8 adapters)",
    )
    n_reference: int = f(2, "self-edits evaluated by the (slow) reference mode")
    modes: tuple[str, ...] = f(
        MODES,
        "which modes to run (of reference, sequential, capacity1, seal_inprocess, seal, ray)",
    )
    ref_pad: int = f(2048, "reference mode: pad every sequence to this many tokens")
    capacity: int = f(0, "seal mode: adapters at once (0 = from free memory)")
    sample_passages: int = f(2, "passages for the sampling-throughput figure (0 = skip)")
    time_limit: float = f(
        0,
        "seconds per mode: a mode stops after the self-edit (or adapter group) running when "
        "its time is up, and its figures are over the self-edits done (0 = no limit)",
    )
    repeats: int = f(
        1,
        "timed rounds of every mode but reference and ray, the order reversed every other "
        "round (sequential, seal, seal, sequential, ...): each mode reports its median round, "
        "so a machine whose speed drifts between modes skews the ratios less",
    )
    inner_loop: InnerLoopConfig = f(None, "inner-loop settings (defaults: the paper's)")
    device: str = f("auto", "auto, cpu or cuda")
    dtype: str = f("auto", "auto, bf16, fp16 or fp32")
    seed: int = f(0, "seed")
    workers: int = f(
        0,
        "seal mode: local worker processes, each with its own model copy and chunks of "
        "self-edits (0 = one per CPU core on a CPU, 1 on a GPU; 1 = this process); their "
        "start-up is timed apart",
    )
    isolate: bool = f(
        True,
        "on a CPU, run each mode in a fresh process of its own (its model loaded before its "
        "clock starts), so that no mode runs in a heap and caches another mode left behind",
    )
    ray_workers: tuple[int, ...] = f((1, 2), "ray mode: worker counts to measure")
    ray_cpus_per_worker: float = f(0, "ray mode: CPUs per worker (0 = CPUs / most workers)")
    ray_address: str = f("", "ray mode: cluster to join ('' = a local one)")

    def __post_init__(self):
        if self.inner_loop is None:
            self.inner_loop = InnerLoopConfig()
        unknown = [m for m in self.modes if m not in (*MODES, "ray")]
        if unknown:
            raise ValueError(f"unknown bench mode(s) {unknown}; known: {[*MODES, 'ray']}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 (one per core) or more, got {self.workers}")


def matmul_peak_flops(
    dtype: torch.dtype,
    device: torch.device,
    sizes: tuple[int, ...] = (1024, 1536, 2048),
    seconds: float = 0.5,
    repeats: int = 2,
) -> float:
    """Measured dense matmul throughput (FLOP/s) in `dtype` on `device`: the best of
    `repeats` timed loops of square products for each size in `sizes` (a peak; single loops
    vary by 10-15% on a shared CPU). Each product goes into one preallocated output, and the
    sizes include ones whose work buffers stay under 8 MB in bf16 and in fp32: jemalloc
    (allocator.py) hands blocks of 8 MB and more straight back to the system, so a loop of
    2,048^2 bf16 products, which allocates such buffers per call, read 1,540-1,640 GFLOP/s
    under it against 2,290-2,460 under glibc's malloc on the same cores, while 1,536^2 read
    2,580-2,610 under either; over these three sizes both read 2,510-2,770 in bf16 and 388-416
    in fp32 (docs/benchmarks.md, session 13)."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        c = torch.empty(n, n, dtype=dtype, device=device)
        for _ in range(2):
            torch.mm(a, b, out=c)
        for _ in range(repeats):
            _sync(device)
            t0, k = time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds:
                torch.mm(a, b, out=c)
                k += 1
            _sync(device)
            best = max(best, 2 * n**3 * k / (time.perf_counter() - t0))
    return best


def training_flops(
    model, n_adapter: int, input_tokens: int, loss_tokens: int, attention_pairs: int = 0
) -> float:
    """Model FLOPs of LoRA training passes over a frozen base (what MFU counts): every input
    token goes through the decoder's matmuls forward and back to its input (2 + 2 FLOPs per
    weight: the frozen weights need no gradient of their own) and through its adapter of
    `n_adapter` weights (2 forward + 2 input-gradient + 2 weight-gradient); only loss tokens
    go through the vocabulary projection (2 + 2). Attention scores count per causal (query,
    key) pair of a sequence, as in PaLM's MFU: Q.K and P.V forward (2 + 2 per query-head
    dimension) and both operands' gradients of each (8), in every layer; the masked half of
    the score matrix and pairs across packed sequences are not counted. Embedding lookups,
    norms and activations are not FLOPs here."""
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    n_all = sum(p.numel() for p in model.parameters())  # tied weights counted once
    n_head_extra = 0 if head.data_ptr() == embed.data_ptr() else head.numel()
    n_decoder = n_all - embed.numel() - n_head_extra
    return (
        input_tokens * (4 * n_decoder + 6 * n_adapter)
        + loss_tokens * 4 * head.numel()
        + attention_pairs * attention_flops_per_pair(model.config)
    )


def frozen_base_mfu(lm, tokens: int, peak: float, threads: int, share: int, repeats: int = 5):
    """What PyTorch itself reaches on this model: the MFU of the frozen base model alone (no
    adapters, no optimizer; its own forward, causal attention and loss) run forward and back
    to its inputs over one sequence of `tokens` tokens on `threads` threads, counted as
    `training_flops` counts seal's passes, against `peak / share` (seal's mode runs `share`
    workers side by side). The median of `repeats` timed passes after two warm-up ones. A
    ceiling for seal's own MFU: its passes do this and the adapters' work besides."""
    model, device = lm.model, lm.device
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=gen).to(device)
    embed = model.get_input_embeddings()
    times = []
    try:
        for i in range(2 + repeats):
            x = embed(ids).detach().requires_grad_(True)
            _sync(device)
            t0 = time.perf_counter()
            with torch.enable_grad():
                model(inputs_embeds=x, labels=ids).loss.backward()
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    seconds = sorted(times)[len(times) // 2]
    # HF's loss predicts tokens 1..T-1 from 0..T-2; every position still goes through the head.
    flops = training_flops(model, 0, tokens, tokens, tokens * (tokens + 1) // 2)
    return flops / seconds / (peak / share)


def attention_flops_per_pair(config) -> int:
    """Forward and backward FLOPs of one (query, key) pair over all layers and query heads."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 12 * config.num_hidden_layers * config.num_attention_heads * head_dim


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB


def _own_peak_rss_gb() -> float:
    """This process's peak RSS since it started its program (VmHWM): unlike getrusage's, it
    does not count the parent's memory a spawned worker was forked from."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return peak_rss_gb()


def _jobs(cfg: BenchConfig, passages, edits, n: int) -> list[KnowledgeJob]:
    variant = PROMPTS["implications"]
    jobs = []
    for p in passages:
        for s, comp in enumerate(edits.get(p.id, [])):
            jobs.append(
                KnowledgeJob(f"{p.id}/{s}", [p], training_texts(p, [comp], variant), cfg.seed + s)
            )
            if len(jobs) == n:
                return jobs
    return jobs


def _accuracy(results, metric: str) -> dict:
    scores = [g[metric] for r in results for g in r.grades if g[metric] is not None]
    return stats.mean_ci(scores)


def _peft_model(model, ic: InnerLoopConfig):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=ic.r,
        lora_alpha=ic.alpha,
        lora_dropout=0.0,
        target_modules=list(ic.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


@torch.no_grad()
def _reset_peft_adapter(pm, seed: int) -> None:
    """The adapter `MultiLoRA.reset(slot, seed)` would give (same draws, same module order),
    so every mode starts each self-edit from the same weights."""
    from peft.tuners.lora import LoraLayer

    gen = torch.Generator().manual_seed(int(seed))
    for m in pm.modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            a = m.lora_A["default"].weight  # [r, in]
            a.copy_(init_lora_a(a.shape[1], a.shape[0], gen).T)
            m.lora_B["default"].weight.zero_()


def _peft_train(pm, lm, ic: InnerLoopConfig, job: KnowledgeJob, pad_to: int | None) -> list:
    """AdamW on the PEFT adapter over the job's batches (`training.batch_plan`: the same shuffled
    batches as seal's trainer), each padded to `pad_to` tokens or, if None, to its longest
    sequence. The loss (transformers' own) is on the same tokens as seal's, never on padding."""
    from seal.training import AdapterJob, batch_plan, lr_factor

    tok, hp = lm.tokenizer, ic.train_hp()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    examples = [text_example(tok, t, ic.max_seq_len) for t in job.texts]
    plan = batch_plan(AdapterJob(0, examples, job.seed, hp))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ic.lr, weight_decay=ic.weight_decay)
    warm = int(hp.warmup_ratio * len(plan))
    losses = []
    for step, batch in enumerate(plan):
        width = pad_to or max(len(ex.input_ids) for ex in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, ex in enumerate(batch):
            n = min(len(ex.input_ids), width)
            ids[r, :n] = torch.tensor(ex.input_ids[:n])
            att[r, :n] = 1
            keep = torch.tensor(ex.loss_mask[:n])
            labels[r, :n] = torch.where(keep, ids[r, :n], -100)
        loss = pm(
            input_ids=ids.to(lm.device),
            attention_mask=att.to(lm.device),
            labels=labels.to(lm.device),
        ).loss
        loss.backward()
        if ic.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, ic.max_grad_norm)
        for grp in opt.param_groups:
            grp["lr"] = ic.lr * lr_factor(ic.schedule, step, len(plan), warm)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def _hf_answers(pm, lm, ic: InnerLoopConfig, prompts: list[list[int]]) -> list[str]:
    """Greedy answers from transformers' `generate`, all prompts in one left-padded batch."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=lm.device)
    att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=lm.device)
    stops = stop_token_ids(tok)
    out = pm.generate(
        input_ids=ids,
        attention_mask=att,
        max_new_tokens=ic.max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=pad,
        eos_token_id=stops,
    )
    seqs = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        seqs.append(row[:cut])
    return decode(tok, seqs)


def run_peft(lm, cfg: BenchConfig, jobs: list[KnowledgeJob], style: str) -> list:
    """Inner loops written with PEFT and transformers, one self-edit at a time: the
    reference design (`style="reference"`) or careful sequential code (`"sequential"`);
    see the module docstring for what each does."""
    from seal.inner_loop import InnerLoopResult, summarize

    if style not in ("reference", "sequential"):
        raise ValueError(f"unknown PEFT bench style {style!r}")
    ic, tok = cfg.inner_loop, lm.tokenizer
    reference = style == "reference"
    if reference:
        ic = replace(ic, batch_size=1)
    pm = None if reference else _peft_model(lm.model, ic)
    out = []
    start = time.time()
    try:
        for job in jobs:
            if out and cfg.time_limit and time.time() - start >= cfg.time_limit:
                break
            t0 = time.time()
            if reference:
                pm = _peft_model(lm.model, ic)  # a fresh PEFT model per self-edit
            _reset_peft_adapter(pm, job.seed)
            pm.eval()  # dropout off, as in seal's trainer (LoRA dropout is 0 anyway)
            losses = _peft_train(pm, lm, ic, job, cfg.ref_pad if reference else None)
            prompts = [
                tok(answer_prompt_text(p.title, q.question, tok, chat=ic.chat),
                    add_special_tokens=False)["input_ids"]
                for p in job.passages
                for q in p.questions
            ]  # fmt: skip
            if reference:
                # One question at a time, the base model's answer recomputed for each (as the
                # reference server does), then the adapted model's.
                # Plain greedy decoding, one token a pass (no prompt-lookup drafts).
                plain = SamplingParams(ic.max_new_tokens, lookup_tokens=0)
                answers = []
                for ids in prompts:
                    with pm.disable_adapter():
                        generate(pm, tok, [ids], plain)
                    answers += decode(tok, generate(pm, tok, [ids], plain))
                pm.unload()  # remove the LoRA layers: the next self-edit gets a fresh model
                pm = None
            else:
                answers = _hf_answers(pm, lm, ic, prompts)
            grades = [
                grading.grade_answer(a, list(q.answers), p.context)
                for a, (p, q) in zip(
                    answers, [(p, q) for p in job.passages for q in p.questions], strict=True
                )
            ]
            metrics = summarize(grades)
            out.append(
                InnerLoopResult(
                    job.key,
                    metrics.get(ic.reward_metric),
                    answers,
                    [asdict(g) for g in grades],
                    metrics,
                    len(job.texts),
                    0,
                    losses,
                    time.time() - t0,
                )
            )
    finally:
        if pm is not None:
            pm.unload()
    return out


def _median_round(entries: list[dict]) -> dict:
    """A mode's figures over its rounds: the median round's (the lower of the middle two
    for an even count), with every round's seconds per evaluation beside them."""
    if len(entries) == 1:
        return entries[0]
    ranked = sorted(entries, key=lambda e: e["seconds_per_eval"])
    return {
        **ranked[(len(ranked) - 1) // 2],
        "rounds_seconds_per_eval": [e["seconds_per_eval"] for e in entries],
    }


def release_freed_memory() -> None:
    """Hand the memory that finished modes freed back to the system. glibc keeps freed heap
    for reuse (3.7 GB of it after one reference-mode self-edit on SmolLM2), and the next
    mode's adapters per chunk are chosen from the system's free memory (`auto_capacity`):
    in a five-mode run that had cut seal's workers from 8 self-edits a chunk to 4."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to hand back
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _mode_workers(cfg: BenchConfig, mode: str, device: torch.device, jobs: list) -> int:
    """Processes a mode runs on: seal's as many workers as asked (or cores), but no more than
    self-edits; every other mode one."""
    if mode != "seal":
        return 1
    return max(1, min(cfg.workers or default_workers(device.type), cfg.n, len(jobs)))


def _run_mode_isolated(cfg: BenchConfig, mode: str, jobs: list[KnowledgeJob], peak: float, log):
    """`_run_mode` in a fresh process (spawned, its own model copy, the same torch threads):
    its figures, plus that process's peak RSS (`process_peak_rss_gb`)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        args = (cfg, mode, jobs, peak, torch.get_num_threads())
        try:
            entry, lines = ex.submit(_mode_in_fresh_process, *args).result()
        except BrokenProcessPool as e:
            raise RuntimeError(
                f"bench mode {mode!r} died in its own process (killed for memory?); the "
                "modes before it kept their figures; `isolate=false` runs it in this process"
            ) from e
    for line in lines:
        log(line)
    return entry


def _mode_in_fresh_process(cfg: BenchConfig, mode: str, jobs: list, peak: float, threads: int):
    from seal.executors import exit_with_parent
    from seal.models import load_model

    exit_with_parent()  # a bench killed outright takes its mode's process with it
    torch.set_num_threads(threads)
    lines: list[str] = []
    lm = load_model(cfg.model, cfg.device, cfg.dtype, progress=lambda *_: None)
    entry = _run_mode(lm, cfg, mode, jobs, peak, lines.append)
    entry["process_peak_rss_gb"] = round(_own_peak_rss_gb(), 2)
    return entry, lines


def _run_mode(lm, cfg: BenchConfig, mode: str, jobs: list[KnowledgeJob], peak: float, log) -> dict:
    """One timed round of one mode over `jobs` in this process; its figures."""
    release_freed_memory()
    metric = cfg.inner_loop.reward_metric
    workers = _mode_workers(cfg, mode, lm.device, jobs)
    extra: dict = {}
    t0 = time.time()
    if mode in ("reference", "sequential"):
        sub = jobs[: cfg.n_reference if mode == "reference" else cfg.n]
        results = run_peft(lm, cfg, sub, mode)
    elif workers > 1:
        sub = jobs[: cfg.n]
        results, timing, extra = _run_on_workers(cfg, sub, workers, log)
        t0 = time.time() - extra.pop("seconds")  # the jobs' time, start-up apart
    else:
        sub = jobs[: cfg.n]
        cap = 1 if mode == "capacity1" else cfg.capacity
        runner = BenchRunner(lm, replace(cfg.inner_loop, capacity=cap))
        extra["capacity"] = runner.capacity
        try:
            results, timing = _in_steps(sub, runner.capacity, lambda s: [runner.run(s)], cfg, t0)
        finally:
            runner.close()
        timing.pop("peak_rss_gb")  # this process's own figure is the bench's peak_rss_gb
    seconds = time.time() - t0
    acc = _accuracy(results, metric)
    entry = {
        "self_edits": len(results),
        "seconds": round(seconds, 2),
        "evals_per_hour": round(3600 * len(results) / seconds, 1),
        "seconds_per_eval": round(seconds / len(results), 2),
        "accuracy": {"metric": metric, **acc},
    }
    if len(results) < len(sub):
        entry["stopped_at_time_limit"] = True
    if mode in SEAL_MODES:
        entry.update(extra)
        flops = training_flops(
            lm.model,
            timing["n_adapter"],
            timing["input_tokens"],
            timing["tokens"],
            timing["attention_pairs"],
        )
        attn = timing["attention_pairs"] * attention_flops_per_pair(lm.model.config)
        # Workers train side by side: the machine's training time is theirs over the workers.
        train_s = timing["seconds"] / workers
        entry.update(
            train_seconds=round(timing["seconds"], 2),
            train_tokens=timing["tokens"],
            train_input_tokens=timing["input_tokens"],
            train_passes=timing["passes"],
            train_gflops=round(flops / 1e9, 1),
            train_attention_gflops=round(attn / 1e9, 1),
            mfu=round(flops / train_s / peak, 3) if train_s else None,
            mfu_without_attention=round((flops - attn) / train_s / peak, 3) if train_s else None,
        )
    return entry


def _run_on_workers(cfg: BenchConfig, jobs: list[KnowledgeJob], workers: int, log):
    """seal's mode on `workers` local processes (executors.ProcessExecutor): (results, the
    workers' training figures summed, {workers, threads, capacity, start-up seconds, the
    jobs' seconds})."""
    import functools

    from seal.executors import ProcessExecutor, WorkerSpec, balanced_capacity

    inner = to_dict(replace(cfg.inner_loop, capacity=cfg.capacity))
    spec = WorkerSpec(cfg.model, cfg.device, cfg.dtype, functools.partial(_bench_runner, inner))
    t0 = time.time()
    ex = ProcessExecutor(spec, workers=workers, log=log)
    startup = time.time() - t0

    def on_workers(step: list[KnowledgeJob]) -> list[TimedResults]:
        chunks: list = []
        ex.run(step, lambda _chunk, res: chunks.append(res))
        return chunks

    try:
        # The chunks the executor cuts (equal shares per worker, see balanced_capacity).
        cap = balanced_capacity(len(jobs), ex.capacity, workers)
        t0 = time.time()
        results, timing = _in_steps(jobs, cap * workers, on_workers, cfg, t0)
        seconds = time.time() - t0
    finally:
        ex.close()
    # Chunks come back as they finish; the figures follow the jobs' order.
    order = {j.key: i for i, j in enumerate(jobs)}
    results.sort(key=lambda r: order[r.key])
    extra = {
        "workers": workers,
        "threads_per_worker": ex.threads,
        "capacity": cap,
        "startup_seconds": round(startup, 1),
        "worker_peak_rss_gb": round(timing.pop("peak_rss_gb"), 2),
        "seconds": seconds,
    }
    return results, timing, extra


def _in_steps(jobs: list[KnowledgeJob], step: int, run_step, cfg: BenchConfig, t0: float):
    """Runs `jobs` `step` at a time through `run_step` (jobs -> its chunks' TimedResults),
    stopping after the step running when `cfg.time_limit` seconds from `t0` are up: the
    results, and the chunks' training figures added up (see BenchRunner)."""
    results: list = []
    timing = {k: 0 for k in _TrainTimer().figures()} | {"peak_rss_gb": 0.0}
    for at in range(0, len(jobs), step):
        if results and cfg.time_limit and time.time() - t0 >= cfg.time_limit:
            break
        for chunk in run_step(jobs[at : at + step]):
            results += chunk
            for k, v in chunk.timing.items():
                # a weight count and a peak are the same or the largest, the rest add up
                timing[k] = (
                    max(timing[k], v) if k in ("n_adapter", "peak_rss_gb") else timing[k] + v
                )
    return results, timing


def run_bench(cfg: BenchConfig, log=print, on_mode=None) -> dict:
    """Runs the modes of `cfg` one after another and returns the figures. `on_mode(res)` is
    called with the figures so far after each mode (`res["complete"]` False until the end),
    so that a long bench stopped part-way keeps what it measured."""
    from seal.models import load_model

    lm = load_model(cfg.model, cfg.device, cfg.dtype, progress=log)
    passages = [p for p in load_passages(cfg.data) if p.questions]
    tfile = cfg.teacher or (
        str(demo_path("teacher_self_edits")) if cfg.data.startswith("demo") else ""
    )
    if not tfile:
        raise ValueError("bench needs self-edits: give teacher=FILE")
    edits = load_teacher_self_edits(tfile, passages)
    jobs = _jobs(cfg, passages, edits, max(cfg.n, cfg.n_reference))
    # Every mode takes the self-edits fewest training sequences first: seal's chunks are then
    # those InnerLoop.run makes (executors.chunks_of_similar_cost), and a time-limited mode
    # finishes a prefix of the same list.
    jobs.sort(key=lambda j: j.cost)
    res: dict = {
        "model": cfg.model,
        "device": str(lm.device),
        "dtype": str(lm.dtype),
        "threads": torch.get_num_threads(),
        # inherited by the modes' own processes and seal's workers (see allocator.py)
        "allocator": allocator.describe(),
        "lora_route_cpu": cpu_training_route(lm.dtype) if lm.device.type == "cpu" else None,
        "n_self_edits": len(jobs),
        "epochs": cfg.inner_loop.epochs,
        "inner_loop": to_dict(cfg.inner_loop),  # every setting the figures were measured with
        "modes": {},
        "complete": False,
    }
    log(
        f"[bench] {cfg.model} on {lm.device} ({lm.dtype}), {len(jobs)} self-edits, "
        f"{cfg.inner_loop.epochs} epochs"
    )
    peak = matmul_peak_flops(lm.dtype, lm.device)
    res["matmul_peak_gflops"] = round(peak / 1e9, 1)
    log(f"[bench] measured {lm.dtype} matmul peak: {peak / 1e9:.0f} GFLOP/s")

    rounds: dict[str, list[dict]] = {}
    for r in range(cfg.repeats):
        order = [m for m in cfg.modes if r == 0 or m not in ("reference", "ray")]
        for mode in order if r % 2 == 0 else order[::-1]:
            if mode == "ray":
                res["ray"] = run_ray_scaling(cfg, jobs[: cfg.n], log)
            else:
                # seal's mode on workers runs on fresh processes already.
                fresh = cfg.isolate and lm.device.type == "cpu"
                if fresh and _mode_workers(cfg, mode, lm.device, jobs) == 1:
                    entry = _run_mode_isolated(cfg, mode, jobs, peak, log)
                else:
                    entry = _run_mode(lm, cfg, mode, jobs, peak, log)
                rounds.setdefault(mode, []).append(entry)
                acc = entry["accuracy"]
                n = min(len(jobs), cfg.n_reference if mode == "reference" else cfg.n)
                log(
                    f"[bench] {mode:10s} {entry['evals_per_hour']:8.1f} evals/h  "
                    f"{entry['seconds_per_eval']:7.2f} s/eval  {acc['metric']} "
                    f"{_pct(acc['mean'])} [{_pct(acc['ci_low'])}, {_pct(acc['ci_high'])}]"
                    + (f"  (time limit: {entry['self_edits']} of {n})"
                       if entry.get("stopped_at_time_limit") else "")
                    + (f"  (round {r + 1} of {cfg.repeats})" if cfg.repeats > 1 else "")
                )  # fmt: skip
                res["modes"][mode] = _median_round(rounds[mode])
            if on_mode is not None:
                on_mode(res)
    m = res["modes"]

    def ratio(a, b):
        if a in m and b in m:
            return round(m[a]["evals_per_hour"] / m[b]["evals_per_hour"], 2)
        return None

    if "ray" in res:
        res["ray_scaling_efficiency"] = {
            str(r["workers"]): r["scaling_efficiency"] for r in res["ray"]["workers"]
        }
    res["speedup_vs_reference"] = ratio("seal", "reference")
    res["speedup_vs_sequential"] = ratio("seal", "sequential")
    res["speedup_vs_capacity1"] = ratio("seal", "capacity1")
    res["speedup_vs_seal_inprocess"] = ratio("seal", "seal_inprocess")
    if cfg.repeats > 1 and "seal" in rounds and "sequential" in rounds:
        # Each round's own c/b: its two modes ran minutes apart, not a whole bench apart.
        res["speedup_vs_sequential_rounds"] = [
            round(b["seconds_per_eval"] / c["seconds_per_eval"], 2)
            for b, c in zip(rounds["sequential"], rounds["seal"], strict=True)
        ]
    seal = m.get("seal", {})
    res["mfu"] = seal.get("mfu")
    if seal.get("train_passes"):
        # The same figure for the frozen base alone, on passes of seal's mean length.
        tokens = max(2, round(seal["train_input_tokens"] / seal["train_passes"]))
        threads = seal.get("threads_per_worker", torch.get_num_threads())
        res["frozen_base_mfu"] = round(
            frozen_base_mfu(lm, tokens, peak, threads, seal.get("workers", 1)), 3
        )
        res["frozen_base_tokens"] = tokens
        log(
            f"[bench] MFU of seal's training {_pct(res['mfu'])}%; the frozen base alone (PyTorch "
            f"forward + backward, {tokens} tokens, no adapters) {_pct(res['frozen_base_mfu'])}%"
        )
    if cfg.sample_passages:
        res["sampling_tokens_per_s"] = _sampling_speed(lm, passages[: cfg.sample_passages], cfg)
    # The largest process's: this one's, a mode's own process's or one of its workers'.
    res["peak_rss_gb"] = round(
        max(
            [peak_rss_gb()]
            + [
                e.get(key, 0)
                for es in rounds.values()
                for e in es
                for key in ("process_peak_rss_gb", "worker_peak_rss_gb")
            ]
        ),
        2,
    )
    if lm.device.type == "cuda":
        res["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(lm.device) / 1e9, 2)
    res["complete"] = True
    return res


class BenchRunner:
    """The inner loop on one model as a Runner over KnowledgeJobs (what a worker runs); each
    chunk's results carry its training figures (`.timing`, see _TrainTimer.figures)."""

    def __init__(self, lm, inner_cfg: InnerLoopConfig):
        self.inner = InnerLoop(lm, inner_cfg)
        self.capacity = self.inner.capacity

    def run(self, jobs):
        timer = _TrainTimer()
        with timer.patch():
            results = TimedResults(self.inner.run(jobs))
        timer.n_adapter = self.inner.lora.n_params_per_adapter() if self.inner.lora else 0
        results.timing = {**timer.figures(), "peak_rss_gb": _own_peak_rss_gb()}
        return results

    def close(self):
        self.inner.close()


class TimedResults(list):
    """A chunk's results plus its training figures (`timing`), as a worker sends them."""

    timing: dict


def _bench_runner(inner_cfg: dict, lm) -> BenchRunner:
    return BenchRunner(lm, from_dict(InnerLoopConfig, inner_cfg))


def run_ray_scaling(cfg: BenchConfig, jobs: list[KnowledgeJob], log=print) -> dict:
    """Inner-loop throughput on 1..W Ray workers of equal size (the same jobs each time):
    evals/hour per worker count and the scaling efficiency against linear (W x one worker).
    Worker start-up (model load) is timed apart from the jobs."""
    import functools

    from seal.executors import RayExecutor, WorkerSpec, _import_ray

    ray = _import_ray()
    if not ray.is_initialized():
        ray.init(
            address=cfg.ray_address or None,
            include_dashboard=False,
            logging_level="WARNING",
            log_to_driver=False,
        )
    cpus = cfg.ray_cpus_per_worker or max(
        1, int(ray.cluster_resources().get("CPU", 1) // max(cfg.ray_workers))
    )
    inner = to_dict(replace(cfg.inner_loop, capacity=cfg.capacity))
    spec = WorkerSpec(cfg.model, cfg.device, cfg.dtype, functools.partial(_bench_runner, inner))
    rows, base = [], None
    for w in cfg.ray_workers:
        t0 = time.time()
        ex = RayExecutor(spec, workers=w, cpus_per_worker=cpus, gpus_per_worker=0, log=log)
        startup = time.time() - t0
        results: list = []
        t0 = time.time()
        ex.run(jobs, lambda chunk, res, out=results: out.extend(res))
        seconds = time.time() - t0
        ex.close()
        per_hour = 3600 * len(jobs) / seconds
        base = base or per_hour / w
        row = {
            "workers": w,
            "cpus_per_worker": cpus,
            "capacity": ex.capacity,
            "startup_seconds": round(startup, 1),
            "seconds": round(seconds, 2),
            "evals_per_hour": round(per_hour, 1),
            "scaling_efficiency": round(per_hour / (w * base), 3),
            "accuracy": _accuracy(results, cfg.inner_loop.reward_metric),
        }
        rows.append(row)
        log(
            f"[bench] ray x{w} ({cpus} CPU each): {row['evals_per_hour']:8.1f} evals/h  "
            f"efficiency {100 * row['scaling_efficiency']:.0f}% of linear  "
            f"(start-up {startup:.0f}s)"
        )
    return {"workers": rows, "n_self_edits": len(jobs)}


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}"


def _sampling_speed(lm, passages, cfg: BenchConfig) -> float:
    prompts = [self_edit_prompt_text(p, PROMPTS["implications"], lm.tokenizer) for p in passages]
    t0 = time.time()
    comps = sample_completions(
        lm.model, lm.tokenizer, prompts, 5, SamplingParams(256, True, 1.0, 0.95), cfg.seed
    )
    n_tok = sum(
        len(lm.tokenizer(c, add_special_tokens=False)["input_ids"]) for cs in comps for c in cs
    )
    return round(n_tok / (time.time() - t0), 1)


class _TrainTimer:
    """Times `train_adapters` calls and counts their real tokens, to compute MFU."""

    def __init__(self):
        self.seconds, self.tokens, self.input_tokens, self.attention_pairs = 0.0, 0, 0, 0
        self.passes = 0  # forward/backward passes (a call's adapters share its passes)
        self.n_adapter = 0  # LoRA weights per adapter, set by the caller

    def figures(self) -> dict:
        return {
            "seconds": self.seconds,
            "tokens": self.tokens,
            "input_tokens": self.input_tokens,
            "attention_pairs": self.attention_pairs,
            "passes": self.passes,
            "n_adapter": self.n_adapter,
        }

    def patch(self):
        import contextlib

        from seal import inner_loop

        real = inner_loop.train_adapters

        def timed(*a, **kw):
            t0 = time.time()
            stats_ = real(*a, **kw)
            self.seconds += time.time() - t0
            self.tokens += sum(s.tokens for s in stats_)  # loss tokens
            self.input_tokens += sum(s.input_tokens for s in stats_)  # tokens run, no padding
            self.attention_pairs += sum(s.attention_pairs for s in stats_)
            self.passes += max((s.steps for s in stats_), default=0)
            return stats_

        @contextlib.contextmanager
        def ctx():
            inner_loop.train_adapters = timed
            try:
                yield
            finally:
                inner_loop.train_adapters = real

        return ctx()
