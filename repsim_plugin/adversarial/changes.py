"""The audit's changes of A's representation that keep A's outputs, each an object whose :meth:`row` measures it.

1. :class:`FineTuning` (:func:`~repsim_plugin.adversarial.shift`): A fine-tuned toward a value of the claim
   measure with B while a frozen copy of A keeps its outputs;
2. :class:`SubsetTranslation` (Theorem 1 / Corollary 4 of Davari et al., ICLR 2023): one class of samples moved
   along a direction the next linear layer cannot see (checked end to end by running the model with the
   translation injected when a linear layer reads ``layer_a``; else against a linear probe);
3. :class:`SingleOutlier`: one sample moved far along the same direction.

Every change is evaluated against one :class:`AuditSetting` (A's and B's rows, A's outputs, the measures) and
gives one :class:`~repsim_plugin.adversarial.report.Change` row.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._utils.batches import model_device, take, to_device, train_flags_kept
from .._utils.names import module_of
from ..adapters import for_model
from ..capture import capture
from ..errors import DegenerateInputError, RepsimError, SmallSampleBiasWarning, TargetNotReachedWarning
from ..measures import Measure
from ._data import Chunk, sample_inputs, single_layer_rows
from .objective import preserved_output
from .report import Change
from .result import ShiftResult
from .shifting import shift
from .transforms import (
    outlier_limit,
    scale_for_target_cka,
    separability_preserving_direction,
    subset_translation_limit,
    translate_subset,
)

__all__ = [
    "AuditSetting",
    "FineTuning",
    "Readout",
    "SingleOutlier",
    "SubsetTranslation",
    "rows_and_outputs",
    "stress_direction",
]


@torch.no_grad()
def rows_and_outputs(
    model: nn.Module,
    layer: str,
    chunks: list[Chunk],
    batch_size: int,
    tokens: str,
    spatial: str,
    preserve: str,
    delta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """A's layer rows and preserved outputs on every sample; with ``delta`` (n, d), that change is added to the
    layer's output inside the model (2-D outputs, or 4-D maps flattened) so the outputs show its effect."""
    adapter = for_model(model)
    device = model_device(model)
    module = model.get_submodule(module_of(layer))
    current: dict[str, torch.Tensor] = {}
    shapes: dict[str, Any] = {}

    def inject(mod: nn.Module, args: Any, output: Any) -> Any:
        shapes["output"] = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        if "delta" not in current:
            return None
        if not isinstance(output, torch.Tensor):
            raise RepsimError(f"layer {layer!r} does not return a tensor; the change cannot be injected.")
        return output + current["delta"].to(device=output.device, dtype=output.dtype).reshape(output.shape)

    handle = module.register_forward_hook(inject)
    rows, outs = [], []
    offset = 0
    try:
        with capture(model, [layer], tokens=tokens, spatial=spatial, device="cpu") as rec:
            for chunk in chunks:
                for index in chunk.pieces(batch_size):
                    if delta is not None:
                        current["delta"] = delta[offset + index]
                    inputs = to_device(take(chunk.inputs, index), device)
                    raw = adapter.forward(inputs)
                    outs.append(preserved_output(adapter, raw, inputs, None, preserve).float().cpu())
                    rows.append(single_layer_rows(rec.last_batch, layer).float())
                offset += chunk.n
            rec.clear()
    finally:
        handle.remove()
    return torch.cat(rows), torch.cat(outs), shapes.get("output")


@dataclass
class AuditSetting:
    """What every change is evaluated against: A's rows ``H`` and outputs, B's rows ``HB``, the measures.

    ``failures`` collects the first error or warning of each measure (said once in the report's notes instead of
    for every change).
    """

    model_a: nn.Module
    layer_a: str
    chunks: list[Chunk]  # the evaluation data
    batch_size: int
    tokens: str
    spatial: str
    preserve: str
    classify: bool
    H: torch.Tensor
    HB: torch.Tensor
    outputs: torch.Tensor
    layer_shape: Any
    measures: dict[str, Measure]
    failures: dict[str, str] = field(default_factory=dict)

    def evaluate(self, X: torch.Tensor, Y: torch.Tensor) -> dict[str, float | None]:
        """Every measure on (X, Y); a measure that raises gives None (its first error goes to ``failures``)."""
        out: dict[str, float | None] = {}
        for alias, m in self.measures.items():
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    warnings.simplefilter("ignore", SmallSampleBiasWarning)  # one note per biased CKA measure instead
                    out[alias] = float(m(X, Y))
                for warning in caught:
                    self.failures.setdefault(f"{alias} warned", str(warning.message))
            except RepsimError as error:
                out[alias] = None
                self.failures.setdefault(f"{alias} could not be computed on some representations", str(error))
        return out

    def changed_row(self, name: str, kind: str, description: str, moved: torch.Tensor, **kept: Any) -> Change:
        """The row of a change that moved A's rows to ``moved``: A' vs B, and A vs A'."""
        return Change(name, kind, description, self.evaluate(moved, self.HB), self.evaluate(self.H, moved), **kept)


