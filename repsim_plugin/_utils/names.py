"""Layer names: the one parser of ``name#k`` (the k-th call of a module that runs several times per forward)."""

from __future__ import annotations


def split_call(name: str) -> tuple[str, int | None]:
    """``"encoder.layer.0#2"`` -> ``("encoder.layer.0", 2)``; a name without a ``#k`` suffix -> ``(name, None)``."""
    base, sep, index = name.rpartition("#")
    if sep and index.isdigit() and base:
        return base, int(index)
    return name, None


def module_of(layer_name: str) -> str:
    """The module name a captured layer name comes from (its ``#k`` call suffix dropped)."""
    return split_call(layer_name)[0]
