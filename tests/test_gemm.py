"""The float32 products on oneDNN: opt-in, float32-exact, taken only where eligible, torch's product everywhere else."""

from __future__ import annotations

import pytest
import torch

from repsim_plugin._utils import gemm
from repsim_plugin.measures.mixed import unbiased_gram_mixed_ok
from repsim_plugin.streaming import SampleSpaceCKAMap

needs_onednn = pytest.mark.skipif(
    not gemm.available(), reason="this torch / machine has no float32-exact oneDNN inner product"
)
K = gemm.ONEDNN_MIN_TERMS


@pytest.fixture
def onednn_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch the oneDNN products on (they are opt-in) for one test."""
    monkeypatch.setenv(gemm.SWITCH, "1")


def _pair(rows_a: int, rows_b: int, terms: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows_a, terms, generator=g), torch.randn(rows_b, terms, generator=g) + 3.0


def _within_float32(got: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = a.double().abs() @ b.double().abs().T
    return bool(((got.double() - a.double() @ b.double().T).abs() <= 64 * 2**-23 * scale).all())


@needs_onednn
def test_long_dense_products_take_onednn_and_stay_float32_exact(onednn_on):
    a, b = _pair(40, 24, K)
    inner = gemm.onednn_inner_product()
    assert inner is not None
    assert not torch.equal(inner(a, b), a @ b.T)  # the two libraries round differently: the path can be told
    for x, y in ((a, b), (a.T.contiguous().T, b), (a, b.T.contiguous().T)):  # row-major and transposed layouts
        got = gemm.product_t(x, y)
        assert torch.equal(got, inner(x, y))
        assert _within_float32(got, x, y)


@needs_onednn
@pytest.mark.parametrize("case", ["short", "strided", "float64", "autograd", "no rows"])
def test_ineligible_products_are_torch_products_bit_for_bit(case, onednn_on):
    a, b = _pair(40, 24, K)
    if case == "short":  # sums under ONEDNN_MIN_TERMS, where oneDNN rounded worse than MKL
        a, b = a[:, : K - 1], b[:, : K - 1]
    elif case == "strided":  # rows of a transposed matrix: oneDNN's slow reference path
        a = torch.cat([a, a], dim=1)[:, ::2]
    elif case == "no rows":
        a = a[:0]
    elif case == "float64":
        a, b = a.double(), b.double()
    else:
        a.requires_grad_(True)
    got = gemm.product_t(a, b)
    assert torch.equal(got, a @ b.T)
    if case == "autograd":
        got.sum().backward()
        assert a.grad is not None


@needs_onednn
def test_onednn_is_opt_in_and_a_lowered_precision_keeps_torch_product(monkeypatch):
    a, b = _pair(8, 8, K)
    monkeypatch.delenv(gemm.SWITCH, raising=False)
    assert not gemm.uses_onednn()  # the default: torch's product, whose rounding the exactness tests measured
    assert torch.equal(gemm.product_t(a, b), a @ b.T)
    monkeypatch.setenv(gemm.SWITCH, "0")
    assert not gemm.uses_onednn()
    monkeypatch.setenv(gemm.SWITCH, "1")
    assert gemm.uses_onednn()
    assert not torch.equal(gemm.product_t(a, b), a @ b.T)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # the user allows reduced precision: torch's product follows it
    try:
        assert not gemm.uses_onednn()
        assert torch.equal(gemm.product_t(a, b), a @ b.T)
    finally:
        torch.set_float32_matmul_precision(before)
    assert gemm.uses_onednn()


def test_float32_check_rejects_bfloat16_rounding_and_failures():
    assert gemm.float32_accurate(lambda a, b: a @ b.T)
    assert not gemm.float32_accurate(lambda a, b: a.bfloat16().float() @ b.bfloat16().float().T)
    assert not gemm.float32_accurate(lambda a, b: (a @ b.T)[:, :-1])

    def broken(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no kernel for this layout")

    assert not gemm.float32_accurate(broken)


def test_dense_layouts():
    X = torch.zeros(6, 4)
    assert gemm.dense(X) and gemm.dense(X.T) and gemm.dense(X[2:5])
    assert not gemm.dense(X[:, 1:3]) and not gemm.dense(X.T[1:3]) and not gemm.dense(X[:, ::2])


@needs_onednn
@pytest.mark.parametrize("debiased", [False, True])
def test_wide_sample_space_map_on_onednn_within_3e_8_of_float64_and_batching_invariant(
    debiased, onednn_on, monkeypatch
):
    g = torch.Generator().manual_seed(5)
    n = 512  # enough rows for the debiased map to take float32 products (mixed.unbiased_gram_mixed_ok)
    base = torch.randn(n, K, generator=g)
    acts = {
        "offset": torch.relu(base) + 1e4,
        "skew": 3 * torch.relu(torch.flip(base, [1])) ** 2 - 7e2,
        "mixed": base[:, :600] @ torch.randn(600, K, generator=g) / 25 + torch.randn(n, K, generator=g),
    }
    fast, full, one = SampleSpaceCKAMap(debiased), SampleSpaceCKAMap(debiased), SampleSpaceCKAMap(debiased)
    for i in range(0, n, 96):
        fast.update({k: v[i : i + 96] for k, v in acts.items()})
        full.update({k: v[i : i + 96].double() for k, v in acts.items()})
    one.update(acts)
    got, ref = fast.compute(), full.compute()
    assert torch.allclose(got, ref, atol=3e-8, rtol=0), (got - ref).abs().max()
    assert torch.equal(one.compute(), got)  # the same rows, the same products, however they were batched
    monkeypatch.setenv(gemm.SWITCH, "0")
    mkl = fast.compute()
    assert not torch.equal(mkl, got)  # the map's Grams were oneDNN's
    assert torch.allclose(mkl, ref, atol=3e-8, rtol=0)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", [(512, K, K), (K, 160, 96)], ids=["sample", "feature"])
def test_adversarial_pairs_over_long_sums_within_1e_8_of_float64_by_default(shape, debiased, monkeypatch):
    """Sums of ONEDNN_MIN_TERMS terms on the pairs that stress float32 products most, with the default product.

    With oneDNN's products the feature form's "offset" pair came 1.95e-8 from float64 (torch's: 1.1e-9), which is
    why they are opt-in. 512 rows are the fewest for which the debiased sample form keeps float32 products at
    16384 features (``mixed.unbiased_gram_mixed_ok``).
    """
    from test_performance import _pairs

    import repsim_plugin as rp

    monkeypatch.delenv(gemm.SWITCH, raising=False)
    n, p, q = shape
    assert unbiased_gram_mixed_ok(n, p)  # the float32 products are what is tested
    m = rp.measures.make("debiased_cka" if debiased else "cka")
    full = m.with_dtype(torch.float64)
    for name, X, Y in _pairs(n, p, q, seed=7):
        assert float(m(X, Y)) == pytest.approx(float(full(X, Y)), abs=1e-8), name


def test_a_refused_call_falls_back_to_torch_product(monkeypatch):
    def refuses(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("could not create a primitive descriptor")

    monkeypatch.setattr(gemm, "onednn_inner_product", lambda: refuses)
    monkeypatch.setattr(gemm, "uses_onednn", lambda: True)
    a, b = _pair(8, 8, K)
    assert torch.equal(gemm.product_t(a, b), a @ b.T)
