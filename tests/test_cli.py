"""The `seal` command end to end on the tiny model."""

import json
import subprocess
import sys


def seal(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "seal", *args], capture_output=True, text=True, timeout=timeout
    )


def test_baselines_tiny_demo_four_rows(tmp_path):
    out = tmp_path / "out.json"
    r = seal(
        "baselines",
        "--model",
        "tiny-random",
        "--data",
        "demo",
        "--limit",
        "3",
        "--json",
        str(out),
        "self_edit.n_samples=2",
        "self_edit.max_new_tokens=24",
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [x["row"] for x in rows] == ["base", "passage", "own", "teacher"]
    for x in rows:
        assert {"mean", "n", "ci_low", "ci_high"} <= x.keys()
        assert x["n"] > 0 and x["ci_low"] <= x["mean"] <= x["ci_high"]


def test_models_lists_presets():
    r = seal("models", "--json")
    assert r.returncode == 0, r.stderr
    names = {m["name"] for m in json.loads(r.stdout)}
    assert {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "tiny-random"} <= names


def test_bad_override_is_one_line_error():
    r = seal("baselines", "--model", "tiny-random", "inner_loop.epochz=3")
    assert r.returncode == 2
    assert "inner_loop.epochz: unknown key (did you mean 'epochs'?)" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_data_file_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    r = seal("baselines", "--model", "tiny-random", "--data", str(bad))
    assert r.returncode == 2 and "record 0: expected an object" in r.stderr
    assert "Traceback" not in r.stderr
