"""Nearest-neighbour measures against numpy implementations written here from Huh et al. (2024): cosine
neighbours (rows L2-normalised), self excluded, ties broken by index."""

from __future__ import annotations

import numpy as np
import pytest

import repsim_plugin as rp
from repsim_plugin.errors import DegenerateInputError, RepsimError, TooFewSamplesError
from repsim_plugin.testing import check_measure


def cosine(X: np.ndarray) -> np.ndarray:
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    return U @ U.T


def neighbour_sets(X: np.ndarray, k: int) -> list[set[int]]:
    S = cosine(X)
    np.fill_diagonal(S, -np.inf)
    order = np.argsort(-S, axis=1, kind="stable")
    return [set(row[:k].tolist()) for row in order]


def textbook_mutual(X, Y, k) -> float:
    return float(np.mean([len(a & b) / k for a, b in zip(neighbour_sets(X, k), neighbour_sets(Y, k), strict=True)]))


def textbook_jaccard(X, Y, k) -> float:
    pairs = zip(neighbour_sets(X, k), neighbour_sets(Y, k), strict=True)
    return float(np.mean([len(a & b) / len(a | b) for a, b in pairs]))


def hsic_u(A: np.ndarray, B: np.ndarray) -> float:
    """Song et al. eq. 5 with explicit ones vectors, for matrices that need not be symmetric."""
    n = A.shape[0]
    A, B = A.copy(), B.copy()
    np.fill_diagonal(A, 0.0)
    np.fill_diagonal(B, 0.0)
    one = np.ones(n)
    value = np.trace(A @ B) + (one @ A @ one) * (one @ B @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ A @ B @ one
    return float(value) / (n * (n - 3))


def textbook_cknna(X, Y, k) -> float:
    n = X.shape[0]
    K, L = cosine(X), cosine(Y)

    def mask(sets):
        M = np.zeros((n, n))
        for i, s in enumerate(sets):
            M[i, list(s)] = 1.0
        return M

    MK, ML = mask(neighbour_sets(X, k)), mask(neighbour_sets(Y, k))
    M = MK * ML
    return hsic_u(M * K, M * L) / np.sqrt(hsic_u(MK * K, MK * K) * hsic_u(ML * L, ML * L))


def pair(n: int, p: int, q: int, seed: int):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    Y = np.tanh(X @ rng.standard_normal((p, q))) + 0.5 * rng.standard_normal((n, q))
    return X, Y


def value(mid, X, Y, **params) -> float:
    return float(rp.measures.make(mid, **params)(X, Y))


@pytest.mark.parametrize(("n", "p", "q", "k", "seed"), [(60, 6, 4, 10, 0), (40, 3, 8, 5, 1), (25, 10, 10, 3, 2)])
def test_knn_measures_match_textbook(n, p, q, k, seed):
    X, Y = pair(n, p, q, seed)
    assert value("mutual_knn", X, Y, topk=k) == pytest.approx(textbook_mutual(X, Y, k), abs=1e-12)
    assert value("jaccard_knn", X, Y, topk=k) == pytest.approx(textbook_jaccard(X, Y, k), abs=1e-12)
    assert value("cknna", X, Y, topk=k) == pytest.approx(textbook_cknna(X, Y, k), abs=1e-10)
    assert value("cknna", Y, X, topk=k) == pytest.approx(textbook_cknna(Y, X, k), abs=1e-10)


def test_cknna_with_every_neighbour_is_debiased_cka_of_the_normalised_features():
    X, Y = pair(30, 5, 4, 3)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Yn = Y / np.linalg.norm(Y, axis=1, keepdims=True)
    assert value("cknna", X, Y, topk=29) == pytest.approx(value("debiased_cka", Xn, Yn), abs=1e-10)


def test_cknna_is_asymmetric_like_the_reference_code():
    X, Y = pair(60, 6, 4, 4)
    assert abs(value("cknna", X, Y) - value("cknna", Y, X)) > 1e-4
    assert not rp.measures.make("cknna").symmetric
    assert rp.measures.make("mutual_knn").symmetric


def test_ids_parameters_and_sample_requirements():
    assert rp.measures.make("mutual_knn", k=5).id == "mutual_knn-topk=5"
    assert rp.measures.make("mutual_knn-topk=5").id == "mutual_knn-topk=5"
    assert rp.measures.make("cknna", topk=3).min_samples == 4
    assert rp.measures.make("jaccard_knn", topk=7).min_samples == 8
    X, Y = pair(10, 3, 3, 5)
    with pytest.raises(TooFewSamplesError):
        rp.measures.make("mutual_knn")(X, Y)  # k = 10 needs 11 samples
    with pytest.raises(RepsimError, match="topk >= 2"):
        rp.measures.make("cknna", topk=1)
    with pytest.raises(RepsimError, match="positive integer"):
        rp.measures.make("mutual_knn", topk=0)
    with pytest.raises(RepsimError, match="disagree"):
        rp.measures.make("mutual_knn", topk=3, k=4)


def test_duplicated_samples_break_ties_by_index_deterministically():
    X, Y = pair(30, 4, 4, 6)
    Xd, Yd = np.vstack([X, X[:5]]), np.vstack([Y, Y[:5]])
    first = value("mutual_knn", Xd, Yd, topk=4)
    assert first == pytest.approx(textbook_mutual(Xd, Yd, 4), abs=1e-12)
    assert all(value("mutual_knn", Xd, Yd, topk=4) == first for _ in range(3))


def test_cosine_neighbours_are_not_translation_invariant_and_zero_rows_are_errors():
    X, Y = pair(50, 4, 4, 7)
    assert value("mutual_knn", X + 3.0, Y) != pytest.approx(value("mutual_knn", X, Y), abs=1e-3)
    Z = X.copy()
    Z[4] = 0.0
    with pytest.raises(DegenerateInputError, match="all zeros"):
        rp.measures.make("mutual_knn")(Z, Y)


@pytest.mark.parametrize("mid", rp.measures.list("*knn*") + rp.measures.list("cknna*"))
def test_neighbour_family_declares_everything_that_holds(mid):
    check_measure(mid, strict=True)
