"""captum's ``(forward_func, layer)`` convention, resolved for :mod:`repsim_plugin.captum`: the layer module objects
inside ``forward_func`` (a model, or a plain function wrapped so that its layers can be hooked) and their (n, d) rows
when it runs on batch-first inputs plus ``additional_forward_args`` (each layer's output through
:func:`repsim_plugin.capture`, or its input through a pre-hook removed on every path).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .capture import capture, reduce_output
from .capture.outputs import infer_layout
from .errors import RepsimError

__all__ = ["CaptumLayers", "as_tuple"]


def as_tuple(value: Any) -> tuple[Any, ...]:
    """captum's "a tensor or a tuple of tensors" (and None: nothing) as a tuple."""
    if value is None:
        return ()
    return value if isinstance(value, tuple) else (value,)


def _layers(layer: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    layers = [layer] if isinstance(layer, nn.Module) else list(layer)
    if not layers or not all(isinstance(m, nn.Module) for m in layers):
        raise RepsimError("layer must be a module or a non-empty list of modules (captum's convention: the objects).")
    return layers


class _Call(nn.Module):
    """A module whose forward is ``forward_func``, holding the layers so that the capture can hook them when
    ``forward_func`` is a plain function (the layers' own modules are not changed)."""

    def __init__(self, forward_func: Callable[..., Any], layers: list[nn.Module]) -> None:
        super().__init__()
        self.fn = forward_func
        self.held = nn.ModuleList(layers)

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


class CaptumLayers:
    """Rows of captum-style ``layer`` modules when ``forward_func(*inputs, *additional_forward_args)`` runs."""

    def __init__(self, forward_func: Callable[..., Any], layer: Any, capture_options: dict[str, Any]) -> None:
        if not callable(forward_func):
            raise RepsimError(f"forward_func must be a model or a callable, got {type(forward_func).__name__}.")
        self.forward_func = forward_func
        self.modules = _layers(layer)
        self.root: nn.Module = (
            forward_func if isinstance(forward_func, nn.Module) else _Call(forward_func, self.modules)
        )
        owned = {id(m): name for name, m in self.root.named_modules()}
        missing = [type(m).__name__ for m in self.modules if id(m) not in owned]
        if missing:
            raise RepsimError(
                f"layer(s) {missing} are not submodules of the forward_func model; pass modules of that model."
            )
        #: module names inside ``root`` (the capture's keys) and the names shown in results
        self.keys = [owned[id(m)] for m in self.modules]
        if isinstance(forward_func, nn.Module):
            self.names = [key or type(forward_func).__name__ for key in self.keys]
        else:
            self.names = [f"{type(m).__name__}_{i}" for i, m in enumerate(self.modules)]
        self.capture_options = capture_options

    def run(
        self, inputs: Any, additional_forward_args: Any, *, grad: bool = False, layer_input: bool = False
    ) -> tuple[dict[str, torch.Tensor], Any]:
        """``({layer name: (n, d) rows}, forward output)``; rows keep autograd when ``grad``."""
        args = (*as_tuple(inputs), *as_tuple(additional_forward_args))
        if not layer_input:
            with capture(self.root, self.modules, grad=grad, **self.capture_options) as rec:
                out = self.root(*args)
            found = rec.activations
            repeated = [key for key in self.keys if key not in found]
            if repeated:
                raise RepsimError(
                    f"layer(s) {repeated} ran more than once per forward; compare them with rp.compare (name#k)."
                )
            return {name: found[key] for name, key in zip(self.names, self.keys, strict=True)}, out
        return self._inputs_of_layers(args, grad)

    def _inputs_of_layers(self, args: tuple[Any, ...], grad: bool) -> tuple[dict[str, torch.Tensor], Any]:
        seen: dict[str, torch.Tensor] = {}

        def keep(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
            def hook(module: nn.Module, hook_args: tuple[Any, ...]) -> None:
                if name in seen:
                    raise RepsimError(f"layer {name!r} ran more than once per forward; its input is ambiguous.")
                if not hook_args or not isinstance(hook_args[0], torch.Tensor):
                    raise RepsimError(f"layer {name!r} received no tensor as its first input.")
                seen[name] = hook_args[0]

            return hook

        handles = [m.register_forward_pre_hook(keep(n)) for n, m in zip(self.names, self.modules, strict=True)]
        try:
            with torch.set_grad_enabled(grad or torch.is_grad_enabled()):
                out = self.root(*args)
        finally:
            for handle in handles:
                handle.remove()
        tokens = self.capture_options.get("tokens", "mean")
        spatial = self.capture_options.get("spatial", "flatten")
        rows = {}
        for name in self.names:
            if name not in seen:
                raise RepsimError(f"layer {name!r} never ran during forward_func; pass a layer the forward uses.")
            t = seen[name] if grad else seen[name].detach()
            layout = infer_layout(t, None, "NCHW", False, name)
            rows[name] = reduce_output(t, layout, tokens=tokens, spatial=spatial, layer=name)
        return rows, out
