"""Audit a similarity claim: how far can it be moved while model A's outputs stay the same?

``audit(model_a, layer_a, model_b, layer_b, data)`` measures the claim (linear CKA between the two layers by
default), then changes model A's representation in ways that keep A's outputs, and reports what every requested
measure says before and after each change (the changes are objects of :mod:`.changes`):

1. **fine-tuning** (:func:`~repsim_plugin.adversarial.shift`): A is fine-tuned toward a low and a high CKA with B
   while a frozen copy of A keeps its outputs (top-1 agreement >= 1 - tolerance for classifiers, output cosine
   >= 1 - tolerance otherwise): the lowest and highest CKA reachable with the outputs kept;
2. **subset translation** (Theorem 1 / Corollary 4 of Davari et al., ICLR 2023): one class of samples moved
   along a direction the next linear layer cannot see (the model's own head when ``layer_a`` feeds a linear
   layer, checked end to end by running the model with the translation injected; else a linear probe fitted
   on the representation); the change is rank one, so mean CCA stays >= (p-1)/p while CKA collapses;
3. **a single outlier**: one sample moved far along the same direction.

Every measure is reported side by side: a claim that holds for one measure and not the others is a claim about
the measure.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._utils.batches import model_device, to_device, train_flags_kept
from .._utils.checks import Float, Instance, Int, Optional, Where, check_one, check_params
from ..adapters import for_model
from ..capture import resolve_layers
from ..errors import DegenerateInputError, RepsimError
from ..measures import Measure, make
from ..measures.kernels import NULL_BIAS_WARNING, expected_null_cka
from ..results import state_dict_fingerprint
from ._data import Chunk, as_chunks, capture_rows, evaluation_split, merge_rows, sample_inputs, single_layer_rows
from .changes import (
    AuditSetting,
    FineTuning,
    Readout,
    SingleOutlier,
    SubsetTranslation,
    rows_and_outputs,
    stress_direction,
)
from .report import AuditReport, Change

__all__ = ["AUDIT_PARAMS", "DEFAULT_MEASURES", "SELF_AUDIT", "audit"]

#: The note (and headline) of an audit whose model B is model A itself (same weights, same layer).
SELF_AUDIT = (
    "A IS AUDITED AGAINST ITSELF: model B has the same weights as model A and layer_b is layer_a, so the claim is "
    "the similarity of A's layer with itself (1 for CKA) and says nothing about two models; pass another model "
    "(or checkpoint) as B."
)

DEFAULT_MEASURES: tuple[str, ...] = ("cka", "debiased_cka", "procrustes", "mean_cca")

#: What :func:`audit` sets for its fine-tuning runs itself (not accepted in ``shift_kwargs``).
RESERVED_SHIFT_OPTIONS = frozenset(
    {"target", "reference", "measure", "criterion", "eval_reference", "target_map", "map_layers"}
)


def _layer_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _pair(value: Any) -> bool:
    return len(value) == 2


#: The constraints of :func:`audit`'s own parameters (the fine-tuning options are :func:`shift`'s).
AUDIT_PARAMS = {
    "model_a": Instance(nn.Module, "a torch.nn.Module"),
    "model_b": Instance(nn.Module, "a torch.nn.Module"),
    "layer_a": Where(_layer_name, "a layer name", bad=("", 3, None)),
    "layer_b": Where(_layer_name, "a layer name", bad=("", 3, None)),
    "steps": Optional(Int(minimum=0)),
    "targets": Where(_pair, "a (low, high) pair", bad=((0.0,), (0.0, 0.5, 1.0), 3)),
    "tolerance": Float(minimum=0, maximum=1),
}


def _resolve_measures(measures: Sequence[str | Measure] | str | Measure, claim: str) -> dict[str, Measure]:
    """The measures to report by the name they are shown under; the claim measure first when not given."""
    if isinstance(measures, str | Measure):
        measures = [measures]
    given = {(m if isinstance(m, str) else make(m).id): make(m) for m in measures}
    aliases = list(given)
    if claim not in aliases:
        aliases.insert(0, claim)
    return {alias: given[alias] if alias in given else make(alias) for alias in aliases}


@torch.no_grad()
def _main_output_rank(model: nn.Module, chunk: Chunk) -> int:
    adapter = for_model(model)
    with train_flags_kept(model):
        raw = adapter.forward(to_device(sample_inputs(chunk), model_device(model)))
        return adapter.main_output(raw).dim()


def _setting(
    models: tuple[nn.Module, str, nn.Module, str],
    chunks: list[Chunk],
    measures: dict[str, Measure],
    *,
    batch_size: int,
    tokens: str,
    spatial: str,
) -> AuditSetting:
    """A's rows and outputs and B's rows on the evaluation data; logits are preserved for classifiers."""
    model_a, layer_a, model_b, layer_b = models
    classify = _main_output_rank(model_a, chunks[0]) == 2
    preserve = "kl" if classify else "embedding"
    H, outputs, layer_shape = rows_and_outputs(model_a, layer_a, chunks, batch_size, tokens, spatial, preserve)
    if classify and outputs.shape[1] < 2:
        classify, preserve = False, "mse"
    HB = single_layer_rows(merge_rows(capture_rows(model_b, [layer_b], chunks, batch_size, tokens, spatial)), layer_b)
    return AuditSetting(
        model_a, layer_a, chunks, batch_size, tokens, spatial, preserve, classify, H, HB, outputs, layer_shape, measures
    )


def _bias_note(s: AuditSetting) -> list[str]:
    """Biased linear CKA (a measure declaring biased feature-space streaming) is inflated at small n."""
    biased = [
        alias
        for alias, m in s.measures.items()
        if "feature_streaming" in m.estimators and not m.estimators["feature_streaming"].options.get("debiased", False)
    ]
    (n, d), q = s.H.shape, s.HB.shape[1]
    null = expected_null_cka(n, d, q)
    if biased and null > NULL_BIAS_WARNING:
        return [
            f"With n = {n} samples and {d} / {q} features, biased CKA of independent representations is "
            f"already about {null:.2f} (for {', '.join(biased)}); read it next to debiased CKA."
        ]
    return []


def _classes(s: AuditSetting) -> tuple[torch.Tensor | None, str]:
    if all(c.labels is not None for c in s.chunks):
        return torch.cat([c.labels for c in s.chunks if c.labels is not None]), "class"
    if s.classify:
        return s.outputs.argmax(1), "predicted class"
    return None, ""


def _analytic_rows(s: AuditSetting, stress_target: float, seed: int, notes: list[str]) -> list[Change]:
    """The subset translation and the single outlier along a direction A's readout cannot see."""
    classes = _classes(s)
    readout = Readout.find(s, classes[0], seed)
    try:
        v, how = stress_direction(readout, s.H)
    except DegenerateInputError as error:
        notes.append(f"Subset translation and outlier skipped: {error}")
        return []
    rows = [SubsetTranslation(v, how, readout, classes, stress_target).row(s)]
    try:
        rows.append(SingleOutlier(v, readout, stress_target).row(s))
    except DegenerateInputError as error:
        notes.append(f"Outlier skipped: {error}")
    rank = int(torch.linalg.matrix_rank(s.H.double() - s.H.double().mean(0)))
    notes += _cca_note(rows[0], s.measures, rank)
    return rows


