"""Similarity measures behind one interface: ``make(id_or_alias, **params)(X, Y) -> 0-d tensor``.

Importing this package registers the built-in measures; third-party ones come from the entry-point group
``repsim_plugin.measures`` on first use.
"""

from __future__ import annotations

from . import cca, cka, kernels, neighbors, procrustes, regression, rsa  # noqa: F401  (registers the built-in measures)
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
