"""Layer selection: the grammar of the ``layers=`` argument, resolved to module names in model order.

A spec is a dotted name (``"encoder.layer.3"``), a glob (``*`` matches one dotted segment, ``**`` any number; a
trailing ``**`` at least one), an ``int`` indexing the adapter's *default layers* (``-1`` is the last block), a
module object, and any name or glob followed by ``#k`` (parsed by :func:`repsim_plugin._utils.names.split_call`)
to keep only the k-th call of a module that runs several times per forward.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from repsim_plugin._utils.checks import Int
from repsim_plugin._utils.names import split_call
from repsim_plugin._utils.suggest import did_you_mean
from repsim_plugin.adapters import Adapter, for_model
from repsim_plugin.errors import LayerFiringError, UnknownNameError

__all__ = ["LayerCalls", "LayerSpec", "resolve_layers"]

LayerSpec = str | int | nn.Module

#: module name -> the call indices asked for (None: every call)
Requests = dict[str, set[int] | None]


def _match_segments(pattern: Sequence[str], name: Sequence[str]) -> bool:
    if not pattern:
        return not name
    head = pattern[0]
    if head == "**":
        # a trailing ** needs at least one segment ("encoder.**" is what lies below encoder, not encoder itself)
        first = 1 if len(pattern) == 1 else 0
        return any(_match_segments(pattern[1:], name[k:]) for k in range(first, len(name) + 1))
    return bool(name) and fnmatch.fnmatchcase(name[0], head) and _match_segments(pattern[1:], name[1:])


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


class _ModelNames:
    """The names of a model's modules: the first name of each module object, aliases, and model order."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.canonical: dict[int, str] = {}
        self.aliases: dict[str, str] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.canonical.setdefault(id(module), name)
            self.aliases[name] = self.canonical[id(module)]
        self.order = {name: i for i, (name, _) in enumerate(model.named_modules()) if name}

    @property
    def model_name(self) -> str:
        return type(self.model).__name__

    def of_module(self, module: nn.Module) -> str:
        name = self.canonical.get(id(module))
        if name is None:
            raise UnknownNameError(
                f"the {type(module).__name__} module passed as a layer is not part of {self.model_name}; "
                "pass a submodule of the captured model"
            )
        if not name:
            raise UnknownNameError(
                "the model itself cannot be a captured layer; capture its output head by name (e.g. 'fc', "
                "'classifier', 'lm_head') or use the value the model returns"
            )
        return name

    def matching(self, base: str, spec: str) -> list[str]:
        """Module names that ``base`` (a name or glob, without ``#k``) selects; ``spec`` is quoted in errors."""
        if _is_glob(base):
            pattern = base.split(".")
            matches = [name for name in self.order if _match_segments(pattern, name.split("."))]
            if not matches:
                raise UnknownNameError(
                    f"layer pattern {spec!r} matches no module of {self.model_name} "
                    f"('*' matches one dotted segment, '**' any number).{did_you_mean(base, self.order)}"
                )
            return matches
        if self.aliases.get(base):
            return [self.aliases[base]]
        raise UnknownNameError(f"{self.model_name} has no module named {spec!r}.{did_you_mean(base, self.order)}")


def _request(requests: Requests, name: str, call: int | None) -> None:
    """Ask for one call of a module (or all calls, which wins over any single one)."""
    if call is None:
        requests[name] = None
        return
    calls = requests.setdefault(name, set())
    if calls is not None:
        calls.add(call)


def _as_specs(layers: LayerSpec | Sequence[LayerSpec] | None, adapter: Adapter) -> list[Any]:
    if layers is None:
        specs: list[Any] = list(adapter.default_layers())
    elif isinstance(layers, str | int | nn.Module):
        specs = [layers]
    else:
        specs = list(layers)
    if not specs:
        raise UnknownNameError("no layers to capture: pass layer names, globs, indices or modules (or None)")
    return specs


def _default_layer(index: int, adapter: Adapter, model: nn.Module) -> str:
    defaults = adapter.default_layers()
    if not -len(defaults) <= index < len(defaults):
        raise UnknownNameError(
            f"layer index {index} is out of range: an int indexes the {len(defaults)} default layers of "
            f"{type(model).__name__} ({defaults[0]!r} ... {defaults[-1]!r})"
        )
    return defaults[index]


