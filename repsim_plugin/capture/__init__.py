"""Capture what chosen layers of a model compute, as (n, d) rows per layer.

``layers`` holds the selection grammar (names, globs, ints, modules, ``name#k``), ``outputs`` the output
selection (``output=``) and layout inference, ``policies`` the token / spatial reductions (a registry:
``@token_policy("name")`` adds one), ``recorder`` the :class:`Recorder` and :func:`capture`, whose hooks turn every
forward into per-batch (b, d) rows.
"""

from __future__ import annotations

from repsim_plugin.errors import LayerFiringError

from .layers import LayerSpec, resolve_layers
from .outputs import OutputSelector, select_output
from .policies import (
    SPATIAL_POLICIES,
    TOKEN_POLICIES,
    SpatialBatch,
    TokenBatch,
    reduce_output,
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
