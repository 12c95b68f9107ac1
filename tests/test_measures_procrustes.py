"""Procrustes and Williams et al. (2021) shape metrics against textbook float64 implementations written here
(scipy's orthogonal_procrustes on zero-padded data, covariance eigendecompositions), and the metric axioms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.linalg import orthogonal_procrustes

import repsim_plugin as rp
from repsim_plugin.errors import DegenerateInputError, RepsimError, UnknownNameError
from repsim_plugin.testing import check_measure

# --- textbook references (numpy / scipy only) ----------------------------------------------------------------------


def pad(A: np.ndarray, d: int) -> np.ndarray:
    return np.hstack([A, np.zeros((A.shape[0], d - A.shape[1]))])


def textbook_procrustes(A: np.ndarray, B: np.ndarray) -> float:
    """min_R ||A - B R||_F over orthogonal R, on zero-padded copies, by scipy."""
    d = max(A.shape[1], B.shape[1])
    Ap, Bp = pad(A, d), pad(B, d)
    R, _ = orthogonal_procrustes(Bp, Ap)
    return float(np.linalg.norm(Ap - Bp @ R))


def nuclear_cosine(A: np.ndarray, B: np.ndarray) -> float:
    return float(np.linalg.norm(A.T @ B, ord="nuc") / (np.linalg.norm(A) * np.linalg.norm(B)))


def textbook_phi(X: np.ndarray, alpha: float) -> np.ndarray:
    """X~ (alpha I + (1 - alpha) C^-1/2) with C the covariance scaled to mean eigenvalue 1, norm of X~ kept."""
    Xc = X - X.mean(0)
    w, V = np.linalg.eigh(Xc.T @ Xc)
    w = w / w.mean()
    Z = alpha * np.eye(len(w)) + (1 - alpha) * (V / np.sqrt(w)) @ V.T
    phi = Xc @ Z
    return phi * np.linalg.norm(Xc) / np.linalg.norm(phi)


def textbook_shape(X: np.ndarray, Y: np.ndarray, alpha: float, distance: str) -> float:
    A, B = textbook_phi(X, alpha), textbook_phi(Y, alpha)
    if distance == "angular":
        return math.acos(min(1.0, nuclear_cosine(A, B)))
    return textbook_procrustes(A, B)


def centered(A: np.ndarray) -> np.ndarray:
    return A - A.mean(0)


def pair(n: int, p: int, q: int, seed: int):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) @ rng.standard_normal((p, p)) + 3.0
    Y = np.tanh(X @ rng.standard_normal((p, q)) / p) + 0.5 * rng.standard_normal((n, q))
    return X, Y


def value(mid, X, Y, **params) -> float:
    return float(rp.measures.make(mid, **params)(X, Y))


# --- agreement with the textbook ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "p", "q", "seed"), [(50, 5, 5, 0), (40, 6, 3, 1), (40, 3, 6, 2), (10, 12, 4, 3)])
def test_procrustes_matches_scipy_on_padded_data(n, p, q, seed):
    X, Y = pair(n, p, q, seed)
    Xc, Yc = centered(X), centered(Y)
    assert value("procrustes_distance", X, Y) == pytest.approx(textbook_procrustes(Xc, Yc), rel=1e-10)
    assert value("procrustes_distance", Y, X) == pytest.approx(textbook_procrustes(Yc, Xc), rel=1e-10)
    cos = nuclear_cosine(Xc, Yc)
    assert value("procrustes", X, Y) == pytest.approx(cos, abs=1e-12)
    assert value("procrustes-distance=angular", X, Y) == pytest.approx(math.acos(cos), abs=1e-10)
    # the squared distance is ||X~||^2 + ||Y~||^2 - 2 ||X~^T Y~||_*
    expected_sq = (Xc**2).sum() + (Yc**2).sum() - 2 * np.linalg.norm(Xc.T @ Yc, ord="nuc")
    assert value("procrustes_distance", X, Y) ** 2 == pytest.approx(expected_sq, rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_angular_shape_metric_at_alpha_one_is_arccos_of_the_normalised_nuclear_norm(seed):
    X, Y = pair(60, 7, 5, seed)
    expected = math.acos(nuclear_cosine(centered(X), centered(Y)))
    assert value("shape_metric-alpha=1.0-distance=angular", X, Y) == pytest.approx(expected, abs=1e-10)
    assert value("shape_metric-alpha=1.0-distance=euclidean", X, Y) == pytest.approx(
        value("procrustes_distance", X, Y), rel=1e-12
    )


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("distance", ["angular", "euclidean"])
@pytest.mark.parametrize(("p", "q"), [(5, 5), (6, 4)])
def test_shape_metrics_match_textbook_partial_whitening(alpha, distance, p, q):
    X, Y = pair(70, p, q, seed=int(10 * alpha) + p)
    got = value("shape_metric", X, Y, alpha=alpha, distance=distance)
    assert got == pytest.approx(textbook_shape(X, Y, alpha, distance), rel=1e-9, abs=1e-10)


def test_fully_whitened_angular_shape_metric_is_arccos_of_summed_canonical_correlations():
    X, Y = pair(80, 6, 4, 7)
    Xc, Yc = centered(X), centered(Y)
    Qx, Qy = np.linalg.qr(Xc)[0], np.linalg.qr(Yc)[0]
    rho = np.linalg.svd(Qx.T @ Qy, compute_uv=False)
    expected = math.acos(rho.sum() / math.sqrt(6 * 4))
    assert value("shape_metric-alpha=0.0-distance=angular", X, Y) == pytest.approx(expected, abs=1e-10)


# --- metric axioms -------------------------------------------------------------------------------------------------

SHAPE_IDS = rp.measures.list("shape_metric-*") + rp.measures.list("procrustes-distance=*")


@given(
    seed=st.integers(0, 2**31 - 1),
    dims=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)),
    alpha=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
    distance=st.sampled_from(["angular", "euclidean"]),
)
def test_shape_metrics_satisfy_the_triangle_inequality_on_random_triples(seed, dims, alpha, distance):
    rng = np.random.default_rng(seed)
    n = 12
    A = rng.standard_normal((n, dims[0]))
    B = rng.standard_normal((n, dims[1]))
    B[:, : min(dims[:2])] += rng.uniform(0, 3) * A[:, : min(dims[:2])]  # related pairs make the bound tight
    C = rng.standard_normal((n, dims[2])) * rng.uniform(0.1, 10)
    m = rp.measures.make("shape_metric", alpha=alpha, distance=distance)
    d = {(i, j): float(m(*(P, Q))) for i, P in enumerate((A, B, C)) for j, Q in enumerate((A, B, C))}
    for i in range(3):
        assert abs(d[i, i]) <= 1e-7
        for j in range(3):
            assert d[i, j] >= 0
            assert d[i, j] == pytest.approx(d[j, i], abs=1e-10)
            for k in range(3):
                assert d[i, k] <= d[i, j] + d[j, k] + 1e-9


@pytest.mark.parametrize("mid", [*SHAPE_IDS, "procrustes-score"])
def test_procrustes_family_declares_everything_that_holds(mid):
    report = check_measure(mid, strict=True)
    assert ("metric_axioms" in report.passed) == rp.measures.make(mid).is_metric


# --- numerics and scale --------------------------------------------------------------------------------------------


def test_near_identical_inputs_give_an_accurate_small_distance():
    rng = np.random.default_rng(11)
    X = rng.standard_normal((100, 8)) * 10 + 50
    noise = 1e-9 * rng.standard_normal((100, 8))
    expected = textbook_procrustes(centered(X), centered(X + noise))  # explicit residual, no cancellation
    got = value("procrustes_distance", X, X + noise)
    assert 0 < got < 1e-7
    assert got == pytest.approx(expected, rel=1e-3)
    # the closed form a^2 + b^2 - 2c cancels catastrophically here; the measure does not use it
    Xc, Yc = centered(X), centered(X + noise)
    naive_sq = (Xc**2).sum() + (Yc**2).sum() - 2 * np.linalg.norm(Xc.T @ Yc, ord="nuc")
    assert abs(math.sqrt(abs(naive_sq)) - expected) > 10 * abs(got - expected)
    assert value("procrustes-distance=angular", X, X) == 0.0 or value("procrustes-distance=angular", X, X) < 1e-12


def test_scale_behaviour_of_euclidean_and_angular_shape_metrics():
    X, Y = pair(50, 5, 4, 12)
    for alpha in (0.0, 0.5, 1.0):
        euclid = value("shape_metric", X, Y, alpha=alpha, distance="euclidean")
        assert value("shape_metric", 3 * X, 3 * Y, alpha=alpha, distance="euclidean") == pytest.approx(3 * euclid)
        ang = value("shape_metric", X, Y, alpha=alpha, distance="angular")
        assert value("shape_metric", 7 * X, 0.2 * Y, alpha=alpha, distance="angular") == pytest.approx(ang, abs=1e-10)


def test_partial_whitening_interpolates_between_procrustes_and_cca():
    X, Y = pair(80, 6, 6, 13)
    values = [value("shape_metric", X, Y, alpha=a) for a in (0.0, 0.5, 1.0)]
    assert values[0] != pytest.approx(values[2], abs=1e-3)
    assert min(values[0], values[2]) - 1e-9 <= values[1] <= max(values[0], values[2]) + 1e-9


def test_rank_deficient_inputs_whiten_on_the_spanned_space():
    X, Y = pair(40, 4, 4, 14)
    with_dead = np.hstack([X, np.full((40, 2), 5.0)])
    for alpha in (0.0, 0.5):
        for distance in ("angular", "euclidean"):
            a = value("shape_metric", with_dead, Y, alpha=alpha, distance=distance)
            b = value("shape_metric", X, Y, alpha=alpha, distance=distance)
            assert a == pytest.approx(b, abs=1e-9)
    wide = np.random.default_rng(15).standard_normal((10, 30))  # p > n
    assert math.isfinite(value("shape_metric", wide, Y[:10], alpha=0.0))


def test_gradients_are_finite_and_match_finite_differences():
    torch.manual_seed(0)
    X = torch.randn(15, 4, dtype=torch.float64, requires_grad=True)
    Y = torch.randn(15, 3, dtype=torch.float64, requires_grad=True)
    for mid in ("procrustes", "procrustes_distance", "procrustes-distance=angular", "shape_metric"):
        m = rp.measures.make(mid)
        assert torch.autograd.gradcheck(lambda a, b, m=m: m(a, b), (X, Y), eps=1e-6, atol=1e-5)


def test_errors():
    with pytest.raises(RepsimError, match=r"\[0, 1\]"):
        rp.measures.make("shape_metric", alpha=1.5)
    with pytest.raises(UnknownNameError):
        rp.measures.make("shape_metric", distance="manhattan")
    with pytest.raises(UnknownNameError):
        rp.measures.make("procrustes", distance="cosine")
    with pytest.raises(RepsimError, match="no parameter"):
        rp.measures.make("procrustes", alpha=0.5)
    assert rp.measures.make("shape_metric", alpha=1).id == "shape_metric-alpha=1.0-distance=angular"
    with pytest.raises(DegenerateInputError):
        rp.measures.make("shape_metric", alpha=0.0)(np.ones((5, 3)) + np.arange(5)[:, None] * 0, np.eye(5))
