"""What the commands read: models from a spec, batches from a data file or folder, class labels from a tensor file.

Models are named ``timm:NAME`` (built with ``pretrained=False``; give weights with ``--checkpoint-*``),
``hf:PATH`` (a local HuggingFace model folder, loaded offline) or ``module:pkg.mod:factory`` (any callable returning an
``nn.Module``); each may carry keyword arguments after a comma, e.g. ``timm:resnet18,num_classes=10``. Data is a
folder of images, a text file with one sentence per line (for ``hf:`` models), or a ``.pt`` / ``.npy`` tensor file.
Tensors are read with ``torch.load(weights_only=True)`` or ``allow_pickle=False``: no pickled code runs.
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._utils.io import load_numpy, load_state_dict, load_torch
from ..errors import RepsimError

__all__ = [
    "IMAGE_SUFFIXES",
    "LoadedModel",
    "inputs_only",
    "load_data",
    "load_labels",
    "load_model",
    "model_label",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MODEL_KINDS = ("timm", "hf", "module")
#: ImageNet statistics and size: the image config of models that do not bring their own.
_IMAGENET = ((3, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

ImageConfig = tuple[tuple[int, int, int], tuple[float, ...], tuple[float, ...]]


# --- models -------------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model built from a spec, with what the data loaders need to feed it."""

    spec: str
    model: nn.Module
    kind: str  # "timm", "hf" or "module"
    source: str = ""  # the hf path (for its tokenizer)

    def image_config(self, image_size: int | None) -> ImageConfig:
        """(C, H, W), mean, std for image inputs: timm's data config, else 3 channels, ImageNet statistics."""
        size, mean, std = _IMAGENET
        if self.kind == "timm":
            from timm.data import resolve_data_config

            cfg = resolve_data_config({}, model=self.model)
            channels, height, width = cfg["input_size"]
            size, mean, std = (channels, height, width), tuple(cfg["mean"]), tuple(cfg["std"])
        if image_size is not None:
            size = (size[0], image_size, image_size)
        return size, mean, std


def _split_kwargs(text: str) -> tuple[str, dict[str, Any]]:
    """``"resnet18,num_classes=10"`` -> ``("resnet18", {"num_classes": 10})`` (values as Python literals or strings)."""
    head, *pairs = text.split(",")
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RepsimError(f"cannot read {pair!r} in {text!r}: write keyword arguments as key=value after a comma.")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return head, kwargs


def _timm_model(spec: str, name: str, kwargs: dict[str, Any]) -> LoadedModel:
    try:
        import timm
    except ImportError as exc:
        raise RepsimError("timm: models need timm: pip install 'repsim-plugin[timm]'") from exc
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as exc:
        raise RepsimError(f"timm cannot build {name!r}: {exc}") from exc
    return LoadedModel(spec, model, "timm")


def _hf_model(spec: str, folder: str, kwargs: dict[str, Any]) -> LoadedModel:
    try:
        from transformers import AutoModel
    except ImportError as exc:
        raise RepsimError("hf: models need transformers: pip install 'repsim-plugin[hf]'") from exc
    if not Path(folder).is_dir():
        raise RepsimError(f"hf:{folder}: no such folder; give the path of a saved model (nothing is downloaded).")
    model = AutoModel.from_pretrained(folder, local_files_only=True, **kwargs)
    return LoadedModel(spec, model, "hf", source=folder)


def _module_model(spec: str, target: str, kwargs: dict[str, Any]) -> LoadedModel:
    module_name, sep, attr = target.rpartition(":")
    if not sep:
        raise RepsimError(f"cannot read {spec!r}: write module:pkg.mod:factory.")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise RepsimError(f"cannot import {module_name}:{attr} for {spec!r}: {exc}") from exc
    try:
        model = factory(**kwargs)
    except TypeError as exc:  # an unknown or missing keyword argument
        raise RepsimError(f"cannot build {spec!r}: {exc}. Check the keyword arguments after the comma.") from exc
    if not isinstance(model, nn.Module):
        raise RepsimError(f"{module_name}:{attr}() returned a {type(model).__name__}, not a torch.nn.Module.")
    return LoadedModel(spec, model, "module")


_BUILDERS = {"timm": _timm_model, "hf": _hf_model, "module": _module_model}


def load_model(spec: str, checkpoint: str | None = None, *, seed: int | None = None) -> LoadedModel:
    """Build a model from ``timm:NAME`` / ``hf:PATH`` / ``module:pkg.mod:factory`` and load ``checkpoint`` into it.

    ``seed`` seeds torch's generator right before the model is built, so randomly initialised weights (a timm
    model without a checkpoint) are the same in every run that gives the same ``--seed``.
    """
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in MODEL_KINDS:
        raise RepsimError(
            f"cannot read model {spec!r}: use timm:NAME, hf:PATH or module:pkg.mod:factory (e.g. timm:resnet18)."
        )
    target, kwargs = _split_kwargs(rest)
    if seed is not None:
        torch.manual_seed(seed)
    loaded = _BUILDERS[kind](spec, target, kwargs)
    if checkpoint is not None:
        try:
            loaded.model.load_state_dict(load_state_dict(checkpoint), strict=True)
        except RuntimeError as exc:
            raise RepsimError(f"checkpoint {checkpoint!r} does not fit {spec}: {exc}") from exc
    return replace(loaded, model=loaded.model.eval())


