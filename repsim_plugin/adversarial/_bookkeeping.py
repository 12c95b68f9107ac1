"""The shift's bookkeeping between evaluations: learning-rate and lambda schedules, "outputs kept", the best state,
the history. Small objects the runner in :mod:`.shifting` calls at each step and evaluation.
"""

from __future__ import annotations

import math
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
    "ProgressBar",
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
        criterion = ("agreement+accuracy" if has_labels else "agreement") if classify else "cosine"
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
        if self.criterion == "agreement+accuracy":
            assert o.agreement is not None and o.accuracy is not None and self.before.accuracy is not None
            agreement_kept = o.agreement >= 1.0 - self.tolerance - 1e-12
            return agreement_kept and o.accuracy >= self.before.accuracy - self.tolerance - 1e-12
        if self.criterion == "accuracy":  # resolve_criterion made sure the evaluation data have labels
            assert o.accuracy is not None and self.before.accuracy is not None
            score, threshold = o.accuracy, self.before.accuracy - self.tolerance
        elif self.criterion == "agreement":  # ... and that the model is a classifier
            assert o.agreement is not None
            score, threshold = o.agreement, 1.0 - self.tolerance
        else:
            score, threshold = self._cosine(o), 1.0 - self.tolerance
        return score >= threshold - 1e-12

    def _cosine(self, o: OutputChecks) -> float:
        """The cosine the criterion judges: the smallest (``cosine_min``) or the mean one."""
        return o.cosine_min if self.criterion == "cosine_min" else o.cosine

    def score(self, e: Evaluation) -> float:
        """How close the outputs are to the original's (higher is closer): agreement (+ accuracy), or the (mean or
        smallest) cosine."""
        o = e.outputs
        if self.criterion in ("agreement", "agreement+accuracy", "accuracy") and o.agreement is not None:
            return o.agreement + (o.accuracy if o.accuracy is not None else 0.0)
        return self._cosine(o)


class BestState:
    """``keep="best"``: the evaluated state closest to the target among those that kept the outputs (step 0 counts).

    Distances within ``band`` of the target count as equal; among those states the one whose outputs are closest
    to the original's (``Fidelity.score``) wins: once the target is reached, further steps may only repair outputs.
    """

    def __init__(self, source: nn.Module, distance: float, before: Evaluation, band: float = 0.0) -> None:
        self.source, self.band = source, band
        self.distance, self.step, self.evaluation = distance, 0, before
        self.key: tuple[float, float] = (max(distance, band), 0.0)
        self.state = self._snapshot()

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.source.state_dict().items()}

    def offer(self, step: int, e: Evaluation, distance: float, score: float = 0.0) -> None:
        key = (max(distance, self.band), -score)
        if key < self.key:
            self.key, self.distance, self.step, self.evaluation = key, distance, step, e
            self.state = self._snapshot()

    def restore(self) -> tuple[int, Evaluation]:
        self.source.load_state_dict(self.state)
        return self.step, self.evaluation


class History(list[dict[str, Any]]):
    """One entry per evaluation (step, lambda, the measure or map error, the output checks, kept, the losses)."""

    def __init__(self, target: PairTarget | MapTarget) -> None:
        super().__init__()
        self.target = target

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


class ProgressBar:
    """A tqdm bar over the steps: the minibatch measure, the last evaluation (measure, agreement or cosine), lambda.

    Disabled (``progress=False``), it does nothing and tqdm is not imported."""

    def __init__(self, enabled: bool, total: int, target: PairTarget | MapTarget, criterion: str) -> None:
        self.bar: Any = None
        self.target, self.criterion = target, criterion
        self.shown: dict[str, str] = {}
        if enabled and total > 0:
            from tqdm.auto import tqdm

            what = "map" if isinstance(target, MapTarget) else str(target.layer)
            self.bar = tqdm(total=total, desc=f"shift {what}", unit="step", leave=False)

    def step(self, values: dict[str, float], lam: float) -> None:
        if self.bar is None:
            return
        key = self.target.minibatch_key
        self.shown["batch"] = f"{values[key]:.3f}"
        self.shown["lambda"] = f"{lam:.3g}"
        self.bar.set_postfix(self.shown, refresh=False)
        self.bar.update(1)

    def evaluation(self, e: Evaluation, kept: bool) -> None:
        if self.bar is None:
            return
        measured = e.value if e.value is not None else self.target.distance(e)
        self.shown["held-out"] = f"{measured:.3f}"
        o = e.outputs
        if o.agreement is not None:
            self.shown["agree"] = f"{o.agreement:.3f}"
        elif self.criterion == "cosine_min":
            self.shown["cos min"] = f"{o.cosine_min:.3f}"
        else:
            self.shown["cos"] = f"{o.cosine:.3f}"
        self.shown["kept"] = "yes" if kept else "no"
        self.bar.set_postfix(self.shown)  # an evaluation is worth a refresh

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
