"""Pictures of a map shift: the layer x layer map before, after and the target, side by side.

The paper (Davari et al., ICLR 2023, Section 4.3) shows a network's CKA map moved toward a chosen pattern; this draws
the same for a :class:`~repsim_plugin.adversarial.result.ShiftResult` of ``shift(..., target_map=...)``. The three
panels share one 0-1 colour scale (CKA's range, so a map of 0.85-0.95 does not look as structured as one of 0-1),
every cell carries its value, free target entries (NaN) are hatched and marked "free", and the titles say on which
samples the maps were measured and the mean map error to the target. No pyplot state is touched (Agg canvas); the
file is written atomically.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from .._utils.plotting import save_figure

__all__ = ["plot_map_shift"]


def _matrix(value: Any, name: str) -> np.ndarray:
    """A square float64 numpy matrix from a tensor / array / nested list (or a SimilarityMap's values)."""
    if not isinstance(value, (torch.Tensor, np.ndarray, list, tuple)):
        value = getattr(value, "values", value)  # a SimilarityMap
    array = value.detach().double().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, float)
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {array.shape}")
    return array


def _error(values: np.ndarray, target: np.ndarray | None) -> str:
    """Mean absolute error over the target's constrained (non-NaN) entries, as a title suffix."""
    if target is None:
        return ""
    held = ~np.isnan(target)
    return f"\nmean error to target {float(np.abs(values - target)[held].mean()):.3f}"


def _short(measure: str) -> str:
    """The measure's short name ("cka" for the registered id with its options)."""
    from ..report.cells import measure_info

    return measure_info(measure).short


def _outputs(result: Any) -> str:
    """A title line with the output checks the result carries (agreement, accuracy before -> after)."""
    parts = []
    if getattr(result, "agreement", None) is not None:
        parts.append(f"top-1 agreement {result.agreement:.3f}")
    if getattr(result, "accuracy_before", None) is not None and getattr(result, "accuracy_after", None) is not None:
        parts.append(f"accuracy {result.accuracy_before:.3f} -> {result.accuracy_after:.3f}")
    return ("\n" + ", ".join(parts)) if parts else ""


def plot_map_shift(
    result: Any,
    path: str | os.PathLike[str] | None = None,
    *,
    target: Any = None,
    before: Any = None,
    after: Any = None,
    labels: list[str] | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    dpi: int = 120,
) -> Any:
    """Draw the map before / after a map shift (and the target) side by side; save to ``path`` (PNG by default).

    ``result`` is a ShiftResult with ``map_before`` / ``map_after`` (or None when ``before`` and ``after`` are
    given, e.g. maps recomputed on test data). ``target`` defaults to ``result.target_map``; ``before`` / ``after``
    override the result's maps (same layers). Returns the matplotlib Figure.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    given = before is not None or after is not None  # maps of the caller's: the result's data do not describe them
    if before is None:
        before = getattr(result, "map_before", None)
    if after is None:
        after = getattr(result, "map_after", None)
    if target is None and result is not None:
        target = getattr(result, "target_map", None)
    if before is None or after is None:
        raise ValueError("plot_map_shift needs a map shift's result (map_before / map_after) or before= and after=")
    panels = [("before", _matrix(before, "before")), ("after", _matrix(after, "after"))]
    target_matrix = None if target is None else _matrix(target, "target")
    if target_matrix is not None:
        panels.append(("target", target_matrix))
    size = panels[0][1].shape[0]
    if any(m.shape != (size, size) for _, m in panels):
        raise ValueError(f"the maps must have one shape; got {[m.shape for _, m in panels]}")
    if labels is None:
        labels = list(getattr(result, "map_layers", None) or [str(i) for i in range(size)])
    if len(labels) != size:
        raise ValueError(f"{len(labels)} labels for a {size} x {size} map")

    where = str(getattr(result, "evaluated_on", "") or "")
    n_eval = getattr(result, "n_eval", 0)
    cell = 0.55 + 0.08 * max(len(s) for s in labels) / 6
    fig = Figure(figsize=(1.4 + len(panels) * (0.5 + cell * size), 1.6 + cell * size), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for k, (ax, (name, matrix)) in enumerate(zip(axes, panels, strict=True)):
        shown = np.ma.masked_invalid(matrix)
        image = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks(range(size), labels=labels, rotation=45 if max(map(len, labels)) > 4 else 0, fontsize=8)
        ax.set_yticks(range(size), labels=labels if k == 0 else [], fontsize=8)  # rows as in the first panel
        rgba = image.cmap(image.norm(np.nan_to_num(matrix, nan=0.5)))
        for (i, j), value in np.ndenumerate(matrix):
            if np.isnan(value):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.6", lw=0))
                ax.text(j, i, "free", ha="center", va="center", fontsize=7, color="0.3")
                continue
            luminance = 0.2126 * rgba[i, j, 0] + 0.7152 * rgba[i, j, 1] + 0.0722 * rgba[i, j, 2]
            color = "black" if luminance > 0.5 else "white"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
        head = {"before": "before (original)", "after": "after the shift", "target": "target"}[name]
        ax.set_title(head + ("" if name == "target" else _error(matrix, target_matrix)), fontsize=9)
    measure = _short(str(getattr(result, "measure", "") or "cka"))
    suptitle = title
    if suptitle is None:
        suptitle = f"{measure} map of {', '.join(labels)}"
        if given:
            suptitle += "\n(maps given by the caller)"
        else:
            if where or n_eval:
                suptitle += f"\nmeasured on {n_eval or ''} samples {where}".replace("  ", " ")
            suptitle += _outputs(result)
    fig.suptitle(suptitle, fontsize=9)
    assert image is not None  # there is always at least one panel
    bar = fig.colorbar(image, ax=list(axes), shrink=0.9)
    bar.set_label(f"{measure} (higher: more similar)", fontsize=8)
    if path is not None:
        save_figure(fig, path)
    return fig
