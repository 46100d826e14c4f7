"""`seal bench`: inner-loop throughput, measured against the reference design.

Three ways to run the same inner loops (model, passages, self-edits, hyperparameters), in one
process, one after another:

  reference   a fresh PEFT model per self-edit, every sequence padded to `ref_pad` tokens
              (2,048 in the paper's code), batch 1, one self-edit at a time, base answers
              recomputed for every self-edit (as the reference server does)
  sequential  the base model reused, dynamic padding, one self-edit at a time (seal's inner
              loop with capacity 1)
  seal        the batched multi-adapter inner loop (capacity K)

It prints self-edit evaluations per hour, the ratios, the post-adaptation accuracy of each
with its 95% CI (speed must not change the result), the model FLOPs utilisation of seal's
training passes against a matmul peak measured in the same run, peak RSS, and self-edit
sampling tokens per second. The reference mode keeps the loss off the padding (the reference
code's loss on padding is an accident that changes results, not a cost).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, replace

import torch

from seal import stats
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
from seal.generation import SamplingParams, decode, generate, sample_completions
from seal.inner_loop import InnerLoop, InnerLoopConfig, KnowledgeJob
from seal.models import DEFAULT_MODEL


@dataclass
class BenchConfig:
    """`seal bench` settings."""

    model: str = f(DEFAULT_MODEL, "model to benchmark")
    data: str = f("demo:eval", "passages")
    teacher: str = f("", "self-edits file (default: the demo teacher file for demo data)")
    n: int = f(8, "self-edits evaluated by the sequential and seal modes")
    n_reference: int = f(2, "self-edits evaluated by the (slow) reference mode")
    modes: tuple[str, ...] = f(("reference", "sequential", "seal"), "which modes to run")
    ref_pad: int = f(2048, "reference mode: pad every sequence to this many tokens")
    capacity: int = f(0, "seal mode: adapters at once (0 = from free memory)")
    sample_passages: int = f(2, "passages for the sampling-throughput figure (0 = skip)")
    inner_loop: InnerLoopConfig = f(None, "inner-loop settings (defaults: the paper's)")
    device: str = f("auto", "auto, cpu or cuda")
    dtype: str = f("auto", "auto, bf16, fp16 or fp32")
    seed: int = f(0, "seed")
    ray_workers: tuple[int, ...] = f((1, 2), "ray mode: worker counts to measure")
    ray_cpus_per_worker: float = f(0, "ray mode: CPUs per worker (0 = CPUs / most workers)")
    ray_address: str = f("", "ray mode: cluster to join ('' = a local one)")

    def __post_init__(self):
        if self.inner_loop is None:
            self.inner_loop = InnerLoopConfig()


def matmul_peak_flops(
    dtype: torch.dtype, device: torch.device, n: int = 2048, seconds: float = 1.0, repeats: int = 3
) -> float:
    """Measured dense matmul throughput (FLOP/s) in `dtype` on `device`: the best of
    `repeats` timed loops (a peak; single loops vary by 10-15% on a shared CPU)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(repeats):
        _sync(device)
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            a @ b
            k += 1
        _sync(device)
        best = max(best, 2 * n**3 * k / (time.perf_counter() - t0))
    return best


def training_flops(model, n_adapter: int, input_tokens: int, loss_tokens: int) -> float:
    """Model FLOPs of LoRA training passes over a frozen base (what MFU counts): every input
    token goes through the decoder's matmuls forward and back to its input (2 + 2 FLOPs per
    weight: the frozen weights need no gradient of their own) and through its adapter of
    `n_adapter` weights (2 forward + 2 input-gradient + 2 weight-gradient); only loss tokens
    go through the vocabulary projection (2 + 2). Embedding lookups are not FLOPs; attention
    scores are left out (small at these lengths), so this slightly undercounts."""
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    n_all = sum(p.numel() for p in model.parameters())  # tied weights counted once
    n_head_extra = 0 if head.data_ptr() == embed.data_ptr() else head.numel()
    n_decoder = n_all - embed.numel() - n_head_extra
    return input_tokens * (4 * n_decoder + 6 * n_adapter) + loss_tokens * 4 * head.numel()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB


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