# --- 1. fine-tuning ---------------------------------------------------------------------------------------------


class FineTuning:
    """A fine-tuned toward ``target`` of the claim measure with B, outputs kept (one :func:`shift` run).

    ``shift_options`` are :func:`shift`'s keyword arguments other than the target, the reference and the measure;
    the run's :class:`ShiftResult` is kept as ``self.result``.
    """

    def __init__(self, label: str, target: float, claim: tuple[str, Measure], data: Any, **shift_options: Any) -> None:
        self.label, self.target, self.data = label, target, data
        self.claim_name, self.claim_measure = claim
        self.options = shift_options
        self.result: ShiftResult | None = None

    def row(self, s: AuditSetting) -> Change:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", SmallSampleBiasWarning)  # said once in the notes
            result = shift(
                s.model_a, s.layer_a, self.data, target=float(self.target), measure=self.claim_measure,
                **self.options,
            )  # fmt: skip
        for warning in caught:
            if issubclass(warning.category, TargetNotReachedWarning):
                continue  # the row says it (name and description), with the numbers
            s.failures.setdefault(f"fine-tuning toward {self.target:g} warned", str(warning.message))
        self.result = result
        check = result.agreement if s.classify else result.cosine
        kept_label = "top-1 agreement" if s.classify else "output cosine"
        found = (
            f"the best state that kept the outputs is from step {result.best_step}."
            if result.best_step > 0
            else "no fine-tuned state kept the outputs within the tolerance, so this row is the original "
            "model (more steps, a lower lr or a smaller lambda_init may find one)."
        )
        reached = (
            f"target reached ({result.measure_after:.3f}, within {result.target_tolerance:g})"
            if result.reached
            else f"target NOT reached: {result.measure_after:.3f} against {self.target:g} +- "
            f"{result.target_tolerance:g}"
        )
        judged = (
            f" (judged with {result.estimator}: {result.estimator_reason}; {result.measure} itself went "
            f"{result.as_requested['before']:.3f} -> {result.as_requested['after']:.3f})"
            if result.estimator_reason and result.as_requested is not None
            else ""
        )
        estimate = (
            f"; the optimiser's own estimate ({result.objective}) was {result.minibatch_estimate:.3f}"
            if result.minibatch_estimate is not None
            else ""
        )
        return s.changed_row(
            f"fine-tuned toward {self.target:g}" + ("" if result.reached else " (target not reached)"),
            "finetune",
            f"A fine-tuned for {result.steps_run} of {result.steps} steps toward {self.claim_name} = {self.target:g} "
            f"with B (preservation {result.preserve}); {reached} on {result.n_eval} held-out samples"
            f"{judged}{estimate}; {found}",
            result.representations["after"],
            kept=result.kept,
            kept_by=f"{kept_label} {check:.1%} on {result.n_eval} held-out samples",
            details={"target": self.target, "shift": self.label, "reached": result.reached},
        )


# --- how predictions are read from the layer --------------------------------------------------------------------


@torch.no_grad()
def _linear_consumers(model: nn.Module, layer: str, chunk: Chunk) -> list[tuple[str, nn.Linear]]:
    """Linear modules whose input is exactly ``layer``'s output (bit for bit, possibly flattened).

    Whether nothing else reads the layer (a residual branch) cannot be seen here: the audit checks the changed
    representation end to end by injecting it into the model and comparing the outputs."""
    seen: dict[str, Any] = {}

    def grab_output(mod: nn.Module, args: Any, output: Any) -> None:
        seen.setdefault("output", output)

    def grab_input(name: str) -> Any:
        def hook(mod: nn.Module, args: Any) -> None:
            if args and isinstance(args[0], torch.Tensor):
                seen.setdefault(f"in:{name}", args[0])

        return hook

    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    handles = [model.get_submodule(module_of(layer)).register_forward_hook(grab_output)]
    handles += [linear.register_forward_pre_hook(grab_input(name)) for name, linear in linears]
    try:
        with train_flags_kept(model):
            for_model(model).forward(to_device(sample_inputs(chunk), model_device(model)))
    finally:
        for h in handles:
            h.remove()
    output = seen.get("output")
    if not isinstance(output, torch.Tensor):
        return []
    found = []
    for name, linear in linears:
        inp = seen.get(f"in:{name}")
        if (
            isinstance(inp, torch.Tensor)
            and inp.dim() == 2
            and inp.numel() == output.numel()
            and torch.equal(inp, output.reshape(inp.shape))
        ):
            found.append((name, linear))
    return found


