"""Audit a similarity claim: how far can it be moved while model A's outputs stay the same?

``audit(model_a, layer_a, model_b, layer_b, data)`` measures the claim (linear CKA between the two layers by
default), then changes model A's representation in ways that keep A's outputs, and reports what every requested
measure says before and after each change:

1. **fine-tuning** (:func:`~repsim_plugin.adversarial.shift`): A is fine-tuned toward a low and a high CKA with B
   while a frozen copy of A keeps its outputs (top-1 agreement >= 1 - tolerance for classifiers, output cosine
   >= 1 - tolerance otherwise): the lowest and highest CKA reachable with the outputs kept;
2. **subset translation** (Theorem 1 / Corollary 4 of Davari et al., ICLR 2023): one class of samples moved
   along a direction the next linear layer cannot see (the model's own head when ``layer_a`` feeds a linear
   layer, checked end to end by running the model with the translation injected; else a linear probe fitted
   on the representation); the change is rank one, so the CCA family barely moves while CKA collapses;
3. **a single outlier**: one sample moved far along the same direction.

Every measure is reported side by side: a claim that holds for one measure and not the others is a claim about
the measure.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._utils.batches import take as _take
from ..adapters import for_model
from ..capture import capture
from ..compare import _model_device, _to_device
from ..errors import DegenerateInputError, RepsimError, SmallSampleBiasWarning
from ..measures import Measure, make
from ..results import _atomic_write, _axes_for, _finish_plot, state_dict_fingerprint
from ._data import MIN_BATCH
from ._data import Chunk as _Chunk
from ._data import as_chunks as _as_chunks
from ._data import capture_rows as _capture_rows
from ._data import single_layer_rows as _single_layer_rows
from .objective import preserved_output as _preserved_output
from .result import ShiftResult
from .shifting import shift
from .transforms import (
    outlier_limit,
    scale_for_target_cka,
    separability_preserving_direction,
    subset_translation_limit,
    translate_subset,
)

__all__ = ["DEFAULT_MEASURES", "AuditReport", "Change", "audit"]

DEFAULT_MEASURES: tuple[str, ...] = ("cka", "debiased_cka", "procrustes", "mean_cca")


@dataclass
class Change:
    """One prediction-preserving change of A's representation and what every measure says about it.

    ``values[m]``: measure m between the changed A and B (the claim after the change); ``self_values[m]``:
    between A and its changed self (how m sees the change). ``kept``: the outputs-kept check, ``kept_by``
    what it was (e.g. "top-1 agreement with the original 99.3%"). ``details``: the change's parameters.
    """

    name: str
    kind: str  # "original", "finetune", "subset_translation", "outlier"
    description: str
    values: dict[str, float | None]
    self_values: dict[str, float | None]
    kept: bool | None = None
    kept_by: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "values": dict(self.values),
            "self_values": dict(self.self_values),
            "kept": self.kept,
            "kept_by": self.kept_by,
            "details": _plain(self.details),
        }


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(eq=False)
class AuditReport:
    """The claim, the reachable range with outputs kept, and every measure before and after each change.

    ``claim``: ``claim_measure`` between A's and B's layers on the evaluation data; ``lowest`` / ``highest``: the
    smallest / largest value of the claim measure among the changes that kept A's outputs (the fine-tuned
    models and the analytic stress tests), with ``range_sources`` naming where each came from. ``changes``
    lists every change (the first is the original); ``shifts`` holds the :class:`ShiftResult` of each
    fine-tuning run. Render with :meth:`to_markdown`, serialise with :meth:`to_dict` / :meth:`save`, draw with
    :meth:`plot`.
    """

    model_a: str
    layer_a: str
    model_b: str
    layer_b: str
    claim_measure: str
    claim: float
    measures: list[str]
    measure_ids: dict[str, str]
    larger_is_more_similar: dict[str, bool]
    changes: list[Change]
    tolerance: float
    n: int
    held_out: bool
    features: int
    lowest: float | None = None
    highest: float | None = None
    range_sources: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    fingerprints: dict[str, str] = field(default_factory=dict)
    shifts: dict[str, ShiftResult] = field(default_factory=dict, repr=False)

    @property
    def baseline(self) -> dict[str, float | None]:
        """Every measure between A's and B's layers, before any change."""
        return dict(self.changes[0].values)

    def change(self, name_or_kind: str) -> Change:
        """The first change with this name or kind (e.g. ``"subset_translation"``, ``"finetune low"``)."""
        for item in self.changes:
            if name_or_kind in (item.name, item.kind):
                return item
        raise KeyError(f"no change {name_or_kind!r}; changes: {[c.name for c in self.changes]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_a": self.model_a,
            "layer_a": self.layer_a,
            "model_b": self.model_b,
            "layer_b": self.layer_b,
            "claim_measure": self.claim_measure,
            "claim": self.claim,
            "lowest": self.lowest,
            "highest": self.highest,
            "range_sources": dict(self.range_sources),
            "measures": list(self.measures),
            "measure_ids": dict(self.measure_ids),
            "larger_is_more_similar": dict(self.larger_is_more_similar),
            "tolerance": self.tolerance,
            "n": self.n,
            "held_out": self.held_out,
            "features": self.features,
            "changes": [c.to_dict() for c in self.changes],
            "shifts": {name: result.to_dict() for name, result in self.shifts.items()},
            "notes": list(self.notes),
            "seconds": self.seconds,
            "fingerprints": dict(self.fingerprints),
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON (atomically)."""
        import json

        target = Path(path)
        text = json.dumps(_plain(self.to_dict()), indent=1)
        _atomic_write(target, lambda handle: handle.write(text))
        return target

    # --- markdown ---------------------------------------------------------------------------------------------

    def to_markdown(self) -> str:
        """The report as GitHub markdown: the claim, the reachable range, the side-by-side tables, the notes."""

        def num(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3f}"

        where = f"{self.n} held-out samples" if self.held_out else f"{self.n} samples"
        lines = [
            f"# Similarity audit: {self.model_a} `{self.layer_a}` vs {self.model_b} `{self.layer_b}`",
            "",
            f"**Claim**: {self.claim_measure} = **{self.claim:.3f}** on {where} ({self.features} features).",
            "",
        ]
        if self.lowest is not None and self.highest is not None:
            lines.append(
                f"**With A's outputs kept**, {self.claim_measure} ranges from **{self.lowest:.3f}** "
                f"({self.range_sources.get('lowest', '')}) to **{self.highest:.3f}** "
                f"({self.range_sources.get('highest', '')})."
            )
            lines.append("")
        header = [
            "change",
            "outputs kept",
            *(m if self.larger_is_more_similar[m] else f"{m} (distance: lower = similar)" for m in self.measures),
        ]

        def table(attribute: str, skip_original: bool) -> list[str]:
            rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for item in self.changes:
                if skip_original and item.kind == "original":
                    continue
                if item.kept is None:
                    kept = item.kept_by or "—"
                else:
                    kept = ("yes: " if item.kept else "**no**: ") + item.kept_by
                values = getattr(item, attribute)
                rows.append("| " + " | ".join([item.name, kept, *(num(values.get(m)) for m in self.measures)]) + " |")
            return rows

        lines += [
            f"## Every measure, A' (changed) vs B `{self.layer_b}`",
            "",
            "How the claim reads after each change of A that keeps its outputs.",
            "",
            *table("values", skip_original=False),
            "",
            "## How each measure sees the change itself (A vs A')",
            "",
            "The same changes, compared with A's original representation: a measure that stays near its maximum "
            "is invariant to the change.",
            "",
            *table("self_values", skip_original=True),
            "",
            "## The changes",
            "",
        ]
        for item in self.changes:
            if item.kind == "original":
                continue
            lines.append(f"- **{item.name}**: {item.description}")
        if self.shifts:
            lines += ["", "## Fine-tuning runs", ""]
            lines.append(
                "| run | target | before | after | agreement | KL | output cosine | accuracy before -> after | "
                "best step / steps | lambda start -> end | seconds |"
            )
            lines.append("|" + "---|" * 11)
            for name, result in self.shifts.items():
                start = result.history[0]["lambda"] if result.history else float("nan")
                accuracy = (
                    f"{result.accuracy_before:.3f} -> {result.accuracy_after:.3f}"
                    if result.accuracy_before is not None and result.accuracy_after is not None
                    else "n/a"
                )
                lines.append(
                    "| "
                    + " | ".join(
                        [
                            name,
                            num(result.target),
                            num(result.measure_before),
                            num(result.measure_after),
                            num(result.agreement),
                            num(result.kl),
                            num(result.cosine),
                            accuracy,
                            f"{result.best_step} / {result.steps}",
                            f"{start:.3g} -> {result.lambda_final:.3g}",
                            f"{result.seconds:.1f}",
                        ]
                    )
                    + " |"
                )
        if self.notes:
            lines += ["", "## Notes", ""]
            lines += [f"- {note}" for note in self.notes]
        lines += [
            "",
            f"Measures: {', '.join(f'`{m}` = `{self.measure_ids[m]}`' for m in self.measures)}. "
            f"Outputs count as kept within tolerance {self.tolerance:g}.",
            "",
        ]
        return "\n".join(lines)

    # --- plot -------------------------------------------------------------------------------------------------

    def plot(self, path_or_ax: Any = None, *, dpi: int = 120) -> Any:
        """Dot plot: one column per measure, one marker per change (A' vs B); the claim is the first marker.

        ``path_or_ax``: a file path (written atomically; returns the Figure), a matplotlib Axes, or None (a new
        Figure; no pyplot state is touched).
        """
        fig, ax = _axes_for(path_or_ax, (max(6.0, 1.6 * len(self.measures) + 4.0), 4.0), dpi)
        markers = "o^vsDPX*h"
        width = 0.6
        count = len(self.changes)
        for k, item in enumerate(self.changes):
            xs, ys = [], []
            for i, m in enumerate(self.measures):
                value = item.values.get(m)
                if value is not None:
                    xs.append(i - width / 2 + width * (k + 0.5) / count)
                    ys.append(value)
            filled = item.kept is not False
            ax.scatter(
                xs,
                ys,
                marker=markers[k % len(markers)],
                s=46,
                label=item.name + ("" if filled else " (outputs not kept)"),
                facecolors=None if filled else "none",
                edgecolors=None if filled else "black",
            )
        labels = [m + ("" if self.larger_is_more_similar[m] else "\n(distance)") for m in self.measures]
        ax.set_xticks(range(len(self.measures)), labels=labels, fontsize=8)
        ax.set_ylabel(f"A' vs B ({self.layer_a} vs {self.layer_b})")
        ax.set_title(f"audit: {self.claim_measure} claim {self.claim:.3f}; changes keep A's outputs", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        return _finish_plot(fig, ax, path_or_ax)


# --- helpers ------------------------------------------------------------------------------------------------------


def _name(model: nn.Module, given: str | None) -> str:
    return given if given else type(model).__name__


def _evaluate_measures(
    measures: dict[str, Measure], X: torch.Tensor, Y: torch.Tensor, failures: dict[str, str]
) -> dict[str, float | None]:
    """Every measure on (X, Y); a measure that raises gives None, and its first error or warning is kept for the
    report's notes (``failures``) instead of being repeated for every change."""
    out: dict[str, float | None] = {}
    for alias, m in measures.items():
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                warnings.simplefilter("ignore", SmallSampleBiasWarning)  # one note per biased CKA measure instead
                out[alias] = float(m(X, Y))
            for warning in caught:
                failures.setdefault(f"{alias} warned", str(warning.message))
        except RepsimError as error:
            out[alias] = None
            failures.setdefault(f"{alias} could not be computed on some representations", str(error))
    return out


@torch.no_grad()
def _rows_and_outputs(
    model: nn.Module,
    layer: str,
    chunks: list[_Chunk],
    batch_size: int,
    tokens: str,
    spatial: str,
    preserve: str,
    delta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """A's layer rows and preserved outputs on every sample; with ``delta`` (n, d), that change is added to the
    layer's output inside the model (2-D outputs, or 4-D maps flattened) so the outputs show its effect."""
    adapter = for_model(model)
    device = _model_device(model)
    module = model.get_submodule(layer.split("#")[0])
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
                    inputs = _to_device(_take(chunk.inputs, index), device)
                    raw = adapter.forward(inputs)
                    outs.append(_preserved_output(adapter, raw, inputs, None, preserve).float().cpu())
                    rows.append(_single_layer_rows(rec.last_batch, layer).float())
                offset += chunk.n
            rec.clear()
    finally:
        handle.remove()
    return torch.cat(rows), torch.cat(outs), shapes.get("output")


@torch.no_grad()
def _linear_consumers(model: nn.Module, layer: str, chunk: _Chunk) -> list[tuple[str, nn.Linear]]:
    """Linear modules whose input is exactly ``layer``'s output (bit for bit, possibly flattened).

    Whether nothing else reads the layer (a residual branch) cannot be seen here: the audit checks the changed
    representation end to end by injecting it into the model and comparing the outputs."""
    adapter = for_model(model)
    device = _model_device(model)
    seen: dict[str, Any] = {}
    handles = []
    module = model.get_submodule(layer.split("#")[0])

    def grab_output(mod: nn.Module, args: Any, output: Any) -> None:
        seen.setdefault("output", output)

    handles.append(module.register_forward_hook(grab_output))
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in linears:

        def grab_input(mod: nn.Module, args: Any, name: str = name) -> None:
            if args and isinstance(args[0], torch.Tensor):
                seen.setdefault(f"in:{name}", args[0])

        handles.append(linear.register_forward_pre_hook(grab_input))
    was_training = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        adapter.forward(_to_device(_take(chunk.inputs, torch.arange(min(chunk.n, MIN_BATCH))), device))
    finally:
        for h in handles:
            h.remove()
        for m, flag in was_training:
            m.training = flag
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


def _direction(W: torch.Tensor, nonneg: bool) -> tuple[torch.Tensor, str]:
    """The separability-preserving direction, trying the strictest version first."""
    attempts = [(nonneg, "logits"), (nonneg, "probabilities")] + ([(False, "logits")] if nonneg else [])
    last_error: Exception | None = None
    for non_negative, keep in attempts:
        try:
            v = separability_preserving_direction(W, nonneg=non_negative, keep=keep)
        except DegenerateInputError as error:
            last_error = error
            continue
        sign = "non-negative" if non_negative else "mixed-sign"
        what = "leaves every logit unchanged" if keep == "logits" else "moves every logit by the same amount"
        return v, f"{sign} direction that {what}"
    raise DegenerateInputError(f"no separability-preserving direction exists: {last_error}")


# --- the audit ----------------------------------------------------------------------------------------------------


def audit(
    model_a: nn.Module,
    layer_a: str,
    model_b: nn.Module,
    layer_b: str,
    data: Any,
    measures: Sequence[str] = DEFAULT_MEASURES,
    tolerance: float = 0.01,
    *,
    claim_measure: str = "cka",
    targets: tuple[float, float] = (0.0, 1.0),
    steps: int = 300,
    eval_data: Any = None,
    labels: Any = None,
    eval_labels: Any = None,
    stress_target: float = 0.2,
    seed: int = 0,
    progress: bool = False,
    tokens: str = "mean",
    spatial: str = "flatten",
    batch_size: int = 128,
    names: tuple[str, str] | None = None,
    **shift_kwargs: Any,
) -> AuditReport:
    """Audit the claim ``claim_measure(model_a.layer_a, model_b.layer_b)`` (see the module docstring).

    Args:
        data: inputs to fine-tune on (as for :func:`shift`); also the evaluation data when ``eval_data`` is None.
        measures: aliases, ids or ``Measure`` objects to report side by side (the claim measure is added if
            absent); a measure that fails on some representation is shown as n/a, with the reason in the notes.
        tolerance: outputs count as kept while top-1 agreement with the original A stays >= 1 - tolerance
            (classifiers) or the mean output cosine >= 1 - tolerance (encoders without logits).
        targets: the low and high targets of the two fine-tuning runs; ``steps=0`` skips fine-tuning.
        labels / eval_labels: class labels; the subset translation moves one class (else A's predicted class).
        stress_target: the CKA the subset translation and the outlier are scaled to reach (when reachable).
        names: labels of the two models in the report.
        shift_kwargs: passed on to :func:`shift` (``lr``, ``temperature``, ``lambda_init``, ``batch_size`` ...).
    """
    started = time.perf_counter()
    for model, which in ((model_a, "model_a"), (model_b, "model_b")):
        if not isinstance(model, nn.Module):
            raise RepsimError(f"{which} must be a torch.nn.Module, got {type(model).__name__}.")
    for layer, which in ((layer_a, "layer_a"), (layer_b, "layer_b")):
        if not isinstance(layer, str) or not layer:
            raise RepsimError(f"{which} must be a layer name, got {layer!r}.")
    if isinstance(measures, str | Measure):
        measures = [measures]
    given = {(m if isinstance(m, str) else make(m).id): make(m) for m in measures}
    aliases = list(given)
    if claim_measure not in aliases:
        aliases.insert(0, claim_measure)
    resolved = {alias: given[alias] if alias in given else make(alias) for alias in aliases}
    claim_m = resolved[claim_measure]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise RepsimError(f"steps must be an integer >= 0 (0 skips fine-tuning), got {steps!r}.")
    reserved = {"target", "reference", "measure", "criterion", "eval_reference", "target_map", "map_layers"}
    clash = sorted(reserved & set(shift_kwargs))
    if clash:
        raise RepsimError(
            f"audit sets {', '.join(clash)} for its fine-tuning runs itself (outputs kept = top-1 agreement, or "
            "output cosine, >= 1 - tolerance); leave them out."
        )
    if len(targets) != 2:
        raise RepsimError(f"targets must be a (low, high) pair, got {targets!r}.")
    fingerprints = {"a": state_dict_fingerprint(model_a), "b": state_dict_fingerprint(model_b)}

    adapter_a = for_model(model_a)
    chunks = _as_chunks(data, adapter_a, labels, "data")
    held_out = eval_data is not None
    eval_chunks = _as_chunks(eval_data, adapter_a, eval_labels, "eval_data") if held_out else chunks
    eval_batch = max(batch_size, 256)

    # preserved outputs: logits for classifiers, pooled states for encoders
    classify = _main_output_rank(model_a, eval_chunks[0]) == 2
    preserve = "kl" if classify else "embedding"
    H, outputs, layer_shape = _rows_and_outputs(model_a, layer_a, eval_chunks, eval_batch, tokens, spatial, preserve)
    if classify and outputs.shape[1] < 2:
        classify, preserve = False, "mse"
    HB = _single_layer_rows(
        _merge(_capture_rows(model_b, [layer_b], eval_chunks, eval_batch, tokens, spatial)), layer_b
    )
    n, d = H.shape
    failures: dict[str, str] = {}
    notes: list[str] = []
    baseline = _evaluate_measures(resolved, H, HB, failures)
    if baseline[claim_measure] is None:
        reason = next(message for what, message in failures.items() if what.startswith(claim_measure))
        raise RepsimError(f"the claim measure {claim_measure} cannot be computed here: {reason}")
    claim = float(baseline[claim_measure])  # type: ignore[arg-type]
    changes = [
        Change(
            "original (the claim)",
            "original",
            "A and B as given.",
            baseline,
            dict.fromkeys(aliases, None),
        )
    ]
    criterion = "agreement" if classify else "cosine"
    kept_label = "top-1 agreement" if classify else "output cosine"
    biased = [a for a, m in resolved.items() if m.spec.name == "cka" and dict(m.params).get("hsic") == "gretton"]
    null = math.sqrt(d * HB.shape[1] / ((n + d) * (n + HB.shape[1])))
    if biased and null > 0.1:
        notes.append(
            f"With n = {n} samples and {d} / {HB.shape[1]} features, biased CKA of independent representations is "
            f"already about {null:.2f} (for {', '.join(biased)}); read it next to debiased CKA."
        )

    # --- 1. fine-tuning toward low and high targets --------------------------------------------------------
    shifts: dict[str, ShiftResult] = {}
    if steps > 0:
        options = {"batch_size": batch_size, **shift_kwargs}
        options.setdefault("preserve", preserve)
        for label, target in zip(("low", "high"), targets, strict=True):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                warnings.simplefilter("ignore", SmallSampleBiasWarning)  # said once in the notes
                result = shift(
                    model_a,
                    layer_a,
                    data,
                    target=float(target),
                    reference=(model_b, layer_b),
                    measure=claim_m,
                    tolerance=tolerance,
                    steps=steps,
                    eval_data=eval_data,
                    labels=labels,
                    eval_labels=eval_labels,
                    seed=seed,
                    progress=progress,
                    criterion=criterion,
                    tokens=tokens,
                    spatial=spatial,
                    **options,
                )
            for warning in caught:
                failures.setdefault(f"fine-tuning toward {target:g} warned", str(warning.message))
            shifts[f"toward {target:g}"] = result
            after = result.representations["after"]
            check = result.agreement if classify else result.cosine
            changes.append(
                Change(
                    f"fine-tuned toward {target:g}",
                    "finetune",
                    f"A fine-tuned for {steps} steps toward {claim_measure} = {target:g} with B ({result.objective}; "
                    f"preservation {result.preserve}); "
                    + (
                        f"the best state that kept the outputs is from step {result.best_step}."
                        if result.best_step > 0
                        else "no fine-tuned state kept the outputs within the tolerance, so this row is the original "
                        "model (more steps, a lower lr or a smaller lambda_init may find one)."
                    ),
                    _evaluate_measures(resolved, after, HB, failures),
                    _evaluate_measures(resolved, H, after, failures),
                    kept=result.kept,
                    kept_by=f"{kept_label} {check:.1%}",
                    details={"target": target, "shift": label},
                )
            )

    # --- 2. subset translation along a separability-preserving direction ------------------------------------
    classes, class_source = _classes(eval_chunks, outputs if classify else None)
    W, head_name = None, None
    if classify:
        consumers = _linear_consumers(model_a, layer_a, eval_chunks[0])
        if consumers and (len(layer_shape or ()) == 2 or spatial == "flatten"):
            head_name, head = consumers[0]
            if head.weight.shape[1] == d:
                W = head.weight.detach().double().cpu()
            else:
                head_name = None
    probe = False
    if W is None and classes is not None and int(classes.max()) >= 1:
        W = _fit_probe(H, classes, seed)
        probe = True
    nonneg = bool((H >= 0).all())
    # what every analytic change is evaluated against (the change itself varies: name, description, moved rows)
    analytic_change = functools.partial(
        _analytic_change,
        HB=HB, resolved=resolved, failures=failures, model_a=model_a, layer_a=layer_a, chunks=eval_chunks,
        batch_size=eval_batch, tokens=tokens, spatial=spatial, preserve=preserve, outputs=outputs, W=W,
        head_name=head_name, probe=probe, layer_shape=layer_shape,
    )  # fmt: skip
    v = None
    if W is not None:
        try:
            v, how = _direction(W, nonneg)
        except DegenerateInputError as error:
            notes.append(f"Subset translation and outlier skipped: {error}")
    else:
        v = _fallback_direction(H, nonneg)
        how = "no classifier or labels to keep: the direction is arbitrary and predictions are not checked"
    if v is not None:
        if classes is not None:
            candidates = [int(k) for k in torch.unique(classes) if 0 < int((classes == k).sum()) < n]
            limits = {k: float(subset_translation_limit(H, classes == k)) for k in candidates}
            chosen = min(limits, key=limits.__getitem__)
            mask = classes == chosen
            subset = f"{class_source} {chosen} ({int(mask.sum())} of {n} samples)"
        else:
            scores = (H - H.mean(0)) @ torch.linalg.svd(H - H.mean(0), full_matrices=False)[2][0]
            mask = scores >= torch.quantile(scores, 0.9)
            subset = f"the {int(mask.sum())} samples furthest along the first principal direction"
        limit = float(subset_translation_limit(H, mask))
        goal = max(stress_target, limit + 0.05)
        c = scale_for_target_cka(H, mask, v, target=goal)
        moved = translate_subset(H, mask, v, c)
        changes.append(
            analytic_change(
                "subset translation",
                "subset_translation",
                f"{subset} moved by c = {c:.3g} along a {how}"
                + (
                    f" (for a linear probe fitted on A's `{layer_a}`)"
                    if probe
                    else f" (for `{head_name}`, the linear layer that reads `{layer_a}`)"
                    if head_name
                    else ""
                )
                + f"; Theorem 1's limit of linear CKA(A, A') is {limit:.3f}.",
                H,
                moved,
                details={
                    "c": c,
                    "limit": limit,
                    "subset": subset,
                    "rows": mask.nonzero().flatten().tolist(),
                    "direction": v.tolist(),
                },
            )
        )
        # --- 3. a single outlier ------------------------------------------------------------------------------
        centred_norms = (H - H.mean(0)).norm(dim=1)
        index = int(centred_norms.argmin())
        single = torch.zeros(n, dtype=torch.bool)
        single[index] = True
        o_limit = float(outlier_limit(H, index))
        scale = float(centred_norms.square().mean().sqrt())
        try:
            c_out = scale_for_target_cka(H, single, v, target=max(stress_target, o_limit + 0.05))
        except DegenerateInputError as error:
            notes.append(f"Outlier skipped: {error}")
        else:
            outlier = translate_subset(H, single, v, c_out)
            changes.append(
                analytic_change(
                    "single outlier",
                    "outlier",
                    f"sample {index} (the one closest to the mean) moved by c = {c_out:.3g} "
                    f"({c_out / scale:.1f} x the data scale) along the same direction; limit {o_limit:.3f}.",
                    H,
                    outlier,
                    details={"c": c_out, "index": index, "limit": o_limit, "scale": scale, "direction": v.tolist()},
                )
            )
        rank = int(torch.linalg.matrix_rank(H.double() - H.double().mean(0)))
        _cca_note(changes, resolved, rank, notes)

    for what, message in failures.items():
        notes.append(f"{what}: {message}")

    kept_values = [
        (item.values[claim_measure], item.name)
        for item in changes
        if item.kept is not False and item.values.get(claim_measure) is not None
    ]
    low_value, low_source = min(kept_values, key=lambda t: t[0])  # type: ignore[arg-type,return-value]
    high_value, high_source = max(kept_values, key=lambda t: t[0])  # type: ignore[arg-type,return-value]
    label_a, label_b = names if names is not None else (_name(model_a, None), _name(model_b, None))
    return AuditReport(
        model_a=label_a,
        layer_a=layer_a,
        model_b=label_b,
        layer_b=layer_b,
        claim_measure=claim_measure,
        claim=claim,
        measures=aliases,
        measure_ids={alias: m.id for alias, m in resolved.items()},
        larger_is_more_similar={alias: m.larger_is_more_similar for alias, m in resolved.items()},
        changes=changes,
        tolerance=float(tolerance),
        n=n,
        held_out=held_out,
        features=d,
        lowest=float(low_value),  # type: ignore[arg-type]
        highest=float(high_value),  # type: ignore[arg-type]
        range_sources={"lowest": low_source, "highest": high_source},
        notes=notes,
        seconds=time.perf_counter() - started,
        fingerprints=fingerprints,
        shifts=shifts,
    )


def _merge(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    names = rows[0].keys()
    return {name: torch.cat([r[name] for r in rows]) for name in names}


@torch.no_grad()
def _main_output_rank(model: nn.Module, chunk: _Chunk) -> int:
    adapter = for_model(model)
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        raw = adapter.forward(
            _to_device(_take(chunk.inputs, torch.arange(min(chunk.n, MIN_BATCH))), _model_device(model))
        )
        return adapter.main_output(raw).dim()
    finally:
        for m, flag in flags:
            m.training = flag


def _classes(chunks: list[_Chunk], outputs: torch.Tensor | None) -> tuple[torch.Tensor | None, str]:
    if all(c.labels is not None for c in chunks):
        return torch.cat([c.labels for c in chunks]), "class"  # type: ignore[misc]
    if outputs is not None:
        return outputs.argmax(1), "predicted class"
    return None, ""


def _fallback_direction(H: torch.Tensor, nonneg: bool) -> torch.Tensor:
    if nonneg:
        return torch.ones(H.shape[1]) / math.sqrt(H.shape[1])
    Hc = H - H.mean(0)
    return torch.linalg.svd(Hc, full_matrices=False)[2][-1]


def _analytic_change(
    name: str,
    kind: str,
    description: str,
    H: torch.Tensor,
    moved: torch.Tensor,
    *,
    HB: torch.Tensor,
    resolved: dict[str, Measure],
    failures: dict[str, str],
    model_a: nn.Module,
    layer_a: str,
    chunks: list[_Chunk],
    batch_size: int,
    tokens: str,
    spatial: str,
    preserve: str,
    outputs: torch.Tensor,
    W: torch.Tensor | None,
    head_name: str | None,
    probe: bool,
    layer_shape: Any,
    details: dict[str, Any],
) -> Change:
    kept: bool | None = None
    kept_by = "not checked (no classifier)"
    if head_name is not None:
        # end to end: run A with the change injected into the layer's output, compare its predictions
        _, changed_outputs, _ = _rows_and_outputs(
            model_a, layer_a, chunks, batch_size, tokens, spatial, preserve, delta=moved - H.double()
        )
        agreement = float((changed_outputs.argmax(1) == outputs.argmax(1)).double().mean())
        change = float((changed_outputs - outputs).abs().max())
        kept = agreement == 1.0
        kept_by = f"model predictions {agreement:.1%} unchanged (max logit change {change:.2g})"
        details = {**details, "agreement": agreement, "max_output_change": change, "head": head_name}
    elif probe and W is not None:
        before = (H.double() @ W.double().T).argmax(1)
        after = (moved.double() @ W.double().T).argmax(1)
        agreement = float((before == after).double().mean())
        kept = agreement == 1.0
        kept_by = f"linear-probe predictions {agreement:.1%} unchanged (the model itself is not linear after the layer)"
        details = {**details, "probe_agreement": agreement}
    return Change(
        name,
        kind,
        description,
        _evaluate_measures(resolved, moved, HB, failures),
        _evaluate_measures(resolved, H, moved, failures),
        kept=kept,
        kept_by=kept_by,
        details=details,
    )


def _cca_note(changes: list[Change], resolved: dict[str, Measure], rank: int, notes: list[str]) -> None:
    """Say, with the numbers, that a rank-one change leaves CCA near 1 while CKA / Procrustes fall."""
    try:
        subset = next(c for c in changes if c.kind == "subset_translation")
    except StopIteration:
        return
    cca = [a for a, m in resolved.items() if m.spec.name in ("cca", "svcca", "pwcca")]
    others = [a for a, m in resolved.items() if m.spec.name in ("cka", "procrustes") and m.larger_is_more_similar]
    shown = [f"{a} {subset.self_values[a]:.3f}" for a in cca + others if subset.self_values.get(a) is not None]
    if cca and shown:
        notes.append(
            f"The subset translation adds a rank-one matrix to A's representation (rank p = {rank}), so at least "
            f"p - 1 of its canonical correlations with the original stay 1 (mean CCA >= (p-1)/p = "
            f"{(rank - 1) / rank:.3f}), while CKA and Procrustes see a large change. A vs A': {', '.join(shown)}."
        )
