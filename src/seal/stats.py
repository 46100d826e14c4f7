"""Statistics for reporting: bootstrap confidence intervals, paired comparisons, Wilson intervals.

All resampling uses ``numpy.random.default_rng(seed)``, so results are deterministic under a seed.
Results are plain dicts of Python floats/ints (JSON-serializable); an empty input gives ``None``
for every statistic.

Questions about one passage are correlated (the same adaptation run answers all of them), so an
item-level bootstrap understates uncertainty. Pass ``clusters`` (e.g. the passage id of each
question) to resample whole clusters instead: the point estimate is still the plain item mean,
but the interval reflects between-passage variation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Sequence
from statistics import NormalDist

import numpy as np

# Caps the size of one (n_boot x n_clusters) index block, to bound memory on big inputs.
_BLOCK_ELEMENTS = 4_000_000


def _as_array(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _cluster_sums(
    values: np.ndarray, clusters: Sequence[Hashable] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums and counts (each item its own cluster when ``clusters`` is None)."""
    if clusters is None:
        return values, np.ones_like(values)
    clusters = list(clusters)
    if len(clusters) != len(values):
        raise ValueError(f"{len(clusters)} cluster labels for {len(values)} values")
    index: dict[Hashable, int] = {}
    codes = np.fromiter((index.setdefault(c, len(index)) for c in clusters), dtype=np.int64)
    sums = np.bincount(codes, weights=values, minlength=len(index))
    counts = np.bincount(codes, minlength=len(index)).astype(float)
    return sums, counts


def _bootstrap_means(
    sums: np.ndarray, counts: np.ndarray, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """Ratio means sum(sums)/sum(counts) over ``n_boot`` resamples of clusters with replacement."""
    k = len(sums)
    out = np.empty(n_boot)
    block = max(1, _BLOCK_ELEMENTS // max(k, 1))
    for start in range(0, n_boot, block):
        stop = min(n_boot, start + block)
        idx = rng.integers(0, k, size=(stop - start, k))
        out[start:stop] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    return out


def _percentile_ci(samples: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError("level must be in (0, 1)")


def mean_ci(
    values: Sequence[float] | np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    *,
    clusters: Sequence[Hashable] | None = None,
) -> dict:
    """Mean of ``values`` with a percentile-bootstrap confidence interval.

    Returns ``{"mean", "n", "ci_low", "ci_high"}`` (plus ``"n_clusters"`` when ``clusters`` is
    given). Without ``clusters`` items are resampled; with ``clusters`` (one label per value)
    whole clusters are resampled — see ``mean_ci_clustered``. ``n == 0`` gives ``mean``/CI None;
    when all values are equal the CI is exactly ``[mean, mean]``. Deterministic for a given seed.
    """
    _check_level(level)
    arr = _as_array(values, "values")
    n = len(arr)
    result: dict = {"mean": None, "n": n, "ci_low": None, "ci_high": None}
    sums, counts = _cluster_sums(arr, clusters)
    if clusters is not None:
        result["n_clusters"] = len(sums)
    if n == 0:
        return result
    mean = float(arr.mean())
    result["mean"] = mean
    if np.all(arr == arr[0]) or len(sums) == 1:
        # No variation to resample (a single cluster resamples to itself).
        result["ci_low"] = result["ci_high"] = mean
        return result
    boot = _bootstrap_means(sums, counts, n_boot, np.random.default_rng(seed))
    result["ci_low"], result["ci_high"] = _percentile_ci(boot, level)
    return result


def mean_ci_clustered(
    values: Sequence[float] | np.ndarray,
    clusters: Sequence[Hashable],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Mean with a cluster-bootstrap CI: resample clusters (e.g. passages), not items.

    Each resample draws as many clusters as there are, with replacement, and takes the mean over
    all items in the drawn clusters (so bigger clusters weigh more, as in the item mean). Use it
    when items within a cluster are correlated, e.g. several questions on one passage. Returns
    ``{"mean", "n", "n_clusters", "ci_low", "ci_high"}``.
    """
    return mean_ci(values, n_boot=n_boot, seed=seed, level=level, clusters=clusters)


def _sign_flip_p(sums: np.ndarray, n_perm: int, rng: np.random.Generator) -> float:
    """Two-sided sign-flip permutation p-value for sum(sums) != 0.

    Exact (all 2^k sign patterns of the k non-zero cluster sums) when 2^k <= n_perm; otherwise
    Monte Carlo with ``n_perm`` random patterns and the usual +1 correction.
    """
    d = sums[sums != 0]
    k = len(d)
    if k == 0:
        return 1.0
    observed = abs(d.sum())
    tol = 1e-9 * max(1.0, float(np.abs(d).sum()))  # float noise must not decide ties
    if 2**k <= n_perm:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=k)))
        stats = np.abs(signs @ d)
        return float(np.mean(stats >= observed - tol))
    hits = 0
    block = max(1, _BLOCK_ELEMENTS // k)
    for start in range(0, n_perm, block):
        m = min(block, n_perm - start)
        signs = rng.choice(np.array([1.0, -1.0]), size=(m, k))
        hits += int(np.sum(np.abs(signs @ d) >= observed - tol))
    return (hits + 1) / (n_perm + 1)


def paired_diff(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    *,
    clusters: Sequence[Hashable] | None = None,
) -> dict:
    """Compare paired per-item scores ``a`` and ``b`` (same items, same order).

    Returns ``{"diff", "n", "ci_low", "ci_high", "p_value"}``: ``diff`` is mean(a - b); the CI is
    a percentile paired bootstrap (items resampled together with their pair); ``p_value`` is
    two-sided, from a sign-flip permutation test on the paired differences (H0: the difference of
    each pair is symmetric around 0), exact when there are few non-zero differences, else
    Monte Carlo with ``n_boot`` permutations. With ``clusters`` both the bootstrap and the sign
    flips act on whole clusters (``"n_clusters"`` is added). ``n == 0`` gives None statistics.
    """
    _check_level(level)
    xa = _as_array(a, "a")
    xb = _as_array(b, "b")
    if len(xa) != len(xb):
        raise ValueError(f"paired inputs differ in length: {len(xa)} vs {len(xb)}")
    d = xa - xb
    n = len(d)
    result: dict = {"diff": None, "n": n, "ci_low": None, "ci_high": None, "p_value": None}
    sums, counts = _cluster_sums(d, clusters)
    if clusters is not None:
        result["n_clusters"] = len(sums)
    if n == 0:
        return result
    diff = float(d.mean())
    result["diff"] = diff
    rng = np.random.default_rng(seed)
    if np.all(d == d[0]) or len(sums) == 1:
        result["ci_low"] = result["ci_high"] = diff
    else:
        boot = _bootstrap_means(sums, counts, n_boot, rng)
        result["ci_low"], result["ci_high"] = _percentile_ci(boot, level)
    result["p_value"] = _sign_flip_p(sums, n_boot, rng)
    return result


def wilson_ci(successes: int, n: int, level: float = 0.95) -> dict:
    """Wilson score interval for a binary rate ``successes / n``.

    Returns ``{"mean", "n", "ci_low", "ci_high"}`` where ``mean`` is the observed rate (same keys
    as ``mean_ci``); ``n == 0`` gives None statistics. Stays within [0, 1] and is sensible at
    rates of 0 or 1, unlike the normal approximation.
    """
    _check_level(level)
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return {"mean": None, "n": 0, "ci_low": None, "ci_high": None}
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return {"mean": p, "n": n, "ci_low": low, "ci_high": high}
