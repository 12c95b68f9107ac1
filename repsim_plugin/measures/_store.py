"""The registry's state behind one lock: measures by id, families, aliases, and whether plugins were loaded.

:mod:`repsim_plugin.measures.registry` keeps the one instance and the public functions around it
(``register``, ``register_family``, ``unregister``, ``make``, ``load_plugins``); this module knows nothing of what a
measure computes, only that it has an ``id``, so it does not import the measure class.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from .._utils.suggest import did_you_mean
from ..errors import PluginLoadWarning, RepsimError, UnknownNameError


class Identified(Protocol):
    """What the store needs of a measure: its canonical id."""

    @property
    def id(self) -> str: ...


M = TypeVar("M", bound=Identified)


class Registry(Generic[M]):
    """Registered measures, families and aliases; every change holds :attr:`lock`."""

    def __init__(self) -> None:
        self.measures: dict[str, M] = {}
        self.families: dict[str, Callable[[dict[str, Any]], M]] = {}
        #: per family: a parameter given to make() -> the id parameters it replaces (e.g. debiased -> hsic)
        self.replaces: dict[str, dict[str, tuple[str, ...]]] = {}
        self.aliases: dict[str, str] = {}
        self.plugins_loaded = False
        self.lock = threading.RLock()

    def add(self, measure: M, aliases: Iterable[str] = (), overwrite: bool = False) -> None:
        with self.lock:
            if measure.id in self.measures and not overwrite:
                raise RepsimError(
                    f"a measure with id {measure.id!r} is already registered; pass overwrite=True to replace it."
                )
            self.measures[measure.id] = measure
            for alias in aliases:
                self.add_alias(alias, measure.id, overwrite=overwrite)

    def add_alias(self, alias: str, target: str, overwrite: bool = False) -> None:
        current = self.aliases.get(alias)
        if current is not None and current != target and not overwrite:
            raise RepsimError(f"alias {alias!r} already points to {current!r}; pass overwrite=True to change it.")
        self.aliases[alias] = target

    def add_family(
        self,
        name: str,
        build: Callable[[dict[str, Any]], M],
        variants: Iterable[Mapping[str, Any]],
        aliases: Mapping[str, Mapping[str, Any]],
        replaces: Mapping[str, Iterable[str]],
        overwrite: bool,
    ) -> None:
        """Register a family's builder, then the variants it lists and the measures its aliases stand for."""
        with self.lock:
            if name in self.families and not overwrite:
                raise RepsimError(f"a measure family {name!r} is already registered; pass overwrite=True.")
            self.families[name] = build
            self.replaces[name] = {k: tuple(v) for k, v in replaces.items()}
            for params in variants:
                self.add(build(dict(params)), overwrite=overwrite)
            for alias, params in aliases.items():
                measure = build(dict(params))
                if measure.id not in self.measures:
                    self.add(measure, overwrite=overwrite)
                self.add_alias(alias, measure.id, overwrite=overwrite)

    def remove(self, id_or_alias: str) -> None:
        """Remove a measure (and the aliases pointing at it) or a single alias."""
        with self.lock:
            if id_or_alias in self.aliases:
                del self.aliases[id_or_alias]
                return
            if id_or_alias not in self.measures:
                raise self.unknown(id_or_alias)
            del self.measures[id_or_alias]
            for alias in [a for a, t in self.aliases.items() if t == id_or_alias]:
                del self.aliases[alias]

    def known_names(self) -> list[str]:
        return sorted({*self.measures, *self.aliases, *self.families})

    def unknown(self, name: str) -> UnknownNameError:
        """The error for a name that is neither an id, an alias nor a family (with did-you-mean suggestions)."""
        return UnknownNameError(
            f"unknown measure {name!r}.{did_you_mean(name, self.known_names())} `repsim measures` or "
            "rp.measures.list() shows every registered id."
        )

    def load_plugins(self, group: str, kind: type[M], force: bool) -> list[str]:
        """Load the entry points of ``group`` once (again with ``force``); see ``registry.load_plugins``.

        An entry point naming a ``kind`` instance is added as is, a callable is called; a failure is a warning
        that points at the caller of ``registry.load_plugins`` (hence ``stacklevel=3``).
        """
        from importlib.metadata import entry_points

        with self.lock:
            if self.plugins_loaded and not force:
                return []
            self.plugins_loaded = True
            loaded = []
            for ep in entry_points(group=group):
                try:
                    obj = ep.load()
                    if isinstance(obj, kind):
                        self.add(obj, overwrite=force)
                    elif callable(obj):
                        obj()
                    else:
                        raise TypeError(f"it names a {type(obj).__name__}, not a Measure or a registration function")
                    loaded.append(ep.name)
                except Exception as exc:  # a broken plugin must not break the registry
                    warnings.warn(
                        f"measure plugin {ep.name!r} ({ep.value}) could not be loaded and is skipped: {exc!r}",
                        PluginLoadWarning,
                        stacklevel=3,
                    )
            return loaded
