"""Exact streaming linear CKA (biased and debiased) from float64 moments: every layer pair, or one pair.

The statistics are :class:`~repsim_plugin.streaming._moments._Moments` (see there for the algebra): independent
of batch size and order, mergeable, and reduced across ``torch.distributed`` ranks with one agreement on a common
shift plus one ``all_reduce`` per statistic tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .._utils.checks import Bool, check_params
from ..errors import RepsimError, TooFewSamplesError
from ._moments import _Moments, chunk_rows
from ._reductions import Reduction
from ._rows import F64, Acts, _Layout, check_finite, check_same_rows, concat, extremes, label_x, label_y, order_like
from .base import SAME, MapAccumulator, Maps, check_header

__all__ = ["LINEAR_CKA_MAP_PARAMS", "LINEAR_CKA_PARAMS", "LinearCKA", "LinearCKAMap"]

LINEAR_CKA_MAP_PARAMS = {"debiased": Bool(), "same": SAME}
LINEAR_CKA_PARAMS = {"debiased": Bool()}


class _MomentsReduction(Reduction):
    """The moments are not simply additive (their centers differ): merged and all-reduced by the exact algebra.

    Saved as the state dict's ``n`` and ``tensors`` (one entry per statistic of :meth:`_Moments.spec`).
    """

    def merge(self, mine: _Moments, theirs: _Moments) -> _Moments:
        mine.merge_(theirs)
        return mine

    def all_reduce(self, value: _Moments, group: Any, device: torch.device) -> _Moments:
        value.all_reduce_(group)
        return value

    def copy(self, value: _Moments | None) -> _Moments | None:
        return None if value is None else value.clone()

    def to(self, value: _Moments | None, device: torch.device) -> _Moments | None:
        if value is not None:
            value.t = {k: v.to(device) for k, v in value.t.items()}
        return value

    def device(self, value: _Moments | None) -> torch.device | None:
        return None if value is None else value.device

    def save(self, key: str, value: _Moments | None) -> dict[str, Any]:
        if value is None:
            return {}
        return {"n": value.n, "tensors": {k: v.detach().clone() for k, v in value.t.items()}}

    def load(self, key: str, state: Mapping[str, Any], owner: Any) -> _Moments:
        a, b = owner._layout
        tensors = state["tensors"]
        spec = _Moments.spec(a, b, owner.debiased)
        if set(tensors) != {k for k, *_ in spec}:
            raise KeyError(sorted(set(tensors) ^ {k for k, *_ in spec}))
        loaded = {}
        for name, shape, _, _ in spec:
            t = tensors[name]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                raise KeyError(name)
            loaded[name] = t.detach().to(F64).clone()
        devices = {t.device for t in loaded.values()}
        if len(devices) > 1:
            raise RepsimError(f"the state dict's tensors lie on several devices {devices}; move them to one.")
        return _Moments.from_tensors(a, b, owner.debiased, int(state["n"]), loaded)


class LinearCKAMap(MapAccumulator):
    """Exact streaming linear CKA for every layer pair of two models (or of one model with itself).

    ``update(acts_a, acts_b)`` takes ``{layer name: (b, d) tensor}`` dicts holding the same b samples. Each layer's
    Gram ``X^T X`` and sums are accumulated once per batch (not once per pair); each pair adds only the cross
    moment ``X_a^T X_b`` (all pairs in one matrix product). ``same=True`` (or passing ``acts_b=None`` /
    ``acts_b is acts_a``; ``same=None`` decides at the first update) serves one model on both sides from a single
    Gram of the concatenated layers. ``compute()`` returns the (La, Lb) float64 map, rows in the order of the first
    update's ``acts_a``. Memory: :meth:`memory_bytes`.
    """

    _kind = "LinearCKAMap"
    _m: _Moments | None

    def __init__(self, debiased: bool = False, *, same: bool | None = None, process_group: Any = None) -> None:
        check_params(LINEAR_CKA_MAP_PARAMS, debiased=debiased, same=same)
        super().__init__(same=same, process_group=process_group)
        self.debiased = debiased
        self.add_state("_m", None, _MomentsReduction())

    def _options(self) -> dict[str, Any]:
        return {"debiased": self.debiased}

    @property
    def n(self) -> int:
        """Number of samples accumulated (on this rank, unless reduced)."""
        return 0 if self._m is None else self._m.n

    # --- memory and planning ---
    @staticmethod
    def memory_bytes(
        dims_a: Sequence[int], dims_b: Sequence[int] | None = None, *, debiased: bool = False, batch_size: int = 0
    ) -> int:
        """Bytes of the float64 state for layers of the given feature dims (``dims_b=None``: one model).

        The state is O(sum d^2 + sum_pairs d_a d_b): per layer its Gram, per pair its cross moment, plus O(d)
        vectors (and O(L d) for the debiased third-order terms). With ``batch_size`` the estimate adds the
        transient per-update buffers: the batch's layers concatenated (at most 8 b D bytes), and one chunk of its
        rows upcast and centered (:func:`~repsim_plugin.streaming._moments.chunk_rows` rows at most; with their
        norms when debiased); for a batch of at most one chunk, the same figure as the whole-batch upcast had.
        ``merge`` and ``compute(sync='auto')`` under ``torch.distributed`` briefly hold a second state.
        """
        a = _Layout(tuple(str(i) for i in range(len(dims_a))), tuple(int(d) for d in dims_a))
        b = (
            None
            if dims_b is None
            else _Layout(tuple(str(i) for i in range(len(dims_b))), tuple(int(d) for d in dims_b))
        )
        state = sum(math.prod(shape) for _, shape, _, _ in _Moments.spec(a, b, debiased)) * 8
        if batch_size:
            width = a.total + (0 if b is None else b.total)
            layers = a.n_layers + (0 if b is None else b.n_layers)
            rows = min(int(batch_size), chunk_rows(width))
            state += 8 * int(batch_size) * width + 8 * rows * (width + (layers if debiased else 0))
        return state

    @classmethod
    def memory_needed(
        cls, maps: Maps, *, n: int | None, batch_size: int, itemsize: int, debiased: bool = False, **options: Any
    ) -> int | None:
        """The float64 statistics of every map plus one update's buffers (independent of n)."""
        return sum(cls.memory_bytes(da, db, debiased=debiased, batch_size=batch_size) for da, db in maps)

    @classmethod
    def relative_cost(cls, maps: Maps, *, n: int | None, **options: Any) -> float | None:
        """Per sample, the Grams and cross moments: ~ (sum d)^2, shared by the maps."""
        d_total = sum(sum(da) + sum(db or ()) for da, db in maps)
        return d_total**2 / max(1, len(maps))

    # --- streaming ---
    def update(self, acts_a: Acts, acts_b: Acts | None = None) -> None:
        """Add one batch: ``acts_a`` / ``acts_b`` map layer names to (b, d) activations of the same b samples."""
        with torch.no_grad():
            A, B, groups = self._validate_update(acts_a, acts_b, finite=False)
            if check_same_rows(groups) == 0:
                return
            la, lb = self._layouts(A, B)
            m = self._m
            if m is None:
                m = _Moments(la, lb, self.debiased, self._device or next(iter(A.values())).device)
            XA = concat(order_like(A, la, "acts_a"), m.device)
            XB = None if B is None or lb is None else concat(order_like(B, lb, "acts_b"), m.device)
            found = extremes([XA] if XB is None else [XA, XB])
            check_finite(found, groups)
            m.update_(XA, XB, found)
            self._m, self._layout = m, (la, lb)

    def _compute_local(self) -> torch.Tensor:
        if self._m is None:
            raise TooFewSamplesError(f"{type(self).__name__}.compute: no batch has been added yet; call update first.")
        with torch.no_grad():
            return self._m.cka(self._labels)

    def compute(self, sync: bool | str = "auto") -> torch.Tensor:
        """(La, Lb) float64 linear CKA map; see :meth:`Accumulator.compute` for ``sync``."""
        return super().compute(sync)


