"""Security: no code execution from files or model output, keys never written, no path escape."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from seal.runs import RunDir, safe_child

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "model=tiny-random",
    "rounds=1",
    "data.n_train=1",
    "data.n_eval=1",
    "self_edit.n_samples=2",
    "self_edit.max_new_tokens=8",
    "inner_loop.epochs=1",
    "inner_loop.max_new_tokens=4",
    "rest_em.repeats=1",
    "logging.progress=false",
]


def test_no_pickle_eval_or_exec_in_the_package():
    bad = re.compile(r"\bpickle\b|torch\.load\(|(?<![.\w])eval\(|(?<![.\w])exec\(|yaml\.load\(")
    hits = []
    for path in (ROOT / "src" / "seal").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if bad.search(code) and "Nothing here uses pickle" not in line:
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, hits


@pytest.mark.parametrize(
    "name", ["../evil", "..", "a/../../b", "/etc/passwd", "", ".hidden", "x" * 200, "a\x00b"]
)
def test_names_from_data_cannot_leave_the_run_directory(tmp_path, name):
    with pytest.raises(ValueError):
        safe_child(tmp_path, name)


def test_safe_names_stay_inside(tmp_path):
    assert safe_child(tmp_path, "round_1.jsonl").parent == tmp_path
    assert RunDir(tmp_path).file("self_edits", "round_1.jsonl").is_relative_to(tmp_path)


def test_planted_api_key_never_reaches_the_run_directory(tmp_path):
    key = "sk-planted-" + "9f3b2c7d1e" * 3
    env = {**os.environ, "SEAL_TEST_KEY": key, "OPENAI_API_KEY": key}
    d = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "seal",
            "run",
            "configs/demo.yaml",
            *SMALL,
            "--run-dir",
            str(d),
            "judge.api_key_env=SEAL_TEST_KEY",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert key not in r.stdout and key not in r.stderr
    for path in d.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), f"key found in {path}"
    cfg = (d / "config.yaml").read_text()
    assert "api_key_env: SEAL_TEST_KEY" in cfg  # the variable's name, never its value


def test_arc_task_ids_with_path_parts_are_rejected(tmp_path):
    from seal.domains.arc.data import TaskLoadError, load_arc_prize_json

    bad = tmp_path / "challenges.json"
    bad.write_text(
        json.dumps(
            {"../evil": {"train": [{"input": [[1]], "output": [[1]]}], "test": [{"input": [[1]]}]}}
        )
    )
    with pytest.raises(TaskLoadError):
        load_arc_prize_json(bad)
