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
* ``lambda`` starts at ``lambda_init`` (500); at every evaluation on held-out data it is multiplied by 0.8 when
  the outputs are not kept (accuracy, or top-1 agreement with the original, or output cosine fell more than
  ``tolerance`` below the original), else divided by 0.8. AdamW, cosine learning-rate schedule, gradient
  clipping at 1.0.

``mode="perturbation"`` is the representation-level variant (see :mod:`.perturbation`): the network is frozen and
a learnable low-rank affine edit of the layer's output is inserted by a forward hook.

The model passed in is never modified: the work happens on a deep copy, every hook is removed afterwards, and
the global random state is left as it was.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from .._utils.batches import TrainFlags, model_device, take, to_device, train_flags_kept
from .._utils.checks import Bool, Callable_, Choice, Float, Instance, Int, Optional, check_one, check_params
from ..adapters import for_model
from ..capture import SPATIAL_POLICIES, TOKEN_POLICIES, capture
from ..errors import DegenerateInputError, RepsimError
from ..measures import Measure
from ..results import state_dict_fingerprint
from ._bookkeeping import (
    LAMBDA_FACTOR,
    BestState,
    Fidelity,
    History,
    LambdaSchedule,
    LossMeans,
    lr_schedule,
    resolve_criterion,
)
from ._data import MIN_BATCH, Chunk, all_labels, as_chunks, minibatches, sample_inputs
from .objective import (
    PRESERVE,
    MinibatchMeasure,
    OutputChecks,
    QuietMeasure,
    differentiable_measure,
    preservation_loss,
    preserved_output,
)
from .perturbation import LowRankAffine, attach_perturbation
from .result import ShiftResult
from .targets import Evaluation, MapTarget, PairTarget, make_target

__all__ = ["CRITERIA", "KEEP", "LAMBDA_FACTOR", "MODES", "SHIFT_PARAMS", "ShiftConfig", "Shifter", "shift"]

#: ``finetune``: train the copy's weights; ``perturbation``: frozen network, learnable edit of the layer output.
MODES: tuple[str, ...] = ("finetune", "perturbation")
#: What "outputs kept" means at an evaluation. ``auto``: accuracy when the evaluation data have labels, else
#: top-1 agreement with the original for classifiers, else the mean cosine of the outputs.
CRITERIA: tuple[str, ...] = ("auto", "accuracy", "agreement", "cosine")
#: ``best``: the evaluated state closest to the target among those that kept the outputs; ``last``: the final one.
KEEP: tuple[str, ...] = ("best", "last")

#: The constraints of :func:`shift`'s options (checked by :class:`ShiftConfig`) and of its model.
SHIFT_PARAMS = {
    "model": Instance(nn.Module, "a torch.nn.Module"),
    "mode": Choice(MODES),
    "preserve": Choice(PRESERVE),
    "criterion": Choice(CRITERIA),
    "keep": Choice(KEEP),
    "steps": Int(minimum=0),
    "batch_size": Int(minimum=MIN_BATCH),
    "lr": Float(positive=True),
    "temperature": Float(positive=True),
    "lambda_init": Float(positive=True),
    "tolerance": Float(minimum=0),
    "max_grad_norm": Float(positive=True),
    "weight_decay": Float(minimum=0),
    "warmup": Float(minimum=0, below=1),
    "seed": Int(minimum=0),
    "rank": Int(minimum=1),
    "measure": Instance((str, Measure), "a measure name or id, or a Measure"),
    "eval_every": Optional(Int(minimum=1)),
    "tokens": Choice(TOKEN_POLICIES),
    "spatial": Choice(SPATIAL_POLICIES),
    "output": Optional(Callable_("a callable mapping the model's output to a (batch, k) tensor")),
    "train_mode": Bool(),
    "progress": Bool(),
}


@dataclass
class ShiftConfig:
    """The options of one shift (what :func:`shift` documents), checked against :data:`SHIFT_PARAMS`.

    Numbers are normalised on construction (``lr=1`` becomes ``1.0``), so a config holds exactly what the run uses.
    """

    mode: str = "finetune"
    preserve: str = "kl"
    criterion: str = "auto"
    keep: str = "best"
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    temperature: float = 0.1
    lambda_init: float = 500.0
    tolerance: float = 0.01
    max_grad_norm: float = 1.0
    weight_decay: float = 0.01
    warmup: float = 0.0
    seed: int = 0
    rank: int = 8
    measure: str | Measure = "cka"
    eval_every: int | None = None
    tokens: str = "mean"
    spatial: str = "flatten"
    output: Callable[[Any], torch.Tensor] | None = None
    train_mode: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        given = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in check_params(SHIFT_PARAMS, **given).items():
            setattr(self, name, value)

    @property
    def eval_batch(self) -> int:
        """Rows per forward pass when evaluating (no gradients: larger than the training minibatch)."""
        return max(self.batch_size, 256)


