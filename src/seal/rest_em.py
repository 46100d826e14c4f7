"""SEAL's outer loop: ReST-EM rounds.

    round 0:  evaluate the untouched model
    round r:  1. sample M self-edits per training context from the current generator
              2. score each with the inner loop (K repeats, different seeds; the mean)
              3. select (knowledge: the best of M per context; binary domains: reward 1)
              4. fine-tune the generator on (self-edit prompt -> kept self-edit), loss on the
                 completion only (LoRA, then merge; or full fine-tuning)
              5. evaluate the new generator on held-out contexts: its own self-edits ->
                 inner loop -> held-out accuracy

Every phase writes its results to the run directory as they finish and is skipped or resumed
from there, so a killed run continues where it stopped and, under a fixed seed, ends with the
same metrics as one never stopped. The reward depends on the model, so the loop is on-policy:
self-edits are sampled from, and scored with, the current model (in teacher-student mode the
teacher writes and is trained; the student is adapted and scored and stays fixed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from seal import stats
from seal.config import JudgeConfig, SelfEditConfig, _check, f, from_dict, to_dict
from seal.domains.base import Domain, Job, Result
from seal.executors import WorkerSpec, build_executor
from seal.inner_loop import InnerLoopConfig
from seal.loggers import build_logger
from seal.lora import ALL_LINEAR, LoRASpec, MultiLoRA
from seal.models import DEFAULT_MODEL
from seal.runs import (
    RunDir,
    append_jsonl,
    atomic_write_json,
    failpoint,
    read_jsonl,
    write_jsonl,
)
from seal.training import AdapterJob, TrainHP, prompt_completion_example, train_adapters

# --------------------------------------------------------------------------------------------
# Config


@dataclass
class DataConfig:
    """Where contexts come from and how many each round uses."""

    train: str = f(
        "demo:train", "training contexts (knowledge: passages spec, see `seal baselines`)"
    )
    eval: str = f("demo:eval", "held-out contexts")
    n_train: int = f(0, "training contexts per round, a fresh slice each round (0 = all)")
    n_eval: int = f(0, "held-out contexts evaluated each round (0 = all)")
    tasks_train: tuple[str, ...] = f((), "ARC: training task ids (or a named set)")
    tasks_eval: tuple[str, ...] = f((), "ARC: evaluation task ids (or a named set)")

    def validate(self) -> None:
        _check(self.n_train >= 0, "data.n_train", "must be >= 0")
        _check(self.n_eval >= 0, "data.n_eval", "must be >= 0")


@dataclass
class SFTConfig:
    """The ReST-EM step: supervised fine-tuning of the generator on kept self-edits."""

    method: str = f("lora", "lora (then merged) or full")
    r: int = f(64, "LoRA rank")
    alpha: float = f(128.0, "LoRA alpha")
    target_modules: tuple[str, ...] = f(ALL_LINEAR, "LoRA target projections")
    lr: float = f(3e-4, "learning rate")
    epochs: int = f(2, "epochs over the kept pairs")
    batch_size: int = f(10, "pairs per optimizer step (the paper's effective batch)")
    max_seq_len: int = f(2048, "token cap of prompt + self-edit")
    checkpoint: bool = f(False, "activation checkpointing (less memory, ~1/3 more compute)")

    def validate(self) -> None:
        _check(self.method in ("lora", "full"), "rest_em.sft.method", "must be lora or full")
        _check(self.r >= 1 and self.alpha > 0, "rest_em.sft", "r >= 1 and alpha > 0")
        _check(0 < self.lr <= 1, "rest_em.sft.lr", "must be in (0, 1]")
        _check(self.epochs >= 1 and self.batch_size >= 1, "rest_em.sft", "epochs, batch_size >= 1")


@dataclass
class RestEMConfig:
    """Outer-loop settings."""

    repeats: int = f(3, "inner-loop runs per self-edit (K), different seeds; reward = mean")
    selection: str = f(
        "",
        "best | threshold | relative ('' = the domain's rule: knowledge "
        "best-of-M, binary domains threshold)",
    )
    threshold: float = f(1.0, "threshold selection: keep self-edits with reward >= this")
    min_reward: float = f(0.0, "best selection: keep the best only if its reward > this")
    sft: SFTConfig = field(default_factory=SFTConfig)

    def validate(self) -> None:
        _check(self.repeats >= 1, "rest_em.repeats", "must be >= 1")
        _check(
            self.selection in ("", "best", "threshold", "relative"),
            "rest_em.selection",
            "must be best, threshold or relative",
        )


@dataclass
class EvalConfig:
    """Held-out evaluation each round."""

    n_samples: int = f(1, "self-edits per held-out context")
    repeats: int = f(1, "inner-loop runs per held-out self-edit")

    def validate(self) -> None:
        _check(self.n_samples >= 1 and self.repeats >= 1, "eval", "n_samples, repeats >= 1")


@dataclass
class ExecutorConfig:
    """Where inner loops run: in this process, on local worker processes, or on Ray actors
    (docs/scaling.md)."""

    kind: str = f(
        "inprocess",
        "inprocess; processes (local workers: on a multi-core CPU, 1.3-1.5x the inner loops "
        "per hour, docs/benchmarks.md); or ray (needs `pip install 'seal-lm[ray]'`)",
    )
    workers: int = f(
        0,
        "processes: workers (0 = one per CPU core, 1 on a GPU); "
        "ray: actors (0 = one per GPU, or 1 on a CPU-only cluster)",
    )
    address: str = f("", "ray: cluster to join ('auto', 'ray://host:10001'); '' starts a local one")
    cpus_per_worker: float = f(
        0,
        "processes: torch threads per worker (0 = the cores / workers); "
        "ray: CPUs per actor (0 = the cluster's CPUs / workers)",
    )
    gpus_per_worker: float = f(-1, "ray: GPUs per actor (-1 = 1 when the cluster has GPUs)")
    max_retries: int = f(
        2, "processes, ray: retries of a chunk of jobs whose worker died or failed"
    )

    def validate(self) -> None:
        _check(
            self.kind in ("inprocess", "processes", "ray"),
            "executor.kind",
            "must be inprocess, processes or ray",
        )
        _check(self.workers >= 0, "executor.workers", "must be >= 0")
        _check(self.cpus_per_worker >= 0, "executor.cpus_per_worker", "must be >= 0")
        _check(self.max_retries >= 0, "executor.max_retries", "must be >= 0")


@dataclass
class LoggingConfig:
    tensorboard: bool = f(False, "also log to TensorBoard (needs `seal-lm[tensorboard]`)")
    progress: bool = f(True, "progress bars with ETA")


@dataclass
class RunConfig:
    """`seal run`: a SEAL experiment (ReST-EM rounds)."""

    seed: int = f(0, "everything random derives from this")
    domain: str = f("knowledge", "knowledge or arc")
    model: str = f(DEFAULT_MODEL, "the model: generator and student (preset, dir, hub id)")
    teacher_model: str = f("", "teacher-student mode: a separate generator, trained by ReST-EM")
    device: str = f("auto", "auto, cpu or cuda")
    dtype: str = f("auto", "auto, bf16, fp16 or fp32")
    rounds: int = f(2, "ReST-EM rounds after round 0")
    data: DataConfig = field(default_factory=DataConfig)
    self_edit: SelfEditConfig = field(default_factory=SelfEditConfig)
    inner_loop: InnerLoopConfig = field(default_factory=InnerLoopConfig)
    rest_em: RestEMConfig = field(default_factory=RestEMConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    arc: dict = f({}, "ARC domain settings (see configs/arc-*.yaml)")

    def validate(self) -> None:
        _check(self.rounds >= 0, "rounds", "must be >= 0")
        _check(self.domain in ("knowledge", "arc"), "domain", "must be knowledge or arc")


# --------------------------------------------------------------------------------------------
# The loop


def run(cfg: RunConfig, run_dir: RunDir, log=print, progress_factory=None) -> list[dict]:
    """Run (or resume) the experiment in `run_dir`; returns the metrics, one dict per round."""
    from seal.models import load_model

    student = load_model(cfg.model, cfg.device, cfg.dtype, progress=log)
    teacher = (
        load_model(cfg.teacher_model, cfg.device, cfg.dtype, progress=log)
        if cfg.teacher_model
        else None
    )
    domain = build_domain(cfg, log)
    # Restore the generator's updates of finished rounds (merging is deterministic, so the
    # weights equal those of the run that wrote them).
    generator = teacher or student
    done_rounds = [m["round"] for m in run_dir.metrics()]
    restored = []
    for r in range(1, (max(done_rounds) if done_rounds else 0) + 1):
        update = read_generator_update(run_dir.file("checkpoints", f"round_{r}"), cfg)
        if update is not None:
            apply_generator_update(generator, update)
            restored.append(update)
    executor = make_executor(cfg, domain, student, restored, log)
    logger = build_logger(run_dir.path, cfg.logging.tensorboard)
    progress = progress_factory or (lambda desc, total: _NoBar())
    metrics = run_dir.metrics()
    try:
        for rnd in range(len(metrics), cfg.rounds + 1):
            t_round, seconds = time.time(), {}
            kept, rewards = [], []
            if rnd > 0:
                contexts = slice_round(domain.train_contexts(), cfg.data.n_train, rnd)
                # 1. Sample self-edits from the current generator.
                run_dir.set_state(round=rnd, phase="sample", seed=cfg.seed)
                t0 = time.time()
                samples = sample_phase(
                    run_dir,
                    f"self_edits/round_{rnd}.samples.jsonl",
                    generator,
                    domain,
                    contexts,
                    cfg.self_edit.n_samples,
                    seed=cfg.seed * 1_000_003 + rnd * 7919,
                    batch_size=cfg.self_edit.batch_size,
                )
                seconds["sample"] = time.time() - t0
                # 2. Score each with K inner loops on the current model.
                run_dir.set_state(round=rnd, phase="score")
                t0 = time.time()
                rule = cfg.rest_em.selection or domain.default_selection
                results = score_phase(
                    run_dir,
                    f"self_edits/round_{rnd}.jobs.jsonl",
                    executor,
                    domain,
                    contexts,
                    samples,
                    cfg.rest_em.repeats,
                    seed=cfg.seed * 1_000_003 + rnd * 104729,
                    progress=progress(f"round {rnd}: inner loops", None),
                    with_baseline=rule == "relative",
                )
                seconds["score"] = time.time() - t0
                # 3. Select the self-edits to learn from.
                scored = aggregate(contexts, samples, results, domain)
                kept = select(scored, rule, cfg.rest_em)
                rewards = [s["reward"] for s in scored if s["reward"] is not None]
                _write_scored(run_dir, rnd, scored, kept)
                # 4. Fine-tune the generator on (prompt -> kept self-edit), then merge.
                run_dir.set_state(round=rnd, phase="sft")
                t0 = time.time()
                ckpt = run_dir.file("checkpoints", f"round_{rnd}")
                executor.model_changed()  # unwrap the inner loop's adapters before the update
                sft_info = fine_tune_generator(
                    generator, domain, kept, cfg, ckpt, seed=cfg.seed * 31 + rnd
                )
                if teacher is None:  # the scored model is the generator: workers follow it
                    executor.model_updated(read_generator_update(ckpt, cfg))
                seconds["sft"] = time.time() - t0
            # 5. Evaluate the current generator on held-out contexts.
            run_dir.set_state(round=rnd, phase="eval")
            t0 = time.time()
            eval_ctx = domain.eval_contexts()[: cfg.data.n_eval or None]
            ev_samples = sample_phase(
                run_dir,
                f"eval/round_{rnd}.samples.jsonl",
                generator,
                domain,
                eval_ctx,
                cfg.eval.n_samples,
                seed=cfg.seed * 1_000_003 + rnd * 7919 + 17,
                batch_size=cfg.self_edit.batch_size,
            )
            ev_results = score_phase(
                run_dir,
                f"eval/round_{rnd}.jobs.jsonl",
                executor,
                domain,
                eval_ctx,
                ev_samples,
                cfg.eval.repeats,
                seed=cfg.seed * 1_000_003 + 99991,
                progress=progress(f"round {rnd}: eval", None),
            )
            seconds["eval"] = time.time() - t0
            item_scores = eval_item_scores(eval_ctx, ev_samples, ev_results, domain)
            ci = stats.mean_ci(item_scores, seed=cfg.seed)
            line = {
                "round": rnd,
                "eval_mean": ci["mean"],
                "eval_n": ci["n"],
                "eval_ci_low": ci["ci_low"],
                "eval_ci_high": ci["ci_high"],
                "reward_mean": sum(rewards) / len(rewards) if rewards else None,
                "reward_max": max(rewards) if rewards else None,
                "n_scored": len(rewards),
                "n_kept": len(kept),
                "seconds": round(time.time() - t_round, 1),
                "seconds_per_phase": {k: round(v, 1) for k, v in seconds.items()},
            }
            if rnd > 0:
                line["sft"] = sft_info
            append_jsonl(run_dir.file("metrics.jsonl"), [line])
            atomic_write_json(run_dir.file("eval", f"round_{rnd}.scores.json"), item_scores)
            # Domain outputs of the round (ARC: the ARC-Prize submission), where it has any.
            artifacts = getattr(domain, "eval_artifacts", None)
            for name, obj in (artifacts(eval_ctx, ev_results) if artifacts else {}).items():
                atomic_write_json(run_dir.file("eval", f"round_{rnd}.{name}"), obj)
            logger.log_dict({k: v for k, v in line.items() if isinstance(v, (int, float))}, rnd)
            run_dir.set_state(round=rnd, phase="done")
            log(format_round(line))
            metrics.append(line)
    finally:
        executor.close()
        logger.close()
    return metrics


# --------------------------------------------------------------------------------------------
# Phases


class _NoBar:
    def __call__(self, n: int = 1) -> None:
        pass


def slice_round(contexts: list, n: int, rnd: int) -> list:
    """Round r's training contexts: a fresh slice of n (wrapping around), or all if n = 0."""
    if not n or n >= len(contexts):
        return list(contexts)
    start = ((rnd - 1) * n) % len(contexts)
    return [contexts[(start + i) % len(contexts)] for i in range(n)]


