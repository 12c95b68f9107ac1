"""CCA family against textbook float64 implementations written here (covariance inverse square roots, not the
orthonormal bases the package uses), plus the relations and degenerate cases of PAPER.md."""

from __future__ import annotations

import itertools
import pickle
import warnings

import numpy as np
import pytest
import torch

import repsim_plugin as rp
from repsim_plugin.errors import DegenerateInputError, RepsimError, UnknownNameError
from repsim_plugin.measures.cca import TrivialCorrelationWarning
from repsim_plugin.testing import check_measure

# --- textbook references (numpy only) -------------------------------------------------------------------------------


def inv_sqrt(S: np.ndarray) -> np.ndarray:
    w, V = np.linalg.eigh(S)
    return (V / np.sqrt(w)) @ V.T


def textbook_cca(X: np.ndarray, Y: np.ndarray):
    """Canonical correlations and X's canonical weight vectors from Sxx^-1/2 Sxy Syy^-1/2 (Hotelling)."""
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    Sxx, Syy, Sxy = Xc.T @ Xc, Yc.T @ Yc, Xc.T @ Yc
    Wx, Wy = inv_sqrt(Sxx), inv_sqrt(Syy)
    U, rho, _ = np.linalg.svd(Wx @ Sxy @ Wy, full_matrices=False)
    return rho, Wx @ U  # columns: canonical weights a_i, so X~ a_i are the canonical variates


def textbook_svcca(X: np.ndarray, Y: np.ndarray, keep: float = 0.99) -> float:
    """Raghu et al. 2017: per side, SVD, keep the top directions explaining `keep` of the variance, then CCA."""

    def reduce(A):
        Ac = A - A.mean(0)
        _, s, Vt = np.linalg.svd(Ac, full_matrices=False)
        frac = np.cumsum(s**2) / np.sum(s**2)
        k = int(np.argmax(frac >= keep)) + 1
        return Ac @ Vt[:k].T

    rho, _ = textbook_cca(reduce(X), reduce(Y))
    return float(rho.mean())


def textbook_pwcca(X: np.ndarray, Y: np.ndarray) -> float:
    """Morcos et al. 2018: alpha_i = sum_j |<h_i, x_j>| with unit-norm canonical variates h_i of X."""
    rho, A = textbook_cca(X, Y)
    Xc = X - X.mean(0)
    H = Xc @ A
    H = H / np.linalg.norm(H, axis=0)
    alpha = np.abs(H.T @ Xc).sum(axis=1)
    return float((alpha * rho).sum() / alpha.sum())


def related(n: int, p: int, q: int, seed: int, noise: float = 1.0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) @ rng.standard_normal((p, p))
    Y = np.tanh(X @ rng.standard_normal((p, q)) / np.sqrt(p)) + noise * rng.standard_normal((n, q))
    return X, Y


def value(mid, X, Y, **params) -> float:
    return float(rp.measures.make(mid, **params)(X, Y))


# --- agreement with the textbook ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "p", "q", "seed"), [(80, 6, 4, 0), (50, 3, 7, 1), (200, 10, 10, 2), (30, 1, 5, 3)])
def test_mean_cca_and_mean_squared_cca_match_textbook(n, p, q, seed):
    X, Y = related(n, p, q, seed)
    rho, _ = textbook_cca(X, Y)
    assert value("cca", X, Y) == pytest.approx(rho.mean(), abs=1e-10)
    assert value("mean_sq_cca", X, Y) == pytest.approx((rho**2).mean(), abs=1e-10)
    got = rp.measures.cca.canonical_correlations(torch.from_numpy(X), torch.from_numpy(Y)).numpy()
    np.testing.assert_allclose(got, rho, atol=1e-10)


@pytest.mark.parametrize(("n", "p", "q", "seed"), [(100, 12, 8, 0), (60, 5, 5, 1)])
def test_svcca_matches_raghu_textbook(n, p, q, seed):
    rng = np.random.default_rng(seed)
    # a decaying spectrum, so that the 99% cut drops directions, and weakly related low-variance directions
    X = rng.standard_normal((n, p)) * np.logspace(0, -1.5, p)
    Y = np.tanh(X[:, :q] * 3) + 0.3 * rng.standard_normal((n, q)) * np.logspace(-1, -2, q)
    for keep in (0.99, 0.9):
        assert value("svcca", X, Y, keep=keep) == pytest.approx(textbook_svcca(X, Y, keep), abs=1e-10)
    # the cut really dropped directions, so SVCCA differs from plain mean CCA
    assert abs(value("svcca", X, Y) - value("cca", X, Y)) > 1e-3


