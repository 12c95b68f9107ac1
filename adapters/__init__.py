"""Model-family adapters: ``for_model(model)`` picks the one that understands a model.

Families are detected from the module names of the model's classes, so importing this package never imports
transformers or timm.
"""

from __future__ import annotations

import difflib

from torch import nn

from repsim_plugin.errors import RepsimError, UnknownNameError

from .base import LAYOUTS, Adapter
from .generic import GenericAdapter
from .huggingface import HuggingFaceAdapter
from .timm import TimmAdapter

__all__ = [
    "ADAPTERS",
    "LAYOUTS",
    "Adapter",
    "GenericAdapter",
    "HuggingFaceAdapter",
    "TimmAdapter",
    "for_model",
    "register",
]

#: Adapters tried in order by ``for_model(adapter="auto")``; the generic one matches anything, so it is last.
ADAPTERS: list[type[Adapter]] = [HuggingFaceAdapter, TimmAdapter, GenericAdapter]

_ALIASES: dict[str, type[Adapter]] = {
    "huggingface": HuggingFaceAdapter,
    "hf": HuggingFaceAdapter,
    "transformers": HuggingFaceAdapter,
    "timm": TimmAdapter,
    "generic": GenericAdapter,
}


def register(adapter_class: type[Adapter], *, name: str | None = None) -> type[Adapter]:
    """Add a third-party adapter, tried before the built-in ones; usable as a class decorator."""
    ADAPTERS.insert(0, adapter_class)
    _ALIASES[name or adapter_class.name] = adapter_class
    return adapter_class


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
    if isinstance(adapter, str) and adapter in _ALIASES:
        return _ALIASES[adapter](model)
    known = ["auto", *_ALIASES]
    close = difflib.get_close_matches(str(adapter), known, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise UnknownNameError(f"unknown adapter {adapter!r}; known: {', '.join(known)}.{hint}")