def sample_phase(
    run_dir: RunDir,
    rel: str,
    lm,
    domain: Domain,
    contexts: list,
    n: int,
    seed: int,
    batch_size: int = 16,
) -> dict[str, list[str]]:
    """M self-edits per context, from `lm`, for several contexts per batched generation.

    Contexts are cut into fixed chunks by position (so a resumed run batches them as an
    uninterrupted one would); a chunk's self-edits are stored as soon as it is sampled, and a
    chunk already stored is not sampled again."""
    from seal.generation import sample_completions

    path = run_dir.path / rel
    have = {r["ctx_id"]: r["completions"] for r in read_jsonl(path)}
    params = domain.sampling_params()
    per_chunk = max(1, batch_size // n)
    for start in range(0, len(contexts), per_chunk):
        chunk = contexts[start : start + per_chunk]
        ids = [domain.context_id(c) for c in chunk]
        if all(cid in have for cid in ids):
            continue
        if hasattr(domain, "sample_self_edits"):  # e.g. ARC: resample until the JSON parses
            comps = domain.sample_self_edits(lm, chunk, n, seed + start)
        else:
            prompts = [domain.self_edit_prompt(c, lm.tokenizer) for c in chunk]
            comps = sample_completions(
                lm.model, lm.tokenizer, prompts, n, params, seed + start, batch_size
            )
        recs = [
            {"ctx_id": cid, "completions": c, "seed": seed + start + k}
            for k, (cid, c) in enumerate(zip(ids, comps, strict=True))
            if cid not in have
        ]
        append_jsonl(path, recs)
        have.update({r["ctx_id"]: r["completions"] for r in recs})
    return have


def score_phase(
    run_dir: RunDir,
    rel: str,
    executor,
    domain: Domain,
    contexts: list,
    samples: dict[str, list[str]],
    repeats: int,
    seed: int,
    progress=None,
    with_baseline: bool = False,
) -> dict[str, dict]:
    """Run the inner loop for every (context, self-edit, repeat); results are appended to
    `rel` as each chunk finishes, and finished ones are never recomputed. `with_baseline`
    adds, per context, K runs without a self-edit (sample -1) for relative selection."""
    path = run_dir.path / rel
    done = {r["key"]: r for r in read_jsonl(path)}
    jobs: list[Job] = []
    for ci, ctx in enumerate(contexts):
        cid = domain.context_id(ctx)
        comps = list(enumerate(samples[cid]))
        if with_baseline:
            comps.append((-1, ""))
        for s, comp in comps:
            for k in range(repeats):
                key = f"{cid}/{s}/{k}"
                jobs.append(domain.make_job(ctx, comp, key, s, k, seed + 1009 * ci + 31 * s + k))

    def on_results(chunk: list[Job], results: list[Result]) -> None:
        recs = [
            {
                "key": j.key,
                "ctx_id": j.ctx_id,
                "sample": j.sample,
                "repeat": j.repeat,
                "seed": j.seed,
                "reward": r.reward,
                "scores": r.scores,
                "seconds": round(r.seconds, 3),
                **r.detail,
            }
            for j, r in zip(chunk, results, strict=True)
        ]
        append_jsonl(path, recs)
        done.update({r["key"]: r for r in recs})
        failpoint("after_chunk")

    if progress is not None:
        progress.total = len(jobs)
        progress(len([j for j in jobs if j.key in done]))
    executor.run(jobs, on_results, progress=progress, skip=set(done))
    return done


def aggregate(contexts, samples, results, domain) -> list[dict]:
    """One record per self-edit: reward = mean over its K repeats."""
    out = []
    for ctx in contexts:
        cid = domain.context_id(ctx)
        for s, comp in enumerate(samples[cid]):
            reps = sorted(
                (r for r in results.values() if r["ctx_id"] == cid and r["sample"] == s),
                key=lambda r: r["repeat"],
            )
            vals = [r["reward"] for r in reps if r["reward"] is not None]
            base = [
                r["reward"]
                for r in results.values()
                if r["ctx_id"] == cid and r["sample"] == -1 and r["reward"] is not None
            ]
            out.append(
                {
                    "ctx_id": cid,
                    "sample": s,
                    "completion": comp,
                    "reward": sum(vals) / len(vals) if vals else None,
                    "baseline": sum(base) / len(base) if base else None,
                    "repeat_rewards": [r["reward"] for r in reps],
                    "seeds": [r["seed"] for r in reps],
                    "ctx": ctx,
                }
            )
    return out


def select(scored: list[dict], rule: str, cfg: RestEMConfig) -> list[dict]:
    """The self-edits to fine-tune on. best: per context the highest reward (earliest sample on
    ties), if above `min_reward`; threshold: every one with reward >= `threshold`; relative:
    per context the best, if it beats the context's no-self-edit baseline (sample -1)."""
    valid = [s for s in scored if s["reward"] is not None]
    if rule == "threshold":
        return [s for s in valid if s["reward"] >= cfg.threshold]
    best: dict[str, dict] = {}
    for s in valid:
        if s["ctx_id"] not in best or s["reward"] > best[s["ctx_id"]]["reward"]:
            best[s["ctx_id"]] = s
    kept = [s for s in best.values() if s["reward"] > cfg.min_reward]
    if rule == "relative":
        base = {s["ctx_id"]: s.get("baseline") for s in valid}
        kept = [s for s in kept if base.get(s["ctx_id"]) is None or s["reward"] > base[s["ctx_id"]]]
    return kept


def _write_scored(run_dir: RunDir, rnd: int, scored: list[dict], kept: list[dict]) -> None:
    kept_ids = {(k["ctx_id"], k["sample"]) for k in kept}
    lines = [
        {k: v for k, v in s.items() if k != "ctx"}
        | {"kept": (s["ctx_id"], s["sample"]) in kept_ids}
        for s in scored
    ]
    write_jsonl(run_dir.file("self_edits", f"round_{rnd}.jsonl"), lines)


def eval_item_scores(contexts, samples, results, domain) -> list[float]:
    """Per held-out item (question / test), its score averaged over self-edits and repeats."""
    out = []
    for ctx in contexts:
        cid = domain.context_id(ctx)
        reps = [r for r in results.values() if r["ctx_id"] == cid and r["sample"] >= 0]
        if not reps:
            continue
        n_items = len(reps[0]["scores"])
        for i in range(n_items):
            vals = [r["scores"][i] for r in reps if r["scores"][i] is not None]
            if vals:
                out.append(sum(vals) / len(vals))
    return out


# --------------------------------------------------------------------------------------------
# The ReST-EM step


def fine_tune_generator(
    lm, domain: Domain, kept: list[dict], cfg: RunConfig, ckpt_dir, seed: int
) -> dict:
    """SFT on (self-edit prompt -> kept self-edit), loss on the completion only; LoRA merged
    into the weights (or full fine-tuning). Writes the update to `ckpt_dir` and returns a
    summary. With nothing kept the generator is unchanged."""
    sft = cfg.rest_em.sft
    if ckpt_dir.exists() and (ckpt_dir / "update.json").exists():
        # Finished before a crash: the update is on disk, apply it instead of retraining.
        load_generator_update(lm, ckpt_dir, cfg)
        return _read_update_info(ckpt_dir)
    tok = lm.tokenizer
    examples = [
        prompt_completion_example(
            tok, domain.self_edit_prompt(k["ctx"], tok), k["completion"], sft.max_seq_len
        )
        for k in kept
    ]
    examples = [e for e in examples if any(e.loss_mask)]
    info = {"n_pairs": len(examples), "method": sft.method}
    if examples:
        hp = TrainHP(
            lr=sft.lr,
            epochs=sft.epochs,
            batch_size=sft.batch_size,
            max_seq_len=sft.max_seq_len,
            schedule="linear",
            warmup_ratio=0.0,
            checkpoint=sft.checkpoint,
        )
        if sft.method == "lora":
            lora = MultiLoRA(lm.model, 1, LoRASpec(sft.r, sft.alpha, tuple(sft.target_modules)))
            lora.reset(0, seed)
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            st = train_adapters(lm.model, lora, [AdapterJob(0, examples, seed, hp)], pad)[0]
            lora.save_peft(0, ckpt_dir, base_model_name=cfg.model)
            lora.merge(0)
            lora.remove()
        else:
            st = full_fine_tune(lm.model, examples, hp, seed, tok)
            from safetensors.torch import save_file

            ckpt_dir.mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in lm.model.state_dict().items()},
                str(ckpt_dir / "model.safetensors"),
            )
        info.update(
            loss_first=st.losses[0], loss_last=st.losses[-1], steps=st.steps, tokens=st.tokens
        )
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ckpt_dir / "update.json", info)  # written last: marks the update complete
    return info


