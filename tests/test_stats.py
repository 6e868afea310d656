import numpy as np
import pytest

from dlmscope import DLMScopeError
from dlmscope.stats import (benjamini_hochberg, clopper_pearson, cluster_bootstrap, cluster_sign_flip, holm,
                            mcnemar_exact, newcombe_paired, t_interval, wilson)


def test_proportion_intervals_stay_in_0_1_and_match_known_values():
    # Wilson 5/10 and Clopper-Pearson 0/10, 5/10: textbook values (e.g. statsmodels' proportion_confint agrees)
    assert wilson(5, 10) == pytest.approx([0.5, 0.236593, 0.763407], abs=1e-6)
    assert clopper_pearson(0, 10) == pytest.approx([0.0, 0.0, 0.308497], abs=1e-6)
    assert clopper_pearson(5, 10) == pytest.approx([0.5, 0.187086, 0.812914], abs=1e-6)
    for k in (0, 1, 49, 50):  # the "0.98 [0.95, 1.01]" case: 49 of 50 must not reach past 1
        for f in (wilson, clopper_pearson):
            p, lo, hi = f(k, 50)
            assert 0 <= lo <= p <= hi <= 1
    with pytest.raises(DLMScopeError, match="k=3 of n=2"):
        wilson(3, 2)


def test_paired_difference_and_exact_mcnemar_on_a_published_example():
    """Bentur et al.'s airway data as worked in Fagerland, Lydersen & Laake (2013, BMC Med Res Methodol 13:91):
    n11=1, n12=1, n21=7, n22=12; Newcombe's interval -0.502 to -0.036, exact McNemar p = 0.070."""
    a = [1, 1] + [0] * 7 + [0] * 12
    b = [1, 0] + [1] * 7 + [0] * 12
    d, lo, hi = newcombe_paired(a, b)
    assert d == pytest.approx(-6 / 21) and (lo, hi) == pytest.approx((-0.502, -0.036), abs=5e-4)
    assert mcnemar_exact(a, b) == {"a_only": 1, "b_only": 7, "p": pytest.approx(0.0703125)}
    # the prefix cache's "gain": 5 puzzles gained, none lost, is p = 2 / 2**5
    assert mcnemar_exact([1] * 5 + [1] * 90 + [0] * 5, [0] * 5 + [1] * 90 + [0] * 5)["p"] == pytest.approx(0.0625)
    # swapping the arms mirrors the interval; identical arms give 0 inside the interval and p = 1
    assert newcombe_paired(b, a) == pytest.approx([-d, -hi, -lo])
    same = newcombe_paired(a, a)
    assert same[0] == 0 and same[1] < 0 < same[2] and mcnemar_exact(a, a)["p"] == 1.0


def test_cluster_bootstrap_widens_with_duplicated_items():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, 40).astype(float)
    own = cluster_bootstrap(x, np.arange(40))
    dup = cluster_bootstrap(np.repeat(x, 5), np.repeat(np.arange(40), 5))  # five copies of each item: no new info
    assert own[0] == dup[0] and dup[2] - dup[1] == pytest.approx(own[2] - own[1], rel=0.15)
    naive = cluster_bootstrap(np.repeat(x, 5), np.arange(200))  # treating the copies as independent is too narrow
    assert naive[2] - naive[1] < 0.6 * (dup[2] - dup[1])
    runs = cluster_bootstrap(np.stack([x, 1 - x]), np.arange(40))  # runs resampled too: spread between them counts
    assert runs[0] == pytest.approx(0.5) and runs[2] - runs[1] > own[2] - own[1]
    with pytest.raises(DLMScopeError, match="one label per item"):
        cluster_bootstrap(x, np.arange(39))


def test_multiplicity_adjustments():
    p = [0.01, 0.04, 0.03, 0.005, 0.2]
    assert holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.2])
    assert benjamini_hochberg(p) == pytest.approx([0.025, 0.05, 0.05, 0.025, 0.2])
    assert t_interval([1.0, 2.0, 3.0]) == pytest.approx([2.0, 2 - 2.484138, 2 + 2.484138], abs=1e-6)


def test_cluster_sign_flip_counts_clusters_not_items():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(10), 20)
    shift = np.repeat(rng.normal(0, 1, 10), 20)  # a per-cluster effect with mean ~0: no real difference
    d = shift + rng.normal(0, 0.1, 200)
    assert cluster_sign_flip(d, groups) > 0.05  # an item-level test would call this highly significant
    assert cluster_sign_flip(d + 2.0, groups) < 0.01
    # 3 clusters all positive: the smallest attainable two-sided p is 2 / 2^3 (flips of the observed sign)
    assert cluster_sign_flip([1.0, 1.0, 2.0], [0, 1, 2], n_perm=20000) == pytest.approx(0.25, abs=0.02)
    with pytest.raises(DLMScopeError, match="one label per item"):
        cluster_sign_flip([1.0, 2.0], [0])
