"""Data plumbing shared by shift and audit: samples as indexable chunks, labels, minibatches, captured rows.

``data`` arguments are normalised once into :class:`Chunk` objects: batches whose shapes agree are pooled into one
chunk (and reshuffled every epoch); padded text batches of different lengths stay separate chunks, sampled within
each. Everything here is machinery of the ``adversarial`` package, not public API.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._utils.batches import concat, model_device, rows_of, take, to_device
from ..adapters import Adapter, for_model
from ..capture import capture
from ..errors import InputShapeError, RepsimError

__all__ = [
    "MIN_BATCH",
    "Chunk",
    "all_labels",
    "as_chunks",
    "capture_rows",
    "evaluation_split",
    "has_token_ids",
    "hold_out",
    "merge_rows",
    "minibatches",
    "mix_inputs",
    "mix_tokens",
    "mixable",
    "sample_inputs",
    "single_layer_rows",
    "split_like",
]

#: Unbiased HSIC needs at least this many rows per minibatch.
MIN_BATCH = 4


@dataclass
class Chunk:
    """Samples that can be indexed together: inputs (a tensor or a mapping of batch-first tensors), labels."""

    inputs: Any
    labels: torch.Tensor | None
    n: int
    # filled in by the precomputation: per-sample targets of the objective and the preservation loss
    reference: torch.Tensor | None = None
    teacher: torch.Tensor | None = None
    teacher_tokens: torch.Tensor | None = None

    def pieces(self, size: int) -> list[torch.Tensor]:
        return list(torch.arange(self.n).split(size))


def sample_inputs(chunk: Chunk) -> Any:
    """The first few (at most :data:`MIN_BATCH`) inputs of a chunk: enough for a probing forward pass."""
    return take(chunk.inputs, torch.arange(min(chunk.n, MIN_BATCH)))


def all_labels(chunks: Sequence[Chunk]) -> torch.Tensor | None:
    """Every chunk's labels in data order, or None when some chunk has none."""
    if all(c.labels is not None for c in chunks):
        return torch.cat([c.labels for c in chunks if c.labels is not None])
    return None


def _signature(inputs: Any) -> Any:
    """What must agree for batches to be concatenated: trailing shapes and dtypes (and keys of a mapping)."""
    if isinstance(inputs, torch.Tensor):
        return ("tensor", tuple(inputs.shape[1:]), inputs.dtype)
    if isinstance(inputs, Mapping) and all(isinstance(v, torch.Tensor) for v in inputs.values()):
        return ("mapping", tuple(sorted((k, tuple(v.shape[1:]), v.dtype) for k, v in inputs.items())))
    return None


def _is_labelled_pair(data: Any) -> bool:
    """``(inputs, labels)``: a tuple of inputs and a 1-D integer tensor with one label per input."""
    if not (isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], torch.Tensor)):
        return False
    labels = data[1]
    n = rows_of(data[0])
    return labels.dim() == 1 and not labels.is_floating_point() and n is not None and n == labels.shape[0]


def _batches(data: Any, what: str) -> list[Any]:
    if data is None:
        raise RepsimError(f"{what} is None; pass a tensor of inputs, a tokenizer batch (dict) or a list of batches.")
    if isinstance(data, torch.Tensor | Mapping) or _is_labelled_pair(data):
        batches = [data]
    elif isinstance(data, Sequence | Iterator) or hasattr(data, "__iter__"):
        if isinstance(data, str | bytes):
            raise RepsimError(f"{what} is a string; pass tensors, a tokenizer batch or a list of batches.")
        batches = list(data)
    else:
        raise RepsimError(
            f"{what} is a {type(data).__name__}; pass a tensor of inputs, a tokenizer batch (dict), an "
            "(inputs, labels) pair or a list of batches (as for rp.compare)."
        )
    if not batches:
        raise RepsimError(f"{what} holds no batches.")
    return batches


