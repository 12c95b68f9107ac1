"""The fast paths (float32 products of float64-exact deviations) against float64 references.

Speed is measured by ``benchmarks/`` and never asserted here; these tests hold the fast paths to their accuracy
promise (within 1e-8 of full float64, typically 1e-10, on problems large enough to take them) and check they are
really taken.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import repsim_plugin as rp
from repsim_plugin.measures.mixed import MIXED_MIN_FLOPS, cross_product64, deviation_gram64, self_product64


def _pairs(n: int, p: int, q: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g)
    Y = X[:, :q] @ torch.randn(q, q, generator=g) / q**0.5 + torch.randn(n, q, generator=g)
    yield "plain", X, Y
    yield "offset", torch.relu(X) + 1e4, torch.relu(Y) + 1e3
    yield "skew", 3 * torch.relu(X) ** 2 + 5, torch.relu(Y) - 2e3
    yield "independent", torch.randn(n, p, generator=g) + 3e3, torch.randn(n, q, generator=g)
    # features of Y that nearly coincide with features of X (CKA of a layer with its slightly changed copy): the
    # float32 cross product's large entries carry most of its rounding
    yield "coinciding", X, X[:, :q] + 0.01 * torch.randn(n, q, generator=g)
    yield "coinciding offset", torch.relu(X) + 1e3, torch.relu(X[:, :q]) + 0.01 * torch.randn(n, q, generator=g)
    yield "duplicated features", X, X[:, :8].repeat(1, q // 8 + 1)[:, :q] + 0.01 * torch.randn(n, q, generator=g)
    duplicated_rows = torch.cat([X[: n // 2], X[: n - n // 2] + 1e-3 * torch.randn(n - n // 2, p, generator=g)])
    yield "duplicated samples", duplicated_rows, duplicated_rows[:, :q] @ torch.randn(q, q, generator=g)


def _numpy_cka(X: np.ndarray, Y: np.ndarray, debiased: bool) -> float:
    """Textbook float64 CKA through the n x n Grams (Song et al.'s unbiased HSIC for the debiased form)."""
    n = X.shape[0]
    X, Y = X - X.mean(0), Y - Y.mean(0)  # centring first keeps a 1e4 offset from swamping float64 Grams
    K, L = X @ X.T, Y @ Y.T
    if not debiased:
        H = np.eye(n) - 1.0 / n
        Kc, Lc = H @ K @ H, H @ L @ H
        return float((Kc * Lc).sum() / np.sqrt((Kc * Kc).sum() * (Lc * Lc).sum()))

    def hsic(A: np.ndarray, B: np.ndarray) -> float:
        A, B = A - np.diag(np.diag(A)), B - np.diag(np.diag(B))
        one = np.ones(n)
        value = np.trace(A @ B) + (one @ A @ one) * (one @ B @ one) / ((n - 1) * (n - 2))
        return float((value - 2.0 / (n - 2) * (one @ A @ B @ one)) / (n * (n - 3)))

    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", [(3000, 160, 96), (400, 900, 700)], ids=["feature", "sample"])
def test_float32_inputs_take_the_mixed_path_within_1e_8_of_float64(shape, debiased):
    n, p, q = shape
    m = rp.measures.make("debiased_cka" if debiased else "cka")
    full = m.with_dtype(torch.float64)
    assert m.mixed_fn is not None and full.mixed_fn is None
    for name, X, Y in _pairs(n, p, q):
        assert n * min(p * q + p * p + q * q, n * (p + q)) >= MIXED_MIN_FLOPS  # the mixed path is taken
        got, ref = float(m(X, Y)), float(full(X, Y))
        assert got == pytest.approx(ref, abs=1e-8), name
        if n <= 1000:  # the textbook n x n form; the feature form's float64 value is checked by test_cka.py
            assert ref == pytest.approx(_numpy_cka(X.double().numpy(), Y.double().numpy(), debiased), abs=1e-9), name


def test_debiased_cka_of_few_wide_rows_within_1e_8_of_float64():
    """Unbiased HSIC drops the Grams' exact diagonals: with few rows for their width the float32 product's rounding
    reached 2.6e-8 here (n = 128, d = 65536), so such problems stay float64 (mixed.unbiased_gram_mixed_ok)."""
    from repsim_plugin.measures.mixed import unbiased_gram_mixed_ok
    from repsim_plugin.streaming import SampleSpaceCKAMap

    n, p, q = 128, 65536, 4096
    assert not unbiased_gram_mixed_ok(n, p) and n * n * p >= MIXED_MIN_FLOPS
    m = rp.measures.make("debiased_cka")
    full = m.with_dtype(torch.float64)
    for name, X, Y in _pairs(n, p, q, seed=12):
        assert float(m(X, Y)) == pytest.approx(float(full(X, Y)), abs=1e-8), name
        fast, exact = SampleSpaceCKAMap(debiased=True), SampleSpaceCKAMap(debiased=True)
        fast.update({"x": X}, {"y": Y})
        exact.update({"x": X.double()}, {"y": Y.double()})
        assert torch.allclose(fast.compute(), exact.compute(), atol=1e-8, rtol=0), name


def test_mixed_path_keeps_autograd_and_float64_inputs_stay_float64():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3000, 128, generator=g, requires_grad=True)
    Y = torch.randn(3000, 96, generator=g)
    m = rp.measures.make("cka")
    value = m(X, Y)
    value.backward()
    assert value.dtype == torch.float64 and X.grad is not None and bool(torch.isfinite(X.grad).all())
    X64 = X.detach().double().requires_grad_(True)
    ref = m(X64, Y.double())
    ref.backward()
    assert float(value) == pytest.approx(float(ref), abs=1e-8)
    assert torch.allclose(X.grad.double(), X64.grad, rtol=1e-3, atol=1e-12)