def _read_update_info(ckpt_dir) -> dict:
    import json

    return json.loads((ckpt_dir / "update.json").read_text())


def read_generator_update(ckpt_dir, cfg: RunConfig) -> dict | None:
    """A finished round's generator update as plain data (CPU tensors), or None if the round
    wrote none: {"kind": "lora", "spec": LoRASpec, "state": {...}} (merged when applied) or
    {"kind": "full", "state": state_dict}. Workers of a distributed executor receive it."""
    if not (ckpt_dir / "update.json").exists():
        return None
    from safetensors.torch import load_file

    if (ckpt_dir / "adapter_model.safetensors").exists():
        sft = cfg.rest_em.sft
        tensors = load_file(str(ckpt_dir / "adapter_model.safetensors"))
        prefix = "base_model.model."
        state = {}
        for key, t in tensors.items():
            name, _, kind = key.removeprefix(prefix).rpartition(".lora_")
            state[f"{name}.lora_{kind.split('.')[0]}"] = t.T
        spec = LoRASpec(sft.r, sft.alpha, tuple(sft.target_modules))
        return {"kind": "lora", "spec": spec, "state": state}
    if (ckpt_dir / "model.safetensors").exists():
        return {"kind": "full", "state": load_file(str(ckpt_dir / "model.safetensors"))}
    return None


