"""The report pages: a similarity map, a checkpoint trajectory, an audit, and an index linking them.

Each ``*_section`` returns an HTML fragment (used inside other pages); each ``*_page`` writes one self-contained
file atomically. The numbers on a page are the object's own (no rounding beyond 4 decimals), so a parser can check
them against the map.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cells import ALPHA, flag_counts, measure_info, not_significant, short_model, weak_cells
from .html import Cell, esc, figure_png, img, provenance, table, write_page

__all__ = [
    "IndexEntry",
    "audit_page",
    "audit_section",
    "index_page",
    "map_page",
    "map_section",
    "trajectory_page",
    "trajectory_section",
]


def _num(value: float, digits: int = 4) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _p(value: float) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.2g}" if value < 0.01 else f"{value:.3f}"


def map_summary(result: Any) -> str:
    """One paragraph: what is compared, with what, on how many samples, and what the null and the marks say."""
    info = measure_info(result.measure)
    model_a = short_model(str(result.extra.get("model_a", "model A")))
    model_b = short_model(str(result.extra.get("model_b", "model B")))
    parts = [
        f"<b>{esc(info.short)}</b> (<code>{esc(result.measure)}</code>; {esc(info.direction)}) between "
        f"<b>{esc(model_a)}</b> ({len(result.layers_a)} layers) and <b>{esc(model_b)}</b> "
        f"({len(result.layers_b)} layers) on n = {result.n} samples, estimator <code>{esc(result.estimator)}</code>."
    ]
    counts = flag_counts(result)
    total = result.shape[0] * result.shape[1]
    if result.null_baseline is not None:
        lo, hi = float(result.null_baseline.min()), float(result.null_baseline.max())
        parts.append(
            f"Independent random features of these shapes would read {lo:.3f}"
            + (f" to {hi:.3f}" if hi - lo > 5e-4 else "")
            + f" (the null baseline); {counts.get('below_null', 0)} of {total} cells do not beat it."
        )
    else:
        parts.append("No null baseline was recorded for this map.")
    weak_sig, stat = not_significant(result)
    if weak_sig is not None:
        parts.append(f"{counts['not_significant']} of {total} cells have {stat} &ge; {ALPHA:g} (permutation test).")
    weak = weak_cells(result)
    if weak is not None and bool(weak.any()):
        parts.append("Marked cells (hatched in the heatmap, greyed in the table) are not evidence of similarity.")
    return " ".join(parts)


def _bias_note(result: Any) -> str:
    null = result.null_baseline
    if null is None or "hsic=gretton" not in result.measure or float(null.max()) < 0.1:
        return ""
    return (
        f'<p class="note">Biased CKA is inflated at n = {result.n}: unrelated features already score up to '
        f"{float(null.max()):.2f}. Debiased CKA (<code>--measure debiased_cka</code>, "
        '<code>measure="debiased_cka"</code>) reads about 0 for them.</p>'
    )


def _cells_table(result: Any) -> str:
    stats = result.statistics()
    present = [k for k, v in stats.items() if v is not None]
    header = ["layer A", "layer B", "value", *present]
    weak = weak_cells(result)
    rows, classes = [], []
    for i, a in enumerate(result.layers_a):
        for j, b in enumerate(result.layers_b):
            row: list[Any] = [a, Cell(esc(b), "l"), _num(float(result.values[i, j]))]
            for k in present:
                value = float(stats[k][i, j])
                row.append(_p(value) if k in ("p_value", "q_value") else _num(value))
            rows.append(row)
            classes.append("weak" if weak is not None and bool(weak[i, j]) else "")
    return f'<div class="scroll">{table(header, rows, row_classes=classes)}</div>'


def _map_provenance(result: Any) -> dict[str, Any]:
    extra = dict(result.extra)
    return {
        "measure id": result.measure,
        "estimator": result.estimator,
        "why this estimator": extra.pop("estimator_reason", None),
        "token / spatial policy": result.reduction,
        "n samples": result.n,
        "activations dtype": result.dtype,
        "seed": result.seed,
        "model A": extra.pop("model_a", None),
        "model B": extra.pop("model_b", None),
        "fingerprints": result.fingerprints,
        "data fingerprint": extra.pop("data_fingerprint", None),
        "null baseline": extra.pop("null_baseline_note", None),
        "interval level": result.interval_level,
        "versions": result.versions,
        **{k: v for k, v in extra.items() if not isinstance(v, (dict, list))},
    }


def map_section(result: Any, *, heading: str | None = None, level: int = 2) -> str:
    """The map as a fragment: summary, bias note, heatmap, cell table, provenance."""
    fig = result.plot()
    h = f"h{level}"
    sub = f"h{min(level + 1, 6)}"
    parts = [f"<{h}>{esc(heading)}</{h}>" if heading else ""]
    parts += [
        f'<p class="lead">{map_summary(result)}</p>',
        _bias_note(result),
        '<div class="card">'
        + img(figure_png(fig), f"heatmap of {result.measure}", "Rows: layers of A; columns: layers of B.")
        + "</div>",
        f"<{sub}>Values and statistics</{sub}>",
        _cells_table(result),
        f"<{sub}>Provenance</{sub}>",
        provenance(_map_provenance(result)),
    ]
    return "".join(parts)


def map_page(result: Any, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Write the page of one map (see :func:`map_section`)."""
    info = measure_info(result.measure)
    name = title or f"{info.short} map: {short_model(str(result.extra.get('model_a', 'A')))} vs " + short_model(
        str(result.extra.get("model_b", "B"))
    )
    return write_page(path, name, map_section(result))