def test_nan_and_inf_are_still_found_by_the_extremes_check():
    X = torch.randn(50, 4)
    for bad in (float("nan"), float("inf"), -float("inf")):
        Z = X.clone()
        Z[17, 2] = bad
        with pytest.raises(rp.errors.NonFiniteInputError, match="row 17"):
            rp.similarity(Z, X)


@pytest.mark.parametrize("debiased", [False, True])
def test_sample_space_map_of_float32_rows_is_within_3e_8_of_float64_rows(debiased):
    from repsim_plugin.streaming import SampleSpaceCKAMap

    g = torch.Generator().manual_seed(2)
    n = 384
    base = torch.randn(n, 1500, generator=g)
    acts = {
        "offset": torch.relu(base) + 1e4,
        "mixed": base[:, :700] @ torch.randn(700, 1200, generator=g) / 30 + torch.randn(n, 1200, generator=g),
        "skew": 3 * torch.relu(base[:, 500:]) ** 2 - 7e2,
    }
    assert n * n * 1000 >= MIXED_MIN_FLOPS
    fast, full = SampleSpaceCKAMap(debiased), SampleSpaceCKAMap(debiased)
    for i in range(0, n, 100):
        fast.update({k: v[i : i + 100] for k, v in acts.items()})
        full.update({k: v[i : i + 100].double() for k, v in acts.items()})
    got, ref = fast.compute(), full.compute()
    assert torch.allclose(got, ref, atol=3e-8, rtol=0), (got - ref).abs().max()
    one = SampleSpaceCKAMap(debiased)  # batching does not change a bit: the same rows, the same products
    one.update(acts)
    assert torch.equal(one.compute(), got)


def test_minibatch_map_of_float32_rows_is_within_3e_8_of_float64_rows():
    from repsim_plugin.streaming import MinibatchCKAMap

    g = torch.Generator().manual_seed(4)
    base = torch.randn(256, 9000, generator=g)
    acts = {
        "offset": torch.relu(base) + 1e4,
        "proj": base[:, :900] @ torch.randn(900, 8300, generator=g) / 30,
        "narrow": torch.relu(base[:, :1100]) * 3 - 1e3,  # b^2 d = 18M: float32 in a map, float64 one-shot
    }
    from repsim_plugin.streaming.minibatch import _mixed

    assert all(_mixed(v[:128]) for v in acts.values()) and MIXED_MIN_FLOPS > 128 * 128 * 1100
    fast, full = MinibatchCKAMap(), MinibatchCKAMap()
    for i in range(0, 256, 128):
        fast.update({k: v[i : i + 128] for k, v in acts.items()})
        full.update({k: v[i : i + 128].double() for k, v in acts.items()})
    got, ref = fast.compute(), full.compute()
    assert torch.allclose(got, ref, atol=3e-8, rtol=0), (got - ref).abs().max()


def test_deviation_gram_is_symmetric_with_an_exact_diagonal():
    g = torch.Generator().manual_seed(5)
    D = torch.relu(torch.randn(300, 700, generator=g)) - 0.4  # 300 rows: uneven halves down to blocks of <= 64
    G = deviation_gram64(D)
    D64 = D.double()
    ref = D64 @ D64.T
    assert G.dtype == torch.float64 and torch.equal(G, G.T)
    assert torch.allclose(G.diagonal(), (D64 * D64).sum(1), rtol=1e-14, atol=0)  # exact in float64, not float32
    off = ~torch.eye(300, dtype=torch.bool)
    assert float(((G - ref)[off]).abs().max() / ref.abs().max()) < 1e-6  # float32 products: measured ~1e-7
    assert float(((G - ref)[off]).abs().max()) > 0  # really float32 products (float64 would be exact here)


def test_products_make_the_entries_of_coinciding_features_exact_and_leaves_the_rest_float32():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(5000, 40, generator=g)
    B = torch.cat([A[:, :10] + 0.01 * torch.randn(5000, 10, generator=g), torch.randn(5000, 20, generator=g)], 1)
    sa, sb = A.double().square().sum(0), B.double().square().sum(0)
    got = cross_product64(A, B, sa, sb)
    exact, plain = A.double().T @ B.double(), (A.T @ B).double()
    coinciding = torch.zeros(40, 30, dtype=torch.bool)
    coinciding[range(10), range(10)] = True
    assert torch.allclose(got[coinciding], exact[coinciding], rtol=1e-13, atol=0)
    assert torch.equal(got[~coinciding], plain[~coinciding])
    assert (plain[coinciding] - exact[coinciding]).abs().max() > 1e-4  # float32's rounding there is real
    A[:, 39] = A[:, 0] + 0.01 * torch.randn(5000, generator=g)
    sa = A.double().square().sum(0)
    self_product, exact = self_product64(A, sa), A.double().T @ A.double()
    assert torch.equal(self_product, self_product.T)  # half a product, mirrored
    assert self_product[0, 39] == pytest.approx(float(exact[0, 39]), rel=1e-13)
    off_diagonal = ~torch.eye(40, dtype=torch.bool)  # the diagonal stays float32's: callers replace it
    assert (self_product - exact)[off_diagonal].abs().max() < 1e-3
