"""Shift a similarity measure while the model's outputs stay the same (Davari et al., ICLR 2023, Section 4.3).

:func:`shift` fine-tunes a *copy* of a model so that a layer's similarity to a reference representation (by
default: the same layer of the original, frozen model) approaches a target value, while a frozen copy of the
original constrains what the model outputs. The objective is the paper's::

    preservation(student outputs, original outputs)  +  lambda * mean log-cosh(M - M_target)

* ``M`` is computed on every minibatch and differentiated end to end: for the CKA family, minibatch CKA with the
  unbiased HSIC estimator (Song et al. 2012) and the measure's kernel; for any other differentiable registered
  measure, the measure itself on the minibatch rows. ``target_map`` asks for a whole layer x layer map of the
  network being trained instead of one value (e.g. all ones: every layer CKA-similar to every other).
* ``preservation`` is the distillation KL between ``softmax(teacher / T)`` and ``softmax(student / T)``
  (``preserve="kl"``), cross-entropy on hard labels (``"ce"``), or, for models without logits such as a bare
  sentence encoder, ``1 - cosine`` (``"embedding"``) or relative squared error (``"mse"``) of the outputs.
* ``lambda`` starts at ``lambda_init`` (500); at every evaluation on held-out data it is multiplied by 0.8 when
  the outputs are not kept (accuracy, or top-1 agreement with the original, or output cosine fell more than
  ``tolerance`` below the original), else divided by 0.8. AdamW, cosine learning-rate schedule, gradient
  clipping at 1.0.

``mode="perturbation"`` is the representation-level variant: the network is frozen and a learnable low-rank
affine edit ``h -> h + h U V^T + b`` of the layer's output is inserted by a forward hook, under the same
output-preservation penalty. It answers "how far can this layer's representation be moved, as a function of
itself, without changing what the rest of the network computes from it?".

The model passed in is never modified: the work happens on a deep copy, every hook is removed afterwards, and
the global random state is left as it was.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from ..adapters import Adapter, for_model
from ..capture import capture, reduce_output
from ..compare import _model_device, _to_device
from ..errors import DegenerateInputError, InputShapeError, RepsimError, UnknownNameError
from ..measures import Measure, make
from ..measures.kernels import KERNEL_PARAMS, KERNELS, cka_from_hsic, hsic_unbiased
from ..results import state_dict_fingerprint

__all__ = [
    "CRITERIA",
    "MODES",
    "PRESERVE",
    "LowRankAffine",
    "ShiftResult",
    "shift",
]

#: Output-preservation losses: distillation KL at temperature T, cross-entropy on labels, 1 - cosine of the
#: outputs (sentence embeddings), squared error of the outputs relative to their mean square.
PRESERVE: tuple[str, ...] = ("kl", "ce", "embedding", "mse")
#: ``finetune``: train the copy's weights; ``perturbation``: frozen network, learnable edit of the layer output.
MODES: tuple[str, ...] = ("finetune", "perturbation")
#: What "outputs kept" means at an evaluation. ``auto``: accuracy when the evaluation data have labels, else
#: top-1 agreement with the original for classifiers, else the mean cosine of the outputs.
CRITERIA: tuple[str, ...] = ("auto", "accuracy", "agreement", "cosine")
KEEP: tuple[str, ...] = ("best", "last")

#: The paper's lambda update factor (multiply when outputs drift, divide when they are kept).
LAMBDA_FACTOR = 0.8
#: Unbiased HSIC needs at least this many rows per minibatch.
MIN_BATCH = 4


# --- data ---------------------------------------------------------------------------------------------------------


def _rows_of(inputs: Any) -> int | None:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() >= 1 else None
    if isinstance(inputs, Mapping):
        sizes = {int(v.shape[0]) for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() >= 1}
        return sizes.pop() if len(sizes) == 1 else None
    return None


def _take(inputs: Any, index: torch.Tensor) -> Any:
    """The rows ``index`` of a tensor or of every batch-first tensor of a mapping."""
    if isinstance(inputs, torch.Tensor):
        return inputs[index.to(inputs.device)]
    n = _rows_of(inputs)
    return {
        k: (v[index.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n else v)
        for k, v in inputs.items()
    }


def _signature(inputs: Any) -> Any:
    """What must agree for batches to be concatenated: trailing shapes and dtypes (and keys of a mapping)."""
    if isinstance(inputs, torch.Tensor):
        return ("tensor", tuple(inputs.shape[1:]), inputs.dtype)
    if isinstance(inputs, Mapping) and all(isinstance(v, torch.Tensor) for v in inputs.values()):
        return ("mapping", tuple(sorted((k, tuple(v.shape[1:]), v.dtype) for k, v in inputs.items())))
    return None


def _concat(parts: list[Any]) -> Any:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@dataclass
class _Chunk:
    """Samples that can be indexed together: inputs (a tensor or a mapping of batch-first tensors), labels."""

    inputs: Any
    labels: torch.Tensor | None
    n: int
    # filled in by the precomputation: per-sample targets of the objective and the preservation loss
    reference: torch.Tensor | None = None
    teacher: torch.Tensor | None = None

    def pieces(self, size: int) -> list[torch.Tensor]:
        return list(torch.arange(self.n).split(size))


def _is_labelled_pair(data: Any) -> bool:
    """``(inputs, labels)``: a tuple of inputs and a 1-D integer tensor with one label per input."""
    if not (isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], torch.Tensor)):
        return False
    labels = data[1]
    n = _rows_of(data[0])
    return labels.dim() == 1 and not labels.is_floating_point() and n is not None and n == labels.shape[0]


def _as_chunks(data: Any, adapter: Adapter, labels: Any, what: str) -> list[_Chunk]:
    """Normalise ``data`` to chunks of indexable samples (one chunk when the batches can be concatenated)."""
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
    split: list[tuple[Any, torch.Tensor | None]] = []
    for i, batch in enumerate(batches):
        inputs, batch_labels = adapter.split_batch(batch)
        n = _rows_of(inputs)
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
    with_labels = [lab is not None for _, lab in split]
    if any(with_labels) and not all(with_labels):
        raise RepsimError(f"some batches of {what} carry labels and some do not; give labels for all or none.")
    signatures = {repr(_signature(inputs)) for inputs, _ in split}
    if len(signatures) == 1 and _signature(split[0][0]) is not None:
        inputs = _concat([inputs for inputs, _ in split]) if len(split) > 1 else split[0][0]
        lab = torch.cat([lab for _, lab in split]) if all(with_labels) else None  # type: ignore[misc]
        chunks = [_Chunk(inputs, lab, int(_rows_of(inputs) or 0))]
    else:  # e.g. padded text batches of different lengths: keep the batches, sample within each
        chunks = [_Chunk(inputs, lab, int(_rows_of(inputs) or 0)) for inputs, lab in split]
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


def _split_like(tensor: torch.Tensor, chunks: list[_Chunk]) -> list[torch.Tensor]:
    return list(tensor.split([c.n for c in chunks]))


# --- the objective ----------------------------------------------------------------------------------------------


def _log_cosh(x: torch.Tensor) -> torch.Tensor:
    """``log(cosh(x))`` without overflow: ``|x| + log1p(exp(-2|x|)) - log 2``."""
    a = x.abs()
    return a + torch.log1p(torch.exp(-2.0 * a)) - math.log(2.0)


class _MinibatchMeasure:
    """The differentiable per-minibatch estimate of a measure that the objective drives toward the target.

    CKA family: CKA with the measure's kernel and the unbiased HSIC (minibatch CKA, Nguyen et al. 2021, on one
    batch), whatever HSIC the measure itself uses (the biased estimator is inflated at batch sizes). Any other
    differentiable measure: the measure itself on the minibatch rows.
    """

    def __init__(self, measure: Measure) -> None:
        self.measure = measure
        params = dict(measure.params)
        self.is_cka = measure.spec.name == "cka"
        if self.is_cka:
            kernel = params.get("kernel", "linear")
            kernel_name = kernel.name if hasattr(kernel, "name") else str(kernel)
            if kernel_name not in KERNELS:
                raise UnknownNameError(f"unknown CKA kernel {kernel_name!r} in {measure.id}.")
            accepted = KERNEL_PARAMS.get(kernel_name, {})
            nested = dict(getattr(kernel, "params", ()))
            self.kernel_params = {k: nested.get(k, params.get(k, v)) for k, v in accepted.items()}
            self.gram = KERNELS[kernel_name]
            self.description = f"minibatch CKA (kernel={kernel_name}, unbiased HSIC)"
        else:
            self.description = f"{measure.id} on each minibatch"

    def grams(self, X: torch.Tensor) -> torch.Tensor:
        return self.gram(X.to(torch.float64), **self.kernel_params)

    def pair(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        if self.is_cka:
            K, L = self.grams(X), self.grams(Y)
            return cka_from_hsic(hsic_unbiased(K, L), hsic_unbiased(K, K), hsic_unbiased(L, L))
        return self.measure(X.to(torch.float64), Y.to(torch.float64))

    def map(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        L = len(rows)
        if self.is_cka:
            grams = [self.grams(X) for X in rows]
            self_hsic = [hsic_unbiased(K, K) for K in grams]
            entries = [
                [
                    torch.ones((), dtype=torch.float64, device=grams[i].device)
                    if i == j
                    else cka_from_hsic(hsic_unbiased(grams[i], grams[j]), self_hsic[i], self_hsic[j])
                    for j in range(L)
                ]
                for i in range(L)
            ]
        else:
            entries = [[self.pair(rows[i], rows[j]) for j in range(L)] for i in range(L)]
        return torch.stack([torch.stack(row) for row in entries])


# --- the perturbation -----------------------------------------------------------------------------------------


class LowRankAffine(nn.Module):
    """``h -> h + (h U) V^T + b`` along the feature axis: a learnable edit of a layer's output.

    Starts as the identity (``U = 0``, ``b = 0``, ``V`` random), so the optimisation starts from the original
    representation. ``rank`` bounds how many directions the edit can mix; the bias translates every sample.
    """

    def __init__(self, features: int, rank: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if features < 1 or rank < 1:
            raise RepsimError(f"LowRankAffine needs features >= 1 and rank >= 1, got {features} and {rank}.")
        self.U = nn.Parameter(torch.zeros(features, rank))
        self.V = nn.Parameter(torch.randn(features, rank, generator=generator) / math.sqrt(features))
        self.b = nn.Parameter(torch.zeros(features))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        U, V, b = self.U.to(h.dtype), self.V.to(h.dtype), self.b.to(h.dtype)
        return h + (h @ U) @ V.T + b


def _feature_axis(tensor: torch.Tensor, layout: str | None) -> int:
    if tensor.dim() == 4 and layout != "NHWC":
        return 1
    return tensor.dim() - 1


def _perturbation_hook(perturbation: nn.Module, layout: str | None, layer: str) -> Callable[..., Any]:
    def apply(tensor: torch.Tensor) -> torch.Tensor:
        axis = _feature_axis(tensor, layout)
        moved = tensor.movedim(axis, -1)
        return perturbation(moved).movedim(-1, axis)

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return apply(output)
        if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
            return type(output)([apply(output[0]), *output[1:]])
        raise RepsimError(
            f"layer {layer!r} returns a {type(output).__name__}; the perturbation edits a tensor output (or the "
            "first element of a tuple). Perturb another layer, or use mode='finetune'."
        )

    return hook


def _feature_count(tensor: torch.Tensor, layout: str | None) -> int:
    return int(tensor.shape[_feature_axis(tensor, layout)])


# --- the result -------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ShiftResult:
    """What :func:`shift` did, measured on the evaluation data (held out when ``eval_data`` was given).

    ``measure_before`` / ``measure_after``: the full-data measure (not the minibatch estimate) between the layer
    and the reference, for the original and for the returned model. ``agreement``: top-1 agreement of the returned
    model's outputs with the original's (classifiers); ``kl``: mean KL(original || returned) of the softmax outputs
    at temperature 1; ``cosine`` / ``cosine_min``: mean / smallest cosine between the preserved outputs (logits or
    pooled embeddings); ``accuracy_before`` / ``accuracy_after`` when the evaluation data have labels. Map targets
    fill ``map_before`` / ``map_after`` (layer x layer over ``map_layers``) instead of the measure values.
    ``history`` holds one dict per evaluation (step, lambda, the measure, the output checks, whether outputs were
    kept, the training losses). ``model`` is the fine-tuned copy; in perturbation mode it is the frozen copy and
    ``perturbation`` the learned edit, applied with ``with result.perturbed(): ...``.
    """

    measure: str
    layer: str | None
    target: float | None
    mode: str
    preserve: str
    criterion: str
    tolerance: float
    model: nn.Module
    measure_before: float | None = None
    measure_after: float | None = None
    agreement: float | None = None
    kl: float | None = None
    cosine: float | None = None
    cosine_min: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    kept: bool = True
    best_step: int = 0
    steps: int = 0
    lambda_final: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    map_layers: list[str] | None = None
    target_map: torch.Tensor | None = None
    map_before: torch.Tensor | None = None
    map_after: torch.Tensor | None = None
    perturbation: nn.Module | None = None
    reference: str = ""
    objective: str = ""
    n_train: int = 0
    n_eval: int = 0
    held_out: bool = False
    seconds: float = 0.0
    seed: int = 0
    fingerprints: dict[str, str] = field(default_factory=dict)
    #: Evaluation rows (CPU, float32): "before" / "after" of the layer and "reference"; not part of to_dict().
    representations: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def map_error_before(self) -> float | None:
        """Mean |map - target| over the entries the target constrains (NaN entries are free), original model."""
        return _map_error(self.map_before, self.target_map)

    @property
    def map_error_after(self) -> float | None:
        return _map_error(self.map_after, self.target_map)

    _layout: str | None = field(default=None, init=False, repr=False)

    @contextlib.contextmanager
    def perturbed(self) -> Iterator[nn.Module]:
        """Apply the learned perturbation to ``self.model`` inside the block (the hook is removed on exit)."""
        if self.perturbation is None or self.layer is None:
            raise RepsimError("this result has no perturbation (mode='finetune'); use result.model directly.")
        module = self.model.get_submodule(self.layer)
        hook = _perturbation_hook(self.perturbation, self._layout, self.layer)
        handle = module.register_forward_hook(hook, prepend=True)
        try:
            yield self.model
        finally:
            handle.remove()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: the configuration, the numbers, the history and the fingerprints (not the model)."""

        def matrix(t: torch.Tensor | None) -> list[list[float | None]] | None:
            if t is None:
                return None
            return [[None if math.isnan(v) else float(v) for v in row] for row in t.tolist()]

        return {
            "measure": self.measure,
            "layer": self.layer,
            "target": self.target,
            "reference": self.reference,
            "objective": self.objective,
            "mode": self.mode,
            "preserve": self.preserve,
            "criterion": self.criterion,
            "tolerance": self.tolerance,
            "measure_before": self.measure_before,
            "measure_after": self.measure_after,
            "agreement": self.agreement,
            "kl": self.kl,
            "cosine": self.cosine,
            "cosine_min": self.cosine_min,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "kept": self.kept,
            "best_step": self.best_step,
            "steps": self.steps,
            "lambda_final": self.lambda_final,
            "map_layers": self.map_layers,
            "target_map": matrix(self.target_map),
            "map_before": matrix(self.map_before),
            "map_after": matrix(self.map_after),
            "map_error_before": self.map_error_before,
            "map_error_after": self.map_error_after,
            "n_train": self.n_train,
            "n_eval": self.n_eval,
            "held_out": self.held_out,
            "seconds": self.seconds,
            "seed": self.seed,
            "fingerprints": dict(self.fingerprints),
            "history": [dict(entry) for entry in self.history],
        }

    def __repr__(self) -> str:
        if self.map_layers is not None:
            what = f"map error {self.map_error_before:.3f} -> {self.map_error_after:.3f}"
        else:
            what = f"{self.measure_before:.3f} -> {self.measure_after:.3f} (target {self.target})"
        checks = ", ".join(
            f"{name} {value:.3f}"
            for name, value in (("agreement", self.agreement), ("cosine", self.cosine))
            if value is not None
        )
        return f"ShiftResult({self.layer or self.map_layers}: {what}; {checks}; {self.mode}, {self.steps} steps)"


