"""torch.distributed helpers shared by the accumulators and the comparison engine."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import StateError


def dist() -> Any:
    return torch.distributed


def initialized() -> bool:
    d = torch.distributed
    return bool(d.is_available() and d.is_initialized())


def active(group: Any = None) -> bool:
    """True when a process group with more than one rank is initialized."""
    return initialized() and torch.distributed.get_world_size(group) > 1


def world_size() -> int:
    return torch.distributed.get_world_size() if initialized() else 1


def require(what: str) -> Any:
    """``torch.distributed``, or a clear error naming ``what`` needed it."""
    if not initialized():
        raise StateError(
            f"{what} needs an initialized torch.distributed process group; call "
            "torch.distributed.init_process_group(...) first (torchrun does it for you), or use compute(sync=False) "
            "for the local statistics."
        )
    return torch.distributed


def comm_device(group: Any, state_device: torch.device | None) -> torch.device:
    """Where tensors for a collective must live: the state's device, else the backend's default."""
    if state_device is not None:
        return state_device
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_count(n: int, device: torch.device | None = None) -> int:
    """Samples over all ranks (each rank saw its own shard); ``n`` when not distributed."""
    if world_size() == 1:
        return n
    total = torch.tensor([n], dtype=torch.int64, device=comm_device(None, device))
    torch.distributed.all_reduce(total)
    return int(total.item())
