"""Shift a similarity measure while the model's outputs stay the same (Davari et al., ICLR 2023, Section 4.3).

:func:`shift` fine-tunes a *copy* of a model so that a layer's similarity to a reference representation (by
default: the same layer of the original, frozen model) approaches a target value, while a frozen copy of the
original constrains what the model outputs. The objective is the paper's (see :mod:`.objective`)::

    preservation(student outputs, original outputs)  +  lambda * mean log-cosh(M - M_target)

* ``M`` is computed on every minibatch and differentiated end to end: for a measure that declares a minibatch
  estimator (the CKA family), minibatch CKA with the unbiased HSIC (Song et al. 2012) and the measure's kernel;
  for any other differentiable registered measure, the measure itself on the minibatch rows. ``target_map`` asks
  for a whole layer x layer map of the network being trained instead of one value (e.g. all ones: every layer
  CKA-similar to every other); see :mod:`.targets`.
* ``preservation`` is the distillation KL between ``softmax(teacher / T)`` and ``softmax(student / T)``
  (``preserve="kl"``), cross-entropy on hard labels (``"ce"``), or, for models without logits such as a bare
  sentence encoder, ``1 - cosine`` (``"embedding"``) or relative squared error (``"mse"``) of the outputs.
* ``lambda`` starts at ``lambda_init`` (KL: 10, the paper's 500 goes with T = 0.1, whose KL is about 1/T^2 = 100
  times the KL at the default T = 1); at every evaluation on held-out data it is multiplied by 0.8 when
  the outputs are not kept (accuracy, or top-1 agreement with the original, or output cosine fell more than
  ``tolerance`` below the original), else divided by 0.8. AdamW, cosine learning-rate schedule, gradient
  clipping at 1.0.

``mode="perturbation"`` is the representation-level variant (see :mod:`.perturbation`): the network is frozen and
a learnable low-rank affine edit of the layer's output is inserted by a forward hook.

The model passed in is never modified: the work happens on a deep copy, every hook is removed afterwards, and
the global random state is left as it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._utils.checks import check_one
from .._utils.warnings import warn
from ..errors import SeenEvaluationDataWarning, TargetNotReachedWarning
from ..measures import Measure
from ._bookkeeping import LAMBDA_FACTOR
from ._config import (
    AUTO_EPOCHS,
    AUTO_STEPS_MAX,
    AUTO_STEPS_MIN,
    CRITERIA,
    KEEP,
    MODES,
    SHIFT_PARAMS,
    ShiftConfig,
    auto_lr,
    auto_steps,
)
from ._runner import Shifter, not_reached_message
from .objective import differentiable_measure
from .result import ShiftResult, judged_on_seen_data, seen_data_message
from .targets import MapTarget, make_target

__all__ = [
    "AUTO_EPOCHS",
    "AUTO_STEPS_MAX",
    "AUTO_STEPS_MIN",
    "CRITERIA",
    "KEEP",
    "LAMBDA_FACTOR",
    "MODES",
    "SHIFT_PARAMS",
    "ShiftConfig",
    "Shifter",
    "auto_lr",
    "auto_steps",
    "not_reached_message",
    "shift",
]


def shift(
    model: nn.Module,
    layer: str | None,
    data: Any,
    target: float | None = 0.2,
    *,
    reference: Any = None,
    measure: str | Measure = "cka",
    preserve: str = "kl",
    tolerance: float = 0.015,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int = 128,
    temperature: float = 1.0,
    lambda_init: float | None = None,
    eval_data: Any = None,
    labels: Any = None,
    seed: int = 0,
    mode: str = "finetune",
    target_map: Any = None,
    map_layers: Sequence[str] | None = None,
    progress: bool = True,
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
    warmup: float | None = None,
    holdout: float = 0.2,
    target_tolerance: float = 0.05,
    stop_when_reached: bool = True,
    mixup: float = 1.0,
    mixup_similarity: bool = False,
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
            CKA with the unbiased HSIC and evaluated with the full-data measure (debiased linear CKA where the
            biased one is inflated on so few evaluation samples: ``result.estimator`` says which).
        preserve: ``"kl"`` (distillation at ``temperature``), ``"ce"`` (hard labels), ``"embedding"`` (1 -
            cosine of the outputs; mean-pooled token states for a bare encoder), ``"mse"``.
        eval_data: held-out inputs for the evaluations, early stopping, ``keep="best"`` and every reported number.
            None: ``holdout`` of ``data`` is held out (``result.held_out_indices`` says which samples).
        labels / eval_labels: class labels aligned with ``data`` / ``eval_data`` (or inside their batches).
        target_map / map_layers: a layer x layer target (matrix, number or ``SimilarityMap``; NaN entries are
            free) for the map of ``measure`` between ``map_layers`` of the model being trained.
        progress: a tqdm bar (step; minibatch measure; last evaluation's measure and agreement or cosine;
            lambda); False silences it.
        **the rest**: the options of :class:`ShiftConfig` (``tolerance``, ``steps``, ``lr``, ``holdout``,
            ``target_tolerance``, ``stop_when_reached``, ``mixup``, ``mixup_similarity``, ``mode``, ...),
            documented there.

    Returns a :class:`ShiftResult`; when ``result.reached`` is False a
    :class:`~repsim_plugin.errors.TargetNotReachedWarning` says how close the run got with the outputs kept. When
    the part held out of ``data`` is classified without an error by the original (50 samples or more), a
    :class:`~repsim_plugin.errors.SeenEvaluationDataWarning` says it was probably training data, on which the output
    checks cannot see a drop on new inputs.
    """
    started = time.perf_counter()
    check_one(SHIFT_PARAMS, "model", model)
    config = ShiftConfig(
        measure=measure, mode=mode, preserve=preserve, criterion=criterion, keep=keep, steps=steps,
        batch_size=batch_size, lr=lr, temperature=temperature, lambda_init=lambda_init, tolerance=tolerance,
        max_grad_norm=max_grad_norm, weight_decay=weight_decay, warmup=warmup, seed=seed, rank=rank,
        eval_every=eval_every, tokens=tokens, spatial=spatial, output=output, train_mode=train_mode,
        progress=progress, holdout=holdout, target_tolerance=target_tolerance,
        stop_when_reached=stop_when_reached, mixup=mixup, mixup_similarity=mixup_similarity,
    )  # fmt: skip
    resolved = differentiable_measure(config.measure)
    goal = make_target(
        layer=layer, target=target, reference=reference, eval_reference=eval_reference, target_map=target_map,
        map_layers=map_layers, mode=config.mode,
    )  # fmt: skip
    if isinstance(goal, MapTarget):
        resolved.check_target(goal.matrix, "target_map")
    else:
        resolved.check_target(goal.value)
    runner = Shifter(model, resolved, goal, config)
    result = runner.run(data, labels=labels, eval_data=eval_data, eval_labels=eval_labels)
    result.seconds = time.perf_counter() - started
    runner.quiet.reissue()
    if not result.reached:
        warn(not_reached_message(result), TargetNotReachedWarning)
    if judged_on_seen_data(result):
        warn(seen_data_message(result), SeenEvaluationDataWarning)
    return result
