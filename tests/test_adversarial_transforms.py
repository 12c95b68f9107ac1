"""The paper's analytic stress tests (Davari et al., ICLR 2023): Theorem 1, the single outlier, Corollary 4.

References are written here in float64 numpy straight from the textbook definitions (Gram-form HSIC with the
centring matrix H, eigenvalues for the participation ratio), never by calling the implementation.
"""

from __future__ import annotations

import math
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import repsim_plugin as rp
from repsim_plugin.adversarial import (
    add_outlier,
    invertible_linear,
    logit_change,
    outlier_limit,
    participation_ratio,
    scale_for_target_cka,
    separability_preserving_direction,
    subset_translation_cka,
    subset_translation_limit,
    translate_subset,
)
from repsim_plugin.errors import (
    DegenerateInputError,
    InputDtypeError,
    InputShapeError,
    RepsimError,
    UnknownNameError,
)

pytestmark = pytest.mark.filterwarnings("ignore::repsim_plugin.errors.SmallSampleBiasWarning")


# --- independent references ---------------------------------------------------------------------------------------


def ref_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Biased linear CKA from the definition: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)).

    The columns are centred before the Gram matrices are formed (H K H is unchanged): with a large offset, the
    uncentred X X^T loses the signal to cancellation, as PAPER.md warns.
    """
    X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    X, Y = X - X.mean(axis=0), Y - Y.mean(axis=0)
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T

    def hsic(A: np.ndarray, B: np.ndarray) -> float:
        return float(np.trace(A @ H @ B @ H))

    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


def ref_participation_ratio(X: np.ndarray) -> float:
    Xc = X - X.mean(axis=0)
    lam = np.linalg.eigvalsh(Xc.T @ Xc / len(X))
    return float(lam.sum() ** 2 / (lam**2).sum())


def ref_paper_limit(X: np.ndarray, S: np.ndarray) -> float:
    """Theorem 1 as printed: rho / (1 - rho) * ||mean of S||^2 / E||x||^2 * sqrt(PR), on centred X."""
    Xc = X - X.mean(axis=0)
    rho = S.mean()
    mean_S = Xc[S].mean(axis=0)
    expected_sq_norm = (Xc**2).sum(axis=1).mean()
    return float(rho / (1 - rho) * (mean_S @ mean_S) / expected_sq_norm * math.sqrt(ref_participation_ratio(X)))


def ref_paper_outlier_limit(X: np.ndarray, i: int) -> float:
    """||x^||^2 sqrt(PR) / ((n - 1) E||x||^2) on centred X."""
    Xc = X - X.mean(axis=0)
    n = len(X)
    return float((Xc[i] @ Xc[i]) * math.sqrt(ref_participation_ratio(X)) / ((n - 1) * (Xc**2).sum(axis=1).mean()))


def ref_translate(X: np.ndarray, moved: np.ndarray, v: np.ndarray, c: float) -> np.ndarray:
    out = X.copy()
    out[moved] += c * v / np.linalg.norm(v)
    return out


def sample_problem(seed: int, n: int = 60, d: int = 8, moved: int = 20):
    """Anisotropic data with an offset (so centring matters), a mask, and a direction."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.2, 3.0, size=d) + rng.normal(size=d) * 5
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=moved, replace=False)] = True
    v = rng.normal(size=d)
    return X, mask, v


@st.composite
def problems(draw, max_n: int = 40, max_d: int = 10):
    n = draw(st.integers(3, max_n))
    d = draw(st.integers(1, max_d))
    moved = draw(st.integers(1, n - 1))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.1, 10.0, size=d) + rng.normal(size=d) * rng.uniform(0, 100)
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=moved, replace=False)] = True
    v = rng.normal(size=d)
    return X, mask, v


# --- Theorem 1: the exact finite-c closed form ----------------------------------------------------------------------


