"""Model-family adapters: ``for_model(model)`` picks the one that understands a model.

Families are detected from the module names of the model's classes, so importing this package never imports
transformers or timm.

Adding a family is adding one file to this package: a module that defines an :class:`Adapter` subclass declaring
its own ``name`` (and ``aliases`` / ``priority`` when it needs them) is found by :func:`discover` when the package
is imported; nothing else is edited. Such a module must not import its family's library at module level. Code
outside the package calls :func:`register` instead: registered adapters are tried before the built-in ones.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from torch import nn

from repsim_plugin._utils.suggest import did_you_mean
from repsim_plugin.errors import RepsimError, UnknownNameError

from .base import LAYOUTS, Adapter
from .generic import GenericAdapter
from .huggingface import HuggingFaceAdapter
from .timm import TimmAdapter

__all__ = [
    "ADAPTERS",
    "BUILTIN_ADAPTERS",
    "LAYOUTS",
    "Adapter",
    "GenericAdapter",
    "HuggingFaceAdapter",
    "TimmAdapter",
    "discover",
    "for_model",
    "register",
    "unregister",
]


def _declared_adapters(module: ModuleType) -> list[type[Adapter]]:
    """The public Adapter subclasses ``module`` defines with a ``name`` of their own (not imported ones)."""
    return [
        value
        for key, value in vars(module).items()
        if isinstance(value, type)
        and issubclass(value, Adapter)
        and value is not Adapter
        and value.__module__ == module.__name__
        and "name" in vars(value)
        and not key.startswith("_")
    ]


def discover(package: str = __name__) -> list[type[Adapter]]:
    """The adapters defined by the modules of ``package`` (one family per file), in detection order.

    Highest ``priority`` first, then by name; two adapters claiming one name is an error of the package.
    """
    found: dict[str, type[Adapter]] = {}
    for info in sorted(pkgutil.iter_modules(importlib.import_module(package).__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        for adapter_class in _declared_adapters(importlib.import_module(f"{package}.{info.name}")):
            for name in (adapter_class.name, *adapter_class.aliases):
                other = found.setdefault(name, adapter_class)
                if other is not adapter_class:
                    raise RepsimError(
                        f"adapters {other.__qualname__} and {adapter_class.__qualname__} both claim the name {name!r}"
                    )
    return sorted(set(found.values()), key=lambda cls: (-cls.priority, cls.name))


#: The built-in adapters found in this package, in detection order (the generic one, which matches anything, last).
BUILTIN_ADAPTERS: tuple[type[Adapter], ...] = tuple(discover())

#: Adapters tried in order by ``for_model(adapter="auto")``: registered ones (newest first), then the built-ins.
ADAPTERS: list[type[Adapter]] = list(BUILTIN_ADAPTERS)

# registered adapters and the names they were registered under, newest first
_registered: list[tuple[type[Adapter], tuple[str, ...]]] = []


def _names() -> dict[str, type[Adapter]]:
    """Every name ``adapter=`` accepts besides "auto": built-in names and aliases, then registered ones (which
    take a built-in's name over while registered)."""
    names = {name: cls for cls in BUILTIN_ADAPTERS for name in (cls.name, *cls.aliases)}
    for adapter_class, registered_names in reversed(_registered):
        names.update(dict.fromkeys(registered_names, adapter_class))
    return names


def register(adapter_class: type[Adapter], *, name: str | None = None) -> type[Adapter]:
    """Add a third-party adapter, tried before the built-in ones; usable as a class decorator.

    It is known by ``name`` (default: its class's ``name``) and by its class's ``aliases``.
    """
    if not (isinstance(adapter_class, type) and issubclass(adapter_class, Adapter)):
        raise RepsimError(f"register needs an Adapter subclass, got {adapter_class!r}")
    unregister(adapter_class)
    ADAPTERS.insert(0, adapter_class)
    _registered.insert(0, (adapter_class, (name or adapter_class.name, *adapter_class.aliases)))
    return adapter_class


def unregister(adapter_class: type[Adapter]) -> None:
    """Remove an adapter added with :func:`register` (no-op for one that is not registered)."""
    if any(cls is adapter_class for cls, _ in _registered):
        _registered[:] = [(cls, names) for cls, names in _registered if cls is not adapter_class]
        if adapter_class in ADAPTERS:
            ADAPTERS.remove(adapter_class)  # the first (registered) entry; a built-in one stays


def for_model(model: nn.Module, adapter: str | Adapter | type[Adapter] = "auto") -> Adapter:
    """The adapter for ``model``: ``"auto"`` detects the family; a name, an ``Adapter`` class or instance forces one."""
    if isinstance(adapter, Adapter):
        if adapter.model is not model:
            raise RepsimError("the adapter instance wraps another model; build it for the captured model")
        return adapter
    if isinstance(adapter, type) and issubclass(adapter, Adapter):
        return adapter(model)
    if adapter == "auto":
        for candidate in ADAPTERS:
            if candidate.matches(model):
                return candidate(model)
        return GenericAdapter(model)
    names = _names()
    if isinstance(adapter, str) and adapter in names:
        return names[adapter](model)
    known = ["auto", *names]
    raise UnknownNameError(f"unknown adapter {adapter!r}; known: {', '.join(known)}.{did_you_mean(adapter, known)}")
