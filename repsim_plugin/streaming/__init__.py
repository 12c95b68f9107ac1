"""Streaming accumulators for CKA: exact linear CKA from float64 statistics, sample-space and minibatch CKA, kept rows.

Every accumulator has the same life cycle: ``update`` with batches of rows, ``merge`` accumulators that saw other
rows, ``all_reduce`` across ``torch.distributed`` ranks, ``compute``, ``reset``, ``state_dict`` /
``load_state_dict``, ``to``; each declares its state once and the rest is derived (:mod:`.base`). Inputs are
validated like the one-shot measures (any float dtype, torch or numpy) and upcast to float64 *before* any sum;
autograd is not tracked (statistics are detached).

- **Exact linear CKA** (:class:`LinearCKA`, :class:`LinearCKAMap`): float64 moments around a running center
  (:mod:`._moments`), exact for any batch size and order, even for float32 activations with a large offset.
- **Sample space** (:class:`SampleSpaceCKAMap`): keeps the rows and forms (n, n) Grams at the end, for small n and
  huge d.
- **Minibatch CKA** (:class:`MinibatchCKA`, :class:`MinibatchCKAMap`; Nguyen, Raghu & Kornblith 2021): summed
  unbiased HSICs of each batch, any kernel; its own estimator, not full-data CKA.
- **Kept rows** (:class:`KeptRowsMap`): any measure on the kept rows (the "captured" estimator of ``rp.compare``).
- :class:`TorchmetricsLinearCKA` (created on first use): exact linear CKA as a ``torchmetrics.Metric``.
"""

from __future__ import annotations

from typing import Any

from .base import STATE_VERSION, Accumulator, MapAccumulator
from .kept import KeptRowsMap
from .linear import LinearCKA, LinearCKAMap
from .minibatch import MinibatchCKA, MinibatchCKAMap
from .sample_space import SampleSpaceCKAMap

__all__ = [
    "STATE_VERSION",
    "Accumulator",
    "KeptRowsMap",
    "LinearCKA",
    "LinearCKAMap",
    "MapAccumulator",
    "MinibatchCKA",
    "MinibatchCKAMap",
    "SampleSpaceCKAMap",
    "TorchmetricsLinearCKA",
]


def __getattr__(name: str) -> Any:
    if name == "TorchmetricsLinearCKA":
        try:
            from .torchmetrics import TorchmetricsLinearCKA
        except ModuleNotFoundError as err:
            if err.name is None or not err.name.startswith("torchmetrics"):
                raise
            raise ModuleNotFoundError(
                "TorchmetricsLinearCKA needs torchmetrics: pip install torchmetrics (or use streaming.LinearCKA)."
            ) from err
        globals()[name] = TorchmetricsLinearCKA
        return TorchmetricsLinearCKA
    raise AttributeError(f"module 'repsim_plugin.streaming' has no attribute {name!r}")
