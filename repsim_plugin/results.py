"""``SimilarityMap``: a layer x layer similarity matrix with everything needed to reproduce and trust it.

A map carries its values (float64), the layer names of both sides, the measure's canonical id, the estimator that
produced it (``"feature_streaming"``, ``"sample_space"``, ``"minibatch"``, ``"captured"``), the token / spatial
reduction policy, the number of samples, the activations' dtype, the seed, fingerprints of the two models or
checkpoints, library versions, and optionally intervals and p-values. It saves to JSON losslessly (Python writes
every finite float64 as its shortest round-tripping decimal, and reads it back to the same bits), loads with schema
checks, converts to a pandas DataFrame, and plots as a labelled heatmap.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._map_fields import (
    as_matrix,
    confidence_level,
    interval_pair,
    json_ready,
    layer_names,
    matrix_to_json,
    probability_matrix,
)
from ._utils.checks import Bool, Constraint, Float, Int, Optional, Where, check_params
from ._utils.io import write_text
from ._utils.plotting import save_figure as save_figure  # was defined here; kept importable
from ._utils.suggest import did_you_mean
from .errors import InputShapeError, RepsimError, UnknownNameError

__all__ = ["ESTIMATORS", "SCHEMA", "SCHEMA_VERSION", "SimilarityMap", "collect_versions", "state_dict_fingerprint"]

SCHEMA = "repsim_plugin.SimilarityMap"
SCHEMA_VERSION = 1
#: Known estimator names (others are accepted, e.g. from plugins; these are the ones the package produces).
ESTIMATORS = ("feature_streaming", "sample_space", "minibatch", "captured")


class _Colormap(Constraint):
    """A registered matplotlib colormap name (an unknown one gets suggestions), or a ``Colormap`` object."""

    def describe(self) -> str:
        return "a matplotlib colormap name or Colormap"

    def accepts(self, value: Any) -> bool:
        import matplotlib
        from matplotlib.colors import Colormap

        return value in matplotlib.colormaps if isinstance(value, str) else isinstance(value, Colormap)

    def error(self, name: str, value: Any) -> RepsimError:
        import matplotlib

        if not isinstance(value, str):
            return super().error(name, value)
        return UnknownNameError(
            f"{name} must be {self.describe()}, got {value!r}.{did_you_mean(value, matplotlib.colormaps)}"
        )

    def bad_values(self) -> list[Any]:
        return ["no-such-colormap", 3]


#: The options of :meth:`SimilarityMap.plot`.
PLOT_PARAMS = {
    "annotate": Optional(Bool()),
    "cmap": _Colormap(),
    "vmin": Optional(Float()),
    "vmax": Optional(Float()),
    "title": Optional(Where(lambda v: isinstance(v, str), "a string", bad=(3,))),
    "dpi": Int(minimum=1),
}


# --- provenance helpers -----------------------------------------------------------------------------------------------


def collect_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on; transformers / timm only when already imported."""
    from . import __version__

    out = {
        "repsim_plugin": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    for name in ("transformers", "timm", "torchvision"):
        module = sys.modules.get(name)
        if module is not None and isinstance(getattr(module, "__version__", None), str):
            out[name] = module.__version__
    return out


def state_dict_fingerprint(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a model's state dict: names, dtypes, shapes and raw bytes of every tensor, in name order.

    Two models with bit-identical weights (and buffers) get the same fingerprint, whatever device they are on.
    """
    state = (
        model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module) else model_or_state_dict
    )
    if not isinstance(state, Mapping):
        raise RepsimError(f"expected a torch.nn.Module or a state dict, got {type(model_or_state_dict).__name__}.")
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            if value.is_meta:
                raise RepsimError(f"state dict entry {name!r} is on the meta device; load the weights first.")
            t = value.detach().cpu().contiguous()
            h.update(f"|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # the buffer, no bytes copy
        else:
            h.update(f"|{value!r}|".encode())
    return "sha256:" + h.hexdigest()


# --- the map --------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class SimilarityMap:
    """Layer x layer similarity values with provenance.

    ``values[i, j]`` compares ``layers_a[i]`` of model A with ``layers_b[j]`` of model B. ``reduction`` records the
    token / spatial policy (e.g. ``{"tokens": "mean", "spatial": "flatten"}``); ``fingerprints`` the models or
    checkpoints (``{"a": "sha256:...", "b": ...}``, see :func:`state_dict_fingerprint`); ``intervals`` an optional
    ``(low, high)`` pair of matrices at ``interval_level``; ``p_values`` an optional matrix. ``extra`` holds any other
    JSON metadata (``model_a`` / ``model_b`` labels are used by :meth:`plot`).
    """

    values: torch.Tensor
    layers_a: list[str]
    layers_b: list[str]
    measure: str
    estimator: str = "captured"
    reduction: dict[str, Any] = field(default_factory=dict)
    n: int = 0
    dtype: str = "float32"
    seed: int | None = None
    fingerprints: dict[str, str | None] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=collect_versions)
    intervals: tuple[torch.Tensor, torch.Tensor] | None = None
    interval_level: float | None = None
    p_values: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Benjamini-Hochberg adjusted p-values over the whole map (same shape), when p_values were computed
    q_values: torch.Tensor | None = None
    #: expected value for independent features of each cell's shape (:func:`repsim_plugin.nulls.null_baseline`)
    null_baseline: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.layers_a = layer_names(self.layers_a, "a")
        self.layers_b = layer_names(self.layers_b, "b")
        shape = (len(self.layers_a), len(self.layers_b))
        self.values = as_matrix(self.values, "values", shape)
        if not isinstance(self.measure, str) or not self.measure:
            raise RepsimError(f"measure must be a non-empty id string, got {self.measure!r}.")
        if not isinstance(self.estimator, str) or not self.estimator:
            raise RepsimError(f"estimator must be a non-empty string, got {self.estimator!r}.")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise RepsimError(f"n must be a non-negative int (the number of samples), got {self.n!r}.")
        if not isinstance(self.dtype, str):
            self.dtype = str(self.dtype).replace("torch.", "")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise RepsimError(f"seed must be an int or None, got {self.seed!r}.")
        self.reduction = json_ready(dict(self.reduction), "reduction")
        self.fingerprints = json_ready(dict(self.fingerprints), "fingerprints")
        self.versions = json_ready(dict(self.versions), "versions")
        self.extra = json_ready(dict(self.extra), "extra")
        if self.intervals is not None:
            self.intervals = interval_pair(self.intervals, shape)
        if self.interval_level is not None:
            self.interval_level = confidence_level(self.interval_level)
        if self.p_values is not None:
            self.p_values = probability_matrix(self.p_values, "p_values", shape)
        if self.q_values is not None:
            self.q_values = probability_matrix(self.q_values, "q_values", shape)
        if self.null_baseline is not None:
            self.null_baseline = as_matrix(self.null_baseline, "null_baseline", shape)

    # --- access ---
    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.layers_a), len(self.layers_b))

    def _index(self, name: Any, names: list[str], side: str) -> int:
        if isinstance(name, int) and not isinstance(name, bool):
            if not -len(names) <= name < len(names):
                raise IndexError(f"layer index {name} out of range for {len(names)} layers_{side}.")
            return name % len(names)
        if name in names:
            return names.index(name)
        hint = did_you_mean(name, names, n=3)
        raise UnknownNameError(f"no layer {name!r} in layers_{side}" + (f".{hint}" if hint else f" ({names})."))

    def __getitem__(self, key: tuple[str | int, str | int]) -> float:
        """``m["layer1", "layer3"]``: the value of one pair, by names (or integer positions)."""
        if not isinstance(key, tuple) or len(key) != 2:
            raise RepsimError('index a SimilarityMap with a pair of layer names: m["layer_a", "layer_b"].')
        i = self._index(key[0], self.layers_a, "a")
        j = self._index(key[1], self.layers_b, "b")
        return float(self.values[i, j])

    def diagonal(self) -> torch.Tensor:
        """Values of the pairs (i, i); the map must be square (e.g. one model against a copy or checkpoint)."""
        if self.shape[0] != self.shape[1]:
            raise InputShapeError(f"diagonal() needs a square map, this one is {self.shape[0]} x {self.shape[1]}.")
        return torch.diagonal(self.values).clone()

    def argmax_per_row(self) -> dict[str, str]:
        """For each layer of A, the layer of B with the largest value (for similarities: the best match)."""
        best = torch.argmax(self.values, dim=1).tolist()
        return {a: self.layers_b[j] for a, j in zip(self.layers_a, best, strict=True)}

    def best_match_per_row(self) -> dict[str, str]:
        """For each layer of A, its best match in B: the largest value for similarities, the smallest for
        distances (the direction the measure declares; an unregistered measure counts as a similarity)."""
        from .measures import make

        try:
            larger = bool(make(self.measure).larger_is_more_similar)
        except ValueError:
            larger = True
        best = (torch.argmax if larger else torch.argmin)(self.values, dim=1).tolist()
        return {a: self.layers_b[j] for a, j in zip(self.layers_a, best, strict=True)}

    # --- serialization ---
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (matrices as nested lists of floats); :meth:`from_dict` inverts it exactly."""
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "measure": self.measure,
            "estimator": self.estimator,
            "layers_a": list(self.layers_a),
            "layers_b": list(self.layers_b),
            "values": matrix_to_json(self.values),
            "reduction": dict(self.reduction),
            "n": self.n,
            "dtype": self.dtype,
            "seed": self.seed,
            "fingerprints": dict(self.fingerprints),
            "versions": dict(self.versions),
            "intervals": None
            if self.intervals is None
            else {"low": matrix_to_json(self.intervals[0]), "high": matrix_to_json(self.intervals[1])},
            "interval_level": self.interval_level,
            "p_values": None if self.p_values is None else matrix_to_json(self.p_values),
            "q_values": None if self.q_values is None else matrix_to_json(self.q_values),
            "extra": dict(self.extra),
            "null_baseline": None if self.null_baseline is None else matrix_to_json(self.null_baseline),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimilarityMap:
        """Rebuild a map from :meth:`to_dict` output, checking the schema and version."""
        if not isinstance(data, Mapping):
            raise RepsimError(f"expected a dict written by SimilarityMap.to_dict(), got {type(data).__name__}.")
        if data.get("schema") != SCHEMA:
            raise RepsimError(
                f"not a SimilarityMap document (schema={data.get('schema')!r}, expected {SCHEMA!r}); was it written "
                "by SimilarityMap.save()?"
            )
        version = data.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RepsimError(f"invalid schema_version {version!r}.")
        if version > SCHEMA_VERSION:
            raise RepsimError(
                f"this map was written with schema version {version}, newer than this repsim_plugin understands "
                f"({SCHEMA_VERSION}); upgrade repsim_plugin to read it."
            )
        missing = [k for k in ("measure", "layers_a", "layers_b", "values") if k not in data]
        if missing:
            raise RepsimError(f"the SimilarityMap document lacks the required field(s) {missing}.")
        intervals = data.get("intervals")
        if intervals is not None:
            if not isinstance(intervals, Mapping) or set(intervals) != {"low", "high"}:
                raise RepsimError('\'intervals\' must be null or {"low": matrix, "high": matrix}.')
            intervals = (intervals["low"], intervals["high"])
        return cls(
            values=data["values"],
            layers_a=data["layers_a"],
            layers_b=data["layers_b"],
            measure=data["measure"],
            estimator=data.get("estimator", "captured"),
            reduction=data.get("reduction") or {},
            n=data.get("n", 0),
            dtype=data.get("dtype", "float32"),
            seed=data.get("seed"),
            fingerprints=data.get("fingerprints") or {},
            versions=data.get("versions") or {},
            intervals=intervals,
            interval_level=data.get("interval_level"),
            p_values=data.get("p_values"),
            q_values=data.get("q_values"),
            extra=data.get("extra") or {},
            null_baseline=data.get("null_baseline"),
        )

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the map as JSON (atomically: temporary file + ``os.replace``); returns the path."""
        return write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SimilarityMap:
        """Read a map written by :meth:`save`."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise RepsimError(f"{path} is not valid JSON ({err}); was it written by SimilarityMap.save()?") from None
        try:
            return cls.from_dict(data)
        except RepsimError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError, RuntimeError) as err:
            raise RepsimError(
                f"{path} is not a valid map file ({type(err).__name__}: {err}); it was edited or not written by "
                "SimilarityMap.save(). Write it again with result.save(path)."
            ) from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SimilarityMap):
            return NotImplemented
        return self.to_dict() == other.to_dict() and bool(
            torch.equal(torch.signbit(self.values), torch.signbit(other.values))
        )

    __hash__ = None  # type: ignore[assignment]  # mutable and compared by value: not hashable

    def __repr__(self) -> str:
        return (
            f"SimilarityMap({self.measure!r}, {self.shape[0]}x{self.shape[1]} layers, estimator={self.estimator!r}, "
            f"n={self.n})"
        )

    # --- views ---
    def to_dataframe(self, long: bool = False) -> Any:
        """A pandas DataFrame (needs pandas): wide by default, one row per cell with ``long=True``.

        Wide: index = layers_a, columns = layers_b, the values. Long: columns ``layer_a``, ``layer_b``, ``value``,
        ``p_value``, ``q_value``, ``low``, ``high``, ``null`` (NaN where the map has no such statistic),
        ``measure`` and ``estimator``, rows in map order (row-major).
        """
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover - pandas is a dev dependency
            raise ModuleNotFoundError("to_dataframe needs pandas: pip install pandas.") from err
        if not isinstance(long, bool):
            raise RepsimError(f"long must be True or False, got {long!r}.")
        if long:
            frame = pd.DataFrame(self.cells())
        else:
            frame = pd.DataFrame(
                self.values.numpy().copy(),
                index=pd.Index(self.layers_a, name="layer_a"),
                columns=pd.Index(self.layers_b, name="layer_b"),
            )
        frame.attrs.update({"measure": self.measure, "estimator": self.estimator, "n": self.n})
        return frame

    def statistics(self) -> dict[str, torch.Tensor | None]:
        """The per-cell matrices besides the values: ``p_value``, ``q_value``, ``low``, ``high``, ``null``."""
        q_values = getattr(self, "q_values", None)  # filled by compare(..., permutations=N)
        return {
            "p_value": self.p_values,
            "q_value": q_values if isinstance(q_values, torch.Tensor) else None,
            "low": None if self.intervals is None else self.intervals[0],
            "high": None if self.intervals is None else self.intervals[1],
            "null": self.null_baseline,
        }

    def cells(self) -> list[dict[str, Any]]:
        """One dict per cell, row-major: layer names, value, every statistic (NaN when absent), measure, estimator."""
        stats = self.statistics()
        rows = []
        for i, a in enumerate(self.layers_a):
            for j, b in enumerate(self.layers_b):
                row: dict[str, Any] = {"layer_a": a, "layer_b": b, "value": float(self.values[i, j])}
                for name, matrix in stats.items():
                    row[name] = float("nan") if matrix is None else float(matrix[i, j])
                row.update(measure=self.measure, estimator=self.estimator)
                rows.append(row)
        return rows

    def to_html(self, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
        """One self-contained page (no network): heatmap, values and statistics as a table, provenance."""
        from .report.pages import map_page

        return map_page(self, path, title=title)

    def plot(
        self,
        path_or_ax: str | os.PathLike[str] | Any | None = None,
        *,
        annotate: bool | None = None,
        cmap: str = "viridis",
        vmin: float | None = None,
        vmax: float | None = None,
        title: str | None = None,
        dpi: int = 120,
    ) -> Any:
        """Labelled heatmap (rows = layers of A, columns = layers of B); see :func:`repsim_plugin.report.heatmap`.

        The colour scale is fixed to the measure's declared range when it is bounded (``vmin`` / ``vmax``
        override it); the title names the measure's short name, n and the estimator; the colour bar says which
        way is more similar; cells that do not beat the null baseline (or are not significant) are hatched.
        ``path_or_ax``: a file path (the format from its suffix, written atomically; returns the Figure), a
        matplotlib Axes to draw into (returns it), or None (returns a new Figure; no pyplot state is touched).
        ``annotate``: write the values in the cells; by default only for maps of at most 256 cells.
        """
        check_params(PLOT_PARAMS, annotate=annotate, cmap=cmap, vmin=vmin, vmax=vmax, title=title, dpi=dpi)
        from .report.heatmap import plot_map

        return plot_map(self, path_or_ax, annotate=annotate, cmap=cmap, vmin=vmin, vmax=vmax, title=title, dpi=dpi)
