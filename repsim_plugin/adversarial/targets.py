"""What a shift drives the measure toward: one value against a reference (:class:`PairTarget`), or a whole layer x
layer map of the network being trained (:class:`MapTarget`).

The runner in :mod:`.shifting` is the same for both; a target says which layers it reads, how a minibatch
becomes the similarity loss, how the evaluation data become the measured value (or map), how far an evaluation
is from the goal, and what it adds to the history and the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._utils.checks import Where, check_one
from .._utils.names import module_of
from ..errors import DegenerateInputError, InputShapeError, RepsimError
from ._data import Chunk, capture_rows, single_layer_rows, split_like
from .objective import MinibatchMeasure, OutputChecks, log_cosh
from .result import map_error

__all__ = ["TARGET_PARAMS", "Evaluation", "MapTarget", "MixedRows", "PairTarget", "make_target"]


def _finite(value: Any) -> bool:
    return math.isfinite(float(value))


#: The one constraint a pair target's value has (a map target takes a matrix, checked by :func:`target_matrix`).
TARGET_PARAMS = {"target": Where(_finite, "finite (a real number)", bad=(float("nan"), float("inf"), "high"))}

Rows = dict[str, torch.Tensor]
MeasureFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Evaluation:
    """One evaluation on the evaluation data: the measured value (pair) or map, the layer's rows, the outputs."""

    value: float | None
    map: torch.Tensor | None
    rows: torch.Tensor | None
    outputs: OutputChecks


@dataclass
class MixedRows:
    """The layer rows of one minibatch's mixed inputs (``mixup_similarity``): the copy's, and for a pair target the
    original's as reference; the similarity loss then runs on the real and the mixed rows together."""

    rows: Rows
    reference: torch.Tensor | None


# --- one value against a reference ------------------------------------------------------------------------------


def describe_reference(reference: Any, layer: str | None) -> str:
    if reference is None:
        return f"the original model's {layer!r} (frozen copy)"
    if isinstance(reference, tuple):
        return f"{type(reference[0]).__name__}'s {reference[1]!r}"
    return "a precomputed representation"


def reference_rows(
    reference: Any, chunks: list[Chunk], *, what: str, batch_size: int, tokens: str, spatial: str
) -> list[torch.Tensor] | None:
    """Per-chunk reference rows for ``(other_model, other_layer)`` or a precomputed tensor; None: the original."""
    if reference is None:
        return None
    if isinstance(reference, tuple) and len(reference) == 2 and isinstance(reference[0], nn.Module):
        other, other_layer = reference
        if not isinstance(other_layer, str):
            raise RepsimError("reference=(model, layer) needs the layer as a name, e.g. (model_b, 'relu3').")
        rows = capture_rows(other, [other_layer], chunks, batch_size, tokens, spatial)
        return [single_layer_rows(r, other_layer) for r in rows]
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
    return split_like(tensor.float().cpu(), chunks)


def _check_eval_reference(reference: Any, eval_reference: Any, held_out: bool) -> bool:
    """Whether ``reference`` is precomputed rows; raise when ``eval_reference`` does not go with it."""
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
    return precomputed


class PairTarget:
    """``measure(layer, reference)`` toward one value; the reference is the original's layer unless given."""

    minibatch_key = "minibatch_value"

    def __init__(self, layer: str, value: float, reference: Any, eval_reference: Any) -> None:
        self.layer = layer
        self.value = value
        self.reference = reference
        self.eval_reference = eval_reference
        self.layers = [layer]
        self._train_reference: list[torch.Tensor] | None = None
        self._eval_reference_rows: list[torch.Tensor] | None = None
        self.reference_eval: torch.Tensor | None = None

    def prepare(self, chunks: list[Chunk], eval_chunks: list[Chunk], held_out: bool, **capture: Any) -> None:
        """Reference rows of the training and evaluation data (None where they come from the original)."""
        precomputed = _check_eval_reference(self.reference, self.eval_reference, held_out)
        self._train_reference = reference_rows(self.reference, chunks, what="data", **capture)
        if held_out:
            source = self.eval_reference if precomputed else self.reference
            self._eval_reference_rows = reference_rows(source, eval_chunks, what="eval_data", **capture)
        else:
            self._eval_reference_rows = self._train_reference

    def attach(self, chunks: list[Chunk], train_rows: list[Rows], eval_rows: list[Rows]) -> None:
        """Give each training chunk its reference rows and keep the evaluation reference (the original's rows)."""
        for i, chunk in enumerate(chunks):
            chunk.reference = (
                self._train_reference[i] if self._train_reference is not None else train_rows[i][self.layer]
            )
        if self._eval_reference_rows is not None:
            self.reference_eval = torch.cat(self._eval_reference_rows)
        else:
            self.reference_eval = torch.cat([r[self.layer] for r in eval_rows])

    def select(self, rows: Rows) -> Rows:
        return {self.layer: single_layer_rows(rows, self.layer)}

    def loss(
        self, estimate: MinibatchMeasure, rows: Rows, chunk: Chunk, index: torch.Tensor, mixed: MixedRows | None = None
    ) -> tuple[torch.Tensor, float]:
        """The similarity loss on one minibatch (with ``mixed``: and its mixed inputs) and the minibatch value."""
        assert chunk.reference is not None
        X, Y = rows[self.layer], chunk.reference[index].to(rows[self.layer].device)
        if mixed is not None:
            assert mixed.reference is not None
            X, Y = torch.cat([X, mixed.rows[self.layer]]), torch.cat([Y, mixed.reference.to(Y)])
        value = estimate.pair(X, Y)
        return log_cosh(value - self.value), float(value.detach())

    def evaluate(self, rows_list: list[Rows], measure: MeasureFn, outputs: OutputChecks) -> Evaluation:
        assert self.reference_eval is not None
        kept_rows = torch.cat([r[self.layer] for r in rows_list])
        return Evaluation(float(measure(kept_rows, self.reference_eval)), None, kept_rows, outputs)

    def distance(self, e: Evaluation) -> float:
        assert e.value is not None
        return abs(float(e.value) - float(self.value))

    def history_entry(self, e: Evaluation) -> dict[str, Any]:
        return {"measure": e.value}

    def result_fields(self, before: Evaluation, final: Evaluation) -> dict[str, Any]:
        assert self.reference_eval is not None and before.rows is not None and final.rows is not None
        return {
            "layer": self.layer,
            "target": self.value,
            "measure_before": before.value,
            "measure_after": final.value,
            "reference": describe_reference(self.reference, self.layer),
            "representations": {"before": before.rows, "after": final.rows, "reference": self.reference_eval},
        }


