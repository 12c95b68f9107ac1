"""Adapter for timm models (detected by class module; timm is never imported here)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from repsim_plugin.errors import RepsimError

from .base import Adapter, class_modules

# families whose stages emit channels-last maps even where an older timm lacks the ``output_fmt`` attribute
_NHWC_FAMILIES: tuple[str, ...] = ("timm.models.swin_transformer", "timm.models.swin_transformer_v2")


def _format_name(fmt: Any) -> str | None:
    """timm's ``Format`` enum or a plain string -> "NCHW" / "NHWC" / "NLC" / ...; None when absent."""
    if fmt is None:
        return None
    return str(getattr(fmt, "value", fmt)).upper()


class TimmAdapter(Adapter):
    """A timm model: default layers from ``feature_info``, layout from ``output_fmt``, prefix tokens handled.

    ``feature_info`` may be a list of dicts with a ``module`` key (ordinary models) or a ``FeatureInfo``
    (``features_only`` wrappers, whose modules are renamed with ``_`` instead of ``.``). Channels-last families
    (``output_fmt == "NHWC"``, swin) give NHWC spatial maps; token models (ViT, DeiT) expose
    ``num_prefix_tokens`` (class, distillation and register tokens), which ``tokens="mean"`` leaves out. Layers
    inside ``patch_embed`` have no prefix tokens yet.
    """

    name: ClassVar[str] = "timm"
    priority: ClassVar[int] = 10

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        fmt = _format_name(getattr(model, "output_fmt", None))
        if fmt == "NHWC" or (fmt is None and any(m in _NHWC_FAMILIES for m in class_modules(model))):
            self.spatial_layout = "NHWC"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return any(name == "timm" or name.startswith("timm.") for name in class_modules(model))

    def default_layers(self) -> list[str]:
        info = getattr(self.model, "feature_info", None)
        if info is None:
            return super().default_layers()
        if hasattr(info, "module_name"):  # FeatureInfo
            names = list(info.module_name())
        else:
            names = [entry["module"] for entry in info if isinstance(entry, dict) and "module" in entry]
        modules = dict(self.model.named_modules())
        resolved: list[str] = []
        for name in names:
            for candidate in (name, name.replace(".", "_")):
                if candidate in modules and candidate:
                    resolved.append(candidate)
                    break
            else:
                raise RepsimError(
                    f"feature_info of {type(self.model).__name__} names module {name!r}, which the model does not "
                    "have; name the layers to capture explicitly"
                )
        if not resolved:
            return super().default_layers()
        return resolved

    def _under_patch_embed(self, layer_name: str) -> bool:
        return layer_name == "patch_embed" or layer_name.startswith("patch_embed.")

    def layout(self, layer_name: str) -> str | None:
        try:
            module = self.model.get_submodule(layer_name)
        except AttributeError:
            return None
        fmt = _format_name(getattr(module, "output_fmt", None))
        if fmt in ("NCHW", "NHWC"):
            # timm's PatchEmbed keeps output_fmt NCHW but flattens to tokens when `flatten` is set
            return "NLC" if getattr(module, "flatten", False) else fmt
        return self.spatial_layout if self.spatial_layout == "NHWC" else None

    def prefix_tokens(self, layer_name: str) -> int:
        return 0 if self._under_patch_embed(layer_name) else self.num_prefix_tokens