def _cca_note(subset: Change, measures: dict[str, Measure], rank: int) -> list[str]:
    """Say, with the numbers, that a rank-one change leaves CCA near 1 while CKA / Procrustes fall.

    The measures that read only the column span are those declared invariant to invertible linear maps (mean
    CCA): a rank-one change moves at most one direction of the span.
    """
    span_only = [a for a, m in measures.items() if "invertible_linear" in m.invariances]
    others = [a for a, m in measures.items() if m.larger_is_more_similar and a not in span_only]
    shown = [f"{a} {subset.self_values[a]:.3f}" for a in span_only + others if subset.self_values.get(a) is not None]
    if not (span_only and shown):
        return []
    return [
        f"The subset translation adds a rank-one matrix to A's representation (rank p = {rank}), so at least "
        f"p - 1 of its canonical correlations with the original stay 1 (mean CCA >= (p-1)/p = "
        f"{(rank - 1) / rank:.3f}; this holds for the measures that read only the column span: "
        f"{', '.join(span_only)}), while CKA and Procrustes see a large change. The bound does not cover SVCCA "
        "(it first drops low-variance directions, which the move changes) or PWCCA: read their own values. "
        f"A vs A': {', '.join(shown)}."
    ]


class _NoBar:
    def set_description(self, text: str) -> None: ...

    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


