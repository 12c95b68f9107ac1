"""Representational similarity analysis (Kriegeskorte et al. 2008).

Each representation becomes a representational dissimilarity matrix (RDM) over the n samples; the upper
triangles (i < j, no diagonal) of the two RDMs are then compared by a correlation.

RDMs: ``correlation`` (1 - Pearson correlation between two samples' feature vectors), ``euclidean``,
``squared_euclidean`` (from direct differences, so that duplicated samples give exact zeros and exact ties)
and ``cosine`` (1 - cosine similarity of the raw rows). Comparisons: ``pearson``,
``spearman`` (Pearson of average ranks, as ``scipy.stats.spearmanr``), ``kendall`` (tau-b, ties corrected, as
``scipy.stats.kendalltau``) and ``tau_a`` (no tie correction; the rsatoolbox default for RDMs with ties).
Kendall's tau is computed in O(m log^2 m) for m = n(n-1)/2 entries (a merge count of discordant pairs), so it
stays usable at a few thousand samples.

Only the Pearson comparison is differentiable; the rank-based ones are piecewise constant.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import DegenerateInputError, RepsimError, UnknownNameError
from .registry import Measure, Spec, register_family

RDMS = ("correlation", "euclidean", "squared_euclidean", "cosine")
COMPARISONS = ("spearman", "pearson", "kendall", "tau_a")


# --- RDMs ----------------------------------------------------------------------------------------------------------


def _unit_rows(X: torch.Tensor, name: str, what: str) -> torch.Tensor:
    norms = X.norm(dim=1)
    bad = (norms == 0).nonzero().flatten()
    if bad.numel():
        raise DegenerateInputError(
            f"the {what} RDM needs every sample of {name} to have a direction, but sample {int(bad[0])} "
            f"({bad.numel()} in all) is {'constant across features' if what == 'correlation' else 'all zeros'}. "
            "Use rdm='euclidean', or drop those samples from both inputs."
        )
    return X / norms[:, None]


def rdm_upper(X: torch.Tensor, method: str = "correlation", name: str = "X") -> torch.Tensor:
    """Upper triangle (i < j, row-major) of the RDM of ``X`` as a vector of n(n-1)/2 dissimilarities."""
    n = X.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=X.device)
    if method == "correlation":
        if X.shape[1] < 2:
            raise DegenerateInputError(
                f"the correlation RDM correlates the features of two samples, but {name} has a single feature. "
                "Use rdm='euclidean'."
            )
        U = _unit_rows(X - X.mean(dim=1, keepdim=True), name, "correlation")
        return 1.0 - (U @ U.T)[i, j]
    if method == "cosine":
        U = _unit_rows(X, name, "cosine")
        return 1.0 - (U @ U.T)[i, j]
    if method in ("euclidean", "squared_euclidean"):
        # direct differences, not |x|^2 + |y|^2 - 2 x.y: duplicated samples get exactly 0 and equal distances
        # stay exactly equal, so the ties that rank comparisons see are the data's, not rounding's
        D = torch.cdist(X, X, compute_mode="donot_use_mm_for_euclid_dist")[i, j]
        return D if method == "euclidean" else D.square()
    raise UnknownNameError(f"unknown RDM {method!r}; choose one of {RDMS}.")


def rdm(X: torch.Tensor, method: str = "correlation") -> torch.Tensor:
    """The full (n, n) representational dissimilarity matrix of ``X`` (zero diagonal)."""
    n = X.shape[0]
    upper = rdm_upper(X, method)
    out = torch.zeros(n, n, dtype=upper.dtype, device=upper.device)
    i, j = torch.triu_indices(n, n, offset=1, device=X.device)
    out[i, j] = upper
    out[j, i] = upper
    return out


# --- comparisons ---------------------------------------------------------------------------------------------------


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two vectors; a constant vector is an error, not a NaN."""
    ac, bc = a - a.mean(), b - b.mean()
    na, nb = ac.norm(), bc.norm()
    if not bool(na > 0) or not bool(nb > 0):
        raise DegenerateInputError(
            "an RDM is constant (every pair of samples equally dissimilar), so its correlation with another RDM "
            "is undefined. Check for duplicated or degenerate samples."
        )
    return (ac @ bc) / (na * nb)


