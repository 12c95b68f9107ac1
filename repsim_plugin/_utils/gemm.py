"""Long float32 products on oneDNN's kernels where torch's default CPU BLAS leaves the machine's vectors unused.

torch multiplies CPU float32 matrices in MKL, which takes its AVX2 kernels on non-Intel processors: on the 2-core
AMD EPYC (AVX-512) that the benchmarks run on, the 1024 x 1024 Gram of 16384 features took 0.153 s in MKL and
0.071 s in oneDNN, the library torch already carries for its convolutions (``benchmarks/RESULTS.md``).

oneDNN rounds differently, though: over sums of up to about 8192 terms its float32 results were 1.7-3.9x further
from float64 than MKL's (positive uniform entries, 64-512 rows), enough to push the exact estimators' worst cases
past their 3e-8 bars; from 12288 terms on they were as close (0.6-1.3x). So :func:`product_t` takes oneDNN only
for sums of at least ``ONEDNN_MIN_TERMS`` terms: the sample-space Grams of wide layers (a flattened conv or token
layer), where the products cost most. The arithmetic stays strict float32 (one rounding per multiply-add, float32
accumulation).

Only where that holds: x86-64 (where it was measured), dense float32 CPU tensors without autograd, torch's float32
matmul precision at "highest" and oneDNN's own at its default (a precision the user lowered keeps torch's product,
which then follows it), and after a check at first use that oneDNN's result is float32-accurate (a product that
rounded its inputs to bfloat16 is caught). ``REPSIM_ONEDNN=0`` keeps every product on torch's default.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Callable

import torch

#: The environment variable that keeps the products on torch's default BLAS ("0").
OFF_SWITCH = "REPSIM_ONEDNN"
#: Sums of at least this many terms go to oneDNN, where its rounding matched MKL's (module docstring).
ONEDNN_MIN_TERMS = 16384
#: oneDNN's float32 precision settings that keep strict float32 arithmetic.
_STRICT = ("none", "ieee")

Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@functools.lru_cache(maxsize=1)
def _inner_product() -> Product | None:
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
    """Whether :func:`product_t` may send float32 CPU products to oneDNN now (its switch, torch's settings, check)."""
    if os.environ.get(OFF_SWITCH, "1") == "0" or torch.get_float32_matmul_precision() != "highest":
        return False
    try:
        precision = torch.backends.mkldnn.matmul.fp32_precision  # type: ignore[attr-defined]
    except AttributeError:  # a torch without the setting: strict float32
        precision = "none"
    return precision in _STRICT and _inner_product() is not None


def dense(t: torch.Tensor) -> bool:
    """Whether a 2-D tensor is a row-major matrix or the transpose of one, the layouts oneDNN multiplies at speed.

    Other strides (a block of rows of a transposed matrix, ``D.T[lo:hi]``) take oneDNN's slow reference path:
    2.9 s instead of 5 ms for the half-Gram of a 512 x 2000 transposed view, measured.
    """
    rows, cols = t.shape
    return (t.stride(1) == 1 and t.stride(0) == cols) or (t.stride(0) == 1 and t.stride(1) == rows)


def product_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` of 2-D tensors; on oneDNN for long sums of dense float32 CPU tensors without autograd."""
    eligible = (
        a.shape[1] >= ONEDNN_MIN_TERMS
        and min(a.shape[0], b.shape[0]) > 0
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
        and all(t.dtype == torch.float32 and t.device.type == "cpu" and dense(t) for t in (a, b))
    )
    inner = _inner_product() if eligible and uses_onednn() else None
    if inner is not None:
        try:
            return inner(a, b)
        except RuntimeError:  # a shape or layout this oneDNN build refuses: torch's product gives the same result
            pass
    return a @ b.T
