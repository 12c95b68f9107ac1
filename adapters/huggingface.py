"""Adapter for HuggingFace transformers models (detected by class module; transformers is never imported here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from repsim_plugin.errors import RepsimError

from .base import Adapter, class_modules

# model_type -> leading tokens that are not patches (CLS, distillation); registers are added from the config
_PREFIX_TOKENS: dict[str, int] = {"vit": 1, "deit": 2, "dinov2": 1, "dinov2_with_registers": 1}


def _layer_counts(config: Any) -> set[int]:
    """Every ``num_hidden_layers`` in the config and its sub-configs (text / vision / encoder / decoder)."""
    counts: set[int] = set()
    seen: set[int] = set()
    stack = [config]
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in seen:
            continue
        seen.add(id(cfg))
        for attribute in ("num_hidden_layers", "num_layers", "n_layer", "decoder_layers", "encoder_layers"):
            value = getattr(cfg, attribute, None)
            if isinstance(value, int) and value > 0:
                counts.add(value)
        for value in vars(cfg).values() if hasattr(cfg, "__dict__") else ():
            if type(value).__name__.endswith("Config") and hasattr(value, "to_dict"):
                stack.append(value)
    return counts


class HuggingFaceAdapter(Adapter):
    """A ``transformers`` model: blocks as default layers, batch dicts as keyword arguments, mask-aware tokens.

    Default layers are the children of every ``nn.ModuleList`` whose length is the config's
    ``num_hidden_layers`` (BERT ``encoder.layer.N``, GPT-2 ``h.N`` / ``transformer.h.N``, ViT ``layers.N``),
    outermost lists only, in model order. Vision transformers count their CLS / distillation / register tokens
    as prefix tokens so that ``tokens="mean"`` averages patches only; text models have none (CLS is a real token).
    """

    name: ClassVar[str] = "huggingface"
    aliases: ClassVar[tuple[str, ...]] = ("hf", "transformers")
    priority: ClassVar[int] = 20

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        prefix = _PREFIX_TOKENS.get(model_type, 0) if isinstance(model_type, str) else 0
        if prefix:
            prefix += int(getattr(config, "num_register_tokens", 0) or 0)
        self.num_prefix_tokens = prefix

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return any(name == "transformers" or name.startswith("transformers.") for name in class_modules(model))

    def default_layers(self) -> list[str]:
        counts = _layer_counts(getattr(self.model, "config", None))
        found: dict[str, int] = {}  # outermost block list -> its length
        for name, module in self.model.named_modules():
            if not isinstance(module, nn.ModuleList) or len(module) not in counts or not name:
                continue
            if any(name.startswith(outer + ".") for outer in found):
                continue  # a list inside a block (experts, heads), not the blocks themselves
            found[name] = len(module)
        if not found:
            raise RepsimError(
                f"could not find the transformer blocks of {type(self.model).__name__} (no ModuleList of length "
                f"{sorted(counts) or 'num_hidden_layers'}); name the layers to capture explicitly"
            )
        return [f"{outer}.{index}" for outer, length in found.items() for index in range(length)]

    def attention_mask_for(self, layer_name: str, model_inputs: Any) -> torch.Tensor | None:
        """Encoder-decoder models: layers under a ``decoder`` module use ``decoder_attention_mask`` (None when
        the call has none: then every decoder position counts, as in the model itself)."""
        is_encoder_decoder = bool(getattr(getattr(self.model, "config", None), "is_encoder_decoder", False))
        if is_encoder_decoder and "decoder" in layer_name.split("."):
            mask = model_inputs.get("decoder_attention_mask") if isinstance(model_inputs, Mapping) else None
            return mask if isinstance(mask, torch.Tensor) else None
        return self.attention_mask(model_inputs)
