"""Nearest-neighbour alignment: mutual k-NN, Jaccard k-NN and CKNNA (Huh et al. 2024).

Neighbours are found by cosine similarity of the raw samples (rows L2-normalised, not centered), a sample is
never its own neighbour, and ties are broken by sample index (stable sort), so the result is deterministic.
This follows the platonic-representation code (features normalised, ``topk`` neighbours); the canonical ids
use its parameter name, ``topk`` (``k=`` is accepted by ``make`` as a synonym).

- mutual k-NN: mean over samples of ``|N_X(i) ∩ N_Y(i)| / k``.
- Jaccard k-NN: mean over samples of ``|N_X(i) ∩ N_Y(i)| / |N_X(i) ∪ N_Y(i)|``.
- CKNNA: CKA of the cosine kernels restricted to mutual-neighbour pairs,
  ``HSIC_u(M∘K, M∘L) / sqrt(HSIC_u(M_K∘K, M_K∘K) HSIC_u(M_L∘L, M_L∘L))`` with ``M = M_K ∘ M_L`` the row-wise
  k-NN masks and Song et al.'s unbiased HSIC in its general (non-symmetric) form
  ``[tr(A B) + 1'A1 1'B1/((n-1)(n-2)) - 2/(n-2) 1'A B1] / (n(n-3))``. The masks are not symmetric, so
  ``1'AB1 != 1'BA1`` and CKNNA is (slightly) asymmetric: ``cknna(X, Y) != cknna(Y, X)`` in general. It is not
  bounded by 1 in absolute value either (the masked kernels are not positive semi-definite). Unlike the
  reference code no ``1e-6`` is added to the denominator: a non-positive self term is an error.

None of these is differentiable (neighbour sets are piecewise constant), and none is translation invariant:
cosine neighbours depend on the origin.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import DegenerateInputError, RepsimError, TooFewSamplesError
from .registry import Measure, Spec, register_family


def _unit_rows(X: torch.Tensor, name: str) -> torch.Tensor:
    norms = X.norm(dim=1)
    bad = (norms == 0).nonzero().flatten()
    if bad.numel():
        raise DegenerateInputError(
            f"cosine neighbours need non-zero samples, but sample {int(bad[0])} of {name} ({bad.numel()} in all) "
            "is all zeros. Drop it from both inputs."
        )
    return X / norms[:, None]


def cosine_kernel(X: torch.Tensor, name: str = "X") -> torch.Tensor:
    """Cosine similarities of the raw (uncentered) samples, (n, n)."""
    U = _unit_rows(X, name)
    return U @ U.T


def _check_k(n: int, k: int) -> None:
    if k >= n:
        raise TooFewSamplesError(f"k={k} neighbours need at least k + 1 = {k + 1} samples, got n={n}.")


def knn_indices(K: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (n, k) of each row's k largest off-diagonal entries of the similarity matrix ``K``."""
    n = K.shape[0]
    _check_k(n, k)
    masked = K.detach().clone()
    masked.fill_diagonal_(float("-inf"))
    return torch.argsort(masked, dim=1, descending=True, stable=True)[:, :k]


def knn_mask(K: torch.Tensor, k: int) -> torch.Tensor:
    """Row-wise k-NN indicator matrix (n, n): ``mask[i, j] = 1`` when j is one of i's k nearest neighbours."""
    idx = knn_indices(K, k)
    return torch.zeros_like(K).scatter_(1, idx, 1.0)


def _overlaps(X: torch.Tensor, Y: torch.Tensor, k: int) -> torch.Tensor:
    MX = knn_mask(cosine_kernel(X, "X"), k)
    MY = knn_mask(cosine_kernel(Y, "Y"), k)
    return (MX * MY).sum(dim=1)


def mutual_knn(X: torch.Tensor, Y: torch.Tensor, *, k: int = 10) -> torch.Tensor:
    """Mean fraction of shared cosine k nearest neighbours (Huh et al. 2024), in [0, 1]."""
    return (_overlaps(X, Y, k) / k).mean()


def jaccard_knn(X: torch.Tensor, Y: torch.Tensor, *, k: int = 10) -> torch.Tensor:
    """Mean Jaccard index of the cosine k-NN sets, ``|N_X ∩ N_Y| / |N_X ∪ N_Y|``, in [0, 1]."""
    shared = _overlaps(X, Y, k)
    return (shared / (2 * k - shared)).mean()


