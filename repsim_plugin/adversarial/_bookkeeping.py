"""The shift's bookkeeping between evaluations: learning-rate and lambda schedules, "outputs kept", the best state,
the history. Small objects the runner in :mod:`.shifting` calls at each step and evaluation.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import RepsimError
from .objective import OutputChecks
from .targets import Evaluation, MapTarget, PairTarget

__all__ = [
    "LAMBDA_FACTOR",
    "BestState",
    "Fidelity",
    "History",
    "LambdaSchedule",
    "LossMeans",
    "lr_schedule",
    "resolve_criterion",
]

#: The paper's lambda update factor (multiply when outputs drift, divide when they are kept).
LAMBDA_FACTOR = 0.8


def lr_schedule(steps: int, warmup: float) -> Callable[[int], float]:
    """Learning-rate factor at step s: linear warm-up over ``ceil(warmup * steps)`` steps, then cosine to 0."""
    ramp = math.ceil(warmup * steps)

    def factor(s: int) -> float:
        if s < ramp:
            return (s + 1) / (ramp + 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(s - ramp, steps - ramp) / max(steps - ramp, 1)))

    return factor


class LambdaSchedule:
    """The paper's dynamic weight of the similarity loss: x0.8 after an evaluation that lost the outputs, /0.8 else."""

    def __init__(self, initial: float) -> None:
        self.value = initial

    def update(self, kept: bool) -> None:
        self.value = self.value / LAMBDA_FACTOR if kept else self.value * LAMBDA_FACTOR


def resolve_criterion(criterion: str, classify: bool, has_labels: bool) -> str:
    """What "outputs kept" means for this model and evaluation data (``"auto"`` resolved; see ``CRITERIA``)."""
    if criterion == "auto":
        criterion = "accuracy" if (classify and has_labels) else ("agreement" if classify else "cosine")
    if criterion in ("accuracy", "agreement") and not classify:
        raise RepsimError(f"criterion={criterion!r} needs class logits; use criterion='cosine'.")
    if criterion == "accuracy" and not has_labels:
        raise RepsimError("criterion='accuracy' needs labels for the evaluation data (eval_labels= or labels=).")
    return criterion


class Fidelity:
    """Whether an evaluation kept the outputs: the criterion's score against the original's, within tolerance."""

    def __init__(self, criterion: str, tolerance: float, before: OutputChecks) -> None:
        self.criterion, self.tolerance, self.before = criterion, tolerance, before

    def kept(self, e: Evaluation) -> bool:
        o = e.outputs
        if self.criterion == "accuracy":  # resolve_criterion made sure the evaluation data have labels
            assert o.accuracy is not None and self.before.accuracy is not None
            score, threshold = o.accuracy, self.before.accuracy - self.tolerance
        elif self.criterion == "agreement":  # ... and that the model is a classifier
            assert o.agreement is not None
            score, threshold = o.agreement, 1.0 - self.tolerance
        else:
            score, threshold = o.cosine, 1.0 - self.tolerance
        return score >= threshold - 1e-12


class BestState:
    """``keep="best"``: the evaluated state closest to the target among those that kept the outputs (step 0 counts)."""

    def __init__(self, source: nn.Module, distance: float, before: Evaluation) -> None:
        self.source = source
        self.distance, self.step, self.evaluation = distance, 0, before
        self.state = self._snapshot()

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.source.state_dict().items()}

    def offer(self, step: int, e: Evaluation, distance: float) -> None:
        if distance < self.distance:
            self.distance, self.step, self.evaluation = distance, step, e
            self.state = self._snapshot()

    def restore(self) -> tuple[int, Evaluation]:
        self.source.load_state_dict(self.state)
        return self.step, self.evaluation


class History(list[dict[str, Any]]):
    """One entry per evaluation (step, lambda, the measure or map error, the output checks, kept, the losses)."""

    def __init__(self, target: PairTarget | MapTarget, progress: bool) -> None:
        super().__init__()
        self.target, self.progress = target, progress

    def record(self, step: int, e: Evaluation, lam: float, kept: bool, losses: dict[str, float]) -> None:
        o = e.outputs
        entry: dict[str, Any] = {"step": step, "lambda": lam, **self.target.history_entry(e)}
        entry.update(
            {
                "agreement": o.agreement,
                "accuracy": o.accuracy,
                "kl": o.kl,
                "cosine": o.cosine,
                "cosine_min": o.cosine_min,
            }
        )
        entry.update({"kept": kept, **losses})
        self.append(entry)
        if self.progress:
            shown = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items() if v is not None
            )
            print(f"shift: {shown}", file=sys.stderr, flush=True)


class LossMeans:
    """Training losses summed between two evaluations, reported as means."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / self.count for k, v in self.sums.items()}