@pytest.mark.parametrize("c", [0.0, 0.1, 1.0, 10.0, 1e3, -0.7, -25.0])
def test_closed_form_equals_direct_linear_cka(c):
    X, mask, v = sample_problem(0)
    moved = translate_subset(X, mask, v, c)
    direct = float(rp.measures.make("cka")(torch.from_numpy(X), moved))
    closed = float(subset_translation_cka(X, mask, v, c))
    reference = ref_cka(X, ref_translate(X, mask, v, c))
    assert closed == pytest.approx(reference, abs=1e-10)
    assert direct == pytest.approx(reference, abs=1e-10)


def test_closed_form_is_vectorised_over_c():
    X, mask, v = sample_problem(1)
    cs = [0.0, 0.1, 1.0, 10.0, 1e3, 1e6]
    values = subset_translation_cka(X, mask, v, cs)
    assert values.shape == (len(cs),) and values.dtype == torch.float64
    for c, value in zip(cs, values.tolist(), strict=True):
        assert value == pytest.approx(float(subset_translation_cka(X, mask, v, c)), abs=1e-14)
        assert value == pytest.approx(ref_cka(X, ref_translate(X, mask, v, c)), abs=1e-9)
    assert subset_translation_cka(X, mask, v, torch.tensor(2.0)).shape == ()
    assert float(subset_translation_cka(X, mask, v, 0.0)) == pytest.approx(1.0, abs=1e-15)


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from([0.0, 0.05, 1.0, 10.0, 1e3, -3.0]))
def test_closed_form_matches_definition_on_random_problems(problem, c_scale):
    X, mask, v = problem
    scale = math.sqrt(((X - X.mean(axis=0)) ** 2).sum(axis=1).mean())
    c = c_scale * scale
    closed = float(subset_translation_cka(X, mask, v, c))
    assert closed == pytest.approx(ref_cka(X, ref_translate(X, mask, v, c)), abs=1e-9)


# --- Theorem 1: the limit ------------------------------------------------------------------------------------------