def test_svcca_with_everything_kept_is_mean_cca_and_fixed_dims_work():
    X, Y = related(70, 6, 5, 4)
    assert value("svcca", X, Y, keep=1.0) == pytest.approx(value("cca", X, Y), abs=1e-12)
    m = rp.measures.make("svcca", dims=3)
    assert m.id == "svcca-dims=3-score"
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    Ux = np.linalg.svd(Xc, full_matrices=False)[0][:, :3]
    Uy = np.linalg.svd(Yc, full_matrices=False)[0][:, :3]
    assert float(m(X, Y)) == pytest.approx(np.linalg.svd(Ux.T @ Uy, compute_uv=False).mean(), abs=1e-10)
    assert "invertible_linear" in rp.measures.make("svcca", keep=1.0).invariances
    assert "invertible_linear" not in rp.measures.make("svcca").invariances


@pytest.mark.parametrize(("n", "p", "q", "seed"), [(90, 6, 4, 0), (90, 4, 6, 1), (120, 8, 8, 2)])
def test_pwcca_matches_morcos_textbook_in_both_directions(n, p, q, seed):
    X, Y = related(n, p, q, seed)
    assert value("pwcca", X, Y) == pytest.approx(textbook_pwcca(X, Y), abs=1e-10)
    assert value("pwcca-direction=yx-score", X, Y) == pytest.approx(textbook_pwcca(Y, X), abs=1e-10)


def test_pwcca_is_asymmetric_and_differs_from_mean_cca():
    X, Y = related(100, 8, 3, 5)
    xy, yx = value("pwcca", X, Y), value("pwcca", Y, X)
    assert abs(xy - yx) > 1e-3
    assert value("pwcca-direction=yx-score", X, Y) == pytest.approx(yx, abs=1e-12)
    assert abs(xy - value("cca", X, Y)) > 1e-3


# --- relations from PAPER.md ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_linear_cka_on_whitened_inputs_equals_mean_squared_cca(seed):
    X, Y = related(150, 7, 7, seed)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    Xw, Yw = Xc @ inv_sqrt(Xc.T @ Xc), Yc @ inv_sqrt(Yc.T @ Yc)  # whitened in numpy, independently
    cka_whitened = value("cka", Xw, Yw)
    rho, _ = textbook_cca(X, Y)
    assert cka_whitened == pytest.approx(value("mean_sq_cca", X, Y), abs=1e-10)
    assert cka_whitened == pytest.approx((rho**2).mean(), abs=1e-10)


