"""The heatmap of a :class:`~repsim_plugin.results.SimilarityMap`, drawn so that its numbers read right.

- the colour scale is fixed to the measure's declared range when it is bounded (a map spanning 0.11-0.22 must not
  look strongly structured); unbounded measures use the data's range;
- the title names the measure by its short name, the models, n and the estimator; the colour bar says which way is
  more similar (distances: lower);
- the null baseline (what independent features of each cell's shape read as) is given in the title, and cells that
  do not beat it, or are not significant when the map has p / q-values, are hatched;
- long layer names keep their tail, model labels lose their absolute paths.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._utils.plotting import axes_for, finish_plot
from .cells import ALPHA, beats_null, measure_info, not_significant, short_label, short_model, weak_cells

__all__ = ["ANNOTATE_MAX_CELLS", "map_title", "plot_map"]

#: Maps larger than this many cells are not annotated by default.
ANNOTATE_MAX_CELLS = 256


def _range_text(matrix: Any) -> str:
    lo, hi = float(matrix.min()), float(matrix.max())
    return f"{lo:.2f}" if abs(hi - lo) < 0.005 else f"{lo:.2f}-{hi:.2f}"


def map_title(result: Any) -> str:
    """Title lines: measure and models; n and estimator; the null baseline and what the hatching means."""
    info = measure_info(result.measure)
    model_a = short_model(str(result.extra.get("model_a", "model A")))
    model_b = short_model(str(result.extra.get("model_b", "model B")))
    lines = [f"{info.short}: {model_a} vs {model_b}", f"n={result.n}, estimator {result.estimator}"]
    marks = []
    if result.null_baseline is not None:
        lines[-1] += f"; unrelated features read {_range_text(result.null_baseline)}"
        beats = beats_null(result)
        if beats is not None and not bool(beats.all()):
            marks.append("not beating that")
    weak_sig, stat = not_significant(result)
    if weak_sig is not None and bool(weak_sig.any()):
        marks.append(f"{stat} >= {ALPHA:g}")
    if marks:
        lines.append("hatched: " + " or ".join(marks))
    elif result.null_baseline is not None or weak_sig is not None:
        lines.append("every cell beats the null" + (f" and has {stat} < {ALPHA:g}" if weak_sig is not None else ""))
    return "\n".join(lines)


def plot_map(
    result: Any,
    path_or_ax: Any = None,
    *,
    annotate: bool | None = None,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    title: str | None = None,
    dpi: int = 120,
) -> Any:
    """Draw ``result`` (see the module docstring); returns the Figure, or the caller's Axes."""
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    La, Lb = result.shape
    labels_a = [short_label(n) for n in result.layers_a]
    labels_b = [short_label(n) for n in result.layers_b]
    char_a = max(len(s) for s in labels_a)
    char_b = max(len(s) for s in labels_b)
    width = max(4.5, 1.6 + 0.06 * char_a + 0.45 * Lb + 1.2)
    height = max(3.8, 1.4 + 0.05 * char_b + 0.4 * La + 0.6)
    fig, ax = axes_for(path_or_ax, (width, height), dpi)
    info = measure_info(result.measure)
    data = result.values.numpy()
    if vmin is None and vmax is None and info.low is not None and info.high is not None:
        vmin, vmax = info.low, info.high
    colormap = colormaps[cmap] if isinstance(cmap, str) else cmap
    image = ax.imshow(data, cmap=colormap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xticks(
        range(Lb), labels=labels_b, rotation=60 if char_b > 3 else 0, ha="right" if char_b > 3 else "center", fontsize=8
    )
    ax.set_yticks(range(La), labels=labels_a, fontsize=8)
    ax.set_xlabel(short_model(str(result.extra.get("model_b", "model B"))) + " layers", fontsize=9)
    ax.set_ylabel(short_model(str(result.extra.get("model_a", "model A"))) + " layers", fontsize=9)
    ax.set_title(title if title is not None else map_title(result), fontsize=9)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(f"{info.short} ({info.direction})", fontsize=8)
    weak = weak_cells(result)
    if weak is not None:
        for i, j in weak.nonzero().tolist():
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.85", linewidth=0))
    if annotate is None:
        annotate = La * Lb <= ANNOTATE_MAX_CELLS
    if annotate:
        _annotate(ax, data, image)
    return finish_plot(fig, ax, path_or_ax)


def _annotate(ax: Any, data: np.ndarray, image: Any) -> None:
    """Each cell's value, dark on bright colours and light on dark ones (by the colour's luminance)."""
    rgba = image.cmap(image.norm(data))
    luminance = 0.2126 * rgba[..., 0] + 0.7152 * rgba[..., 1] + 0.0722 * rgba[..., 2]
    size = 7 if data.size <= 64 else 6
    for (i, j), value in np.ndenumerate(data):
        color = "black" if luminance[i, j] > 0.5 else "white"
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=size, color=color)
