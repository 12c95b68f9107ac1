"""The adapter interface: what capture and compare need to know about a model family.

An adapter names a model's layers (``default_layers``), says how their outputs are laid out (``layout``,
``prefix_tokens``), feeds it batches (``split_batch`` then ``forward``), finds the padding mask of a batch
(``attention_mask``), picks the output that output-preservation losses compare (``main_output``) and identifies
the weights (``fingerprint``). Subclasses override what their family does differently; nothing here imports
transformers or timm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from repsim_plugin.errors import ModelForwardError, RepsimError


def describe_inputs(inputs: Any) -> str:
    """Shapes and dtypes of a batch's inputs, for messages."""
    if isinstance(inputs, torch.Tensor):
        return f"of shape {tuple(inputs.shape)} and dtype {str(inputs.dtype).replace('torch.', '')}"
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe_inputs(v)}" for k, v in inputs.items()) + "}"
    return type(inputs).__name__


def check_keywords(model: nn.Module, inputs: Mapping[str, Any]) -> None:
    """A dict batch whose keys ``model.forward`` does not take is a clear error (not a ``TypeError`` mid-run)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): let the call decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in inputs if k not in params]
    if unknown:
        raise RepsimError(
            f"the batch has key(s) {unknown} that {type(model).__name__}.forward does not take (it takes "
            f"{list(params)}); drop them from the batches (labels / sample ids go under a 'labels' key)."
        )


#: Layouts a layer output can have. "NLC": (batch, tokens, channels); "NCHW" / "NHWC": spatial maps.
LAYOUTS: tuple[str, ...] = ("NLC", "NCHW", "NHWC")

#: Input keys whose first dimension is the batch, checked in this order by ``Adapter.batch_size``.
BATCH_KEYS: tuple[str, ...] = (
    "input_ids",
    "inputs_embeds",
    "pixel_values",
    "input_values",
    "input_features",
    "attention_mask",
    "x",
    "input",
)

#: Batch dict keys that hold targets, not model inputs.
LABEL_KEYS: tuple[str, ...] = ("labels", "label")


def class_modules(model: nn.Module) -> list[str]:
    """Module names of the model's class and its base classes (how families are detected without importing them)."""
    return [getattr(cls, "__module__", "") or "" for cls in type(model).__mro__]


