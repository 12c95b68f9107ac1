"""The data side of a shift: :class:`ShiftData` is the base of :class:`~._runner.Shifter` that loads the data
(held-out part, labels, a precomputed reference cut like the data), records the original's outputs and reference
rows before any step, and runs the evaluation passes whose rows and outputs every reported number comes from.
The optimisation and the result are in :mod:`._runner`.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .._utils.batches import take, to_device, train_flags_kept
from ..adapters import Adapter, for_model
from ..errors import InputShapeError, RepsimError
from ..measures import Measure
from ._bookkeeping import resolve_criterion
from ._config import ShiftConfig, auto_steps
from ._data import MIN_BATCH, Chunk, all_labels, as_chunks, evaluation_split, mixable
from .objective import TOKEN_STATES_MAX, OutputChecks, QuietMeasure, evaluation_measure, preserved_output, token_states
from .targets import Evaluation, MapTarget, PairTarget

__all__ = ["ShiftData"]


class ShiftData:
    """The loading and evaluation methods of :class:`~._runner.Shifter` (which sets the attributes declared here)."""

    model: nn.Module
    student: nn.Module
    measure: Measure
    target: PairTarget | MapTarget
    config: ShiftConfig
    adapter: Adapter
    device: torch.device | None
    quiet: QuietMeasure
    _sink: dict[str, dict[str, torch.Tensor]]
    _teacher_sink: dict[str, dict[str, torch.Tensor]]
    _tokens: torch.Tensor | None

    def _load(self, data: Any, labels: Any, eval_data: Any, eval_labels: Any) -> None:
        cfg = self.config
        self._check_mixup_similarity()
        chunks = as_chunks(data, self.adapter, labels, "data")
        given = None if eval_data is None else as_chunks(eval_data, self.adapter, eval_labels, "eval_data")
        self.chunks, self.eval_chunks, self.evaluated_on, self.held_out_index = evaluation_split(
            chunks, given, holdout=cfg.holdout, seed=cfg.seed
        )
        if self.held_out_index is not None:
            self._split_reference(sum(c.n for c in chunks))
        self.held_out = self.eval_chunks is not self.chunks
        self.n_train = sum(c.n for c in self.chunks)
        self.n_eval = sum(c.n for c in self.eval_chunks)
        if self.n_train < MIN_BATCH or self.n_eval < MIN_BATCH:
            raise RepsimError(f"shift needs at least {MIN_BATCH} training and evaluation samples (unbiased HSIC).")
        capture_options = {"batch_size": cfg.eval_batch, "tokens": cfg.tokens, "spatial": cfg.spatial}
        self.target.prepare(self.chunks, self.eval_chunks, self.held_out, **capture_options)
        if cfg.preserve == "ce" and any(c.labels is None for c in self.chunks):
            raise RepsimError("preserve='ce' trains on hard labels: pass labels= (or (inputs, labels) batches).")
        self.eval_labels = all_labels(self.eval_chunks)
        self.steps = cfg.steps if cfg.steps is not None else auto_steps(self.n_train, cfg.batch_size)
        if cfg.mixup > 0 and cfg.preserve != "ce" and all(mixable(c.inputs) for c in self.chunks):
            self.teacher = copy.deepcopy(self.model)
            self.teacher.requires_grad_(False)
            self.teacher_adapter = for_model(self.teacher)
        else:  # hard labels, or inputs neither floats nor token ids
            self.config = cfg = replace(cfg, mixup=0.0, mixup_similarity=False)
        self._mix_generator = torch.Generator().manual_seed(cfg.seed + 1)

    def _check_mixup_similarity(self) -> None:
        """``mixup_similarity`` needs mixed inputs and the reference rows of them: the original's, or none (a map)."""
        cfg = self.config
        if not cfg.mixup_similarity:
            return
        if cfg.mixup == 0:
            raise RepsimError("mixup_similarity=True uses the mixed inputs of mixup; give mixup > 0 (e.g. 1.0).")
        if isinstance(self.target, PairTarget) and self.target.reference is not None:
            raise RepsimError(
                "mixup_similarity=True needs the reference rows of the mixed inputs, known for the original model "
                "(reference=None) or a target_map; with another reference pass mixup_similarity=False."
            )

    def _split_reference(self, n_total: int) -> None:
        """A precomputed reference tensor aligned with ``data``, cut like the data into training and held-out rows."""
        target = self.target
        if not isinstance(target, PairTarget) or target.reference is None or isinstance(target.reference, tuple):
            return
        rows = target.reference
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[0] != n_total:
            raise InputShapeError(
                f"the reference representation has shape {tuple(getattr(rows, 'shape', ()))}; give a float (n, d) "
                f"tensor with one row per sample of data ({n_total}) in data order."
            )
        if target.eval_reference is not None:
            raise RepsimError("eval_reference= goes with eval_data=; without eval_data the reference is cut like data.")
        assert self.held_out_index is not None
        mask = torch.zeros(n_total, dtype=torch.bool)
        mask[self.held_out_index] = True
        target.reference, target.eval_reference = rows[~mask.to(rows.device)], rows[mask.to(rows.device)]

    def _receive(self, batch: dict[str, torch.Tensor]) -> None:
        self._sink["rows"] = batch

    def _receive_teacher(self, batch: dict[str, torch.Tensor]) -> None:
        self._teacher_sink["rows"] = batch

    def _forward(self, inputs: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The target's layer rows (from the capture) and the preserved output of one forward pass."""
        raw = self.adapter.forward(inputs)
        out = preserved_output(self.adapter, raw, inputs, self.config.output, self.config.preserve)
        self._tokens = token_states(self.adapter, raw, inputs, self.config.preserve, self.config.output)
        return self.target.select(self._sink.pop("rows")), out

    @torch.no_grad()
    def _evaluate_pass(
        self, which: list[Chunk], keep_tokens: bool = False
    ) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
        """Rows and outputs (CPU, float32) of every chunk, in eval mode; ``keep_tokens``: also each chunk's token
        states (a bare encoder with ``preserve="embedding"``), as ``chunk.teacher_tokens``."""
        rows_out, outs = [], []
        with train_flags_kept(self.student):
            for chunk in which:
                parts: dict[str, list[torch.Tensor]] = {}
                out_parts, token_parts = [], []
                for index in chunk.pieces(self.config.eval_batch):
                    rows, out = self._forward(to_device(take(chunk.inputs, index), self.device))
                    for name, r in rows.items():
                        parts.setdefault(name, []).append(r.detach().float().cpu())
                    out_parts.append(out.detach().float().cpu())
                    if keep_tokens and self._tokens is not None:
                        token_parts.append(self._tokens.detach().float().cpu())
                rows_out.append({name: torch.cat(r) for name, r in parts.items()})
                outs.append(torch.cat(out_parts))
                if token_parts and sum(t.numel() for t in token_parts) <= TOKEN_STATES_MAX:
                    chunk.teacher_tokens = torch.cat(token_parts)
        return rows_out, outs

    def _choose_estimator(self, eval_rows: list[dict[str, torch.Tensor]]) -> None:
        """The evaluations' estimator: the measure asked for, or debiased CKA where biased CKA is inflated."""
        self.estimator_reason = ""
        if isinstance(self.target, PairTarget):
            assert self.target.reference_eval is not None
            rows = torch.cat([r[self.target.layer] for r in eval_rows])
            chosen, self.estimator_reason = evaluation_measure(self.measure, rows, self.target.reference_eval)
            if chosen is not self.measure:
                self.quiet = QuietMeasure(chosen)
        self.estimator = self.quiet.measure.id

    def _summarize(self, rows: list[dict[str, torch.Tensor]], outs: list[torch.Tensor]) -> Evaluation:
        checks = OutputChecks.compare(torch.cat(outs), self.teacher_eval, self.eval_labels, self.classify)
        return self.target.evaluate(rows, self.quiet, checks)

    def _precompute(self) -> Evaluation:
        """The original's outputs (the teacher) and reference rows, the criterion, and the evaluation before."""
        cfg = self.config
        train_rows, train_out = self._evaluate_pass(self.chunks, keep_tokens=True)
        for chunk, teacher in zip(self.chunks, train_out, strict=True):
            chunk.teacher = teacher
        eval_rows, eval_out = self._evaluate_pass(self.eval_chunks) if self.held_out else (train_rows, train_out)
        self.target.attach(self.chunks, train_rows, eval_rows)
        self._choose_estimator(eval_rows)
        self.teacher_eval = torch.cat(eval_out)
        self.classify = cfg.preserve in ("kl", "ce")
        if self.classify and self.teacher_eval.shape[1] < 2:
            raise RepsimError(f"preserve={cfg.preserve!r} needs class logits (batch, k >= 2); the output has k = 1.")
        self.criterion = resolve_criterion(cfg.criterion, self.classify, self.eval_labels is not None)
        return self._summarize(eval_rows, eval_out)
