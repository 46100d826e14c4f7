"""Property-based tests (hypothesis) for every parser of file contents or model output.

Each parser is fed arbitrary text, arbitrary bytes written to a file (non-UTF-8 included),
wrongly shaped JSON, and "near-valid" records (the right shape with some fields missing or
replaced by anything). The promise checked everywhere: a value, or the parser's documented
user-facing error (DataError, TaskLoadError, ConfigError) whose message names the file and
the record or field; never another exception. Round trips and idempotence are checked where
they exist. More never-raises tests for model output are in test_arc_data.py (grids, the ARC
self-edit) and test_grading.py; the shared hypothesis profile is in conftest.py.
"""

from __future__ import annotations

import json
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seal.config import ConfigError, from_dict, parse_overrides, read_yaml, validate_tree
from seal.domains.arc import (
    ORACLE_CONFIG,
    Task,
    TaskLoadError,
    load_arc_prize_json,
    load_task_file,
    parse_self_edit,
    task_from_json,
)
from seal.domains.arc.self_edit import MAX_JSON_DEPTH, MAX_SELF_EDIT_CHARS
from seal.domains.knowledge import (
    PROMPTS,
    DataError,
    Passage,
    SelfEditPrompt,
    load_passages,
    load_teacher_self_edits,
    passage_id,
    self_edit_items,
    training_texts,
)
from seal.grading import (
    VerdictCache,
    contains,
    exact_match,
    f1,
    first_sentence,
    normalize_answer,
    strict_contains,
)
from seal.rest_em import RunConfig, resolved_config_yaml
from seal.runs import append_jsonl, read_jsonl


def cases(n: int) -> settings:
    """`n` examples; everything else comes from the shared profile in conftest.py."""
    return settings(max_examples=n)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One directory for the module; each example overwrites its files (a function-scoped
    tmp_path would be shared by all the examples of a test anyway, and hypothesis warns)."""
    return tmp_path_factory.mktemp("parsers")


# ------------------------------------------------------------------------------ strategies

# Text as JSON can carry it: any code point, lone surrogates included (json.dumps escapes them).
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=30)
LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON = st.recursive(
    LEAVES,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=20,
)


def maybe(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly `valid`, sometimes any JSON value (a wrongly typed field)."""
    return st.integers(0, 4).flatmap(lambda roll: JSON if roll == 0 else valid)


@st.composite
def shaped(draw, fields: dict, optional: frozenset = frozenset()):
    """An object with these fields: each present and valid most of the time, sometimes
    missing (always possible for `optional` ones) or any JSON; sometimes an unknown key."""
    out = {}
    for key, valid in fields.items():
        roll = draw(st.integers(0, 9))
        if roll == 0 or (key in optional and roll < 5):
            continue
        out[key] = draw(JSON if roll == 1 else valid)
    if draw(st.integers(0, 9)) == 0:
        out[draw(st.text(max_size=8))] = draw(JSON)
    return out


ANSWERS = st.one_of(
    ANY_TEXT,
    st.lists(ANY_TEXT, max_size=3),
    st.lists(shaped({"text": ANY_TEXT}), max_size=3),
)
QUESTION = shaped(
    {"question": ANY_TEXT, "answer": ANSWERS, "answers": ANSWERS}, frozenset({"answers"})
)
RECORD = shaped(
    {"title": ANY_TEXT, "context": ANY_TEXT, "questions": st.lists(maybe(QUESTION), max_size=3)},
    frozenset({"questions"}),
)
SQUAD_QA = shaped(
    {"question": ANY_TEXT, "answers": st.lists(shaped({"text": ANY_TEXT}), max_size=3)}
)
SQUAD_PARAGRAPH = shaped({"context": ANY_TEXT, "qas": st.lists(maybe(SQUAD_QA), max_size=3)})
SQUAD = shaped(
    {
        "data": st.lists(
            maybe(shaped({"title": ANY_TEXT, "paragraphs": st.lists(maybe(SQUAD_PARAGRAPH))})),
            max_size=3,
        )
    }
)
TEACHER_RECORD = shaped(
    {"title": ANY_TEXT, "context": ANY_TEXT, "completions": st.lists(ANY_TEXT, max_size=3)}
)

# A DataError message names the problem: a field, or what was expected instead.
_NAMES_PROBLEM = re.compile(r"field '[\w\[\]]+'|expected |invalid JSON|duplicate key|not UTF-8")


