"""The accumulator base: each accumulator declares its state once, and the life cycle is derived from it.

An accumulator declares every piece of its state with :meth:`Accumulator.add_state` (a name, a default and a
:class:`Reduction`: :data:`SUM`, :data:`COUNT`, :data:`ROWS` or its own), as torchmetrics' ``Metric.add_state``
does. From those declarations the base derives
``reset``, ``merge``, ``state_dict`` / ``load_state_dict``, ``all_reduce``, ``to`` and the copy that
``compute(sync="auto")`` reduces; a subclass writes only ``update`` and the computation of its result.

``all_reduce()`` reduces *in place* and marks the accumulator as reduced: further ``update`` / ``merge`` /
``all_reduce`` raise :class:`~repsim_plugin.errors.StateError` (they would count other ranks twice) until
``reset()``. ``compute(sync="auto")`` (the default) reduces a *copy* when ``torch.distributed`` is initialized
with more than one rank and the state is not reduced yet, and leaves the local state untouched, so ``compute`` can
be called mid-stream and never reduces twice. ``sync=False`` computes from the local shard only; ``sync=True``
insists on reducing. Before any statistic travels, one tiny all-reduce checks that all ranks hold data and agree
on the layers and options, so a mismatch raises on every rank instead of hanging. That check, and those of a
loaded state dict, are in :mod:`._state_checks`.

:class:`MapAccumulator` adds what every layer x layer map shares: ``update(acts_a, acts_b=None)`` argument checks,
the layout fixed by the first update, ``layers_a`` / ``layers_b``, and the planning hooks
(:meth:`MapAccumulator.memory_needed`, :meth:`MapAccumulator.relative_cost`) the estimator planner asks.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from .._utils import dist
from .._utils.checks import Where, check_params
from ..errors import RepsimError, StateError
from ._reductions import COUNT, ROWS, SUM, Reduction
from ._rows import Acts, Group, _Layout, check_acts, label_a, label_b, validate_rows
from ._state_checks import STATE_VERSION, agree, check_header, check_sample_count, check_value

__all__ = [
    "COMPUTE_PARAMS",
    "COUNT",
    "ROWS",
    "SAME",
    "STATE_VERSION",
    "SUM",
    "Accumulator",
    "MapAccumulator",
    "Reduction",
    "check_header",
]

#: ``same`` of every map accumulator: fixed by the constructor, or by the first update when None
SAME = Where(lambda v: v is None or isinstance(v, bool), "True, False or None", bad=("yes", 1))
COMPUTE_PARAMS = {"sync": Where(lambda v: isinstance(v, bool) or v == "auto", "'auto', True or False", bad=("yes", 1))}

#: per map: (feature dims of side a, of side b or None when a model's layers are compared with themselves)
Maps = Sequence[tuple[Sequence[int], Sequence[int] | None]]

_Acc = TypeVar("_Acc", bound="Accumulator")


@dataclass(frozen=True)
class _Declared:
    name: str
    default: Any  # an immutable value (0, None) or a factory
    reduce: Reduction
    key: str  # its entry in the state dict
    blank: Callable[[], Any] | None  # the value a rank without data all-reduces (None: such a rank cannot)

    def fresh(self) -> Any:
        return self.default() if callable(self.default) else self.default


# --- the accumulator --------------------------------------------------------------------------------------------------


class Accumulator:
    """Declared state and the life cycle derived from it; subclasses add ``update`` and :meth:`_compute_local`.

    Subclasses set ``_kind`` (the state dict's ``kind``) and override :meth:`_options` (constructor options saved
    in the state dict and required to match on merge and load) and :meth:`_has_data`.
    """

    _kind: ClassVar[str] = "accumulator"

    def __init__(self, *, process_group: Any = None) -> None:
        self.process_group = process_group
        self._declared: list[_Declared] = []
        self._reduced = False
        self._device: torch.device | None = None

    def add_state(
        self,
        name: str,
        default: Any,
        reduce: Reduction,
        *,
        key: str | None = None,
        blank: Callable[[], Any] | None = None,
    ) -> None:
        """Declare the attribute ``name``: ``default`` (a value or a factory) at reset, combined by ``reduce``.

        ``key``: its entry in the state dict (default ``name``); ``blank``: what a rank that saw no data
        contributes to ``all_reduce`` while the value is still None.
        """
        declared = _Declared(name, default, reduce, key or name, blank)
        self._declared.append(declared)
        setattr(self, name, declared.fresh())

    # --- what subclasses say ---
    def _options(self) -> dict[str, Any]:
        return {}

    def _describe(self, options: Mapping[str, Any]) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in options.items())

    def _has_data(self) -> bool:
        raise NotImplementedError

    def _compute_local(self) -> torch.Tensor:
        raise NotImplementedError

    def _fingerprint(self) -> str | None:
        """What every rank must agree on before an all-reduce; None: this rank cannot take part (no layout)."""
        return json.dumps({"kind": self._kind, "options": self._options()}, sort_keys=True, default=str)

    # --- the reduced flag ---
    @property
    def reduced(self) -> bool:
        """True after :meth:`all_reduce`: the state holds every rank's statistics."""
        return self._reduced

    def _check_not_reduced(self, action: str) -> None:
        if self._reduced:
            raise StateError(
                f"cannot {action}: this accumulator already holds the all-reduced statistics of every rank, and "
                "adding to it would count the other ranks twice at the next reduction. Call reset() to start a new "
                "stream, or compute(sync='auto') without all_reduce() (it reduces a copy)."
            )

    # --- the derived life cycle ---
    def reset(self) -> None:
        """Forget all statistics (and, for maps, the layer layout: a new stream may use other layers)."""
        for d in self._declared:
            setattr(self, d.name, d.fresh())
        self._reduced = False

    def merge(self, other: Any) -> None:
        """Add the statistics of ``other`` (same class, options and layers; e.g. another shard)."""
        self._check_not_reduced("merge")
        if other is self:
            raise RepsimError(
                f"cannot merge a {type(self).__name__} with itself: every sample would be counted twice. Merge "
                "another shard's accumulator (for a copy, build a new accumulator and load this one's state_dict)."
            )
        if type(other) is not type(self) or other._options() != self._options():
            theirs = f" with {other._describe(other._options())}" if isinstance(other, Accumulator) else ""
            raise RepsimError(
                f"can only merge a {type(self).__name__} with {self._describe(self._options())}, got "
                f"{type(other).__name__}{theirs}."
            )
        if not other._has_data():
            return
        with torch.no_grad():
            if not self._has_data():
                self._adopt(other)
                for d in self._declared:
                    value = d.reduce.copy(getattr(other, d.name))
                    setattr(self, d.name, value if self._device is None else d.reduce.to(value, self._device))
                return
            self._check_mergeable(other)
            for d in self._declared:
                setattr(self, d.name, d.reduce.merge(getattr(self, d.name), getattr(other, d.name)))

    def _adopt(self, other: Any) -> None:
        """Take over what ``other``'s first update fixed (maps: ``same`` and the layout) before copying its state."""

    def _check_mergeable(self, other: Any) -> None:
        """Raise when ``other``'s data cannot be added to this accumulator's (maps: other layers)."""

    def all_reduce(self, group: Any = None) -> None:
        """Reduce the state of all ranks in place (every rank must call it); marks the state as reduced."""
        dist.require(f"{type(self).__name__}.all_reduce")
        self._check_not_reduced("all_reduce")
        group = self.process_group if group is None else group
        device = dist.comm_device(group, self._state_device())
        agree(self._fingerprint(), group, device, type(self).__name__)
        with torch.no_grad():
            for d in self._declared:
                value = getattr(self, d.name)
                if value is None and d.blank is not None:
                    value = d.blank().to(device)
                setattr(self, d.name, d.reduce.all_reduce(value, group, device))
        self._reduced = True

    def compute(self, sync: bool | str = "auto") -> torch.Tensor:
        """The estimate from the statistics seen so far (float64).

        ``sync="auto"``: if ``torch.distributed`` is initialized with more than one rank and the state is not
        reduced yet, all-reduce a copy first (every rank must call ``compute``); the local state is left as is.
        ``sync=True`` requires a process group; ``sync=False`` uses this rank's statistics only.
        """
        check_params(COMPUTE_PARAMS, sync=sync)
        target: Accumulator = self
        if not self._reduced and sync is not False:
            if sync is True:
                dist.require(f"{type(self).__name__}.compute(sync=True)")
            if sync is True or dist.active(self.process_group):
                target = self._copy()
                target.all_reduce(self.process_group)
        return target._compute_local()

    def _copy(self: _Acc) -> _Acc:
        """A copy whose state later updates of either cannot reach (what ``compute(sync="auto")`` reduces)."""
        out = copy.copy(self)
        for d in self._declared:
            setattr(out, d.name, d.reduce.copy(getattr(self, d.name)))
        return out

    def to(self: _Acc, device: torch.device | str) -> _Acc:
        """Move the state to ``device`` (later batches are moved there too); returns self."""
        self._device = torch.device(device)
        for d in self._declared:
            setattr(self, d.name, d.reduce.to(getattr(self, d.name), self._device))
        return self

    def _state_device(self) -> torch.device | None:
        for d in self._declared:
            found = d.reduce.device(getattr(self, d.name))
            if found is not None:
                return found
        return None

    # --- persistence ---
    def state_dict(self) -> dict[str, Any]:
        """Plain dict of tensors and metadata (``torch.save`` / ``torch.load(weights_only=True)`` safe)."""
        out: dict[str, Any] = {"kind": self._kind, "version": STATE_VERSION, "reduced": self._reduced}
        out |= self._options() | self._layout_state()
        for d in self._declared:
            out |= d.reduce.save(d.key, getattr(self, d.name))
        return out

    def _layout_state(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the options must match this accumulator's. On error nothing changes."""
        check_header(state, self._kind)
        saved = {k: state.get(k) for k in self._options()}
        if saved != self._options():
            raise RepsimError(
                f"the state was saved with {self._describe(saved)}, this accumulator has "
                f"{self._describe(self._options())}."
            )
        fresh = copy.copy(self)
        fresh.reset()
        try:
            if fresh._load_layout(state):
                for d in self._declared:
                    setattr(fresh, d.name, d.reduce.load(d.key, state, fresh))
            fresh._check_loaded()
        except RepsimError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as err:
            raise RepsimError(
                f"malformed {self._kind} state dict ({err!r}); pass the output of state_dict()."
            ) from None
        if self._device is not None:
            fresh.to(self._device)
        fresh._reduced = bool(state.get("reduced", False))
        self.__dict__.update(fresh.__dict__)

    def _load_layout(self, state: Mapping[str, Any]) -> bool:
        """Restore what the first update fixed; False when the saved accumulator had no data (nothing to load)."""
        return True

    def _check_loaded(self) -> None:
        """Raise ``ValueError`` when a loaded (possibly hand-edited) state cannot be one ``update`` produced.

        Counts must be non-negative ints and every tensor finite; subclasses add :meth:`_check_shapes` (the shapes
        the layout implies), so a corrupt state is refused at load instead of giving NaN or a broadcast map.
        """
        for d in self._declared:
            check_value(d.key, getattr(self, d.name), count=d.reduce is COUNT)
        check_sample_count(getattr(self, "n", 0))  # the sample count, wherever a subclass keeps it
        self._check_shapes()

    def _check_shapes(self) -> None:
        """Subclasses: raise ``ValueError`` when the loaded tensors do not have the shapes the layout implies."""


# --- layer x layer maps -----------------------------------------------------------------------------------------------


class MapAccumulator(Accumulator):
    """An accumulator of every layer pair of two models (or of one model with itself).

    ``update(acts_a, acts_b=None)`` takes ``{layer name: (b, d) tensor}`` dicts holding the same b samples;
    ``same=True`` (or ``acts_b=None`` / ``acts_b is acts_a``; ``same=None`` decides at the first update) compares
    one model's layers with themselves. The first update fixes the layers and their feature dimensions.
    ``compute()`` returns the (La, Lb) float64 map, rows in the order of the first update's ``acts_a``.
    """

    #: fewest rows an update may have (the engine skips and records shorter batches); 0: any batch
    min_batch_rows: ClassVar[int] = 0
    #: True for estimators that keep rows per side (``copy=False``: the maps that name a side hold the same
    #: tensors) and form each side's work once per engine: its planner then counts every side once, however many
    #: maps name it (``compare_checkpoints``), instead of once per map
    shares_sides: ClassVar[bool] = False

    def __init__(self, *, same: bool | None = None, process_group: Any = None) -> None:
        check_params({"same": SAME}, same=same)
        super().__init__(process_group=process_group)
        self._same_arg = same
        self.same: bool | None = same
        self._layout: tuple[_Layout, _Layout | None] | None = None
        self._labels = (label_a, label_b)

    # --- planning (the estimator planner of rp.compare asks these before building any accumulator) ---
    @classmethod
    def memory_needed(cls, maps: Maps, *, n: int | None, batch_size: int, itemsize: int, **options: Any) -> int | None:
        """Bytes of one accumulator per map in ``maps``; None when unknown (e.g. it depends on n and n is None)."""
        return None

    @classmethod
    def relative_cost(cls, maps: Maps, *, n: int | None, **options: Any) -> float | None:
        """Comparable work of this estimator next to the other exact ones of a measure; None ranks last."""
        return None

    # --- layout ---
    @property
    def layers_a(self) -> list[str]:
        return [] if self._layout is None else list(self._layout[0].names)

    @property
    def layers_b(self) -> list[str]:
        if self._layout is None:
            return []
        a, b = self._layout
        return list((a if b is None else b).names)

    def _layouts(self, A: dict[str, torch.Tensor], B: dict[str, torch.Tensor] | None) -> tuple[_Layout, _Layout | None]:
        """The layout fixed by the first update, or the one this update would fix."""
        if self._layout is not None:
            return self._layout
        return _Layout.of(A), None if self.same or B is None else _Layout.of(B)

    def _validate_update(
        self, acts_a: Acts, acts_b: Acts | None, *, finite: bool = True
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, list[Group]]:
        """Check the arguments of ``update`` (``same`` is fixed by the first call) and validate the rows.

        Returns side a's rows, side b's rows (None when one model is compared with itself) and the
        ``(label, rows)`` groups whose row counts :func:`check_same_rows` compares.
        """
        self._check_not_reduced("update")
        check_acts(acts_a, "acts_a")
        same_call = acts_b is None or acts_b is acts_a
        if self.same is None:
            self.same = same_call
        kind = type(self).__name__
        if self.same and not same_call:
            raise RepsimError(
                f"this {kind} compares one model with itself (same=True): call update(acts) or update(acts, acts) "
                f"with the same dict. For two models create {kind}(same=False)."
            )
        if not self.same and acts_b is None:
            raise RepsimError(f"this {kind} compares two models (same=False): pass update(acts_a, acts_b).")
        if not same_call:
            check_acts(acts_b, "acts_b")
        la, lb = self._labels
        A = validate_rows(acts_a, la, finite=finite)
        groups: list[Group] = [(la, A)]
        B = None
        if not self.same:
            assert acts_b is not None
            B = A if acts_b is acts_a else validate_rows(acts_b, lb, finite=finite)
            groups.append((lb, B))
        return A, B, groups

    # --- the derived life cycle, map parts ---
    def reset(self) -> None:
        super().reset()
        self._layout = None
        self.same = self._same_arg

    def _has_data(self) -> bool:
        return self._layout is not None

    def _adopt(self, other: Any) -> None:
        self.same, self._layout = other.same, other._layout

    def _check_mergeable(self, other: Any) -> None:
        if other._layout != self._layout:
            raise RepsimError(
                "cannot merge accumulators with different layers or feature dimensions: "
                f"{self.layers_a} x {self.layers_b} {self._dims()} vs {other.layers_a} x {other.layers_b} "
                f"{other._dims()}."
            )

    def _dims(self) -> list[tuple[int, ...]]:
        return [] if self._layout is None else [lay.dims for lay in self._layout if lay is not None]

    def _fingerprint(self) -> str | None:
        if self._layout is None:
            return None
        return json.dumps(
            {"kind": self._kind, "options": self._options(), "layout": self._layout_state()["layout"]},
            sort_keys=True,
            default=str,
        )

    def _layout_state(self) -> dict[str, Any]:
        if self._layout is None:
            return {"same": self.same, "layout": None}
        a, b = self._layout
        return {"same": self.same, "layout": {"a": a.as_json(), "b": None if b is None else b.as_json()}}

    def _load_layout(self, state: Mapping[str, Any]) -> bool:
        layout = state.get("layout")
        if layout is None:
            return False
        a = _Layout.from_json(layout["a"])
        b = None if layout["b"] is None else _Layout.from_json(layout["b"])
        if self._same_arg is not None and self._same_arg != (b is None):
            raise RepsimError(f"the state was saved with same={b is None}, this accumulator has same={self._same_arg}.")
        self._layout, self.same = (a, b), b is None
        return True

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self._describe(self._options())}, same={self.same}, layers="
            f"{len(self.layers_a)}x{len(self.layers_b)}, n={getattr(self, 'n', 0)}"
            f"{', reduced' if self._reduced else ''})"
        )
