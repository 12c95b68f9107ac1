"""What :func:`~repsim_plugin.adversarial.shift` returns: the numbers before and after, the history, the model."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import RepsimError
from .perturbation import perturbation_hook

__all__ = ["ShiftResult", "judged_on_seen_data", "map_error", "not_reached_message", "seen_data_message"]


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
    #: Whether the returned state is within ``target_tolerance`` of the target (map targets: map error within it),
    #: on the evaluation data. False comes with a :class:`~repsim_plugin.errors.TargetNotReachedWarning`.
    reached: bool = False
    target_tolerance: float = 0.05
    #: Where the reported numbers come from: "eval_data", "held out from data (...)", or the training data.
    evaluated_on: str = ""
    #: Positions in ``data`` (in data order) of the samples held out for evaluation (None with eval_data=).
    held_out_indices: list[int] | None = field(default=None, repr=False)
    #: The step at which the run stopped because the target was reached with outputs kept (None: ran to the end).
    stopped_at: int | None = None
    steps_run: int = 0
    #: The optimiser's own estimate at ``best_step`` (mean minibatch value, or minibatch map error, since the
    #: evaluation before): the estimator ``objective`` names, next to ``measure_after`` (the full-data measure).
    minibatch_estimate: float | None = None
    mixup: float = 0.0
    #: Whether the similarity term also saw the mixed inputs (``mixup_similarity``; False when mixup was off).
    mixup_similarity: bool = False
    #: The learning rate used (``lr=None`` resolved by the number of trainable parameters).
    lr: float = 0.0
    #: The evaluated state closest to the target whether or not it kept the outputs (distance, step, checks).
    closest: dict[str, Any] = field(default_factory=dict, repr=False)
    #: The estimator of the measure that every evaluation, ``reached`` and ``measure_before`` / ``measure_after``
    #: use: the measure asked for, or debiased CKA where biased CKA is inflated on so few evaluation samples
    #: (``estimator_reason`` says why; ``as_requested`` then holds the asked-for measure's before / after).
    estimator: str = ""
    estimator_reason: str = ""
    as_requested: dict[str, float] | None = None
    #: Evaluation rows (CPU, float32): "before" / "after" of the layer and "reference"; not part of to_dict().
    representations: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    #: The layout ("NCHW", "NHWC", ...) of the perturbed layer's output: where :meth:`perturbed` finds features.
    layout: str | None = field(default=None, repr=False)

    @property
    def map_error_before(self) -> float | None:
        """Mean |map - target| over the entries the target constrains (NaN entries are free), original model."""
        return map_error(self.map_before, self.target_map)

    @property
    def map_error_after(self) -> float | None:
        return map_error(self.map_after, self.target_map)

    @contextlib.contextmanager
    def perturbed(self) -> Iterator[nn.Module]:
        """Apply the learned perturbation to ``self.model`` inside the block (the hook is removed on exit)."""
        if self.perturbation is None or self.layer is None:
            raise RepsimError("this result has no perturbation (mode='finetune'); use result.model directly.")
        module = self.model.get_submodule(self.layer)
        hook = perturbation_hook(self.perturbation, self.layout, self.layer)
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
            "evaluated_on": self.evaluated_on,
            "held_out_indices": None if self.held_out_indices is None else list(self.held_out_indices),
            "reached": self.reached,
            "target_tolerance": self.target_tolerance,
            "stopped_at": self.stopped_at,
            "steps_run": self.steps_run,
            "minibatch_estimate": self.minibatch_estimate,
            "estimator": self.estimator,
            "estimator_reason": self.estimator_reason,
            "as_requested": None if self.as_requested is None else dict(self.as_requested),
            "mixup": self.mixup,
            "mixup_similarity": self.mixup_similarity,
            "lr": self.lr,
            "closest": dict(self.closest),
            "seconds": self.seconds,
            "seed": self.seed,
            "fingerprints": dict(self.fingerprints),
            "history": [dict(entry) for entry in self.history],
        }

    def __repr__(self) -> str:
        where = f"{self.n_eval} {'held-out' if self.held_out else 'training'} samples"
        if self.map_layers is not None:
            what = f"map error {self.map_error_before:.3f} -> {self.map_error_after:.3f} on {where}"
        else:
            what = f"{self.measure} {self.measure_before:.3f} -> {self.measure_after:.3f} on {where}"
            if self.estimator_reason and self.as_requested is not None:
                asked = self.as_requested
                what = (
                    f"{self.estimator} {self.measure_before:.3f} -> {self.measure_after:.3f} on {where} "
                    f"({self.estimator_reason}; {self.measure} {asked['before']:.3f} -> {asked['after']:.3f})"
                )
        goal = "map error" if self.map_layers is not None else f"target {self.target:g}"
        verdict = "reached" if self.reached else "NOT reached"
        estimate = "" if self.minibatch_estimate is None else f"; {self.objective}: {self.minibatch_estimate:.3f}"
        checks = ", ".join(
            f"{name} {value:.3f}"
            for name, value in (
                ("agreement", self.agreement),
                ("accuracy", self.accuracy_after),
                ("cosine", self.cosine),
            )
            if value is not None
        )
        if self.accuracy_before is not None and self.accuracy_after is not None:
            after = f"accuracy {self.accuracy_after:.3f}"
            checks = checks.replace(after, f"accuracy {self.accuracy_before:.3f} -> {self.accuracy_after:.3f}")
        return (
            f"ShiftResult({self.layer or self.map_layers}: {what} ({goal} +- {self.target_tolerance:g} {verdict})"
            f"{estimate}; {checks}; {self.mode}, step {self.best_step} of {self.steps_run} run ({self.steps} budget))"
        )


def map_error(values: torch.Tensor | None, target: torch.Tensor | None) -> float | None:
    """Mean |values - target| over the entries the target constrains (NaN entries of the target are free)."""
    if values is None or target is None:
        return None
    free = torch.isnan(target)
    return float((values - target).abs()[~free].mean())


def not_reached_message(result: ShiftResult) -> str:
    """What :class:`TargetNotReachedWarning` says: how close the run got with outputs kept, and what to try."""
    where = f"{result.n_eval} {'held-out' if result.held_out else 'training'} samples"
    if result.map_layers is not None:
        got = f"map error {result.map_error_after:.3f}"
        goal = f"map error <= {result.target_tolerance:g}"
    else:
        got = f"{result.measure} {result.measure_after:.3f}"
        goal = f"{result.target:g} +- {result.target_tolerance:g}"
    closest = result.closest
    closer = ""
    if closest and closest.get("step") not in (None, result.best_step):
        shown = closest["value"] if closest.get("value") is not None else closest["distance"]
        if result.criterion.startswith("cosine") and closest.get(result.criterion) is not None:
            name = result.criterion  # what the criterion judged: the mean or the smallest output cosine
        else:
            name = "agreement" if closest.get("agreement") is not None else "cosine"
        closer = (
            f" The closest state overall ({shown:.3f} at step {closest['step']}) lost the outputs "
            f"({name} {closest[name]:.3f})."
        )
    return (
        f"shift did not reach the target: with the outputs kept ({result.criterion} within {result.tolerance:g}) the "
        f"best state (step {result.best_step} of {result.steps_run}) has {got} on {where}; the target is {goal}."
        f"{closer} Try more steps (steps={max(2 * result.steps, 100)}), a larger target_tolerance=, a larger "
        "tolerance= on the outputs, or mode='perturbation' (a frozen network with an edit of the layer's output)."
    )


def judged_on_seen_data(result: ShiftResult) -> bool:
    """Held out of ``data`` (not ``eval_data``), with labels, and not one of at least 50 samples misclassified."""
    from_data = result.held_out and result.evaluated_on.startswith("held out")
    return bool(from_data and result.n_eval >= 50 and result.accuracy_before == 1.0 and result.agreement is not None)


def seen_data_message(result: ShiftResult) -> str:
    """What :class:`SeenEvaluationDataWarning` says (when :func:`judged_on_seen_data`): why, and what to pass."""
    return (
        f"the original model classifies all {result.n_eval} samples held out of data correctly (accuracy "
        f"1.000): they were probably in its training data, where the output checks (after the shift: agreement "
        f"{result.agreement:.3f}, accuracy {result.accuracy_after:.3f}) cannot see what the shift costs on inputs "
        "the model never saw (a digits CNN kept accuracy 1.000 there while its test accuracy fell 0.971 -> "
        "0.951). Pass eval_data= and eval_labels= from data the model was not trained on."
    )
