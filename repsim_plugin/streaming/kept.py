"""The "captured" estimator as an accumulator: keep every layer's rows, evaluate the measure on them at the end.

Any measure ``measure(X, Y) -> 0-d tensor`` runs this way, exactly, at the price of O(n sum d) memory for the
rows; :attr:`KeptRowsMap.kept_bytes` says how much is held, so that an engine can enforce a memory budget as the
rows arrive.
"""

from __future__ import annotations

from typing import Any

import torch

from .._utils import dist
from .._utils.checks import Bool, Callable_, check_params
from ..errors import RepsimError, TooFewSamplesError
from ._reductions import COUNT, ROWS
from ._rows import Acts, Rows, check_kept_shapes, check_same_rows, held_bytes, keep_rows, order_like, stacked
from .base import SAME, MapAccumulator, Maps

__all__ = ["KEPT_ROWS_PARAMS", "KeptRowsMap"]

KEPT_ROWS_PARAMS = {"measure": Callable_("a measure (a callable measure(X, Y) -> 0-d tensor)"), "same": SAME}
KEPT_ROWS_PARAMS |= {"copy": Bool()}

NOT_GATHERED = (
    "the 'captured' estimator does not gather rows across torch.distributed ranks; use a linear CKA "
    "measure (feature_streaming / sample_space) or minibatch CKA, which reduce across ranks."
)


class KeptRowsMap(MapAccumulator):
    """Every layer pair of ``measure`` on kept rows: ``update`` keeps the rows, ``compute`` calls the measure.

    Rows are detached and cloned (``copy=False`` keeps the tensors given, for callers that never change them in
    place), in their own dtype and on their device (or the one given to :meth:`to`). ``compute()`` returns the
    (La, Lb) float64 map on the CPU; for a map of one model's layers with themselves (``same``) and a symmetric
    measure (``measure.symmetric``), the lower triangle is copied from the upper one. ``all_reduce`` across more
    than one rank is not supported (the rows are not gathered).
    """

    _kind = "KeptRowsMap"
    shares_sides = True  # with copy=False the maps that name a side keep the same row tensors
    n: int
    _rows_a: Rows | None
    _rows_b: Rows | None

    def __init__(self, measure: Any, *, same: bool | None = None, process_group: Any = None, copy: bool = True) -> None:
        check_params(KEPT_ROWS_PARAMS, measure=measure, same=same, copy=copy)
        super().__init__(same=same, process_group=process_group)
        self.measure = measure
        self.copy = copy
        self.add_state("n", 0, COUNT)
        self.add_state("_rows_a", None, ROWS, key="rows_a")
        self.add_state("_rows_b", None, ROWS, key="rows_b")

    def _options(self) -> dict[str, Any]:
        return {"measure": getattr(self.measure, "id", None)}

    # --- memory and planning ---
    @classmethod
    def memory_needed(
        cls, maps: Maps, *, n: int | None, batch_size: int, itemsize: int, measure: Any = None, **options: Any
    ) -> int | None:
        """Every layer's rows plus one call of the measure on the widest pair; None when n is unknown."""
        if n is None:
            return None
        dims = [d for da, db in maps for d in (*da, *(db or ()))]
        widest = max(dims)
        per_call = getattr(measure, "memory_per_call", None)
        call = int(per_call(n, widest, widest)) if per_call is not None else 8 * n * 2 * widest
        return n * sum(dims) * itemsize + call

    @property
    def kept_bytes(self) -> int:
        """Bytes of the rows held now."""
        return held_bytes(self._rows_a, self._rows_b)

    # --- streaming ---
    def update(self, acts_a: Acts, acts_b: Acts | None = None) -> None:
        """Keep one batch of rows of every layer (the measure checks the values when it runs)."""
        A, B, groups = self._validate_update(acts_a, acts_b, finite=False)
        rows = check_same_rows(groups)
        la, lb = self._layouts(A, B)
        ordered_a = order_like(A, la, "acts_a")  # both sides checked before either keeps a row
        ordered_b = order_like(B, lb, "acts_b") if B is not None and lb is not None else None
        self._rows_a = keep_rows(self._rows_a, ordered_a, la, copy=self.copy, device=self._device)
        if ordered_b is not None and lb is not None:
            self._rows_b = keep_rows(self._rows_b, ordered_b, lb, copy=self.copy, device=self._device)
        self._layout = (la, lb)
        self.n += rows

    def all_reduce(self, group: Any = None) -> None:
        """Only within one rank (nothing to gather): the rows of several ranks are never collected."""
        dist.require(f"{type(self).__name__}.all_reduce")
        if dist.active(self.process_group if group is None else group):
            raise RepsimError(NOT_GATHERED)
        super().all_reduce(group)

    def _check_shapes(self) -> None:
        check_kept_shapes(self)

    # --- the result ---
    def _compute_local(self) -> torch.Tensor:
        if self._rows_a is None:
            raise TooFewSamplesError(f"{type(self).__name__}.compute: no batch has been added yet; call update first.")
        kept_a = stacked(self._rows_a)
        kept_b = kept_a if self._rows_b is None else stacked(self._rows_b)
        symmetric = bool(self.same and getattr(self.measure, "symmetric", False))
        values = torch.empty(len(kept_a), len(kept_b), dtype=torch.float64)
        for i, rows_a in enumerate(kept_a.values()):
            for j, rows_b in enumerate(kept_b.values()):
                if symmetric and j < i:
                    values[i, j] = values[j, i]
                    continue
                values[i, j] = self.measure(rows_a, rows_b).detach().to("cpu")
        return values