class LinearCKA:
    """Exact streaming linear CKA of one pair: ``update(X, Y)`` with (b, p) and (b, q) rows, ``compute()`` 0-d.

    Equal to the one-shot :func:`repsim_plugin.measures.cka.linear_cka` on all rows (within float64 rounding) for
    any batch sizes and order; biased batches may have a single row, ``debiased=True`` needs n >= 4 in total only.
    The state is a :class:`LinearCKAMap` of the one pair (layers ``X`` and ``Y``); its state dict says ``LinearCKA``.
    """

    _kind = "LinearCKA"

    def __init__(self, debiased: bool = False, *, process_group: Any = None) -> None:
        check_params(LINEAR_CKA_PARAMS, debiased=debiased)
        self.debiased = debiased
        self.process_group = process_group
        self._map = LinearCKAMap(debiased, same=False, process_group=process_group)
        self._map._labels = (label_x, label_y)

    @property
    def n(self) -> int:
        return self._map.n

    @property
    def reduced(self) -> bool:
        """True after :meth:`all_reduce`: the state holds every rank's statistics."""
        return self._map.reduced

    @staticmethod
    def memory_bytes(p: int, q: int, *, debiased: bool = False, batch_size: int = 0) -> int:
        """Bytes of the float64 state: about 8 (p^2 + q^2 + pq) plus O(p + q)."""
        return LinearCKAMap.memory_bytes([p], [q], debiased=debiased, batch_size=batch_size)

    def update(self, X: Any, Y: Any) -> None:
        """Add rows: X (b, p), Y (b, q), the same b samples in the same order."""
        self._map.update({"X": X}, {"Y": Y})

    def merge(self, other: LinearCKA) -> None:
        """Add the statistics of ``other`` (another LinearCKA with the same ``debiased`` and dimensions)."""
        if not isinstance(other, LinearCKA) or other.debiased != self.debiased:
            raise RepsimError(f"can only merge a LinearCKA with debiased={self.debiased}, got {other!r}.")
        self._map.merge(other._map)

    def reset(self) -> None:
        self._map.reset()

    def all_reduce(self, group: Any = None) -> None:
        """Sum the statistics of all ranks in place (one all-reduce per statistic tensor); marks as reduced."""
        self._map.all_reduce(self.process_group if group is None else group)

    def compute(self, sync: bool | str = "auto") -> torch.Tensor:
        """0-d float64 linear CKA of everything seen; see :meth:`Accumulator.compute` for ``sync``."""
        return self._map.compute(sync)[0, 0]

    def state_dict(self) -> dict[str, Any]:
        return self._map.state_dict() | {"kind": self._kind}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_header(state, self._kind)
        self._map.load_state_dict(dict(state) | {"kind": LinearCKAMap._kind})

    def to(self, device: torch.device | str) -> LinearCKA:
        self._map.to(device)
        return self

    def __repr__(self) -> str:
        return f"LinearCKA(debiased={self.debiased}, n={self.n}{', reduced' if self.reduced else ''})"