def _map_error(values: torch.Tensor | None, target: torch.Tensor | None) -> float | None:
    if values is None or target is None:
        return None
    free = torch.isnan(target)
    return float((values - target).abs()[~free].mean())


# --- the reference ----------------------------------------------------------------------------------------------


def _single_layer_rows(batch: Mapping[str, torch.Tensor], layer: str) -> torch.Tensor:
    if len(batch) != 1:
        raise RepsimError(
            f"layer {layer!r} runs {len(batch)} times per forward ({', '.join(batch)}); name one call, "
            f"e.g. {next(iter(batch))!r}."
        )
    return next(iter(batch.values()))


@torch.no_grad()
def _capture_rows(
    model: nn.Module,
    layers: Sequence[str],
    chunks: list[_Chunk],
    batch_size: int,
    tokens: str,
    spatial: str,
) -> list[dict[str, torch.Tensor]]:
    """Rows of ``layers`` for every sample of every chunk (eval mode, no grad; hooks removed afterwards)."""
    adapter = for_model(model)
    device = _model_device(model)
    out: list[dict[str, torch.Tensor]] = []
    with capture(model, list(layers), tokens=tokens, spatial=spatial, device="cpu") as rec:
        for chunk in chunks:
            parts: dict[str, list[torch.Tensor]] = {}
            for index in chunk.pieces(batch_size):
                adapter.forward(_to_device(_take(chunk.inputs, index), device))
                for name, rows in rec.last_batch.items():
                    parts.setdefault(name, []).append(rows.float())
            out.append({name: torch.cat(rows) for name, rows in parts.items()})
        rec.clear()
    return out


