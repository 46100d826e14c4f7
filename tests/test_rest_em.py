"""ReST-EM runs on the tiny model: files, selection, resume after SIGKILL == uninterrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seal.config import from_dict, validate_tree
from seal.rest_em import RestEMConfig, RunConfig, select

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "model=tiny-random",
    "rounds=2",
    "data.n_train=2",
    "data.n_eval=2",
    "self_edit.n_samples=2",
    "self_edit.max_new_tokens=24",
    "inner_loop.epochs=2",
    "inner_loop.max_new_tokens=8",
    "rest_em.repeats=2",
    "rest_em.sft.epochs=1",
    "logging.progress=false",
    "rest_em.min_reward=-1",
]
KEYS = ("round", "eval_mean", "eval_n", "eval_ci_low", "eval_ci_high", "reward_mean", "n_kept")


def seal_run(*args, threads: int | None = None, env_extra: dict | None = None, **kw):
    env = {**os.environ, **(env_extra or {})}
    if threads:  # two runs side by side on 2 cores: oversubscribed OpenMP threads crawl
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen(
        [sys.executable, "-m", "seal", "run", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def metrics(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


def assert_resumed_like(reference: Path, d: Path, job_files: tuple[str, ...]) -> None:
    """The resumed run in ``d`` recomputed no finished inner loop (each job key in ``job_files``,
    paths relative to ``d``, appears once; a torn last line is skipped) and its metrics equal
    those of the uninterrupted run in ``reference``."""
    for rel in job_files:
        keys = [
            json.loads(x)["key"]
            for x in (d / rel).read_text().splitlines()
            if x.strip().endswith("}")
        ]
        assert len(keys) == len(set(keys)), f"{rel}: an inner loop was recomputed"
    a = [{k: m[k] for k in KEYS} for m in metrics(reference)]
    b = [{k: m[k] for k in KEYS} for m in metrics(d)]
    assert a == b


def test_run_writes_the_run_directory(tmp_path):
    d = tmp_path / "run"
    p = seal_run("configs/demo.yaml", *SMALL, "--run-dir", str(d))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    m = metrics(d)
    assert [x["round"] for x in m] == [0, 1, 2]
    for line in m:
        assert set(KEYS) | {"seconds"} <= line.keys()
    assert (d / "config.yaml").exists() and (d / "state.json").exists()
    assert json.loads((d / "state.json").read_text())["phase"] == "finished"
    scored = [json.loads(x) for x in (d / "self_edits" / "round_1.jsonl").read_text().splitlines()]
    assert len(scored) == 2 * 2  # contexts x samples
    assert all(len(s["seeds"]) == 2 and "reward" in s for s in scored)
    assert sum(s["kept"] for s in scored) == m[1]["n_kept"] == 2  # best of M per context
    assert (d / "checkpoints" / "round_1" / "adapter_model.safetensors").exists()
    assert (d / "checkpoints" / "round_1" / "adapter_config.json").exists()
    report = (d / "report.md").read_text()
    assert "| 2 |" in report and (d / "plots" / "accuracy.png").exists()
    assert "report:" in out


def test_sigkill_mid_round_then_resume_equals_uninterrupted(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    p = seal_run("configs/demo.yaml", *SMALL, "--run-dir", str(ref), threads=1)
    p2 = seal_run("configs/demo.yaml", *SMALL, "--run-dir", str(cut), threads=1)
    # Kill the second run as soon as round 1 has finished some inner loops.
    jobs = cut / "self_edits" / "round_1.jobs.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p2.poll() is None:
        if jobs.exists() and jobs.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    assert p2.poll() is None, "run finished before it could be killed"
    p2.send_signal(signal.SIGKILL)
    p2.wait()
    n_done = jobs.read_text().count("\n")
    assert n_done >= 1
    assert p.wait(timeout=600) == 0
    r = seal_run("--resume", str(cut), threads=1)
    out, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    # No finished inner loop was recomputed: every job key appears once.
    keys = [json.loads(x)["key"] for x in jobs.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 2 * 2 * 2
    a = [{k: m[k] for k in KEYS} for m in metrics(ref)]
    b = [{k: m[k] for k in KEYS} for m in metrics(cut)]
    assert a == b


def test_selection_rules():
    scored = [
        {"ctx_id": "a", "sample": 0, "reward": 0.2, "baseline": 0.3},
        {"ctx_id": "a", "sample": 1, "reward": 0.6, "baseline": 0.3},
        {"ctx_id": "a", "sample": 2, "reward": 0.6, "baseline": 0.3},
        {"ctx_id": "b", "sample": 0, "reward": 0.0, "baseline": 0.0},
        {"ctx_id": "c", "sample": 0, "reward": 0.4, "baseline": 0.5},
        {"ctx_id": "c", "sample": 1, "reward": None, "baseline": 0.5},
    ]
    cfg = RestEMConfig()
    best = select(scored, "best", cfg)
    assert [(s["ctx_id"], s["sample"]) for s in best] == [("a", 1), ("c", 0)]
    assert [(s["ctx_id"], s["sample"]) for s in select(scored, "relative", cfg)] == [("a", 1)]
    cfg.threshold = 0.4
    assert len(select(scored, "threshold", cfg)) == 3


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_loads_and_validates(name):
    from seal.bench import BenchConfig
    from seal.config import read_yaml

    data = read_yaml(ROOT / "configs" / name)
    # bench-*.yaml are `seal bench --config` presets, the others `seal run` configs.
    cfg = from_dict(BenchConfig if name.startswith("bench") else RunConfig, data)
    validate_tree(cfg)


def test_resume_refuses_a_non_run(tmp_path):
    r = seal_run("--resume", str(tmp_path))
    out, err = r.communicate(timeout=120)
    assert r.returncode == 2 and "not a run directory" in err


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref") / "run"
    p = seal_run("configs/demo.yaml", *SMALL, "rounds=1", "--run-dir", str(d))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    return d


@pytest.mark.parametrize(
    "point",
    [
        "phase:sample",
        "phase:score",
        "after_chunk",
        "phase:sft",
        "phase:eval",
        "phase:report",
        "torn_write",
    ],
)
def test_sigkill_at_every_phase_then_resume(tmp_path, reference_run, point):
    d = tmp_path / "run"
    p = seal_run(
        "configs/demo.yaml",
        *SMALL,
        "rounds=1",
        "--run-dir",
        str(d),
        env_extra={"SEAL_FAILPOINT": point},
    )
    out, err = p.communicate(timeout=600)
    assert p.returncode == -signal.SIGKILL, (p.returncode, err)
    r = seal_run("--resume", str(d))
    out, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    if point == "torn_write":
        assert "truncated or corrupt" in err
    assert_resumed_like(
        reference_run, d, ("self_edits/round_1.jobs.jsonl", "eval/round_0.jobs.jsonl")
    )
    assert json.loads((d / "state.json").read_text())["phase"] == "finished"
    assert (d / "report.md").exists()


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path):
    """Kill a run at seeded random moments (whatever it is doing: sampling, training, writing),
    resume each time, until it finishes: nothing finished is recomputed and the metrics equal
    an uninterrupted run's. Prints the number of kills survived."""
    import random

    # Longer inner loops than SMALL, one per chunk (each saved as it ends), so the work, not
    # the ~4 s start-up, fills most of a run and every life can finish some inner loops.
    args = [
        "configs/demo.yaml",
        *SMALL,
        "rounds=1",
        "inner_loop.epochs=40",
        "inner_loop.capacity=1",
    ]
    files = ("self_edits/round_1.jobs.jsonl", "eval/round_0.jobs.jsonl", "eval/round_1.jobs.jsonl")

    def n_done(run: Path) -> int:
        return sum(len((run / f).read_text().splitlines()) for f in files if (run / f).exists())

    ref = tmp_path / "ref"
    t0 = time.monotonic()
    p = seal_run(*args, "--run-dir", str(ref))
    while not (ref / "state.json").exists() and p.poll() is None:
        time.sleep(0.05)
    startup = time.monotonic() - t0
    assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
    work = time.monotonic() - t0 - startup
    # Each life is killed after its start-up plus 5-50% of the work, so it dies mid-work and
    # at least two lives die before the run can finish.
    rng = random.Random(20261126)
    d, kills, finished, progressed = tmp_path / "run", 0, False, 0
    for _ in range(12):
        before = n_done(d)
        p = seal_run(*(["--resume", str(d)] if d.exists() else [*args, "--run-dir", str(d)]))
        try:
            p.wait(timeout=startup + rng.uniform(0.05, 0.5) * work)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
            progressed += n_done(d) > before
            continue
        assert p.returncode == 0, p.stderr.read()[-2000:]
        finished = True
        break
    if not finished:
        p = seal_run("--resume", str(d))
        assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
    assert_resumed_like(ref, d, files)
    assert kills >= 2 and progressed >= 2  # killed mid-work, more than once
    print(
        f"random SIGKILLs survived: {kills}, {progressed} after finishing some inner loops "
        f"(start-up {startup:.1f} s, work {work:.1f} s)"
    )


def test_full_fine_tune_learns_and_checkpointing_changes_nothing(tiny):
    """The full fine-tuning option of the generator update: losses fall, all weights are
    frozen again afterwards, and activation checkpointing gives the same losses."""
    import copy

    import torch

    from seal.rest_em import full_fine_tune
    from seal.training import TrainHP, text_example

    tok = tiny.tokenizer
    examples = [
        text_example(tok, t, 64) for t in ("The Varrow lighthouse was built in 1843.", "x y z")
    ]
    losses = []
    for checkpoint in (False, True):
        model = copy.deepcopy(tiny.model)  # the shared tiny model stays untouched
        hp = TrainHP(lr=1e-3, epochs=4, batch_size=2, checkpoint=checkpoint)
        st = full_fine_tune(model, examples, hp, seed=0, tok=tok)
        assert st.steps == 4 and st.losses[-1] < st.losses[0]
        assert not any(p.requires_grad for p in model.parameters())
        losses.append(st.losses)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
