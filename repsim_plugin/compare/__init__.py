"""Compare the layers of two models, or of several checkpoints, on the same data: layer x layer similarity maps.

``plan`` chooses the estimator from what the measure declares, ``engine`` makes the one pass over the data,
``api`` holds the public functions.
"""

from __future__ import annotations

from .api import COMPARE_PARAMS, checkpoint_trajectory, compare, compare_checkpoints, load_checkpoint, release_memory
from .plan import DEFAULT_MEMORY_BUDGET, ESTIMATOR_CHOICES, Plan, choose_estimator, parse_bytes

__all__ = [
    "COMPARE_PARAMS",
    "DEFAULT_MEMORY_BUDGET",
    "ESTIMATOR_CHOICES",
    "Plan",
    "checkpoint_trajectory",
    "choose_estimator",
    "compare",
    "compare_checkpoints",
    "load_checkpoint",
    "parse_bytes",
    "release_memory",
]