def _describe_reference(reference: Any, layer: str | None) -> str:
    if reference is None:
        return f"the original model's {layer!r} (frozen copy)"
    if isinstance(reference, tuple):
        return f"{type(reference[0]).__name__}'s {reference[1]!r}"
    return "a precomputed representation"


def _reference_rows(
    reference: Any,
    chunks: list[_Chunk],
    *,
    what: str,
    batch_size: int,
    tokens: str,
    spatial: str,
) -> list[torch.Tensor] | None:
    """Per-chunk reference rows for ``(other_model, other_layer)`` or a precomputed tensor; None: the original."""
    if reference is None:
        return None
    if isinstance(reference, tuple) and len(reference) == 2 and isinstance(reference[0], nn.Module):
        other, other_layer = reference
        if not isinstance(other_layer, str):
            raise RepsimError("reference=(model, layer) needs the layer as a name, e.g. (model_b, 'relu3').")
        rows = _capture_rows(other, [other_layer], chunks, batch_size, tokens, spatial)
        return [_single_layer_rows(r, other_layer) for r in rows]
    try:
        tensor = torch.as_tensor(reference.detach() if isinstance(reference, torch.Tensor) else reference)
    except (TypeError, ValueError, RuntimeError):
        raise RepsimError(
            "reference must be None (the original model's same layer), a (model, layer) pair, or a tensor of "
            f"reference rows aligned with the samples; got {type(reference).__name__}."
        ) from None
    total = sum(c.n for c in chunks)
    if tensor.dim() != 2 or tensor.shape[0] != total or not tensor.is_floating_point():
        raise InputShapeError(
            f"the reference representation for {what} has shape {tuple(tensor.shape)}; give a float (n, d) tensor "
            f"with one row per sample ({total}) in data order."
        )
    if not bool(torch.isfinite(tensor).all()):
        raise DegenerateInputError(f"the reference representation for {what} contains NaN or Inf.")
    return _split_like(tensor.float().cpu(), chunks)


