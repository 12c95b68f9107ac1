"""How a declared piece of accumulator state combines: merged, all-reduced, copied, moved, saved and restored.

An accumulator declares each piece of its state with a :class:`Reduction` (see
:meth:`repsim_plugin.streaming.base.Accumulator.add_state`). The built-in ones cover plain sums (:data:`SUM`),
counts (:data:`COUNT`) and kept rows (:data:`ROWS`); a state that is not simply additive (the exact linear-CKA
moments, whose centers differ) brings its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .._utils import dist
from ._rows import F64

__all__ = ["COUNT", "ROWS", "SUM", "SUM3", "Reduction"]


class Reduction:
    """How one declared state combines (merge, all-reduce) and is copied, moved, saved and restored.

    A value may be ``None`` (not started: its shape is known at the first update). ``save`` returns the state-dict
    entries of the value (usually ``{key: value}``); ``load`` reads them back (``owner`` is the accumulator being
    loaded, its layout already restored). The defaults treat the value as float64 tensors (or a dict of them).
    """

    def merge(self, mine: Any, theirs: Any) -> Any:
        raise NotImplementedError

    def all_reduce(self, value: Any, group: Any, device: torch.device) -> Any:
        raise NotImplementedError

    def copy(self, value: Any) -> Any:
        return _each(value, lambda t: t.clone())

    def to(self, value: Any, device: torch.device) -> Any:
        return _each(value, lambda t: t.to(device))

    def device(self, value: Any) -> torch.device | None:
        found = _tensors(value)
        return found[0].device if found else None

    def save(self, key: str, value: Any) -> dict[str, Any]:
        return {key: _each(value, lambda t: t.detach().clone())}

    def load(self, key: str, state: Mapping[str, Any], owner: Any) -> Any:
        return _each(state[key], lambda t: _tensor(t, key).to(F64).clone())


def _each(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``fn`` applied to a tensor, to every tensor of a dict (or of a dict of lists); None stays None."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {k: _each(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [fn(t) for t in value]
    return fn(value)


def _tensors(value: Any) -> list[torch.Tensor]:
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [t for k in sorted(value) for t in _tensors(value[k])]
    if isinstance(value, list):
        return list(value)
    return [value] if isinstance(value, torch.Tensor) else []


def _tensor(value: Any, key: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{key!r} must hold tensors, got {type(value).__name__}")
    return value


class _Sum(Reduction):
    """A float64 tensor, or a dict of them, summed: one ``all_reduce`` per tensor. ``shape``: checked on load."""

    def __init__(self, shape: tuple[int, ...] | None = None) -> None:
        self.shape = shape

    def load(self, key: str, state: Mapping[str, Any], owner: Any) -> Any:
        value = super().load(key, state, owner)
        if self.shape is not None and value is not None and tuple(value.shape) != self.shape:
            raise ValueError(f"{key!r} must be a tensor of shape {self.shape}, got {tuple(value.shape)}")
        return value

    def merge(self, mine: Any, theirs: Any) -> Any:
        if theirs is None:
            return mine
        if mine is None:
            return self.copy(theirs)
        if isinstance(mine, Mapping):
            return {k: mine[k] + theirs[k].to(mine[k].device) for k in mine}
        return mine + theirs.to(mine.device)

    def all_reduce(self, value: Any, group: Any, device: torch.device) -> Any:
        d = dist.dist()
        for t in _tensors(value):
            d.all_reduce(t, op=d.ReduceOp.SUM, group=group)
        return value


class _Count(Reduction):
    """A Python int (samples, batches) summed across accumulators and ranks."""

    def merge(self, mine: Any, theirs: Any) -> Any:
        return int(mine) + int(theirs)

    def all_reduce(self, value: Any, group: Any, device: torch.device) -> Any:
        d = dist.dist()
        t = torch.tensor([int(value)], dtype=torch.int64, device=device)
        d.all_reduce(t, op=d.ReduceOp.SUM, group=group)
        return int(t[0])

    def copy(self, value: Any) -> Any:
        return value

    def to(self, value: Any, device: torch.device) -> Any:
        return value

    def save(self, key: str, value: Any) -> dict[str, Any]:
        return {key: int(value)}

    def load(self, key: str, state: Mapping[str, Any], owner: Any) -> Any:
        return int(state[key])


class _Rows(Reduction):
    """Kept rows, ``{layer: [batch, ...]}`` in arrival order: merged by appending, all-reduced by gathering.

    Batches are only ever appended, never changed in place, so copies share them; they keep their dtype.
    """

    def merge(self, mine: Any, theirs: Any) -> Any:
        if theirs is None:
            return mine
        if mine is None:
            return self.copy(theirs)
        return {k: mine[k] + theirs[k] for k in mine}

    def all_reduce(self, value: Any, group: Any, device: torch.device) -> Any:
        """Every rank's rows, in rank order (``all_gather_object`` of each layer's rows on the CPU)."""
        if value is None:
            return None
        d = dist.dist()
        home = self.device(value)
        payload = {k: torch.cat(v).cpu() for k, v in value.items()}
        gathered: list[Any] = [None] * d.get_world_size(group)
        d.all_gather_object(gathered, payload, group=group)
        return {k: [g[k].to(home) for g in gathered] for k in value}

    def copy(self, value: Any) -> Any:
        return None if value is None else {k: list(v) for k, v in value.items()}

    def save(self, key: str, value: Any) -> dict[str, Any]:
        return {key: None if value is None else {k: torch.cat(v) for k, v in value.items()}}

    def load(self, key: str, state: Mapping[str, Any], owner: Any) -> Any:
        rows = state[key]
        return None if rows is None else {k: [_tensor(v, key).clone()] for k, v in rows.items()}


#: summed float64 tensors (or dicts of them); summed ints; kept rows (merged by appending, gathered across ranks)
SUM: Reduction = _Sum()
SUM3: Reduction = _Sum((3,))  # a tensor of 3 sums
COUNT: Reduction = _Count()
ROWS: Reduction = _Rows()
