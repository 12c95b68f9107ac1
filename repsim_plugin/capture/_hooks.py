"""The hooks a :class:`~repsim_plugin.capture.Recorder` registers, and what they do in one forward.

:class:`ForwardHooks` is the Recorder's base: a pre-hook on the top-level model starts a forward (binds its
arguments, reads the batch size), a hook on each requested module turns that call's output into (b, d) rows by the
output selection and the layout's reduction policy, and the post-hook checks the call counts and feature sizes,
then hands the batch to ``on_batch`` and / or stores it. A cleanup hook, called also when the forward raised, drops
a partial batch. The hooks act only for the thread that started the recorder (see :mod:`.recorder` for the
lifecycle: registering, removing and the restored flags).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from repsim_plugin._utils.warnings import warn
from repsim_plugin.adapters import Adapter
from repsim_plugin.errors import InputShapeError, LayerFiringError, RepsimWarning

from .layers import LayerCalls
from .outputs import OutputSelector, layout_of, select_output
from .policies import reduce_output

__all__ = ["ForwardHooks"]


def _in_backward() -> bool:
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # pragma: no cover - very old torch
        return False


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` is (a view of) ``b``'s memory: an in-place write to ``b`` would change ``a``."""
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class ForwardHooks:
    """The hook methods of :class:`~repsim_plugin.capture.Recorder` and the state they keep, per forward and across
    forwards (the Recorder sets the configuration declared below and calls :meth:`_init_recording`)."""

    # configuration, set by the Recorder
    model: nn.Module
    adapter: Adapter
    tokens: str
    spatial: str
    output: OutputSelector
    grad: bool
    on_batch: Callable[[dict[str, torch.Tensor]], Any] | None
    keep: bool
    device: torch.device | None
    modules: list[str]
    _calls: LayerCalls
    _explicit_mask: torch.Tensor | None
    _layout_override: str | Mapping[str, str] | None

    def _init_recording(self) -> None:
        #: set while started; hooks left behind by an interrupted stop() do nothing once it is cleared
        self._thread: int | None = None
        self._signature: inspect.Signature | bool | None = False  # False: not looked up yet
        # per-forward state
        self._depth = 0
        self._pending: dict[str, list[torch.Tensor | None]] | None = None
        #: (module, rows, version) of rows kept as live views of a module's output (grad=True)
        self._live: list[tuple[str, torch.Tensor, int]] = []
        self._inputs: dict[str, Any] = {}
        self._batch_size: int | None = None
        # across forwards
        self._layouts: dict[str, str | None] = {}
        self._prefix: dict[str, int] = {}
        self._feature_shape: dict[str, tuple[int, ...]] = {}
        self._store: dict[str, list[torch.Tensor]] = {}
        self._cache: dict[str, torch.Tensor] | None = None
        self.last_batch: dict[str, torch.Tensor] = {}
        self.num_forwards = 0
        self.num_inputs = 0
        self.num_rows: dict[str, int] = {}

    # -- hooks -----------------------------------------------------------------------------------------------
    def _bound_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The model call's arguments by parameter name (positional ones bound through the forward signature)."""
        if not args:
            return dict(kwargs)
        if self._signature is False:
            try:
                self._signature = inspect.signature(self.model.forward)
            except (TypeError, ValueError):
                self._signature = None
        if isinstance(self._signature, inspect.Signature):
            try:
                return dict(self._signature.bind_partial(*args, **kwargs).arguments)
            except TypeError:
                pass
        return {**{f"__arg{i}": value for i, value in enumerate(args)}, **kwargs}

    def _mine(self) -> bool:
        """Hooks act only while this recorder is active and only for the thread that started it."""
        return self._thread == threading.get_ident()

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._mine():
            return
        self._depth += 1
        if self._depth > 1:
            return
        self._pending = {name: [] for name in self.modules}
        self._live = []
        self._inputs = self._bound_inputs(args, kwargs)
        batch_size = self.adapter.batch_size(self._inputs)
        if batch_size is None:
            batch_size = self.adapter.batch_size(list(args))
        self._batch_size = batch_size

    def _mask_for(self, module_name: str) -> torch.Tensor | None:
        if self._explicit_mask is not None:
            return self._explicit_mask
        return self.adapter.attention_mask_for(module_name, self._inputs)

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._mine() and self._depth == 1:
            self._finish_forward()

    def _cleanup_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        # always called, also when forward (or one of the hooks) raised: then the partial batch is dropped
        if not self._mine():
            return
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            self._pending = None
            self._inputs = {}
            self._live = []

    def _layer_hook(self, module_name: str) -> Callable[[nn.Module, Any, Any], None]:
        wanted = self._calls.requests[module_name]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._mine():
                return
            if self._pending is None:
                if _in_backward():
                    return  # activation checkpointing recomputes blocks during backward: not a new forward
                raise LayerFiringError(
                    f"layer {module_name!r} ran outside a call of the captured {type(self.model).__name__}; "
                    "call the model passed to capture (or rec.forward(batch)), not one of its submodules"
                )
            calls = self._pending[module_name]
            call = len(calls)
            if wanted is not None and call not in wanted:
                calls.append(None)
                return
            calls.append(self._record(module_name, call, output))

        return hook

    def _record(self, module_name: str, call: int, output: Any) -> torch.Tensor:
        tensor = select_output(output, self.output, module_name)
        if self._batch_size is not None and (tensor.dim() == 0 or tensor.shape[0] != self._batch_size):
            raise InputShapeError(
                f"layer {module_name!r} output has shape {tuple(tensor.shape)} for a batch of {self._batch_size} "
                "inputs: its first dimension is not the batch (windowed or sequence-first outputs); capture another "
                "layer or reshape it with output=<callable>"
            )
        if module_name in self._layouts:
            layout = self._layouts[module_name]
        else:
            layout = layout_of(tensor, self._layout_override, self.adapter, module_name, f"{module_name}#{call}")
        prefix = self.adapter.prefix_tokens(module_name) if layout == "NLC" else 0
        rows = reduce_output(
            tensor,
            layout,
            tokens=self.tokens,
            spatial=self.spatial,
            mask=self._mask_for(module_name) if layout == "NLC" else None,
            prefix_tokens=prefix,
            layer=module_name,
        )
        self._layouts.setdefault(module_name, layout)
        self._prefix.setdefault(module_name, prefix)
        if not self.grad:
            rows = rows.detach()
        if self.device is not None:
            rows = rows.to(self.device)
        if _shares_memory(rows, tensor):
            # a view of the module's output: copied now, before the rest of the forward can write into it in place
            # (torchvision's ResNet runs ReLU(inplace=True) on bn1's output); with grad the live tensor is kept
            # (gradients flow to it) and an in-place write is reported at the end of the forward
            if not self.grad:
                return rows.clone()
            if not rows.is_inference():  # inference tensors have no version counter
                self._live.append((module_name, rows, rows._version))
        return rows

    # -- one completed forward -------------------------------------------------------------------------------
    def _batch_rows(self, pending: Mapping[str, list[torch.Tensor | None]]) -> dict[str, torch.Tensor]:
        """``{layer name: rows}`` of this forward, checking that every layer keeps its feature count."""
        batch: dict[str, torch.Tensor] = {}
        for layer_name, module_name, call in self._calls.names:
            rows = pending[module_name][call]
            assert rows is not None
            shape = tuple(rows.shape[1:])
            if self._feature_shape.setdefault(layer_name, shape) != shape:
                raise InputShapeError(
                    f"layer {layer_name!r} gave {shape[0] if shape else 0} features in this forward but "
                    f"{self._feature_shape[layer_name][0]} before (sequences or images of another size?); use "
                    "tokens='mean' / spatial='mean', or keep input sizes equal across batches"
                )
            batch[layer_name] = rows
        return batch

    def _finish_forward(self) -> None:
        pending = self._pending
        assert pending is not None
        written = sorted({name for name, rows, version in self._live if rows._version != version})
        if written:
            warn(
                f"the output of {', '.join(repr(n) for n in written)} was written in place later in the forward "
                "(an inplace=True activation or +=), so with grad=True its rows hold the later values: capture the "
                "module that writes into it, make that module out-of-place, or capture without grad",
                RepsimWarning,
            )
        self._calls.check({name: len(calls) for name, calls in pending.items()})
        batch = self._batch_rows(pending)
        if self.on_batch is not None:
            self.on_batch(batch)
        if self.keep:
            for layer_name, rows in batch.items():
                self._store.setdefault(layer_name, []).append(rows)
            self._cache = None
        for layer_name, rows in batch.items():
            self.num_rows[layer_name] = self.num_rows.get(layer_name, 0) + int(rows.shape[0])
        self.last_batch = batch
        self.num_forwards += 1
        self.num_inputs += int(self._batch_size) if self._batch_size is not None else 0
