"""Capture what chosen layers of a model compute, as (n, d) rows per layer.

``capture(model, layers, ...)`` returns a :class:`Recorder`, a context manager. Inside its block every call of
the top-level model is one *forward*: the requested layers' outputs are selected (``output``), reduced to
(batch, features) rows by a named policy (``tokens`` for (batch, tokens, channels) outputs, ``spatial`` for
NCHW / NHWC maps) and, once the forward completes, checked (each layer fired the expected number of times)
and handed to ``on_batch`` and / or kept for :attr:`Recorder.activations`.

Guarantees: hooks are removed on exit and on any exception, and only the hooks this recorder registered (other
code's hooks, such as the ones transformers 5 uses for ``output_hidden_states``, are left alone); every
module's train / eval flag and the grad mode are restored; forwards run in eval mode under ``no_grad`` unless
``grad=True``, which keeps the autograd graph through the rows.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from repsim_plugin.adapters import LAYOUTS, Adapter, for_model
from repsim_plugin.errors import (
    DegenerateInputError,
    InputDtypeError,
    InputShapeError,
    RepsimError,
    UnknownNameError,
)

__all__ = [
    "SPATIAL_POLICIES",
    "TOKEN_POLICIES",
    "LayerFiringError",
    "Recorder",
    "capture",
    "reduce_output",
    "resolve_layers",
    "select_output",
]

#: Reductions of (batch, tokens, channels) outputs. ``mean``: average of the real (unpadded, non-prefix) tokens;
#: ``cls``: the first real token; ``last``: the last real token (right or left padding); ``flatten``: all
#: non-prefix tokens concatenated (needs unpadded, equal-length sequences); ``as_samples``: every real
#: non-prefix token is a row.
TOKEN_POLICIES: tuple[str, ...] = ("mean", "cls", "last", "flatten", "as_samples")

#: Reductions of spatial maps. ``flatten``: C*H*W features in NCHW order (channels-last maps are converted first,
#: so equal features give equal columns); ``mean``: global average pool to C; ``as_samples``: every position
#: is a row of C features.
SPATIAL_POLICIES: tuple[str, ...] = ("flatten", "mean", "as_samples")

_RANK: dict[str, int] = {"NLC": 3, "NCHW": 4, "NHWC": 4}

OutputSelector = int | str | Callable[[Any], torch.Tensor] | None
LayerSpec = str | int | nn.Module


class LayerFiringError(RepsimError):
    """A requested layer never ran during a forward pass, or ran a different number of times than expected."""


# ----------------------------------------------------------------------------------------------------------------
# layer selection
# ----------------------------------------------------------------------------------------------------------------
def _match_segments(pattern: Sequence[str], name: Sequence[str]) -> bool:
    if not pattern:
        return not name
    head = pattern[0]
    if head == "**":
        # a trailing ** needs at least one segment ("encoder.**" is what lies below encoder, not encoder itself)
        first = 1 if len(pattern) == 1 else 0
        return any(_match_segments(pattern[1:], name[k:]) for k in range(first, len(name) + 1))
    return bool(name) and fnmatch.fnmatchcase(name[0], head) and _match_segments(pattern[1:], name[1:])


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.5)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


def _split_call(spec: str) -> tuple[str, int | None]:
    base, sep, index = spec.rpartition("#")
    if sep and index.isdigit() and base:
        return base, int(index)
    return spec, None


def resolve_layers(
    model: nn.Module, layers: LayerSpec | Sequence[LayerSpec] | None, adapter: Adapter | None = None
) -> dict[str, set[int] | None]:
    """Resolve layer specs to module names in model order, each with the call indices asked for (None = all).

    Specs: a dotted name (``"encoder.layer.3"``), a glob (``*`` matches one dotted segment, ``**`` any number;
    a trailing ``**`` at least one), an ``int`` indexing the adapter's *default layers* (``-1`` is the last
    block), a module object, and any name or glob followed by ``#k`` to keep only the k-th call of a module run
    several times per forward. ``None`` means the adapter's default layers.
    """
    adapter = adapter or for_model(model)
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        canonical.setdefault(id(module), name)
        aliases[name] = canonical[id(module)]
    order = {name: i for i, (name, _) in enumerate(model.named_modules()) if name}

    if layers is None:
        specs: list[Any] = list(adapter.default_layers())
    elif isinstance(layers, str | int | nn.Module):
        specs = [layers]
    else:
        specs = list(layers)
    if not specs:
        raise UnknownNameError("no layers to capture: pass layer names, globs, indices or modules (or None)")

    requests: dict[str, set[int] | None] = {}

    def request(name: str, call: int | None) -> None:
        if call is None:
            requests[name] = None
        elif name not in requests:
            requests[name] = {call}
        elif requests[name] is not None:
            requests[name].add(call)  # type: ignore[union-attr]

    for spec in specs:
        if isinstance(spec, bool) or not isinstance(spec, str | int | nn.Module):
            raise UnknownNameError(
                f"a layer must be a name, glob, int or nn.Module, got {type(spec).__name__} ({spec!r})"
            )
        if isinstance(spec, nn.Module):
            name = canonical.get(id(spec))
            if name is None:
                raise UnknownNameError(
                    f"the {type(spec).__name__} module passed as a layer is not part of {type(model).__name__}; "
                    "pass a submodule of the captured model"
                )
            if not name:
                raise UnknownNameError(
                    "the model itself cannot be a captured layer; capture its output head by name (e.g. 'fc', "
                    "'classifier', 'lm_head') or use the value the model returns"
                )
            request(name, None)
            continue
        if isinstance(spec, int):
            defaults = adapter.default_layers()
            if not -len(defaults) <= spec < len(defaults):
                raise UnknownNameError(
                    f"layer index {spec} is out of range: an int indexes the {len(defaults)} default layers of "
                    f"{type(model).__name__} ({defaults[0]!r} ... {defaults[-1]!r})"
                )
            spec = defaults[spec]
        base, call = _split_call(spec)
        if _is_glob(base):
            pattern = base.split(".")
            matches = [name for name in order if _match_segments(pattern, name.split("."))]
            if not matches:
                raise UnknownNameError(
                    f"layer pattern {spec!r} matches no module of {type(model).__name__} "
                    f"('*' matches one dotted segment, '**' any number).{_suggest(base, order)}"
                )
            for name in matches:
                request(name, call)
        elif aliases.get(base):
            request(aliases[base], call)
        else:
            raise UnknownNameError(f"{type(model).__name__} has no module named {spec!r}.{_suggest(base, order)}")
    return {name: requests[name] for name in sorted(requests, key=order.__getitem__)}


# ----------------------------------------------------------------------------------------------------------------
# output selection and reduction (pure functions, also usable without hooks)
# ----------------------------------------------------------------------------------------------------------------
def _describe_selector(selector: OutputSelector) -> Any:
    if selector is None or isinstance(selector, int | str):
        return selector
    return getattr(selector, "__qualname__", None) or repr(selector)


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
        if isinstance(output, Mapping):
            value = next((v for v in output.values() if isinstance(v, torch.Tensor)), None)
        elif isinstance(output, tuple | list):
            value = output[0] if output else None
        else:
            value = output
    elif isinstance(selector, int) and not isinstance(selector, bool):
        items = output.to_tuple() if hasattr(output, "to_tuple") else output
        if not isinstance(items, tuple | list):
            raise RepsimError(
                f"output={selector} indexes a tuple, but {where} returned {type(output).__name__}; use output=None"
            )
        if not -len(items) <= selector < len(items):
            raise RepsimError(f"output={selector} is out of range: {where} returned {len(items)} elements")
        value = items[selector]
    elif isinstance(selector, str):
        if isinstance(output, Mapping) and selector in output:
            value = output[selector]
        elif not isinstance(output, Mapping) and hasattr(output, selector):
            value = getattr(output, selector)
        else:
            keys = list(output.keys()) if isinstance(output, Mapping) else []
            raise UnknownNameError(
                f"{where} returned {type(output).__name__} without a field {selector!r}"
                f"{f' (fields: {keys})' if keys else ''}.{_suggest(selector, keys)}"
            )
    else:
        raise RepsimError(f"output must be None, an int, a str or a callable, got {type(selector).__name__}")
    if not isinstance(value, torch.Tensor):
        raise RepsimError(
            f"{where} gave {type(value).__name__}, not a tensor, for output={_describe_selector(selector)!r}; "
            "choose the element with output=<index>, output='<field>' or a callable"
        )
    return value


def _infer_layout(tensor: torch.Tensor, hint: str | None, spatial_layout: str, forced: bool, layer: str) -> str | None:
    if hint is not None and hint not in LAYOUTS:
        raise UnknownNameError(f"unknown layout {hint!r} for layer {layer!r}; known: {', '.join(LAYOUTS)}")
    if hint is not None and _RANK[hint] == tensor.dim():
        return hint
    if forced and hint is not None:
        raise InputShapeError(
            f"layer {layer!r} was given layout {hint!r} (rank {_RANK[hint]}) but its output has shape "
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


def _token_positions(real: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    body = real.clone()
    body[:, : min(prefix_tokens, body.shape[1])] = False
    return body


def reduce_output(
    tensor: torch.Tensor,
    layout: str | None,
    *,
    tokens: str = "mean",
    spatial: str = "flatten",
    mask: torch.Tensor | None = None,
    prefix_tokens: int = 0,
    layer: str = "",
) -> torch.Tensor:
    """Reduce one layer output to rows of features (see :data:`TOKEN_POLICIES` and :data:`SPATIAL_POLICIES`).

    ``layout`` None means the tensor is already (batch, features). ``mask`` is a (batch, tokens) padding mask
    (nonzero = real token) used by the token policies; ``prefix_tokens`` leading tokens (CLS, registers) are left
    out of ``mean``, ``flatten`` and ``as_samples``. float16 / bfloat16 are upcast to float32 before any sum.
    """
    where = f"layer {layer!r}" if layer else "the output"
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise InputDtypeError(
            f"{where} has dtype {tensor.dtype}; only floating-point activations can be compared — select a float "
            "output with output=..."
        )
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    if layout is None:
        if tensor.dim() != 2:
            raise InputShapeError(f"{where} has shape {tuple(tensor.shape)}; layout None needs (batch, features)")
        return tensor
    if layout not in _RANK:
        raise UnknownNameError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if tensor.dim() != _RANK[layout]:
        raise InputShapeError(f"{where} has shape {tuple(tensor.shape)}, which is not {layout}")

    if layout == "NLC":
        if tokens not in TOKEN_POLICIES:
            raise UnknownNameError(f"unknown tokens policy {tokens!r}; known: {', '.join(TOKEN_POLICIES)}")
        batch, length, _ = tensor.shape
        if mask is None:
            real = torch.ones(batch, length, dtype=torch.bool, device=tensor.device)
        else:
            if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] != length:
                raise InputShapeError(
                    f"{where} has {batch} sequences of {length} tokens but the attention mask has shape "
                    f"{tuple(mask.shape)}; pass attention_mask= with shape (batch, tokens) for this layer, or "
                    "capture layers that see the masked sequence"
                )
            real = mask.to(device=tensor.device) != 0
        if tokens in ("cls", "last"):
            has_real = real.any(dim=1)
            if not bool(has_real.all()):
                empty = torch.nonzero(~has_real).flatten().tolist()
                raise DegenerateInputError(f"{where}: sequences {empty} have no real token (all padding)")
            positions = torch.arange(length, device=tensor.device)
            if tokens == "cls":
                index = torch.where(real, positions, length).amin(dim=1)
            else:
                index = torch.where(real, positions, -1).amax(dim=1)
            return tensor[torch.arange(batch, device=tensor.device), index]
        body = _token_positions(real, prefix_tokens)
        if tokens == "flatten":
            if not bool(real.all()):
                raise InputShapeError(
                    f"tokens='flatten' needs sequences of equal length, but {where} has padded positions; use "
                    "tokens='mean', 'last' or 'as_samples', or batch sequences of one length without padding"
                )
            return tensor[:, prefix_tokens:].reshape(batch, -1)
        if tokens == "as_samples":
            return tensor[body]
        counts = body.sum(dim=1)
        if not bool((counts > 0).all()):
            empty = torch.nonzero(counts == 0).flatten().tolist()
            raise DegenerateInputError(
                f"{where}: sequences {empty} have no real token after {prefix_tokens} prefix tokens, so their "
                "mean is undefined; drop empty inputs or use tokens='cls'"
            )
        summed = torch.where(body.unsqueeze(-1), tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))
        return summed.sum(dim=1) / counts.unsqueeze(-1).to(tensor.dtype)

    if spatial not in SPATIAL_POLICIES:
        raise UnknownNameError(f"unknown spatial policy {spatial!r}; known: {', '.join(SPATIAL_POLICIES)}")
    if layout == "NHWC":
        tensor = tensor.permute(0, 3, 1, 2)
    if spatial == "flatten":
        return tensor.reshape(tensor.shape[0], -1)
    if spatial == "mean":
        return tensor.mean(dim=(2, 3))
    return tensor.permute(0, 2, 3, 1).reshape(-1, tensor.shape[1])


# ----------------------------------------------------------------------------------------------------------------
# the recorder
# ----------------------------------------------------------------------------------------------------------------
def _in_backward() -> bool:
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # pragma: no cover - very old torch
        return False


class Recorder:
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
        if not isinstance(model, nn.Module):
            raise RepsimError(f"capture needs a torch.nn.Module, got {type(model).__name__}")
        if tokens not in TOKEN_POLICIES:
            raise UnknownNameError(
                f"unknown tokens policy {tokens!r}; known: {', '.join(TOKEN_POLICIES)}."
                f"{_suggest(tokens, TOKEN_POLICIES)}"
            )
        if spatial not in SPATIAL_POLICIES:
            raise UnknownNameError(
                f"unknown spatial policy {spatial!r}; known: {', '.join(SPATIAL_POLICIES)}."
                f"{_suggest(spatial, SPATIAL_POLICIES)}"
            )
        if on_batch is not None and not callable(on_batch):
            raise RepsimError(f"on_batch must be callable, got {type(on_batch).__name__}")
        if not keep and on_batch is None:
            raise RepsimError("keep=False stores nothing, so it needs on_batch= to receive each batch's rows")
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            raise RepsimError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
        if isinstance(layout, str) and layout not in LAYOUTS:
            raise UnknownNameError(
                f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}.{_suggest(layout, LAYOUTS)}"
            )

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
        self._requests = resolve_layers(model, layers, self.adapter)
        #: resolved module names, in model order (one per module, without #k suffixes)
        self.modules: list[str] = list(self._requests)
        self._expected = self._check_expected(expected_calls)

        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._saved_training: list[tuple[nn.Module, bool]] = []
        self._saved_grad: bool | None = None
        self._signature: inspect.Signature | bool | None = False  # False: not looked up yet
        # per-forward state
        self._depth = 0
        self._pending: dict[str, list[torch.Tensor | None]] | None = None
        self._inputs: dict[str, Any] = {}
        self._batch_size: int | None = None
        # across forwards
        self._counts: dict[str, int] | None = None
        self._names: list[tuple[str, str, int]] = []  # (layer name, module name, call index)
        self._layouts: dict[str, str | None] = {}
        self._prefix: dict[str, int] = {}
        self._feature_shape: dict[str, tuple[int, ...]] = {}
        self._store: dict[str, list[torch.Tensor]] = {}
        self._cache: dict[str, torch.Tensor] | None = None
        self.last_batch: dict[str, torch.Tensor] = {}
        self.num_forwards = 0
        self.num_inputs = 0
        self.num_rows: dict[str, int] = {}

    # -- configuration helpers -------------------------------------------------------------------------------
    def _check_expected(self, expected: int | Mapping[str, int] | None) -> dict[str, int]:
        if expected is None:
            return {}
        if isinstance(expected, int) and not isinstance(expected, bool):
            values = dict.fromkeys(self.modules, expected)
        elif isinstance(expected, Mapping):
            unknown = [name for name in expected if name not in self._requests]
            if unknown:
                raise UnknownNameError(
                    f"expected_calls names {unknown}, which are not captured modules; captured: {self.modules}"
                    f"{_suggest(unknown[0], self.modules)}"
                )
            values = dict(expected)
        else:
            raise RepsimError(f"expected_calls must be an int or a mapping of module name to int, not {expected!r}")
        for name, value in values.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RepsimError(f"expected_calls for {name!r} must be a positive int, got {value!r}")
        return values

    def _layout_hint(self, module_name: str, layer_name: str) -> tuple[str | None, bool]:
        override = self._layout_override
        if isinstance(override, str):
            return override, True
        if isinstance(override, Mapping):
            for key in (layer_name, module_name):
                if key in override:
                    return override[key], True
        return self.adapter.layout(module_name), False

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

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        self._pending = {name: [] for name in self.modules}
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
        if self._depth == 1:
            self._finish_forward()

    def _cleanup_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        # always called, also when forward (or one of the hooks) raised: then the partial batch is dropped
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            self._pending = None
            self._inputs = {}

    def _layer_hook(self, module_name: str) -> Callable[[nn.Module, Any, Any], None]:
        wanted = self._requests[module_name]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
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
        layer_name = f"{module_name}#{call}"
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
            hint, forced = self._layout_hint(module_name, layer_name)
            layout = _infer_layout(tensor, hint, self.adapter.spatial_layout, forced, module_name)
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
        return rows

    def _layer_names(self, counts: Mapping[str, int]) -> list[tuple[str, str, int]]:
        """(layer name, module name, call index) in model order; ``name#k`` for modules run several times."""
        names = []
        for name in self.modules:
            wanted = self._requests[name]
            calls = sorted(wanted) if wanted is not None else list(range(counts[name]))
            single = wanted is None and counts[name] == 1
            names.extend((name if single else f"{name}#{k}", name, k) for k in calls)
        return names

    def _finish_forward(self) -> None:
        pending = self._pending
        assert pending is not None
        counts = {name: len(calls) for name, calls in pending.items()}
        problems = []
        for name, count in counts.items():
            expected = self._expected.get(name, self._counts[name] if self._counts is not None else None)
            wanted = self._requests[name]
            if count == 0:
                problems.append(f"{name!r} never ran")
            elif expected is not None and count != expected:
                origin = "expected_calls" if name in self._expected else "the first forward"
                problems.append(f"{name!r} ran {count} times, but {origin} says {expected}")
            elif wanted is not None and max(wanted) >= count:
                problems.append(f"{name!r} ran {count} times, so call #{max(wanted)} does not exist")
        if problems:
            raise LayerFiringError(
                "captured layers did not run as expected in this forward pass: "
                + "; ".join(problems)
                + ". Check the layer names and the inputs (a branch not taken, an early exit), or pass "
                "expected_calls= for modules that run several times per forward."
            )
        if self._counts is None:
            self._counts = counts
            self._names = self._layer_names(counts)
        batch: dict[str, torch.Tensor] = {}
        for layer_name, module_name, call in self._names:
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

    # -- lifecycle ---------------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self) -> Recorder:
        """Register hooks, switch to eval mode and set the grad mode (what ``with`` does on entry)."""
        if self.active:
            raise RepsimError("this capture is already active; a Recorder can be entered once at a time")
        self._saved_training = [(module, module.training) for module in self.model.modules()]
        self._saved_grad = torch.is_grad_enabled()
        try:
            top = self.model
            self._handles.append(top.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            for name in self.modules:
                module = self.model.get_submodule(name)
                self._handles.append(module.register_forward_hook(self._layer_hook(name)))
            self._handles.append(top.register_forward_hook(self._post_hook))
            self._handles.append(top.register_forward_hook(self._cleanup_hook, always_call=True))
            if self.eval_mode:
                self.model.eval()
            torch.set_grad_enabled(self.grad)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Remove this recorder's hooks and restore every module's train / eval flag and the grad mode."""
        handles, self._handles = self._handles, []
        for handle in reversed(handles):
            handle.remove()
        for module, training in self._saved_training:
            module.training = training
        self._saved_training = []
        if self._saved_grad is not None:
            torch.set_grad_enabled(self._saved_grad)
            self._saved_grad = None
        self._depth = 0
        self._pending = None

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def forward(self, batch: Any) -> Any:
        """Run one data-loader batch through the model via the adapter (labels dropped); returns the output."""
        if not self.active:
            raise RepsimError("rec.forward(batch) records only inside the `with rp.capture(...)` block")
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
        if self._counts is None:
            if len(self._expected) == len(self.modules):
                return [layer_name for layer_name, _, _ in self._layer_names(self._expected)]
            return list(self.modules)
        return [layer_name for layer_name, _, _ in self._names]

    @property
    def activations(self) -> dict[str, torch.Tensor]:
        if not self.keep:
            raise RepsimError("this capture was made with keep=False: its rows went to on_batch and were not kept")
        if self.num_forwards == 0:
            raise RepsimError(
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
        for layer_name, module_name, _ in self._names:
            layout = self._layouts.get(module_name)
            layouts[layer_name] = layout
            if layout == "NLC":
                prefix[layer_name] = self._prefix.get(module_name, 0)
                rows[layer_name] = "token" if self.tokens == "as_samples" else "input"
            elif layout in ("NCHW", "NHWC"):
                rows[layer_name] = "position" if self.spatial == "as_samples" else "input"
            else:
                rows[layer_name] = "input"
        return {
            "tokens": self.tokens,
            "spatial": self.spatial,
            "layout": layouts,
            "prefix_tokens": prefix,
            "rows": rows,
            "output": _describe_selector(self.output),
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