def _write(path, content) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(json.dumps(content), encoding="utf-8")


def _check_data_error(err: DataError, path, data, squad: bool = True) -> None:
    msg = str(err)
    assert msg.startswith(f"{path}: "), msg
    assert _NAMES_PROBLEM.search(msg), msg
    if isinstance(data, list) and data:
        assert re.search(r": record \d+", msg), msg  # which record
    if squad and isinstance(data, dict) and isinstance(data.get("data"), list) and data["data"]:
        assert ": data[" in msg, msg  # which article


def _check_passages(ps) -> None:
    for p in ps:
        assert isinstance(p, Passage) and p.id == passage_id(p.title, p.context)
        assert p.title.strip() and p.context.strip()
        for q in p.questions:
            assert q.question.strip() and q.answers
            assert all(isinstance(a, str) for a in q.answers)


# ------------------------------------------------------------------ knowledge: data files


@cases(150)
@given(st.one_of(JSON, st.lists(maybe(RECORD), max_size=4), SQUAD))
def test_load_passages_wrong_shapes(scratch, data):
    path = scratch / "passages.json"
    _write(path, data)
    try:
        ps = load_passages(str(path))
    except DataError as e:
        _check_data_error(e, path, data)
    else:
        _check_passages(ps)


@cases(300)
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_load_passages_arbitrary_bytes(scratch, raw):
    path = scratch / "raw.json"
    path.write_bytes(raw)
    try:
        ps = load_passages(str(path))
    except DataError as e:
        assert str(e).startswith(f"{path}: ") and _NAMES_PROBLEM.search(str(e)), str(e)
    else:
        _check_passages(ps)


NAME = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=20).filter(str.strip)
VALID_RECORD = st.fixed_dictionaries(
    {
        "title": NAME,
        "context": NAME,
        "questions": st.lists(
            st.fixed_dictionaries(
                {"question": NAME, "answers": st.lists(st.text(max_size=10), min_size=1)}
            ),
            max_size=3,
        ),
    }
)


@cases(100)
@given(st.lists(VALID_RECORD, max_size=4))
def test_seal_json_round_trip_and_squad_layout_agree(scratch, records):
    path = scratch / "seal.json"
    _write(path, records)
    ps = load_passages(str(path))
    assert [(p.title, p.context) for p in ps] == [(r["title"], r["context"]) for r in records]
    for p, r in zip(ps, records, strict=True):
        assert [(q.question, list(q.answers)) for q in p.questions] == [
            (q["question"], q["answers"]) for q in r["questions"]
        ]
    # Idempotence: writing the loaded passages back and loading again changes nothing.
    again = [
        {
            "title": p.title,
            "context": p.context,
            "questions": [
                {"question": q.question, "answers": list(q.answers)} for q in p.questions
            ],
        }
        for p in ps
    ]
    _write(path, again)
    assert load_passages(str(path)) == ps
    # The official SQuAD layout of the same content loads to the same passages (titles there
    # write spaces as '_').
    plain = [p for p in ps if "_" not in p.title]
    squad = {
        "data": [
            {
                "title": p.title.replace(" ", "_"),
                "paragraphs": [
                    {
                        "context": p.context,
                        "qas": [
                            {"question": q.question, "answers": [{"text": a} for a in q.answers]}
                            for q in p.questions
                        ],
                    }
                ],
            }
            for p in plain
        ]
    }
    _write(path, squad)
    assert load_passages(str(path)) == plain


@cases(200)
@given(st.one_of(JSON, st.lists(maybe(TEACHER_RECORD), max_size=4)))
def test_teacher_self_edits_wrong_shapes(scratch, data):
    path = scratch / "teacher.json"
    _write(path, data)
    passages = [Passage(passage_id("T", "c"), "T", "c")]
    try:
        out = load_teacher_self_edits(path, passages)
    except DataError as e:
        _check_data_error(e, path, data, squad=False)
    else:
        assert set(out) <= {passages[0].id}
        assert all(isinstance(c, str) for cs in out.values() for c in cs)


