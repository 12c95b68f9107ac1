"""Statistics on whole layer x layer maps, from the kept (n, n) Grams: per-cell permutation tests, bootstrap
intervals, Benjamini-Hochberg q-values.

Every cell sees the same permutations (and the same bootstrap draws), and each permutation costs one gather of
the second side's Grams and one (La, n^2) x (n^2, Lb) product for the whole map, never a recomputation of the map
from the activations. Permuting the rows of one side leaves both self-HSICs unchanged, so only the cross term is
recomputed. ``rp.compare(..., permutations=N, bootstrap=B, seed=s)`` calls these; they also take any stacked
Grams of centred rows (``K_l = X~_l X~_l^T``), e.g. from :meth:`repsim_plugin.streaming.SampleSpaceCKAMap.grams`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import DegenerateInputError, RepsimError
from .measures.kernels import hsic_unbiased_table

__all__ = ["MapBootstrap", "benjamini_hochberg", "map_bootstrap", "map_permutation_test"]

F64 = torch.float64


def benjamini_hochberg(p_values: torch.Tensor) -> torch.Tensor:
    """Benjamini-Hochberg adjusted p-values (q-values) over every entry of ``p_values``, same shape.

    ``q_(i) = min_{k >= i} min(1, m p_(k) / k)`` for the sorted p-values: a cell is significant at false discovery
    rate alpha when its q-value is <= alpha (independent or positively dependent tests).
    """
    flat = p_values.reshape(-1).to(F64)
    m = flat.numel()
    if m == 0:
        return p_values.to(F64)
    if bool(((flat < 0) | (flat > 1) | torch.isnan(flat)).any()):
        raise RepsimError("benjamini_hochberg needs p-values in [0, 1].")
    order = torch.argsort(flat)
    ranked = flat[order] * m / torch.arange(1, m + 1, dtype=F64)
    adjusted = torch.flip(torch.cummin(torch.flip(ranked, [0]), 0).values, [0]).clamp(max=1.0)
    out = torch.empty_like(flat)
    out[order] = adjusted
    return out.reshape(p_values.shape)


class _Cross:
    """The cross HSIC table of two stacked Grams for any reordering of the second side's samples."""

    def __init__(self, KA: torch.Tensor, KB: torch.Tensor, debiased: bool) -> None:
        self.debiased = debiased
        self.n = n = KA.shape[-1]
        if debiased:
            eye = torch.eye(n, dtype=torch.bool, device=KA.device)
            KA, KB = KA.masked_fill(eye, 0.0), KB.masked_fill(eye, 0.0)
            self.col_a = KA.sum(-2)  # (La, n)
            self.row_b = KB.sum(-1)  # (Lb, n)
            self.totals = torch.outer(KA.sum((-2, -1)), KB.sum((-2, -1))) / ((n - 1) * (n - 2))
        self.flat_a = KA.reshape(KA.shape[0], -1)
        self.KB = KB

    def table(self, index: torch.Tensor | None) -> torch.Tensor:
        """(La, Lb) cross HSIC (up to the common factor of the biased form) with side b's samples reordered."""
        return self.tables(None if index is None else index[None])[0]

    def tables(self, index: torch.Tensor | None) -> torch.Tensor:
        """(P, La, Lb) cross tables for P reorderings ``index`` (P, n) of side b at once (None: as is, P = 1)."""
        if index is None:
            KB, row_b = self.KB[None], self.row_b[None] if self.debiased else None
        else:
            KB = self.KB[:, index[:, :, None], index[:, None, :]].transpose(0, 1)  # (P, Lb, n, n)
            row_b = self.row_b[:, index].transpose(0, 1) if self.debiased else None  # (P, Lb, n)
        trace = torch.matmul(self.flat_a, KB.reshape(KB.shape[0], KB.shape[1], -1).transpose(1, 2))
        if not self.debiased:
            return trace
        assert row_b is not None
        n = self.n
        cross = torch.matmul(self.col_a, row_b.transpose(1, 2))
        return (trace + self.totals - 2.0 / (n - 2) * cross) / (n * (n - 3))

    def chunk(self) -> int:
        """How many reorderings to gather at once (about 128 MiB of gathered Grams)."""
        return max(1, _GATHER_BYTES // max(1, self.KB[0].numel() * self.KB.shape[0] * 8))


_GATHER_BYTES = 2**27


def _self_terms(K: torch.Tensor, debiased: bool) -> torch.Tensor:
    if not debiased:
        return K.reshape(K.shape[0], -1).square().sum(-1)
    return torch.stack([hsic_unbiased_table(K[i : i + 1], K[i : i + 1], symmetric=True)[0, 0] for i in range(len(K))])


def _ratio(xy: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor, what: str) -> torch.Tensor:
    if not (bool((xx > 0).all()) and bool((yy > 0).all())):
        raise DegenerateInputError(
            f"{what}: a layer's HSIC with itself is not positive, so CKA is undefined there. Use more samples (the "
            "unbiased estimator can be <= 0 at small n), or fewer bootstrap duplicates (more samples)."
        )
    return xy / torch.sqrt(torch.outer(xx, yy))


def map_permutation_test(
    KA: torch.Tensor,
    KB: torch.Tensor,
    *,
    permutations: int,
    seed: int = 0,
    debiased: bool = False,
    return_null: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One-sided permutation p-values (is the cell more similar than chance?) for every cell of a linear CKA map.

    ``KA`` (La, n, n) and ``KB`` (Lb, n, n): Grams of the centred rows of each layer. Permutation ``t`` is
    ``torch.randperm(n, generator=torch.Generator().manual_seed(seed))``'s t-th draw, applied to side b's samples
    for every cell. ``p = (1 + #{null >= observed}) / (1 + permutations)``, with values within 1e-10 (relative) of
    the observed one counted as ties (as :func:`repsim_plugin.stats.p_value`). Returns ``(p_values, null)``, the
    null (permutations, La, Lb) only when ``return_null``.
    """
    if int(permutations) < 1:
        raise RepsimError(f"permutations must be a positive int, got {permutations!r}.")
    n = KA.shape[-1]
    cross = _Cross(KA.to(F64), KB.to(F64), debiased)
    xx, yy = _self_terms(KA.to(F64), debiased), _self_terms(KB.to(F64), debiased)
    observed = _ratio(cross.table(None), xx, yy, "permutation test")
    tol = 1e-10 * observed.abs().clamp(min=1.0)
    generator = torch.Generator().manual_seed(int(seed))
    count = torch.zeros_like(observed)
    null = []
    done, chunk = 0, cross.chunk()
    while done < int(permutations):
        size = min(chunk, int(permutations) - done)
        index = torch.stack([torch.randperm(n, generator=generator) for _ in range(size)]).to(KA.device)
        values = cross.tables(index) / torch.sqrt(torch.outer(xx, yy))
        count += (values >= observed - tol).to(F64).sum(0)
        if return_null:
            null.append(values)
        done += size
    p_values = (1.0 + count) / (1.0 + int(permutations))
    return p_values.cpu(), (torch.cat(null).cpu() if return_null else None)


@dataclass(frozen=True)
class MapBootstrap:
    """Bootstrap intervals of a map: ``low`` / ``high`` (La, Lb) at ``level``, and the replicates (B, La, Lb)."""

    low: torch.Tensor
    high: torch.Tensor
    level: float
    samples: torch.Tensor


def _double_centre(K: torch.Tensor) -> torch.Tensor:
    return K - K.mean(-2, keepdim=True) - K.mean(-1, keepdim=True) + K.mean((-2, -1), keepdim=True)


def map_bootstrap(
    KA: torch.Tensor,
    KB: torch.Tensor,
    estimate: torch.Tensor,
    *,
    bootstrap: int,
    seed: int = 0,
    debiased: bool = False,
    level: float = 0.95,
) -> MapBootstrap:
    """Bootstrap intervals for every cell: the same ``bootstrap`` row resamples (with replacement) for all cells.

    Draw ``b`` is ``torch.randint(0, n, (n,), generator=torch.Generator().manual_seed(seed))``'s b-th draw; each
    resampled Gram is double-centred again (biased CKA of the resampled rows). The interval is the centred
    percentile interval of :func:`repsim_plugin.stats.bootstrap_ci` (its default, and why): the replicates'
    quantiles shifted so that their median is the full-data ``estimate``.
    """
    if int(bootstrap) < 2:
        raise RepsimError(f"bootstrap must be an int >= 2 (the number of resamples), got {bootstrap!r}.")
    n = KA.shape[-1]
    KA, KB = KA.to(F64), KB.to(F64)
    generator = torch.Generator().manual_seed(int(seed))
    samples = []
    for b in range(int(bootstrap)):
        index = torch.randint(0, n, (n,), generator=generator).to(KA.device)
        A, B = KA[:, index][:, :, index], KB[:, index][:, :, index]
        if not debiased:
            A, B = _double_centre(A), _double_centre(B)
        cross = _Cross(A, B, debiased)
        samples.append(_ratio(cross.table(None), _self_terms(A, debiased), _self_terms(B, debiased), f"resample {b}"))
    stacked = torch.stack(samples).cpu()
    alpha = 1.0 - float(level)
    levels = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=F64)
    offsets = torch.quantile(stacked - stacked.median(dim=0).values, levels, dim=0)
    est = estimate.to(F64).cpu()
    return MapBootstrap(low=est + offsets[0], high=est + offsets[1], level=float(level), samples=stacked)