def _fit_probe(H: torch.Tensor, classes: torch.Tensor, seed: int) -> torch.Tensor:
    """A multinomial logistic-regression probe on H (float64 weights only, (k, d)): L-BFGS, small L2."""
    X = H.double()
    mean = X.mean(0)
    scale = (X - mean).square().sum(1).mean().sqrt()  # one global scale: dead units get no huge weight
    if not bool(scale > 0):
        raise DegenerateInputError("the representation is constant; no probe can be fitted.")
    Z = (X - mean) / scale
    k = int(classes.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    W = (0.01 * torch.randn(k, Z.shape[1], generator=generator, dtype=torch.float64)).requires_grad_(True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([W, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(Z @ W.T + b, classes) + 1e-3 * W.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return W.detach() / scale  # logits of H: (H - mean) / scale @ W^T + b = H @ (W / scale)^T + const


@dataclass
class Readout:
    """How A's predictions are read from ``layer_a``: the weights ``W`` (k, d) of the model's own linear head
    (``head_name``), of a linear probe fitted on the rows (``probe``), or none (no classifier, no labels)."""

    W: torch.Tensor | None = None
    head_name: str | None = None
    probe: bool = False

    @classmethod
    def find(cls, s: AuditSetting, classes: torch.Tensor | None, seed: int) -> Readout:
        if s.classify:
            consumers = _linear_consumers(s.model_a, s.layer_a, s.chunks[0])
            if consumers and (len(s.layer_shape or ()) == 2 or s.spatial == "flatten"):
                head_name, head = consumers[0]
                if head.weight.shape[1] == s.H.shape[1]:
                    return cls(head.weight.detach().double().cpu(), head_name)
        if classes is not None and int(classes.max()) >= 1:
            return cls(_fit_probe(s.H, classes, seed), probe=True)
        return cls()

    def where(self, layer_a: str) -> str:
        """What the direction is invisible to, for a change's description."""
        if self.probe:
            return f" (for a linear probe fitted on A's `{layer_a}`)"
        if self.head_name:
            return f" (for `{self.head_name}`, the linear layer that reads `{layer_a}`)"
        return ""

    def kept(self, s: AuditSetting, moved: torch.Tensor, details: dict[str, Any]) -> dict[str, Any]:
        """The outputs-kept check of a change of A's rows: end to end through the model, or through the probe."""
        kept: bool | None = None
        kept_by = "not checked (no classifier)"
        if self.head_name is not None:
            # end to end: run A with the change injected into the layer's output, compare its predictions
            _, changed_outputs, _ = rows_and_outputs(
                s.model_a,
                s.layer_a,
                s.chunks,
                s.batch_size,
                s.tokens,
                s.spatial,
                s.preserve,
                delta=moved - s.H.double(),
            )
            agreement = float((changed_outputs.argmax(1) == s.outputs.argmax(1)).double().mean())
            change = float((changed_outputs - s.outputs).abs().max())
            kept = agreement == 1.0
            kept_by = f"model predictions {agreement:.1%} unchanged (max logit change {change:.2g})"
            details = {**details, "agreement": agreement, "max_output_change": change, "head": self.head_name}
        elif self.probe and self.W is not None:
            before = (s.H.double() @ self.W.double().T).argmax(1)
            after = (moved.double() @ self.W.double().T).argmax(1)
            agreement = float((before == after).double().mean())
            kept = agreement == 1.0
            kept_by = (
                f"linear-probe predictions {agreement:.1%} unchanged (the model itself is not linear after the layer)"
            )
            details = {**details, "probe_agreement": agreement}
        return {"kept": kept, "kept_by": kept_by, "details": details}


# --- 2. and 3. the analytic changes -----------------------------------------------------------------------------


class SubsetTranslation:
    """One class (else the top decile along the first principal direction) moved along ``direction`` by the
    amount that brings linear CKA(A, A') to ``stress_target`` (or just above Theorem 1's limit)."""

    def __init__(
        self,
        direction: torch.Tensor,
        how: str,
        readout: Readout,
        classes: tuple[torch.Tensor | None, str],
        stress_target: float,
    ) -> None:
        self.v, self.how, self.readout = direction, how, readout
        self.classes, self.class_source = classes
        self.stress_target = stress_target

    def _subset(self, H: torch.Tensor) -> tuple[torch.Tensor, str]:
        n = H.shape[0]
        if self.classes is not None:
            classes = self.classes
            candidates = [int(k) for k in torch.unique(classes) if 0 < int((classes == k).sum()) < n]
            limits = {k: float(subset_translation_limit(H, classes == k)) for k in candidates}
            chosen = min(limits, key=limits.__getitem__)
            mask = classes == chosen
            return mask, f"{self.class_source} {chosen} ({int(mask.sum())} of {n} samples)"
        scores = (H - H.mean(0)) @ torch.linalg.svd(H - H.mean(0), full_matrices=False)[2][0]
        mask = scores >= torch.quantile(scores, 0.9)
        return mask, f"the {int(mask.sum())} samples furthest along the first principal direction"

    def row(self, s: AuditSetting) -> Change:
        H = s.H
        mask, subset = self._subset(H)
        limit = float(subset_translation_limit(H, mask))
        goal = max(self.stress_target, limit + 0.05)
        c = scale_for_target_cka(H, mask, self.v, target=goal)
        moved = translate_subset(H, mask, self.v, c)
        details = {
            "c": c,
            "limit": limit,
            "subset": subset,
            "rows": mask.nonzero().flatten().tolist(),
            "direction": self.v.tolist(),
        }
        return s.changed_row(
            "subset translation",
            "subset_translation",
            f"{subset} moved by c = {c:.3g} along {self.how}{self.readout.where(s.layer_a)}; Theorem 1's limit "
            f"of linear CKA(A, A') is {limit:.3f}.",
            moved,
            **self.readout.kept(s, moved, details),
        )


class SingleOutlier:
    """The sample closest to the mean moved far along ``direction`` (raises ``DegenerateInputError`` when no
    amount reaches the target)."""

    def __init__(self, direction: torch.Tensor, readout: Readout, stress_target: float) -> None:
        self.v, self.readout, self.stress_target = direction, readout, stress_target

    def row(self, s: AuditSetting) -> Change:
        H = s.H
        centred_norms = (H - H.mean(0)).norm(dim=1)
        index = int(centred_norms.argmin())
        single = torch.zeros(H.shape[0], dtype=torch.bool)
        single[index] = True
        limit = float(outlier_limit(H, index))
        scale = float(centred_norms.square().mean().sqrt())
        c = scale_for_target_cka(H, single, self.v, target=max(self.stress_target, limit + 0.05))
        moved = translate_subset(H, single, self.v, c)
        details = {"c": c, "index": index, "limit": limit, "scale": scale, "direction": self.v.tolist()}
        return s.changed_row(
            "single outlier",
            "outlier",
            f"sample {index} (the one closest to the mean) moved by c = {c:.3g} ({c / scale:.1f} x the data scale) "
            f"along the same direction; limit {limit:.3f}.",
            moved,
            **self.readout.kept(s, moved, details),
        )


def stress_direction(readout: Readout, H: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The direction to move samples along: separability-preserving for the readout (the strictest version that
    exists), else an arbitrary one (raises ``DegenerateInputError`` when the readout leaves none)."""
    nonneg = bool((H >= 0).all())
    if readout.W is None:
        if nonneg:
            v = torch.ones(H.shape[1]) / math.sqrt(H.shape[1])
        else:
            v = torch.linalg.svd(H - H.mean(0), full_matrices=False)[2][-1]
        return v, "an arbitrary direction (there is no classifier or labels to keep, so predictions are not checked)"
    attempts = [(nonneg, "logits"), (nonneg, "probabilities")] + ([(False, "logits")] if nonneg else [])
    last_error: Exception | None = None
    for non_negative, keep in attempts:
        try:
            v = separability_preserving_direction(readout.W, nonneg=non_negative, keep=keep)
        except DegenerateInputError as error:
            last_error = error
            continue
        sign = "a non-negative" if non_negative else "a mixed-sign"
        what = "leaves every logit unchanged" if keep == "logits" else "moves every logit by the same amount"
        return v, f"{sign} direction that {what}"
    raise DegenerateInputError(f"no separability-preserving direction exists: {last_error}")