@cases(100)
@given(st.lists(st.tuples(NAME, NAME, st.lists(st.text(max_size=30), max_size=3)), max_size=4))
def test_teacher_self_edits_round_trip(scratch, rows):
    path = scratch / "teacher_ok.json"
    _write(path, [{"title": t, "context": c, "completions": cs} for t, c, cs in rows])
    passages = [Passage(passage_id(t, c), t, c) for t, c, _ in rows]
    expected = {passage_id(t, c): cs for t, c, cs in rows}  # a repeated passage: the last wins
    assert load_teacher_self_edits(path, passages) == expected


# ---------------------------------------------------------- knowledge: self-edit splitting

VARIANTS = [
    *PROMPTS.values(),
    SelfEditPrompt("user-cot", "i", "c", split="after_cue", cue_marker="Final:"),
    SelfEditPrompt("user-cot-empty-marker", "i", "", split="after_cue"),  # was a crash
    SelfEditPrompt("user-whole", "i", "Notes:\n", split="whole"),
    SelfEditPrompt("user-qa", "i", "", split="qa"),
]
# Model output: arbitrary text, with the shapes the splitting rules look for mixed in.
SELF_EDIT = st.lists(
    st.one_of(
        st.text(max_size=40),
        st.sampled_from(
            ["\n", "\r\n", "1. ", "- ", "* ", "(2) ", "Question 1:", "Question 12 :", "Answer:"]
        ),
        st.sampled_from(["Implications:", "**Implications:**", "## Notes:", "Final:", "  "]),
    ),
    max_size=12,
).map("".join)


@cases(800)
@given(SELF_EDIT, st.sampled_from(VARIANTS), st.booleans())
def test_self_edit_items_are_stripped_pieces_of_the_text(text, variant, strip):
    items = self_edit_items(text, variant, strip_markers=strip)
    source = variant.cue + text.replace("\r\n", "\n")
    assert all(isinstance(it, str) and it and it == it.strip() for it in items)
    assert all(it in source for it in items)
    if variant.split == "none":
        assert items == []
    elif variant.split == "whole":
        assert items == ([text.replace("\r\n", "\n").strip()] if text.strip() else [])
    elif variant.split in ("lines", "after_cue"):
        assert all("\n" not in it for it in items)
        assert len(items) <= len(text.splitlines())


@cases(200)
@given(st.text(max_size=50), st.integers(1000, 3000), st.sampled_from(VARIANTS))
def test_enormous_self_edits_split_without_error(chunk, repeat, variant):
    items = self_edit_items(chunk * repeat, variant)  # up to 150,000 characters
    assert all(isinstance(it, str) and it for it in items)


@cases(300)
@given(NAME, NAME, st.lists(SELF_EDIT, max_size=3), st.sampled_from(VARIANTS), st.booleans())
def test_training_texts(title, context, completions, variant, include_passage):
    p = Passage(passage_id(title, context), title, context)
    seqs = training_texts(p, completions, variant, include_passage)
    n_items = sum(len(self_edit_items(c, variant)) for c in completions)
    assert all(s.startswith(f"{title}\n") for s in seqs)
    assert len(seqs) == n_items + (1 if include_passage or n_items == 0 else 0)
    if include_passage:
        assert seqs[-1] == f"{title}\n{context.strip()}"


# -------------------------------------------------------------------------- ARC task files

TASK_ID = st.sampled_from(["abc", "0a1b2c3d", "x_y-z"]) | st.text(max_size=8)
GRID_LISTS = st.integers(1, 4).flatmap(
    lambda w: st.lists(st.lists(st.integers(0, 9), min_size=w, max_size=w), min_size=1, max_size=4)
)
CELLISH = st.integers(0, 9) | st.integers(-3, 12) | st.floats() | st.booleans() | st.none()
GRIDISH = maybe(GRID_LISTS) | st.lists(st.lists(CELLISH, max_size=4), max_size=4)
ARC_PAIR = shaped({"input": GRIDISH, "output": GRIDISH})
ARC_TEST = shaped({"input": GRIDISH, "output": GRIDISH}, frozenset({"output"}))
ARC_TASK = shaped(
    {"train": st.lists(maybe(ARC_PAIR), max_size=3), "test": st.lists(maybe(ARC_TEST), max_size=2)}
)