# --- the run --------------------------------------------------------------------------------------------------


class Shifter:
    """One shift, step by step: the copy, the data, the original's outputs, the optimisation, the result.

    Build it with the resolved measure, a target (:mod:`.targets`) and a :class:`ShiftConfig`, then :meth:`run`
    it once. The model passed in is only read: everything happens on ``self.student``, a deep copy.
    """

    def __init__(self, model: nn.Module, measure: Measure, target: PairTarget | MapTarget, config: ShiftConfig) -> None:
        self.model, self.measure, self.target, self.config = model, measure, target, config
        self.estimate = MinibatchMeasure(measure)
        self.student = copy.deepcopy(model)
        self._flags = TrainFlags(self.student)
        self._requires = [(p, p.requires_grad) for p in self.student.parameters()]
        self.adapter = for_model(self.student)
        self.device = model_device(self.student)
        self.perturbation: LowRankAffine | None = None
        self.layout: str | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._params: list[nn.Parameter] = []
        self.quiet = QuietMeasure(measure)
        self._sink: dict[str, dict[str, torch.Tensor]] = {}

    # --- the data and the original's outputs --------------------------------------------------------------

    def _load(self, data: Any, labels: Any, eval_data: Any, eval_labels: Any) -> None:
        cfg = self.config
        self.chunks = as_chunks(data, self.adapter, labels, "data")
        self.held_out = eval_data is not None
        self.eval_chunks = (
            as_chunks(eval_data, self.adapter, eval_labels, "eval_data") if self.held_out else self.chunks
        )
        self.n_train = sum(c.n for c in self.chunks)
        self.n_eval = sum(c.n for c in self.eval_chunks)
        if self.n_train < MIN_BATCH or self.n_eval < MIN_BATCH:
            raise RepsimError(f"shift needs at least {MIN_BATCH} training and evaluation samples (unbiased HSIC).")
        capture_options = {"batch_size": cfg.eval_batch, "tokens": cfg.tokens, "spatial": cfg.spatial}
        self.target.prepare(self.chunks, self.eval_chunks, self.held_out, **capture_options)
        if cfg.preserve == "ce" and any(c.labels is None for c in self.chunks):
            raise RepsimError("preserve='ce' trains on hard labels: pass labels= (or (inputs, labels) batches).")
        self.eval_labels = all_labels(self.eval_chunks)

    def _receive(self, batch: dict[str, torch.Tensor]) -> None:
        self._sink["rows"] = batch

    def _forward(self, inputs: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The target's layer rows (from the capture) and the preserved output of one forward pass."""
        raw = self.adapter.forward(inputs)
        out = preserved_output(self.adapter, raw, inputs, self.config.output, self.config.preserve)
        return self.target.select(self._sink.pop("rows")), out

    @torch.no_grad()
    def _evaluate_pass(self, which: list[Chunk]) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
        """Rows and outputs (CPU, float32) of every chunk, in eval mode."""
        rows_out, outs = [], []
        with train_flags_kept(self.student):
            for chunk in which:
                parts: dict[str, list[torch.Tensor]] = {}
                out_parts = []
                for index in chunk.pieces(self.config.eval_batch):
                    rows, out = self._forward(to_device(take(chunk.inputs, index), self.device))
                    for name, r in rows.items():
                        parts.setdefault(name, []).append(r.detach().float().cpu())
                    out_parts.append(out.detach().float().cpu())
                rows_out.append({name: torch.cat(r) for name, r in parts.items()})
                outs.append(torch.cat(out_parts))
        return rows_out, outs

    def _summarize(self, rows: list[dict[str, torch.Tensor]], outs: list[torch.Tensor]) -> Evaluation:
        checks = OutputChecks.compare(torch.cat(outs), self.teacher_eval, self.eval_labels, self.classify)
        return self.target.evaluate(rows, self.quiet, checks)

    def _precompute(self) -> Evaluation:
        """The original's outputs (the teacher) and reference rows, the criterion, and the evaluation before."""
        cfg = self.config
        train_rows, train_out = self._evaluate_pass(self.chunks)
        for chunk, teacher in zip(self.chunks, train_out, strict=True):
            chunk.teacher = teacher
        eval_rows, eval_out = self._evaluate_pass(self.eval_chunks) if self.held_out else (train_rows, train_out)
        self.target.attach(self.chunks, train_rows, eval_rows)
        self.teacher_eval = torch.cat(eval_out)
        self.classify = cfg.preserve in ("kl", "ce")
        if self.classify and self.teacher_eval.shape[1] < 2:
            raise RepsimError(f"preserve={cfg.preserve!r} needs class logits (batch, k >= 2); the output has k = 1.")
        self.criterion = resolve_criterion(cfg.criterion, self.classify, self.eval_labels is not None)
        return self._summarize(eval_rows, eval_out)

    # --- the optimisation ---------------------------------------------------------------------------------

    def _trainable(self) -> list[nn.Parameter]:
        """What is optimised: the copy's trainable weights, or a fresh perturbation of the layer's output."""
        cfg = self.config
        if cfg.mode == "perturbation":
            assert isinstance(self.target, PairTarget)  # make_target allows perturbation with one layer only
            for p in self.student.parameters():
                p.requires_grad_(False)
            sample = sample_inputs(self.chunks[0])
            self.perturbation, self._handle, self.layout = attach_perturbation(
                self.student, self.adapter, self.target.layer, sample, cfg.rank, cfg.seed
            )
            self._sink.pop("rows", None)
            return list(self.perturbation.parameters())
        params = [p for p in self.student.parameters() if p.requires_grad]
        if not params:
            raise RepsimError("the model has no trainable parameters (requires_grad=False everywhere).")
        return params

    def _eval_every(self) -> int:
        cfg = self.config
        if cfg.eval_every is not None:
            return cfg.eval_every
        per_epoch = sum(max(1, -(-c.n // cfg.batch_size)) for c in self.chunks)
        return max(1, min(per_epoch, -(-cfg.steps // 10)))

    def _step(
        self, step: int, batch: tuple[Chunk, torch.Tensor], lam: float, optimizer: Any, scheduler: Any
    ) -> dict[str, float]:
        """One optimisation step on one minibatch; returns its losses and the minibatch value of the measure."""
        cfg = self.config
        chunk, index = batch
        rows, out = self._forward(to_device(take(chunk.inputs, index), self.device))
        if not all(bool(torch.isfinite(r).all()) for r in (*rows.values(), out)):
            raise DegenerateInputError(
                f"training diverged at step {step}: the layer's activations or the outputs are not finite; "
                "lower lr= or lambda_init=."
            )
        similarity, estimate = self.target.loss(self.estimate, rows, chunk, index)
        assert chunk.teacher is not None
        teacher = chunk.teacher[index].to(out.device)
        lab = chunk.labels[index].to(out.device) if chunk.labels is not None else None
        keep_loss = preservation_loss(cfg.preserve, out.float(), teacher.float(), lab, cfg.temperature)
        loss = keep_loss + lam * similarity.to(keep_loss.dtype)
        if not bool(torch.isfinite(loss)):
            raise DegenerateInputError(
                f"training diverged at step {step}: the objective is {float(loss)}; lower lr= or "
                "lambda_init=, or check that the layer's representation varies across the minibatch."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self._params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        return {
            "preservation_loss": float(keep_loss.detach()),
            "similarity_loss": float(similarity.detach()),
            self.target.minibatch_key: estimate,
        }

    def _evaluate(self, step: int) -> Evaluation:
        rows, outs = self._evaluate_pass(self.eval_chunks)
        finite = [bool(torch.isfinite(t).all()) for r in rows for t in r.values()]
        if not all(finite) or not all(bool(torch.isfinite(o).all()) for o in outs):
            raise DegenerateInputError(
                f"training diverged at step {step}: the evaluation gives non-finite activations or "
                "outputs; lower lr= or lambda_init=."
            )
        return self._summarize(rows, outs)

    def _optimise(self, before: Evaluation) -> tuple[int, Evaluation]:
        """The training loop with its evaluations; returns the step and evaluation of the state kept."""
        cfg = self.config
        self.history = History(self.target, cfg.progress)
        lam = LambdaSchedule(cfg.lambda_init)
        fidelity = Fidelity(self.criterion, cfg.tolerance, before.outputs)
        self.history.record(0, before, lam.value, True, {})
        best = BestState(
            self.perturbation if self.perturbation is not None else self.student, self.target.distance(before), before
        )
        optimizer = torch.optim.AdamW(self._params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.steps, cfg.warmup))
        every = self._eval_every()
        batches = minibatches(self.chunks, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
        self.student.train(cfg.train_mode)
        losses, last = LossMeans(), before
        for step in range(1, cfg.steps + 1):
            losses.add(self._step(step, next(batches), lam.value, optimizer, scheduler))
            if step % every == 0 or step == cfg.steps:
                last = self._evaluate(step)
                kept = fidelity.kept(last)
                self.history.record(
                    step, last, lam.value, kept, {**losses.means(), "lr": float(scheduler.get_last_lr()[0])}
                )
                losses = LossMeans()
                lam.update(kept)
                if kept:
                    best.offer(step, last, self.target.distance(last))
        final_step, final = best.restore() if cfg.keep == "best" else (cfg.steps, last)
        self.lambda_final, self.final_kept = lam.value, fidelity.kept(final)
        return final_step, final

    # --- the whole run ------------------------------------------------------------------------------------

    def _cuda_devices(self) -> list[int]:
        if self.device is not None and self.device.type == "cuda":
            return [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        return []

    def run(self, data: Any, *, labels: Any = None, eval_data: Any = None, eval_labels: Any = None) -> ShiftResult:
        """Load the data, record the original's outputs, optimise, and return the result (hooks removed)."""
        cfg = self.config
        self._load(data, labels, eval_data, eval_labels)
        self.student.eval()
        rec = capture(
            self.student, self.target.layers, tokens=cfg.tokens, spatial=cfg.spatial, grad=True, keep=False,
            on_batch=self._receive, eval_mode=False,
        )  # fmt: skip
        with torch.random.fork_rng(devices=self._cuda_devices()), rec:
            torch.manual_seed(cfg.seed)
            before = self._precompute()
            try:
                self._params = self._trainable()
                final_step, final = self._optimise(before)
            finally:
                if self._handle is not None:
                    self._handle.remove()
        self._restore_flags()
        return self._result(before, final, final_step)

    def _restore_flags(self) -> None:
        """The copy's train / eval and requires_grad flags back to the original's; the perturbation frozen."""
        self._flags.restore()
        for p, requires in self._requires:
            p.requires_grad_(requires)
        if self.perturbation is not None:
            self.perturbation.requires_grad_(False)

    def _result(self, before: Evaluation, final: Evaluation, final_step: int) -> ShiftResult:
        cfg, o = self.config, final.outputs
        fingerprints = {
            "original": state_dict_fingerprint(self.model),
            "returned": state_dict_fingerprint(self.student),
        }
        return ShiftResult(
            measure=self.measure.id, mode=cfg.mode, preserve=cfg.preserve, criterion=self.criterion,
            tolerance=cfg.tolerance, model=self.student, agreement=o.agreement, kl=o.kl, cosine=o.cosine,
            cosine_min=o.cosine_min, accuracy_before=before.outputs.accuracy, accuracy_after=o.accuracy,
            kept=self.final_kept, best_step=final_step, steps=cfg.steps, lambda_final=self.lambda_final,
            history=list(self.history), perturbation=self.perturbation, objective=self.estimate.description,
            n_train=self.n_train, n_eval=self.n_eval, held_out=self.held_out, seed=cfg.seed,
            fingerprints=fingerprints, layout=self.layout, **self.target.result_fields(before, final),
        )  # fmt: skip


def shift(
    model: nn.Module,
    layer: str | None,
    data: Any,
    target: float | None = 0.2,
    *,
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
    check_one(SHIFT_PARAMS, "model", model)
    config = ShiftConfig(
        measure=measure, mode=mode, preserve=preserve, criterion=criterion, keep=keep, steps=steps,
        batch_size=batch_size, lr=lr, temperature=temperature, lambda_init=lambda_init, tolerance=tolerance,
        max_grad_norm=max_grad_norm, weight_decay=weight_decay, warmup=warmup, seed=seed, rank=rank,
        eval_every=eval_every, tokens=tokens, spatial=spatial, output=output, train_mode=train_mode,
        progress=progress,
    )  # fmt: skip
    resolved = differentiable_measure(config.measure)
    goal = make_target(
        layer=layer, target=target, reference=reference, eval_reference=eval_reference, target_map=target_map,
        map_layers=map_layers, mode=config.mode,
    )  # fmt: skip
    runner = Shifter(model, resolved, goal, config)
    result = runner.run(data, labels=labels, eval_data=eval_data, eval_labels=eval_labels)
    result.seconds = time.perf_counter() - started
    runner.quiet.reissue()
    return result
