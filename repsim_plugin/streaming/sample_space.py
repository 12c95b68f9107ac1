"""Exact linear CKA through (n, n) Grams: the estimator when n is small and d huge.

Exact CKA cannot stream in sample space (a Gram needs all rows), so this keeps every layer's rows, O(n d) memory,
and forms the Grams at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._utils.checks import Bool, check_params
from .._utils.threads import WORKERS, split_threads, workers_for
from ..errors import DegenerateInputError, TooFewSamplesError
from ..measures.kernels import center_gram_, hsic_unbiased_table
from ..measures.mixed import MIXED_MIN_FLOPS, deviation_gram64, unbiased_gram_mixed_ok
from ._reductions import COUNT, ROWS
from ._rows import (
    F64,
    Acts,
    Label,
    Rows,
    _Layout,
    check_kept_shapes,
    check_same_rows,
    held_bytes,
    keep_rows,
    order_like,
    ratio_table,
    self_hsic,
    warn_bias,
)
from .base import SAME, MapAccumulator, Maps

__all__ = ["SAMPLE_SPACE_PARAMS", "SampleSpaceCKAMap"]

#: rows whose mean centres float32 rows before their product (see SampleSpaceCKAMap.grams)
CENTRE_ROWS = 64
SAMPLE_SPACE_PARAMS = {"debiased": Bool(), "same": SAME, "copy": Bool()}


class SampleSpaceCKAMap(MapAccumulator):
    """Exact linear CKA for every layer pair through (n, n) Grams: the estimator for small n and huge d.

    Exact CKA cannot stream in sample space (a Gram needs every row), so this *keeps every layer's rows* in their
    input dtype (float32 stays float32, losslessly) and centers in float64 at ``compute``: memory O(n sum d) for the
    rows plus O(L n^2) float64 for the Grams then. Same interface as :class:`LinearCKAMap`; ``all_reduce``
    all-gathers the rows (rank order). Rows are detached and cloned (``copy=False`` keeps the tensors given, for
    callers that never change them in place: ``compare``'s rows are already private copies).
    """

    _kind = "SampleSpaceCKAMap"
    shares_sides = True  # rows kept per side, and each side's Grams formed once per engine (``shared_grams``)
    n: int
    _rows_a: Rows | None
    _rows_b: Rows | None

    def __init__(
        self, debiased: bool = False, *, same: bool | None = None, process_group: Any = None, copy: bool = True
    ) -> None:
        check_params(SAMPLE_SPACE_PARAMS, debiased=debiased, same=same, copy=copy)
        super().__init__(same=same, process_group=process_group)
        self.debiased = debiased
        self.copy = copy
        #: set to keep the (L, n, n) Grams of the last compute() in ``kept_grams`` (not part of the state)
        self.keep_grams = False
        #: set for full float64 Grams of float32 rows too (``make("cka", dtype=torch.float64)`` in compare)
        self.full_float64 = False
        self.kept_grams: tuple[torch.Tensor, torch.Tensor] | None = None
        #: set by an engine whose maps share sides (``compare_checkpoints``): a cache of stacked Grams shared by its
        #: maps, and the keys of this map's two sides in it; the same rows give the same Grams, so each side's are
        #: formed once instead of once per map that names it (not part of the state)
        self.shared_grams: dict[Any, torch.Tensor] | None = None
        self.side_keys: tuple[Any, Any] | None = None
        self.add_state("n", 0, COUNT)
        self.add_state("_rows_a", None, ROWS, key="rows_a")
        self.add_state("_rows_b", None, ROWS, key="rows_b")

    def _options(self) -> dict[str, Any]:
        return {"debiased": self.debiased}

    # --- memory and planning ---
    @staticmethod
    def memory_bytes(n: int, dims_a: Sequence[int], dims_b: Sequence[int] | None = None, *, itemsize: int = 4) -> int:
        """Rows kept (``itemsize`` bytes each, 4 for float32) plus the float64 Grams formed at ``compute``.

        The float32 deviation buffers (one per worker of :func:`split_threads`, for the two widest layers) are
        counted at 8 bytes an entry (8 n (d_1 + d_2)): their other half covers the half-GEMM's largest float32
        block ((n/2)^2 floats) whenever the layer has at least n / 4 features.
        """
        dims = list(dims_a) + list(dims_b or [])
        widest = sum(sorted(dims, reverse=True)[:WORKERS])
        return int(n) * sum(dims) * int(itemsize) + 8 * len(dims) * int(n) ** 2 + 8 * int(n) * widest

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
        return held_bytes(self._rows_a, self._rows_b)

    # --- streaming ---
    def update(self, acts_a: Acts, acts_b: Acts | None = None) -> None:
        """Keep one batch of rows (copies unless ``copy=False``, in their dtype) of every layer."""
        A, B, groups = self._validate_update(acts_a, acts_b)
        rows = check_same_rows(groups)
        la, lb = self._layouts(A, B)
        ordered_a = order_like(A, la, "acts_a")  # both sides checked before either keeps a row
        ordered_b = order_like(B, lb, "acts_b") if B is not None and lb is not None else None
        self._rows_a = keep_rows(self._rows_a, ordered_a, la, copy=self.copy, device=self._device)
        if ordered_b is not None and lb is not None:
            self._rows_b = keep_rows(self._rows_b, ordered_b, lb, copy=self.copy, device=self._device)
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
            KA, KB = self._side_grams(la, lb)
            if self.keep_grams:  # for permutation tests / bootstrap on the map (repsim_plugin.map_stats)
                self.kept_grams = (KA, KB)
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
                xx = torch.linalg.vector_norm(fa, dim=-1).square()  # no (L, n^2) temporary: 13x faster at W2
                yy = xx if KB is KA else torch.linalg.vector_norm(fb, dim=-1).square()
            names_b = (self.layers_b, la if self.same else lb)
            return ratio_table(xy, xx, yy, [(self.layers_a, la), names_b])

    def _side_grams(self, la: Label, lb: Label) -> tuple[torch.Tensor, torch.Tensor]:
        """Both sides' stacked Grams (one side: the same tensor twice), taken from ``shared_grams`` where another
        map of the same engine formed them, and left there for the maps after it."""
        assert self._rows_a is not None
        stores = [(self._rows_a, la)] + ([] if self._rows_b is None else [(self._rows_b, lb)])
        cache, sides = self.shared_grams, self.side_keys
        keys = [
            None if cache is None or sides is None else (sides[k], tuple(store), self.debiased, self.full_float64)
            for k, (store, _) in enumerate(stores)
        ]
        grams = [None if cache is None or key is None else cache.get(key) for key in keys]
        missing = [(store, label) for (store, label), K in zip(stores, grams, strict=True) if K is None]
        formed = iter(self._form_grams(missing))
        out = []
        for key, K in zip(keys, grams, strict=True):
            if K is None:
                K = next(formed)
                if cache is not None and key is not None:
                    cache[key] = K
            out.append(K)
        return out[0], out[-1]

    def _mixed(self, store: Rows) -> list[bool]:
        """Per layer of ``store``: whether its Gram takes the float32 product of deviations (see :meth:`grams`)."""
        n = sum(int(b.shape[0]) for b in next(iter(store.values())))
        return [self._mixed_layer(n, batches[0]) for batches in store.values()]

    def _mixed_layer(self, n: int, first: torch.Tensor) -> bool:
        """Whether a layer of ``n`` rows like ``first`` takes the float32 product: float32 rows, a large enough
        problem and, debiased, enough rows for the width (``mixed.unbiased_gram_mixed_ok``)."""
        d = int(first.shape[1])
        large = n * n * d >= MIXED_MIN_FLOPS and first.dtype != F64 and not self.full_float64
        return large and (not self.debiased or unbiased_gram_mixed_ok(n, d))

    def grams(self, store: Rows, label: Label) -> torch.Tensor:
        """Stacked (L, n, n) float64 Grams of the centred rows of each layer (kept for permutations / bootstrap).

        Float32 rows of a large problem (n^2 d >= ``MIXED_MIN_FLOPS``; debiased, also n^2 >= 16 d: see
        ``mixed.unbiased_gram_mixed_ok``) take one float32 product of deviations formed exactly (as
        :func:`~repsim_plugin.measures.mixed.gram_fixed`: within a few 1e-8 of float64, half the multiply-adds of a
        full GEMM); float64 rows and small problems are centred and multiplied in float64.
        The same rows give the same bits however they were batched, merged or gathered.
        """
        return self._form_grams([(store, label)])[0]

    def _form_grams(self, stores: Sequence[tuple[Rows, Label]]) -> list[torch.Tensor]:
        """:meth:`grams` of each store, every layer of all of them one task of :func:`split_threads` (two layers
        side by side, widest first), each worker with one float32 deviation buffer for its widest layer."""
        if not stores:
            return []
        out, jobs = [], []
        for store, label in stores:
            n = sum(int(b.shape[0]) for b in next(iter(store.values())))
            first = next(iter(store.values()))[0]
            out.append(torch.empty((len(store), n, n), dtype=F64, device=first.device))
            for K, (name, batches), mix in zip(out[-1], store.items(), self._mixed(store), strict=True):
                jobs.append((int(batches[0].shape[1]) if mix else 0, n, batches, label(name), K))
        jobs.sort(key=lambda job: -job[0])  # mixed layers widest first; float64 ones (width 0) need no buffer
        device = out[0].device
        # one buffer per worker, sized for its first (widest) layer (each fresh page faults in: about 1 us here)
        workers = workers_for(len(jobs), device)
        buffers = [torch.empty(job[0] * job[1], dtype=torch.float32, device=device) for job in jobs[:workers]]

        def task(index: int) -> Callable[[int], None]:
            width, _, batches, name, K = jobs[index]
            return lambda worker: self._gram(batches, name, K, buffers[worker] if width else None)

        split_threads([task(i) for i in range(len(jobs))], device)
        return out

    def _gram(self, batches: list[torch.Tensor], name: str, out: torch.Tensor, buffer: torch.Tensor | None) -> None:
        """The centred Gram of one layer's kept rows, written into ``out`` ((n, n) float64); float32 products of
        deviations in ``buffer`` when given, float64 otherwise."""
        n, d = sum(int(b.shape[0]) for b in batches), int(batches[0].shape[1])
        if buffer is None:
            X64 = torch.cat([b.to(F64) for b in batches])
            self._check_varies(X64, name)
            Xc = X64 - X64.mean(0, keepdim=True)
            torch.mm(Xc, Xc.T, out=out)
            return
        # float32 deviations from a float32 centre near the mean (each one correctly rounded, so a common offset
        # cancels exactly), one float32 product, its diagonal exact, double-centred in float64: H D D^T H = X~ X~^T
        # the centre: the mean of the first CENTRE_ROWS rows (however they were batched, merged or gathered, the
        # same rows give the same bits); it need only be near the mean, the double-centring below is exact
        head, kept = [], 0
        for b in batches:
            head.append(b[: CENTRE_ROWS - kept].to(torch.float32))
            kept += head[-1].shape[0]
            if kept >= CENTRE_ROWS:
                break
        centre = torch.cat(head).mean(0)
        D = buffer[: n * d].view(n, d)
        start = 0
        for b in batches:
            torch.sub(b.to(torch.float32), centre, out=D[start : start + b.shape[0]])
            start += b.shape[0]
        deviation_gram64(D, out=out)
        if float(out.diagonal().max()) <= 1e-6 * (float(centre.abs().max()) ** 2 + 1e-30):  # nearly constant
            self._check_varies(torch.cat(batches), name)
        center_gram_(out)

    def _check_varies(self, X: torch.Tensor, name: str) -> None:
        if bool((X.amax(0) == X.amin(0)).all()):
            raise DegenerateInputError(f"{name} has zero variance over all {self.n} samples, so CKA is undefined.")
