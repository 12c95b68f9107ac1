"""The checks of an accumulator's state: a saved state's header and values, the ranks' agreement before a reduction.

A state dict names the accumulator class that saved it (``kind``) and its format (:data:`STATE_VERSION`):
:func:`check_header` refuses any other, and :func:`check_value` / :func:`check_sample_count` refuse loaded values
that no ``update`` can have produced (a negative count, NaN), so a corrupt state is refused at load instead of
giving NaN later. :func:`agree` is the tiny all-reduce that makes every rank raise the same error when a rank holds
no data or the ranks disagree on the layout, instead of hanging in the reduction that follows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from .._utils import dist
from ..errors import RepsimError

__all__ = ["STATE_VERSION", "agree", "check_header", "check_sample_count", "check_value"]

STATE_VERSION = 1


def agree(fingerprint: str | None, group: Any, device: torch.device, what: str) -> None:
    """One tiny all-reduce: every rank learns whether all ranks hold data and agree on the layout."""
    d = dist.dist()
    h = 0 if fingerprint is None else int.from_bytes(hashlib.sha256(fingerprint.encode()).digest()[:7], "big")
    t = torch.tensor([h, -h, int(fingerprint is None)], dtype=torch.int64, device=device)
    d.all_reduce(t, op=d.ReduceOp.MAX, group=group)
    if int(t[2]) > 0:
        raise RepsimError(
            f"{what}.all_reduce: at least one rank has not received any batch, so its layers and feature "
            "dimensions are unknown. Give every rank at least one batch (e.g. DistributedSampler with "
            "drop_last=False), or merge the shards some other way."
        )
    if int(t[0]) != -int(t[1]):
        raise RepsimError(
            f"{what}.all_reduce: the ranks disagree on the layers, feature dimensions or estimator settings. "
            "Every rank must capture the same layers with the same reductions and the same accumulator options."
        )


def check_header(state: Any, kind: str) -> None:
    """A state dict saved by the accumulator class ``kind`` in this state version."""
    if not isinstance(state, Mapping):
        raise RepsimError(f"a state dict must be a dict, got {type(state).__name__}.")
    if state.get("kind") != kind:
        raise RepsimError(
            f"this state dict was saved from {state.get('kind')!r}, not {kind!r}; load it into the "
            "accumulator class that saved it."
        )
    if state.get("version") != STATE_VERSION:
        raise RepsimError(
            f"state dict version {state.get('version')!r} is not supported (this is version {STATE_VERSION})."
        )


def check_value(key: str, value: Any, *, count: bool) -> None:
    """Raise ``ValueError`` unless the loaded state ``key`` is a non-negative int (``count``) or finite tensors."""
    if count:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key!r} must be a non-negative int, got {value!r}")
        return
    for t in _state_tensors(value):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{key!r} must hold tensors, got {type(t).__name__}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{key!r} holds NaN or Inf")


def check_sample_count(n: Any) -> None:
    """Raise ``ValueError`` unless the loaded sample count ``n`` is a non-negative int."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"the sample count must be a non-negative int, got {n!r}")


def _state_tensors(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _state_tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _state_tensors(v)]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return []
    moments = getattr(value, "t", None)  # the exact linear-CKA moments hold their tensors in .t
    return list(moments.values()) if isinstance(moments, Mapping) else [value]