@cases(400)
@given(TASK_ID, st.one_of(JSON, ARC_TASK))
def test_task_from_json_wrong_shapes(task_id, data):
    try:
        task = task_from_json(task_id, data, source="tasks.json")
    except TaskLoadError as e:
        msg = str(e)
        assert msg.startswith("tasks.json: "), msg
        if re.fullmatch(r"[0-9a-zA-Z_-]{1,64}", task_id):
            assert msg.startswith(f"tasks.json: task {task_id!r}: "), msg
        else:
            assert "invalid task id" in msg, msg
    else:
        assert isinstance(task, Task) and task.id == task_id
        assert task.train and task.test_inputs


@cases(120)
@given(
    st.one_of(JSON, st.dictionaries(TASK_ID, ARC_TASK, max_size=3)),
    st.none() | JSON | st.dictionaries(TASK_ID, st.lists(GRIDISH, max_size=2), max_size=3),
)
def test_load_arc_prize_json_wrong_shapes(scratch, challenges, solutions):
    ch, sol = scratch / "challenges.json", scratch / "solutions.json"
    _write(ch, challenges)
    if solutions is not None:
        _write(sol, solutions)
    try:
        tasks = load_arc_prize_json(ch, sol if solutions is not None else None)
    except TaskLoadError as e:
        assert str(e).startswith(("challenges.json: ", "solutions.json: ")), str(e)
    else:
        assert all(isinstance(t, Task) and t.id == k for k, t in tasks.items())


@cases(200)
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_arc_task_file_arbitrary_bytes(scratch, raw):
    path = scratch / "abc.json"
    path.write_bytes(raw)
    try:
        task = load_task_file(path)
    except TaskLoadError as e:
        assert str(e).startswith("abc.json: "), str(e)
    else:
        assert task.id == "abc"


@st.composite
def tasks(draw):
    pairs = draw(st.lists(st.tuples(GRID_LISTS, GRID_LISTS), min_size=1, max_size=3))
    tests = draw(st.lists(st.tuples(GRID_LISTS, GRID_LISTS), min_size=1, max_size=2))
    task_id = draw(st.from_regex(r"[0-9a-f]{8}", fullmatch=True))
    train = tuple((tuple(map(tuple, i)), tuple(map(tuple, o))) for i, o in pairs)
    return Task(
        task_id,
        train,
        tuple(tuple(map(tuple, i)) for i, _ in tests),
        tuple(tuple(map(tuple, o)) for _, o in tests),
    )


@cases(60)
@given(st.lists(tasks(), max_size=3, unique_by=lambda t: t.id))
def test_arc_prize_files_round_trip(scratch, task_list):
    ch, sol = scratch / "rt_challenges.json", scratch / "rt_solutions.json"
    # Inline test outputs, and the ARC-Prize split into challenges + solutions files.
    _write(ch, {t.id: t.to_json_dict() for t in task_list})
    assert list(load_arc_prize_json(ch).values()) == task_list
    bare = {t.id: t.to_json_dict() for t in task_list}
    for d in bare.values():
        for entry in d["test"]:
            del entry["output"]
    _write(ch, bare)
    _write(sol, {t.id: [[list(r) for r in g] for g in t.test_outputs] for t in task_list})
    assert list(load_arc_prize_json(ch, sol).values()) == task_list


# ----------------------------------------------------------------- ARC self-edit: numbers

NUMBER = st.one_of(
    st.floats(),  # NaN and infinities included (json writes NaN/Infinity, which it reads back)
    st.integers(),
    st.integers(-(10**400), 10**400),  # past float range
    st.sampled_from([1e-6, 1e-2, 1e-6 * (1 - 1e-12), 1e-2 * (1 + 1e-12), 0, 1, 10, 11, 2.0, 2.5]),
)


def _in_bounds(value, lo, hi, whole: bool) -> bool:
    try:
        x = float(value)
    except OverflowError:
        return False
    return math.isfinite(x) and lo <= x <= hi and (not whole or x == int(x))


@cases(800)
@given(NUMBER, NUMBER)
def test_parse_self_edit_accepts_exactly_the_in_range_numbers(lr, epochs):
    obj = ORACLE_CONFIG.to_dict()
    obj["training"]["learning_rate"], obj["training"]["num_train_epochs"] = lr, epochs
    res = parse_self_edit("Here is my configuration:\n```json\n" + json.dumps(obj) + "\n```")
    ok = _in_bounds(lr, 1e-6, 1e-2, False) and _in_bounds(epochs, 1, 10, True)
    assert res.ok == ok, res.reason
    if ok:
        assert res.config.num_train_epochs == int(epochs)
        assert res.config.learning_rate == float(lr)
    else:
        assert "learning_rate" in res.reason or "num_train_epochs" in res.reason


