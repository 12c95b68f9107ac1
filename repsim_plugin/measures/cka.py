"""Centered Kernel Alignment: linear, RBF and any kernel of ``kernels.KERNELS``, biased and debiased.

References: Kornblith et al. 2019 (CKA), Gretton et al. 2005 (biased HSIC), Song et al. 2012 (unbiased HSIC),
Murphy et al. 2024 (bias of CKA at small n).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import RepsimError, TooFewSamplesError, UnknownNameError
from .kernels import (
    DEFAULT_BANDWIDTH,
    KERNEL_PARAMS,
    KERNELS,
    NULL_BIAS_WARNING,
    SCALE_DEPENDENT_KERNELS,
    center_columns,
    center_gram,
    cka_from_hsic,
    expected_null_cka,
    hsic_unbiased,
    linear_hsic_unbiased_features,
    resolve_kernel,
    warn_full_rank,
    warn_small_sample_bias,
)
from .mixed import (
    MIXED_MIN_FLOPS,
    cross_product64,
    deviations32,
    gram_fixed,
    self_product64,
    squared_norm_fixed,
    unbiased_gram_mixed_ok,
)
from .registry import Estimator, Measure, Spec, register_family

__all__ = [
    "HSIC_ESTIMATORS",
    "NULL_BIAS_WARNING",
    "build_cka",
    "choose_space",
    "expected_null_cka",
    "kernel_cka",
    "linear_cka",
    "linear_cka_mixed",
]

HSIC_ESTIMATORS = {"gretton": "biased (Gretton et al. 2005)", "song": "unbiased (Song et al. 2012)"}


def choose_space(n: int, p: int, q: int) -> str:
    """Pick the cheaper exact form of linear CKA: ``"feature"`` (O(n(pq + p^2 + q^2))) or ``"sample"`` (O(n^2(p+q)))."""
    feature_cost = n * (p * q + p * p + q * q)
    sample_cost = n * n * (p + q + 3)
    return "feature" if feature_cost <= sample_cost else "sample"


def linear_cka(X: torch.Tensor, Y: torch.Tensor, *, debiased: bool = False, space: str = "auto") -> torch.Tensor:
    """Linear CKA of (n, p) and (n, q) tensors, exact, in feature space or sample space.

    Both spaces give the same value; ``space="auto"`` picks the cheaper one by comparing n with p and q.
    """
    Xc, Yc = center_columns(X), center_columns(Y)
    n, p = Xc.shape
    q = Yc.shape[1]
    if space == "auto":
        space = choose_space(n, p, q)
    if not debiased:
        warn_small_sample_bias(n, p, q, "Report debiased CKA (make('debiased_cka')) or use more samples.")
    if space == "feature":
        if debiased:
            xy = linear_hsic_unbiased_features(Xc, Yc)
            xx = linear_hsic_unbiased_features(Xc, Xc)
            yy = linear_hsic_unbiased_features(Yc, Yc)
        else:  # the (n-1)^2 normalisations cancel in the ratio
            xy = (Yc.T @ Xc).square().sum()
            xx = (Xc.T @ Xc).square().sum()
            yy = (Yc.T @ Yc).square().sum()
    elif space == "sample":
        K, L = Xc @ Xc.T, Yc @ Yc.T  # already double-centered
        if debiased:
            xy, xx, yy = hsic_unbiased(K, L), hsic_unbiased(K, K), hsic_unbiased(L, L)
        else:
            xy, xx, yy = (K * L).sum(), (K * K).sum(), (L * L).sum()
    else:
        raise UnknownNameError(f"space must be 'auto', 'feature' or 'sample', got {space!r}.")
    return cka_from_hsic(xy, xx, yy)


def linear_cka_mixed(X: torch.Tensor, Y: torch.Tensor, *, debiased: bool = False, space: str = "auto") -> torch.Tensor:
    """Linear CKA of float32 inputs, float32 products, float64 sums: within 1e-8 of :func:`linear_cka`.

    Deviations from the column means are formed in float64 and rounded once to float32 (:func:`deviations32`),
    the three products run in float32 (the cost of the measure, at float32 GEMM speed; the two self-products as
    half GEMMs) with the entries of strongly correlated features made exact (``mixed.refine_correlated``), and
    everything built from them (squared norms, the debiased corrections, the ratio) in float64, with the Grams'
    diagonals exact. Small problems, where float64 costs nothing noticeable, take :func:`linear_cka` in float64, and
    so does debiased CKA in sample space with few rows for its width (``mixed.unbiased_gram_mixed_ok``).
    """
    n, p = X.shape
    q = Y.shape[1]
    if space == "auto":
        space = choose_space(n, p, q)
    flops = n * (p * q + p * p + q * q) if space == "feature" else n * n * (p + q)
    few_rows = debiased and space == "sample" and not unbiased_gram_mixed_ok(n, max(p, q))  # for their width
    if flops < MIXED_MIN_FLOPS or space not in ("feature", "sample") or few_rows:
        return linear_cka(X.to(torch.float64), Y.to(torch.float64), debiased=debiased, space=space)
    if not debiased:
        warn_small_sample_bias(n, p, q, "Report debiased CKA (make('debiased_cka')) or use more samples.")
    Dx, rx, cols_x, rows_x = deviations32(X)
    Dy, ry, cols_y, rows_y = deviations32(Y)
    if space == "feature":
        sx, sy = cols_x + n * rx.square(), cols_y + n * ry.square()  # the column sums of squares of Dx, Dy
        xy = squared_norm_fixed(cross_product64(Dy, Dx, sy, sx), ry, rx, n)
        xx = squared_norm_fixed(self_product64(Dx, sx), rx, rx, n, cols_x)
        yy = squared_norm_fixed(self_product64(Dy, sy), ry, ry, n, cols_y)
        if debiased:
            xy = _unbiased_features(xy, rows_x, rows_y, n)
            xx = _unbiased_features(xx, rows_x, rows_x, n)
            yy = _unbiased_features(yy, rows_y, rows_y, n)
        return cka_from_hsic(xy, xx, yy)
    K, L = gram_fixed(Dx, rx, rows_x), gram_fixed(Dy, ry, rows_y)
    if debiased:
        return cka_from_hsic(hsic_unbiased(K, L), hsic_unbiased(K, K), hsic_unbiased(L, L))
    return cka_from_hsic((K * L).sum(), (K * K).sum(), (L * L).sum())


def _unbiased_features(squared: torch.Tensor, rx: torch.Tensor, ry: torch.Tensor, n: int) -> torch.Tensor:
    """Song et al.'s unbiased HSIC from ``||Y~^T X~||^2`` and the row squared norms (as in kernels.py)."""
    if n < 4:
        raise TooFewSamplesError(f"unbiased HSIC needs at least 4 samples, got {n}.")
    value = squared - n / (n - 2) * (rx * ry).sum() + rx.sum() * ry.sum() / ((n - 1) * (n - 2))
    return value / (n * (n - 3))