def test_direct_cka_converges_to_the_limit_at_rate_one_over_c():
    """CKA(c) = L (1 + kappa / c + O(1/c^2)) with kappa = 2 (a^T G v / ||a||^2 - a^T v / s), derived by hand."""
    X, mask, v = sample_problem(2)
    limit = float(subset_translation_limit(X, mask))
    Xc = X - X.mean(axis=0)
    n, m = len(X), int(mask.sum())
    a, G, s, vn = Xc[mask].sum(axis=0), Xc.T @ Xc, m * (n - m) / n, v / np.linalg.norm(v)
    kappa = 2 * (a @ G @ vn / (a @ a) - a @ vn / s)
    cka = rp.measures.make("cka")
    remainders = []  # c (CKA(c) / L - 1) - kappa = O(1/c)
    for c in (1e4, 1e5, 1e6):
        direct = float(cka(torch.from_numpy(X), translate_subset(X, mask, v, c)))
        remainders.append(c * (direct / limit - 1) - kappa)
    assert abs(remainders[2]) < 1e-3 * abs(kappa)
    assert remainders[1] / remainders[0] == pytest.approx(0.1, rel=0.05)
    assert remainders[2] / remainders[1] == pytest.approx(0.1, rel=0.05)
    direct = float(cka(torch.from_numpy(X), translate_subset(X, mask, v, 1e8)))
    assert direct == pytest.approx(limit, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_limit_equals_the_papers_formula_whichever_side_is_s(problem):
    X, mask, _ = problem
    limit = float(subset_translation_limit(X, mask))
    assert limit == pytest.approx(ref_paper_limit(X, ~mask), rel=1e-9, abs=1e-13)  # S = the rows that stay
    assert limit == pytest.approx(ref_paper_limit(X, mask), rel=1e-9, abs=1e-13)  # S = the rows that move
    assert limit == pytest.approx(float(subset_translation_limit(X, ~mask)), rel=1e-12, abs=1e-15)
    assert 0.0 <= limit <= 1.0 + 1e-12


@settings(max_examples=40, deadline=None)
@given(problems())
def test_closed_form_tends_to_the_limit(problem):
    X, mask, v = problem
    scale = math.sqrt(((X - X.mean(axis=0)) ** 2).sum(axis=1).mean())
    limit = float(subset_translation_limit(X, mask))
    far = subset_translation_cka(X, mask, v, [1e12 * scale, -1e12 * scale])
    assert far.tolist() == pytest.approx([limit, limit], rel=1e-7, abs=1e-12)


def test_limit_does_not_depend_on_the_direction():
    X, mask, _ = sample_problem(3)
    limit = float(subset_translation_limit(X, mask))
    rng = np.random.default_rng(3)
    cka = rp.measures.make("cka")
    finite_c = []
    for _ in range(5):
        v = rng.normal(size=X.shape[1])
        assert float(cka(torch.from_numpy(X), translate_subset(X, mask, v, 1e8))) == pytest.approx(limit, rel=1e-5)
        finite_c.append(float(subset_translation_cka(X, mask, v, 10.0)))
    assert max(finite_c) - min(finite_c) > 1e-3  # ...while at finite c the direction does matter


def test_same_whichever_side_moves():
    """Moving the complement by c v is moving the subset by -c v plus a global translation."""
    X, mask, v = sample_problem(4)
    cka = rp.measures.make("cka")
    for c in (0.5, 7.0, 300.0):
        one_side = float(cka(torch.from_numpy(X), translate_subset(X, mask, v, c)))
        other_side = float(cka(torch.from_numpy(X), translate_subset(X, ~mask, v, -c)))
        assert one_side == pytest.approx(other_side, abs=1e-12)
        assert float(subset_translation_cka(X, ~mask, v, -c)) == pytest.approx(one_side, abs=1e-12)
    far_one = float(cka(torch.from_numpy(X), translate_subset(X, mask, v, 1e8)))
    far_other = float(cka(torch.from_numpy(X), translate_subset(X, ~mask, v, 1e8)))
    assert far_one == pytest.approx(far_other, rel=1e-6)


def test_corollary_rho_above_one_half():
    X, mask, v = sample_problem(5, n=50, moved=40)  # 80% move, 20% stay
    limit = float(subset_translation_limit(X, mask))
    assert limit == pytest.approx(ref_paper_limit(X, ~mask), rel=1e-10)
    assert float(subset_translation_cka(X, mask, v, 1e9)) == pytest.approx(limit, rel=1e-6)


def test_limit_is_invariant_like_cka():
    """Orthogonal maps, isotropic scaling and translation of X leave the limit unchanged."""
    X, mask, _ = sample_problem(6)
    rng = np.random.default_rng(6)
    Q, _ = np.linalg.qr(rng.normal(size=(X.shape[1], X.shape[1])))
    limit = float(subset_translation_limit(X, mask))
    for Y in (X @ Q, 3.7 * X, X + rng.normal(size=X.shape[1]) * 1e3):
        assert float(subset_translation_limit(Y, mask)) == pytest.approx(limit, rel=1e-10)


# --- the single outlier -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 17, -1])
def test_outlier_limit_matches_the_paper_theorem_1_and_direct_cka(index):
    X, _, v = sample_problem(7)
    n = len(X)
    limit = float(outlier_limit(X, index))
    one_hot = np.zeros(n, dtype=bool)
    one_hot[index] = True
    assert limit == pytest.approx(ref_paper_outlier_limit(X, index % n), rel=1e-10)
    assert limit == pytest.approx(float(subset_translation_limit(X, one_hot)), rel=1e-10)
    direct = float(rp.measures.make("cka")(torch.from_numpy(X), add_outlier(X, index, v, 1e9)))
    assert direct == pytest.approx(limit, rel=1e-6)


def test_outlier_needs_a_large_translation():
    """The paper: an outlier drives CKA to near 0, but only once c is well beyond sqrt(n) times the data scale."""
    rng = np.random.default_rng(8)
    for n in (100, 1000):
        X = rng.normal(size=(n, 10))
        v = rng.normal(size=10)
        scale = math.sqrt(((X - X.mean(axis=0)) ** 2).sum(axis=1).mean())
        limit = float(outlier_limit(X, 0))
        one_hot = np.arange(n) == 0
        assert limit < 0.05
        assert float(subset_translation_cka(X, one_hot, v, scale)) > 0.95
        assert float(subset_translation_cka(X, one_hot, v, math.sqrt(n) * scale)) > 0.2
        assert float(subset_translation_cka(X, one_hot, v, 1000 * math.sqrt(n) * scale)) == pytest.approx(
            limit, rel=0.05
        )


# --- participation ratio, transformations -----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(problems(max_n=30, max_d=40))
def test_participation_ratio_matches_eigenvalues(problem):
    X, _, _ = problem
    pr = float(participation_ratio(X))
    assert pr == pytest.approx(ref_participation_ratio(X), rel=1e-9)
    assert 1.0 - 1e-9 <= pr <= min(X.shape[1], X.shape[0] - 1) + 1e-9


def test_participation_ratio_extremes():
    rng = np.random.default_rng(9)
    A = rng.normal(size=(40, 6))
    Q, _ = np.linalg.qr(A - A.mean(axis=0))  # centred orthonormal columns: isotropic covariance
    assert float(participation_ratio(Q * 5 + 2)) == pytest.approx(6.0, rel=1e-12)
    line = np.outer(rng.normal(size=30), rng.normal(size=4))
    assert float(participation_ratio(line)) == pytest.approx(1.0, rel=1e-12)


def test_translate_subset_and_add_outlier_move_exactly_the_selected_rows():
    X, mask, v = sample_problem(10)
    before = X.copy()
    out = translate_subset(X, mask, v, 2.5)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_array_equal(X, before)  # input untouched
    expected = ref_translate(X, mask, v, 2.5)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-14)
    np.testing.assert_array_equal(out.numpy()[~mask], X[~mask])
    Xt = torch.from_numpy(X).float()
    out32 = translate_subset(Xt, torch.from_numpy(mask), torch.from_numpy(v), 2.5)
    assert out32.dtype == torch.float64
    outlier = add_outlier(Xt, 3, v, -4.0)
    assert torch.equal(Xt, torch.from_numpy(X).float())
    moved_rows = (outlier != Xt.double()).any(dim=1).nonzero().flatten().tolist()
    assert moved_rows == [3]
    assert float(torch.linalg.vector_norm(outlier[3] - Xt[3].double())) == pytest.approx(4.0, rel=1e-12)