def apply_generator_update(lm, update: dict | None) -> None:
    """Apply an update from read_generator_update exactly as the round applied it."""
    if update is None:
        return
    if update["kind"] == "lora":
        lora = MultiLoRA(lm.model, 1, update["spec"])
        lora.load_state(0, update["state"])
        lora.merge(0)
        lora.remove()
    else:
        lm.model.load_state_dict(update["state"], strict=False)


def load_generator_update(lm, ckpt_dir, cfg: RunConfig) -> None:
    """Apply a finished round's generator update from disk, exactly as it was applied."""
    apply_generator_update(lm, read_generator_update(ckpt_dir, cfg))


def runner_from_config(cfg_dict: dict, lm):
    """The domain's inner-loop runner on `lm`, from a plain config: what a worker of a
    distributed executor builds (it needs no data files, only the model)."""
    cfg = from_dict(RunConfig, cfg_dict)
    if cfg.domain == "knowledge":
        from seal.domains.knowledge import KnowledgeRunner

        return KnowledgeRunner(lm, cfg.inner_loop, cfg.judge.build())
    from seal.domains.arc.domain import ArcRunner
    from seal.domains.arc.ttt import parse_arc_settings

    return ArcRunner(lm, cfg.inner_loop, parse_arc_settings(cfg.arc))


