"""Figure scaffolding shared by every plot: draw into the caller's Axes or a new Figure, save atomically.

No pyplot state is touched, so plotting works in scripts, notebooks and servers alike (matplotlib's Agg canvas).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .io import atomic_write


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write a matplotlib figure atomically, in the format its suffix names (PNG when there is none)."""
    target = Path(path)
    fmt = target.suffix.lstrip(".").lower() or "png"
    return atomic_write(target, lambda handle: fig.savefig(handle, format=fmt), mode="wb")


def axes_for(path_or_ax: Any, figsize: tuple[float, float], dpi: int) -> tuple[Any, Any]:
    """The (figure, axes) to draw into: the caller's Axes, or a new Figure (no pyplot state touched)."""
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(path_or_ax, Axes):
        return path_or_ax.figure, path_or_ax
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def finish_plot(fig: Any, ax: Any, path_or_ax: Any) -> Any:
    """Return the caller's Axes as is; otherwise lay the figure out, save it when a path was given, return it."""
    from matplotlib.axes import Axes

    if isinstance(path_or_ax, Axes):
        return ax
    fig.tight_layout()
    if path_or_ax is not None:
        save_figure(fig, path_or_ax)
    return fig