def _bar(enabled: bool, total: int) -> Any:
    """One bar over the audit's changes (each fine-tuning run shows its own bar of steps below it)."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="audit", unit="change", leave=False)


def _attribution_inputs(s: AuditSetting, attributions: Any, limit: int, notes: list[str]) -> torch.Tensor | None:
    """The evaluation inputs whose attributions are compared, or None (with a note) when they cannot be."""
    if attributions is None:
        return None
    if not callable(attributions):
        raise RepsimError(
            f"attributions must be a captum attribution class such as captum.attr.IntegratedGradients, got "
            f"{type(attributions).__name__}."
        )
    check_one({"attribution_samples": Int(minimum=2)}, "attribution_samples", limit)
    inputs = [c.inputs for c in s.chunks]
    if not s.classify or not all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in inputs):
        notes.append(
            "Attributions not compared: they are computed for a classifier's (batch, classes) output on "
            "floating-point input tensors (for token inputs, use captum's LayerIntegratedGradients with "
            "repsim_plugin.captum.AttributionSimilarity)."
        )
        return None
    return torch.cat(inputs)[:limit].to(model_device(s.model_a))


def _attribution_similarity(
    s: AuditSetting, changed: nn.Module, inputs: torch.Tensor, attributions: Any, kwargs: dict[str, Any]
) -> float:
    from ..captum import attribution_change

    with train_flags_kept(s.model_a), train_flags_kept(changed):
        s.model_a.eval()
        changed.eval()
        return attribution_change(s.model_a, changed, inputs, attribution=attributions, **kwargs)


def _attribution_note(changes: list[Change], attributions: Any, n: int) -> str:
    name = getattr(attributions, "__name__", type(attributions).__name__)
    shown = [f"{c.name} {c.attributions:.3f}" for c in changes if c.attributions is not None]
    return (
        f"Explanations: linear CKA of the original and the fine-tuned A's {name} attributions on {n} evaluation "
        f"inputs (1 = the same explanations up to scale and rotation): {', '.join(shown) or 'none computed'}. The "
        "subset translation and the outlier change the layer's rows, not A's weights, so they have no "
        "attributions of their own."
    )


def _reachable(changes: list[Change], claim: str) -> tuple[tuple[float, str], tuple[float, str]]:
    """The lowest and highest claim value among the original and the changes whose outputs were checked and kept
    (a change that could not be checked, e.g. no classifier to read predictions from, does not count)."""
    kept = [
        (float(value), item.name)
        for item in changes
        if (item.kind == "original" or item.kept is True) and (value := item.values.get(claim)) is not None
    ]
    return min(kept, key=lambda t: t[0]), max(kept, key=lambda t: t[0])


def _checked(
    models: tuple[nn.Module, str, nn.Module, str],
    measures: Sequence[str | Measure],
    claim_measure: str,
    *,
    steps: int | None,
    tolerance: float,
    targets: tuple[float, float],
    shift_options: dict[str, Any],
) -> dict[str, Measure]:
    """The measures to report, by alias, once every argument of :func:`audit` is checked: an unknown layer is
    named (with the modules there are) before any work."""
    model_a, layer_a, model_b, layer_b = models
    check_params(AUDIT_PARAMS, model_a=model_a, model_b=model_b, layer_a=layer_a, layer_b=layer_b)
    resolve_layers(model_a, [layer_a])
    resolve_layers(model_b, [layer_b])
    resolved = _resolve_measures(measures, claim_measure)
    check_one(AUDIT_PARAMS, "steps", steps)
    check_one(AUDIT_PARAMS, "tolerance", tolerance)
    clash = sorted(RESERVED_SHIFT_OPTIONS & set(shift_options))
    if clash:
        raise RepsimError(
            f"audit sets {', '.join(clash)} for its fine-tuning runs itself (outputs kept = top-1 agreement, or "
            "output cosine, >= 1 - tolerance); leave them out."
        )
    check_one(AUDIT_PARAMS, "targets", targets)
    return resolved


def _evaluation_split(
    chunks: list[Chunk], given: list[Chunk] | None, *, steps: int | None, holdout: float, seed: int
) -> tuple[list[Chunk], list[Chunk], str]:
    """As :func:`._data.evaluation_split` (one held-out part for the claim, every change and the fine-tuning runs),
    except that with nothing fine-tuned every sample is evaluation data."""
    if steps == 0 and given is None:
        return chunks, chunks, "data (nothing fine-tuned, so nothing held out)"
    train, evaluation, evaluated_on, _ = evaluation_split(chunks, given, holdout=holdout, seed=seed)
    return train, evaluation, evaluated_on


def _fine_tuned_rows(
    s: AuditSetting,
    runs: list[FineTuning],
    bar: Any,
    explain: torch.Tensor | None,
    attributions: Any,
    attribution_kwargs: dict[str, Any],
) -> list[Change]:
    """One row per fine-tuning run (run one after the other), with how alike the attributions stayed when asked."""
    rows = []
    for run in runs:
        bar.set_description(f"audit: fine-tuning toward {run.target:g}")
        row = run.row(s)
        if explain is not None and run.result is not None:
            row.attributions = _attribution_similarity(s, run.result.model, explain, attributions, attribution_kwargs)
        rows.append(row)
        bar.update(1)
    return rows


def audit(
    model_a: nn.Module,
    layer_a: str,
    model_b: nn.Module,
    layer_b: str,
    data: Any,
    *,
    measures: Sequence[str | Measure] = DEFAULT_MEASURES,
    tolerance: float = 0.015,
    claim_measure: str = "cka",
    targets: tuple[float, float] = (0.0, 1.0),
    steps: int | None = None,
    eval_data: Any = None,
    labels: Any = None,
    eval_labels: Any = None,
    stress_target: float = 0.2,
    seed: int = 0,
    progress: bool = True,
    tokens: str = "mean",
    spatial: str = "flatten",
    batch_size: int = 128,
    names: tuple[str, str] | None = None,
    attributions: Any = None,
    attribution_kwargs: dict[str, Any] | None = None,
    attribution_samples: int = 64,
    **shift_kwargs: Any,
) -> AuditReport:
    """Audit the claim ``claim_measure(model_a.layer_a, model_b.layer_b)`` (see the module docstring).

    Args:
        data: inputs to fine-tune on (as for :func:`shift`). When ``eval_data`` is None, ``holdout`` (a
            :func:`shift` option, default 0.2) of them is held out, drawn by ``seed``: the claim, every change
            and both fine-tuning runs are evaluated on that part, the runs fine-tune on the rest.
        measures: aliases, ids or ``Measure`` objects to report side by side (the claim measure is added if
            absent); a measure that fails on some representation is shown as n/a, with the reason in the notes.
        tolerance: outputs count as kept while top-1 agreement with the original A stays >= 1 - tolerance
            (classifiers) or the mean output cosine >= 1 - tolerance (encoders without logits).
        targets: the low and high targets of the two fine-tuning runs; ``steps=0`` skips fine-tuning, None is
            :func:`shift`'s budget from the data size (each run stops once its target is reached).
        labels / eval_labels: class labels; the subset translation moves one class (else A's predicted class).
        stress_target: the CKA the subset translation and the outlier are scaled to reach (when reachable).
        names: labels of the two models in the report.
        progress: one bar over the changes, and one bar of steps per fine-tuning run; False silences them.
        attributions: a captum attribution class (e.g. ``captum.attr.IntegratedGradients``): each fine-tuning
            run also reports how alike the original and the fine-tuned A's attributions are (linear CKA over
            ``attribution_samples`` evaluation inputs, one row per input; :func:`repsim_plugin.captum.
            attribution_change`), i.e. whether the explanations were kept, not only the outputs.
            ``attribution_kwargs`` go to ``attribute`` (e.g. ``{"n_steps": 16}``).
        shift_kwargs: passed on to :func:`shift` (``lr``, ``temperature``, ``lambda_init``, ``batch_size`` ...).
    """
    started = time.perf_counter()
    models = (model_a, layer_a, model_b, layer_b)
    resolved = _checked(
        models, measures, claim_measure, steps=steps, tolerance=tolerance, targets=targets, shift_options=shift_kwargs
    )
    fingerprints = {"a": state_dict_fingerprint(model_a), "b": state_dict_fingerprint(model_b)}
    self_audit = fingerprints["a"] == fingerprints["b"] and layer_a == layer_b

    adapter_a = for_model(model_a)
    chunks = as_chunks(data, adapter_a, labels, "data")
    given = None if eval_data is None else as_chunks(eval_data, adapter_a, eval_labels, "eval_data")
    holdout = float(shift_kwargs.pop("holdout", 0.2))
    chunks, eval_chunks, evaluated_on = _evaluation_split(chunks, given, steps=steps, holdout=holdout, seed=seed)
    held_out = eval_chunks is not chunks or steps == 0
    s = _setting(models, eval_chunks, resolved, batch_size=max(batch_size, 256), tokens=tokens, spatial=spatial)
    baseline = s.evaluate(s.H, s.HB)
    claim = baseline[claim_measure]
    if claim is None:
        reason = next(message for what, message in s.failures.items() if what.startswith(claim_measure))
        raise RepsimError(f"the claim measure {claim_measure} cannot be computed here: {reason}")
    changes = [Change("original (the claim)", "original", "A and B as given.", baseline, dict.fromkeys(resolved))]
    notes = _bias_note(s)
    if self_audit:
        notes.insert(0, SELF_AUDIT)

    options = {"batch_size": batch_size, **shift_kwargs}
    options.setdefault("preserve", s.preserve)
    runs = [
        FineTuning(
            label, target, (claim_measure, resolved[claim_measure]), chunks, reference=(model_b, layer_b),
            tolerance=tolerance, steps=steps, eval_data=eval_chunks if held_out else None, holdout=0.0, seed=seed,
            progress=progress, criterion="agreement" if s.classify else "cosine", tokens=tokens, spatial=spatial,
            **options,
        )
        for label, target in zip(("low", "high"), targets, strict=True)
        if steps != 0
    ]  # fmt: skip
    bar = _bar(progress, len(runs) + 1)
    explain = _attribution_inputs(s, attributions, attribution_samples, notes)
    changes += _fine_tuned_rows(s, runs, bar, explain, attributions, attribution_kwargs or {})
    if explain is not None and runs:
        notes.append(_attribution_note(changes, attributions, explain.shape[0]))
    bar.set_description("audit: subset translation, outlier")
    changes += _analytic_rows(s, stress_target, seed, notes)
    bar.update(1)
    bar.close()
    notes += [f"{what}: {message}" for what, message in s.failures.items()]

    (low, low_source), (high, high_source) = _reachable(changes, claim_measure)
    label_a, label_b = names if names is not None else (type(model_a).__name__, type(model_b).__name__)
    return AuditReport(
        model_a=label_a, layer_a=layer_a, model_b=label_b, layer_b=layer_b, claim_measure=claim_measure,
        claim=float(claim),
        measures=list(resolved), measure_ids={alias: m.id for alias, m in resolved.items()},
        larger_is_more_similar={alias: m.larger_is_more_similar for alias, m in resolved.items()}, changes=changes,
        tolerance=float(tolerance), n=s.H.shape[0], held_out=held_out, features=s.H.shape[1],
        evaluated_on=evaluated_on, self_audit=self_audit,
        lowest=low, highest=high, range_sources={"lowest": low_source, "highest": high_source}, notes=notes,
        seconds=time.perf_counter() - started, fingerprints=fingerprints,
        shifts={f"toward {run.target:g}": run.result for run in runs if run.result is not None},
    )  # fmt: skip