class Adapter:
    """Base adapter; also the behaviour of any ``nn.Module`` (see :class:`~.generic.GenericAdapter`).

    A model family is one module of the adapters package defining one subclass that declares its own ``name``
    (and, if wanted, ``aliases`` and ``priority``): the package finds it there, nothing else is edited.

    Attributes:
        model: the wrapped model (never modified).
        name: short family name recorded in results; also accepted as ``adapter=`` by capture and compare.
        aliases: other names accepted as ``adapter=`` (e.g. "hf" for "huggingface").
        priority: detection order of the built-in adapters, highest first (the generic adapter, which matches
            anything, has the lowest); third-party adapters added with ``register`` are tried before all of them.
        num_prefix_tokens: leading non-patch tokens (CLS, distillation, registers) in token outputs; 0 when none.
        spatial_layout: layout of 4-d outputs when a layer gives no hint ("NCHW" unless the family is channels-last).
    """

    name: ClassVar[str] = "base"
    aliases: ClassVar[tuple[str, ...]] = ()
    priority: ClassVar[int] = 0
    num_prefix_tokens: int = 0
    spatial_layout: str = "NCHW"

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise RepsimError(f"expected a torch.nn.Module, got {type(model).__name__}; pass the model itself")
        self.model = model

    # -- detection -------------------------------------------------------------------------------------------
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter understands ``model`` (checked by :func:`repsim_plugin.adapters.for_model`)."""
        return False

    # -- layers ----------------------------------------------------------------------------------------------
    def default_layers(self) -> list[str]:
        """Layer names captured when the user names none, in model order."""
        names = [name for name, _ in self.model.named_children()]
        if not names:
            raise RepsimError(
                f"{type(self.model).__name__} has no submodules to capture by default; name the layers explicitly"
            )
        return names

    def layout(self, layer_name: str) -> str | None:
        """Layout hint of a layer's output: "NLC", "NCHW", "NHWC", or None to infer it from the tensor's rank.

        The hint is used when its rank matches the output (3 for NLC, 4 for the spatial layouts); otherwise
        capture infers: rank 2 is already (batch, features), rank 3 is NLC, rank 4 is ``spatial_layout``.
        """
        return None

    def prefix_tokens(self, layer_name: str) -> int:
        """Number of leading prefix tokens in this layer's token output (``num_prefix_tokens`` by default)."""
        return self.num_prefix_tokens

    # -- data ------------------------------------------------------------------------------------------------
    def split_batch(self, batch: Any) -> tuple[Any, Any | None]:
        """Split a data-loader batch into (model inputs, labels or None).

        A tensor is all inputs; a 2-sequence is (inputs, labels); a 1-sequence is (inputs,); a mapping loses
        its "labels" / "label" keys, which become the labels.
        """
        if isinstance(batch, torch.Tensor):
            return batch, None
        if isinstance(batch, Mapping):
            inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
            labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
            return inputs, labels
        if isinstance(batch, Sequence) and not isinstance(batch, str):
            if len(batch) == 1:
                return batch[0], None
            if len(batch) == 2:
                return batch[0], batch[1]
            raise RepsimError(
                f"a batch that is a sequence of {len(batch)} items is ambiguous; yield (inputs, labels) pairs, "
                "a tensor, or a dict of keyword arguments"
            )
        raise RepsimError(
            f"cannot split a batch of type {type(batch).__name__}; yield a tensor, (inputs, labels), or a dict"
        )

    def forward(self, model_inputs: Any) -> Any:
        """Run the model on inputs from :meth:`split_batch`: a mapping as keyword arguments, anything else as one."""
        try:
            if isinstance(model_inputs, Mapping):
                check_keywords(self.model, model_inputs)
                return self.model(**model_inputs)
            return self.model(model_inputs)
        except (RuntimeError, TypeError, ValueError, IndexError, AttributeError) as exc:
            if isinstance(exc, RepsimError | torch.OutOfMemoryError):  # ours, or out of memory: as they are
                raise
            raise ModelForwardError(
                f"{type(self.model).__name__} raised {type(exc).__name__} on inputs {describe_inputs(model_inputs)}: "
                f"{exc}. Check that the data fit the model (dtype, shape, keys, device)."
            ) from exc

    def attention_mask(self, model_inputs: Any) -> torch.Tensor | None:
        """The (batch, tokens) padding mask of these inputs (nonzero = real token), or None when there is none."""
        if isinstance(model_inputs, Mapping):
            mask = model_inputs.get("attention_mask")
            if isinstance(mask, torch.Tensor):
                return mask
        return None

    def attention_mask_for(self, layer_name: str, model_inputs: Any) -> torch.Tensor | None:
        """The padding mask that applies to one layer's tokens (encoder-decoder adapters pick the decoder's)."""
        return self.attention_mask(model_inputs)

    def batch_size(self, model_inputs: Any) -> int | None:
        """Number of inputs in a batch (used to check that captured outputs keep the batch first), or None.

        A tensor's first dimension; for a mapping, the first of the usual input keys, else its first tensor.
        """
        if isinstance(model_inputs, torch.Tensor):
            return int(model_inputs.shape[0]) if model_inputs.dim() >= 1 else None
        if isinstance(model_inputs, Mapping):
            for key in BATCH_KEYS:
                value = model_inputs.get(key)
                if isinstance(value, torch.Tensor) and value.dim() >= 1:
                    return int(value.shape[0])
            for value in model_inputs.values():
                found = self.batch_size(value)
                if found is not None:
                    return found
            return None
        if isinstance(model_inputs, Sequence) and not isinstance(model_inputs, str):
            for value in model_inputs:
                found = self.batch_size(value)
                if found is not None:
                    return found
        return None

    def main_output(self, output: Any) -> torch.Tensor:
        """The tensor that output-preservation losses compare: logits, else last hidden state, else the output."""
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, Mapping):
            for key in ("logits", "last_hidden_state"):
                value = output.get(key)
                if isinstance(value, torch.Tensor):
                    return value
            for value in output.values():
                if isinstance(value, torch.Tensor):
                    return value
        if isinstance(output, Sequence) and output and isinstance(output[0], torch.Tensor):
            return output[0]
        raise RepsimError(
            f"cannot find a tensor in a model output of type {type(output).__name__}; "
            "use a custom adapter whose main_output picks it"
        )

    # -- identity --------------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """``sha256:...`` of the state dict (names, dtypes, shapes, raw bytes): see
        :func:`repsim_plugin.results.state_dict_fingerprint`. Equal weights give equal fingerprints on any device."""
        from repsim_plugin.results import state_dict_fingerprint

        return state_dict_fingerprint(self.model)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__})"