def _split(batches: list[Any], adapter: Adapter, what: str) -> list[tuple[Any, torch.Tensor | None]]:
    """Each batch as (inputs, labels or None), checked to have one shared batch dimension."""
    split: list[tuple[Any, torch.Tensor | None]] = []
    for i, batch in enumerate(batches):
        inputs, batch_labels = adapter.split_batch(batch)
        n = rows_of(inputs)
        if n is None or n == 0:
            raise RepsimError(
                f"batch {i} of {what} has no batch dimension that all its tensors share; each batch must be a "
                "tensor (n, ...) or a mapping of tensors with n rows (a tokenizer output)."
            )
        if batch_labels is not None:
            batch_labels = torch.as_tensor(batch_labels)
            if batch_labels.dim() != 1 or batch_labels.shape[0] != n:
                raise InputShapeError(
                    f"batch {i} of {what} has {n} inputs but labels of shape {tuple(batch_labels.shape)}; "
                    "give one class index per input."
                )
        split.append((inputs, batch_labels))
    return split


def _pooled(split: list[tuple[Any, torch.Tensor | None]], what: str) -> list[Chunk]:
    with_labels = [lab is not None for _, lab in split]
    if any(with_labels) and not all(with_labels):
        raise RepsimError(f"some batches of {what} carry labels and some do not; give labels for all or none.")
    signatures = {repr(_signature(inputs)) for inputs, _ in split}
    if len(signatures) == 1 and _signature(split[0][0]) is not None:
        inputs = concat([inputs for inputs, _ in split]) if len(split) > 1 else split[0][0]
        given = [lab for _, lab in split if lab is not None]
        lab = torch.cat(given) if all(with_labels) else None
        return [Chunk(inputs, lab, int(rows_of(inputs) or 0))]
    # e.g. padded text batches of different lengths: keep the batches, sample within each
    return [Chunk(inputs, lab, int(rows_of(inputs) or 0)) for inputs, lab in split]


def as_chunks(data: Any, adapter: Adapter, labels: Any, what: str) -> list[Chunk]:
    """Normalise ``data`` to chunks of indexable samples (one chunk when the batches can be concatenated).

    Chunks already made (a list of :class:`Chunk`, as the audit passes its split data to ``shift``) are copied."""
    if isinstance(data, list) and data and all(isinstance(c, Chunk) for c in data):
        if labels is not None:
            raise RepsimError(f"{what} is already split into chunks with their labels; labels= does not apply.")
        return [Chunk(c.inputs, c.labels, c.n) for c in data]
    chunks = _pooled(_split(_batches(data, what), adapter, what), what)
    total = sum(c.n for c in chunks)
    if labels is not None:
        labels = _as_labels(labels, total, what)
        offset = 0
        for chunk in chunks:
            given = labels[offset : offset + chunk.n]
            if chunk.labels is not None and not torch.equal(chunk.labels.cpu().long(), given):
                raise RepsimError(
                    f"the labels passed with labels= disagree with the labels inside the batches of {what}; "
                    "pass one of them (they must be aligned with the samples)."
                )
            chunk.labels = given
            offset += chunk.n
    for chunk in chunks:
        if chunk.labels is not None:
            chunk.labels = chunk.labels.cpu().long()
    return chunks