def resolve_layers(
    model: nn.Module, layers: LayerSpec | Sequence[LayerSpec] | None, adapter: Adapter | None = None
) -> dict[str, set[int] | None]:
    """Resolve layer specs to module names in model order, each with the call indices asked for (None = all).

    Specs: a dotted name (``"encoder.layer.3"``), a glob (``*`` matches one dotted segment, ``**`` any number;
    a trailing ``**`` at least one), an ``int`` indexing the adapter's *default layers* (``-1`` is the last
    block), a module object, and any name or glob followed by ``#k`` to keep only the k-th call of a module run
    several times per forward. ``None`` means the adapter's default layers.
    """
    adapter = adapter or for_model(model)
    names = _ModelNames(model)
    requests: Requests = {}
    for spec in _as_specs(layers, adapter):
        if isinstance(spec, bool) or not isinstance(spec, str | int | nn.Module):
            raise UnknownNameError(
                f"a layer must be a name, glob, int or nn.Module, got {type(spec).__name__} ({spec!r})"
            )
        if isinstance(spec, nn.Module):
            _request(requests, names.of_module(spec), None)
            continue
        if isinstance(spec, int):
            spec = _default_layer(spec, adapter, model)
        base, call = split_call(spec)
        for name in names.matching(base, spec):
            _request(requests, name, call)
    return {name: requests[name] for name in sorted(requests, key=names.order.__getitem__)}


class LayerCalls:
    """The calls a recorder keeps of each hooked module, the layer names they give, and the call-count check.

    A module run once per forward is named by its module name; one run k > 1 times (or asked for with ``#k``)
    gives ``name#0`` ... ``name#{k-1}``. The first completed forward fixes each module's call count unless
    ``expected_calls`` gave it; every forward must then match.
    """

    def __init__(self, requests: Requests, expected: int | Mapping[str, int] | None = None) -> None:
        self.requests = requests
        #: resolved module names, in model order (one per module, without #k suffixes)
        self.modules: list[str] = list(requests)
        self.expected = self._expected_counts(expected)
        self.counts: dict[str, int] | None = None  # set by the first completed forward
        self.names: list[tuple[str, str, int]] = []  # (layer name, module name, call index)

    def _expected_counts(self, expected: int | Mapping[str, int] | None) -> dict[str, int]:
        """Per-module call counts from ``expected_calls`` (its type is checked by the recorder's table)."""
        if expected is None:
            return {}
        if not isinstance(expected, Mapping):
            return dict.fromkeys(self.modules, expected)
        unknown = [name for name in expected if name not in self.requests]
        if unknown:
            raise UnknownNameError(
                f"expected_calls names {unknown}, which are not captured modules; captured: {self.modules}"
                f"{did_you_mean(unknown[0], self.modules)}"
            )
        count = Int(minimum=1)
        return {name: count.check(f"expected_calls[{name!r}]", value) for name, value in expected.items()}

    def layer_names(self, counts: Mapping[str, int]) -> list[tuple[str, str, int]]:
        """(layer name, module name, call index) in model order; ``name#k`` for modules run several times."""
        names: list[tuple[str, str, int]] = []
        for name in self.modules:
            wanted = self.requests[name]
            calls = sorted(wanted) if wanted is not None else list(range(counts[name]))
            single = wanted is None and counts[name] == 1
            names.extend((name if single else f"{name}#{k}", name, k) for k in calls)
        return names

    @property
    def layers(self) -> list[str]:
        """Layer names in model order (known before any forward only when expected_calls covers every module)."""
        if self.counts is None:
            if len(self.expected) == len(self.modules):
                return [layer_name for layer_name, _, _ in self.layer_names(self.expected)]
            return list(self.modules)
        return [layer_name for layer_name, _, _ in self.names]

    def check(self, counts: Mapping[str, int]) -> None:
        """Check one forward's call counts (raising :class:`LayerFiringError` naming every module that ran an
        unexpected number of times); the first forward's counts then fix the layer names."""
        problems = []
        for name, count in counts.items():
            expected = self.expected.get(name, self.counts[name] if self.counts is not None else None)
            wanted = self.requests[name]
            if count == 0:
                problems.append(f"{name!r} never ran")
            elif expected is not None and count != expected:
                origin = "expected_calls" if name in self.expected else "the first forward"
                problems.append(f"{name!r} ran {count} times, but {origin} says {expected}")
            elif wanted is not None and max(wanted) >= count:
                problems.append(f"{name!r} ran {count} times, so call #{max(wanted)} does not exist")
        if problems:
            raise LayerFiringError(
                "captured layers did not run as expected in this forward pass: "
                + "; ".join(problems)
                + ". Check the layer names and the inputs (a branch not taken, an early exit), or pass "
                "expected_calls= for modules that run several times per forward."
            )
        if self.counts is None:
            self.counts = dict(counts)
            self.names = self.layer_names(counts)