# --- trajectory ---------------------------------------------------------------------------------------------------


def trajectory_section(traj: Any, *, heading: str | None = None, level: int = 2, maps: bool = True) -> str:
    """Plot, table (one row per checkpoint, one column per layer), and optionally each checkpoint's map."""
    h, sub = f"h{level}", f"h{min(level + 1, 6)}"
    info = measure_info(traj.measure)
    parts = [f"<{h}>{esc(heading)}</{h}>" if heading else ""]
    parts.append(
        f'<p class="lead">Each layer of <b>{esc(traj.reference)}</b> against the same layer of every other checkpoint '
        f"of the series, by <b>{esc(info.short)}</b> ({esc(info.direction)}), n = {traj.n}, estimator "
        f"<code>{esc(traj.estimator)}</code>.</p>"
    )
    parts.append('<div class="card">' + img(figure_png(traj.plot()), "trajectory plot") + "</div>")
    header = ["checkpoint", *traj.layers]
    rows = [[ckpt, *(_num(float(v)) for v in traj.values[t].tolist())] for t, ckpt in enumerate(traj.checkpoints)]
    if traj.null_baseline is not None:
        rows.append(["null baseline (unrelated features)", *(_num(float(v)) for v in traj.null_baseline[0].tolist())])
    parts += [f"<{sub}>Values</{sub}>", table(header, rows)]
    if maps:
        for name, m in traj.maps.items():
            parts.append(map_section(m, heading=f"{traj.reference} vs {name}", level=min(level + 1, 6)))
    return "".join(parts)