def test_invertible_linear_is_a_matrix_product_and_rejects_singular_maps():
    rng = np.random.default_rng(11)
    X = rng.normal(size=(30, 5))
    M = rng.normal(size=(5, 5))
    np.testing.assert_allclose(invertible_linear(X, M).numpy(), X @ M, rtol=1e-13, atol=1e-13)
    with pytest.raises(InputShapeError, match=r"square \(5, 5\)"):
        invertible_linear(X, rng.normal(size=(5, 4)))
    with pytest.raises(InputShapeError):
        invertible_linear(X, np.eye(6))
    singular = M.copy()
    singular[:, 0] = singular[:, 1]
    with pytest.raises(DegenerateInputError, match="not invertible"):
        invertible_linear(X, singular)
    with pytest.raises(DegenerateInputError, match="condition number"):
        invertible_linear(X, np.diag([1.0, 1.0, 1.0, 1.0, 1e-14]))
    invertible_linear(X, np.diag([1.0, 1.0, 1.0, 1.0, 1e-14]), max_condition=1e15)  # explicit opt-in


def test_linear_cka_is_not_invariant_to_invertible_maps_as_the_paper_says():
    """On isotropic X (X~^T X~ = n I exactly), CKA(X, XM) = ||M||_F^2 / (sqrt(p) ||M^T M||_F): about
    1/sqrt(2 + 1/p) for Gaussian M, and 1/sqrt(p) for a rank-one-like M."""
    rng = np.random.default_rng(12)
    n, p = 400, 32
    A = rng.normal(size=(n, p))
    Q, _ = np.linalg.qr(A - A.mean(axis=0))  # centred orthonormal columns
    X = Q * math.sqrt(n)
    cka = rp.measures.make("cka")
    values = [float(cka(torch.from_numpy(X), invertible_linear(X, rng.normal(size=(p, p))))) for _ in range(30)]
    assert np.mean(values) == pytest.approx(1 / math.sqrt(2 + 1 / p), abs=0.02)
    near_rank_one = np.outer(rng.normal(size=p), rng.normal(size=p)) + 1e-4 * np.eye(p)
    assert float(cka(torch.from_numpy(X), invertible_linear(X, near_rank_one))) == pytest.approx(
        1 / math.sqrt(p), rel=0.01
    )


