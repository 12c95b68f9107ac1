"""What a hooked module's output is: the tensor to record from it (``output=``) and that tensor's layout.

A module may return a tensor, a tuple, a dict or a HuggingFace ``ModelOutput``; :func:`select_output` picks the
tensor, :func:`layout_of` says whether it is (batch, features), (batch, tokens, channels) or a spatial map, from
``layout=``, the adapter's hint or the rank. :mod:`.policies` then reduces it to rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from repsim_plugin._utils.checks import Choice, Constraint
from repsim_plugin._utils.suggest import did_you_mean
from repsim_plugin.adapters import LAYOUTS, Adapter
from repsim_plugin.errors import InputShapeError, RepsimError, UnknownNameError

__all__ = ["RANK", "LayoutOption", "OutputSelector", "describe_selector", "infer_layout", "layout_of", "select_output"]

OutputSelector = int | str | Callable[[Any], torch.Tensor] | None

#: Rank of the tensor each layout describes.
RANK: dict[str, int] = {"NLC": 3, "NCHW": 4, "NHWC": 4}


# ----------------------------------------------------------------------------------------------------------------
# output selection
# ----------------------------------------------------------------------------------------------------------------
def describe_selector(selector: OutputSelector) -> Any:
    """A JSON-able description of an ``output=`` selector (callables by qualified name)."""
    if selector is None or isinstance(selector, int | str):
        return selector
    return getattr(selector, "__qualname__", None) or repr(selector)


def _by_index(output: Any, selector: int, where: str) -> Any:
    items = output.to_tuple() if hasattr(output, "to_tuple") else output
    if not isinstance(items, tuple | list):
        raise RepsimError(
            f"output={selector} indexes a tuple, but {where} returned {type(output).__name__}; use output=None"
        )
    if not -len(items) <= selector < len(items):
        raise RepsimError(f"output={selector} is out of range: {where} returned {len(items)} elements")
    return items[selector]


def _by_field(output: Any, selector: str, where: str) -> Any:
    if isinstance(output, Mapping) and selector in output:
        return output[selector]
    if not isinstance(output, Mapping) and hasattr(output, selector):
        return getattr(output, selector)
    keys = list(output.keys()) if isinstance(output, Mapping) else []
    raise UnknownNameError(
        f"{where} returned {type(output).__name__} without a field {selector!r}"
        f"{f' (fields: {keys})' if keys else ''}.{did_you_mean(selector, keys)}"
    )


def _first(output: Any) -> Any:
    if isinstance(output, Mapping):
        return next((v for v in output.values() if isinstance(v, torch.Tensor)), None)
    if isinstance(output, tuple | list):
        return output[0] if output else None
    return output


def select_output(output: Any, selector: OutputSelector = None, layer: str = "") -> torch.Tensor:
    """The tensor to record from a module's output.

    ``None``: a tensor itself, element 0 of a tuple / list, the first tensor field of a dict or ``ModelOutput``
    (so HuggingFace blocks work whether they return a tensor or a tuple); an ``int``: that element (of
    ``ModelOutput.to_tuple()`` for model outputs); a ``str``: that key or attribute; a callable: its result.
    """
    where = f"layer {layer!r}" if layer else "the module"
    if callable(selector) and not isinstance(selector, str):
        value = selector(output)
    elif selector is None:
        value = _first(output)
    elif isinstance(selector, int) and not isinstance(selector, bool):
        value = _by_index(output, selector, where)
    elif isinstance(selector, str):
        value = _by_field(output, selector, where)
    else:
        raise RepsimError(f"output must be None, an int, a str or a callable, got {type(selector).__name__}")
    if not isinstance(value, torch.Tensor):
        raise RepsimError(
            f"{where} gave {type(value).__name__}, not a tensor, for output={describe_selector(selector)!r}; "
            "choose the element with output=<index>, output='<field>' or a callable"
        )
    return value


# ----------------------------------------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------------------------------------
def infer_layout(tensor: torch.Tensor, hint: str | None, spatial_layout: str, forced: bool, layer: str) -> str | None:
    """The layout of one output: the hint when its rank fits, else by rank (2: none, 3: NLC, 4: spatial)."""
    if hint is not None and hint not in LAYOUTS:
        raise UnknownNameError(f"unknown layout {hint!r} for layer {layer!r}; known: {', '.join(LAYOUTS)}")
    if hint is not None and RANK[hint] == tensor.dim():
        return hint
    if forced and hint is not None:
        raise InputShapeError(
            f"layer {layer!r} was given layout {hint!r} (rank {RANK[hint]}) but its output has shape "
            f"{tuple(tensor.shape)}; give a layout of rank {tensor.dim()} or select another output"
        )
    if tensor.dim() == 2:
        return None
    if tensor.dim() == 3:
        return "NLC"
    if tensor.dim() == 4:
        return spatial_layout
    raise InputShapeError(
        f"layer {layer!r} output has shape {tuple(tensor.shape)}: rank {tensor.dim()} has no reduction (rank 2 is "
        "(batch, features), 3 is (batch, tokens, channels), 4 is NCHW / NHWC); select or reshape it with "
        "output=<callable>"
    )


@dataclass(frozen=True)
class LayoutOption(Constraint):
    """``layout=``: None, one of :data:`LAYOUTS` for every layer, or a mapping of layer / module name to one
    (the mapping's values are checked when their layer first fires, as a per-layer hint)."""

    def describe(self) -> str:
        return f"None, one of {', '.join(map(repr, LAYOUTS))} or a mapping of layer name to layout"

    def accepts(self, value: Any) -> bool:
        return value is None or isinstance(value, Mapping) or (isinstance(value, str) and value in LAYOUTS)

    def error(self, name: str, value: Any) -> RepsimError:
        if isinstance(value, str):  # an unknown layout name: the choice's message, with suggestions
            return Choice(LAYOUTS).error(name, value)
        return super().error(name, value)

    def bad_values(self) -> list[Any]:
        return ["NCWH", 3]


def layout_of(
    tensor: torch.Tensor,
    override: str | Mapping[str, str] | None,
    adapter: Adapter,
    module_name: str,
    layer_name: str,
) -> str | None:
    """The layout of one layer output: ``layout=`` when given (for all layers, or by layer / module name: then
    its rank must fit), else the adapter's hint when its rank fits, else inferred from the rank."""
    if isinstance(override, str):
        return infer_layout(tensor, override, adapter.spatial_layout, True, module_name)
    if isinstance(override, Mapping):
        for key in (layer_name, module_name):
            if key in override:
                return infer_layout(tensor, override[key], adapter.spatial_layout, True, module_name)
    return infer_layout(tensor, adapter.layout(module_name), adapter.spatial_layout, False, module_name)
