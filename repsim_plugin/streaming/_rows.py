"""What the map accumulators receive and return: layer layouts, checks of ``{layer: rows}`` dicts, the CKA table.

An update holds, per side, a dict of (b, d) activations of the same b samples. Checks here turn a bad dict into
a clear error before any statistic changes; the layout of the first update (layer names and feature dims, in
order) fixes what later updates must hold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._utils.inputs import as_tensor, check_matrix
from ..errors import DegenerateInputError, InputShapeError, NonFiniteInputError
from ..measures.kernels import check_finite_hsic, hsic_unbiased_table, warn_small_sample_bias

F64 = torch.float64

Acts = Mapping[str, Any]
#: names a layer in messages, e.g. ``acts_a['encoder.layer.3']``
Label = Callable[[str], str]
#: the rows of one side of an update with the label that names its layers
Group = tuple[Label, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class _Layout:
    """Ordered layer names and feature dimensions of one side; the layers' features are concatenated."""

    names: tuple[str, ...]
    dims: tuple[int, ...]

    @classmethod
    def of(cls, acts: Mapping[str, torch.Tensor]) -> _Layout:
        """The layout of one side's rows (their order and feature counts)."""
        return cls(tuple(acts), tuple(int(t.shape[1]) for t in acts.values()))

    @classmethod
    def from_json(cls, value: Sequence[Any]) -> _Layout:
        return cls(tuple(value[0]), tuple(int(x) for x in value[1]))

    @property
    def total(self) -> int:
        return sum(self.dims)

    @property
    def n_layers(self) -> int:
        return len(self.names)

    @property
    def offsets(self) -> list[int]:
        out, acc = [], 0
        for d in self.dims:
            out.append(acc)
            acc += d
        return out

    def blocks(self) -> list[slice]:
        return [slice(o, o + d) for o, d in zip(self.offsets, self.dims, strict=True)]

    def as_json(self) -> list[list[Any]]:
        return [list(self.names), list(self.dims)]


def held_bytes(*kept: Mapping[str, Sequence[torch.Tensor]] | None) -> int:
    """Bytes of the row batches an accumulator holds (checked against the memory budget as they grow)."""
    return sum(
        t.numel() * t.element_size() for rows in kept if rows is not None for batches in rows.values() for t in batches
    )


def label_a(name: str) -> str:
    return f"acts_a[{name!r}]"


def label_b(name: str) -> str:
    return f"acts_b[{name!r}]"


def label_x(name: str) -> str:
    return "X"


def label_y(name: str) -> str:
    return "Y"


def check_acts(acts: Any, arg: str) -> None:
    """``acts`` must be a non-empty dict with str keys."""
    if not isinstance(acts, Mapping) or not acts:
        raise InputShapeError(
            f"{arg} must be a non-empty dict {{layer name: (batch, features) tensor}}, got {type(acts).__name__}"
            + (" (empty)" if isinstance(acts, Mapping) else "")
            + "."
        )
    for key in acts:
        if not isinstance(key, str):
            raise InputShapeError(f"{arg} has a key {key!r} of type {type(key).__name__}; layer names must be str.")


def validate_rows(acts: Acts, label: Label, *, finite: bool = True) -> dict[str, torch.Tensor]:
    """``check_matrix`` every layer; ``finite=False`` defers the O(n d) NaN / Inf scan to :func:`check_finite`."""
    if finite:
        return {name: check_matrix(value, label(name)) for name, value in acts.items()}
    out = {}
    for name, value in acts.items():
        t = as_tensor(value, label(name))
        check_matrix(t[:0] if t.ndim == 2 else t, label(name))  # dtype, shape, feature count; no element scan
        out[name] = t
    return out