def average_ranks(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties given their average rank (``scipy.stats.rankdata(method='average')``)."""
    order = torch.argsort(v, stable=True)
    sorted_v = v[order]
    new_group = torch.ones_like(sorted_v, dtype=torch.bool)
    new_group[1:] = sorted_v[1:] != sorted_v[:-1]
    group = torch.cumsum(new_group, 0) - 1
    counts = torch.bincount(group)
    starts = torch.cumsum(counts, 0) - counts
    mean_rank = starts.to(v.dtype) + (counts.to(v.dtype) + 1.0) / 2.0
    ranks = torch.empty_like(v)
    ranks[order] = mean_rank[group]
    return ranks


def _tied_pairs(sorted_values: torch.Tensor) -> torch.Tensor:
    """Number of pairs with equal values, from a sorted vector: sum of t(t-1)/2 over groups of ties."""
    new_group = torch.ones_like(sorted_values, dtype=torch.bool)
    new_group[1:] = sorted_values[1:] != sorted_values[:-1]
    counts = torch.bincount(torch.cumsum(new_group, 0) - 1).to(torch.int64)
    return (counts * (counts - 1) // 2).sum()


def count_inversions(v: torch.Tensor) -> torch.Tensor:
    """Pairs i < j with ``v[i] > v[j]`` (strictly), by a bottom-up merge with batched binary searches."""
    m = v.numel()
    size = 1
    while size < m:
        size *= 2
    pad = torch.full((size - m,), float("inf"), dtype=v.dtype, device=v.device)
    arr = torch.cat([v, pad])  # +inf padding at the end never forms an inversion
    total = torch.zeros((), dtype=torch.int64, device=v.device)
    width = 1
    while width < size:
        blocks = arr.view(-1, 2, width)
        left, right = blocks[:, 0, :].contiguous(), blocks[:, 1, :].contiguous()
        not_greater = torch.searchsorted(left, right, right=True)  # left elements <= each right element
        total = total + (width - not_greater).sum()
        arr = torch.sort(blocks.reshape(-1, 2 * width), dim=1).values.reshape(-1)
        width *= 2
    return total


def kendall_tau(a: torch.Tensor, b: torch.Tensor, variant: str = "b") -> torch.Tensor:
    """Kendall's tau between two vectors: ``"b"`` (tie-corrected, scipy's default) or ``"a"``."""
    m = a.numel()
    order_b = torch.argsort(b, stable=True)
    order = order_b[torch.argsort(a[order_b], stable=True)]  # lexicographic: by a, then by b
    a_s, b_s = a[order], b[order]
    total = m * (m - 1) // 2
    ties_a = _tied_pairs(a_s)
    ties_b = _tied_pairs(torch.sort(b).values)
    new_pair_value = torch.ones(m, dtype=torch.bool, device=a.device)
    new_pair_value[1:] = (a_s[1:] != a_s[:-1]) | (b_s[1:] != b_s[:-1])
    ties_ab = _tied_pairs(torch.cumsum(new_pair_value, 0))  # pairs equal in both a and b
    # sorted by (a, b): pairs tied in a are ordered in b, so strict inversions of b are the discordant pairs
    discordant = count_inversions(b_s)
    concordant = total - ties_a - ties_b + ties_ab - discordant
    numerator = (concordant - discordant).to(a.dtype)
    if variant == "a":
        return numerator / total
    # float before multiplying: the product of two pair counts overflows int64 from about 55,000 samples' RDMs
    denominator = (total - ties_a).to(torch.float64) * (total - ties_b).to(torch.float64)
    if not bool(denominator > 0):
        raise DegenerateInputError("an RDM is constant, so Kendall's tau with another RDM is undefined.")
    return numerator / torch.sqrt(denominator).to(a.dtype)


def compare_rdms(a: torch.Tensor, b: torch.Tensor, method: str = "spearman") -> torch.Tensor:
    """Correlate two RDM vectors with ``method`` (see :data:`COMPARISONS`)."""
    if method == "pearson":
        return pearson(a, b)
    if method == "spearman":
        return pearson(average_ranks(a.detach()), average_ranks(b.detach()))
    if method in ("kendall", "tau_a"):
        return kendall_tau(a.detach(), b.detach(), "b" if method == "kendall" else "a")
    raise UnknownNameError(f"unknown RDM comparison {method!r}; choose one of {COMPARISONS}.")


def rsa(X: torch.Tensor, Y: torch.Tensor, *, rdm: str = "correlation", compare: str = "spearman") -> torch.Tensor:
    """RSA score: correlation ``compare`` between the upper triangles of the ``rdm`` RDMs of X and Y."""
    return compare_rdms(rdm_upper(X, rdm, "X"), rdm_upper(Y, rdm, "Y"), compare)


# --- registration ----------------------------------------------------------------------------------------------------

_INVARIANCES = {
    # distances between samples: rotations, translations, feature permutations; scaling multiplies every
    # distance by the same factor, which no correlation sees
    "euclidean": {"orthogonal", "isotropic_scaling", "translation", "permutation"},
    "squared_euclidean": {"orthogonal", "isotropic_scaling", "translation", "permutation"},
    # angles between raw rows: rotations and scaling keep them, translation does not
    "cosine": {"orthogonal", "isotropic_scaling", "permutation"},
    # each row is centered across its own features: only feature permutation and scaling are harmless
    "correlation": {"isotropic_scaling", "permutation"},
}


def build_rsa(params: dict[str, Any]) -> Measure:
    """Family builder for ``rsa-rdm=<rdm>-compare=<comparison>``."""
    params = dict(params)
    rdm_method, compare = params.pop("rdm", "correlation"), params.pop("compare", "spearman")
    if params:
        raise RepsimError(
            f"rsa takes no parameter(s) {sorted(params)}; it accepts rdm= {RDMS} and compare= {COMPARISONS}."
        )
    if rdm_method not in RDMS:
        raise UnknownNameError(f"unknown RDM {rdm_method!r}; choose one of {RDMS}.")
    if compare not in COMPARISONS:
        raise UnknownNameError(f"unknown RDM comparison {compare!r}; choose one of {COMPARISONS}.")

    def fn(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return rsa(X, Y, rdm=rdm_method, compare=compare)

    return Measure(
        fn=fn,
        spec=Spec("rsa", (("rdm", rdm_method), ("compare", compare))),
        larger_is_more_similar=True,
        symmetric=True,
        invariances=frozenset(_INVARIANCES[rdm_method]),
        differentiable=compare == "pearson",
        min_samples=3,
        reference="Kriegeskorte et al. 2008, Representational similarity analysis (Front. Syst. Neurosci.)",
        description=f"RSA: {compare} correlation of {rdm_method} RDMs",
        value_range=(-1.0, 1.0),
        # tau_a is below 1 for an RDM with tied entries, so its self value depends on the data
        self_value=None if compare == "tau_a" else 1.0,
        params={"rdm": rdm_method, "compare": compare},
    )


register_family(
    "rsa",
    build_rsa,
    variants=[{"rdm": r, "compare": c} for r in RDMS for c in COMPARISONS],
    aliases={"rsa": {"rdm": "correlation", "compare": "spearman"}},
)

__all__ = ["average_ranks", "compare_rdms", "count_inversions", "kendall_tau", "pearson", "rdm", "rdm_upper", "rsa"]