# --- output preservation --------------------------------------------------------------------------------------


def _preserved_output(
    adapter: Adapter, raw: Any, inputs: Any, output: Callable[[Any], torch.Tensor] | None, preserve: str
) -> torch.Tensor:
    """The (batch, k) tensor the preservation loss compares: logits, or mean-pooled token states."""
    if output is not None:
        tensor = output(raw)
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            raise RepsimError("output= must map the model's output to a (batch, k) tensor.")
        return tensor
    tensor = adapter.main_output(raw)
    if tensor.dim() == 2:
        return tensor
    if tensor.dim() == 3 and preserve in ("embedding", "mse"):
        # a bare encoder: the sentence embedding is the attention-mask-aware mean of the last hidden state
        return reduce_output(tensor, "NLC", tokens="mean", mask=adapter.attention_mask(inputs))
    if tensor.dim() == 3:
        raise RepsimError(
            f"the model's main output has shape {tuple(tensor.shape)} (token states, not (batch, classes) logits), "
            f"so preserve={preserve!r} does not apply. For an encoder without a head pass preserve='embedding' "
            "(mean-pooled outputs keep their direction) or 'mse'; for token logits pass output=<callable> that "
            "returns (batch, k)."
        )
    raise RepsimError(
        f"the model's main output has shape {tuple(tensor.shape)}; pass output=<callable> returning (batch, k)."
    )


def _preservation_loss(
    preserve: str, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    if preserve == "kl":
        return F.kl_div(
            F.log_softmax(student / temperature, dim=1),
            F.log_softmax(teacher / temperature, dim=1),
            log_target=True,
            reduction="batchmean",
        )
    if preserve == "ce":
        assert labels is not None
        return F.cross_entropy(student, labels)
    if preserve == "embedding":
        return (1.0 - F.cosine_similarity(student, teacher, dim=1)).mean()
    return (student - teacher).square().mean() / teacher.square().mean()


# --- argument checks ------------------------------------------------------------------------------------------


def _choice(value: Any, options: Sequence[str], name: str) -> str:
    if value not in options:
        raise UnknownNameError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}.")
    return str(value)


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RepsimError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _positive_float(value: Any, name: str, allow_zero: bool = False) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise RepsimError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(out) or out < 0 or (out == 0 and not allow_zero):
        raise RepsimError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}.")
    return out


def _differentiable_measure(measure: str | Measure) -> Measure:
    m = make(measure)
    if not m.differentiable:
        from ..measures import list_measures

        usable = [mid for mid in list_measures() if make(mid).differentiable]
        aliases = sorted({a for mid in usable for a in make(mid).aliases})
        raise RepsimError(
            f"{m.id} is not differentiable (rank- or neighbour-based), so it cannot be optimised by gradient "
            f"descent. Shift a differentiable measure, e.g. {', '.join(aliases[:10])} (see `repsim measures`)."
        )
    return m


