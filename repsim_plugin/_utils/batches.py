"""Batches and models: device moves, fingerprints, row slicing, and the guard that restores train / eval flags."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import RepsimError


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (None for a model without tensors)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None


def to_device(obj: Any, device: torch.device | None) -> Any:
    """Move the tensors of a batch's model inputs (a tensor, a mapping, a list or tuple of them) to ``device``."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):  # BatchEncoding and other mappings become plain dicts of keyword arguments
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def digest(h: Any, obj: Any) -> None:
    """Feed a batch's tensors (values, shapes, dtypes) into a hash, in a deterministic order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # the buffer itself, no bytes copy
    elif isinstance(obj, Mapping):
        for key in sorted(obj, key=str):
            h.update(str(key).encode())
            digest(h, obj[key])
    elif isinstance(obj, list | tuple):
        for item in obj:
            digest(h, item)
    else:
        h.update(repr(obj).encode())


def check_data(data: Any, name: str = "data") -> None:
    """``data`` must be an iterable of batches: a lone tensor, string, dict or ``(X, y)`` pair is a clear error."""
    hint = (
        f"{name} is an iterable of batches (a DataLoader, a list of tensors / (inputs, labels) pairs / dicts): "
        "pass [X] for one batch, X.split(batch_size), or DataLoader(TensorDataset(X, y), batch_size=...)"
    )
    if isinstance(data, torch.Tensor):
        shape = tuple(data.shape)
        raise RepsimError(f"{name} is one tensor of shape {shape}, which would be iterated row by row; {hint}.")
    if isinstance(data, str | bytes | Mapping) or not hasattr(data, "__iter__"):
        raise RepsimError(f"{name} is a {type(data).__name__}; {hint}.")
    if (
        isinstance(data, tuple)
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in data)
        and data[0].shape[0] == data[1].shape[0]
        and data[1].dim() < data[0].dim()
    ):
        raise RepsimError(
            f"{name} looks like one (inputs, labels) pair of shapes {tuple(data[0].shape)} and "
            f"{tuple(data[1].shape)}, not an iterable of batches (it would be read as two batches); pass "
            f"[(X, y)] for one batch, or DataLoader(TensorDataset(X, y), batch_size=...)."
        )


def lockstep(streams: Any) -> Iterator[tuple[Any, ...]]:
    """Batches of several data streams read together; a stream that ends before the others is a clear error."""
    iterators = [iter(s) for s in streams]
    index = 0
    while True:
        group, ended = [], []
        for k, it in enumerate(iterators):
            try:
                group.append(next(it))
            except StopIteration:
                ended.append(k)
        if len(ended) == len(iterators):
            return
        if ended:
            names = ["data" if k == 0 else "data_b" for k in ended]
            raise RepsimError(
                f"{' and '.join(names)} ended after {index} batches while the other stream has more: both streams "
                "must yield the same batches of the same samples. Give them the same length."
            )
        yield tuple(group)
        index += 1


def rows_of(inputs: Any) -> int | None:
    """The batch size shared by a tensor's first dimension or by every batch-first tensor of a mapping."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() >= 1 else None
    if isinstance(inputs, Mapping):
        sizes = {int(v.shape[0]) for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() >= 1}
        return sizes.pop() if len(sizes) == 1 else None
    return None


def take(inputs: Any, index: torch.Tensor) -> Any:
    """The rows ``index`` of a tensor or of every batch-first tensor of a mapping."""
    if isinstance(inputs, torch.Tensor):
        return inputs[index.to(inputs.device)]
    n = rows_of(inputs)
    return {
        k: (v[index.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n else v)
        for k, v in inputs.items()
    }


def concat(parts: list[Any]) -> Any:
    """Concatenate batches along rows: tensors, or mappings of tensors with the same keys."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class TrainFlags:
    """The train / eval flag of every module of a model, saved once and restored on request.

    ``restore()`` sets every flag back even if the model was switched in between; a ``KeyboardInterrupt`` landing
    half way through the loop is held until the loop has run again to the end. Flags already right are left
    alone: ``nn.Module.__setattr__`` is slow, and a capture enters and leaves once per batch (a resnet18's 94
    modules: 1.1 ms per batch to switch to eval and back when every flag was set again).
    """

    def __init__(self, model: nn.Module) -> None:
        self._flags = [(module, module.training) for module in model.modules()]

    @property
    def all_eval(self) -> bool:
        """Whether every module was in eval mode when the flags were saved (``model.eval()`` would change none)."""
        return not any(flag for _, flag in self._flags)

    def restore(self) -> None:
        try:
            for module, flag in self._flags:
                if module.training != flag:
                    module.training = flag
        except BaseException:  # interrupted half way (Ctrl-C): finish the job, then let the interrupt through
            for module, flag in self._flags:
                module.training = flag
            raise


@contextlib.contextmanager
def train_flags_kept(model: nn.Module, *, eval_mode: bool = True) -> Iterator[None]:
    """Run a block with ``model`` in eval mode (when ``eval_mode``), then restore every module's own flag."""
    saved = TrainFlags(model)
    try:
        if eval_mode and not saved.all_eval:
            model.eval()
        yield
    finally:
        saved.restore()
