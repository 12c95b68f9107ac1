"""Adapter for any ``torch.nn.Module``: the user names the layers (default: the model's direct children)."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from .base import Adapter


class GenericAdapter(Adapter):
    """Any ``nn.Module``. Default layers are the direct children, in definition order; outputs of rank 3 are
    read as (batch, tokens, channels) and rank 4 as NCHW unless capture is told another layout."""

    name: ClassVar[str] = "generic"
    priority: ClassVar[int] = -1000  # matches anything, so it is tried last

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, nn.Module)
