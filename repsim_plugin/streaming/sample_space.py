"""Exact linear CKA through (n, n) Grams: the estimator when n is small and d huge.

Exact CKA cannot stream in sample space (a Gram needs all rows), so this keeps every layer's rows, O(n d) memory,
and forms the Grams at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._utils.checks import Bool, check_params
from ..errors import DegenerateInputError, TooFewSamplesError
from ..measures.kernels import hsic_unbiased_table
from ._reductions import COUNT, ROWS
from ._rows import (
    F64,
    Acts,
    Label,
    Rows,
    _Layout,
    check_kept_shapes,
    check_same_rows,
    keep_rows,
    order_like,
    ratio_table,
    self_hsic,
    stacked,
    warn_bias,
)
from .base import SAME, MapAccumulator, Maps

__all__ = ["SAMPLE_SPACE_PARAMS", "SampleSpaceCKAMap"]

SAMPLE_SPACE_PARAMS = {"debiased": Bool(), "same": SAME}


class SampleSpaceCKAMap(MapAccumulator):
    """Exact linear CKA for every layer pair through (n, n) Grams: the estimator for small n and huge d.

    Exact CKA cannot stream in sample space (a Gram needs every row), so this *keeps every layer's rows* in their
    input dtype (float32 stays float32, losslessly) and centers in float64 at ``compute``: memory O(n sum d) for the
    rows plus O(L n^2) float64 for the Grams then. Same interface as :class:`LinearCKAMap`; ``all_reduce``
    all-gathers the rows (rank order).
    """

    _kind = "SampleSpaceCKAMap"
    n: int
    _rows_a: Rows | None
    _rows_b: Rows | None

    def __init__(self, debiased: bool = False, *, same: bool | None = None, process_group: Any = None) -> None:
        check_params(SAMPLE_SPACE_PARAMS, debiased=debiased, same=same)
        super().__init__(same=same, process_group=process_group)
        self.debiased = debiased
        self.add_state("n", 0, COUNT)
        self.add_state("_rows_a", None, ROWS, key="rows_a")
        self.add_state("_rows_b", None, ROWS, key="rows_b")

    def _options(self) -> dict[str, Any]:
        return {"debiased": self.debiased}

    # --- memory and planning ---
    @staticmethod
    def memory_bytes(n: int, dims_a: Sequence[int], dims_b: Sequence[int] | None = None, *, itemsize: int = 4) -> int:
        """Rows kept (``itemsize`` bytes each, 4 for float32) plus the float64 Grams formed at ``compute``."""
        dims = list(dims_a) + list(dims_b or [])
        return int(n) * sum(dims) * int(itemsize) + 8 * len(dims) * int(n) ** 2 + 8 * int(n) * max(dims)

    @classmethod
    def memory_needed(cls, maps: Maps, *, n: int | None, batch_size: int, itemsize: int, **options: Any) -> int | None:
        """The kept rows and Grams of every map; None when n is unknown."""
        if n is None:
            return None
        return sum(cls.memory_bytes(n, da, db, itemsize=itemsize) for da, db in maps)

    @classmethod
    def relative_cost(cls, maps: Maps, *, n: int | None, **options: Any) -> float | None:
        """Per sample, ~ n sum d (the Grams); counted 4x, since keeping O(n d) rows must clearly pay off."""
        if n is None:
            return None
        return 4 * n * sum(sum(da) + sum(db or ()) for da, db in maps)

    @property
    def kept_bytes(self) -> int:
        """Bytes of the rows held now (an engine checks them against its memory budget as they grow)."""
        return sum(
            t.numel() * t.element_size()
            for rows in (self._rows_a, self._rows_b)
            if rows is not None
            for batches in rows.values()
            for t in batches
        )

    # --- streaming ---
    def update(self, acts_a: Acts, acts_b: Acts | None = None) -> None:
        """Keep one batch of rows (copies, in their dtype) of every layer."""
        A, B, groups = self._validate_update(acts_a, acts_b)
        rows = check_same_rows(groups)
        la, lb = self._layouts(A, B)
        ordered_a = order_like(A, la, "acts_a")  # both sides checked before either keeps a row
        ordered_b = order_like(B, lb, "acts_b") if B is not None and lb is not None else None
        self._rows_a = keep_rows(self._rows_a, ordered_a, la, copy=True, device=self._device)
        if ordered_b is not None and lb is not None:
            self._rows_b = keep_rows(self._rows_b, ordered_b, lb, copy=True, device=self._device)
        self._layout = (la, lb)
        self.n += rows

    def _load_layout(self, state: Any) -> bool:
        """State dicts saved before the layout was recorded hold only the rows: the layout is theirs."""
        if "layout" not in state and state.get("rows_a") is not None:
            rows_b = state.get("rows_b")
            state = dict(state) | {
                "layout": {
                    "a": _Layout.of(state["rows_a"]).as_json(),
                    "b": None if rows_b is None else _Layout.of(rows_b).as_json(),
                }
            }
        return super()._load_layout(state)

    def _check_shapes(self) -> None:
        check_kept_shapes(self)

    # --- the result ---
    def _compute_local(self) -> torch.Tensor:
        if self._rows_a is None:
            raise TooFewSamplesError(f"{type(self).__name__}.compute: no batch has been added yet; call update first.")
        need = 4 if self.debiased else 2
        if self.n < need:
            raise TooFewSamplesError(
                f"{'debiased' if self.debiased else 'biased'} CKA needs at least {need} samples, got {self.n}."
            )
        la, lb = self._labels
        with torch.no_grad():
            KA = self._grams(stacked(self._rows_a), la)
            KB = KA if self._rows_b is None else self._grams(stacked(self._rows_b), lb)
            if self.debiased:
                xy = hsic_unbiased_table(KA, KB, symmetric=True)
                xx = torch.diagonal(xy) if self.same else self_hsic(KA)
                yy = xx if self.same else self_hsic(KB)
            else:
                assert self._layout is not None
                a, b = self._layout
                warn_bias(self.n, a, a if b is None else b)
                fa, fb = KA.reshape(KA.shape[0], -1), KB.reshape(KB.shape[0], -1)
                xy = fa @ fb.T
                xx, yy = fa.square().sum(-1), fb.square().sum(-1)
            names_b = (self.layers_b, la if self.same else lb)
            return ratio_table(xy, xx, yy, [(self.layers_a, la), names_b])

    def _grams(self, acts: dict[str, torch.Tensor], label: Label) -> torch.Tensor:
        """Stacked (L, n, n) float64 Grams of the centered rows of each layer."""
        Ks = []
        for name, X in acts.items():
            X64 = X.to(F64)
            if bool((X64.amax(0) == X64.amin(0)).all()):
                raise DegenerateInputError(
                    f"{label(name)} has zero variance over all {self.n} samples, so CKA is undefined."
                )
            Xc = X64 - X64.mean(0, keepdim=True)
            Ks.append(Xc @ Xc.T)
        return torch.stack(Ks)