def extremes(Xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Column minima and maxima (2, D) of each batch, in float64 (exact); NaN and Inf propagate into them."""
    return [torch.stack([X.amin(0), X.amax(0)]).to(F64) for X in Xs]


def check_finite(found: list[torch.Tensor], groups: Sequence[Group]) -> None:
    """NaN / Inf anywhere in a batch shows in its column extremes: one O(D) test, one device sync per update.

    Only when it fails is each layer scanned by ``check_matrix``, for its detailed message.
    """
    if bool(torch.isfinite(torch.cat([e.reshape(-1) for e in found])).all()):
        return
    for label, acts in groups:
        for name, t in acts.items():
            check_matrix(t, label(name))
    raise NonFiniteInputError("the batch contains NaN or Inf values.")  # pragma: no cover - check_matrix raised


def check_same_rows(groups: Sequence[Group]) -> int:
    """The one row count of every layer of an update (they must hold the same samples)."""
    rows = {label(name): int(t.shape[0]) for label, acts in groups for name, t in acts.items()}
    counts = set(rows.values())
    if len(counts) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in rows.items())
        raise InputShapeError(
            f"the inputs of one update must hold the same samples, but their row counts differ ({listing}). "
            "Capture every layer from the same batch; reduce tokens / spatial positions the same way on both sides "
            "(tokens='as_samples' multiplies rows per input)."
        )
    return counts.pop()


def order_like(acts: dict[str, torch.Tensor], layout: _Layout, arg: str) -> list[torch.Tensor]:
    """The tensors in the layout's order; layer set and feature dimensions must match the first update."""
    if set(acts) != set(layout.names):
        missing = [k for k in layout.names if k not in acts]
        extra = [k for k in acts if k not in layout.names]
        raise InputShapeError(
            f"{arg} must hold the same layers in every update: missing {missing}, unexpected {extra} "
            f"(layers of the first update: {list(layout.names)}). Call reset() to start a new stream."
        )
    out = []
    for name, d in zip(layout.names, layout.dims, strict=True):
        t = acts[name]
        if t.shape[1] != d:
            raise InputShapeError(
                f"{arg}[{name!r}] has {t.shape[1]} features but had {d} in earlier updates; the feature dimension "
                "of a layer cannot change within a stream. Use the same reduction for every batch, or reset()."
            )
        out.append(t)
    return out


def concat(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Concatenate along features on ``device``, in the layers' common floating dtype (a copy or an upcast: exact).

    No float64 copy of the whole batch: the moments upcast a chunk of rows at a time (``_Moments._add_rows_``),
    so a stream's transient memory stays a few MiB whatever its batch size.
    """
    parts = [t.detach().to(device=device) for t in tensors]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


Rows = dict[str, list[torch.Tensor]]


def keep_rows(
    store: Rows | None, tensors: list[torch.Tensor], layout: _Layout, *, copy: bool, device: torch.device | None
) -> Rows:
    """``store`` with one more batch per layer: detached, cloned unless ``copy=False``, moved to ``device``."""
    out: Rows = {name: [] for name in layout.names} if store is None else store
    for name, t in zip(layout.names, tensors, strict=True):
        kept = t.detach() if device is None else t.detach().to(device, copy=copy)
        out[name].append(kept.clone() if copy and device is None else kept)
    return out


def check_kept_shapes(acc: Any) -> None:
    """A loaded state of kept rows: per side the layout's layers, each (n, d) with the layout's d and the same n."""
    if acc._layout is None:
        if acc._rows_a is not None or acc._rows_b is not None or acc.n:
            raise ValueError("rows or a count without a layout")
        return
    la, lb = acc._layout
    for lay, store, key in ((la, acc._rows_a, "rows_a"), (lb, acc._rows_b, "rows_b")):
        if lay is None:
            if store is not None:
                raise ValueError(f"{key!r} given for a map of one model with itself")
            continue
        if store is None or list(store) != list(lay.names):
            raise ValueError(f"{key!r} must hold the layers {list(lay.names)}")
        for (name, batches), d in zip(store.items(), lay.dims, strict=True):
            t = torch.cat(batches)
            if t.dim() != 2 or tuple(t.shape) != (acc.n, d):
                raise ValueError(f"{key!r}[{name!r}] must have shape {(acc.n, d)}, got {tuple(t.shape)}")


def stacked(store: Rows) -> dict[str, torch.Tensor]:
    """Each layer's kept batches as one (n, d) tensor."""
    return {k: torch.cat(v) for k, v in store.items()}


# --- results ---------------------------------------------------------------------------------------------------------


def warn_bias(n: int, la: _Layout, lb: _Layout) -> None:
    """The small-sample warning of biased linear CKA for the widest layers of a map (the largest null value)."""
    warn_small_sample_bias(n, max(la.dims), max(lb.dims), "Use debiased=True or more samples.")


def ratio_table(
    xy: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor, names: Sequence[tuple[Sequence[str], Label]]
) -> torch.Tensor:
    """CKA map ``xy / sqrt(xx yy^T)`` from HSIC tables; a non-positive self-HSIC is an error naming its layer.

    The square roots are taken apart (``xx yy`` overflows long before either does); a non-finite HSIC is an
    overflow error.
    """
    check_finite_hsic((xy, xx, yy))
    for values, (layer_names, label) in zip((xx, yy), names, strict=True):
        for name, value in zip(layer_names, values, strict=True):
            if not bool(value > 0):
                raise DegenerateInputError(
                    f"HSIC of {label(name)} with itself is {float(value):.3g}, not positive, so CKA is undefined: "
                    "use more samples (the unbiased estimator can be <= 0 at small n), or check that the layer "
                    "varies across inputs."
                )
    return xy / torch.outer(torch.sqrt(xx), torch.sqrt(yy))


def self_hsic(K: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC(K_l, K_l) of each stacked Gram (L, m, m) -> (L,), one layer at a time."""
    return torch.stack([hsic_unbiased_table(K[i : i + 1], K[i : i + 1], symmetric=True)[0, 0] for i in range(len(K))])
