"""What a reader needs to know about each cell of a map: the measure's short name and direction, whether the cell
beats the null baseline, whether it is significant, and labels short enough to fit on an axis.

Shared by the heatmap, the HTML pages and the command line, so that all three mark the same cells.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ALPHA",
    "MeasureInfo",
    "beats_null",
    "flag_counts",
    "measure_info",
    "not_significant",
    "short_label",
    "short_model",
    "weak_cells",
]

#: Significance level for marking cells (on q-values when the map has them, else on p-values).
ALPHA = 0.05


@dataclass(frozen=True)
class MeasureInfo:
    """How to show a measure: its short name, which way is more similar, its declared range."""

    id: str
    short: str
    larger_is_more_similar: bool
    low: float | None
    high: float | None

    @property
    def direction(self) -> str:
        """``"higher = more similar"`` or ``"distance: lower = more similar"``."""
        return "higher = more similar" if self.larger_is_more_similar else "distance: lower = more similar"


def measure_info(measure_id: str) -> MeasureInfo:
    """The registered measure's first alias, direction and range; the id itself when it is not registered."""
    from ..measures import make

    try:
        m = make(measure_id)
    except (ValueError, TypeError):  # a map written by a plugin that is not installed here
        return MeasureInfo(measure_id, measure_id, True, None, None)
    aliases = list(m.aliases)
    preferred = [a for a in aliases if a in measure_id.replace("-", "_")] or aliases
    short = min(preferred, key=len) if preferred else m.id
    low, high = m.value_range
    return MeasureInfo(m.id, short, m.larger_is_more_similar, low, high)


def beats_null(result: Any) -> torch.Tensor | None:
    """Boolean matrix: the cell is more similar than independent features of its shape (None without a baseline)."""
    null = getattr(result, "null_baseline", None)
    if null is None:
        return None
    info = measure_info(result.measure)
    return result.values > null if info.larger_is_more_similar else result.values < null


def not_significant(result: Any, alpha: float = ALPHA) -> tuple[torch.Tensor | None, str]:
    """Boolean matrix of cells with q (else p) >= alpha, and which statistic it was read from."""
    q_values = getattr(result, "q_values", None)
    if isinstance(q_values, torch.Tensor):
        return q_values >= alpha, "q"
    if result.p_values is not None:
        return result.p_values >= alpha, "p"
    return None, ""


def weak_cells(result: Any) -> torch.Tensor | None:
    """Cells to mark: not beating the null baseline, or not significant (None when the map has neither)."""
    beats = beats_null(result)
    weak_sig, _ = not_significant(result)
    marks = [m for m in (None if beats is None else ~beats, weak_sig) if m is not None]
    if not marks:
        return None
    out = marks[0].clone()
    for m in marks[1:]:
        out |= m
    return out


def flag_counts(result: Any) -> dict[str, int]:
    """How many cells fail to beat the null baseline and how many are not significant (absent keys: not known)."""
    out: dict[str, int] = {}
    beats = beats_null(result)
    if beats is not None:
        out["below_null"] = int((~beats).sum())
    weak_sig, _ = not_significant(result)
    if weak_sig is not None:
        out["not_significant"] = int(weak_sig.sum())
    return out


def short_label(name: str, width: int = 28) -> str:
    """A layer name that fits on an axis: long names keep their tail (``…encoder.layer.5.output``)."""
    return name if len(name) <= width else "…" + name[-(width - 1) :]


_PATH = re.compile(r"(?:[\\/][^\\/\s,@]+)+[\\/]([^\\/\s,@]+)")


def short_model(label: str, width: int = 48) -> str:
    """A model label without absolute paths (``hf:/a/b/minilm`` -> ``hf:…/minilm``), at most ``width`` long."""
    text = _PATH.sub(lambda m: "…/" + m.group(1), label)
    return text if len(text) <= width else text[: width - 1] + "…"