def hsic_unbiased_general(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Song et al.'s unbiased HSIC for possibly non-symmetric matrices (needs n >= 4).

    ``[tr(A'B') + (1'A'1)(1'B'1)/((n-1)(n-2)) - 2/(n-2) 1'A'B'1] / (n(n-3))``, primes: zero diagonal.
    """
    n = A.shape[0]
    Ap = A - torch.diag_embed(torch.diagonal(A))
    Bp = B - torch.diag_embed(torch.diagonal(B))
    trace = (Ap * Bp.T).sum()
    totals = Ap.sum() * Bp.sum() / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * (Ap.sum(dim=0) @ Bp.sum(dim=1))
    return (trace + totals - cross) / (n * (n - 3))


def cknna(X: torch.Tensor, Y: torch.Tensor, *, k: int = 10) -> torch.Tensor:
    """Centered kernel nearest-neighbour alignment (Huh et al. 2024) with cosine kernels."""
    if k < 2:
        raise RepsimError(f"CKNNA needs k >= 2 neighbours, got k={k}.")
    K, L = cosine_kernel(X, "X"), cosine_kernel(Y, "Y")
    MK, ML = knn_mask(K, k), knn_mask(L, k)
    M = MK * ML
    xy = hsic_unbiased_general(M * K, M * L)
    xx = hsic_unbiased_general(MK * K, MK * K)
    yy = hsic_unbiased_general(ML * L, ML * L)
    for value, name in ((xx, "X"), (yy, "Y")):
        if not bool(value > 0):
            raise DegenerateInputError(
                f"the neighbour-restricted HSIC of {name} with itself is {float(value):.3g} (not positive), so "
                "CKNNA is undefined here. Use more samples or a larger k."
            )
    return xy / torch.sqrt(xx * yy)


# --- registration ----------------------------------------------------------------------------------------------------

_FUNCTIONS = {"mutual_knn": mutual_knn, "jaccard_knn": jaccard_knn, "cknna": cknna}
_DESCRIPTIONS = {
    "mutual_knn": "mean fraction of shared cosine k nearest neighbours",
    "jaccard_knn": "mean Jaccard index of the cosine k-NN sets",
    "cknna": "CKA of cosine kernels restricted to mutual k-NN pairs",
}
_REFERENCE = "Huh et al. 2024, The Platonic Representation Hypothesis (ICML)"


def _topk(family: str, params: dict[str, Any]) -> int:
    topk, k = params.pop("topk", None), params.pop("k", None)
    if params:
        raise RepsimError(f"{family} takes no parameter(s) {sorted(params)}; it accepts topk (or k).")
    if topk is not None and k is not None and str(topk) != str(k):
        raise RepsimError(f"topk={topk!r} and k={k!r} disagree; give one of them.")
    value = topk if topk is not None else (k if k is not None else 10)
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise RepsimError(f"topk must be a positive integer, got {value!r}.") from None
    if isinstance(value, bool) or out < 1 or str(out) != str(value).strip():
        raise RepsimError(f"topk must be a positive integer, got {value!r}.")
    if family == "cknna" and out < 2:
        raise RepsimError("CKNNA needs topk >= 2.")
    return out


def _builder(family: str):
    fn_of = _FUNCTIONS[family]

    def build(params: dict[str, Any]) -> Measure:
        params = dict(params)
        k = _topk(family, params)

        def fn(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
            return fn_of(X, Y, k=k)

        is_cknna = family == "cknna"
        return Measure(
            fn=fn,
            spec=Spec(family, (("topk", k),)),
            larger_is_more_similar=True,
            symmetric=not is_cknna,
            invariances=frozenset({"orthogonal", "isotropic_scaling", "permutation"}),
            differentiable=False,
            # k neighbours besides the sample itself; CKNNA's unbiased HSIC also needs n >= 4
            min_samples=max(k + 1, 4) if is_cknna else k + 1,
            reference=_REFERENCE,
            description=f"{_DESCRIPTIONS[family]} (k={k})",
            value_range=(None, None) if is_cknna else (0.0, 1.0),
            self_value=1.0,
            params={"topk": k},
        )

    build.__doc__ = f"Family builder for ``{family}-topk=<k>``."
    return build


for _family in _FUNCTIONS:
    register_family(
        _family,
        _builder(_family),
        variants=[{"topk": 10}],
        aliases={_family: {"topk": 10}},
        replaces={"k": ("topk",)},
    )

__all__ = ["cknna", "cosine_kernel", "hsic_unbiased_general", "jaccard_knn", "knn_indices", "knn_mask", "mutual_knn"]