def trajectory_page(traj: Any, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Write the page of a checkpoint trajectory."""
    return write_page(path, title or f"checkpoints against {traj.reference}", trajectory_section(traj))


# --- audit --------------------------------------------------------------------------------------------------------


def _audit_table(report: Any, attribute: str, skip_original: bool) -> str:
    header = [
        "change",
        "outputs kept",
        *(m if report.larger_is_more_similar[m] else f"{m} (distance)" for m in report.measures),
    ]
    rows = []
    for item in report.changes:
        if skip_original and item.kind == "original":
            continue
        values = getattr(item, attribute)
        kept = "—" if item.kept is None else ("yes" if item.kept else "no")
        kept_cell = Cell(
            esc(f"{kept}: {item.kept_by}" if item.kept_by else kept), "l " + ("bad" if item.kept is False else "")
        )
        rows.append(
            [
                item.name,
                kept_cell,
                *(_num(values.get(m), 3) if values.get(m) is not None else "n/a" for m in report.measures),
            ]
        )
    return table(header, rows)


def audit_section(report: Any, *, heading: str | None = None, level: int = 2) -> str:
    """The audit as a fragment: the claim and its reachable range, the plot, the tables, the notes."""
    h, sub = f"h{level}", f"h{min(level + 1, 6)}"
    where = f"{report.n} held-out samples" if report.held_out else f"{report.n} samples"
    lead = (
        f"<b>Claim</b>: {esc(report.claim_measure)} between {esc(short_model(report.model_a))} "
        f"<code>{esc(report.layer_a)}</code> and {esc(short_model(report.model_b))} <code>{esc(report.layer_b)}</code> "
        f"= <b>{report.claim:.3f}</b> on {where} ({report.features} features)."
    )
    if report.lowest is not None and report.highest is not None:
        lead += (
            f" <b>With A's outputs kept</b> it ranges from <b>{report.lowest:.3f}</b> "
            f"({esc(report.range_sources.get('lowest', ''))}) to <b>{report.highest:.3f}</b> "
            f"({esc(report.range_sources.get('highest', ''))})."
        )
    parts = [f"<{h}>{esc(heading)}</{h}>" if heading else "", f'<p class="lead">{lead}</p>']
    parts.append(
        '<div class="card">'
        + img(figure_png(report.plot()), "audit plot", "One column per measure; one marker per change (A' vs B).")
        + "</div>"
    )
    parts += [
        f"<{sub}>Every measure, A' (changed) vs B</{sub}>",
        _audit_table(report, "values", skip_original=False),
        f"<{sub}>How each measure sees the change itself (A vs A')</{sub}>",
        _audit_table(report, "self_values", skip_original=True),
        f"<{sub}>The changes</{sub}>",
        "<ul>"
        + "".join(
            f"<li><b>{esc(c.name)}</b>: {esc(c.description)}</li>" for c in report.changes if c.kind != "original"
        )
        + "</ul>",
    ]
    if report.notes:
        parts.append(f"<{sub}>Notes</{sub}>")
        parts += [f'<p class="note">{esc(note)}</p>' for note in report.notes]
    parts += [
        f"<{sub}>Provenance</{sub}>",
        provenance(
            {
                "measures": {m: report.measure_ids[m] for m in report.measures},
                "outputs kept within tolerance": report.tolerance,
                "fingerprints": report.fingerprints,
                "seconds": f"{report.seconds:.1f}",
            }
        ),
    ]
    return "".join(parts)


def audit_page(report: Any, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Write the page of an :class:`~repsim_plugin.adversarial.AuditReport`."""
    name = title or f"similarity audit: {report.layer_a} vs {report.layer_b}"
    return write_page(path, name, audit_section(report))


# --- index --------------------------------------------------------------------------------------------------------


@dataclass
class IndexEntry:
    """One section of an index page: a heading, the page it links to, a summary (HTML) and a thumbnail PNG."""

    heading: str
    href: str
    summary: str = ""
    thumbnail: bytes | None = None


def index_page(path: str | os.PathLike[str], title: str, entries: Sequence[IndexEntry], *, intro: str = "") -> Path:
    """Write an index linking every section's page (relative links), each with its summary and thumbnail."""
    toc = "<ol>" + "".join(f'<li><a href="#s{k}">{esc(e.heading)}</a></li>' for k, e in enumerate(entries)) + "</ol>"
    cards = []
    for k, e in enumerate(entries):
        thumb = img(e.thumbnail, e.heading) if e.thumbnail else ""
        cards.append(
            f'<div class="card" id="s{k}"><h2>{esc(e.heading)}</h2><p>{e.summary}</p>{thumb}'
            f'<p><a href="{esc(e.href)}">open the full page: {esc(e.href)}</a></p></div>'
        )
    body = (f'<p class="lead">{intro}</p>' if intro else "") + toc + "".join(cards)
    return write_page(path, title, body)