# --- Corollary 4: a direction orthogonal to the classifier ----------------------------------------------------------


def test_nonneg_direction_is_positive_unit_and_orthogonal():
    rng = np.random.default_rng(13)
    W = rng.normal(size=(10, 64))
    v = separability_preserving_direction(W)
    assert v.shape == (64,) and v.dtype == torch.float64
    assert float(torch.linalg.vector_norm(v)) == pytest.approx(1.0, abs=1e-14)
    assert bool((v > 0).all())
    assert float((torch.from_numpy(W) @ v).abs().max()) < 1e-13
    assert float(logit_change(W, v, 1e3).abs().max()) < 1e-10
    mixed = separability_preserving_direction(torch.nn.Linear(64, 10).double(), nonneg=False)
    assert float(torch.linalg.vector_norm(mixed)) == pytest.approx(1.0, abs=1e-14)


def test_mixed_sign_direction_is_orthogonal_even_when_no_positive_one_exists():
    rng = np.random.default_rng(14)
    W = rng.normal(size=(3, 8))
    W[0] = np.abs(W[0]) + 0.1  # every v > 0 has W[0] v > 0
    v = separability_preserving_direction(W, nonneg=False)
    assert float((torch.from_numpy(W) @ v).abs().max()) < 1e-14
    with pytest.raises(DegenerateInputError, match="no non-negative direction") as info:
        separability_preserving_direction(W)
    assert "exact=False" in str(info.value)


def test_inexact_direction_is_the_papers_qp_optimum():
    """With no positive null vector the QP optimum is returned on request; check its KKT conditions directly."""
    rng = np.random.default_rng(1)
    W = rng.normal(size=(3, 8))
    W[0] = 0.0
    W[0, :2] = 1.0  # W[0] v = v_0 + v_1 > 0 for every v > 0
    with pytest.raises(DegenerateInputError):
        separability_preserving_direction(W)
    v = separability_preserving_direction(W, exact=False).numpy()
    assert (v > 0).all()
    Q = np.linalg.svd(W, full_matrices=False)[2].T  # orthonormal basis of the row space (rank 3)
    v = v * 0.1 / v.min()  # undo the normalisation: the QP optimum has its smallest component on the bound
    gradient = 2 * Q @ (Q.T @ v)
    free = v > 0.1 + 1e-9
    assert free.any() and not free.all()
    assert np.abs(gradient[free]).max() < 1e-6  # stationary in the free coordinates
    assert (gradient[~free] >= -1e-6).all()  # pushing an active coordinate up cannot help
    assert float(logit_change(W, v).abs().max()) > 1e-3  # ...and the logits do move