# --- a layer x layer map ----------------------------------------------------------------------------------------


def target_matrix(target_map: Any, map_layers: Any) -> tuple[torch.Tensor, list[str]]:
    """The (L, L) float64 target (NaN = free entry) and the L layer names it is over."""
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


class MapTarget:
    """The map of the measure between ``layers`` of the model being trained toward a target matrix."""

    minibatch_key = "minibatch_map_error"

    def __init__(self, matrix: torch.Tensor, layers: list[str], eval_reference: Any) -> None:
        self.matrix = matrix
        self.layers = layers
        self.eval_reference = eval_reference

    def prepare(self, chunks: list[Chunk], eval_chunks: list[Chunk], held_out: bool, **capture: Any) -> None:
        _check_eval_reference(None, self.eval_reference, held_out)

    def attach(self, chunks: list[Chunk], train_rows: list[Rows], eval_rows: list[Rows]) -> None:
        """Nothing to keep: the map compares the layers of the model being trained with each other."""

    def select(self, rows: Rows) -> Rows:
        by_layer = {}
        for name in self.layers:
            matches = {k: v for k, v in rows.items() if k == name or module_of(k) == name}
            by_layer[name] = single_layer_rows(matches, name)
        return by_layer

    def loss(
        self, estimate: MinibatchMeasure, rows: Rows, chunk: Chunk, index: torch.Tensor, mixed: MixedRows | None = None
    ) -> tuple[torch.Tensor, float]:
        """Mean log-cosh over the constrained entries of the minibatch map (with ``mixed``: on the real and the
        mixed inputs' rows together), and the minibatch map error."""
        if mixed is not None:
            rows = {name: torch.cat([rows[name], mixed.rows[name]]) for name in self.layers}
        M = estimate.map([rows[name] for name in self.layers])
        target_on_device = self.matrix.to(M.device)
        free = torch.isnan(target_on_device)
        similarity = log_cosh(M - torch.where(free, M.detach(), target_on_device))[~free].mean()
        return similarity, self._error(M.detach().cpu())

    def evaluate(self, rows_list: list[Rows], measure: MeasureFn, outputs: OutputChecks) -> Evaluation:
        full = [torch.cat([r[name] for r in rows_list]) for name in self.layers]
        L = len(self.layers)
        values = torch.stack(
            [torch.stack([measure(full[i], full[j]).double().cpu() for j in range(L)]) for i in range(L)]
        )
        return Evaluation(None, values, None, outputs)

    def distance(self, e: Evaluation) -> float:
        assert e.map is not None
        return self._error(e.map)

    def _error(self, values: torch.Tensor) -> float:
        error = map_error(values, self.matrix)
        assert error is not None
        return float(error)

    def history_entry(self, e: Evaluation) -> dict[str, Any]:
        return {"map_error": self.distance(e)}

    def result_fields(self, before: Evaluation, final: Evaluation) -> dict[str, Any]:
        assert before.map is not None and final.map is not None
        return {
            "layer": None,
            "target": None,
            "measure_before": before.value,
            "measure_after": final.value,
            "map_layers": self.layers,
            "target_map": self.matrix.float(),
            "map_before": before.map.float(),
            "map_after": final.map.float(),
            "reference": "",
        }


def make_target(
    *,
    layer: Any,
    target: Any,
    reference: Any,
    eval_reference: Any,
    target_map: Any,
    map_layers: Sequence[str] | None,
    mode: str,
) -> PairTarget | MapTarget:
    """The target the arguments of :func:`~repsim_plugin.adversarial.shift` describe, checked."""
    if target_map is not None:
        if layer is not None:
            raise RepsimError("give either layer= (with target=) or target_map= with map_layers=, not both.")
        if reference is not None:
            raise RepsimError("target_map constrains the map of the model's own layers; reference= does not apply.")
        if mode == "perturbation":
            raise RepsimError("mode='perturbation' edits one layer's output; use it with layer= and target=.")
        return MapTarget(*target_matrix(target_map, map_layers), eval_reference)
    if layer is None or not isinstance(layer, str):
        raise RepsimError("layer must be a layer name (e.g. 'relu3', 'encoder.layer.3'), or pass target_map=.")
    if map_layers is not None:
        raise RepsimError("map_layers= goes with target_map=; for one layer pass layer= and target=.")
    if target is None:
        raise RepsimError("target is None; give the value the measure should reach, e.g. target=0.2.")
    check_one(TARGET_PARAMS, "target", target)
    return PairTarget(layer, float(target), reference, eval_reference)
