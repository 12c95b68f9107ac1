"""Long float32 products on oneDNN's kernels, opt-in (``REPSIM_ONEDNN=1``): twice MKL's speed here, rounding worse.

torch multiplies CPU float32 matrices in MKL, which takes its AVX2 kernels on non-Intel processors: on the 2-core
AMD EPYC (AVX-512) that the benchmarks ran on until 2026-12-05, the 1024 x 1024 Gram of 16384 features took
0.153 s in MKL and 0.071 s in oneDNN, the library torch already carries for its convolutions
(``benchmarks/RESULTS.md``).

oneDNN rounds differently, though, and on the pairs that stress float32 products most it rounds worse, also on
long sums: where the terms cancel (deviations from a mean) its error was 1.7-1.9x MKL's at 16384-32768 terms, and
CKA of the "offset" pair of ``tests/test_performance.py`` at n = 16384 samples (feature form, 160 / 96 features)
was 1.95e-8 from float64 against MKL's 1.1e-9, past the 1e-8 the exact estimators promise; debiased CKA of 96
samples of 16384 features, 2.1e-8 against 8.9e-9. So torch's product stays the default, and the exactness
measurements hold for it. With ``REPSIM_ONEDNN=1``, :func:`product_t` sends sums of at least ``ONEDNN_MIN_TERMS``
terms (the sample-space Grams of wide layers, feature-space products over 16384+ samples) to oneDNN, strict
float32 (one rounding per multiply-add, float32 accumulation); shorter sums, where it rounded 1.6-3.9x worse on
positive entries, stay on torch's BLAS.

Even then only where it is safe: x86-64 (where it was measured), dense float32 CPU tensors without autograd,
torch's float32 matmul precision at "highest" and oneDNN's own at its default (a precision the user lowered keeps
torch's product, which then follows it), and after a check at first use that oneDNN's result is float32-accurate
(a product that rounded its inputs to bfloat16 is caught).
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Callable

import torch

#: The environment variable that sends long products to oneDNN ("1"; anything else keeps torch's default BLAS).
SWITCH = "REPSIM_ONEDNN"
#: With the switch on, sums of at least this many terms go to oneDNN (shorter ones rounded worse still).
ONEDNN_MIN_TERMS = 16384
#: oneDNN's float32 precision settings that keep strict float32 arithmetic.
_STRICT = ("none", "ieee")

Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@functools.lru_cache(maxsize=1)
def onednn_inner_product() -> Product | None:
    """oneDNN's dense inner product ``(a, b) -> a @ b.T``, or None where this torch lacks it or it is not exact."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return None  # measured on x86-64 only: elsewhere (ARM's oneDNN builds) torch's BLAS is kept
    try:
        op = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None

    def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return op(a, b, None, "none", [], "")

    return inner if float32_accurate(inner) else None


def float32_accurate(inner: Product) -> bool:
    """Whether ``inner(a, b)`` is ``a @ b.T`` in float32: within 64 roundings of the float64 product, elementwise.

    Inputs rounded to bfloat16 (a reduced-precision mode) are 2^-8 off, 500x past that; an error is a failure.
    """
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(48, 777, generator=g), torch.randn(40, 777, generator=g)
    try:
        with torch.no_grad():
            got = inner(a, b)
    except RuntimeError:
        return False
    if got.shape != (48, 40) or got.dtype != torch.float32 or got.layout != torch.strided:
        return False
    scale = a.double().abs() @ b.double().abs().T  # |a| |b|^T bounds each sum's rounding error
    error = (got.double() - a.double() @ b.double().T).abs()
    return bool((error <= 64 * torch.finfo(torch.float32).eps * scale).all())


def uses_onednn() -> bool:
    """Whether :func:`product_t` sends long float32 CPU products to oneDNN now: switched on (``REPSIM_ONEDNN=1``),
    torch's settings at strict float32, and oneDNN's product float32-accurate here (:func:`available`)."""
    if os.environ.get(SWITCH, "0").strip() != "1" or torch.get_float32_matmul_precision() != "highest":
        return False
    try:
        precision = torch.backends.mkldnn.matmul.fp32_precision  # type: ignore[attr-defined]
    except AttributeError:  # a torch without the setting: strict float32
        precision = "none"
    return precision in _STRICT and available()


def available() -> bool:
    """Whether this machine and torch have a float32-accurate oneDNN inner product (x86-64, checked at first use)."""
    return onednn_inner_product() is not None


def dense(t: torch.Tensor) -> bool:
    """Whether a 2-D tensor is a row-major matrix or the transpose of one, the layouts oneDNN multiplies at speed.

    Other strides (a block of rows of a transposed matrix, ``D.T[lo:hi]``) take oneDNN's slow reference path:
    2.9 s instead of 5 ms for the half-Gram of a 512 x 2000 transposed view, measured.
    """
    rows, cols = t.shape
    return (t.stride(1) == 1 and t.stride(0) == cols) or (t.stride(0) == 1 and t.stride(1) == rows)


def product_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` of 2-D tensors; with ``REPSIM_ONEDNN=1``, on oneDNN for long sums of dense float32 CPU tensors."""
    eligible = (
        a.shape[1] >= ONEDNN_MIN_TERMS
        and min(a.shape[0], b.shape[0]) > 0
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
        and all(t.dtype == torch.float32 and t.device.type == "cpu" and dense(t) for t in (a, b))
    )
    inner = onednn_inner_product() if eligible and uses_onednn() else None
    if inner is not None:
        try:
            return inner(a, b)
        except RuntimeError:  # a shape or layout this oneDNN build refuses: torch's product gives the same result
            pass
    return a @ b.T
