"""``Trajectory``: each layer's similarity to a reference checkpoint across a training run's series of checkpoints.

Built from the maps :func:`~repsim_plugin.compare_checkpoints` returns with ``reference=`` (or directly with
:func:`~repsim_plugin.checkpoint_trajectory`): for every checkpoint of the series, layer k of the reference against
layer k of that checkpoint (the diagonal of its map). A table (:meth:`Trajectory.to_dataframe`), one plot with one
line per layer (:meth:`Trajectory.plot`), and a page (:meth:`Trajectory.to_html`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._utils.io import write_text
from ._utils.plotting import axes_for, finish_plot
from .errors import RepsimError
from .results import SimilarityMap

__all__ = ["Trajectory"]


@dataclass(eq=False)
class Trajectory:
    """``values[t, k]``: layer ``layers[k]`` of ``reference`` against the same layer of ``checkpoints[t]``.

    ``null_baseline`` (same shape, or None) is what independent features of each layer's shape read as; ``maps``
    keeps the full map of every checkpoint against the reference, keyed by the checkpoint's name.
    """

    reference: str
    checkpoints: list[str]
    layers: list[str]
    values: torch.Tensor
    measure: str
    estimator: str
    n: int
    null_baseline: torch.Tensor | None = None
    maps: dict[str, SimilarityMap] = field(default_factory=dict, repr=False)

    @classmethod
    def from_maps(cls, maps: Mapping[tuple[str, str], SimilarityMap]) -> Trajectory:
        """The trajectory of ``compare_checkpoints(..., reference=...)``'s maps (in the series' order)."""
        if not maps:
            raise RepsimError("a trajectory needs at least one map of a checkpoint against the reference.")
        references = {a for a, _ in maps}
        if len(references) != 1:
            raise RepsimError(
                f"the maps compare against several checkpoints {sorted(references)}; a trajectory needs one reference: "
                "call compare_checkpoints(..., reference=...)."
            )
        reference = references.pop()
        first = next(iter(maps.values()))
        layers = [name for name in first.layers_a if name in first.layers_b]
        if not layers:
            raise RepsimError("the maps share no layer names between the reference and the checkpoints.")
        rows, nulls = [], []
        for m in maps.values():
            if m.measure != first.measure:
                raise RepsimError(f"the maps use different measures ({first.measure}, {m.measure}).")
            rows.append([m[layer, layer] for layer in layers])
            if m.null_baseline is not None:
                idx = [(m.layers_a.index(layer), m.layers_b.index(layer)) for layer in layers]
                nulls.append([float(m.null_baseline[i, j]) for i, j in idx])
        return cls(
            reference=reference,
            checkpoints=[name for _, name in maps],
            layers=layers,
            values=torch.tensor(rows, dtype=torch.float64),
            measure=first.measure,
            estimator=first.estimator,
            n=first.n,
            null_baseline=torch.tensor(nulls, dtype=torch.float64) if len(nulls) == len(rows) else None,
            maps={name: m for (_, name), m in maps.items()},
        )

    def to_dataframe(self, long: bool = False) -> Any:
        """Wide: index = checkpoints, columns = layers. Long: checkpoint, step, layer, value, null, measure."""
        import pandas as pd

        if not long:
            return pd.DataFrame(
                self.values.numpy().copy(),
                index=pd.Index(self.checkpoints, name="checkpoint"),
                columns=pd.Index(self.layers, name="layer"),
            )
        records = [
            {
                "checkpoint": ckpt,
                "step": t,
                "layer": layer,
                "value": float(self.values[t, k]),
                "null": float("nan") if self.null_baseline is None else float(self.null_baseline[t, k]),
                "measure": self.measure,
                "reference": self.reference,
            }
            for t, ckpt in enumerate(self.checkpoints)
            for k, layer in enumerate(self.layers)
        ]
        return pd.DataFrame(records)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the series, the values, the null baseline, and every map's own dict."""
        return {
            "reference": self.reference,
            "checkpoints": list(self.checkpoints),
            "layers": list(self.layers),
            "values": self.values.tolist(),
            "measure": self.measure,
            "estimator": self.estimator,
            "n": self.n,
            "null_baseline": None if self.null_baseline is None else self.null_baseline.tolist(),
            "maps": {name: m.to_dict() for name, m in self.maps.items()},
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON (atomically)."""
        return write_text(path, json.dumps(self.to_dict(), indent=1, allow_nan=False))

    def plot(self, path_or_ax: Any = None, *, dpi: int = 120) -> Any:
        """One line per layer across the series; dotted lines of the same colour: the null baseline."""
        from .report.cells import measure_info, short_label

        info = measure_info(self.measure)
        fig, ax = axes_for(path_or_ax, (max(6.0, 2.5 + 0.5 * len(self.checkpoints)), 4.2), dpi)
        steps = range(len(self.checkpoints))
        colors = [f"C{k % 10}" for k in range(len(self.layers))]
        for k, layer in enumerate(self.layers):
            ax.plot(steps, self.values[:, k].numpy(), marker="o", color=colors[k], label=short_label(layer, 24))
            if self.null_baseline is not None:
                ax.plot(steps, self.null_baseline[:, k].numpy(), linestyle=":", color=colors[k], linewidth=1)
        ax.set_xticks(
            list(steps), labels=[short_label(c, 22) for c in self.checkpoints], rotation=30, ha="right", fontsize=8
        )
        if info.low is not None and info.high is not None:
            shown = [float(self.values.min())] + (
                [] if self.null_baseline is None else [float(self.null_baseline.min())]
            )
            low = max(info.low, min(0.0, *shown))  # a measure bounded below -1 rarely goes there: start at 0
            ax.set_ylim(low, info.high + 0.02 * (info.high - low))
        ax.set_ylabel(f"{info.short} ({info.direction})", fontsize=8)
        extra = "\ndotted: unrelated features of each layer's shape" if self.null_baseline is not None else ""
        ax.set_title(f"each layer against {short_label(self.reference, 32)}, n={self.n}{extra}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        return finish_plot(fig, ax, path_or_ax)

    def to_html(self, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
        """One self-contained page: the plot, the table, and each checkpoint's full map."""
        from .report.pages import trajectory_page

        return trajectory_page(self, path, title=title)