def _target_matrix(target_map: Any, map_layers: Any) -> tuple[torch.Tensor, list[str]]:
    from ..results import SimilarityMap

    values = target_map.values if isinstance(target_map, SimilarityMap) else target_map
    try:
        matrix = torch.as_tensor(values.detach() if isinstance(values, torch.Tensor) else values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise RepsimError("target_map must be a square matrix of target values (NaN = free entry).") from None
    if map_layers is None or isinstance(map_layers, str) or len(map_layers) < 2:
        raise RepsimError("target_map needs map_layers=: the names of at least two layers the map is over.")
    layers = [str(name) for name in map_layers]
    L = len(layers)
    if matrix.dim() == 0:
        matrix = torch.full((L, L), float(matrix), dtype=torch.float64)
    if matrix.shape != (L, L):
        raise InputShapeError(
            f"target_map has shape {tuple(matrix.shape)} but map_layers names {L} layers; give an {L} x {L} matrix."
        )
    if bool(torch.isinf(matrix).any()):
        raise DegenerateInputError("target_map contains Inf; give finite targets (NaN marks a free entry).")
    free = torch.isnan(matrix)
    off_diagonal = ~torch.eye(L, dtype=torch.bool)
    if bool(free[off_diagonal].all()):
        raise RepsimError("every off-diagonal entry of target_map is NaN (free): nothing to optimise.")
    return matrix, layers


# --- the main function ----------------------------------------------------------------------------------------


@dataclass
class _Eval:
    value: float | None
    map: torch.Tensor | None
    rows: torch.Tensor | None
    agreement: float | None
    kl: float | None
    cosine: float
    cosine_min: float
    accuracy: float | None


def shift(
    model: nn.Module,
    layer: str | None,
    data: Any,
    target: float | None = 0.2,
    reference: Any = None,
    measure: str | Measure = "cka",
    preserve: str = "kl",
    tolerance: float = 0.01,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 128,
    temperature: float = 0.1,
    lambda_init: float = 500.0,
    eval_data: Any = None,
    labels: Any = None,
    seed: int = 0,
    mode: str = "finetune",
    target_map: Any = None,
    map_layers: Sequence[str] | None = None,
    progress: bool = False,
    *,
    eval_labels: Any = None,
    eval_reference: Any = None,
    eval_every: int | None = None,
    criterion: str = "auto",
    keep: str = "best",
    tokens: str = "mean",
    spatial: str = "flatten",
    output: Callable[[Any], torch.Tensor] | None = None,
    rank: int = 8,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    train_mode: bool = False,
    warmup: float = 0.0,
) -> ShiftResult:
    """Fine-tune a copy of ``model`` so that ``measure(layer, reference)`` approaches ``target`` with outputs kept.

    Args:
        model: any model the adapters handle (HuggingFace, timm, a plain ``nn.Module``); never modified.
        layer: the layer whose representation moves (a name as in ``rp.capture``); None with ``target_map``.
        data: training inputs: a tensor (n, ...), a tokenizer batch (dict), an ``(inputs, labels)`` pair, or a
            list of batches as for ``rp.compare`` (batches with equal shapes are pooled and reshuffled every
            epoch; padded text batches of different lengths are sampled within each batch).
        target: the value the measure should reach (pair mode).
        reference: None (the original model's ``layer``, frozen), ``(other_model, other_layer)``, or a float
            tensor (n, d) of reference rows aligned with ``data`` (then ``eval_reference`` for ``eval_data``).
        measure: any differentiable registered measure; CKA-family measures are optimised through minibatch
            CKA with the unbiased HSIC, evaluated with the full-data measure.
        preserve: ``"kl"`` (distillation at ``temperature``), ``"ce"`` (hard labels), ``"embedding"`` (1 -
            cosine of the outputs; mean-pooled token states for a bare encoder), ``"mse"``.
        tolerance: outputs count as kept while the criterion stays within this of the original (accuracy: 0.01
            is one point; agreement >= 1 - tolerance; mean output cosine >= 1 - tolerance).
        steps, lr, batch_size, temperature, lambda_init: the optimisation (AdamW, cosine schedule, gradient
            clipping at ``max_grad_norm``).
        eval_data: held-out inputs for the evaluations and the reported numbers (default: ``data`` itself).
        labels / eval_labels: class labels aligned with ``data`` / ``eval_data`` (or inside their batches).
        seed: shuffling, perturbation initialisation and dropout; the global random state is left unchanged.
        mode: ``"finetune"`` or ``"perturbation"`` (frozen network, :class:`LowRankAffine` edit of ``layer``'s
            output of rank ``rank``, inserted by a forward hook only while it runs).
        target_map / map_layers: a layer x layer target (matrix, number or ``SimilarityMap``; NaN entries are
            free) for the map of ``measure`` between ``map_layers`` of the model being trained.
        progress: print one line per evaluation to stderr.
        eval_every: steps between evaluations (default: one pass over the data, at most ``steps / 10``).
        criterion: ``"auto"``, ``"accuracy"``, ``"agreement"`` or ``"cosine"`` (see :data:`CRITERIA`).
        keep: ``"best"`` returns the evaluated state closest to the target among those that kept the outputs
            (the original counts, at step 0); ``"last"`` the final state.
        tokens / spatial: how the layer's output becomes rows (as in ``rp.capture``).
        output: a callable mapping the model's raw output to the (batch, k) tensor to preserve.
        train_mode: fine-tune in train mode (dropout on, batch-norm statistics updated); by default the copy
            stays in eval mode so that the outputs preserved are the ones the model gives at inference.
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise RepsimError(f"shift needs a torch.nn.Module, got {type(model).__name__}.")
    mode = _choice(mode, MODES, "mode")
    preserve = _choice(preserve, PRESERVE, "preserve")
    criterion = _choice(criterion, CRITERIA, "criterion")
    keep = _choice(keep, KEEP, "keep")
    steps = _positive_int(steps, "steps", minimum=0)
    batch_size = _positive_int(batch_size, "batch_size", minimum=MIN_BATCH)
    lr = _positive_float(lr, "lr")
    temperature = _positive_float(temperature, "temperature")
    lambda_init = _positive_float(lambda_init, "lambda_init")
    tolerance = _positive_float(tolerance, "tolerance", allow_zero=True)
    max_grad_norm = _positive_float(max_grad_norm, "max_grad_norm")
    weight_decay = _positive_float(weight_decay, "weight_decay", allow_zero=True)
    warmup = _positive_float(warmup, "warmup", allow_zero=True)
    if warmup >= 1:
        raise RepsimError(f"warmup is a fraction of the steps in [0, 1), got {warmup!r}.")
    seed = _positive_int(seed, "seed", minimum=0)
    rank = _positive_int(rank, "rank")
    m = _differentiable_measure(measure)
    estimate = _MinibatchMeasure(m)

    map_mode = target_map is not None
    if map_mode:
        if layer is not None:
            raise RepsimError("give either layer= (with target=) or target_map= with map_layers=, not both.")
        if reference is not None:
            raise RepsimError("target_map constrains the map of the model's own layers; reference= does not apply.")
        if mode == "perturbation":
            raise RepsimError("mode='perturbation' edits one layer's output; use it with layer= and target=.")
        T, layers = _target_matrix(target_map, map_layers)
        target_value = None
    else:
        if layer is None or not isinstance(layer, str):
            raise RepsimError("layer must be a layer name (e.g. 'relu3', 'encoder.layer.3'), or pass target_map=.")
        if map_layers is not None:
            raise RepsimError("map_layers= goes with target_map=; for one layer pass layer= and target=.")
        if target is None:
            raise RepsimError("target is None; give the value the measure should reach, e.g. target=0.2.")
        try:
            target_value = float(target)
        except (TypeError, ValueError):
            raise RepsimError(f"target must be a number, got {target!r}.") from None
        if not math.isfinite(target_value):
            raise RepsimError(f"target must be finite, got {target!r}.")
        T = None
        layers = [layer]

    student = copy.deepcopy(model)
    saved_flags = [(module, module.training) for module in model.modules()]
    saved_requires = [p.requires_grad for p in model.parameters()]
    adapter = for_model(student)
    device = _model_device(student)

    chunks = _as_chunks(data, adapter, labels, "data")
    held_out = eval_data is not None
    eval_chunks = _as_chunks(eval_data, adapter, eval_labels, "eval_data") if held_out else chunks
    n_train = sum(c.n for c in chunks)
    n_eval = sum(c.n for c in eval_chunks)
    if n_train < MIN_BATCH or n_eval < MIN_BATCH:
        raise RepsimError(f"shift needs at least {MIN_BATCH} training and evaluation samples (unbiased HSIC).")
    eval_batch = max(batch_size, 256)

    precomputed = reference is not None and not isinstance(reference, tuple)
    if eval_reference is not None and not (precomputed and held_out):
        raise RepsimError(
            "eval_reference= goes with a precomputed reference tensor and eval_data=; with reference=None or "
            "(model, layer) the reference rows of the evaluation data are computed."
        )
    if precomputed and held_out and eval_reference is None:
        raise RepsimError(
            "reference is a precomputed representation of data; pass eval_reference= with the rows for eval_data."
        )
    reference_kwargs = {"batch_size": eval_batch, "tokens": tokens, "spatial": spatial}
    train_reference = _reference_rows(reference, chunks, what="data", **reference_kwargs)
    if held_out:
        eval_source = eval_reference if precomputed else reference
        eval_ref_rows = _reference_rows(eval_source, eval_chunks, what="eval_data", **reference_kwargs)
    else:
        eval_ref_rows = train_reference

    if preserve == "ce" and any(c.labels is None for c in chunks):
        raise RepsimError("preserve='ce' trains on hard labels: pass labels= (or (inputs, labels) batches).")
    eval_has_labels = all(c.labels is not None for c in eval_chunks)

    # --- the original's outputs and rows (the student is still an exact copy) -------------------------------
    student.eval()
    sink: dict[str, dict[str, torch.Tensor]] = {}
    measure_warnings: dict[tuple[type, str], warnings.WarningMessage] = {}

    def receive(batch: dict[str, torch.Tensor]) -> None:
        sink["rows"] = batch

    def run(inputs: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        raw = adapter.forward(inputs)
        out = _preserved_output(adapter, raw, inputs, output, preserve)
        rows = sink.pop("rows")
        if map_mode:
            by_layer = {}
            for name in layers:
                matches = {k: v for k, v in rows.items() if k == name or k.split("#")[0] == name}
                by_layer[name] = _single_layer_rows(matches, name)
            return by_layer, out
        return {layer: _single_layer_rows(rows, layer)}, out  # type: ignore[dict-item]

    perturbation: LowRankAffine | None = None
    handle = None
    layout: str | None = None
    rec = capture(
        student, layers, tokens=tokens, spatial=spatial, grad=True, keep=False, on_batch=receive, eval_mode=False
    )
    devices = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices), rec:
        torch.manual_seed(seed)

        @torch.no_grad()
        def evaluate_pass(which: list[_Chunk]) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
            was_training = student.training
            student.eval()
            rows_out, outs = [], []
            for chunk in which:
                parts: dict[str, list[torch.Tensor]] = {}
                out_parts = []
                for index in chunk.pieces(eval_batch):
                    inputs = _to_device(_take(chunk.inputs, index), device)
                    rows, out = run(inputs)
                    for name, r in rows.items():
                        parts.setdefault(name, []).append(r.detach().float().cpu())
                    out_parts.append(out.detach().float().cpu())
                rows_out.append({name: torch.cat(r) for name, r in parts.items()})
                outs.append(torch.cat(out_parts))
            student.train(was_training)
            return rows_out, outs

        # teacher outputs and (for reference=None) reference rows on the training data
        train_rows, train_out = evaluate_pass(chunks)
        for i, chunk in enumerate(chunks):
            chunk.teacher = train_out[i]
            if not map_mode:
                chunk.reference = train_reference[i] if train_reference is not None else train_rows[i][layer]
        if held_out:
            eval_rows0, eval_out0 = evaluate_pass(eval_chunks)
        else:
            eval_rows0, eval_out0 = train_rows, train_out
        teacher_eval = torch.cat(eval_out0)
        classify = preserve in ("kl", "ce")
        if classify and teacher_eval.shape[1] < 2:
            raise RepsimError(f"preserve={preserve!r} needs class logits (batch, k >= 2); the output has k = 1.")
        eval_labels_all = torch.cat([c.labels for c in eval_chunks]) if eval_has_labels else None  # type: ignore[misc]
        if not map_mode:
            reference_eval = (
                torch.cat(eval_ref_rows) if eval_ref_rows is not None else torch.cat([r[layer] for r in eval_rows0])
            )
        if criterion == "auto":
            criterion = "accuracy" if (classify and eval_has_labels) else ("agreement" if classify else "cosine")
        if criterion in ("accuracy", "agreement") and not classify:
            raise RepsimError(f"criterion={criterion!r} needs class logits; use criterion='cosine'.")
        if criterion == "accuracy" and not eval_has_labels:
            raise RepsimError("criterion='accuracy' needs labels for the evaluation data (eval_labels= or labels=).")

        def quiet(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
            """The full-data measure; its warnings (the same at every evaluation) are collected, issued once."""
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                value = m(X, Y)
            for warning in caught:
                measure_warnings.setdefault((warning.category, str(warning.message)), warning)
            return value

        def summarize(rows_list: list[dict[str, torch.Tensor]], outs: list[torch.Tensor]) -> _Eval:
            out = torch.cat(outs)
            value, values, kept_rows = None, None, None
            if map_mode:
                full = [torch.cat([r[name] for r in rows_list]) for name in layers]
                values = torch.stack(
                    [
                        torch.stack([quiet(full[i], full[j]).double().cpu() for j in range(len(layers))])
                        for i in range(len(layers))
                    ]
                )
            else:
                kept_rows = torch.cat([r[layer] for r in rows_list])
                value = float(quiet(kept_rows, reference_eval))
            cos = F.cosine_similarity(out.double(), teacher_eval.double(), dim=1)
            agreement = kl = accuracy = None
            if classify:
                agreement = float((out.argmax(1) == teacher_eval.argmax(1)).double().mean())
                kl = float(
                    F.kl_div(
                        F.log_softmax(out.double(), 1),
                        F.log_softmax(teacher_eval.double(), 1),
                        log_target=True,
                        reduction="batchmean",
                    )
                )
                if eval_labels_all is not None:
                    accuracy = float((out.argmax(1) == eval_labels_all).double().mean())
            return _Eval(value, values, kept_rows, agreement, kl, float(cos.mean()), float(cos.min()), accuracy)

        before = summarize(eval_rows0, eval_out0)

        # --- what is optimised ---------------------------------------------------------------------------
        if mode == "perturbation":
            for p in student.parameters():
                p.requires_grad_(False)
            perturbation, handle, layout = _attach_perturbation(
                student, adapter, layer, _take(chunks[0].inputs, torch.arange(min(chunks[0].n, MIN_BATCH))), rank, seed
            )  # type: ignore[arg-type]
            sink.pop("rows", None)
            params = list(perturbation.parameters())
        else:
            params = [p for p in student.parameters() if p.requires_grad]
            if not params:
                raise RepsimError("the model has no trainable parameters (requires_grad=False everywhere).")

        try:
            history: list[dict[str, Any]] = []
            lam = lambda_init

            def fidelity(e: _Eval) -> tuple[float, float]:
                if criterion == "accuracy":
                    return float(e.accuracy), float(before.accuracy) - tolerance  # type: ignore[arg-type]
                if criterion == "agreement":
                    return float(e.agreement), 1.0 - tolerance  # type: ignore[arg-type]
                return e.cosine, 1.0 - tolerance

            def distance(e: _Eval) -> float:
                if map_mode:
                    return float(_map_error(e.map, T))  # type: ignore[arg-type]
                return abs(float(e.value) - float(target_value))  # type: ignore[arg-type]

            def record(step: int, e: _Eval, lam_used: float, kept: bool, losses: dict[str, float]) -> None:
                entry: dict[str, Any] = {"step": step, "lambda": lam_used}
                if map_mode:
                    entry["map_error"] = distance(e)
                else:
                    entry["measure"] = e.value
                entry.update(
                    {
                        "agreement": e.agreement,
                        "accuracy": e.accuracy,
                        "kl": e.kl,
                        "cosine": e.cosine,
                        "cosine_min": e.cosine_min,
                        "kept": kept,
                        **losses,
                    }
                )
                history.append(entry)
                if progress:
                    shown = ", ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in entry.items()
                        if v is not None
                    )
                    print(f"shift: {shown}", file=sys.stderr, flush=True)

            record(0, before, lam, True, {})
            best_state = _snapshot(student, perturbation)
            best = (distance(before), 0, before)

            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps, warmup))
            generator = torch.Generator().manual_seed(seed)
            per_epoch = sum(max(1, -(-c.n // batch_size)) for c in chunks)
            every = eval_every if eval_every is not None else max(1, min(per_epoch, -(-steps // 10)))
            every = _positive_int(every, "eval_every")
            batches = _minibatches(chunks, batch_size, generator)
            student.train(train_mode)
            sums: dict[str, float] = {}
            count = 0
            last = before
            for step in range(1, steps + 1):
                chunk, index = next(batches)
                inputs = _to_device(_take(chunk.inputs, index), device)
                rows, out = run(inputs)
                if not all(bool(torch.isfinite(r).all()) for r in (*rows.values(), out)):
                    raise DegenerateInputError(
                        f"training diverged at step {step}: the layer's activations or the outputs are not finite; "
                        "lower lr= or lambda_init=."
                    )
                if map_mode:
                    M = estimate.map([rows[name] for name in layers])
                    target_on_device = T.to(M.device)  # type: ignore[union-attr]
                    free = torch.isnan(target_on_device)
                    similarity = _log_cosh(M - torch.where(free, M.detach(), target_on_device))[~free].mean()
                    estimate_value = float(_map_error(M.detach().cpu(), T))
                else:
                    value = estimate.pair(rows[layer], chunk.reference[index].to(rows[layer].device))  # type: ignore[index]
                    similarity = _log_cosh(value - target_value)
                    estimate_value = float(value.detach())
                teacher = chunk.teacher[index].to(out.device)  # type: ignore[index]
                lab = chunk.labels[index].to(out.device) if chunk.labels is not None else None
                keep_loss = _preservation_loss(preserve, out.float(), teacher.float(), lab, temperature)
                loss = keep_loss + lam * similarity.to(keep_loss.dtype)
                if not bool(torch.isfinite(loss)):
                    raise DegenerateInputError(
                        f"training diverged at step {step}: the objective is {float(loss)}; lower lr= or "
                        "lambda_init=, or check that the layer's representation varies across the minibatch."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                scheduler.step()
                for key, val in (
                    ("preservation_loss", float(keep_loss.detach())),
                    ("similarity_loss", float(similarity.detach())),
                    ("minibatch_map_error" if map_mode else "minibatch_value", estimate_value),
                ):
                    sums[key] = sums.get(key, 0.0) + val
                count += 1
                if step % every == 0 or step == steps:
                    rows_e, outs_e = evaluate_pass(eval_chunks)
                    finite = [bool(torch.isfinite(t).all()) for r in rows_e for t in (*r.values(),)]
                    if not all(finite) or not all(bool(torch.isfinite(o).all()) for o in outs_e):
                        raise DegenerateInputError(
                            f"training diverged at step {step}: the evaluation gives non-finite activations or "
                            "outputs; lower lr= or lambda_init=."
                        )
                    last = summarize(rows_e, outs_e)
                    score, threshold = fidelity(last)
                    kept = score >= threshold - 1e-12
                    losses = {k: v / count for k, v in sums.items()}
                    losses["lr"] = float(scheduler.get_last_lr()[0])
                    record(step, last, lam, kept, losses)
                    sums, count = {}, 0
                    lam = lam / LAMBDA_FACTOR if kept else lam * LAMBDA_FACTOR
                    if kept and distance(last) < best[0]:
                        best = (distance(last), step, last)
                        best_state = _snapshot(student, perturbation)
            if keep == "best":
                _restore(student, perturbation, best_state)
                final_step, final = best[1], best[2]
            else:
                final_step, final = steps, last
            score, threshold = fidelity(final)
            final_kept = score >= threshold - 1e-12
        finally:
            if handle is not None:
                handle.remove()
    # restore the copy's flags to the original's (train / eval, requires_grad)
    copies = dict(zip(model.modules(), student.modules(), strict=True))
    for module, training in saved_flags:
        copies[module].training = training
    for p, requires in zip(student.parameters(), saved_requires, strict=True):
        p.requires_grad_(requires)
    if perturbation is not None:
        perturbation.requires_grad_(False)

    representations: dict[str, torch.Tensor] = {}
    if not map_mode:
        representations = {
            "before": before.rows,  # type: ignore[dict-item]
            "after": final.rows,  # type: ignore[dict-item]
            "reference": reference_eval,
        }
    fingerprints = {"original": state_dict_fingerprint(model), "returned": state_dict_fingerprint(student)}
    result = ShiftResult(
        measure=m.id,
        layer=layer,
        target=target_value,
        mode=mode,
        preserve=preserve,
        criterion=criterion,
        tolerance=tolerance,
        model=student,
        measure_before=before.value,
        measure_after=final.value,
        agreement=final.agreement,
        kl=final.kl,
        cosine=final.cosine,
        cosine_min=final.cosine_min,
        accuracy_before=before.accuracy,
        accuracy_after=final.accuracy,
        kept=final_kept,
        best_step=final_step,
        steps=steps,
        lambda_final=lam,
        history=history,
        map_layers=layers if map_mode else None,
        target_map=T.float() if map_mode else None,  # type: ignore[union-attr]
        map_before=before.map.float() if map_mode else None,  # type: ignore[union-attr]
        map_after=final.map.float() if map_mode else None,  # type: ignore[union-attr]
        perturbation=perturbation,
        reference="" if map_mode else _describe_reference(reference, layer),
        objective=estimate.description,
        n_train=n_train,
        n_eval=n_eval,
        held_out=held_out,
        seconds=time.perf_counter() - started,
        seed=seed,
        fingerprints=fingerprints,
        representations=representations,
    )
    result._layout = layout
    for (category, message), _ in measure_warnings.items():
        warnings.warn(message, category, stacklevel=2)  # once per shift, pointing at the caller
    return result


def _schedule(steps: int, warmup: float) -> Callable[[int], float]:
    """Learning-rate factor at step s: linear warm-up over ``ceil(warmup * steps)`` steps, then cosine to 0."""
    ramp = math.ceil(warmup * steps)

    def factor(s: int) -> float:
        if s < ramp:
            return (s + 1) / (ramp + 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(s - ramp, steps - ramp) / max(steps - ramp, 1)))

    return factor


def _minibatches(
    chunks: list[_Chunk], batch_size: int, generator: torch.Generator
) -> Iterator[tuple[_Chunk, torch.Tensor]]:
    """Endless shuffled minibatches of near-equal size (>= MIN_BATCH rows), every chunk once per epoch."""
    for chunk in chunks:
        if chunk.n < MIN_BATCH:
            raise RepsimError(
                f"a batch of {chunk.n} samples cannot be pooled with the others (different shapes) and is smaller "
                f"than {MIN_BATCH}, the least unbiased HSIC needs; pad batches to one length or drop it."
            )
    while True:
        plan: list[tuple[_Chunk, torch.Tensor]] = []
        for chunk in chunks:
            order = torch.randperm(chunk.n, generator=generator)
            pieces = max(1, -(-chunk.n // batch_size))
            plan.extend((chunk, piece) for piece in torch.tensor_split(order, pieces))
        for i in torch.randperm(len(plan), generator=generator).tolist():
            yield plan[i]


@torch.no_grad()
def _attach_perturbation(
    model: nn.Module, adapter: Adapter, layer: str, sample_inputs: Any, rank: int, seed: int
) -> tuple[LowRankAffine, torch.utils.hooks.RemovableHandle, str | None]:
    """Insert a fresh :class:`LowRankAffine` on ``layer``'s output with a forward hook that runs before any
    other hook of the layer (so captures see the edited output); returns it, the hook handle and the layout."""
    module = model.get_submodule(layer)
    seen: dict[str, Any] = {}

    def grab(mod: nn.Module, args: Any, out: Any) -> None:
        seen["out"] = out[0] if isinstance(out, tuple | list) and out else out

    grab_handle = module.register_forward_hook(grab)
    try:
        adapter.forward(_to_device(sample_inputs, _model_device(model)))
    finally:
        grab_handle.remove()
    sample = seen.get("out")
    if not isinstance(sample, torch.Tensor) or not sample.is_floating_point() or sample.dim() < 2:
        raise RepsimError(
            f"layer {layer!r} does not return a floating-point (batch, ...) tensor; mode='perturbation' cannot "
            "edit it. Pick another layer, or use mode='finetune'."
        )
    layout = adapter.layout(layer)
    if sample.dim() == 4 and layout not in ("NCHW", "NHWC"):
        layout = adapter.spatial_layout
    generator = torch.Generator().manual_seed(seed)
    perturbation = LowRankAffine(_feature_count(sample, layout), rank, generator).to(device=sample.device)
    handle = module.register_forward_hook(_perturbation_hook(perturbation, layout, layer), prepend=True)
    return perturbation, handle, layout


def _snapshot(student: nn.Module, perturbation: nn.Module | None) -> dict[str, torch.Tensor]:
    source = perturbation if perturbation is not None else student
    return {k: v.detach().clone() for k, v in source.state_dict().items()}


def _restore(student: nn.Module, perturbation: nn.Module | None, state: dict[str, torch.Tensor]) -> None:
    (perturbation if perturbation is not None else student).load_state_dict(state)
