"""Intervals and tests the analyses and studies share, so each outcome type is read one way everywhere.

Means of continuous values: Student-t (`t_interval`). Proportions of 0/1 outcomes: Wilson or Clopper-Pearson,
which never leave [0, 1]. Paired 0/1 outcomes (the same puzzles under two decoders): Newcombe's interval of the
difference (method 10, from the two Wilson intervals and the pairing's correlation) and the exact McNemar test
on the discordant pairs. Items that come in clusters (puzzles sharing a solution grid) are resampled by
cluster (`cluster_bootstrap`), and their paired differences tested by flipping whole clusters' signs
(`cluster_sign_flip`). Families of tests are adjusted by Holm (family-wise error) or Benjamini-Hochberg
(false discovery rate). Every interval is returned as [estimate, low, high].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .errors import DLMScopeError

if TYPE_CHECKING:
    import torch


def _z(level: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2))


def t_interval(values: Sequence[float] | np.ndarray | torch.Tensor, level: float = 0.95) -> list[float]:
    """Mean with a Student-t interval (a single value gets a zero-width one)."""
    from scipy.stats import t as student_t

    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise DLMScopeError("t_interval needs at least one value")
    m = float(v.mean())
    half = float(student_t.ppf(0.5 + level / 2, v.size - 1)) * float(v.std(ddof=1)) / math.sqrt(v.size) \
        if v.size > 1 else 0.0
    return [m, m - half, m + half]


def _check_count(k: int, n: int) -> None:
    if n < 1 or not 0 <= k <= n:
        raise DLMScopeError(f"k={k} of n={n}: a proportion needs 0 <= k <= n and n >= 1")


def wilson(k: int, n: int, level: float = 0.95) -> list[float]:
    """Proportion k / n with its Wilson score interval."""
    _check_count(k, n)
    z, p = _z(level), k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [p, 0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half)]


def clopper_pearson(k: int, n: int, level: float = 0.95) -> list[float]:
    """Proportion k / n with its exact (Clopper-Pearson) interval: never below the nominal coverage."""
    from scipy.stats import beta

    _check_count(k, n)
    a = 1 - level
    lo = float(beta.ppf(a / 2, k, n - k + 1)) if k > 0 else 0.0
    hi = float(beta.ppf(1 - a / 2, k + 1, n - k)) if k < n else 1.0
    return [k / n, lo, hi]


def _paired_counts(a: Sequence, b: Sequence) -> tuple[int, int, int, int]:
    """(both, a only, b only, neither) of two equally long 0/1 sequences on the same items."""
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise DLMScopeError(f"paired outcomes need two non-empty 1-D sequences of one length; got {x.shape} and "
                            f"{y.shape}")
    return int((x & y).sum()), int((x & ~y).sum()), int((~x & y).sum()), int((~x & ~y).sum())


def newcombe_paired(a: Sequence, b: Sequence, level: float = 0.95) -> list[float]:
    """Difference of two paired proportions, mean(a) - mean(b), with Newcombe's hybrid-score interval (method 10)."""
    both, a_only, b_only, neither = _paired_counts(a, b)
    n = both + a_only + b_only + neither
    p1, l1, u1 = wilson(both + a_only, n, level)
    p2, l2, u2 = wilson(both + b_only, n, level)
    denom = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    phi = (both * neither - a_only * b_only) / math.sqrt(denom) if denom else 0.0
    d = p1 - p2
    lower = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    upper = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return [d, max(-1.0, d - math.sqrt(max(lower, 0.0))), min(1.0, d + math.sqrt(max(upper, 0.0)))]


def mcnemar_exact(a: Sequence, b: Sequence) -> dict:
    """Exact McNemar test of paired 0/1 outcomes: {"a_only", "b_only", "p"} (two-sided binomial on the discordant
    pairs; p = 1 when there are none)."""
    from scipy.stats import binomtest

    _, a_only, b_only, _ = _paired_counts(a, b)
    n = a_only + b_only
    p = float(binomtest(min(a_only, b_only), n, 0.5).pvalue) if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p": p}


def cluster_bootstrap(values, groups: Sequence, n_boot: int = 4000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Mean of `values` with a percentile interval that resamples whole clusters (items sharing a `groups` label).

    `values` is (items,) or (runs, items) (e.g. seeds x puzzles): with runs, runs are resampled too, independently
    of the clusters. The mean weights every item equally, so a resampled cluster counts with all its items.
    """
    x = np.asarray(values, dtype=float)
    x = x[None] if x.ndim == 1 else x
    g = np.asarray(groups)
    if x.ndim != 2 or x.shape[1] != g.size or g.size == 0:
        raise DLMScopeError(f"values of shape {np.asarray(values).shape} and {g.size} group labels: one label per item")
    labels, index = np.unique(g, return_inverse=True)
    # per run and cluster: sum and size, so a resample is a few index operations
    sums = np.stack([np.bincount(index, weights=row, minlength=labels.size) for row in x])
    sizes = np.bincount(index, minlength=labels.size).astype(float)
    rng = np.random.default_rng(seed)
    pick_c = rng.integers(0, labels.size, (n_boot, labels.size))
    pick_r = rng.integers(0, x.shape[0], (n_boot, x.shape[0]))
    boots = np.array([sums[pick_r[i]][:, pick_c[i]].sum() / (sizes[pick_c[i]].sum() * x.shape[0])
                      for i in range(n_boot)])
    a = (1 - level) / 2 * 100
    return [float(x.mean()), float(np.percentile(boots, a)), float(np.percentile(boots, 100 - a))]


def cluster_sign_flip(diffs, groups: Sequence, n_perm: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value that paired differences average 0, flipping the sign of whole clusters at random.

    `diffs` is (items,) (e.g. a method's per-puzzle score, averaged over seeds, minus the baseline's); under the
    null each cluster's summed difference is symmetric about 0, which the flips (a Monte-Carlo permutation test,
    the observed labelling counted) respect however the items inside a cluster depend on each other.
    """
    d = np.asarray(diffs, dtype=float)
    g = np.asarray(groups)
    if d.ndim != 1 or d.size != g.size or d.size == 0:
        raise DLMScopeError(f"{d.size} differences and {g.size} group labels: one label per item")
    _, index = np.unique(g, return_inverse=True)
    sums = np.bincount(index, weights=d)
    signs = np.random.default_rng(seed).choice((-1.0, 1.0), (n_perm, sums.size))
    observed = abs(sums.sum())
    return float((1 + np.sum(np.abs(signs @ sums) >= observed - 1e-12)) / (1 + n_perm))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (family-wise error), in the input order."""
    p = list(pvalues)
    out, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(sorted(range(len(p)), key=p.__getitem__)):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return out


def benjamini_hochberg(pvalues: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), in the input order."""
    p = list(pvalues)
    out, running = [0.0] * len(p), 1.0
    for rank, i in reversed(list(enumerate(sorted(range(len(p)), key=p.__getitem__)))):
        running = min(running, len(p) * p[i] / (rank + 1))
        out[i] = running
    return out
