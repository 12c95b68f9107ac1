"""The options of one shift (:class:`ShiftConfig`), their constraints, and the defaults chosen from the data.

What :func:`~repsim_plugin.adversarial.shift` documents as its options lives here, checked on construction; the
runner in :mod:`._runner` reads them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from .._utils.checks import Bool, Callable_, Choice, Float, Instance, Int, Optional, check_params
from ..capture import SPATIAL_POLICIES, TOKEN_POLICIES
from ..measures import Measure
from ._data import MIN_BATCH
from .objective import PRESERVE

__all__ = [
    "AUTO_EPOCHS",
    "AUTO_LAMBDA",
    "AUTO_LR",
    "AUTO_STEPS_MAX",
    "AUTO_STEPS_MIN",
    "AUTO_WARMUP",
    "CRITERIA",
    "EVALUATIONS",
    "KEEP",
    "MODES",
    "POLISH_EVALUATIONS",
    "POLISH_FRACTION",
    "SHIFT_PARAMS",
    "STOP_FRACTION",
    "ShiftConfig",
    "auto_lambda",
    "auto_lr",
    "auto_steps",
    "auto_warmup",
]

MODES: tuple[str, ...] = ("finetune", "perturbation")
#: What "outputs kept" means at an evaluation. ``auto``: for classifiers, top-1 agreement with the original and,
#: when the evaluation data have labels, accuracy too (both within ``tolerance``); else the mean output cosine.
#: ``cosine_min``: the smallest output cosine of the evaluation samples (every sample's output kept, not the mean).
CRITERIA: tuple[str, ...] = ("auto", "accuracy", "agreement", "cosine", "cosine_min")
#: ``best``: the evaluated state closest to the target among those that kept the outputs; ``last``: the final one.
KEEP: tuple[str, ...] = ("best", "last")

#: About this many evaluations per run (at most one per pass over the training data).
EVALUATIONS = 30
#: ``stop_when_reached`` stops at the first evaluation that kept the outputs within this fraction of
#: ``target_tolerance`` of the target: the evaluation data are a sample, so stopping a little inside the tolerance
#: leaves room for the difference between them and other data.
STOP_FRACTION = 0.5
#: After the first evaluation that reached the target with outputs kept, ``stop_when_reached`` runs on for
#: this many evaluations (at least this fraction of the budget), keeping the state with the closest outputs
#: among those that stay within the band: the steps after reaching the target repair the outputs.
POLISH_EVALUATIONS, POLISH_FRACTION = 5, 0.1
#: ``steps=None``: this many passes over the training data, within [AUTO_STEPS_MIN, AUTO_STEPS_MAX] steps.
AUTO_EPOCHS = 150
AUTO_STEPS_MIN, AUTO_STEPS_MAX = 300, 3000
#: ... and for models above 10M trainable parameters (see :func:`auto_steps`).
LARGE_EPOCHS, LARGE_STEPS = 50, (60, 600)


#: ``lr=None``: the AdamW learning rate by the number of trainable parameters (AdamW moves every weight by about
#: lr per step, which a large pretrained network does not survive): (at most this many, lr).
AUTO_LR: tuple[tuple[float, float], ...] = ((1e6, 1e-2), (1e7, 1e-3), (math.inf, 1e-4))


def auto_lr(n_params: int) -> float:
    """The default learning rate for a model with ``n_params`` trainable parameters (see :data:`AUTO_LR`)."""
    return next(lr for bound, lr in AUTO_LR if n_params <= bound)


#: ``lambda_init=None`` by ``preserve``: the similarity loss starts this many times the preservation loss's weight.
#: KL at T = 1 (the paper's 500 goes with T = 0.1, whose KL is about 1/T^2 = 100 times larger); ``1 - cosine`` and
#: relative squared error are small numbers whose meaningful scale is the tolerance (0.015), so 10 x log-cosh
#: swamps them at once (measured on MiniLM: the sentence embeddings' held-out cosine never recovered).
AUTO_LAMBDA = {"kl": 10.0, "ce": 10.0, "embedding": 0.5, "mse": 0.5}
#: ``warmup=None``: this fraction of the steps warms the learning rate up for models above 10M trainable
#: parameters (pretrained networks, whose first Adam steps move every weight by about lr at once), else none.
AUTO_WARMUP, AUTO_WARMUP_PARAMS = 0.1, 1e7


def auto_lambda(preserve: str) -> float:
    """The default initial lambda for a preservation loss (see :data:`AUTO_LAMBDA`)."""
    return AUTO_LAMBDA[preserve]


def auto_warmup(n_params: int) -> float:
    """The default warm-up fraction for a model with ``n_params`` trainable parameters (see :data:`AUTO_WARMUP`)."""
    return AUTO_WARMUP if n_params > AUTO_WARMUP_PARAMS else 0.0


def auto_steps(n_train: int, batch_size: int, n_params: int = 0) -> int:
    """The default step budget: :data:`AUTO_EPOCHS` passes over ``n_train`` samples, clipped to the bounds; for a
    model above 10M trainable parameters :data:`LARGE_EPOCHS` passes within :data:`LARGE_STEPS` (a step of a
    pretrained transformer costs seconds on a CPU, and its lr of 1e-4 moves it within tens of steps)."""
    per_epoch = max(1, -(-n_train // batch_size))
    large = n_params > AUTO_WARMUP_PARAMS
    epochs, (low, high) = (LARGE_EPOCHS, LARGE_STEPS) if large else (AUTO_EPOCHS, (AUTO_STEPS_MIN, AUTO_STEPS_MAX))
    return int(min(high, max(low, epochs * per_epoch)))


#: The constraints of :func:`shift`'s options (checked by :class:`ShiftConfig`) and of its model.
SHIFT_PARAMS = {
    "model": Instance(nn.Module, "a torch.nn.Module"),
    "mode": Choice(MODES),
    "preserve": Choice(PRESERVE),
    "criterion": Choice(CRITERIA),
    "keep": Choice(KEEP),
    "steps": Optional(Int(minimum=0)),
    "batch_size": Int(minimum=MIN_BATCH),
    "lr": Optional(Float(positive=True)),
    "temperature": Float(positive=True),
    "lambda_init": Optional(Float(positive=True)),
    "tolerance": Float(minimum=0),
    "max_grad_norm": Float(positive=True),
    "weight_decay": Float(minimum=0),
    "warmup": Optional(Float(minimum=0, below=1)),
    "seed": Int(minimum=0),
    "rank": Int(minimum=1),
    "measure": Instance((str, Measure), "a measure name or id, or a Measure"),
    "eval_every": Optional(Int(minimum=1)),
    "tokens": Choice(TOKEN_POLICIES),
    "spatial": Choice(SPATIAL_POLICIES),
    "output": Optional(Callable_("a callable mapping the model's output to a (batch, k) tensor")),
    "train_mode": Bool(),
    "progress": Bool(),
    "holdout": Float(minimum=0, below=1),
    "target_tolerance": Float(minimum=0),
    "stop_when_reached": Bool(),
    "mixup": Float(minimum=0),
    "mixup_similarity": Bool(),
}


@dataclass
class ShiftConfig:
    """The options of one shift (what :func:`shift` documents), checked against :data:`SHIFT_PARAMS`.

    Numbers are normalised on construction (``lr=1`` becomes ``1.0``), so a config holds exactly what the run uses.

    Attributes:
        mode: ``"finetune"`` or ``"perturbation"`` (frozen network, :class:`LowRankAffine` edit of the layer's
            output of rank ``rank``, inserted by a forward hook only while it runs).
        preserve: ``"kl"``, ``"ce"``, ``"embedding"`` or ``"mse"`` (see :data:`PRESERVE`).
        criterion: ``"auto"``, ``"accuracy"``, ``"agreement"``, ``"cosine"`` or ``"cosine_min"`` (see
            :data:`CRITERIA`).
        keep: ``"best"`` returns the evaluated state closest to the target among those that kept the outputs
            (the original counts, at step 0); ``"last"`` the final state.
        tolerance: outputs count as kept while the criterion stays within this of the original (agreement >=
            1 - tolerance; accuracy at most ``tolerance`` below the original's: 0.015 is 1.5 points; output
            cosine >= 1 - tolerance).
        steps: the step budget; None: :func:`auto_steps` (passes over the training data, within bounds).
        lr: AdamW's learning rate; None: by the number of trainable parameters (:func:`auto_lr`).
        batch_size, temperature, lambda_init: the optimisation (AdamW, cosine schedule, gradient clipping at
            ``max_grad_norm``; distillation at ``temperature``: 1 keeps held-out predictions better than the
            paper's 0.1 on digits; ``lambda_init`` None: by ``preserve``, see :func:`auto_lambda`).
        warmup, weight_decay, max_grad_norm: linear learning-rate warm-up over this fraction of the steps (None:
            :func:`auto_warmup`), AdamW's weight decay, gradient clipping.
        holdout: the fraction of ``data`` held out for evaluation when ``eval_data`` is None, drawn by ``seed``
            (several padded batches: whole batches). 0 evaluates on the training data itself (the numbers then
            say "training samples").
        target_tolerance: ``result.reached`` is True when the returned state is within this of the target (map
            targets: mean map error within it).
        stop_when_reached: stop soon after the first evaluation that kept the outputs within half of
            ``target_tolerance`` of the target (a few more evaluations may only repair the outputs).
        mixup: weight of the distillation on mixed inputs of each minibatch (0 turns it off): ``a x_i + (1 - a)
            x_j`` for float tensors, token mixup for padded text (each inner token of sentence i kept with
            probability a, else sentence j's token at that position). It keeps the function between the training
            samples, which held-out agreement (or held-out embedding cosine) needs.
        mixup_similarity: the similarity term sees the mixed inputs too: the minibatch measure runs on the rows
            of the real and the mixed inputs together (against the original's rows of both, or within the map),
            so the layer moves on the inputs between the training samples as well, not only on them. For a
            reference of the original model (``reference=None``) or a ``target_map``; needs ``mixup > 0``.
        seed: shuffling, the held-out part, perturbation initialisation and dropout; the global random state is
            left unchanged.
        eval_every: steps between evaluations (default: one pass over the data, at most ``steps / 30``).
        tokens / spatial: how the layer's output becomes rows (as in ``rp.capture``).
        output: a callable mapping the model's raw output to the (batch, k) tensor to preserve.
        train_mode: fine-tune in train mode (dropout on, batch-norm statistics updated); by default the copy
            stays in eval mode so that the outputs preserved are the ones the model gives at inference.
        progress: the tqdm bar.
    """

    mode: str = "finetune"
    preserve: str = "kl"
    criterion: str = "auto"
    keep: str = "best"
    steps: int | None = None
    batch_size: int = 128
    lr: float | None = None
    temperature: float = 1.0
    lambda_init: float | None = None
    tolerance: float = 0.015
    max_grad_norm: float = 1.0
    weight_decay: float = 0.01
    warmup: float | None = None
    seed: int = 0
    rank: int = 8
    measure: str | Measure = "cka"
    eval_every: int | None = None
    tokens: str = "mean"
    spatial: str = "flatten"
    output: Callable[[Any], torch.Tensor] | None = None
    train_mode: bool = False
    progress: bool = True
    holdout: float = 0.2
    target_tolerance: float = 0.05
    stop_when_reached: bool = True
    mixup: float = 1.0
    mixup_similarity: bool = False

    def __post_init__(self) -> None:
        given = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in check_params(SHIFT_PARAMS, **given).items():
            setattr(self, name, value)

    @property
    def eval_batch(self) -> int:
        """Rows per forward pass when evaluating (no gradients: larger than the training minibatch)."""
        return max(self.batch_size, 256)