def _as_labels(labels: Any, n: int, what: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise RepsimError(f"labels for {what} must be a 1-D sequence of class indices.") from None
    if tensor.dim() != 1 or tensor.shape[0] != n or tensor.is_floating_point() or tensor.dtype == torch.bool:
        raise InputShapeError(
            f"labels for {what} have shape {tuple(tensor.shape)} and dtype {tensor.dtype}; give {n} integer class "
            "indices, one per sample, in data order."
        )
    return tensor.cpu().long()


def split_like(tensor: torch.Tensor, chunks: Sequence[Chunk]) -> list[torch.Tensor]:
    """Rows of ``tensor`` (all samples in data order) cut into one piece per chunk."""
    return list(tensor.split([c.n for c in chunks]))


def hold_out(chunks: list[Chunk], fraction: float, seed: int) -> tuple[list[Chunk], list[Chunk], torch.Tensor]:
    """Split ``chunks`` into training and held-out chunks; returns them and the held-out positions in data order.

    One pooled chunk: ``round(fraction * n)`` of its samples, drawn by ``seed`` (the same ones on every call).
    Several chunks (padded text batches of different lengths): whole chunks, ``ceil(fraction * chunks)`` of them,
    so that padding stays as it was. Raises when either part would have fewer than :data:`MIN_BATCH` samples.
    """
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0] + [c.n for c in chunks]).cumsum(0)
    if len(chunks) == 1:
        chunk = chunks[0]
        order = torch.randperm(chunk.n, generator=generator)
        k = round(fraction * chunk.n)
        held, kept = order[:k].sort().values, order[k:].sort().values
        train = [Chunk(take(chunk.inputs, kept), _labels(chunk, kept), len(kept))]
        evaluation = [Chunk(take(chunk.inputs, held), _labels(chunk, held), len(held))]
        positions = held
    else:
        k = max(1, math.ceil(fraction * len(chunks)))
        chosen = set(torch.randperm(len(chunks), generator=generator)[:k].tolist())
        train = [c for i, c in enumerate(chunks) if i not in chosen]
        evaluation = [c for i, c in enumerate(chunks) if i in chosen]
        positions = torch.cat([torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in sorted(chosen)])
    n_train, n_eval = sum(c.n for c in train), sum(c.n for c in evaluation)
    if n_train < MIN_BATCH or n_eval < MIN_BATCH:
        raise RepsimError(
            f"holding out {fraction:g} of {int(offsets[-1])} samples leaves {n_train} to fine-tune on and {n_eval} to "
            f"evaluate on; each part needs at least {MIN_BATCH}. Pass more data, eval_data=, or another holdout=."
        )
    return train, evaluation, positions


def evaluation_split(
    chunks: list[Chunk], given: list[Chunk] | None, *, holdout: float, seed: int
) -> tuple[list[Chunk], list[Chunk], str, torch.Tensor | None]:
    """The training chunks, the evaluation chunks (the same list when nothing is held out), what the evaluation
    data are as results say it, and the held-out positions (None unless drawn from ``chunks``): ``given``
    (``eval_data``), else ``holdout`` of ``chunks`` drawn by ``seed`` (:func:`hold_out`), else the training data."""
    if given is not None:
        return chunks, given, "eval_data", None
    if holdout > 0:
        train, held, index = hold_out(chunks, holdout, seed)
        return train, held, f"held out from data (holdout={holdout:g}, seed={seed})", index
    return chunks, chunks, "the training data (holdout=0)", None


def _labels(chunk: Chunk, index: torch.Tensor) -> torch.Tensor | None:
    return chunk.labels[index] if chunk.labels is not None else None


