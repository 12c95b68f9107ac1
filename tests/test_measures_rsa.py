"""RSA against scipy (pdist for the RDMs, spearmanr / pearsonr / kendalltau for the comparisons) and a naive
O(m^2) Kendall tau-a written here; the O(m log^2 m) inversion count against brute force, ties included."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist
from scipy.stats import kendalltau, pearsonr, rankdata, spearmanr

import repsim_plugin as rp
from repsim_plugin.errors import DegenerateInputError, UnknownNameError
from repsim_plugin.measures.rsa import average_ranks, count_inversions, kendall_tau, rdm
from repsim_plugin.testing import check_measure

SCIPY_RDM = {"correlation": "correlation", "euclidean": "euclidean", "squared_euclidean": "sqeuclidean"}
SCIPY_RDM["cosine"] = "cosine"


def naive_tau_a(a: np.ndarray, b: np.ndarray) -> float:
    s = sum(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]) for i, j in itertools.combinations(range(len(a)), 2))
    return float(s) / (len(a) * (len(a) - 1) / 2)


def textbook_rsa(X: np.ndarray, Y: np.ndarray, rdm_method: str, compare: str) -> float:
    a, b = pdist(X, SCIPY_RDM[rdm_method]), pdist(Y, SCIPY_RDM[rdm_method])  # condensed = upper triangle
    if compare == "pearson":
        return float(pearsonr(a, b)[0])
    if compare == "spearman":
        return float(spearmanr(a, b)[0])
    if compare == "kendall":
        return float(kendalltau(a, b)[0])  # tau-b
    return naive_tau_a(a, b)


def pair(n: int, p: int, q: int, seed: int):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) + 1.0
    Y = np.tanh(X @ rng.standard_normal((p, q))) + 0.7 * rng.standard_normal((n, q)) + 2.0
    return X, Y


@pytest.mark.parametrize("rdm_method", ["correlation", "euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("compare", ["pearson", "spearman", "kendall", "tau_a"])
def test_rsa_matches_scipy(rdm_method, compare):
    X, Y = pair(25, 5, 4, seed=len(rdm_method) + len(compare))
    got = float(rp.measures.make("rsa", rdm=rdm_method, compare=compare)(X, Y))
    assert got == pytest.approx(textbook_rsa(X, Y, rdm_method, compare), abs=1e-10)


def test_full_rdms_match_scipy_squareform():
    from scipy.spatial.distance import squareform

    X, _ = pair(15, 4, 4, 3)
    for method, scipy_name in SCIPY_RDM.items():
        got = rdm(torch.from_numpy(X), method).numpy()
        np.testing.assert_allclose(got, squareform(pdist(X, scipy_name)), atol=1e-12)


def test_kendall_with_ties_matches_scipy_tau_b_and_naive_tau_a():
    rng = np.random.default_rng(4)
    X = rng.integers(0, 3, size=(14, 3)).astype(float)  # many duplicated samples: tied RDM entries
    X[:, 0] += np.arange(14) * 1e-3 * (np.arange(14) % 2)
    Y = X[:, :2] + rng.integers(0, 2, size=(14, 2))
    a, b = pdist(X, "sqeuclidean"), pdist(Y, "sqeuclidean")
    assert len(np.unique(a)) < len(a) and len(np.unique(b)) < len(b)
    got_b = float(rp.measures.make("rsa", rdm="squared_euclidean", compare="kendall")(X, Y))
    got_a = float(rp.measures.make("rsa", rdm="squared_euclidean", compare="tau_a")(X, Y))
    assert got_b == pytest.approx(float(kendalltau(a, b)[0]), abs=1e-12)
    assert got_a == pytest.approx(naive_tau_a(a, b), abs=1e-12)
    assert got_a < got_b  # ties pull tau-a down
    spearman = float(rp.measures.make("rsa", rdm="squared_euclidean", compare="spearman")(X, Y))
    assert spearman == pytest.approx(float(spearmanr(a, b)[0]), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_count_inversions_and_ranks_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 20, size=int(rng.integers(1, 300))).astype(float)
    brute = sum(1 for i, j in itertools.combinations(range(len(v)), 2) if v[i] > v[j])
    assert int(count_inversions(torch.from_numpy(v))) == brute
    np.testing.assert_allclose(average_ranks(torch.from_numpy(v)).numpy(), rankdata(v))
    w = rng.standard_normal(len(v))
    if len(v) > 2 and np.ptp(v) > 0:
        assert float(kendall_tau(torch.from_numpy(v), torch.from_numpy(w))) == pytest.approx(
            float(kendalltau(v, w)[0]), abs=1e-12
        )


def test_kendall_scales_to_thousands_of_samples():
    rng = np.random.default_rng(5)
    X, Y = rng.standard_normal((400, 8)), rng.standard_normal((400, 8))  # 79,800 RDM entries
    got = float(rp.measures.make("rsa", rdm="euclidean", compare="kendall")(X, Y))
    assert got == pytest.approx(float(kendalltau(pdist(X), pdist(Y))[0]), abs=1e-10)


def test_pearson_rsa_is_differentiable_even_with_the_zero_diagonal():
    X = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    Y = torch.randn(12, 3, dtype=torch.float64)
    for method in ("euclidean", "correlation", "cosine", "squared_euclidean"):
        m = rp.measures.make("rsa", rdm=method, compare="pearson")
        assert m.differentiable
        assert torch.autograd.gradcheck(lambda a, m=m: m(a, Y), (X,), eps=1e-6, atol=1e-5)
    assert not rp.measures.make("rsa").differentiable  # spearman: ranks


def test_invariances_follow_the_rdm():
    X, Y = pair(30, 5, 4, 6)
    shift = np.random.default_rng(7).standard_normal(5) * 3
    for method in ("euclidean", "squared_euclidean"):
        m = rp.measures.make("rsa", rdm=method)
        assert float(m(X + shift, Y)) == pytest.approx(float(m(X, Y)), abs=1e-12)
    for method in ("cosine", "correlation"):  # angles and row correlations move with the origin
        m = rp.measures.make("rsa", rdm=method, compare="pearson")
        assert abs(float(m(X + shift, Y)) - float(m(X, Y))) > 1e-3


@pytest.mark.parametrize("mid", rp.measures.list("rsa-*"))
def test_rsa_family_declares_everything_that_holds(mid):
    check_measure(mid, strict=True)


def test_degenerate_rdms_raise_clear_errors():
    X, Y = pair(10, 4, 3, 8)
    with pytest.raises(DegenerateInputError, match="single feature"):
        rp.measures.make("rsa", rdm="correlation")(X[:, :1], Y)
    Z = X.copy()
    Z[3] = 0.0
    with pytest.raises(DegenerateInputError, match="all zeros"):
        rp.measures.make("rsa", rdm="cosine")(Z, Y)
    C = X.copy()
    C[2] = 7.0  # a sample constant across its features has no correlation with anything
    with pytest.raises(DegenerateInputError, match="constant across features"):
        rp.measures.make("rsa", rdm="correlation")(C, Y)
    simplex = np.eye(4)  # every pair equally far apart: constant RDM
    with pytest.raises(DegenerateInputError, match="constant"):
        rp.measures.make("rsa", rdm="euclidean", compare="pearson")(simplex, Y[:4])
    with pytest.raises(DegenerateInputError, match="constant"):
        rp.measures.make("rsa", rdm="euclidean", compare="kendall")(simplex, Y[:4])
    with pytest.raises(UnknownNameError):
        rp.measures.make("rsa", rdm="manhattan")
    with pytest.raises(UnknownNameError):
        rp.measures.make("rsa", compare="cosine")
