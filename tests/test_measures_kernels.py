"""CKA with the cosine and polynomial kernels against numpy Gram matrices and an explicit centering matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest

import repsim_plugin as rp
from repsim_plugin.errors import DegenerateInputError, RepsimError
from repsim_plugin.testing import check_measure


def hsic(K: np.ndarray, L: np.ndarray) -> float:
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(K @ H @ L @ H))


def cka(K: np.ndarray, L: np.ndarray) -> float:
    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


def cosine_gram(X: np.ndarray) -> np.ndarray:
    Xc = X - X.mean(0)
    U = Xc / np.linalg.norm(Xc, axis=1, keepdims=True)
    return U @ U.T


def polynomial_gram(X: np.ndarray, degree: int, coef0: float) -> np.ndarray:
    Xc = X - X.mean(0)
    return (Xc @ Xc.T / X.shape[1] + coef0) ** degree


def pair(seed: int):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((40, 6)) + 4.0
    Y = np.tanh(X @ rng.standard_normal((6, 5)) / 3) + 0.3 * rng.standard_normal((40, 5))
    return X, Y


@pytest.mark.parametrize("seed", range(3))
def test_cosine_kernel_cka_matches_numpy(seed):
    X, Y = pair(seed)
    m = rp.measures.make("cka", kernel="cosine")
    assert m.id == "cka-kernel=cosine-hsic=gretton-score"
    assert float(m(X, Y)) == pytest.approx(cka(cosine_gram(X), cosine_gram(Y)), abs=1e-12)


@pytest.mark.parametrize(("degree", "coef0"), [(3, 1.0), (2, 0.0), (1, 0.5)])
def test_polynomial_kernel_cka_matches_numpy(degree, coef0):
    X, Y = pair(degree)
    m = rp.measures.make("cka", kernel="polynomial", degree=degree, coef0=coef0)
    assert m.id == f"cka-kernel=(polynomial-degree={degree}-coef0={float(coef0)!r})-hsic=gretton-score"
    expected = cka(polynomial_gram(X, degree, coef0), polynomial_gram(Y, degree, coef0))
    assert float(m(X, Y)) == pytest.approx(expected, abs=1e-12)
    assert rp.measures.make(m.id).id == m.id  # typed parameters survive the round trip through the id


def test_degree_one_homogeneous_polynomial_is_linear_cka():
    X, Y = pair(5)
    poly = rp.measures.make("cka", kernel="polynomial", degree=1, coef0=0.0)
    assert float(poly(X, Y)) == pytest.approx(rp.similarity(X, Y, "cka"), abs=1e-12)


def test_scale_invariance_is_declared_only_where_it_holds():
    X, Y = pair(6)
    poly = rp.measures.make("cka-kernel=(polynomial-degree=3-coef0=1.0)-hsic=gretton-score")
    assert "isotropic_scaling" not in poly.invariances
    assert abs(float(poly(10 * X, Y)) - float(poly(X, Y))) > 1e-3
    assert "isotropic_scaling" in rp.measures.make("cka", kernel="cosine").invariances


def test_debiased_variants_and_conformance():
    for params in ({"kernel": "cosine", "debiased": True}, {"kernel": "polynomial", "degree": 2, "hsic": "song"}):
        check_measure(rp.measures.make("cka", **params), strict=True)


def test_bad_kernel_parameters_and_degenerate_rows():
    with pytest.raises(RepsimError, match="positive integer"):
        rp.measures.make("cka", kernel="polynomial", degree=2.5)
    with pytest.raises(RepsimError, match="positive integer"):
        rp.measures.make("cka", kernel="polynomial", degree=0)
    with pytest.raises(RepsimError, match="non-negative"):
        rp.measures.make("cka", kernel="polynomial", coef0=-1)
    with pytest.raises(RepsimError, match="degree"):
        rp.measures.make("cka", kernel="cosine", degree=2)
    rng = np.random.default_rng(7)
    half = rng.integers(-5, 6, size=(10, 4)).astype(float)
    X = np.vstack([half, -half, np.zeros((1, 4))])  # integer rows cancel exactly: the last row is the mean
    with pytest.raises(DegenerateInputError, match="equals the mean"):
        rp.measures.make("cka", kernel="cosine")(X, rng.standard_normal((21, 3)))