def model_label(spec: str, checkpoint: str | None) -> str:
    """How a model is named in maps and reports: its spec, and the checkpoint's file name when one was given."""
    return f"{spec} @ {Path(checkpoint).name}" if checkpoint else spec


# --- data ---------------------------------------------------------------------------------------------------------


def _read_image(path: Path, mode: str, width: int, height: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            resized = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
            return np.asarray(resized, dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise RepsimError(f"cannot read the image {str(path)!r} ({exc}); remove or replace the file.") from None


def _image_batches(folder: Path, model: LoadedModel, image_size: int | None, batch_size: int) -> list[torch.Tensor]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RepsimError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    (channels, height, width), mean, std = model.image_config(image_size)
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise RepsimError(f"the model takes {channels}-channel images; only 1 and 3 channels are read from files.")
    mean_t = torch.tensor(mean[:channels]).view(channels, 1, 1)
    std_t = torch.tensor(std[:channels]).view(channels, 1, 1)
    images = []
    for path in files:
        array = _read_image(path, mode, width, height)
        tensor = torch.from_numpy(array).reshape(height, width, channels).permute(2, 0, 1)
        images.append((tensor - mean_t) / std_t)
    return list(torch.stack(images).split(batch_size))


def _text_batches(path: Path, model: LoadedModel, batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    if model.kind != "hf":
        raise RepsimError(f"a text file needs hf: models (their tokenizer); {model.spec} is not one.")
    from transformers import AutoTokenizer

    sentences = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not sentences:
        raise RepsimError(f"{path} holds no sentences (one per line).")
    tokenizer = AutoTokenizer.from_pretrained(model.source, local_files_only=True)
    batches = []
    for start in range(0, len(sentences), batch_size):
        chunk = sentences[start : start + batch_size]
        batch = dict(tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        # sentence indices travel as labels (never fed to the model): compare checks both models saw the same ones
        batch["labels"] = torch.arange(start, start + len(chunk))
        batches.append(batch)
    return batches


def _read_tensor(path: Path) -> torch.Tensor:
    """The one tensor a ``.npy`` / ``.pt`` data file holds (numeric, no pickled objects)."""
    if path.suffix == ".npy":
        array = load_numpy(path)
        if array.dtype.kind not in "fiu":
            raise RepsimError(f"{path} holds {array.dtype} data; save a numeric array.")
        return torch.from_numpy(np.ascontiguousarray(array))
    tensor = load_torch(path, "data")
    if not isinstance(tensor, torch.Tensor):
        raise RepsimError(f"{path} must hold one tensor of inputs (n, ...), not a {type(tensor).__name__}.")
    return tensor


def _tensor_batches(path: Path, batch_size: int) -> list[torch.Tensor]:
    tensor = _read_tensor(path)
    if tensor.ndim < 1 or tensor.shape[0] == 0:
        raise RepsimError(f"{path} holds a tensor of shape {tuple(tensor.shape)}; expected (n_samples, ...).")
    if tensor.dtype == torch.float64:
        tensor = tensor.float()
    return list(tensor.split(batch_size))


def load_data(
    path: str, model: LoadedModel, *, batch_size: int, image_size: int | None = None, max_length: int = 128
) -> list[Any]:
    """Batches from a folder of images, a text file of sentences, or a ``.pt`` / ``.npy`` tensor file."""
    p = Path(path)
    if p.is_dir():
        return _image_batches(p, model, image_size, batch_size)
    if not p.is_file():
        raise RepsimError(f"data {path!r} does not exist.")
    if p.suffix in (".pt", ".pth", ".npy"):
        return _tensor_batches(p, batch_size)
    if p.suffix == ".txt":
        return _text_batches(p, model, batch_size, max_length)
    raise RepsimError(f"cannot read data {path!r}: give a folder of images, a .txt file, or a .pt / .npy tensor file.")


def inputs_only(batches: list[Any]) -> list[Any]:
    """Text batches from :func:`load_data` carry sentence indices as ``labels``: those are not classes, drop them."""
    return [{k: v for k, v in b.items() if k != "labels"} if isinstance(b, dict) else b for b in batches]


# --- labels -------------------------------------------------------------------------------------------------------


def load_labels(path: str) -> torch.Tensor:
    """A 1-D integer label tensor from a ``.pt`` (``torch.load(weights_only=True)``) or ``.npy`` file."""
    p = Path(path)
    if not p.is_file():
        raise RepsimError(f"labels file {path!r} does not exist.")
    labels: Any
    if p.suffix == ".npy":
        labels = torch.from_numpy(np.ascontiguousarray(load_numpy(p)))
    elif p.suffix in (".pt", ".pth"):
        labels = load_torch(p, "labels")
    else:
        raise RepsimError(f"labels {path!r}: give a .pt or .npy file holding one integer class index per sample.")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise RepsimError(f"{path} must hold a 1-D integer tensor of class indices, got {shape}.")
    return labels.long()
