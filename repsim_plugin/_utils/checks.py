"""Declarative parameter checks: one table of constraints per public entry point, one checker for all of them.

A public function lists its parameters' constraints once::

    SHIFT_PARAMS = {"steps": Int(minimum=0), "lr": Float(positive=True), "mode": Choice(MODES), ...}
    values = check_params(SHIFT_PARAMS, steps=steps, lr=lr, mode=mode)

and every message has the same form, ``"<name> must be <what the constraint accepts>, got <value>."`` (an unknown
choice adds the closest names). Each constraint also lists a few values it rejects (:meth:`Constraint.bad_values`),
so the tests of invalid parameters are generated from the same tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import RepsimError, UnknownNameError
from .suggest import did_you_mean


class Constraint:
    """What one parameter accepts; :meth:`check` returns the value normalised (e.g. an int as float)."""

    def describe(self) -> str:
        raise NotImplementedError

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def normalise(self, value: Any) -> Any:
        return value

    def bad_values(self) -> list[Any]:
        """A few values this constraint rejects (for generated tests)."""
        return []

    def error(self, name: str, value: Any) -> RepsimError:
        return RepsimError(f"{name} must be {self.describe()}, got {value!r}.")

    def check(self, name: str, value: Any) -> Any:
        if not self.accepts(value):
            raise self.error(name, value)
        return self.normalise(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Int(Constraint):
    """An ``int`` (not a bool) in ``[minimum, maximum]``."""

    minimum: int | None = None
    maximum: int | None = None

    def describe(self) -> str:
        if self.minimum is not None and self.maximum is not None:
            return f"an integer in [{self.minimum}, {self.maximum}]"
        if self.minimum == 1:
            return "a positive integer (>= 1)"
        if self.minimum == 0:
            return "a non-negative integer (>= 0)"
        if self.minimum is not None:
            return f"an integer >= {self.minimum}"
        if self.maximum is not None:
            return f"an integer <= {self.maximum}"
        return "an integer"

    def accepts(self, value: Any) -> bool:
        if not _is_int(value):
            return False
        return (self.minimum is None or value >= self.minimum) and (self.maximum is None or value <= self.maximum)

    def normalise(self, value: Any) -> int:
        return int(value)

    def bad_values(self) -> list[Any]:
        out: list[Any] = [True, 2.5, "3"]
        if self.minimum is not None:
            out.append(self.minimum - 1)
        if self.maximum is not None:
            out.append(self.maximum + 1)
        return out


#: A random seed: any integer torch.Generator.manual_seed takes (larger ones would overflow inside torch).
SEED = Int(minimum=-(2**63), maximum=2**64 - 1)


@dataclass(frozen=True)
class Float(Constraint):
    """A finite real number (int or float, not a bool), optionally bounded; ``positive`` excludes 0."""

    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False
    below: float | None = None  # exclusive upper bound

    def describe(self) -> str:
        parts = []
        if self.positive:
            parts.append("a positive number")
        elif self.minimum == 0:
            parts.append("a non-negative number")
        elif self.minimum is not None:
            parts.append(f"a number >= {self.minimum}")
        else:
            parts.append("a finite number")
        if self.maximum is not None:
            parts.append(f"<= {self.maximum}")
        if self.below is not None:
            parts.append(f"below {self.below}")
        return " ".join(parts)

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            try:
                import numpy as np

                if not isinstance(value, np.floating | np.integer):
                    return False
            except ImportError:  # pragma: no cover
                return False
        x = float(value)
        if not math.isfinite(x):
            return False
        if self.positive and x <= 0:
            return False
        if self.minimum is not None and x < self.minimum:
            return False
        if self.maximum is not None and x > self.maximum:
            return False
        return not (self.below is not None and x >= self.below)

    def normalise(self, value: Any) -> float:
        return float(value)

    def bad_values(self) -> list[Any]:
        out: list[Any] = [float("nan"), float("inf"), "1", True]
        if self.positive:
            out.append(0.0)
        if self.minimum is not None:
            out.append(self.minimum - 1.0)
        if self.maximum is not None:
            out.append(self.maximum + 1.0)
        if self.below is not None:
            out.append(self.below)
        return out


@dataclass(frozen=True)
class Choice(Constraint):
    """One of a fixed set of names; an unknown one is an :class:`UnknownNameError` with suggestions."""

    options: Sequence[Any]

    def describe(self) -> str:
        return "one of " + ", ".join(map(repr, self.options))

    def accepts(self, value: Any) -> bool:
        try:
            return value in self.options
        except TypeError:
            return False

    def error(self, name: str, value: Any) -> RepsimError:
        known = [str(o) for o in self.options]
        return UnknownNameError(f"{name} must be {self.describe()}, got {value!r}.{did_you_mean(value, known)}")

    def bad_values(self) -> list[Any]:
        return ["no-such-option", 3]


@dataclass(frozen=True)
class Bool(Constraint):
    """``True`` or ``False`` exactly (not 0 / 1, not a string)."""

    def describe(self) -> str:
        return "True or False"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)

    def bad_values(self) -> list[Any]:
        return [1, "yes", None]


@dataclass(frozen=True)
class Instance(Constraint):
    """An instance of ``types`` (described as ``what``)."""

    types: type | tuple[type, ...]
    what: str

    def describe(self) -> str:
        return self.what

    def accepts(self, value: Any) -> bool:
        return isinstance(value, self.types) and not (isinstance(value, bool) and bool not in _as_tuple(self.types))

    def bad_values(self) -> list[Any]:
        return [_FOREIGN]


class _Foreign:
    """A value of no accepted type whose repr is the same in every process (test ids: pytest-xdist's workers
    must collect the same names)."""

    def __repr__(self) -> str:
        return "<foreign object>"


_FOREIGN = _Foreign()


@dataclass(frozen=True)
class Callable_(Constraint):  # noqa: N801  (reads as the type it checks)
    """A callable."""

    what: str = "a callable"

    def describe(self) -> str:
        return self.what

    def accepts(self, value: Any) -> bool:
        return callable(value)

    def bad_values(self) -> list[Any]:
        return [3]


@dataclass(frozen=True)
class Optional(Constraint):
    """``None`` or what ``inner`` accepts."""

    inner: Constraint

    def describe(self) -> str:
        return f"None or {self.inner.describe()}"

    def accepts(self, value: Any) -> bool:
        return value is None or self.inner.accepts(value)

    def normalise(self, value: Any) -> Any:
        return None if value is None else self.inner.normalise(value)

    def error(self, name: str, value: Any) -> RepsimError:
        inner = self.inner.error(name, value)
        return type(inner)(f"{name} must be {self.describe()}, got {value!r}.")

    def bad_values(self) -> list[Any]:
        return [v for v in self.inner.bad_values() if v is not None]


@dataclass(frozen=True)
class AnyOf(Constraint):
    """What any of ``alternatives`` accepts (the first that accepts normalises)."""

    alternatives: tuple[Constraint, ...]
    what: str | None = None

    def describe(self) -> str:
        return self.what or " or ".join(c.describe() for c in self.alternatives)

    def accepts(self, value: Any) -> bool:
        return any(c.accepts(value) for c in self.alternatives)

    def normalise(self, value: Any) -> Any:
        return next(c for c in self.alternatives if c.accepts(value)).normalise(value)

    def bad_values(self) -> list[Any]:
        return [v for c in self.alternatives for v in c.bad_values() if not self.accepts(v)][:3]


@dataclass(frozen=True)
class Where(Constraint):
    """A constraint written as a predicate, for the few rules the others cannot state."""

    predicate: Callable[[Any], bool]
    what: str
    bad: tuple[Any, ...] = field(default=())

    def describe(self) -> str:
        return self.what

    def accepts(self, value: Any) -> bool:
        try:
            return bool(self.predicate(value))
        except (TypeError, ValueError):
            return False

    def bad_values(self) -> list[Any]:
        return list(self.bad)


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


Table = Mapping[str, Constraint]


def check_params(table: Table, **values: Any) -> dict[str, Any]:
    """Check every given value against its constraint in ``table``; returns the normalised values by name."""
    out = {}
    for name, value in values.items():
        constraint = table.get(name)
        if constraint is None:
            raise KeyError(f"no constraint for parameter {name!r}")  # a bug in the caller's table, not bad input
        out[name] = constraint.check(name, value)
    return out


def check_one(table: Table, name: str, value: Any) -> Any:
    """Check one value against its constraint in ``table``; returns it normalised."""
    return table[name].check(name, value)


@dataclass(frozen=True)
class Device(Constraint):
    """A ``torch.device``, a device string such as ``"cpu"`` / ``"cuda:1"``, or a device index."""

    def describe(self) -> str:
        return "a torch.device or a device string such as 'cpu'"

    def accepts(self, value: Any) -> bool:
        import torch

        if isinstance(value, torch.device):
            return True
        if isinstance(value, bool) or not isinstance(value, str | int):
            return False
        try:
            torch.device(value)
        except (RuntimeError, TypeError, ValueError):
            return False
        return True

    def bad_values(self) -> list[Any]:
        return ["no-such-device", 2.5, True]
