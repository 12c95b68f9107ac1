"""repsim-plugin: compare neural network representations, and audit how far the comparison can be trusted.

``import repsim_plugin`` never imports transformers or timm; the heavier submodules (stats, adversarial, testing,
the adapters' model families) load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import errors, measures

# the packages ``capture`` and ``compare`` are named after their main function, which is what ``rp.capture`` /
# ``rp.compare`` are (a package attribute is set to a submodule only when the submodule is first loaded, here)
from .capture import capture
from .compare import checkpoint_trajectory, compare, compare_checkpoints, release_memory
from .errors import RepsimError
from .results import SimilarityMap
from .trajectory import Trajectory

__version__ = "0.1.0"

# name -> (module, attribute or None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "testing": ("repsim_plugin.testing", None),
    "streaming": ("repsim_plugin.streaming", None),
    "stats": ("repsim_plugin.stats", None),
    "adversarial": ("repsim_plugin.adversarial", None),
    "adapters": ("repsim_plugin.adapters", None),
}

__all__ = [
    "RepsimError",
    "SimilarityMap",
    "Trajectory",
    "capture",
    "checkpoint_trajectory",
    "compare",
    "compare_checkpoints",
    "errors",
    "measures",
    "release_memory",
    "similarity",
    *_LAZY,
]

if TYPE_CHECKING:  # pragma: no cover
    import torch


def similarity(X: Any, Y: Any, measure: str | measures.Measure = "cka", **params: Any) -> float:
    """Similarity of two (n_samples, n_features) representations as a Python float.

    ``measure`` is an id, an alias or a :class:`~repsim_plugin.measures.Measure`; ``params`` go to ``make``.
    """
    value: torch.Tensor = measures.make(measure, **params)(X, Y)
    return float(value.detach())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attribute is None else getattr(module, attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'repsim_plugin' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
