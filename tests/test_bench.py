"""`seal bench`: its baselines do the same work as seal, and it writes the promised figures."""

import json
import os
from pathlib import Path

import pytest
import torch

from seal.bench import BenchConfig, _jobs, run_bench, run_peft
from seal.domains.knowledge import demo_path, load_passages, load_teacher_self_edits
from seal.inner_loop import InnerLoop, InnerLoopConfig


def _bench_jobs(n: int, epochs: int = 2):
    cfg = BenchConfig(model="tiny-random", n=n, ref_pad=320)  # > the longest sequence
    cfg.inner_loop = InnerLoopConfig(epochs=epochs, lr=1e-3, max_new_tokens=8)
    passages = [p for p in load_passages(cfg.data) if p.questions]
    edits = load_teacher_self_edits(str(demo_path("teacher_self_edits")), passages)
    return cfg, _jobs(cfg, passages, edits, n)


@pytest.mark.parametrize("style", ["sequential", "reference"])
def test_peft_baselines_train_and_answer_like_seal(tiny, style):
    """The PEFT baselines start from seal's initial adapter, take the same batches and
    reach the same losses and greedy answers as seal's engine: the bench compares the speed
    of one computation, not of different ones."""
    cfg, jobs = _bench_jobs(2)
    theirs = run_peft(tiny, cfg, jobs, style)
    inner = InnerLoop(tiny, InnerLoopConfig(**{**vars(cfg.inner_loop), "capacity": 2}))
    try:
        ours = inner.run(jobs)
    finally:
        inner.close()
    assert not any("lora" in n for n, _ in tiny.model.named_modules())  # left unwrapped
    for a, b in zip(theirs, ours, strict=True):
        assert a.key == b.key and len(a.losses) == len(b.losses) > 2
        torch.testing.assert_close(
            torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-3, atol=1e-3
        )
        assert a.losses[-1] < a.losses[0]  # it learned
        assert a.answers == b.answers
        assert a.metrics == b.metrics