@cases(300)
@given(st.integers(0, 20_000), st.sampled_from(['{"a":', "[", '{"__proto__":', '{"../x":[']))
def test_parse_self_edit_deep_nesting_is_a_reason_not_a_crash(depth, opener):
    closer = "]" if opener.endswith("[") else "}"
    text = opener * depth + "1" + closer * depth + ORACLE_CONFIG.to_json()
    res = parse_self_edit(text)
    assert (res.config is None) != (res.reason is None)
    if opener == "[":
        # arrays are skipped: the object after them is read, if it is within the length cap
        assert res.ok == (len(text) <= MAX_SELF_EDIT_CHARS), res.reason
    elif depth > MAX_JSON_DEPTH:
        # the first candidate is too deep; later candidates (inner objects) are tried, but
        # only MAX_JSON_CANDIDATES of them, so the object at the end is not reached
        assert not res.ok


# ------------------------------------------------------------------------------- configs

CONFIG_KEYS = [
    "seed", "rounds", "model", "domain", "data.train", "data.n_train", "self_edit.prompt",
    "self_edit.temperature", "self_edit.top_p", "self_edit.n_samples", "self_edit.extra_prompts",
    "inner_loop.lr", "inner_loop.epochs", "inner_loop.target_modules", "inner_loop.r",
    "inner_loop.schedule", "inner_loop.warmup_ratio", "inner_loop.max_grad_norm",
    "inner_loop.reward_metric", "rest_em.repeats", "judge.timeout", "executor.kind", "arc",
    # misspelled, unknown, or a section given a value
    "inner_loop.epochz", "self_edit", "sed", "inner_loop.lr.x", "x.y.z", "", ".", "a..b",
]  # fmt: skip
YAML_VALUES = st.one_of(
    st.text(max_size=20),
    st.integers().map(str),
    st.floats().map(repr),
    st.sampled_from(
        ["true", "no", "null", "~", "", "[1, 2]", "[q_proj, nope]", "{a: 1}", ".inf", "-.inf",
         ".nan", "-1", "0", "1e-3", "0.5", "3", "linear", "strict", "[", "{", "'", "&a [*a]",
         "{instruction: i, cue: c, split: bad}", "!!python/name:os.system", "2000-01-01"]
    ),
)  # fmt: skip


def _check_config_error(msg: str, names: set[str]) -> None:
    # "override 'a.b=1': ...", or "<key>: ...", "<key>.<field>: ...", "<key>[3]: ..."
    assert msg.startswith("override ") or any(
        msg.startswith(name + sep) for name in names for sep in (":", ".", "[")
    ), msg


@cases(400)
@given(st.lists(st.tuples(st.sampled_from(CONFIG_KEYS) | st.text(max_size=8), YAML_VALUES)))
def test_overrides_give_a_config_or_a_config_error_naming_the_key(pairs):
    items = [f"{k}={v}" for k, v in pairs]
    names = {i.split("=", 1)[0].strip().split(".")[0] for i in items}
    names |= set(RunConfig.__dataclass_fields__)
    try:
        cfg = from_dict(RunConfig, parse_overrides(items))
        validate_tree(cfg)
    except ConfigError as e:
        _check_config_error(str(e), names)


@cases(300)
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_read_yaml_arbitrary_content(scratch, content):
    path = scratch / "config.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    try:
        data = read_yaml(path)
    except ConfigError as e:
        assert str(e).startswith(f"{path}: "), str(e)
        return
    assert isinstance(data, dict)
    try:
        validate_tree(from_dict(RunConfig, data))
    except ConfigError as e:
        names = {str(k).split(".")[0] for k in data} | set(RunConfig.__dataclass_fields__)
        _check_config_error(str(e), names)