def run_reference(lm, cfg: BenchConfig, jobs: list[KnowledgeJob]) -> list:
    """The reference design, one self-edit at a time (see the module docstring)."""
    from peft import LoraConfig, get_peft_model

    from seal import grading
    from seal.inner_loop import InnerLoopResult, summarize
    from seal.training import lr_factor

    ic, tok, model = cfg.inner_loop, lm.tokenizer, lm.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    for job in jobs:
        t0 = time.time()
        peft_cfg = LoraConfig(
            r=ic.r,
            lora_alpha=ic.alpha,
            lora_dropout=0.0,
            target_modules=list(ic.target_modules),
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(job.seed)
        pm = get_peft_model(model, peft_cfg)
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=ic.lr, weight_decay=ic.weight_decay)
        seqs = [
            tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in job.texts
        ]
        total = ic.epochs * len(seqs)
        g = torch.Generator().manual_seed(job.seed)
        step, losses = 0, []
        for _ in range(ic.epochs):
            for i in torch.randperm(len(seqs), generator=g).tolist():
                s = seqs[i][: cfg.ref_pad]
                ids = torch.full((1, cfg.ref_pad), pad, dtype=torch.long)
                ids[0, : len(s)] = torch.tensor(s)
                att = torch.zeros_like(ids)
                att[0, : len(s)] = 1
                labels = ids.clone()
                labels[att == 0] = -100
                loss = pm(
                    input_ids=ids.to(lm.device),
                    attention_mask=att.to(lm.device),
                    labels=labels.to(lm.device),
                ).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, ic.max_grad_norm or 1e9)
                for grp in opt.param_groups:
                    grp["lr"] = ic.lr * lr_factor(ic.schedule, step, total, 0)
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
                step += 1
        # Answers: the base model's (recomputed per request, as the reference server does)
        # and the adapted model's, one question at a time.
        p = job.passages[0]
        answers = []
        for q in p.questions:
            ids = tok(
                answer_prompt_text(p.title, q.question, tok, chat=ic.chat), add_special_tokens=False
            )["input_ids"]
            with pm.disable_adapter():
                generate(pm, tok, [ids], SamplingParams(ic.max_new_tokens))
            answers.append(
                decode(tok, generate(pm, tok, [ids], SamplingParams(ic.max_new_tokens)))[0]
            )
        pm.unload()  # remove the LoRA layers: the next self-edit gets a fresh PEFT model
        grades = [
            grading.grade_answer(a, list(q.answers), p.context)
            for a, q in zip(answers, p.questions, strict=True)
        ]
        from dataclasses import asdict

        out.append(
            InnerLoopResult(
                job.key,
                None,
                answers,
                [asdict(x) for x in grades],
                summarize(grades),
                len(job.texts),
                0,
                losses,
                time.time() - t0,
            )
        )
    return out


def run_bench(cfg: BenchConfig, log=print) -> dict:
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
    metric = cfg.inner_loop.reward_metric
    res: dict = {
        "model": cfg.model,
        "device": str(lm.device),
        "dtype": str(lm.dtype),
        "threads": torch.get_num_threads(),
        "n_self_edits": len(jobs),
        "epochs": cfg.inner_loop.epochs,
        "modes": {},
    }
    log(
        f"[bench] {cfg.model} on {lm.device} ({lm.dtype}), {len(jobs)} self-edits, "
        f"{cfg.inner_loop.epochs} epochs"
    )
    peak = matmul_peak_flops(lm.dtype, lm.device)
    res["matmul_peak_gflops"] = round(peak / 1e9, 1)
    log(f"[bench] measured {lm.dtype} matmul peak: {peak / 1e9:.0f} GFLOP/s")

    for mode in cfg.modes:
        if mode == "ray":
            res["ray"] = run_ray_scaling(cfg, jobs[: cfg.n], log)
            continue
        t0 = time.time()
        if mode == "reference":
            sub = jobs[: cfg.n_reference]
            results = run_reference(lm, cfg, sub)
            train_s = None
        else:
            sub = jobs[: cfg.n]
            cap = 1 if mode == "sequential" else cfg.capacity
            inner = InnerLoop(lm, replace(cfg.inner_loop, capacity=cap))
            timing = _TrainTimer()
            with timing.patch():
                results = inner.run(sub)
            n_adapter = inner.lora.n_params_per_adapter() if inner.lora is not None else 0
            inner.close()
            train_s = timing.seconds
        seconds = time.time() - t0
        acc = _accuracy(results, metric)
        entry = {
            "self_edits": len(sub),
            "seconds": round(seconds, 2),
            "evals_per_hour": round(3600 * len(sub) / seconds, 1),
            "seconds_per_eval": round(seconds / len(sub), 2),
            "accuracy": {"metric": metric, **acc},
        }
        if mode == "seal":
            entry["capacity"] = inner.capacity
            flops = training_flops(lm.model, n_adapter, timing.input_tokens, timing.tokens)
            entry.update(
                train_seconds=round(train_s, 2),
                train_tokens=timing.tokens,
                train_input_tokens=timing.input_tokens,
                train_gflops=round(flops / 1e9, 1),
                mfu=round(flops / train_s / peak, 3) if train_s else None,
            )
        res["modes"][mode] = entry
        log(
            f"[bench] {mode:10s} {entry['evals_per_hour']:8.1f} evals/h  "
            f"{entry['seconds_per_eval']:7.2f} s/eval  {metric} "
            f"{_pct(acc['mean'])} [{_pct(acc['ci_low'])}, {_pct(acc['ci_high'])}]"
        )
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
    res["mfu"] = m.get("seal", {}).get("mfu")
    if cfg.sample_passages:
        res["sampling_tokens_per_s"] = _sampling_speed(lm, passages[: cfg.sample_passages], cfg)
    res["peak_rss_gb"] = round(peak_rss_gb(), 2)
    return res


class BenchRunner:
    """The inner loop on one model as a Runner over KnowledgeJobs (what a Ray worker runs)."""

    def __init__(self, lm, inner_cfg: InnerLoopConfig):
        self.inner = InnerLoop(lm, inner_cfg)
        self.capacity = self.inner.capacity

    def run(self, jobs):
        return self.inner.run(jobs)

    def close(self):
        self.inner.close()


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
        self.seconds, self.tokens, self.input_tokens = 0.0, 0, 0

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
            return stats_

        @contextlib.contextmanager
        def ctx():
            inner_loop.train_adapters = timed
            try:
                yield
            finally:
                inner_loop.train_adapters = real

        return ctx()
