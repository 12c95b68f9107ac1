"""CKA against independent references: exact rational arithmetic, float64 textbook formulas, published facts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import cka_exact, cka_numpy, cka_rbf_numpy, debiased_cka_numpy, rbf_gram_numpy

import repsim_plugin as rp
from repsim_plugin.errors import SmallSampleBiasWarning
from repsim_plugin.measures.cka import expected_null_cka, linear_cka


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _cases() -> list[tuple[str, np.ndarray, np.ndarray, bool]]:
    """(name, X, Y, use the exact rational reference)."""
    r = _rng(1)
    relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
    X1 = r.standard_normal((50, 8))
    X2 = r.standard_normal((200, 64))
    return [
        ("gaussian", r.standard_normal((10, 3)), r.standard_normal((10, 4)), True),
        (
            "post_relu",
            relu(r.standard_normal((12, 6))),
            relu(r.standard_normal((12, 6)) @ r.standard_normal((6, 5))),
            True,
        ),
        ("large_common_offset", r.standard_normal((11, 4)) + 1e4, relu(r.standard_normal((11, 3))) + 1e3, True),
        (
            "offset_in_some_columns",
            r.standard_normal((9, 3)) * [1, 1, 1] + [0, 1e6, 0],
            r.standard_normal((9, 2)),
            True,
        ),
        ("more_features_than_samples", r.standard_normal((8, 20)), r.standard_normal((8, 15)), True),
        ("rank_one_y", r.standard_normal((10, 4)), np.outer(r.standard_normal(10), r.standard_normal(3)), True),
        ("integer_valued", r.integers(-5, 6, (12, 4)).astype(float), r.integers(0, 3, (12, 3)).astype(float), True),
        ("single_feature", r.standard_normal((10, 1)), r.standard_normal((10, 1)), True),
        ("linear_relation", X1, X1 @ r.standard_normal((8, 6)) + 0.1 * r.standard_normal((50, 6)), False),
        ("post_relu_wide", relu(X2), relu(X2 @ r.standard_normal((64, 32))), False),
        ("mixed_column_scales", r.standard_normal((60, 5)) * np.logspace(-3, 3, 5), r.standard_normal((60, 4)), False),
        ("heavy_tailed", r.standard_t(1.5, (60, 5)), r.standard_t(1.5, (60, 5)), False),
    ]


@pytest.mark.parametrize("space", ["auto", "feature", "sample"])
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_linear_cka_matches_textbook(case, space):
    name, X, Y, exact = case
    expected = cka_exact(X, Y) if exact else cka_numpy(X, Y)
    got = float(linear_cka(torch.from_numpy(X), torch.from_numpy(Y), space=space))
    assert got == pytest.approx(expected, abs=1e-10), name


def test_registry_cka_matches_textbook_on_numpy_input():
    X, Y = _rng(2).standard_normal((30, 5)), _rng(3).standard_normal((30, 7))
    assert rp.similarity(X, Y, "cka") == pytest.approx(cka_numpy(X, Y), abs=1e-12)
    assert rp.similarity(X, Y, "cka-kernel=linear-hsic=gretton-score") == pytest.approx(cka_numpy(X, Y), abs=1e-12)


@pytest.mark.parametrize("threshold", [0.2, 0.5, 1.0, 2.0])
def test_rbf_cka_matches_kornblith_reference(threshold):
    r = _rng(4)
    X = r.standard_normal((40, 6))
    Y = np.tanh(X @ r.standard_normal((6, 3))) + 0.2 * r.standard_normal((40, 3))
    got = rp.similarity(X, Y, "rbf_cka", sigma=threshold)
    assert got == pytest.approx(cka_rbf_numpy(X, Y, threshold), abs=1e-10)


@pytest.mark.parametrize("n", [30, 31])  # even and odd counts: numpy's median convention
def test_debiased_cka_matches_song_reference(n):
    r = _rng(5)
    X = r.standard_normal((n, 6))
    Y = X[:, :4] ** 2 + r.standard_normal((n, 4))
    lin = debiased_cka_numpy(X @ X.T, Y @ Y.T)  # raw Grams: Song's estimator needs no centering
    assert rp.similarity(X, Y, "debiased_cka") == pytest.approx(lin, abs=1e-10)
    for space in ("feature", "sample"):
        got = float(linear_cka(torch.from_numpy(X), torch.from_numpy(Y), debiased=True, space=space))
        assert got == pytest.approx(lin, abs=1e-10)
    rbf = debiased_cka_numpy(rbf_gram_numpy(X, 0.5), rbf_gram_numpy(Y, 0.5))
    assert rp.similarity(X, Y, "debiased_rbf_cka") == pytest.approx(rbf, abs=1e-10)
    # translation invariance of the unbiased estimator, exercised with a large offset on our side only
    assert rp.similarity(X + 1e4, Y - 3e3, "debiased_cka") == pytest.approx(lin, abs=1e-10)


# --- float32 and offsets --------------------------------------------------------------------------------------

FLOAT32_MEASURES = ["cka", "debiased_cka", "rbf_cka"]


@pytest.mark.parametrize("measure", FLOAT32_MEASURES)
def test_float32_large_offset_and_tiny_scale(measure):
    X = torch.randn(300, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    assert rp.similarity(X, X + 1e4, measure) >= 0.999999
    assert rp.similarity(X, 1e-3 * X, measure) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("measure", FLOAT32_MEASURES)
def test_float32_post_relu_offset(measure):
    g = torch.Generator().manual_seed(1)
    X = torch.relu(torch.randn(200, 16, generator=g)) + 1e4  # float32, large mean
    Y = torch.relu(torch.randn(200, 16, generator=g)) * 1e-3
    ref = rp.similarity(X.double(), Y.double(), measure)
    assert rp.similarity(X, Y, measure) == pytest.approx(ref, abs=1e-12)  # upcast before anything is summed


def test_naive_float32_gram_fails_where_we_do_not():
    """The failure mode PAPER.md describes: forming X X^T before centering in float32 destroys CKA."""
    X = torch.randn(500, 64, generator=torch.Generator().manual_seed(2))
    Y = X + 1e4  # a pure global shift: true CKA is 1
    K, L = X @ X.T, Y @ Y.T
    H = torch.eye(500) - 1.0 / 500
    Kc, Lc = H @ K @ H, H @ L @ H
    naive = float((Kc * Lc).sum() / torch.sqrt((Kc * Kc).sum() * (Lc * Lc).sum()))
    assert naive < 0.9
    assert rp.similarity(X, Y) > 0.999999


def test_half_precision_inputs_are_upcast():
    X = torch.randn(100, 8, generator=torch.Generator().manual_seed(3))
    Y = X @ torch.randn(8, 8, generator=torch.Generator().manual_seed(4))
    for dtype in (torch.float16, torch.bfloat16):
        value = rp.measures.make("cka")(X.to(dtype), Y.to(dtype))
        assert value.dtype == torch.float64
        ref = rp.similarity(X.to(dtype).double(), Y.to(dtype).double())
        assert float(value) == pytest.approx(ref, abs=1e-12)


def test_compute_dtype_can_be_float32():
    X, Y = torch.randn(50, 4), torch.randn(50, 3)
    m = rp.measures.make("cka", dtype=torch.float32)
    assert m.id == rp.measures.make("cka").id
    assert m(X, Y).dtype == torch.float32
    assert float(m(X, Y)) == pytest.approx(rp.similarity(X, Y), abs=1e-5)


# --- debiased CKA and the small-sample bias ----------------------------------------------------------------------


def test_debiased_self_similarity_is_one():
    for seed in range(5):
        X = torch.randn(80, 10, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for name in ("debiased_cka", "debiased_rbf_cka", "cka", "rbf_cka"):
            assert abs(rp.similarity(X, X, name) - 1.0) <= 1e-12


def test_null_bias_biased_versus_debiased():
    """Independent Gaussians, n=1000, d=100: biased CKA ~ sqrt(pq/((n+p)(n+q))), debiased ~ 0 (Murphy 2024)."""
    n, d, seeds = 1000, 100, 10
    predicted = expected_null_cka(n, d, d)
    assert predicted == pytest.approx(d / (n + d))
    biased, debiased = [], []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(100 + seed)
        X = torch.randn(n, d, generator=g, dtype=torch.float64)
        Y = torch.randn(n, d, generator=g, dtype=torch.float64)
        biased.append(rp.similarity(X, Y, "cka"))
        debiased.append(rp.similarity(X, Y, "debiased_cka"))
    assert abs(np.mean(debiased)) < 0.01
    assert all(abs(b - predicted) < 0.02 for b in biased)
    assert abs(np.mean(biased) - predicted) < 0.02


@pytest.mark.parametrize(("n", "p", "q"), [(200, 50, 10), (300, 300, 30)])
def test_null_bias_unequal_widths(n, p, q):
    vals = []
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(n, p, generator=g, dtype=torch.float64)
        Y = torch.randn(n, q, generator=g, dtype=torch.float64)
        vals.append(rp.similarity(X, Y, "cka"))
    assert np.mean(vals) == pytest.approx(expected_null_cka(n, p, q), abs=0.02)


def test_biased_cka_warns_when_features_rival_samples():
    X, Y = torch.randn(50, 40), torch.randn(50, 40)
    with pytest.warns(SmallSampleBiasWarning, match="debiased"):
        rp.similarity(X, Y, "cka")


def test_no_warning_when_samples_dominate(recwarn):
    rp.similarity(torch.randn(2000, 10), torch.randn(2000, 10), "cka")
    assert not [w for w in recwarn if issubclass(w.category, SmallSampleBiasWarning)]


# --- autograd -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cka", "debiased_cka", "rbf_cka", "debiased_rbf_cka"])
@pytest.mark.parametrize("shape", [(10, 3, 2), (6, 9, 8)])  # feature space and sample space
def test_gradcheck(name, shape):
    n, p, q = shape
    g = torch.Generator().manual_seed(7)
    X = torch.randn(n, p, generator=g, dtype=torch.float64, requires_grad=True)
    Y = torch.randn(n, q, generator=g, dtype=torch.float64, requires_grad=True)
    m = rp.measures.make(name)
    assert torch.autograd.gradcheck(m, (X, Y), eps=1e-6, atol=1e-6)


def test_gradient_flows_from_float32_leaf():
    X = torch.randn(30, 4, requires_grad=True)
    Y = torch.randn(30, 3)
    rp.measures.make("debiased_cka")(X, Y).backward()
    assert X.grad is not None and X.grad.dtype == torch.float32 and torch.isfinite(X.grad).all()


def test_result_is_zero_dim_tensor_on_input_device():
    X, Y = torch.randn(20, 3), torch.randn(20, 3)
    out = rp.measures.make("cka")(X, Y)
    assert out.ndim == 0 and out.device == X.device and out.dtype == torch.float64
    assert math.isfinite(float(out))
