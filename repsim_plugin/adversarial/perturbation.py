"""The representation-level variant of the shift: a learnable low-rank affine edit of one layer's output.

``mode="perturbation"`` freezes the network and inserts ``h -> h + h U V^T + b`` on the layer's output with a
forward hook, under the same output-preservation penalty. It answers "how far can this layer's representation be
moved, as a function of itself, without changing what the rest of the network computes from it?".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._utils.batches import model_device, to_device
from ..adapters import Adapter
from ..errors import RepsimError

__all__ = ["LowRankAffine", "attach_perturbation", "perturbation_hook"]


class LowRankAffine(nn.Module):
    """``h -> h + (h U) V^T + b`` along the feature axis: a learnable edit of a layer's output.

    Starts as the identity (``U = 0``, ``b = 0``, ``V`` random), so the optimisation starts from the original
    representation. ``rank`` bounds how many directions the edit can mix; the bias translates every sample.
    """

    def __init__(self, features: int, rank: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if features < 1 or rank < 1:
            raise RepsimError(f"LowRankAffine needs features >= 1 and rank >= 1, got {features} and {rank}.")
        self.U = nn.Parameter(torch.zeros(features, rank))
        self.V = nn.Parameter(torch.randn(features, rank, generator=generator) / math.sqrt(features))
        self.b = nn.Parameter(torch.zeros(features))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        U, V, b = self.U.to(h.dtype), self.V.to(h.dtype), self.b.to(h.dtype)
        return h + (h @ U) @ V.T + b


def _feature_axis(tensor: torch.Tensor, layout: str | None) -> int:
    if tensor.dim() == 4 and layout != "NHWC":
        return 1
    return tensor.dim() - 1


def perturbation_hook(perturbation: nn.Module, layout: str | None, layer: str) -> Callable[..., Any]:
    """A forward hook that applies ``perturbation`` along the feature axis of the layer's (first) output."""

    def apply(tensor: torch.Tensor) -> torch.Tensor:
        axis = _feature_axis(tensor, layout)
        moved = tensor.movedim(axis, -1)
        return perturbation(moved).movedim(-1, axis)

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return apply(output)
        if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
            return type(output)([apply(output[0]), *output[1:]])
        raise RepsimError(
            f"layer {layer!r} returns a {type(output).__name__}; the perturbation edits a tensor output (or the "
            "first element of a tuple). Perturb another layer, or use mode='finetune'."
        )

    return hook


@torch.no_grad()
def _sample_output(model: nn.Module, adapter: Adapter, module: nn.Module, sample_inputs: Any) -> Any:
    """What ``module`` outputs (its first element for a tuple) on a forward pass of ``sample_inputs``."""
    seen: dict[str, Any] = {}

    def grab(mod: nn.Module, args: Any, out: Any) -> None:
        seen["out"] = out[0] if isinstance(out, tuple | list) and out else out

    handle = module.register_forward_hook(grab)
    try:
        adapter.forward(to_device(sample_inputs, model_device(model)))
    finally:
        handle.remove()
    return seen.get("out")


@torch.no_grad()
def attach_perturbation(
    model: nn.Module, adapter: Adapter, layer: str, sample_inputs: Any, rank: int, seed: int
) -> tuple[LowRankAffine, torch.utils.hooks.RemovableHandle, str | None]:
    """Insert a fresh :class:`LowRankAffine` on ``layer``'s output with a forward hook that runs before any
    other hook of the layer (so captures see the edited output); returns it, the hook handle and the layout."""
    module = model.get_submodule(layer)
    sample = _sample_output(model, adapter, module, sample_inputs)
    if not isinstance(sample, torch.Tensor) or not sample.is_floating_point() or sample.dim() < 2:
        raise RepsimError(
            f"layer {layer!r} does not return a floating-point (batch, ...) tensor; mode='perturbation' cannot "
            "edit it. Pick another layer, or use mode='finetune'."
        )
    layout = adapter.layout(layer)
    if sample.dim() == 4 and layout not in ("NCHW", "NHWC"):
        layout = adapter.spatial_layout
    generator = torch.Generator().manual_seed(seed)
    features = int(sample.shape[_feature_axis(sample, layout)])
    perturbation = LowRankAffine(features, rank, generator).to(device=sample.device)
    handle = module.register_forward_hook(perturbation_hook(perturbation, layout, layer), prepend=True)
    return perturbation, handle, layout
