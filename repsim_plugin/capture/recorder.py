"""The recorder: hooks that turn each forward of a model into per-layer (b, d) rows.

``capture(model, layers, ...)`` returns a :class:`Recorder`, a context manager. Inside its block every call of
the top-level model is one *forward*: the requested layers' outputs are selected (``output``), reduced to
(batch, features) rows by a named policy (``tokens`` for (batch, tokens, channels) outputs, ``spatial`` for
NCHW / NHWC maps) and, once the forward completes, checked (each layer fired the expected number of times)
and handed to ``on_batch`` and / or kept for :attr:`Recorder.activations`.

Guarantees: hooks are removed on exit and on any exception, and only the hooks this recorder registered (other
code's hooks, such as the ones transformers 5 uses for ``output_hidden_states``, are left alone); every
module's train / eval flag and the grad mode are restored; forwards run in eval mode under ``no_grad`` unless
``grad=True``, which keeps the autograd graph through the rows. Rows are what each module returned: a view of a
module's output is copied in the hook, before the rest of the forward can write into it in place (with
``grad=True`` the live tensor is kept and such a write is warned about).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from repsim_plugin._utils.batches import TrainFlags
from repsim_plugin._utils.checks import (
    AnyOf,
    Callable_,
    Choice,
    Device,
    Instance,
    Int,
    Optional,
    Table,
    check_params,
)
from repsim_plugin.adapters import LAYOUTS, Adapter, for_model
from repsim_plugin.errors import RepsimError, StateError

from . import _owners
from ._hooks import ForwardHooks
from .layers import LayerCalls, LayerSpec, resolve_layers
from .outputs import LayoutOption, OutputSelector, describe_selector
from .policies import SPATIAL_POLICIES, TOKEN_POLICIES, rows_unit

__all__ = ["CAPTURE_PARAMS", "Recorder", "capture"]


#: The constraints of :func:`capture` / :class:`Recorder` parameters (``grad``, ``keep`` and ``eval_mode`` are
#: read as truth values; ``adapter`` is checked by :func:`repsim_plugin.adapters.for_model`).
CAPTURE_PARAMS: Table = {
    "model": Instance(nn.Module, "a torch.nn.Module"),
    "tokens": Choice(TOKEN_POLICIES),
    "spatial": Choice(SPATIAL_POLICIES),
    "output": Optional(
        AnyOf((Instance((int, str), "an int or a str"), Callable_()), what="an int, a str or a callable")
    ),
    "attention_mask": Optional(Instance(torch.Tensor, "a tensor")),
    "on_batch": Optional(Callable_()),
    "expected_calls": Optional(
        AnyOf(
            (Int(minimum=1), Instance(Mapping, "a mapping")),
            what="a positive int or a mapping of module name to a positive int",
        )
    ),
    "device": Optional(Device()),
    "layout": LayoutOption(),
}


class Recorder(ForwardHooks):
    """Records layer outputs of ``model`` while active (see :func:`capture` for the arguments).

    Attributes after at least one forward:
        layers: layer names in model order; a module that runs k > 1 times per forward gives ``name#0`` ...
            ``name#{k-1}`` (before the first forward: the resolved module names).
        activations: ``{layer: (n, d) tensor}``, rows of every forward concatenated (needs ``keep=True``).
        last_batch: ``{layer: (b, d) tensor}`` of the most recent forward.
        policy: plain dict of the reduction policy (tokens, spatial, per-layer layout, prefix tokens, row unit,
            output selection, adapter), to record with results.
        num_forwards, num_inputs, num_rows: forwards completed, inputs seen, rows per layer.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec | Sequence[LayerSpec] | None = None,
        *,
        tokens: str = "mean",
        spatial: str = "flatten",
        output: OutputSelector = None,
        grad: bool = False,
        adapter: str | Adapter | type[Adapter] = "auto",
        attention_mask: torch.Tensor | None = None,
        on_batch: Callable[[dict[str, torch.Tensor]], Any] | None = None,
        keep: bool = True,
        expected_calls: int | Mapping[str, int] | None = None,
        device: torch.device | str | None = None,
        layout: str | Mapping[str, str] | None = None,
        eval_mode: bool = True,
    ) -> None:
        check_params(
            CAPTURE_PARAMS,
            model=model,
            tokens=tokens,
            spatial=spatial,
            output=output,
            attention_mask=attention_mask,
            on_batch=on_batch,
            expected_calls=expected_calls,
            device=device,
            layout=layout,
        )
        if not keep and on_batch is None:
            raise RepsimError("keep=False stores nothing, so it needs on_batch= to receive each batch's rows")
        self.model = model
        self.adapter = for_model(model, adapter)
        self.tokens = tokens
        self.spatial = spatial
        self.output = output
        self.grad = bool(grad)
        self.on_batch = on_batch
        self.keep = bool(keep)
        self.device = torch.device(device) if device is not None else None
        self.eval_mode = bool(eval_mode)
        self._explicit_mask = attention_mask
        self._layout_override = layout
        self._calls = LayerCalls(resolve_layers(model, layers, self.adapter), expected_calls)
        #: resolved module names, in model order (one per module, without #k suffixes)
        self.modules: list[str] = self._calls.modules
        # what one row is, per layout (read now, so that the policy stays readable if a policy is unregistered)
        self._row_units = {layout: rows_unit(layout, tokens, spatial) for layout in LAYOUTS}
        self._init_state()

    def _init_state(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._saved_training: TrainFlags | None = None
        self._saved_grad: bool | None = None
        self._init_recording()

    # -- lifecycle ---------------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self) -> Recorder:
        """Register hooks, switch to eval mode and set the grad mode (what ``with`` does on entry)."""
        if self.active:
            raise StateError("this capture is already active; a Recorder can be entered once at a time")
        _owners.claim(self.model)
        self._saved_training = TrainFlags(self.model)
        self._saved_grad = torch.is_grad_enabled()
        self._thread = threading.get_ident()
        try:
            top = self.model
            self._handles.append(top.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            for name in self.modules:
                module = self.model.get_submodule(name)
                self._handles.append(module.register_forward_hook(self._layer_hook(name)))
            self._handles.append(top.register_forward_hook(self._post_hook))
            self._handles.append(top.register_forward_hook(self._cleanup_hook, always_call=True))
            if self.eval_mode and not self._saved_training.all_eval:  # already in eval: nothing to switch
                self.model.eval()
            torch.set_grad_enabled(self.grad)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Remove this recorder's hooks and restore every module's train / eval flag and the grad mode.

        Every step runs even when one is interrupted (a Ctrl-C in a notebook, an exception from a handle): the
        first error is raised again at the end, after the hooks are gone and the flags and grad mode restored.
        """
        was_started = self._thread is not None
        self._thread = None  # from here on, any hook still registered does nothing
        handles, self._handles = self._handles, []
        error: BaseException | None = None
        for handle in reversed(handles):
            try:
                handle.remove()
            except BaseException as exc:
                error = error or exc
                with contextlib.suppress(Exception):
                    handle.remove()  # idempotent: the interrupted removal is finished
        try:
            saved, self._saved_training = self._saved_training, None
            if saved is not None:
                saved.restore()
            if self._saved_grad is not None:
                torch.set_grad_enabled(self._saved_grad)
                self._saved_grad = None
            self._depth = 0
            self._pending = None
        finally:
            if was_started:
                _owners.release(self.model)
        if error is not None:
            raise error

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def forward(self, batch: Any) -> Any:
        """Run one data-loader batch through the model via the adapter (labels dropped); returns the output."""
        if not self.active:
            raise StateError("rec.forward(batch) records only inside the `with rp.capture(...)` block")
        inputs, _ = self.adapter.split_batch(batch)
        return self.adapter.forward(inputs)

    def clear(self) -> None:
        """Drop the stored rows (hooks, layer names and policy stay): for loops that reuse one capture."""
        self._store = {}
        self._cache = None
        self.num_rows = {}
        self.num_inputs = 0

    # -- results -----------------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Layer names in model order (known before any forward only when expected_calls covers every module)."""
        return self._calls.layers

    @property
    def activations(self) -> dict[str, torch.Tensor]:
        if not self.keep:
            raise StateError("this capture was made with keep=False: its rows went to on_batch and were not kept")
        if self.num_forwards == 0:
            raise StateError(
                "no forward pass of the captured model has completed; call the model (or rec.forward(batch)) "
                "inside the `with rp.capture(...)` block"
            )
        if self._cache is None:
            self._cache = {
                name: torch.cat(self._store[name]) if len(self._store.get(name, [])) > 1 else self._store[name][0]
                for name in self.layers
                if self._store.get(name)
            }
        return dict(self._cache)

    @property
    def policy(self) -> dict[str, Any]:
        layouts: dict[str, str | None] = {}
        prefix: dict[str, int] = {}
        rows: dict[str, str] = {}
        for layer_name, module_name, _ in self._calls.names:
            layout = self._layouts.get(module_name)
            layouts[layer_name] = layout
            if layout == "NLC":
                prefix[layer_name] = self._prefix.get(module_name, 0)
            rows[layer_name] = self._row_units.get(layout, "input") if layout is not None else "input"
        return {
            "tokens": self.tokens,
            "spatial": self.spatial,
            "layout": layouts,
            "prefix_tokens": prefix,
            "rows": rows,
            "output": describe_selector(self.output),
            "adapter": self.adapter.name,
        }

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        name = type(self.model).__name__
        return f"Recorder({name}, {len(self.layers)} layers, {self.num_forwards} forwards, {state})"


def capture(
    model: nn.Module,
    layers: LayerSpec | Sequence[LayerSpec] | None = None,
    *,
    tokens: str = "mean",
    spatial: str = "flatten",
    output: OutputSelector = None,
    grad: bool = False,
    adapter: str | Adapter | type[Adapter] = "auto",
    attention_mask: torch.Tensor | None = None,
    on_batch: Callable[[dict[str, torch.Tensor]], Any] | None = None,
    keep: bool = True,
    expected_calls: int | Mapping[str, int] | None = None,
    device: torch.device | str | None = None,
    layout: str | Mapping[str, str] | None = None,
    eval_mode: bool = True,
) -> Recorder:
    """Record what ``layers`` of ``model`` compute while the returned :class:`Recorder` is active::

        with rp.capture(model, ["encoder.layer.*"], tokens="mean") as rec:
            model(**batch)
        rec.activations  # {"encoder.layer.0": (n, d), ...}

    Args:
        layers: names, globs (``*`` one dotted segment, ``**`` any number), ints (indices into the adapter's
            default layers), module objects, ``name#k`` for the k-th call; None: the adapter's default layers.
        tokens: reduction of (batch, tokens, channels) outputs, one of :data:`TOKEN_POLICIES`.
        spatial: reduction of NCHW / NHWC maps, one of :data:`SPATIAL_POLICIES`.
        output: which part of a module's output to record (see :func:`select_output`).
        grad: keep the autograd graph (forwards run with grad enabled, rows not detached).
        adapter: "auto", "huggingface", "timm", "generic", or an Adapter class / instance.
        attention_mask: (batch, tokens) padding mask used for every forward; by default the mask is read from
            each call of the model (its ``attention_mask`` argument).
        on_batch: called with ``{layer: (b, d) rows}`` after every completed forward of the model (streaming).
        keep: store rows for :attr:`Recorder.activations`; ``False`` (with ``on_batch``) keeps memory flat.
        expected_calls: how many times each module runs per forward (int, or mapping by module name); by
            default the first forward sets the count and later forwards must match it.
        device: move rows there (e.g. "cpu"); None leaves them where the layer produced them.
        layout: force a layout ("NLC", "NCHW", "NHWC") for all layers or per layer / module name.
        eval_mode: put the model in eval mode while capturing (previous per-module flags restored on exit).
    """
    return Recorder(
        model,
        layers,
        tokens=tokens,
        spatial=spatial,
        output=output,
        grad=grad,
        adapter=adapter,
        attention_mask=attention_mask,
        on_batch=on_batch,
        keep=keep,
        expected_calls=expected_calls,
        device=device,
        layout=layout,
        eval_mode=eval_mode,
    )