def kernel_cka(
    X: torch.Tensor, Y: torch.Tensor, *, kernel: str = "rbf", debiased: bool = False, **kernel_params: Any
) -> torch.Tensor:
    """CKA with a kernel of ``kernels.KERNELS`` (Gram-matrix form, O(n^2) memory)."""
    gram = KERNELS[kernel]
    if not debiased:
        warn_full_rank(X.shape[0], X.shape[1], Y.shape[1], f"biased {kernel} CKA", "Use debiased=True or more samples.")
    K, L = gram(X, **kernel_params), gram(Y, **kernel_params)
    if debiased:
        return cka_from_hsic(hsic_unbiased(K, L), hsic_unbiased(K, K), hsic_unbiased(L, L))
    Kc, Lc = center_gram(K), center_gram(L)
    return cka_from_hsic((Kc * Lc).sum(), (Kc * Kc).sum(), (Lc * Lc).sum())


# --- registration ----------------------------------------------------------------------------------------------------

_REFERENCES = {
    "gretton": "Kornblith et al. 2019, Similarity of Neural Network Representations Revisited (ICML)",
    "song": "Song et al. 2012 (unbiased HSIC); Kornblith et al. 2019; Murphy et al. 2024",
}


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    raise RepsimError(f"{name} must be True or False, got {value!r}.")


def _kernel_spec(name: str, kparams: dict[str, Any]) -> str | Spec:
    if name == "linear":
        return "linear"
    items = [(k, v) for k, v in kparams.items() if not (k == "bandwidth" and v == DEFAULT_BANDWIDTH)]
    return Spec(name, tuple(items)) if items else name


