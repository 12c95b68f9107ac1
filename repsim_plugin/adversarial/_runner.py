"""The run of one shift: :class:`Shifter` loads the data and records the original's outputs (its base
:class:`~._loading.ShiftData`), optimises the copy and builds the
:class:`~repsim_plugin.adversarial.result.ShiftResult`; :func:`not_reached_message` says what a run that missed its
target got. :func:`~repsim_plugin.adversarial.shift` (module :mod:`.shifting`) is its public face.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from torch import nn

from .._utils.batches import TrainFlags, model_device, take, to_device, train_flags_kept
from ..adapters import for_model
from ..capture import capture
from ..errors import DegenerateInputError, RepsimError
from ..measures import Measure
from ..results import state_dict_fingerprint
from ._bookkeeping import (
    BestState,
    Fidelity,
    History,
    LambdaSchedule,
    LossMeans,
    ProgressBar,
    lr_schedule,
)
from ._config import (
    EVALUATIONS,
    POLISH_EVALUATIONS,
    POLISH_FRACTION,
    STOP_FRACTION,
    ShiftConfig,
    auto_lambda,
    auto_lr,
    auto_steps,
    auto_warmup,
)
from ._data import (
    Chunk,
    minibatches,
    mix_inputs,
    mixable,
    sample_inputs,
)
from ._loading import ShiftData
from .objective import (
    MinibatchMeasure,
    QuietMeasure,
    output_loss,
    preserved_output,
    token_states,
)
from .perturbation import LowRankAffine, attach_perturbation
from .result import ShiftResult, not_reached_message
from .targets import Evaluation, MapTarget, MixedRows, PairTarget

__all__ = ["Shifter", "not_reached_message"]  # not_reached_message: from .result, for the old import path


class Shifter(ShiftData):
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
        self._teacher_sink: dict[str, dict[str, torch.Tensor]] = {}
        self._tokens: torch.Tensor | None = None

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
        # embedding tables are not trained: a row moves only for tokens of the training data, so held-out inputs
        # with other tokens would see a different function; the layers after the lookup carry the shift
        tables = {id(p) for m in self.student.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        params = [p for p in self.student.parameters() if p.requires_grad and id(p) not in tables]
        if not params:
            raise RepsimError("the model has no trainable parameters (requires_grad=False everywhere).")
        return params

    def _eval_every(self) -> int:
        cfg = self.config
        if cfg.eval_every is not None:
            return cfg.eval_every
        per_epoch = sum(max(1, -(-c.n // cfg.batch_size)) for c in self.chunks)
        return max(1, min(per_epoch, -(-self.steps // EVALUATIONS)))

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
        assert chunk.teacher is not None
        teacher = chunk.teacher[index].to(out.device)
        lab = chunk.labels[index].to(out.device) if chunk.labels is not None else None
        teacher_tokens = chunk.teacher_tokens[index].to(out.device) if chunk.teacher_tokens is not None else None
        mask = self.adapter.attention_mask(chunk.inputs)
        keep_loss = output_loss(
            cfg.preserve, out, teacher, lab, cfg.temperature, self._tokens, teacher_tokens,
            None if mask is None else mask[index],
        )  # fmt: skip
        mixed = self._mixup_loss(chunk, index)
        if mixed is not None:
            keep_loss = keep_loss + cfg.mixup * mixed[0]
        similarity, estimate = self.target.loss(self.estimate, rows, chunk, index, mixed[1] if mixed else None)
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

    def _mixup_loss(self, chunk: Chunk, index: torch.Tensor) -> tuple[torch.Tensor, MixedRows | None] | None:
        """Preservation on mixed inputs against the original's outputs: ``a x_i + (1 - a) x_j`` (a uniform per
        sample) for float inputs, token mixup for padded token ids (:func:`._data.mix_inputs`); with
        ``mixup_similarity`` also the layer rows of the mixed inputs (the copy's, and the original's as reference).

        The original is only known on the training samples; distilling on mixtures of them as well keeps the
        function between those samples, which is what held-out agreement (or held-out embedding cosine) needs.
        With ``preserve="ce"`` (hard labels) it does not apply."""
        cfg = self.config
        if cfg.mixup == 0 or cfg.preserve == "ce" or not mixable(chunk.inputs):
            return None
        mixed = mix_inputs(to_device(take(chunk.inputs, index), self.device), self._mix_generator)
        with torch.no_grad(), train_flags_kept(self.teacher):
            self.teacher.eval()
            raw = self.teacher_adapter.forward(mixed)
            teacher = preserved_output(self.teacher_adapter, raw, mixed, cfg.output, cfg.preserve)
            teacher_tokens = token_states(self.teacher_adapter, raw, mixed, cfg.preserve, cfg.output)
        teacher_rows = self._teacher_sink.pop("rows", None)
        raw = self.adapter.forward(mixed)
        student_rows = self._sink.pop("rows", None)  # used by the similarity term only with mixup_similarity
        out = preserved_output(self.adapter, raw, mixed, cfg.output, cfg.preserve)
        tokens = token_states(self.adapter, raw, mixed, cfg.preserve, cfg.output)
        mask = self.adapter.attention_mask(mixed)
        loss = output_loss(cfg.preserve, out, teacher, None, cfg.temperature, tokens, teacher_tokens, mask)
        if not cfg.mixup_similarity or student_rows is None:
            return loss, None
        reference = None
        if isinstance(self.target, PairTarget):
            assert teacher_rows is not None  # run() captures the original's layer when mixup_similarity is on
            reference = self.target.select(teacher_rows)[self.target.layer].detach()
        return loss, MixedRows(self.target.select(student_rows), reference)

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
        self.history = History(self.target)
        lam = LambdaSchedule(cfg.lambda_init if cfg.lambda_init is not None else auto_lambda(cfg.preserve))
        fidelity = Fidelity(self.criterion, cfg.tolerance, before.outputs)
        self.history.record(0, before, lam.value, True, {})
        band = STOP_FRACTION * cfg.target_tolerance
        source = self.perturbation if self.perturbation is not None else self.student
        best = BestState(source, self.target.distance(before), before, band)
        polish_until: int | None = None
        self.closest = (self.target.distance(before), 0, before)  # closest evaluated state, outputs kept or not
        self.lr = cfg.lr if cfg.lr is not None else auto_lr(sum(p.numel() for p in self._params))
        optimizer = torch.optim.AdamW(self._params, lr=self.lr, weight_decay=cfg.weight_decay)
        n_params = sum(p.numel() for p in self._params)
        if cfg.steps is None:
            self.steps = auto_steps(self.n_train, cfg.batch_size, n_params)
        self.warmup = cfg.warmup if cfg.warmup is not None else auto_warmup(n_params)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(self.steps, self.warmup))
        every = self._eval_every()
        batches = minibatches(self.chunks, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
        self.student.train(cfg.train_mode)
        losses, last = LossMeans(), before
        self.stopped_at: int | None = None
        step = 0
        bar = ProgressBar(cfg.progress, self.steps, self.target, self.criterion)
        try:
            for step in range(1, self.steps + 1):
                values = self._step(step, next(batches), lam.value, optimizer, scheduler)
                losses.add(values)
                bar.step(values, lam.value)
                if not (step % every == 0 or step == self.steps):
                    continue
                last = self._evaluate(step)
                kept = fidelity.kept(last)
                means = losses.means()
                self.history.record(step, last, lam.value, kept, {**means, "lr": float(scheduler.get_last_lr()[0])})
                bar.evaluation(last, kept)
                losses = LossMeans()
                lam.update(kept)
                distance = self.target.distance(last)
                if distance < self.closest[0]:
                    self.closest = (distance, step, last)
                if kept:
                    best.offer(step, last, distance, fidelity.score(last))
                    if cfg.stop_when_reached and distance <= band and polish_until is None:
                        polish_until = step + max(POLISH_EVALUATIONS * every, round(POLISH_FRACTION * self.steps))
                if polish_until is not None and step >= polish_until:
                    self.stopped_at = step
                    break
        finally:
            bar.close()
        final_step, final = best.restore() if cfg.keep == "best" else (step, last)
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
        with torch.random.fork_rng(devices=self._cuda_devices()), rec, self._teacher_capture():
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

    def _teacher_capture(self) -> Any:
        """With ``mixup_similarity`` and the original as reference: its layer rows of the mixed inputs, hooked."""
        cfg = self.config
        if not (cfg.mixup_similarity and isinstance(self.target, PairTarget)):
            return contextlib.nullcontext()
        # grad=True: the capture leaves the grad mode alone (the student trains meanwhile); the teacher's forward
        # runs under no_grad in _mixup_loss
        return capture(
            self.teacher, self.target.layers, tokens=cfg.tokens, spatial=cfg.spatial, grad=True, keep=False,
            on_batch=self._receive_teacher, eval_mode=False,
        )  # fmt: skip

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
            kept=self.final_kept, best_step=final_step, steps=self.steps, lambda_final=self.lambda_final,
            history=list(self.history), perturbation=self.perturbation, objective=self.estimate.description,
            n_train=self.n_train, n_eval=self.n_eval, held_out=self.held_out, seed=cfg.seed,
            fingerprints=fingerprints, layout=self.layout, target_tolerance=cfg.target_tolerance,
            reached=self.target.distance(final) <= cfg.target_tolerance + 1e-12, evaluated_on=self.evaluated_on,
            held_out_indices=None if self.held_out_index is None else self.held_out_index.tolist(),
            stopped_at=self.stopped_at, steps_run=self.history[-1]["step"] if self.history else 0,
            minibatch_estimate=self._minibatch_estimate(final_step), mixup=cfg.mixup,
            mixup_similarity=cfg.mixup_similarity, lr=self.lr,
            closest={"distance": self.closest[0], "step": self.closest[1], **_checks(self.closest[2])},
            estimator=self.estimator, estimator_reason=self.estimator_reason,
            as_requested=self._as_requested(before, final),
            **self.target.result_fields(before, final),
        )  # fmt: skip

    def _as_requested(self, before: Evaluation, final: Evaluation) -> dict[str, float] | None:
        """The measure asked for (before / after, evaluation data) when the evaluations used another estimator."""
        if not self.estimator_reason or not isinstance(self.target, PairTarget):
            return None
        reference = self.target.reference_eval
        assert before.rows is not None and final.rows is not None and reference is not None
        quiet = QuietMeasure(self.measure)
        return {"before": float(quiet(before.rows, reference)), "after": float(quiet(final.rows, reference))}

    def _minibatch_estimate(self, step: int) -> float | None:
        """The optimiser's own estimate (mean minibatch value since the previous evaluation) at ``step``."""
        key = self.target.minibatch_key
        for entry in self.history:
            if entry["step"] == step:
                return entry.get(key)
        return None


def _checks(e: Evaluation) -> dict[str, Any]:
    o = e.outputs
    return {
        "value": e.value, "agreement": o.agreement, "accuracy": o.accuracy, "cosine": o.cosine,
        "cosine_min": o.cosine_min,
    }  # fmt: skip