PRINTABLE = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=20)
VALID_CONFIG = st.fixed_dictionaries(
    {},
    optional={
        "seed": st.integers(0, 2**31),
        "rounds": st.integers(0, 5),
        "model": PRINTABLE,
        "data": st.fixed_dictionaries({"train": PRINTABLE, "n_eval": st.integers(0, 99)}),
        "self_edit": st.fixed_dictionaries(
            {
                "prompt": st.sampled_from(sorted(PROMPTS)),
                "temperature": st.floats(0.01, 5),
                "top_p": st.floats(0.01, 1),
            }
        ),
        "inner_loop": st.fixed_dictionaries(
            {
                "lr": st.floats(1e-8, 1),
                "target_modules": st.lists(
                    st.sampled_from(["q_proj", "v_proj", "down_proj"]), min_size=1, unique=True
                ),
                "max_grad_norm": st.none() | st.floats(0.1, 10),
            }
        ),
        "arc": st.fixed_dictionaries({"max_examples": st.integers(1, 300)}),
    },
)


@cases(40)
@given(VALID_CONFIG)
def test_resolved_config_round_trips_through_yaml(scratch, data):
    # What `seal run` writes into the run directory is what `--resume` reads back.
    cfg = from_dict(RunConfig, data)
    validate_tree(cfg)
    path = scratch / "resolved.yaml"
    path.write_text(resolved_config_yaml(cfg), encoding="utf-8")
    again = from_dict(RunConfig, read_yaml(path))
    assert again == cfg
    path.write_text(resolved_config_yaml(again), encoding="utf-8")
    assert from_dict(RunConfig, read_yaml(path)) == cfg  # idempotent


# --------------------------------------------------------------------- runs: JSON lines

RECORDS = st.lists(
    st.dictionaries(
        st.text(max_size=5),
        st.none() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
        max_size=3,
    ),
    max_size=6,
)


@cases(100)
@given(RECORDS, st.integers(0, 10_000), RECORDS)
def test_read_jsonl_after_a_torn_write_keeps_every_complete_line(scratch, records, cut, more):
    path = scratch / "torn.jsonl"
    path.write_bytes(b"")
    append_jsonl(path, records)
    raw = path.read_bytes()
    cut = min(cut, len(raw))
    path.write_bytes(raw[:cut])  # a crash in the middle of a write
    # Records whose text (newline aside) lies before the cut survive; nothing else does.
    ends = []
    end = 0
    for r in records:
        end += len((json.dumps(r, separators=(",", ":"))).encode()) + 1
        ends.append(end - 1)
    kept = [r for r, e in zip(records, ends, strict=True) if e <= cut]
    warnings: list[str] = []
    assert read_jsonl(path, warn=warnings.append) == kept
    assert len(warnings) <= 1 and all(str(path) in w and "line " in w for w in warnings)
    append_jsonl(path, more)  # a resumed run appends on a fresh line
    assert read_jsonl(path, warn=lambda m: None) == kept + more


@cases(150)
@given(st.binary(max_size=400) | st.text(max_size=300).map(str.encode))
def test_read_jsonl_and_verdict_cache_read_any_bytes(scratch, raw):
    path = scratch / "any.jsonl"
    path.write_bytes(raw)
    warnings: list[str] = []
    out = read_jsonl(path, warn=warnings.append)
    assert all(isinstance(r, dict) for r in out)
    assert len(out) + len(warnings) == sum(1 for line in raw.split(b"\n") if line.strip())
    (scratch / VerdictCache.FILENAME).write_bytes(raw)
    assert len(VerdictCache(scratch)) <= len(out)


# ------------------------------------------------------------------ grading normalisation

ANSWER_TEXT = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40).map(lambda b: b.decode("utf-8", errors="replace")),
    st.lists(st.sampled_from(["the", "A", "an", "Paris", "10", ".", ",", " ", "\n", "é"])).map(
        " ".join
    ),
)


@cases(700)
@given(ANSWER_TEXT, ANSWER_TEXT)
def test_exact_match_f1_and_strict_on_any_text(pred, gold):
    em, score = exact_match(pred, gold), f1(pred, gold)
    assert em in (0.0, 1.0) and 0.0 <= score <= 1.0
    assert em == exact_match(gold, pred) and score == pytest.approx(f1(gold, pred))
    assert exact_match(pred, pred) == 1.0 and exact_match(normalize_answer(pred), pred) == 1.0
    if em == 1.0 and normalize_answer(gold):
        assert score == pytest.approx(1.0)
    assert strict_contains(pred, gold) <= contains(pred, gold)


@cases(500)
@given(ANSWER_TEXT)
def test_first_sentence_is_a_single_line_prefix(text):
    s = first_sentence(text)
    assert text.strip().startswith(s) and "\n" not in s
    assert first_sentence(s) == s  # idempotent