def build_cka(params: dict[str, Any]) -> Measure:
    """Family builder for ``cka-kernel=...-hsic=...-score``."""
    params = dict(params)
    name, kparams = resolve_kernel(params)
    hsic = params.pop("hsic", None)
    debiased = params.pop("debiased", None)
    if debiased is not None:
        wanted = "song" if _as_bool("debiased", debiased) else "gretton"
        if hsic is not None and hsic != wanted:
            raise RepsimError(f"hsic={hsic!r} contradicts debiased={debiased!r}; give one of them.")
        hsic = wanted
    hsic = hsic or "gretton"
    if hsic not in HSIC_ESTIMATORS:
        raise UnknownNameError(f"unknown HSIC estimator {hsic!r}; choose one of {sorted(HSIC_ESTIMATORS)}.")
    other_kernels = sorted(k for k, accepted in KERNEL_PARAMS.items() if set(params) & set(accepted))
    if params and other_kernels:
        raise RepsimError(
            f"parameter(s) {sorted(params)} do not apply to kernel={name!r}; they belong to "
            + " / ".join(f"kernel={k!r}" for k in other_kernels)
            + ", so pass that kernel too."
        )
    if params:
        raise RepsimError(
            f"cka takes no parameter(s) {sorted(params)}; it accepts kernel, hsic / debiased and the kernel's "
            f"parameters ({ {k: sorted(v) for k, v in KERNEL_PARAMS.items()} })."
        )
    is_debiased = hsic == "song"
    mixed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    if name == "linear":

        def fn(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
            return linear_cka(X, Y, debiased=is_debiased)

        def mixed(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
            return linear_cka_mixed(X, Y, debiased=is_debiased)

    else:
        mixed = None

        def fn(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
            return kernel_cka(X, Y, kernel=name, debiased=is_debiased, **kparams)

    invariances = {"orthogonal", "isotropic_scaling", "translation", "permutation"}
    spec = Spec("cka", (("kernel", _kernel_spec(name, kparams)), ("hsic", hsic)), "score")
    estimators = _estimators(name, kparams, is_debiased, spec.render())
    if (name == "rbf" and kparams["bandwidth"] == "fixed") or name in SCALE_DEPENDENT_KERNELS:
        invariances.discard("isotropic_scaling")
    kernel_label = name if name == "linear" else f"{name} {kparams}"
    return Measure(
        fn=fn,
        spec=spec,
        larger_is_more_similar=True,
        symmetric=True,
        invariances=frozenset(invariances),
        differentiable=True,
        min_samples=4 if is_debiased else 2,
        reference=_REFERENCES[hsic],
        description=f"{'debiased' if is_debiased else 'biased'} CKA, {kernel_label} kernel",
        value_range=(-1.0, 1.0) if is_debiased else (0.0, 1.0),
        self_value=1.0,
        params={"kernel": name, **kparams, "hsic": hsic},
        estimators=estimators,
        working_memory=_gram_memory,
        mixed_fn=mixed,
    )


_STREAMING = "repsim_plugin.streaming"


def _estimators(kernel: str, kparams: dict[str, Any], debiased: bool, measure_id: str) -> dict[str, Estimator]:
    """Linear CKA streams exactly (feature-space statistics or kept rows with n x n Grams); every kernel has
    minibatch CKA (Nguyen et al. 2021), which always uses the unbiased HSIC."""
    out: dict[str, Estimator] = {}
    if kernel == "linear":
        out["feature_streaming"] = Estimator(f"{_STREAMING}:LinearCKAMap", {"debiased": debiased})
        out["sample_space"] = Estimator(f"{_STREAMING}:SampleSpaceCKAMap", {"debiased": debiased})
    note = (
        ""
        if debiased
        else "minibatch CKA always uses the unbiased HSIC (Nguyen et al. 2021); the biased estimator of "
        f"{measure_id} cannot be computed batch by batch."
    )
    out["minibatch"] = Estimator(f"{_STREAMING}:MinibatchCKAMap", {"kernel": kernel, **kparams}, exact=False, note=note)
    return out


def _gram_memory(n: int, p: int, q: int) -> int:
    """Float64 copies of both inputs plus two n x n Grams."""
    return 8 * n * (p + q) + 16 * n * n


register_family(
    "cka",
    build_cka,
    variants=[
        {"kernel": "linear", "hsic": "gretton"},
        {"kernel": "linear", "hsic": "song"},
        {"kernel": "rbf", "sigma": 0.5, "hsic": "gretton"},
        {"kernel": "rbf", "sigma": 0.5, "hsic": "song"},
        {"kernel": "rbf", "sigma": 1.0, "hsic": "gretton"},
        {"kernel": "cosine", "hsic": "gretton"},
        {"kernel": "polynomial", "degree": 3, "coef0": 1.0, "hsic": "gretton"},
    ],
    aliases={
        "cka": {"kernel": "linear", "hsic": "gretton"},
        "linear_cka": {"kernel": "linear", "hsic": "gretton"},
        "debiased_cka": {"kernel": "linear", "hsic": "song"},
        "unbiased_cka": {"kernel": "linear", "hsic": "song"},
        "rbf_cka": {"kernel": "rbf", "sigma": 0.5, "hsic": "gretton"},
        "debiased_rbf_cka": {"kernel": "rbf", "sigma": 0.5, "hsic": "song"},
    },
    replaces={"debiased": ("hsic",)},
)