def minibatches(
    chunks: list[Chunk], batch_size: int, generator: torch.Generator
) -> Iterator[tuple[Chunk, torch.Tensor]]:
    """Endless shuffled minibatches of near-equal size (>= MIN_BATCH rows), every chunk once per epoch."""
    for chunk in chunks:
        if chunk.n < MIN_BATCH:
            raise RepsimError(
                f"a batch of {chunk.n} samples cannot be pooled with the others (different shapes) and is smaller "
                f"than {MIN_BATCH}, the least unbiased HSIC needs; pad batches to one length or drop it."
            )
    while True:
        plan: list[tuple[Chunk, torch.Tensor]] = []
        for chunk in chunks:
            order = torch.randperm(chunk.n, generator=generator)
            pieces = max(1, -(-chunk.n // batch_size))
            plan.extend((chunk, piece) for piece in torch.tensor_split(order, pieces))
        for i in torch.randperm(len(plan), generator=generator).tolist():
            yield plan[i]


def has_token_ids(inputs: Any) -> bool:
    """Whether ``inputs`` are padded text: a mapping with integer (batch, tokens) ``input_ids`` and a mask alike."""
    if not isinstance(inputs, Mapping):
        return False
    ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
    if not isinstance(ids, torch.Tensor) or not isinstance(mask, torch.Tensor) or ids.is_floating_point():
        return False
    return ids.dim() == 2 and mask.shape == ids.shape and ids.shape[0] >= 2


def mix_tokens(inputs: Any, generator: torch.Generator) -> dict[str, torch.Tensor] | None:
    """Token mixup of a padded text minibatch: each inner token of sentence i is kept with probability a_i (uniform
    per sentence), else replaced by the token at the same position of a partner sentence j (a permutation).

    The analogue of ``a x_i + (1 - a) x_j`` for token ids: new sentences made of the minibatch's own tokens, on which
    the original's outputs are not known beforehand. Only inner positions of both sentences are swapped (the first
    and last attended token, [CLS] and [SEP] for BERT, stay), so lengths and masks are unchanged. None when the
    inputs are not a mapping with integer ``input_ids`` and an ``attention_mask`` of the same shape.
    """
    if not has_token_ids(inputs):
        return None
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    attended = mask != 0
    lengths = attended.sum(1, keepdim=True)
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    inner = attended & (positions >= 1) & (positions < lengths - 1)
    a = torch.rand((ids.shape[0], 1), generator=generator).to(ids.device)
    partner = torch.randperm(ids.shape[0], generator=generator).to(ids.device)
    swap = inner & inner[partner] & (torch.rand(ids.shape, generator=generator).to(ids.device) >= a)
    mixed = dict(inputs)
    mixed["input_ids"] = torch.where(swap, ids[partner], ids)
    return mixed


def mixable(inputs: Any) -> bool:
    """Whether :func:`mix_inputs` applies: float tensors, or padded token ids with a mask."""
    if isinstance(inputs, torch.Tensor):
        return inputs.is_floating_point()
    return has_token_ids(inputs)


def mix_inputs(inputs: Any, generator: torch.Generator) -> Any | None:
    """Mixup of one minibatch: ``a x_i + (1 - a) x_j`` (a uniform per sample, j a permutation) for float tensors,
    :func:`mix_tokens` for padded text; None for inputs that cannot be mixed (see :func:`mixable`)."""
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
        a = torch.rand((inputs.shape[0],) + (1,) * (inputs.dim() - 1), generator=generator).to(inputs)
        partner = torch.randperm(inputs.shape[0], generator=generator).to(inputs.device)
        return a * inputs + (1 - a) * inputs[partner]
    return mix_tokens(inputs, generator)


# --- captured rows ----------------------------------------------------------------------------------------------


def single_layer_rows(batch: Mapping[str, torch.Tensor], layer: str) -> torch.Tensor:
    """The rows of the one call of ``layer`` in a captured batch (a layer that ran twice must be named ``name#k``)."""
    if len(batch) != 1:
        raise RepsimError(
            f"layer {layer!r} runs {len(batch)} times per forward ({', '.join(batch)}); name one call, "
            f"e.g. {next(iter(batch))!r}."
        )
    return next(iter(batch.values()))


@torch.no_grad()
def capture_rows(
    model: nn.Module,
    layers: Sequence[str],
    chunks: list[Chunk],
    batch_size: int,
    tokens: str,
    spatial: str,
) -> list[dict[str, torch.Tensor]]:
    """Rows of ``layers`` for every sample of every chunk (eval mode, no grad; hooks removed afterwards)."""
    adapter = for_model(model)
    device = model_device(model)
    out: list[dict[str, torch.Tensor]] = []
    with capture(model, list(layers), tokens=tokens, spatial=spatial, device="cpu") as rec:
        for chunk in chunks:
            parts: dict[str, list[torch.Tensor]] = {}
            for index in chunk.pieces(batch_size):
                adapter.forward(to_device(take(chunk.inputs, index), device))
                for name, rows in rec.last_batch.items():
                    parts.setdefault(name, []).append(rows.float())
            out.append({name: torch.cat(rows) for name, rows in parts.items()})
        rec.clear()
    return out


def merge_rows(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-chunk captured rows joined into one (n, d) tensor per layer."""
    names = rows[0].keys()
    return {name: torch.cat([r[name] for r in rows]) for name in names}