def test_a_face_of_the_orthant_is_not_positivity():
    """A null vector >= 0 with exact zeros (here v_0 = v_1 = 0 is forced) must not pass as positive."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        W = rng.normal(size=(3, 8))
        W[0] = 0.0
        W[0, :2] = 1.0
        with pytest.raises(DegenerateInputError):
            separability_preserving_direction(W)


def test_keep_probabilities_allows_a_common_logit_shift():
    """Rows whose sum is negative in every feature: no v > 0 keeps the logits (Gordan), but one keeps softmax."""
    rng = np.random.default_rng(16)
    W = rng.normal(size=(10, 64))
    W[0] -= W.sum(axis=0) + 1.0  # sum of rows = -1 everywhere: y = -1 certifies no positive null vector
    with pytest.raises(DegenerateInputError):
        separability_preserving_direction(W)
    v = separability_preserving_direction(W, keep="probabilities")
    assert bool((v > 0).all())
    change = logit_change(W, v, 50.0)
    assert float(change.std()) < 1e-12 and float(change.abs().max()) > 1.0
    h = torch.from_numpy(np.abs(rng.normal(size=(5, 64))))
    b = torch.from_numpy(rng.normal(size=10))
    Wt = torch.from_numpy(W)
    before = torch.softmax(h @ Wt.T + b, dim=1)
    after = torch.softmax((h + 50.0 * v) @ Wt.T + b, dim=1)
    assert float((before - after).abs().max()) < 1e-12
    with pytest.raises(UnknownNameError):
        separability_preserving_direction(W, keep="argmax")


def test_direction_errors_and_trivial_classifier():
    with pytest.raises(DegenerateInputError, match="rank 4"):
        separability_preserving_direction(np.random.default_rng(0).normal(size=(10, 4)))
    v = separability_preserving_direction(np.zeros((3, 4)))
    assert torch.allclose(v, torch.full((4,), 0.5, dtype=torch.float64))


def test_scale_for_target_cka_finds_the_first_crossing():
    X, mask, v = sample_problem(17)
    limit = float(subset_translation_limit(X, mask))
    target = (1 + limit) / 2
    c = scale_for_target_cka(X, mask, v, target)
    assert float(subset_translation_cka(X, mask, v, c)) == pytest.approx(target, abs=1e-9)
    assert (subset_translation_cka(X, mask, v, np.linspace(0, c, 200)[:-1]) > target).all()
    assert ref_cka(X, ref_translate(X, mask, v, c)) <= target + 1e-9
    with pytest.raises(DegenerateInputError, match="limit is"):
        scale_for_target_cka(X, mask, v, limit / 2)


# --- bad input -----------------------------------------------------------------------------------------------------


def _bad_inputs():
    X, mask, v = sample_problem(18, n=10, d=3, moved=4)
    return [
        ("mask length", lambda: translate_subset(X, mask[:-1], v, 1.0), InputShapeError, "one entry per row"),
        ("mask 2-D", lambda: translate_subset(X, mask[:, None], v, 1.0), InputShapeError, "boolean vector"),
        ("mask int", lambda: translate_subset(X, mask.astype(int), v, 1.0), InputDtypeError, "boolean"),
        ("mask float tensor", lambda: subset_translation_limit(X, torch.ones(10)), InputDtypeError, "boolean"),
        ("mask empty", lambda: translate_subset(X, np.zeros(10, bool), v, 1.0), DegenerateInputError, "no row"),
        ("mask full", lambda: subset_translation_cka(X, np.ones(10, bool), v, 1.0), DegenerateInputError, "every"),
        ("direction zero", lambda: translate_subset(X, mask, np.zeros(3), 1.0), DegenerateInputError, "zero vector"),
        ("direction length", lambda: translate_subset(X, mask, np.ones(4), 1.0), InputShapeError, "length 3"),
        ("direction nan", lambda: add_outlier(X, 0, [1.0, np.nan, 0], 1.0), DegenerateInputError, "NaN"),
        ("direction bool", lambda: add_outlier(X, 0, np.ones(3, bool), 1.0), InputDtypeError, "real-valued"),
        ("c inf", lambda: translate_subset(X, mask, v, math.inf), DegenerateInputError, "finite"),
        ("c text", lambda: translate_subset(X, mask, v, "big"), InputDtypeError, "real number"),
        ("c nan array", lambda: subset_translation_cka(X, mask, v, [1.0, np.nan]), DegenerateInputError, "finite"),
        ("c 2-D", lambda: subset_translation_cka(X, mask, v, np.ones((2, 2))), InputDtypeError, "1-D"),
        ("index range", lambda: add_outlier(X, 10, v, 1.0), InputShapeError, "out of range"),
        ("index float", lambda: outlier_limit(X, 1.0), InputDtypeError, "integer"),
        ("index bool", lambda: outlier_limit(X, True), InputDtypeError, "integer"),
        ("constant X", lambda: subset_translation_limit(np.ones((10, 3)), mask), DegenerateInputError, "variance"),
        ("constant X pr", lambda: participation_ratio(np.ones((10, 3))), DegenerateInputError, "variance"),
        ("X 1-D", lambda: translate_subset(X[:, 0], mask, v[:1], 1.0), InputShapeError, "2-D"),
        ("X int", lambda: participation_ratio(np.ones((4, 2), dtype=int)), InputDtypeError, "floating"),
        ("X nan", lambda: participation_ratio(np.full((4, 2), np.nan)), RepsimError, "NaN"),
    ]


@pytest.mark.parametrize(("label", "call", "error", "message"), _bad_inputs(), ids=[b[0] for b in _bad_inputs()])
def test_bad_input_raises_a_clear_error(label, call, error, message):
    with pytest.raises(error, match=message) as info:
        call()
    assert isinstance(info.value, RepsimError) and isinstance(info.value, ValueError)


# --- Corollary 4 end to end on real trained networks --------------------------------------------------------------


@pytest.mark.slow
def test_corollary_4_on_the_digits_cnn_keeps_every_logit():
    """One class of the CNN's post-ReLU penultimate layer moves along a positive direction orthogonal to the head:
    logits unchanged to 1e-6 (float64), identical predictions, activations non-negative, linear CKA below 0.2."""
    from digits_models import hidden, train_digits_cnn

    model, (_, _, Xte, yte) = train_digits_cnn(seed=0)
    H = hidden(model, Xte, "relu3").double()
    assert bool((H >= 0).all())
    head = model.fc2
    W, b = head.weight.detach().double(), head.bias.detach().double()
    v = separability_preserving_direction(head)
    assert bool((v > 0).all())

    limits = torch.stack([subset_translation_limit(H, yte == k) for k in range(10)])
    k = int(limits.argmin())
    mask = yte == k
    assert float(limits[k]) < 0.2  # the paper: moving one class of ten can take CKA close to its small limit
    c = scale_for_target_cka(H, mask, v, 0.15)
    moved = translate_subset(H, mask, v, c)

    logits, logits_moved = H @ W.T + b, moved @ W.T + b
    assert float((logits - logits_moved).abs().max()) < 1e-6
    assert torch.equal(logits.argmax(1), logits_moved.argmax(1))
    assert float((logits_moved.argmax(1) == yte).double().mean()) >= 0.95
    assert bool((moved >= 0).all())
    cka = float(rp.measures.make("cka")(H, moved))
    assert cka < 0.2
    assert cka == pytest.approx(float(subset_translation_cka(H, mask, v, c)), abs=1e-10)
    far = float(rp.measures.make("cka")(H, translate_subset(H, mask, v, 1e7)))
    assert far == pytest.approx(float(limits[k]), rel=1e-4)  # and CKA goes to Theorem 1's limit


@pytest.mark.slow
def test_corollary_4_on_the_digits_mlp_keeps_the_softmax_output():
    from digits_models import hidden, train_digits_mlp

    model, (_, _, Xte, yte) = train_digits_mlp(seed=0)
    H = hidden(model, Xte, "relu3").double()
    W, b = model.fc3.weight.detach().double(), model.fc3.bias.detach().double()
    v = separability_preserving_direction(W, keep="probabilities")
    mask = yte == int(torch.stack([subset_translation_limit(H, yte == k) for k in range(10)]).argmin())
    c = scale_for_target_cka(H, mask, v, 0.15)
    moved = translate_subset(H, mask, v, c)
    probabilities = torch.softmax(H @ W.T + b, dim=1)
    probabilities_moved = torch.softmax(moved @ W.T + b, dim=1)
    assert float((probabilities - probabilities_moved).abs().max()) < 1e-9
    assert bool((moved >= 0).all())
    assert float(rp.measures.make("cka")(H, moved)) < 0.2


@pytest.mark.slow
def test_digits_cnn_fixture_is_accurate_named_and_isolated():
    from digits_models import accuracy, hidden, train_digits_cnn

    model, (Xtr, _, Xte, yte) = train_digits_cnn()
    assert [name for name, _ in model.named_children()] == [
        "conv1",
        "relu1",
        "conv2",
        "relu2",
        "flatten",
        "fc1",
        "relu3",
        "fc2",
    ]
    assert Xtr.shape == (1347, 1, 8, 8) and Xte.shape == (450, 1, 8, 8) and float(Xtr.max()) <= 1.0
    assert accuracy(model, Xte, yte) >= 0.95
    assert hidden(model, Xte).shape == (450, 64)
    with torch.no_grad():
        model.fc2.weight.zero_()
    again, _ = train_digits_cnn()  # a fresh module from the cached weights: the change above does not leak
    assert float(again.fc2.weight.detach().abs().sum()) > 0
    assert accuracy(again, Xte, yte) >= 0.95


# --- the package -----------------------------------------------------------------------------------------------------


def test_lazy_model_level_names_resolve_only_on_access():
    import importlib.util

    adversarial = rp.adversarial
    assert adversarial.translate_subset is translate_subset
    for name, module in (("shift", "shifting"), ("audit", "auditing")):
        if importlib.util.find_spec(f"repsim_plugin.adversarial.{module}") is None:
            assert name not in adversarial.__all__
            with pytest.raises(AttributeError, match=module):
                getattr(adversarial, name)
        else:
            assert callable(getattr(adversarial, name))
    with pytest.raises(AttributeError):
        adversarial.no_such_name  # noqa: B018
    namespace: dict = {}
    exec("from repsim_plugin.adversarial import *", namespace)
    assert "subset_translation_cka" in namespace


def test_importing_every_submodule_leaves_shift_and_audit_the_functions():
    """No submodule is named like a public function, so importing each of them (as the CLI and users do) never
    rebinds ``rp.adversarial.shift`` / ``audit`` to a module."""
    import importlib
    import pkgutil

    adversarial = rp.adversarial
    names = sorted(info.name for info in pkgutil.iter_modules(adversarial.__path__))
    assert {"shifting", "auditing"} <= set(names)
    for name in names:
        importlib.import_module(f"repsim_plugin.adversarial.{name}")
    for name in ("shift", "audit"):
        value = getattr(adversarial, name)
        assert isinstance(value, types.FunctionType) and value.__name__ == name
    from repsim_plugin.adversarial import audit, shift

    assert shift is adversarial.shift and audit is adversarial.audit
    assert not any(isinstance(getattr(adversarial, n, None), types.ModuleType) for n in adversarial.__all__)


def test_importing_the_package_loads_neither_scipy_nor_sklearn():
    code = (
        "import sys, repsim_plugin.adversarial as a; a.translate_subset; "
        "print(sorted(m for m in ('scipy', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
