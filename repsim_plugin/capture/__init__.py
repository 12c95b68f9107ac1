"""Capture what chosen layers of a model compute, as (n, d) rows per layer.

``layers`` holds the selection grammar (names, globs, ints, modules, ``name#k``), ``policies`` the output
selection and the token / spatial reductions (a registry: ``@token_policy("name")`` adds one), ``recorder`` the
:class:`Recorder` and :func:`capture`, whose hooks turn every forward into per-batch (b, d) rows.
"""

from __future__ import annotations

from repsim_plugin.errors import LayerFiringError

from .layers import LayerSpec, resolve_layers
from .policies import (
    SPATIAL_POLICIES,
    TOKEN_POLICIES,
    OutputSelector,
    SpatialBatch,
    TokenBatch,
    reduce_output,
    select_output,
    spatial_policy,
    token_policy,
)
from .recorder import CAPTURE_PARAMS, Recorder, capture

__all__ = [
    "CAPTURE_PARAMS",
    "SPATIAL_POLICIES",
    "TOKEN_POLICIES",
    "LayerFiringError",
    "LayerSpec",
    "OutputSelector",
    "Recorder",
    "SpatialBatch",
    "TokenBatch",
    "capture",
    "reduce_output",
    "resolve_layers",
    "select_output",
    "spatial_policy",
    "token_policy",
]