def make_executor(cfg: RunConfig, domain: Domain, student, restored: list, log=print):
    """The configured executor over the student (the model the inner loops adapt)."""
    e = cfg.executor
    if e.kind == "inprocess":
        return build_executor("inprocess", lambda: domain.make_runner(student))
    import functools

    spec = WorkerSpec(
        cfg.model,
        cfg.device,
        cfg.dtype,
        functools.partial(runner_from_config, to_dict(cfg)),
        # Workers load the student from scratch: in self mode it carries the updates so far.
        updates=restored if not cfg.teacher_model else [],
    )
    if e.kind == "processes":
        return build_executor(
            "processes",
            None,
            spec,
            workers=e.workers,
            threads_per_worker=int(e.cpus_per_worker),
            max_retries=e.max_retries,
            log=log,
        )
    return build_executor(
        "ray",
        None,
        spec,
        workers=e.workers,
        address=e.address,
        cpus_per_worker=e.cpus_per_worker,
        gpus_per_worker=e.gpus_per_worker,
        max_retries=e.max_retries,
        log=log,
    )


def full_fine_tune(model, examples, hp: TrainHP, seed: int, tok):
    """Full fine-tuning (all weights) with AdamW — the option beside LoRA for the generator."""
    import torch.nn.functional as F

    from seal.training import (
        AdapterJob,
        TrainStats,
        batch_plan,
        causal_lm_parts,
        checkpointed,
        lr_factor,
        pad_right,
    )

    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    decoder, head = causal_lm_parts(model)
    device = next(model.parameters()).device
    batches = batch_plan(AdapterJob(0, examples, seed, hp))  # the LoRA path's batches
    st = TrainStats([], 0, 0, 0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    try:
        with checkpointed(decoder, hp.checkpoint):
            for step, batch in enumerate(batches):
                ids, mask = pad_right([(e.input_ids, e.loss_mask) for e in batch], pad, device)
                hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
                tm = mask[:, 1:]
                loss = F.cross_entropy(head(hidden[:, :-1][tm]).float(), ids[:, 1:][tm])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm or 1e9)
                for g in opt.param_groups:
                    g["lr"] = hp.lr * lr_factor(hp.schedule, step, len(batches), 0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                st.losses.append(float(loss))
                st.steps += 1
                st.tokens += int(tm.sum())
    finally:
        for p in params:
            p.requires_grad_(False)
        del opt
    return st


# --------------------------------------------------------------------------------------------
# Domains and output


def build_domain(cfg: RunConfig, log=print) -> Domain:
    if cfg.domain == "knowledge":
        from seal.domains.knowledge import DataError, KnowledgeDomain, load_passages

        train = [p for p in load_passages(cfg.data.train, "train") if p.questions]
        ev = [p for p in load_passages(cfg.data.eval, "eval") if p.questions]
        for name, got in (("data.train", train), ("data.eval", ev)):
            if not got:
                raise DataError(
                    f"{getattr(cfg.data, name[5:])} ({name}): no passages with questions"
                )
        return KnowledgeDomain(train, ev, cfg.self_edit, cfg.inner_loop, cfg.judge.build())
    from seal.domains.arc.domain import ArcDomain

    return ArcDomain.from_config(cfg)


def format_round(m: dict) -> str:
    def pct(x):
        return "  n/a" if x is None else f"{100 * x:5.1f}"

    return (
        f"round {m['round']}: eval {pct(m['eval_mean'])} [{pct(m['eval_ci_low'])}, "
        f"{pct(m['eval_ci_high'])}] (n={m['eval_n']})  reward mean {pct(m['reward_mean'])}"
        f"  kept {m['n_kept']}  {m['seconds']:.0f}s"
    )


def resolved_config_yaml(cfg: RunConfig) -> str:
    import yaml

    header = "# The resolved config of this run (seal run --resume DIR continues it).\n"
    return header + yaml.safe_dump(to_dict(cfg), sort_keys=False)
