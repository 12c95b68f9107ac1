"""The audit's report: the claim, the reachable range with outputs kept, every measure before and after each change.

:class:`Change` is one row (a prediction-preserving change of A's representation and what every measure says
about it); :class:`AuditReport` holds the rows and renders them as markdown, JSON and a dot plot.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._utils.io import write_text
from .._utils.plotting import axes_for, finish_plot
from .result import ShiftResult

__all__ = ["AuditReport", "Change", "plain"]

SELF_AUDIT_HEADLINE = (
    "model B has the same weights as model A at the same layer: A is audited against itself, and the claim is "
    "A's similarity with itself."
)


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
    #: similarity of the original and the changed A's input attributions (``audit(..., attributions=...)``)
    attributions: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "values": dict(self.values),
            "self_values": dict(self.self_values),
            "kept": self.kept,
            "kept_by": self.kept_by,
            "details": plain(self.details),
            "attributions": self.attributions,
        }


def plain(value: Any) -> Any:
    """JSON-ready data: tensors as lists, non-finite floats as None, keys as strings."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
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
    #: Where the numbers come from: "eval_data", "held out from data (...)", or the training data.
    evaluated_on: str = ""
    #: Model B is model A (same weights) at the same layer: the claim compares A with itself.
    self_audit: bool = False
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
            "evaluated_on": self.evaluated_on,
            "self_audit": self.self_audit,
            "features": self.features,
            "changes": [c.to_dict() for c in self.changes],
            "shifts": {name: result.to_dict() for name, result in self.shifts.items()},
            "notes": list(self.notes),
            "seconds": self.seconds,
            "fingerprints": dict(self.fingerprints),
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON (atomically)."""
        target = Path(path)
        write_text(target, json.dumps(plain(self.to_dict()), indent=1))
        return target

    # --- markdown ---------------------------------------------------------------------------------------------

    def to_markdown(self) -> str:
        """The report as GitHub markdown: the claim, the reachable range, the side-by-side tables, the notes."""
        lines = [*self._claim_lines(), *self._measure_tables(), *self._change_list(), *self._shift_table()]
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

    def _claim_lines(self) -> list[str]:
        where = f"{self.n} held-out samples" if self.held_out else f"{self.n} training samples (not held out)"
        if self.evaluated_on.startswith("data (nothing"):
            where = f"{self.n} samples"
        lines = [f"# Similarity audit: {self.model_a} `{self.layer_a}` vs {self.model_b} `{self.layer_b}`", ""]
        if self.self_audit:
            lines += [f"**Warning**: {SELF_AUDIT_HEADLINE}", ""]
        lines += [
            f"**Claim**: {self.claim_measure} = **{self.claim:.3f}** on {where} ({self.features} features; "
            f"evaluated on {self.evaluated_on or where}).",
            "",
        ]
        checked = [c for c in self.changes if c.kind != "original" and c.kept is True]
        unchecked = [c.name for c in self.changes if c.kind != "original" and c.kept is None]
        lost = [c.name for c in self.changes if c.kind != "original" and c.kept is False]
        if self.lowest is not None and self.highest is not None:
            lines.append(
                f"**With A's outputs kept** (checked on the same {self.n} samples; {len(checked)} of "
                f"{len(self.changes) - 1} changes), {self.claim_measure} ranges from **{self.lowest:.3f}** "
                f"({self.range_sources.get('lowest', '')}) to **{self.highest:.3f}** "
                f"({self.range_sources.get('highest', '')})."
            )
            if unchecked:
                lines.append(f"Not counted, outputs not checked: {', '.join(unchecked)}.")
            if lost:
                lines.append(f"Not counted, outputs not kept: {', '.join(lost)}.")
            lines.append("")
        return lines

    def _table(self, attribute: str, skip_original: bool) -> list[str]:
        """One row per change: its name, whether it kept the outputs, every measure (``values`` / ``self_values``)."""
        header = [
            "change",
            "outputs kept",
            *(m if self.larger_is_more_similar[m] else f"{m} (distance: lower = similar)" for m in self.measures),
        ]
        rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for item in self.changes:
            if skip_original and item.kind == "original":
                continue
            values = getattr(item, attribute)
            cells = [item.name, _kept_cell(item), *(_num(values.get(m)) for m in self.measures)]
            rows.append("| " + " | ".join(cells) + " |")
        return rows

    def _measure_tables(self) -> list[str]:
        return [
            f"## Every measure, A' (changed) vs B `{self.layer_b}`",
            "",
            "How the claim reads after each change of A that keeps its outputs.",
            "",
            *self._table("values", skip_original=False),
            "",
            "## How each measure sees the change itself (A vs A')",
            "",
            "The same changes, compared with A's original representation: a measure that stays near its maximum "
            "is invariant to the change.",
            "",
            *self._table("self_values", skip_original=True),
            "",
        ]

    def _change_list(self) -> list[str]:
        lines = ["## The changes", ""]
        lines += [f"- **{item.name}**: {item.description}" for item in self.changes if item.kind != "original"]
        return lines

    def _shift_table(self) -> list[str]:
        if not self.shifts:
            return []
        lines = ["", "## Fine-tuning runs", ""]
        lines.append(
            "| run | target | before | after (held-out n) | reached | optimiser's estimate | agreement | KL | "
            "output cosine | accuracy before -> after | best step / run / budget | lambda start -> end | seconds |"
        )
        lines.append("|" + "---|" * 13)
        lines += [_shift_row(name, result) for name, result in self.shifts.items()]
        return lines

    def to_html(self, path: str | Path, *, title: str | None = None) -> Path:
        """One self-contained page (no network): claim, reachable range, plot, tables, notes, provenance."""
        from ..report.pages import audit_page

        return audit_page(self, path, title=title)

    # --- plot -------------------------------------------------------------------------------------------------

    def plot(self, path_or_ax: Any = None, *, dpi: int = 120) -> Any:
        """Dot plot: one column per measure, one marker per change (A' vs B); the claim is the first marker.

        ``path_or_ax``: a file path (written atomically; returns the Figure), a matplotlib Axes, or None (a new
        Figure; no pyplot state is touched).
        """
        fig, ax = axes_for(path_or_ax, (max(6.0, 1.6 * len(self.measures) + 4.0), 4.0), dpi)
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
        return finish_plot(fig, ax, path_or_ax)


# --- helpers ------------------------------------------------------------------------------------------------------


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _kept_cell(item: Change) -> str:
    explained = "" if item.attributions is None else f"; attributions kept {item.attributions:.3f} (CKA)"
    if item.kept is None:
        return (item.kept_by or "—") + explained
    return ("yes: " if item.kept else "**no**: ") + item.kept_by + explained


def _shift_row(name: str, result: ShiftResult) -> str:
    start = result.history[0]["lambda"] if result.history else float("nan")
    accuracy = (
        f"{result.accuracy_before:.3f} -> {result.accuracy_after:.3f}"
        if result.accuracy_before is not None and result.accuracy_after is not None
        else "n/a"
    )
    cells = [
        name,
        _num(result.target),
        _num(result.measure_before),
        f"{_num(result.measure_after)} ({result.n_eval})",
        "yes" if result.reached else "**no**",
        _num(result.minibatch_estimate),
        _num(result.agreement),
        _num(result.kl),
        _num(result.cosine),
        accuracy,
        f"{result.best_step} / {result.steps_run} / {result.steps}",
        f"{start:.3g} -> {result.lambda_final:.3g}",
        f"{result.seconds:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"
