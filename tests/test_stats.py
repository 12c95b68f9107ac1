"""rp.stats: the vectorised permutation path equals the generic loop, p-values are calibrated under independence
and small on related data, bootstrap resamples rows jointly, null baselines show the bias of CKA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import kstest

import repsim_plugin as rp
from repsim_plugin.errors import RepsimError
from repsim_plugin.stats import bootstrap_ci, null_baseline, p_value, permutation_test


def related(n: int, p: int, q: int, seed: int, noise: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(p, q, generator=g, dtype=torch.float64) + noise * torch.randn(n, q, generator=g)
    return X, Y


@pytest.mark.parametrize("mid", ["cka", "debiased_cka"])
@pytest.mark.parametrize("method", ["feature", "sample", "auto"])
def test_vectorised_path_equals_the_generic_loop_for_the_same_seed(mid, method):
    X, Y = related(45, 7, 5, seed=1)
    generic = permutation_test(mid, X, Y, n_permutations=150, seed=3, method="generic")
    fast = permutation_test(mid, X, Y, n_permutations=150, seed=3, method=method)
    assert generic.method == "generic" and fast.method.startswith("vectorised")
    torch.testing.assert_close(fast.null, generic.null, rtol=1e-12, atol=1e-14)
    assert fast.p_value == generic.p_value
    assert fast.statistic == generic.statistic
    # a different seed draws different permutations
    other = permutation_test(mid, X, Y, n_permutations=150, seed=4, method=method)
    assert not torch.allclose(other.null, fast.null)


def test_generic_loop_is_each_measure_call_on_permuted_rows():
    X, Y = related(30, 4, 3, seed=2)
    result = permutation_test("procrustes_distance", X, Y, n_permutations=20, seed=5)
    g = torch.Generator().manual_seed(5)
    m = rp.measures.make("procrustes_distance")
    expected = torch.stack([m(X, Y[torch.randperm(30, generator=g)]) for _ in range(20)])
    torch.testing.assert_close(result.null, expected, rtol=0, atol=0)
    assert result.alternative == "less"  # a distance: small is similar
    assert result.method == "generic"


@pytest.mark.parametrize("mid", ["cka", "debiased_cka"])
def test_p_values_are_uniform_under_independence(mid):
    p_values = []
    for seed in range(300):
        g = torch.Generator().manual_seed(10_000 + seed)
        X = torch.randn(25, 4, generator=g, dtype=torch.float64)
        Y = torch.randn(25, 3, generator=g, dtype=torch.float64)
        p_values.append(permutation_test(mid, X, Y, n_permutations=99, seed=seed).p_value)
    p_values = np.array(p_values)
    assert kstest(p_values, "uniform").pvalue > 1e-3
    counts = np.histogram(p_values, bins=5, range=(0, 1))[0]
    assert counts.min() > 35 and counts.max() < 85  # 60 expected per bin
    assert 0.02 < np.mean(p_values <= 0.05) < 0.09


def test_generic_path_p_values_are_uniform_under_independence_too():
    p_values = []
    for seed in range(120):
        g = torch.Generator().manual_seed(20_000 + seed)
        X = torch.randn(15, 3, generator=g, dtype=torch.float64)
        Y = torch.randn(15, 3, generator=g, dtype=torch.float64)
        p_values.append(permutation_test("procrustes_distance", X, Y, n_permutations=39, seed=seed).p_value)
    assert kstest(np.array(p_values), "uniform").pvalue > 1e-3


@pytest.mark.parametrize("mid", ["cka", "debiased_cka", "procrustes_distance", "linreg", "rsa", "mutual_knn"])
def test_related_data_give_small_p_values(mid):
    g = torch.Generator().manual_seed(7)
    X = torch.randn(60, 6, generator=g, dtype=torch.float64)
    Y = X + 0.1 * torch.randn(60, 6, generator=g, dtype=torch.float64)
    result = permutation_test(mid, X, Y, n_permutations=200, seed=0)
    assert result.p_value < 0.01
    assert result.p_value == pytest.approx(1 / 201)  # nothing in the null comes close
    assert result.null.shape == (200,)


def test_alternatives():
    X, Y = related(50, 5, 5, seed=8, noise=0.5)
    greater = permutation_test("cka", X, Y, n_permutations=100, alternative="greater")
    less = permutation_test("cka", X, Y, n_permutations=100, alternative="less")
    two = permutation_test("cka", X, Y, n_permutations=100, alternative="two-sided")
    assert greater.p_value == pytest.approx(1 / 101)
    assert less.p_value == pytest.approx(1.0)
    assert two.p_value == pytest.approx(2 / 101)


def test_p_value_formula_counts_ties_conservatively():
    null = torch.tensor([0.1, 0.5, 0.5, 0.9])
    assert p_value(0.5, null, "greater") == pytest.approx((1 + 3) / 5)
    assert p_value(0.5, null, "less") == pytest.approx((1 + 3) / 5)
    assert p_value(1.0, null, "greater") == pytest.approx(1 / 5)
    assert p_value(0.0, null, "two-sided") == pytest.approx(2 / 5)


def test_bootstrap_resamples_rows_jointly_and_is_reproducible():
    X, _ = related(40, 5, 5, seed=9)
    same = bootstrap_ci("cka", X, X, n_boot=50, seed=1)
    # resampling X and Y with the same rows keeps them identical: every replicate is exactly 1
    torch.testing.assert_close(same.samples, torch.ones(50, dtype=torch.float64))
    X, Y = related(60, 5, 5, seed=10, noise=1.0)
    a = bootstrap_ci("debiased_cka", X, Y, n_boot=200, alpha=0.1, seed=2)
    b = bootstrap_ci("debiased_cka", X, Y, n_boot=200, alpha=0.1, seed=2)
    torch.testing.assert_close(a.samples, b.samples)
    assert a.estimate == pytest.approx(rp.similarity(X, Y, "debiased_cka"))
    assert (a.resample, a.interval) == ("rows", "centered")
    centred = a.samples - a.samples.median()
    assert a.low == pytest.approx(a.estimate + float(torch.quantile(centred, 0.05)))
    assert a.high == pytest.approx(a.estimate + float(torch.quantile(centred, 0.95)))
    assert a.low <= a.estimate <= a.high
    assert a.shift == pytest.approx(float(a.samples.median()) - a.estimate)
    p = bootstrap_ci("debiased_cka", X, Y, n_boot=200, alpha=0.1, seed=2, interval="percentile")
    assert p.low == pytest.approx(float(torch.quantile(p.samples, 0.05)))
    assert p.high - p.low == pytest.approx(a.high - a.low)  # same replicates, same width
    wide = bootstrap_ci("debiased_cka", X, Y, n_boot=200, alpha=0.01, seed=2)
    assert wide.low <= a.low and wide.high >= a.high
    half = bootstrap_ci("debiased_cka", X, Y, n_boot=50, seed=3, resample="half")
    assert half.resample == "half" and half.low <= half.estimate <= half.high


def test_duplicated_rows_shift_cka_replicates_and_centred_intervals_still_cover():
    """Debiased CKA with d comparable to n: resampled rows inflate every replicate (duplicates enter the
    U-statistic as independent pairs), so the classic percentile interval misses; centred intervals cover."""
    g = torch.Generator().manual_seed(11)
    B = torch.randn(20, 20, generator=g, dtype=torch.float64)

    def draw(n):
        X = torch.randn(n, 20, generator=g, dtype=torch.float64)
        return X, torch.tanh(X @ B / 4) + torch.randn(n, 20, generator=g, dtype=torch.float64)

    m = rp.measures.make("debiased_cka")
    truth = float(torch.stack([m(*draw(80)) for _ in range(200)]).mean())  # the estimator is nearly unbiased
    covered = {("rows", "centered"): 0, ("rows", "percentile"): 0, ("half", "centered"): 0}
    shifts = []
    for s in range(25):
        X, Y = draw(80)
        for resample, interval in covered:
            r = bootstrap_ci(m, X, Y, n_boot=100, seed=s, resample=resample, interval=interval)
            covered[resample, interval] += r.low <= truth <= r.high
            if resample == "rows":
                shifts.append(r.shift)
    assert np.mean(shifts) > 0.05  # replicates sit far above the estimate
    assert covered["rows", "percentile"] <= 5  # so the classic interval almost never covers
    assert covered["rows", "centered"] >= 21  # nominal 95%: ~24 of 25
    assert covered["half", "centered"] >= 21


def test_null_baseline_shows_the_inflation_of_biased_cka():
    biased = null_baseline("cka", n=50, d1=50, d2=50, n_samples=60, seed=0)
    assert biased.biased_cka_approximation == pytest.approx(0.5)
    assert biased.mean == pytest.approx(biased.biased_cka_approximation, rel=0.1)
    debiased = null_baseline("debiased_cka", n=50, d1=50, n_samples=60, seed=0)
    assert abs(debiased.mean) < 4 * debiased.std / np.sqrt(60)
    assert debiased.d2 == 50 and debiased.quantile(0.5) == pytest.approx(float(debiased.samples.median()), abs=0.02)
    small = null_baseline("cka", n=500, d1=5, d2=5, n_samples=20, seed=1)
    assert small.mean < 0.05


def test_inputs_may_be_numpy_and_results_name_the_measure():
    X, Y = related(30, 4, 4, seed=12)
    result = permutation_test("cka", X.numpy(), Y.numpy(), n_permutations=10)
    assert result.measure_id == "cka-kernel=linear-hsic=gretton-score"
    assert result.n_permutations == 10 and result.seed == 0
    assert rp.stats.permutation_test is permutation_test


def test_errors():
    X, Y = related(20, 3, 3, seed=13)
    with pytest.raises(RepsimError, match="positive integer"):
        permutation_test("cka", X, Y, n_permutations=0)
    with pytest.raises(RepsimError, match="vectorised linear-CKA"):
        permutation_test("procrustes", X, Y, method="feature")
    with pytest.raises(RepsimError, match="alternative"):
        permutation_test("cka", X, Y, alternative="bigger")
    with pytest.raises(RepsimError, match="method"):
        permutation_test("cka", X, Y, method="fast")
    with pytest.raises(RepsimError, match="alpha"):
        bootstrap_ci("cka", X, Y, alpha=1.5)
    with pytest.raises(RepsimError, match="positive integer"):
        null_baseline("cka", n=0, d1=3)
    with pytest.raises(RepsimError, match="resample must be"):
        bootstrap_ci("cka", X, Y, resample="jackknife")
    with pytest.raises(RepsimError, match="interval must be"):
        bootstrap_ci("cka", X, Y, interval="bca")
    with pytest.raises(RepsimError, match="half-sampling draws 2"):
        bootstrap_ci("debiased_cka", X[:5], Y[:5], resample="half")
    with pytest.raises(RepsimError, match="bootstrap resample"):
        # two distinct rows: some resample repeats one row only, and a constant representation is degenerate
        bootstrap_ci("cka", X[:2], Y[:2], n_boot=50)
