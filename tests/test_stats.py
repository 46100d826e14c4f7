"""Tests of seal.stats: bootstrap CIs, clustered CIs, paired comparisons, Wilson intervals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seal.stats import mean_ci, mean_ci_clustered, paired_diff, wilson_ci


def test_mean_ci_empty():
    assert mean_ci([]) == {"mean": None, "n": 0, "ci_low": None, "ci_high": None}


@pytest.mark.parametrize("value", [1.0, 0.0, 0.1])
def test_mean_ci_all_equal(value):
    r = mean_ci([value] * 37)
    assert r["n"] == 37
    assert r["ci_low"] == r["ci_high"] == r["mean"] == pytest.approx(value)


def test_mean_ci_known_data():
    values = [1.0] * 30 + [0.0] * 70
    r = mean_ci(values)
    assert r["mean"] == pytest.approx(0.3) and r["n"] == 100
    # normal approximation: 0.3 +- 1.96 * sqrt(0.3*0.7/100) = 0.3 +- 0.0898
    assert r["ci_low"] == pytest.approx(0.21, abs=0.03)
    assert r["ci_high"] == pytest.approx(0.39, abs=0.03)
    narrower = mean_ci(values, level=0.5)
    assert r["ci_low"] < narrower["ci_low"] < 0.3 < narrower["ci_high"] < r["ci_high"]


def test_mean_ci_deterministic_under_seed():
    values = np.random.default_rng(1).random(50)
    assert mean_ci(values, seed=3) == mean_ci(values, seed=3)
    assert mean_ci(values, seed=3) != mean_ci(values, seed=4)
    assert isinstance(mean_ci(values)["ci_low"], float)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=2, max_size=60))
def test_mean_ci_contains_mean(values):
    r = mean_ci(values, n_boot=500)
    assert r["ci_low"] - 1e-12 <= r["mean"] <= r["ci_high"] + 1e-12
    assert min(values) <= r["ci_low"] and r["ci_high"] <= max(values)


def test_clustered_ci_is_wider_for_correlated_items():
    # 20 passages x 5 questions; all questions of a passage get the same score, so the effective
    # sample size is 20, not 100.
    rng = np.random.default_rng(0)
    per_passage = (rng.random(20) < 0.4).astype(float)
    values = np.repeat(per_passage, 5)
    clusters = np.repeat(np.arange(20), 5).tolist()
    plain = mean_ci(values)
    clustered = mean_ci_clustered(values, clusters)
    assert clustered["mean"] == pytest.approx(plain["mean"])
    assert clustered["n"] == 100 and clustered["n_clusters"] == 20
    width = plain["ci_high"] - plain["ci_low"]
    clustered_width = clustered["ci_high"] - clustered["ci_low"]
    assert clustered_width > 1.6 * width  # ~ sqrt(5) = 2.2x in expectation
    assert mean_ci(values, clusters=clusters) == clustered
    with pytest.raises(ValueError):
        mean_ci_clustered(values, clusters[:-1])


def test_clustered_single_cluster():
    r = mean_ci_clustered([0.0, 1.0, 1.0], ["p", "p", "p"])
    assert r["ci_low"] == r["ci_high"] == r["mean"] == pytest.approx(2 / 3)


def test_paired_diff_sign_and_significance():
    rng = np.random.default_rng(0)
    b = (rng.random(200) < 0.4).astype(float)
    a = b.copy()
    a[:40] = 1.0  # a is never worse than b and better on some items
    r = paired_diff(a, b)
    assert r["n"] == 200
    assert r["diff"] == pytest.approx(float(np.mean(a - b))) and r["diff"] > 0
    assert 0 < r["ci_low"] <= r["diff"] <= r["ci_high"]
    assert r["p_value"] < 0.01
    flipped = paired_diff(b, a)
    assert flipped["diff"] == pytest.approx(-r["diff"])
    assert flipped["ci_high"] < 0


def test_paired_diff_exact_sign_flip():
    # Three non-zero differences, all +1: of the 2^3 sign patterns, |sum| >= 3 for 2 -> p = 0.25.
    r = paired_diff([1, 1, 1, 0, 0], [0, 0, 0, 0, 0])
    assert r["p_value"] == pytest.approx(0.25)
    # Differences +1, -1: every pattern has |sum| >= 0 -> p = 1.
    assert paired_diff([1, 0], [0, 1])["p_value"] == pytest.approx(1.0)


def test_paired_diff_identical_and_empty():
    r = paired_diff([0.5, 1.0, 0.0], [0.5, 1.0, 0.0])
    assert r["diff"] == 0.0 and r["ci_low"] == r["ci_high"] == 0.0 and r["p_value"] == 1.0
    assert paired_diff([], [])["diff"] is None
    with pytest.raises(ValueError):
        paired_diff([1.0], [1.0, 0.0])


def test_paired_diff_deterministic_and_clustered():
    rng = np.random.default_rng(2)
    a = rng.random(60)
    b = rng.random(60)
    assert paired_diff(a, b, seed=5) == paired_diff(a, b, seed=5)
    clusters = [i // 3 for i in range(60)]
    r = paired_diff(a, b, clusters=clusters)
    assert r["n_clusters"] == 20 and 0.0 < r["p_value"] <= 1.0
    assert r["diff"] == pytest.approx(float(np.mean(a - b)))


def test_wilson_known_values():
    r = wilson_ci(5, 10)
    assert r["mean"] == 0.5 and r["n"] == 10
    assert r["ci_low"] == pytest.approx(0.2366, abs=1e-4)
    assert r["ci_high"] == pytest.approx(0.7634, abs=1e-4)
    zero = wilson_ci(0, 10)
    # upper bound z^2 / (n + z^2) = 3.8415 / 13.8415 = 0.2775
    assert zero["ci_low"] == 0.0 and zero["ci_high"] == pytest.approx(0.2775, abs=1e-4)
    full = wilson_ci(10, 10)
    assert full["ci_high"] == 1.0 and full["ci_low"] == pytest.approx(0.7225, abs=1e-4)
    # 81/263: p = 0.308; center 0.3108, half-width 0.0555 -> [0.2553, 0.3662]
    r = wilson_ci(81, 263)
    assert r["ci_low"] == pytest.approx(0.2553, abs=1e-4)
    assert r["ci_high"] == pytest.approx(0.3662, abs=1e-4)
    assert wilson_ci(0, 0) == {"mean": None, "n": 0, "ci_low": None, "ci_high": None}
    with pytest.raises(ValueError):
        wilson_ci(3, 2)