def test_bench_writes_every_figure(tmp_path):
    from seal.cli import main

    out = tmp_path / "bench.json"
    code = main(
        [
            "bench", "--model", "tiny-random", "--n", "2", "n_reference=1", "ref_pad=64",
            "inner_loop.epochs=1", "inner_loop.max_new_tokens=4", "sample_passages=1",
            "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    res = json.loads(out.read_text())
    assert set(res["modes"]) == {"reference", "sequential", "capacity1", "seal_inprocess", "seal"}
    for mode in res["modes"].values():
        assert mode["evals_per_hour"] > 0
        assert {"mean", "ci_low", "ci_high", "n"} <= set(mode["accuracy"])
    for key in (
        "speedup_vs_reference",
        "speedup_vs_sequential",
        "speedup_vs_capacity1",
        "speedup_vs_seal_inprocess",
    ):
        assert res[key] > 0
    assert 0 < res["mfu"] < 1
    # what PyTorch reaches on the frozen base alone, on passes of seal's mean length
    assert 0 < res["frozen_base_mfu"] < 1 and res["frozen_base_tokens"] >= 2
    assert res["modes"]["seal"]["train_passes"] > 0
    assert res["peak_rss_gb"] > 0 and res["sampling_tokens_per_s"] > 0
    assert res["modes"]["seal"]["train_gflops"] > 0
    # seal's mode ran on a worker process per core, at most one per self-edit (this process
    # when that is one)
    assert res["modes"]["seal"].get("workers", 1) == min(2, len(os.sched_getaffinity(0)))
    # the peak RSS is the largest process's, the workers' included
    assert res["modes"]["seal"].get("worker_peak_rss_gb", 0) <= res["peak_rss_gb"]
    assert 0 < res["modes"]["seal_inprocess"]["mfu"] < 1
    assert res["complete"] is True
    assert res["inner_loop"]["epochs"] == 1 and res["inner_loop"]["max_new_tokens"] == 4


def test_bench_keeps_figures_of_finished_modes():
    """`on_mode` sees the figures after every mode, so a bench stopped part-way keeps them."""
    seen = []
    cfg = BenchConfig(
        model="tiny-random", n=1, modes=("sequential", "seal"), sample_passages=0, workers=1,
        isolate=False,
        inner_loop=InnerLoopConfig(epochs=1, max_new_tokens=4),
    )  # fmt: skip
    res = run_bench(cfg, log=lambda *_: None, on_mode=lambda r: seen.append(list(r["modes"])))
    assert seen == [["sequential"], ["sequential", "seal"]]
    assert res["complete"] is True


def test_bench_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown bench mode"):
        BenchConfig(modes=("reference", "fast"))


def test_time_limit_stops_a_mode_after_the_running_self_edit_or_group():
    """With a time limit, each mode finishes what it is running when time is up (one
    self-edit one at a time; the whole group in seal mode) and reports rates over that."""
    cfg = BenchConfig(
        model="tiny-random", n=3, modes=("sequential", "capacity1", "seal"), sample_passages=0,
        capacity=3, time_limit=1e-9, workers=1, isolate=False,
        inner_loop=InnerLoopConfig(epochs=1, max_new_tokens=4),
    )  # fmt: skip
    res = run_bench(cfg, log=lambda *_: None)
    m = res["modes"]
    assert m["sequential"]["self_edits"] == m["capacity1"]["self_edits"] == 1
    assert m["sequential"]["stopped_at_time_limit"] and m["capacity1"]["stopped_at_time_limit"]
    assert m["seal"]["self_edits"] == 3 and "stopped_at_time_limit" not in m["seal"]
    assert res["speedup_vs_sequential"] > 0


def test_gpu_preset_loads():
    from pathlib import Path

    from seal.cli import _load_config

    path = Path(__file__).parent.parent / "configs" / "bench-gpu.yaml"
    cfg = _load_config(BenchConfig, str(path), {}, ["model=tiny-random"])
    assert cfg.modes[0] == "seal" and cfg.time_limit > 0 and cfg.n > 8
    assert cfg.inner_loop.epochs == 10


def test_repeats_alternate_the_order_and_report_each_modes_median_round():
    """With repeats, the modes run in alternating order round after round (reference once);
    each mode's figures are its median round's, with every round's seconds beside them."""
    lines = []
    cfg = BenchConfig(
        model="tiny-random", n=1, n_reference=1, ref_pad=64, sample_passages=0, repeats=3,
        modes=("reference", "sequential", "seal"), workers=1, isolate=False,
        inner_loop=InnerLoopConfig(epochs=1, max_new_tokens=4),
    )  # fmt: skip
    res = run_bench(cfg, log=lines.append)
    order = [ln.split()[1] for ln in lines if "evals/h" in ln]
    assert order == ["reference", "sequential", "seal", "seal", "sequential", "sequential", "seal"]
    m = res["modes"]
    assert "rounds_seconds_per_eval" not in m["reference"]
    for mode in ("sequential", "seal"):
        rounds = m[mode]["rounds_seconds_per_eval"]
        assert len(rounds) == 3 and m[mode]["seconds_per_eval"] == sorted(rounds)[1]
    assert len(res["speedup_vs_sequential_rounds"]) == 3
    with pytest.raises(ValueError, match="repeats"):
        BenchConfig(repeats=0)


def test_freed_heap_memory_goes_back_to_the_system():
    """Memory freed between modes is handed back (glibc), so that the next mode's capacity,
    chosen from free memory, does not lose it: 200 MB of small tensors, every tenth kept
    alive so that the freed rest stays inside the heap."""
    import ctypes.util

    from seal.bench import release_freed_memory

    if ctypes.util.find_library("c") is None or not Path("/proc/self/status").exists():
        pytest.skip("needs Linux with glibc")

    def rss_mb():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    release_freed_memory()
    base = rss_mb()
    tensors = [torch.ones(16 * 1024) for _ in range(3200)]  # 64 KB each, under mmap's threshold
    kept = tensors[::10]
    del tensors
    held = rss_mb()
    release_freed_memory()
    after = rss_mb()
    assert held - base > 150
    assert held - after > 100, (base, held, after)
    del kept


def test_isolated_modes_give_the_figures_of_modes_run_in_this_process():
    """On a CPU each mode can run in a fresh process of its own: same self-edits, answers
    (so accuracy) and training figures as in this process, with that process's peak RSS."""
    kw = dict(
        model="tiny-random", n=2, modes=("sequential", "seal_inprocess"), sample_passages=0,
        workers=1, inner_loop=InnerLoopConfig(epochs=1, max_new_tokens=4),
    )  # fmt: skip
    here = run_bench(BenchConfig(**kw, isolate=False), log=lambda *_: None)["modes"]
    res = run_bench(BenchConfig(**kw, isolate=True), log=lambda *_: None)
    fresh = res["modes"]
    for mode in ("sequential", "seal_inprocess"):
        assert fresh[mode]["accuracy"] == here[mode]["accuracy"]
        assert fresh[mode]["self_edits"] == here[mode]["self_edits"] == 2
        assert 0 < fresh[mode]["process_peak_rss_gb"] <= res["peak_rss_gb"]
        assert "process_peak_rss_gb" not in here[mode]
    for key in ("train_tokens", "train_input_tokens", "train_gflops"):
        assert fresh["seal_inprocess"][key] == here["seal_inprocess"][key]


def test_frozen_base_mfu_leaves_the_model_and_threads_as_they_were(tiny):
    """The ceiling figure runs the bare model forward and back to its inputs only: no weight
    gradient is made, and the model's trainable flags and this process's threads come back."""
    from seal.bench import frozen_base_mfu

    flags = [p.requires_grad for p in tiny.model.parameters()]
    threads = torch.get_num_threads()
    mfu = frozen_base_mfu(tiny, 24, peak=1e12, threads=1, share=2, repeats=2)
    assert 0 < mfu < 1
    assert [p.requires_grad for p in tiny.model.parameters()] == flags
    assert all(p.grad is None for p in tiny.model.parameters())
    assert torch.get_num_threads() == threads
