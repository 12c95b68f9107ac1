"""Similarity measures behind one interface: ``make(id_or_alias, **params)(X, Y) -> 0-d tensor``.

Importing this package registers the built-in measures: every module of this folder is imported, so a new family
is one new file that calls ``register`` / ``register_family`` (machinery lives in ``registry``, ``kernels``,
``linalg``-style modules, which register nothing). Third-party measures come from the entry-point group
``repsim_plugin.measures`` on first use.
"""

from __future__ import annotations

import importlib
import pkgutil

from .registry import (
    ENTRY_POINT_GROUP,
    INVARIANCES,
    Estimator,
    Measure,
    Spec,
    aliases,
    list_measures,
    load_plugins,
    make,
    register,
    register_family,
    unregister,
)
from .table import measures_table_markdown

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

#: ``rp.measures.list("cka*")``: canonical ids matching a glob (the public name of :func:`list_measures`).
list = list_measures

__all__ = [
    "ENTRY_POINT_GROUP",
    "INVARIANCES",
    "Estimator",
    "Measure",
    "Spec",
    "aliases",
    "list",
    "list_measures",
    "load_plugins",
    "make",
    "measures_table_markdown",
    "register",
    "register_family",
    "unregister",
]