def translate_subset(X: np.ndarray, fraction: float, c: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(X.shape[1])
    v /= np.linalg.norm(v)
    moved = np.zeros(X.shape[0], dtype=bool)
    moved[: int(fraction * X.shape[0])] = True
    return X + c * moved[:, None] * v[None, :]


def test_rank_one_subset_translation_keeps_mean_cca_high_while_procrustes_and_cka_move():
    rng = np.random.default_rng(0)
    n, p = 200, 8
    X = rng.standard_normal((n, p))
    angles, ckas = [], []
    for c in (0.5, 2.0, 8.0, 32.0, 128.0):
        Xt = translate_subset(X, 0.3, c, seed=1)
        rho, _ = textbook_cca(X, Xt)
        # p - 1 canonical directions are untouched: at least p - 1 correlations equal 1
        assert np.sort(rho)[-(p - 1) :] == pytest.approx(np.ones(p - 1), abs=1e-9)
        assert value("cca", X, Xt) >= (p - 1) / p - 1e-12
        angles.append(value("procrustes-distance=angular", X, Xt))
        ckas.append(value("cka", X, Xt))
    assert all(b > a for a, b in itertools.pairwise(angles))  # Procrustes keeps rising
    assert angles[-1] > 1.2  # close to pi/2: almost orthogonal after alignment
    assert ckas[-1] < 0.2  # and CKA collapses


# --- degenerate inputs ---------------------------------------------------------------------------------------------


def test_rank_deficient_input_uses_the_spanned_space_and_never_crashes():
    X, Y = related(60, 5, 4, 6)
    dead = np.zeros((60, 3)) + 2.0  # dead units: constant, so zero after centering
    with_dead = np.hstack([X[:, :2], dead, X[:, 2:]])
    for mid in ("cca", "mean_sq_cca", "svcca", "pwcca", "pwcca-direction=yx-score"):
        assert value(mid, with_dead, Y) == pytest.approx(value(mid, X, Y), abs=1e-9), mid
        assert value(mid, Y, with_dead) == pytest.approx(value(mid, Y, X), abs=1e-9), mid
    # duplicated features add no direction: the CCA values (which see column spaces only) do not move
    duplicated = np.hstack([X, X[:, :2] @ np.array([[1.0, 2.0], [-1.0, 0.5]])])
    for mid in ("cca", "mean_sq_cca", "svcca-keep=1.0-score"):
        assert value(mid, duplicated, Y) == pytest.approx(value(mid, X, Y), abs=1e-9), mid


def test_more_features_than_samples_warns_and_is_trivially_one():
    rng = np.random.default_rng(7)
    X, Y = rng.standard_normal((20, 25)), rng.standard_normal((20, 3))
    with pytest.warns(TrivialCorrelationWarning, match="whatever the data"):
        got = value("cca", X, Y)
    assert got == pytest.approx(1.0, abs=1e-9)  # independent data, yet CCA says identical
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value("cca", *related(100, 5, 4, 8))  # no warning when n is comfortably larger


def test_partial_overlap_warning_counts_the_forced_correlations():
    rng = np.random.default_rng(9)
    X, Y = rng.standard_normal((30, 18)), rng.standard_normal((30, 16))
    with pytest.warns(TrivialCorrelationWarning, match="5 of the 16"):
        rho = rp.measures.cca.canonical_correlations(torch.from_numpy(X), torch.from_numpy(Y))
    assert (rho > 1 - 1e-9).sum() == 5  # 18 + 16 - 29


def test_pwcca_with_tied_forced_correlations_says_its_value_is_not_determined():
    """Three correlations forced to 1 (ranks 8 + 4 > n - 1 = 9): PWCCA's weights then follow whichever basis of
    the tied variates the SVD returns, so a shift of X by 1e-12 moves the value by far more than its rounding."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    Y = torch.tanh(X[:, :4]) + 0.5 * torch.randn(10, 4, generator=g, dtype=torch.float64)
    pwcca = rp.measures.make("pwcca")
    with pytest.warns(TrivialCorrelationWarning, match="3 of the 4 .* not determined by the data") as tied:
        a = float(pwcca(X, Y))
    assert tied[0].message.determined is False
    restored = pickle.loads(pickle.dumps(tied[0].message))  # as it crosses to a worker process
    assert (str(restored), restored.determined) == (str(tied[0].message), False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrivialCorrelationWarning)
        moved = [abs(float(pwcca(X + shift, Y)) - a) for shift in (1e-12, 1e-9, 3.0)]
    assert max(moved) > 1e-6  # translation invariant in exact arithmetic; here rounding alone moves it
    with pytest.warns(TrivialCorrelationWarning) as seen:  # mean CCA is determined: no such sentence
        rp.measures.make("cca")(X, Y)
    assert "not determined" not in str(seen[0].message) and seen[0].message.determined


def test_pwcca_with_one_forced_correlation_is_determined():
    rng = np.random.default_rng(3)
    X, Y = rng.standard_normal((12, 8)), rng.standard_normal((12, 4))  # 8 + 4 - 11 = 1 forced
    with pytest.warns(TrivialCorrelationWarning, match="1 of the 4") as seen:
        value("pwcca", X, Y)
    assert "not determined" not in str(seen[0].message) and seen[0].message.determined


def test_svcca_dims_beyond_the_rank_is_a_clear_error():
    X, Y = related(40, 4, 4, 10)
    with pytest.raises(DegenerateInputError, match="spans only 4"):
        rp.measures.make("svcca", dims=6)(X, Y)


def test_builders_reject_bad_parameters():
    with pytest.raises(UnknownNameError):
        rp.measures.make("cca", mean="r3")
    with pytest.raises(RepsimError, match="contradicts"):
        rp.measures.make("cca", mean="r", squared=True)
    assert rp.measures.make("cca", squared=True).id == "cca-mean=r2-score"
    with pytest.raises(RepsimError, match="not both"):
        rp.measures.make("svcca", keep=0.9, dims=3)
    with pytest.raises(RepsimError, match=r"\(0, 1\]"):
        rp.measures.make("svcca", keep=1.5)
    with pytest.raises(RepsimError, match="positive integer"):
        rp.measures.make("svcca", dims=2.5)
    with pytest.raises(UnknownNameError):
        rp.measures.make("pwcca", direction="xx")
    with pytest.raises(RepsimError, match="no parameter"):
        rp.measures.make("pwcca", keep=0.9)


@pytest.mark.parametrize("mid", rp.measures.list("*cca*"))
def test_cca_family_declares_everything_that_holds(mid):
    report = check_measure(mid, strict=True)
    assert "direction" in report.passed


def test_gradients_flow_through_mean_cca():
    X = torch.randn(30, 4, dtype=torch.float64, requires_grad=True)
    Y = torch.randn(30, 3, dtype=torch.float64)
    out = rp.measures.make("cca")(X, Y)
    out.backward()
    assert X.grad is not None and torch.isfinite(X.grad).all() and X.grad.abs().sum() > 0
