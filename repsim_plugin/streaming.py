"""Streaming accumulators for CKA: exact linear CKA from float64 statistics, sample-space and minibatch CKA.

Every accumulator has the same life cycle: ``update`` with batches of rows, ``merge`` accumulators that saw other
rows, ``all_reduce`` across ``torch.distributed`` ranks, ``compute``, ``reset``, ``state_dict`` /
``load_state_dict``. Inputs are validated like the one-shot measures (any float dtype, torch or numpy) and upcast
to float64 *before* any sum; autograd is not tracked (statistics are detached).

**Exact linear CKA** (:class:`LinearCKA`, :class:`LinearCKAMap`). The state is a set of float64 moments of the rows
around a stored center ``c`` (kept equal to the running mean): ``n``, the first moments ``F = sum(x - c)``, the
comoments ``C = sum (x - c)(y - c)^T`` (per layer ``X^T X``, per pair ``X_a^T X_b``) and, for the debiased form,
``Q = sum ||x~||^2 ||y~||^2`` and the third-order vectors ``U = sum ||x~||^2 y~``, ``V = sum ||y~||^2 x~``.
Moving the center by ``delta`` is an exact polynomial identity (see :meth:`_Moments.recenter_`), so a batch is
added Chan / Welford style: move the state to the new running mean, add the batch's moments around that mean.
Nothing is ever formed as ``X^T X - n mu mu^T`` around zero, so a large common offset (post-ReLU activations,
``X + 1e4`` stored in float32) costs no accuracy, and the result is independent of batch size and order.

**Distributed** (:meth:`LinearCKAMap.all_reduce`): centered moments cannot be summed across ranks, raw sums around
a *common* shift can. The shift is agreed by one all-reduce of ``n`` and ``n * mean`` (the approximate global
mean); each rank moves its state to that shift (exact algebra) and every statistic tensor is then summed with
exactly one ``all_reduce``. The first moments ``F`` travel too, so the rounding of the shift is corrected exactly
when the result is computed. A third tiny all-reduce before these checks that all ranks hold the same layers and
feature dimensions, so a mismatch raises on every rank instead of hanging.

``all_reduce()`` reduces *in place* and marks the accumulator as reduced: further ``update`` / ``merge`` /
``all_reduce`` raise (they would count other ranks twice) until ``reset()``. ``compute(sync="auto")`` (the
default) reduces a *copy* when ``torch.distributed`` is initialized with more than one rank and the state is not
reduced yet, and leaves the local state untouched, so ``compute`` can be called mid-stream and never reduces
twice. ``sync=False`` computes from the local shard only; ``sync=True`` insists on reducing.

**Sample space** (:class:`SampleSpaceCKAMap`): exact CKA cannot stream in sample space (a Gram needs all rows), so
this keeps every layer's rows, O(n d) memory, and forms the (n, n) Grams at the end: the choice when n is small
and d huge. **Minibatch CKA** (:class:`MinibatchCKA`, :class:`MinibatchCKAMap`; Nguyen, Raghu & Kornblith 2021)
sums unbiased HSICs of each batch and normalizes at the end; it is its own estimator, not full-data CKA.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._utils.inputs import as_tensor, check_matrix
from .errors import (
    DegenerateInputError,
    InputShapeError,
    NonFiniteInputError,
    RepsimError,
    SmallSampleBiasWarning,
    TooFewSamplesError,
)
from .measures.kernels import KERNEL_PARAMS, KERNELS, NULL_BIAS_WARNING, cka_from_hsic, expected_null_cka, hsic_unbiased
from .measures.kernels import resolve_kernel as _kernel_from_params

__all__ = [
    "LinearCKA",
    "LinearCKAMap",
    "MinibatchCKA",
    "MinibatchCKAMap",
    "SampleSpaceCKAMap",
    "TorchmetricsLinearCKA",  # noqa: F822  (created lazily by __getattr__)
]

STATE_VERSION = 1
_F64 = torch.float64

Acts = Mapping[str, Any]


# --- layout and small helpers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Ordered layer names and feature dimensions of one side; the layers' features are concatenated."""

    names: tuple[str, ...]
    dims: tuple[int, ...]

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


def _segsum(v: torch.Tensor, layout: _Layout, dim: int) -> torch.Tensor:
    """Sum ``v`` over each layer's block of positions along ``dim`` (one entry per layer)."""
    if layout.n_layers == 1:
        return v.sum(dim, keepdim=True) if v.ndim > 1 else v.sum().reshape(1)
    parts = [v.narrow(dim, o, d).sum(dim) for o, d in zip(layout.offsets, layout.dims, strict=True)]
    return torch.stack(parts, dim=dim if v.ndim > 1 else 0)


def _expand(w: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """Repeat each layer's entry of ``w`` (last dim) over that layer's features."""
    reps = torch.tensor(layout.dims, device=w.device)
    return torch.repeat_interleave(w, reps, dim=-1, output_size=layout.total)


def _dist() -> Any:
    return torch.distributed


def _dist_active(group: Any = None) -> bool:
    d = _dist()
    return bool(d.is_available() and d.is_initialized() and d.get_world_size(group) > 1)


def _require_dist(what: str) -> Any:
    d = _dist()
    if not (d.is_available() and d.is_initialized()):
        raise RepsimError(
            f"{what} needs an initialized torch.distributed process group; call "
            "torch.distributed.init_process_group(...) first (torchrun does it for you), or use compute(sync=False) "
            "for the local statistics."
        )
    return d


def _comm_device(group: Any, state_device: torch.device | None) -> torch.device:
    if state_device is not None:
        return state_device
    if _dist().get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_layout_agreement(fingerprint: str | None, group: Any, device: torch.device, what: str) -> None:
    """One tiny all-reduce: every rank learns whether all ranks hold data and agree on the layout."""
    d = _dist()
    h = 0 if fingerprint is None else int.from_bytes(hashlib.sha256(fingerprint.encode()).digest()[:7], "big")
    t = torch.tensor([h, -h, int(fingerprint is None)], dtype=torch.int64, device=device)
    d.all_reduce(t, op=d.ReduceOp.MAX, group=group)
    if int(t[2]) > 0:
        raise RepsimError(
            f"{what}.all_reduce: at least one rank has not received any batch, so its layers and feature "
            "dimensions are unknown. Give every rank at least one batch (e.g. DistributedSampler with "
            "drop_last=False), or merge the shards some other way."
        )
    if int(t[0]) != -int(t[1]):
        raise RepsimError(
            f"{what}.all_reduce: the ranks disagree on the layers, feature dimensions or estimator settings. "
            "Every rank must capture the same layers with the same reductions and the same accumulator options."
        )


def _check_sync(sync: Any) -> None:
    if not (sync is True or sync is False or (isinstance(sync, str) and sync == "auto")):
        raise RepsimError(f"sync must be 'auto', True or False, got {sync!r}.")


def _check_debiased(debiased: Any) -> bool:
    if not isinstance(debiased, bool):
        raise RepsimError(f"debiased must be True or False, got {debiased!r}.")
    return debiased


def _check_acts(acts: Any, arg: str) -> None:
    if not isinstance(acts, Mapping) or not acts:
        raise InputShapeError(
            f"{arg} must be a non-empty dict {{layer name: (batch, features) tensor}}, got {type(acts).__name__}"
            + (" (empty)" if isinstance(acts, Mapping) else "")
            + "."
        )
    for key in acts:
        if not isinstance(key, str):
            raise InputShapeError(f"{arg} has a key {key!r} of type {type(key).__name__}; layer names must be str.")


def _validate_rows(acts: Acts, label: Callable[[str], str], *, finite: bool = True) -> dict[str, torch.Tensor]:
    """``check_matrix`` every layer; ``finite=False`` defers the O(n d) NaN / Inf scan to :func:`_check_finite`."""
    if finite:
        return {name: check_matrix(value, label(name)) for name, value in acts.items()}
    out = {}
    for name, value in acts.items():
        t = as_tensor(value, label(name))
        check_matrix(t[:0] if t.ndim == 2 else t, label(name))  # dtype, shape, feature count; no element scan
        out[name] = t
    return out


def _extremes(Xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Column minima and maxima (2, D) of each float64 batch; NaN and Inf propagate into them."""
    return [torch.stack([X.amin(0), X.amax(0)]) for X in Xs]


def _check_finite(
    extremes: list[torch.Tensor], groups: Sequence[tuple[Callable[[str], str], dict[str, torch.Tensor]]]
) -> None:
    """NaN / Inf anywhere in a batch shows in its column extremes: one O(D) test, one device sync per update.

    Only when it fails is each layer scanned by ``check_matrix``, for its detailed message.
    """
    if bool(torch.isfinite(torch.cat([e.reshape(-1) for e in extremes])).all()):
        return
    for label, acts in groups:
        for name, t in acts.items():
            check_matrix(t, label(name))
    raise NonFiniteInputError("the batch contains NaN or Inf values.")  # pragma: no cover - check_matrix raised


def _check_same_rows(groups: Sequence[tuple[Callable[[str], str], dict[str, torch.Tensor]]]) -> int:
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


def _order_like(acts: dict[str, torch.Tensor], layout: _Layout, arg: str) -> list[torch.Tensor]:
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


def _concat(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Concatenate along features, upcast to float64 on ``device`` before any arithmetic."""
    parts = [t.detach().to(device=device, dtype=_F64) for t in tensors]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _warn_bias(n: int, la: _Layout, lb: _Layout) -> None:
    null = max(expected_null_cka(n, p, q) for p in la.dims for q in lb.dims)
    if null > NULL_BIAS_WARNING:
        warnings.warn(
            f"biased linear CKA with n={n} samples and up to {max(la.dims)} / {max(lb.dims)} features is inflated: "
            f"independent random features of this shape already score about {null:.2f}. Use debiased=True or "
            "more samples.",
            SmallSampleBiasWarning,
            stacklevel=_caller_level(),
        )


def _caller_level() -> int:
    """``stacklevel`` that points a warning at the first frame outside this module (the user's call)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    return level


# --- the moment state -----------------------------------------------------------------------------------------------


class _Moments:
    """Float64 moments of one side (``b is None``: one model on both sides) or two sides of layers.

    Keys (``x~ = x - center``; blocks follow the layout): ``a.center``, ``a.first`` = sum x~, ``a.min`` /
    ``a.max`` per feature (exact zero-variance check), ``a.grams`` (flat per-layer x~^T x~; two sides only),
    ``cross`` = sum x~_A^T x~_B (same side: the full Gram of the concatenated layers). Debiased adds, with
    ``r_l = ||x~_l||^2`` per layer and row: ``cross.quart`` [a, b] = sum r_a r_b, ``cross.u`` [a, :] = sum r_a x~_B,
    ``cross.v`` [:, b] = sum r_b x~_A (two sides; on one side it is ``cross.u^T``), and per layer (two sides)
    ``a.quart`` = sum r_a^2, ``a.third`` (block a) = sum r_a x~_a.
    """

    def __init__(self, a: _Layout, b: _Layout | None, debiased: bool, device: torch.device) -> None:
        self.a, self.b, self.debiased = a, b, debiased
        self.n = 0
        self.t: dict[str, torch.Tensor] = {
            key: torch.full(shape, fill, dtype=_F64, device=device) for key, shape, fill, _ in self.spec(a, b, debiased)
        }

    # layout ---------------------------------------------------------------------------------------------------------
    @staticmethod
    def spec(a: _Layout, b: _Layout | None, debiased: bool) -> list[tuple[str, tuple[int, ...], float, str]]:
        """(key, shape, initial value, reduction) of every state tensor."""
        same = b is None
        out: list[tuple[str, tuple[int, ...], float, str]] = []
        sides = [("a", a)] if same else [("a", a), ("b", b)]
        for key, lay in sides:
            out += [
                (f"{key}.center", (lay.total,), 0.0, "center"),
                (f"{key}.first", (lay.total,), 0.0, "sum"),
                (f"{key}.min", (lay.total,), math.inf, "min"),
                (f"{key}.max", (lay.total,), -math.inf, "max"),
            ]
            if not same:
                out.append((f"{key}.grams", (sum(d * d for d in lay.dims),), 0.0, "sum"))
                if debiased:
                    out += [(f"{key}.quart", (lay.n_layers,), 0.0, "sum"), (f"{key}.third", (lay.total,), 0.0, "sum")]
        bb = a if same else b
        out.append(("cross", (a.total, bb.total), 0.0, "sum"))
        if debiased:
            out += [
                ("cross.quart", (a.n_layers, bb.n_layers), 0.0, "sum"),
                ("cross.u", (a.n_layers, bb.total), 0.0, "sum"),
            ]
            if not same:
                out.append(("cross.v", (a.total, bb.n_layers), 0.0, "sum"))
        return out

    @property
    def same(self) -> bool:
        return self.b is None

    @property
    def device(self) -> torch.device:
        return self.t["cross"].device

    def fingerprint(self) -> str:
        return json.dumps(
            {
                "v": STATE_VERSION,
                "a": self.a.as_json(),
                "b": None if self.b is None else self.b.as_json(),
                "debiased": self.debiased,
            }
        )

    def grams(self, side: str) -> list[torch.Tensor]:
        lay = self.a if side == "a" else self.b
        flat, out, off = self.t[f"{side}.grams"], [], 0
        for d in lay.dims:
            out.append(flat[off : off + d * d].view(d, d))
            off += d * d
        return out

    def traces(self, side: str) -> torch.Tensor:
        """Per-layer trace of the comoment (sum of squared deviations from the center)."""
        if self.same:
            return _segsum(torch.diagonal(self.t["cross"]), self.a, 0)
        return torch.stack([g.diagonal().sum() for g in self.grams(side)])

    def mean(self, side: str) -> torch.Tensor:
        return self.t[f"{side}.center"] + self.t[f"{side}.first"] / self.n

    def clone(self, device: torch.device | None = None) -> _Moments:
        out = _Moments.__new__(_Moments)
        out.a, out.b, out.debiased, out.n = self.a, self.b, self.debiased, self.n
        out.t = {k: v.to(device=device, copy=True) for k, v in self.t.items()}
        return out

    # the exact change of center ------------------------------------------------------------------------------------
    def recenter_(self, delta_a: torch.Tensor, delta_b: torch.Tensor | None = None) -> None:
        """Move the center by ``delta`` (new center = center + delta), updating every moment exactly.

        With ``x^ = x~ - d``, ``r^ = r - 2 x~.d + |d|^2`` and sums over the rows (F = sum x~, s = sum r):
          C'  = C - F d_y^T - d_x F_y^T + n d_x d_y^T
          U'  = U - s_x d_y - 2 C^T d_x + 2 (F_x.d_x) d_y + |d_x|^2 F_y - n |d_x|^2 d_y        (U = sum r_x y~)
          Q'  = Q - 2 d_y.U - 2 d_x.V + 4 d_x^T C d_y + |d_y|^2 s_x + |d_x|^2 s_y
                  - 2 |d_y|^2 (F_x.d_x) - 2 |d_x|^2 (F_y.d_y) + n |d_x|^2 |d_y|^2             (Q = sum r_x r_y)
        applied per layer pair (x, y) and, with y = x, per layer. All right-hand sides use the old values.
        """
        n = float(self.n)
        A = self.a
        same = self.same
        B = A if same else self.b
        kb = "a" if same else "b"
        da = delta_a
        db = da if same else delta_b
        Fa, Fb = self.t["a.first"], self.t[f"{kb}.first"]
        C = self.t["cross"]
        sA = self.traces("a")
        sB = sA if same else self.traces("b")
        alA, alB = _segsum(da * da, A, 0), _segsum(db * db, B, 0)
        fdA, fdB = _segsum(Fa * da, A, 0), _segsum(Fb * db, B, 0)
        if self.debiased:
            PA = torch.stack([da[blk] @ C[blk, :] for blk in A.blocks()])  # (LA, DB): d_a^T C_ab
            U, Q = self.t["cross.u"], self.t["cross.quart"]
            V = U.T if same else self.t["cross.v"]
            dCd = _segsum(PA * db, B, 1)
            W1 = _segsum(U * db, B, 1)  # d_b . U_ab
            W2 = _segsum(V * da[:, None], A, 0)  # d_a . V_ab
            Q += (
                -2.0 * W1
                - 2.0 * W2
                + 4.0 * dCd
                + torch.outer(sA, alB)
                + torch.outer(alA, sB)
                - 2.0 * torch.outer(fdA, alB)
                - 2.0 * torch.outer(alA, fdB)
                + n * torch.outer(alA, alB)
            )
            if not same:
                PB = torch.stack([C[:, blk] @ db[blk] for blk in B.blocks()], dim=1)  # (DA, LB): C_ab d_b
                V += (
                    -torch.outer(da, sB)
                    - 2.0 * PB
                    + 2.0 * torch.outer(da, fdB)
                    + torch.outer(Fa, alB)
                    - n * torch.outer(da, alB)
                )
            U += (
                -torch.outer(sA, db)
                - 2.0 * PA
                + 2.0 * torch.outer(fdA, db)
                + torch.outer(alA, Fb)
                - n * torch.outer(alA, db)
            )
            if not same:
                for key, lay, d, F, s, al, fd in (("a", A, da, Fa, sA, alA, fdA), ("b", B, db, Fb, sB, alB, fdB)):
                    Gd = torch.cat([g @ d[blk] for g, blk in zip(self.grams(key), lay.blocks(), strict=True)])
                    third, quart = self.t[f"{key}.third"], self.t[f"{key}.quart"]
                    quart += (
                        -4.0 * _segsum(d * third, lay, 0)
                        + 4.0 * _segsum(d * Gd, lay, 0)
                        + 2.0 * al * s
                        - 4.0 * al * fd
                        + n * al * al
                    )
                    third += (
                        -_expand(s, lay) * d - 2.0 * Gd + 2.0 * _expand(fd, lay) * d + _expand(al, lay) * (F - n * d)
                    )
        # C - F_x d_y^T - d_x F_y^T + n d_x d_y^T as one rank-2 update: [d_x, -F_x] [n d_y - F_y, d_y]^T
        C.addmm_(torch.stack([da, -Fa], 1), torch.stack([n * db - Fb, db]))
        if not same:
            for key, lay, d, F in (("a", A, da, Fa), ("b", B, db, Fb)):
                for g, blk in zip(self.grams(key), lay.blocks(), strict=True):
                    g.addmm_(torch.stack([d[blk], -F[blk]], 1), torch.stack([n * d[blk] - F[blk], d[blk]]))
        Fa.sub_(da, alpha=n)
        self.t["a.center"].add_(da)
        if not same:
            Fb.sub_(db, alpha=n)
            self.t["b.center"].add_(db)

    def _move_to(self, new_a: torch.Tensor, new_b: torch.Tensor | None) -> None:
        self.recenter_(new_a - self.t["a.center"], None if self.same else new_b - self.t["b.center"])

    def finalize_(self) -> None:
        """Move the center to the exact mean (F = 0 up to rounding); the statistics are then centered moments."""
        if self.n:
            self.recenter_(self.t["a.first"] / self.n, None if self.same else self.t["b.first"] / self.n)

    # adding data ----------------------------------------------------------------------------------------------------
    def _add_rows_(self, XA: torch.Tensor, XB: torch.Tensor | None, extremes: list[torch.Tensor]) -> None:
        """Add rows' moments around the current center (rows already float64 on the state's device)."""
        A = self.a
        XhA = XA - self.t["a.center"]
        XhB = XhA if self.same else XB - self.t["b.center"]
        pairs = [("a", XhA, A)] if self.same else [("a", XhA, A), ("b", XhB, self.b)]
        for (key, Xh, lay), ext in zip(pairs, extremes, strict=True):
            self.t[f"{key}.first"] += Xh.sum(0)
            torch.minimum(self.t[f"{key}.min"], ext[0], out=self.t[f"{key}.min"])
            torch.maximum(self.t[f"{key}.max"], ext[1], out=self.t[f"{key}.max"])
            if not self.same:
                for g, blk in zip(self.grams(key), lay.blocks(), strict=True):
                    g.addmm_(Xh[:, blk].T, Xh[:, blk])
        self.t["cross"].addmm_(XhA.T, XhB)
        if self.debiased:
            RA = _segsum(XhA * XhA, A, 1)
            RB = RA if self.same else _segsum(XhB * XhB, self.b, 1)
            self.t["cross.quart"].addmm_(RA.T, RB)
            self.t["cross.u"].addmm_(RA.T, XhB)
            if not self.same:
                self.t["cross.v"].addmm_(XhA.T, RB)
                for key, Xh, R, lay in (("a", XhA, RA, A), ("b", XhB, RB, self.b)):
                    self.t[f"{key}.quart"] += (R * R).sum(0)
                    self.t[f"{key}.third"] += (Xh * _expand(R, lay)).sum(0)
        self.n += XA.shape[0]

    def update_(self, XA: torch.Tensor, XB: torch.Tensor | None, extremes: list[torch.Tensor] | None = None) -> None:
        """Chan / Welford step: move the state to the new running mean, then add the batch around it.

        ``extremes``: per side the (2, D) column minima and maxima of the batch (computed here when not given).
        """
        b = XA.shape[0]
        if b == 0:
            return
        if extremes is None:
            extremes = _extremes([XA] if self.same else [XA, XB])
        means = [XA.mean(0)] + ([] if self.same else [XB.mean(0)])
        if self.n == 0:
            new = means
        else:
            w = b / (self.n + b)
            olds = [self.mean("a")] + ([] if self.same else [self.mean("b")])
            new = [old + w * (m - old) for old, m in zip(olds, means, strict=True)]
        if self.n == 0:
            self.t["a.center"].copy_(new[0])
            if not self.same:
                self.t["b.center"].copy_(new[1])
        else:
            self._move_to(new[0], None if self.same else new[1])
        self._add_rows_(XA, XB, extremes)

    def merge_(self, other: _Moments) -> None:
        if other.n == 0:
            return
        if self.n == 0:
            self.n = other.n
            self.t = {k: v.to(device=self.device, copy=True) for k, v in other.t.items()}
            return
        w = other.n / (self.n + other.n)
        new_a = self.mean("a") + w * (other.mean("a") - self.mean("a"))
        new_b = None if self.same else self.mean("b") + w * (other.mean("b") - self.mean("b"))
        self._move_to(new_a, new_b)
        o = other.clone(self.device)
        o._move_to(new_a, new_b)
        self._add_state_(o)

    def _add_state_(self, o: _Moments) -> None:
        for key, _, _, kind in self.spec(self.a, self.b, self.debiased):
            if kind == "sum":
                self.t[key] += o.t[key]
            elif kind == "min":
                torch.minimum(self.t[key], o.t[key], out=self.t[key])
            elif kind == "max":
                torch.maximum(self.t[key], o.t[key], out=self.t[key])
        self.n += o.n

    # distributed ------------------------------------------------------------------------------------------------------
    def all_reduce_(self, group: Any) -> None:
        """Shift agreement (one all-reduce), move to the shift, one all-reduce per statistic tensor."""
        d = _dist()
        dev = self.device
        parts = [torch.tensor([float(self.n)], dtype=_F64, device=dev)]
        sides = ["a"] if self.same else ["a", "b"]
        for key in sides:
            parts.append(self.n * self.mean(key) if self.n else torch.zeros_like(self.t[f"{key}.center"]))
        buf = torch.cat(parts)
        d.all_reduce(buf, op=d.ReduceOp.SUM, group=group)
        total = float(buf[0])
        if total == 0:
            return
        shift = buf[1:] / total
        shift_a = shift[: self.a.total]
        shift_b = None if self.same else shift[self.a.total :]
        if self.n:
            self._move_to(shift_a, shift_b)
        else:
            self.t["a.center"].copy_(shift_a)
            if not self.same:
                self.t["b.center"].copy_(shift_b)
        ops = {"sum": d.ReduceOp.SUM, "min": d.ReduceOp.MIN, "max": d.ReduceOp.MAX}
        for key, _, _, kind in self.spec(self.a, self.b, self.debiased):
            if kind in ops:
                d.all_reduce(self.t[key], op=ops[kind], group=group)
        self.n = round(total)

    # packing (torchmetrics) -----------------------------------------------------------------------------------------
    def pack(self) -> torch.Tensor:
        keys = [k for k, *_ in self.spec(self.a, self.b, self.debiased)]
        n = torch.tensor([float(self.n)], dtype=_F64, device=self.device)
        return torch.cat([n] + [self.t[k].reshape(-1) for k in keys])

    @classmethod
    def unpack(cls, flat: torch.Tensor, a: _Layout, b: _Layout | None, debiased: bool) -> _Moments:
        out = cls.__new__(cls)
        out.a, out.b, out.debiased = a, b, debiased
        out.n = round(float(flat[0]))
        out.t, off = {}, 1
        for key, shape, _, _ in cls.spec(a, b, debiased):
            size = math.prod(shape)
            out.t[key] = flat[off : off + size].reshape(shape).clone()
            off += size
        return out

    # the result -------------------------------------------------------------------------------------------------------
    def cka(self, names: tuple[Callable[[str], str], Callable[[str], str]]) -> torch.Tensor:
        """(LA, LB) linear CKA matrix from the centered moments (finalizes the center in place)."""
        n = self.n
        need = 4 if self.debiased else 2
        if n < need:
            raise TooFewSamplesError(
                f"{'debiased' if self.debiased else 'biased'} linear CKA needs at least {need} samples, the "
                f"accumulator has seen {n}. Update it with more rows first."
            )
        A = self.a
        B = A if self.same else self.b
        sides = [("a", A, names[0])] if self.same else [("a", A, names[0]), ("b", B, names[1])]
        for key, lay, label in sides:
            constant = self.t[f"{key}.max"] == self.t[f"{key}.min"]
            for name, blk in zip(lay.names, lay.blocks(), strict=True):
                if bool(constant[blk].all()):
                    raise DegenerateInputError(
                        f"{label(name)} has zero variance over all {n} samples: every sample has the same "
                        "representation, so CKA is undefined. Check that the layer depends on the input (a dead "
                        "ReLU, a constant input, a wrong output index)."
                    )
        self.finalize_()
        C = self.t["cross"]
        crosssq = torch.stack([_segsum(C[blk, :].square().sum(0), B, 0) for blk in A.blocks()])
        if self.same:
            selfA = selfB = torch.diagonal(crosssq)
        else:
            selfA = torch.stack([g.square().sum() for g in self.grams("a")])
            selfB = torch.stack([g.square().sum() for g in self.grams("b")])
        if not self.debiased:
            _warn_bias(n, A, B)
            xy, xx, yy = crosssq, selfA, selfB
        else:
            sA = self.traces("a")
            sB = sA if self.same else self.traces("b")
            Q = self.t["cross.quart"]
            qA = torch.diagonal(Q) if self.same else self.t["a.quart"]
            qB = torch.diagonal(Q) if self.same else self.t["b.quart"]
            c1, c2, c3 = n / (n - 2), 1.0 / ((n - 1) * (n - 2)), 1.0 / (n * (n - 3))
            xy = (crosssq - c1 * Q + c2 * torch.outer(sA, sB)) * c3
            xx = (selfA - c1 * qA + c2 * sA * sA) * c3
            yy = (selfB - c1 * qB + c2 * sB * sB) * c3
        return _ratio_table(xy, xx, yy, ((A.names, names[0]), (B.names, names[1])))


# --- the accumulator base -------------------------------------------------------------------------------------------


def _own(value: Any) -> Any:
    """A copy of accumulator state that later updates of the original cannot reach.

    Tensors and ``_Moments`` are cloned, accumulators copied, dicts copied entry by entry; lists of row batches are
    copied shallowly (batches are only ever appended, never changed in place).
    """
    if isinstance(value, dict):
        return {k: _own(v) for k, v in value.items()}
    if isinstance(value, list):
        return list(value)
    if isinstance(value, _Accumulator):
        return value._copy()
    return None if value is None else value.clone()


class _Accumulator:
    """Shared life cycle: reduced flag, ``compute(sync=...)`` semantics, state-dict header checks."""

    _kind = "accumulator"

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group
        self._reduced = False
        self.same: bool | None = None
        self._labels = (_label_a, _label_b)

    def _validate_update(
        self, acts_a: Acts, acts_b: Acts | None, *, finite: bool = True
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, list[Any]]:
        """Check the arguments of a map's ``update`` (``same`` is fixed by the first call) and validate the rows.

        Returns side a's rows, side b's rows (None when one model is compared with itself) and the
        ``(label, rows)`` groups whose row counts :func:`_check_same_rows` compares.
        """
        self._check_not_reduced("update")
        _check_acts(acts_a, "acts_a")
        same_call = acts_b is None or acts_b is acts_a
        if self.same is None:
            self.same = same_call
        kind = type(self).__name__
        if self.same and not same_call:
            raise RepsimError(
                f"this {kind} compares one model with itself (same=True): call update(acts) or update(acts, acts) "
                f"with the same dict. For two models create {kind}(same=False)."
            )
        if not self.same and acts_b is None:
            raise RepsimError(f"this {kind} compares two models (same=False): pass update(acts_a, acts_b).")
        if not same_call:
            _check_acts(acts_b, "acts_b")
        la, lb = self._labels
        A = _validate_rows(acts_a, la, finite=finite)
        groups: list[Any] = [(la, A)]
        B = None
        if not self.same:
            B = A if acts_b is acts_a else _validate_rows(acts_b, lb, finite=finite)  # type: ignore[arg-type]
            groups.append((lb, B))
        return A, B, groups

    @property
    def reduced(self) -> bool:
        """True after :meth:`all_reduce`: the state holds every rank's statistics."""
        return self._reduced

    def _check_not_reduced(self, action: str) -> None:
        if self._reduced:
            raise RepsimError(
                f"cannot {action}: this accumulator already holds the all-reduced statistics of every rank, and "
                "adding to it would count the other ranks twice at the next reduction. Call reset() to start a new "
                "stream, or compute(sync='auto') without all_reduce() (it reduces a copy)."
            )

    # attributes holding the statistics: a copy (compute's reduced copy) gets its own, the rest is shared
    _STATE_ATTRS: tuple[str, ...] = ()

    def _copy(self) -> _Accumulator:
        out = copy.copy(self)
        for name in self._STATE_ATTRS:
            setattr(out, name, _own(getattr(self, name)))
        return out

    def all_reduce(self, group: Any = None) -> None:
        raise NotImplementedError

    def _compute_local(self) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, sync: bool | str = "auto") -> torch.Tensor:
        """The estimate from the statistics seen so far (float64, on the state's device).

        ``sync="auto"``: if ``torch.distributed`` is initialized with more than one rank and the state is not
        reduced yet, all-reduce a copy first (every rank must call ``compute``); the local state is left as is.
        ``sync=True`` requires a process group; ``sync=False`` uses this rank's statistics only.
        """
        _check_sync(sync)
        target: _Accumulator = self
        if not self._reduced and sync is not False:
            if sync is True:
                _require_dist(f"{type(self).__name__}.compute(sync=True)")
            if sync is True or _dist_active(self.process_group):
                target = self._copy()
                target.all_reduce(self.process_group)
        return target._compute_local()

    def _header(self) -> dict[str, Any]:
        return {"kind": self._kind, "version": STATE_VERSION, "reduced": self._reduced}

    def _check_header(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise RepsimError(f"a state dict must be a dict, got {type(state).__name__}.")
        if state.get("kind") != self._kind:
            raise RepsimError(
                f"this state dict was saved from {state.get('kind')!r}, not {self._kind!r}; load it into the "
                "accumulator class that saved it."
            )
        if state.get("version") != STATE_VERSION:
            raise RepsimError(
                f"state dict version {state.get('version')!r} is not supported (this is version {STATE_VERSION})."
            )


# --- exact linear CKA -----------------------------------------------------------------------------------------------


def _label_a(name: str) -> str:
    return f"acts_a[{name!r}]"


def _label_b(name: str) -> str:
    return f"acts_b[{name!r}]"


class LinearCKAMap(_Accumulator):
    """Exact streaming linear CKA for every layer pair of two models (or of one model with itself).

    ``update(acts_a, acts_b)`` takes ``{layer name: (b, d) tensor}`` dicts holding the same b samples. Each layer's
    Gram ``X^T X`` and sums are accumulated once per batch (not once per pair); each pair adds only the cross
    moment ``X_a^T X_b`` (all pairs in one matrix product). ``same=True`` (or passing ``acts_b=None`` /
    ``acts_b is acts_a``; ``same=None`` decides at the first update) serves one model on both sides from a single
    Gram of the concatenated layers. ``compute()`` returns the (La, Lb) float64 map, rows in the order of the first
    update's ``acts_a``. Memory: :meth:`memory_bytes`.
    """

    _kind = "LinearCKAMap"
    _STATE_ATTRS = ("_m",)

    def __init__(self, debiased: bool = False, *, same: bool | None = None, process_group: Any = None) -> None:
        super().__init__(process_group)
        self.debiased = _check_debiased(debiased)
        if not (same is None or isinstance(same, bool)):
            raise RepsimError(f"same must be True, False or None, got {same!r}.")
        self._same_arg = same
        self.same: bool | None = same
        self._m: _Moments | None = None
        self._device: torch.device | None = None

    # --- properties ---
    @property
    def layers_a(self) -> list[str]:
        return [] if self._m is None else list(self._m.a.names)

    @property
    def layers_b(self) -> list[str]:
        if self._m is None:
            return []
        return list(self._m.a.names if self._m.same else self._m.b.names)

    @property
    def n(self) -> int:
        """Number of samples accumulated (on this rank, unless reduced)."""
        return 0 if self._m is None else self._m.n

    # --- memory ---
    @staticmethod
    def memory_bytes(
        dims_a: Sequence[int], dims_b: Sequence[int] | None = None, *, debiased: bool = False, batch_size: int = 0
    ) -> int:
        """Bytes of the float64 state for layers of the given feature dims (``dims_b=None``: one model).

        The state is O(sum d^2 + sum_pairs d_a d_b): per layer its Gram, per pair its cross moment, plus O(d)
        vectors (and O(L d) for the debiased third-order terms). With ``batch_size`` the estimate adds the
        transient per-update buffers: the batch upcast to float64 and centered (2 b D per side) and the row
        norms. ``merge`` and ``compute(sync='auto')`` under ``torch.distributed`` briefly hold a second state.
        """
        a = _Layout(tuple(str(i) for i in range(len(dims_a))), tuple(int(d) for d in dims_a))
        b = (
            None
            if dims_b is None
            else _Layout(tuple(str(i) for i in range(len(dims_b))), tuple(int(d) for d in dims_b))
        )
        state = sum(math.prod(shape) for _, shape, _, _ in _Moments.spec(a, b, debiased)) * 8
        if batch_size:
            width = a.total + (0 if b is None else b.total)
            layers = a.n_layers + (0 if b is None else b.n_layers)
            state += 8 * int(batch_size) * (2 * width + (layers if debiased else 0))
        return state

    # --- streaming ---
    def update(self, acts_a: Acts, acts_b: Acts | None = None) -> None:
        """Add one batch: ``acts_a`` / ``acts_b`` map layer names to (b, d) activations of the same b samples."""
        with torch.no_grad():
            A, B, groups = self._validate_update(acts_a, acts_b, finite=False)
            if _check_same_rows(groups) == 0:
                return
            m = self._m
            if m is None:
                lay_a = _Layout(tuple(A), tuple(int(t.shape[1]) for t in A.values()))
                lay_b = None if self.same else _Layout(tuple(B), tuple(int(t.shape[1]) for t in B.values()))
                m = _Moments(lay_a, lay_b, self.debiased, self._device or next(iter(A.values())).device)
            XA = _concat(_order_like(A, m.a, "acts_a"), m.device)
            XB = None if self.same else _concat(_order_like(B, m.b, "acts_b"), m.device)
            extremes = _extremes([XA] if self.same else [XA, XB])
            _check_finite(extremes, groups)
            m.update_(XA, XB, extremes)
            self._m = m

    def merge(self, other: LinearCKAMap) -> None:
        """Add the statistics of ``other`` (same layers and options; e.g. another shard): exact, order-free."""
        self._check_not_reduced("merge")
        if type(other) is not type(self) or other.debiased != self.debiased:
            raise RepsimError(
                f"can only merge a {type(self).__name__} with debiased={self.debiased}, got "
                f"{type(other).__name__}" + (f" with debiased={other.debiased}" if hasattr(other, "debiased") else "")
            )
        if other._m is None:
            return
        if self._m is None:
            self.same = other.same
            self._m = other._m.clone()
            return
        if self._m.fingerprint() != other._m.fingerprint():
            raise RepsimError(
                "cannot merge accumulators with different layers or feature dimensions: "
                f"{self.layers_a} x {self.layers_b} {self._m.a.dims} vs {other.layers_a} x {other.layers_b} "
                f"{other._m.a.dims}."
            )
        with torch.no_grad():
            self._m.merge_(other._m)

    def reset(self) -> None:
        """Forget all statistics and the layer layout (a new stream may use other layers)."""
        self._m = None
        self.same = self._same_arg
        self._reduced = False

    def all_reduce(self, group: Any = None) -> None:
        """Sum the statistics of all ranks in place (see the module docstring); marks the state as reduced."""
        _require_dist(f"{type(self).__name__}.all_reduce")
        self._check_not_reduced("all_reduce")
        group = self.process_group if group is None else group
        device = _comm_device(group, None if self._m is None else self._m.device)
        _check_layout_agreement(None if self._m is None else self._m.fingerprint(), group, device, type(self).__name__)
        with torch.no_grad():
            self._m.all_reduce_(group)
        self._reduced = True

    def _compute_local(self) -> torch.Tensor:
        if self._m is None:
            raise TooFewSamplesError(f"{type(self).__name__}.compute: no batch has been added yet; call update first.")
        with torch.no_grad():
            return self._m.cka(self._labels)

    def compute(self, sync: bool | str = "auto") -> torch.Tensor:
        """(La, Lb) float64 linear CKA map; see :meth:`_Accumulator.compute` for ``sync``."""
        return super().compute(sync)

    # --- persistence ---
    def state_dict(self) -> dict[str, Any]:
        """Plain dict of tensors and metadata (``torch.save`` / ``torch.load(weights_only=True)`` safe)."""
        out = self._header() | {"debiased": self.debiased, "same": self.same}
        if self._m is None:
            return out | {"layout": None}
        m = self._m
        return out | {
            "layout": {"a": m.a.as_json(), "b": None if m.same else m.b.as_json()},
            "n": m.n,
            "tensors": {k: v.detach().clone() for k, v in m.t.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; options must match this accumulator's."""
        self._check_header(state)
        if state.get("debiased") != self.debiased:
            raise RepsimError(
                f"the state was saved with debiased={state.get('debiased')}, this accumulator has "
                f"debiased={self.debiased}."
            )
        if self._same_arg is not None and state.get("same") is not None and state["same"] != self._same_arg:
            raise RepsimError(
                f"the state was saved with same={state['same']}, this accumulator has same={self._same_arg}."
            )
        layout = state.get("layout")
        if layout is None:
            self.reset()
            self._reduced = bool(state.get("reduced", False))
            return
        try:
            a = _Layout(tuple(layout["a"][0]), tuple(int(x) for x in layout["a"][1]))
            b = None if layout["b"] is None else _Layout(tuple(layout["b"][0]), tuple(int(x) for x in layout["b"][1]))
            tensors = state["tensors"]
            spec = _Moments.spec(a, b, self.debiased)
            if set(tensors) != {k for k, *_ in spec}:
                raise KeyError(sorted(set(tensors) ^ {k for k, *_ in spec}))
            m = _Moments.__new__(_Moments)
            m.a, m.b, m.debiased, m.n = a, b, self.debiased, int(state["n"])
            m.t = {}
            for key, shape, _, _ in spec:
                t = tensors[key]
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                    raise KeyError(key)
                m.t[key] = t.detach().to(_F64).clone()
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise RepsimError(
                f"malformed {self._kind} state dict ({err!r}); pass the output of state_dict()."
            ) from None
        devices = {t.device for t in m.t.values()}
        if len(devices) > 1:
            raise RepsimError(f"the state dict's tensors lie on several devices {devices}; move them to one.")
        self._m = m
        self.same = b is None
        self._reduced = bool(state.get("reduced", False))

    def to(self, device: torch.device | str) -> LinearCKAMap:
        """Move the state to ``device`` (later batches are moved there too); returns self."""
        self._device = torch.device(device)
        if self._m is not None:
            self._m.t = {k: v.to(device) for k, v in self._m.t.items()}
        return self

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(debiased={self.debiased}, same={self.same}, layers={len(self.layers_a)}x"
            f"{len(self.layers_b)}, n={self.n}{', reduced' if self._reduced else ''})"
        )


class LinearCKA(_Accumulator):
    """Exact streaming linear CKA of one pair: ``update(X, Y)`` with (b, p) and (b, q) rows, ``compute()`` 0-d.

    Equal to the one-shot :func:`repsim_plugin.measures.cka.linear_cka` on all rows (within float64 rounding) for
    any batch sizes and order; biased batches may have a single row, ``debiased=True`` needs n >= 4 in total only.
    """

    _kind = "LinearCKA"
    _STATE_ATTRS = ("_map",)

    def __init__(self, debiased: bool = False, *, process_group: Any = None) -> None:
        super().__init__(process_group)
        self.debiased = _check_debiased(debiased)
        self._map = LinearCKAMap(debiased, same=False, process_group=process_group)
        self._map._labels = (lambda _: "X", lambda _: "Y")

    @property
    def n(self) -> int:
        return self._map.n

    @property
    def reduced(self) -> bool:
        return self._map.reduced

    @staticmethod
    def memory_bytes(p: int, q: int, *, debiased: bool = False, batch_size: int = 0) -> int:
        """Bytes of the float64 state: about 8 (p^2 + q^2 + pq) plus O(p + q)."""
        return LinearCKAMap.memory_bytes([p], [q], debiased=debiased, batch_size=batch_size)

    def update(self, X: Any, Y: Any) -> None:
        """Add rows: X (b, p), Y (b, q), the same b samples in the same order."""
        self._map.update({"X": X}, {"Y": Y})

    def merge(self, other: LinearCKA) -> None:
        if not isinstance(other, LinearCKA) or other.debiased != self.debiased:
            raise RepsimError(f"can only merge a LinearCKA with debiased={self.debiased}, got {other!r}.")
        self._map.merge(other._map)

    def reset(self) -> None:
        self._map.reset()

    def all_reduce(self, group: Any = None) -> None:
        """Sum the statistics of all ranks in place (one all-reduce per statistic tensor); marks as reduced."""
        self._map.all_reduce(self.process_group if group is None else group)

    def compute(self, sync: bool | str = "auto") -> torch.Tensor:
        """0-d float64 linear CKA of everything seen; see :meth:`_Accumulator.compute` for ``sync``."""
        return self._map.compute(sync)[0, 0]

    def state_dict(self) -> dict[str, Any]:
        return self._map.state_dict() | {"kind": self._kind}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_header(state)
        self._map.load_state_dict(dict(state) | {"kind": LinearCKAMap._kind})

    def to(self, device: torch.device | str) -> LinearCKA:
        self._map.to(device)
        return self

    def __repr__(self) -> str:
        return f"LinearCKA(debiased={self.debiased}, n={self.n}{', reduced' if self.reduced else ''})"


# --- sample space ---------------------------------------------------------------------------------------------------


def _unbiased_hsic_table(KA: torch.Tensor, KB: torch.Tensor) -> torch.Tensor:
    """Song et al.'s unbiased HSIC for every pair of stacked Grams: KA (La, m, m), KB (Lb, m, m) -> (La, Lb).

    The same formula as :func:`repsim_plugin.measures.kernels.hsic_unbiased`, vectorized over layer pairs.
    """
    m = KA.shape[-1]
    if m < 4:
        raise TooFewSamplesError(f"unbiased HSIC needs at least 4 samples, got {m}.")
    eye = torch.eye(m, dtype=torch.bool, device=KA.device)
    Ka = KA.masked_fill(eye, 0.0)
    Kb = KB.masked_fill(eye, 0.0)
    ka, kb = Ka.sum(-1), Kb.sum(-1)  # row sums (L, m)
    trace = Ka.reshape(Ka.shape[0], -1) @ Kb.reshape(Kb.shape[0], -1).T
    total = torch.outer(ka.sum(-1), kb.sum(-1)) / ((m - 1) * (m - 2))
    cross = 2.0 / (m - 2) * (ka @ kb.T)
    return (trace + total - cross) / (m * (m - 3))


def _gram_stack(Xs: list[torch.Tensor], kernel: str, params: dict[str, Any]) -> torch.Tensor:
    gram = KERNELS[kernel]
    return torch.stack([gram(X, **params) for X in Xs])


def _ratio_table(
    xy: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor, names: Sequence[tuple[Sequence[str], Callable[[str], str]]]
) -> torch.Tensor:
    for values, (layer_names, label) in zip((xx, yy), names, strict=True):
        for name, value in zip(layer_names, values, strict=True):
            if not bool(value > 0):
                raise DegenerateInputError(
                    f"HSIC of {label(name)} with itself is {float(value):.3g}, not positive, so CKA is undefined: "
                    "use more samples (the unbiased estimator can be <= 0 at small n), or check that the layer "
                    "varies across inputs."
                )
    return xy / torch.sqrt(torch.outer(xx, yy))


class SampleSpaceCKAMap(_Accumulator):
    """Exact linear CKA for every layer pair through (n, n) Grams: the estimator for small n and huge d.

    Exact CKA cannot stream in sample space (a Gram needs every row), so this *keeps every layer's rows* in their
    input dtype (float32 stays float32, losslessly) and centers in float64 at ``compute``: memory O(n sum d) for the
    rows plus O(L n^2) float64 for the Grams then. Same interface as :class:`LinearCKAMap`; ``all_reduce``
    all-gathers the rows (rank order).
    """

    _kind = "SampleSpaceCKAMap"
    _STATE_ATTRS = ("_rows_a", "_rows_b")

    def __init__(self, debiased: bool = False, *, same: bool | None = None, process_group: Any = None) -> None:
        super().__init__(process_group)
        self.debiased = _check_debiased(debiased)
        self._same_arg = same
        self.same = same
        self.reset()

    @property
    def n(self) -> int:
        return self._n

    @property
    def layers_a(self) -> list[str]:
        return [] if self._rows_a is None else list(self._rows_a)

    @property
    def layers_b(self) -> list[str]:
        if self._rows_a is None:
            return []
        return list(self._rows_a if self.same else self._rows_b)

    @staticmethod
    def memory_bytes(n: int, dims_a: Sequence[int], dims_b: Sequence[int] | None = None, *, itemsize: int = 4) -> int:
        """Rows kept (``itemsize`` bytes each, 4 for float32) plus the float64 Grams formed at ``compute``."""
        dims = list(dims_a) + list(dims_b or [])
        return int(n) * sum(dims) * int(itemsize) + 8 * len(dims) * int(n) ** 2 + 8 * int(n) * max(dims)

    def update(self, acts_a: Acts, acts_b: Acts | None = None) -> None:
        A, B, groups = self._validate_update(acts_a, acts_b)
        _check_same_rows(groups)
        if self._rows_a is None:
            self._rows_a = {k: [] for k in A}
            self._rows_b = None if self.same else {k: [] for k in B}
            self._lay = (
                _Layout(tuple(A), tuple(int(t.shape[1]) for t in A.values())),
                None if self.same else _Layout(tuple(B), tuple(int(t.shape[1]) for t in B.values())),
            )
        for store, acts, arg, lay in (
            (self._rows_a, A, "acts_a", self._lay[0]),
            (self._rows_b, B, "acts_b", self._lay[1]),
        ):
            if store is None:
                continue
            tensors = _order_like(acts, lay, arg)
            for name, t in zip(lay.names, tensors, strict=True):
                store[name].append(t.detach().clone())
        self._n += next(iter(A.values())).shape[0]

    def merge(self, other: SampleSpaceCKAMap) -> None:
        """Append ``other``'s rows after this accumulator's rows."""
        self._check_not_reduced("merge")
        if not isinstance(other, SampleSpaceCKAMap) or other.debiased != self.debiased:
            raise RepsimError(f"can only merge a SampleSpaceCKAMap with debiased={self.debiased}.")
        if other._rows_a is None:
            return
        if self._rows_a is None:
            self.same, self._lay = other.same, other._lay
            self._rows_a = {k: list(v) for k, v in other._rows_a.items()}
            self._rows_b = None if other._rows_b is None else {k: list(v) for k, v in other._rows_b.items()}
            self._n = other._n
            return
        if self.same != other.same or self._lay != other._lay:
            raise RepsimError("cannot merge sample-space accumulators with different layers.")
        for mine, theirs in ((self._rows_a, other._rows_a), (self._rows_b, other._rows_b)):
            if mine is None:
                continue
            for k in mine:
                mine[k].extend(theirs[k])
        self._n += other._n

    def reset(self) -> None:
        self._rows_a = self._rows_b = None
        self._lay: tuple[_Layout, _Layout | None] | None = None
        self._n = 0
        self.same = self._same_arg
        self._reduced = False

    def _stacked(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        def cat(store: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
            return {k: torch.cat(v, dim=0) for k, v in store.items()}

        return cat(self._rows_a), None if self._rows_b is None else cat(self._rows_b)

    def all_reduce(self, group: Any = None) -> None:
        """All-gather every rank's rows (rank order) in place; marks the state as reduced."""
        d = _require_dist(f"{type(self).__name__}.all_reduce")
        self._check_not_reduced("all_reduce")
        group = self.process_group if group is None else group
        fingerprint = None
        if self._lay is not None:
            a, b = self._lay
            fingerprint = json.dumps([a.as_json(), None if b is None else b.as_json(), self.debiased])
        first = None if self._rows_a is None else next(iter(self._rows_a.values()))[0].device
        _check_layout_agreement(fingerprint, group, _comm_device(group, first), type(self).__name__)
        A, B = self._stacked()
        payload = {
            "a": {k: v.cpu() for k, v in A.items()},
            "b": None if B is None else {k: v.cpu() for k, v in B.items()},
        }
        gathered: list[Any] = [None] * d.get_world_size(group)
        d.all_gather_object(gathered, payload, group=group)
        device = first
        self._rows_a = {k: [g["a"][k].to(device) for g in gathered] for k in A}
        self._rows_b = None if B is None else {k: [g["b"][k].to(device) for g in gathered] for k in B}
        self._n = sum(next(iter(g["a"].values())).shape[0] for g in gathered)
        self._reduced = True

    def _compute_local(self) -> torch.Tensor:
        if self._rows_a is None:
            raise TooFewSamplesError(f"{type(self).__name__}.compute: no batch has been added yet; call update first.")
        need = 4 if self.debiased else 2
        if self._n < need:
            raise TooFewSamplesError(
                f"{'debiased' if self.debiased else 'biased'} CKA needs at least {need} samples, got {self._n}."
            )
        A, B = self._stacked()
        with torch.no_grad():
            grams = {}
            for side, acts, label in (("a", A, _label_a), ("b", B, _label_b)):
                if acts is None:
                    continue
                Ks = []
                for name, X in acts.items():
                    X64 = X.to(_F64)
                    if bool((X64.amax(0) == X64.amin(0)).all()):
                        raise DegenerateInputError(
                            f"{label(name)} has zero variance over all {self._n} samples, so CKA is undefined."
                        )
                    Xc = X64 - X64.mean(0, keepdim=True)
                    Ks.append(Xc @ Xc.T)
                grams[side] = torch.stack(Ks)
            KA = grams["a"]
            KB = KA if self.same else grams["b"]
            if self.debiased:
                xy = _unbiased_hsic_table(KA, KB)
                xx = torch.diagonal(xy) if self.same else torch.diagonal(_unbiased_hsic_table(KA, KA))
                yy = xx if self.same else torch.diagonal(_unbiased_hsic_table(KB, KB))
            else:
                la = _Layout(tuple(A), tuple(int(v.shape[1]) for v in A.values()))
                lb = la if self.same else _Layout(tuple(B), tuple(int(v.shape[1]) for v in B.values()))
                _warn_bias(self._n, la, lb)
                fa, fb = KA.reshape(KA.shape[0], -1), KB.reshape(KB.shape[0], -1)
                xy = fa @ fb.T
                xx, yy = fa.square().sum(-1), fb.square().sum(-1)
            names_b = (self.layers_b, _label_a if self.same else _label_b)
            return _ratio_table(xy, xx, yy, [(self.layers_a, _label_a), names_b])

    def state_dict(self) -> dict[str, Any]:
        out = self._header() | {"debiased": self.debiased, "same": self.same, "n": self._n}
        if self._rows_a is None:
            return out | {"rows_a": None, "rows_b": None}
        A, B = self._stacked()
        return out | {"rows_a": A, "rows_b": B}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_header(state)
        if state.get("debiased") != self.debiased:
            raise RepsimError(f"the state was saved with debiased={state.get('debiased')}.")
        self.reset()
        if state.get("rows_a") is not None:
            self.same = bool(state["same"])
            self._rows_a = {k: [v.clone()] for k, v in state["rows_a"].items()}
            self._rows_b = None if state.get("rows_b") is None else {k: [v.clone()] for k, v in state["rows_b"].items()}
            self._lay = tuple(
                None if rows is None else _Layout(tuple(rows), tuple(int(v[0].shape[1]) for v in rows.values()))
                for rows in (self._rows_a, self._rows_b)
            )
            self._n = int(state["n"])
        self._reduced = bool(state.get("reduced", False))


# --- minibatch CKA --------------------------------------------------------------------------------------------------


def _kernel_config(kernel: str, kernel_params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Validated kernel name and its full parameters (defaults filled in), as the CKA measures resolve them."""
    params = {"kernel": kernel, **kernel_params}
    name, full = _kernel_from_params(params)
    if params:
        accepted = sorted(KERNEL_PARAMS.get(name, {}))
        raise RepsimError(
            f"kernel {name!r} takes no parameter(s) {sorted(params)}"
            + (f"; it accepts {accepted}." if accepted else ".")
            + (" Pass kernel='rbf' to use sigma." if "sigma" in params else "")
        )
    return name, full


def _minibatch_rows(b: int) -> None:
    if b < 4:
        raise TooFewSamplesError(
            f"minibatch CKA needs at least 4 rows per batch (unbiased HSIC), got a batch of {b}. Use larger batches, "
            "or drop the last short batch (DataLoader(..., drop_last=True))."
        )


class _SumState(_Accumulator):
    """Accumulators whose state is plain sums (no shift needed): batches, samples and HSIC sums."""

    def _sums(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _fingerprint(self) -> str | None:
        raise NotImplementedError

    def all_reduce(self, group: Any = None) -> None:
        """Sum every rank's HSIC sums and counts in place (one all-reduce per tensor); marks as reduced."""
        d = _require_dist(f"{type(self).__name__}.all_reduce")
        self._check_not_reduced("all_reduce")
        group = self.process_group if group is None else group
        sums = self._sums()
        device = _comm_device(group, None if not sums else next(iter(sums.values())).device)
        _check_layout_agreement(self._fingerprint(), group, device, type(self).__name__)
        counts = torch.tensor([self.batches, self.n], dtype=torch.int64, device=device)
        d.all_reduce(counts, op=d.ReduceOp.SUM, group=group)
        for t in sums.values():
            d.all_reduce(t, op=d.ReduceOp.SUM, group=group)
        self.batches, self.n = int(counts[0]), int(counts[1])
        self._reduced = True


class MinibatchCKA(_SumState):
    """Minibatch CKA (Nguyen, Raghu & Kornblith 2021) of one pair, with any kernel of ``kernels.KERNELS``.

    Each batch adds unbiased HSIC(K, L), HSIC(K, K), HSIC(L, L) of its own Grams; ``compute()`` is
    ``sum_xy / sqrt(sum_xx sum_yy)``. Per-batch CKA values are never averaged. Every batch counts equally, whatever
    its size (use equal batch sizes). It estimates a different quantity from full-data CKA: close, not equal.
    """

    _kind = "MinibatchCKA"
    _STATE_ATTRS = ("sums",)

    def __init__(self, kernel: str = "linear", *, process_group: Any = None, **kernel_params: Any) -> None:
        super().__init__(process_group)
        self.kernel, self.kernel_params = _kernel_config(kernel, kernel_params)
        self.reset()

    def reset(self) -> None:
        self.batches = 0
        self.n = 0
        self.sums: torch.Tensor | None = None  # [xy, xx, yy]
        self._reduced = False

    def _sums(self) -> dict[str, torch.Tensor]:
        if self.sums is None:
            self.sums = torch.zeros(3, dtype=_F64)
        return {"sums": self.sums}

    def _fingerprint(self) -> str:
        return json.dumps([self._kind, self.kernel, sorted(self.kernel_params.items())])

    def update(self, X: Any, Y: Any) -> None:
        """Add one batch (at least 4 rows) of X (b, p) and Y (b, q)."""
        self._check_not_reduced("update")
        X, Y = check_matrix(X, "X"), check_matrix(Y, "Y")
        b = _check_same_rows([(lambda _: "X", {"X": X}), (lambda _: "Y", {"Y": Y})])
        _minibatch_rows(b)
        device = X.device if self.sums is None else self.sums.device
        with torch.no_grad():
            X64, Y64 = X.detach().to(device, _F64), Y.detach().to(device, _F64)
            gram = KERNELS[self.kernel]
            K, L = gram(X64, **self.kernel_params), gram(Y64, **self.kernel_params)
            batch = torch.stack([hsic_unbiased(K, L), hsic_unbiased(K, K), hsic_unbiased(L, L)])
        self.sums = batch if self.sums is None else self.sums + batch
        self.batches += 1
        self.n += b

    def merge(self, other: MinibatchCKA) -> None:
        self._check_not_reduced("merge")
        if not isinstance(other, MinibatchCKA) or other._fingerprint() != self._fingerprint():
            raise RepsimError(f"can only merge a MinibatchCKA with kernel={self.kernel!r} {self.kernel_params}.")
        if other.sums is None:
            return
        self.sums = other.sums.clone() if self.sums is None else self.sums + other.sums.to(self.sums.device)
        self.batches += other.batches
        self.n += other.n

    def _compute_local(self) -> torch.Tensor:
        if self.batches == 0 or self.sums is None:
            raise TooFewSamplesError("MinibatchCKA.compute: no batch has been added yet; call update first.")
        return cka_from_hsic(self.sums[0], self.sums[1], self.sums[2])

    def state_dict(self) -> dict[str, Any]:
        return self._header() | {
            "kernel": self.kernel,
            "kernel_params": dict(self.kernel_params),
            "batches": self.batches,
            "n": self.n,
            "sums": None if self.sums is None else self.sums.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_header(state)
        if state.get("kernel") != self.kernel or dict(state.get("kernel_params", {})) != self.kernel_params:
            raise RepsimError(
                f"the state was saved with kernel={state.get('kernel')!r} {state.get('kernel_params')}, this "
                f"accumulator has kernel={self.kernel!r} {self.kernel_params}."
            )
        sums = state.get("sums")
        if sums is not None and (not isinstance(sums, torch.Tensor) or tuple(sums.shape) != (3,)):
            raise RepsimError("malformed MinibatchCKA state dict: 'sums' must be a tensor of 3 values.")
        self.batches, self.n = int(state["batches"]), int(state["n"])
        self.sums = None if sums is None else sums.to(_F64).clone()
        self._reduced = bool(state.get("reduced", False))

    def __repr__(self) -> str:
        return f"MinibatchCKA(kernel={self.kernel!r}, {self.kernel_params}, batches={self.batches}, n={self.n})"


class MinibatchCKAMap(_SumState):
    """Minibatch CKA for every layer pair: each layer's batch Gram is formed once per batch and shared by its pairs.

    ``same`` as in :class:`LinearCKAMap`. State: per layer the summed self-HSIC, per pair the summed cross-HSIC,
    and the batch / sample counts. Transient memory per update: O((La + Lb) b^2) float64 Grams.
    """

    _kind = "MinibatchCKAMap"
    _STATE_ATTRS = ("_state",)

    def __init__(
        self, kernel: str = "linear", *, same: bool | None = None, process_group: Any = None, **kernel_params: Any
    ) -> None:
        super().__init__(process_group)
        self.kernel, self.kernel_params = _kernel_config(kernel, kernel_params)
        self._same_arg = same
        self.reset()

    def reset(self) -> None:
        self.batches = 0
        self.n = 0
        self.same = self._same_arg
        self._layers: tuple[_Layout, _Layout | None] | None = None
        self._state: dict[str, torch.Tensor] = {}
        self._reduced = False

    @property
    def layers_a(self) -> list[str]:
        return [] if self._layers is None else list(self._layers[0].names)

    @property
    def layers_b(self) -> list[str]:
        if self._layers is None:
            return []
        return list((self._layers[0] if self.same else self._layers[1]).names)

    @staticmethod
    def memory_bytes(batch_size: int, n_layers_a: int, n_layers_b: int | None = None) -> int:
        """Transient float64 Grams of one update plus the (tiny) state."""
        layers = n_layers_a + (n_layers_b or 0)
        return 8 * (layers * int(batch_size) ** 2 + n_layers_a * (n_layers_b or n_layers_a) + layers)

    def _sums(self) -> dict[str, torch.Tensor]:
        return self._state

    def _fingerprint(self) -> str | None:
        if self._layers is None:
            return None
        a, b = self._layers
        return json.dumps([self._kind, self.kernel, sorted(self.kernel_params.items()), a.as_json(), b and b.as_json()])

    def update(self, acts_a: Acts, acts_b: Acts | None = None) -> None:
        A, B, groups = self._validate_update(acts_a, acts_b)
        b = _check_same_rows(groups)
        _minibatch_rows(b)
        if self._layers is None:
            la = _Layout(tuple(A), tuple(int(t.shape[1]) for t in A.values()))
            lb = None if self.same else _Layout(tuple(B), tuple(int(t.shape[1]) for t in B.values()))
            self._layers = (la, lb)
            device = next(iter(A.values())).device
            LA, LB = la.n_layers, (la if lb is None else lb).n_layers
            self._state = {"cross": torch.zeros(LA, LB, dtype=_F64, device=device)}
            if not self.same:
                self._state["self_a"] = torch.zeros(LA, dtype=_F64, device=device)
                self._state["self_b"] = torch.zeros(LB, dtype=_F64, device=device)
        la, lb = self._layers
        device = self._state["cross"].device
        with torch.no_grad():
            XA = [t.detach().to(device, _F64) for t in _order_like(A, la, "acts_a")]
            KA = _gram_stack(XA, self.kernel, self.kernel_params)
            if self.same:
                self._state["cross"] += _unbiased_hsic_table(KA, KA)
            else:
                XB = [t.detach().to(device, _F64) for t in _order_like(B, lb, "acts_b")]
                KB = _gram_stack(XB, self.kernel, self.kernel_params)
                self._state["cross"] += _unbiased_hsic_table(KA, KB)
                self._state["self_a"] += _self_hsic(KA)
                self._state["self_b"] += _self_hsic(KB)
        self.batches += 1
        self.n += b

    def merge(self, other: MinibatchCKAMap) -> None:
        self._check_not_reduced("merge")
        if not isinstance(other, MinibatchCKAMap) or (
            other._layers is not None and self._layers is not None and other._fingerprint() != self._fingerprint()
        ):
            raise RepsimError("can only merge a MinibatchCKAMap with the same kernel, layers and feature dimensions.")
        if other._layers is None:
            return
        if self._layers is None:
            self.same, self._layers = other.same, other._layers
            self._state = {k: v.clone() for k, v in other._state.items()}
        else:
            for k, v in other._state.items():
                self._state[k] += v.to(self._state[k].device)
        self.batches += other.batches
        self.n += other.n

    def _compute_local(self) -> torch.Tensor:
        if self.batches == 0 or self._layers is None:
            raise TooFewSamplesError("MinibatchCKAMap.compute: no batch has been added yet; call update first.")
        cross = self._state["cross"]
        if self.same:
            xx = yy = torch.diagonal(cross)
            names = [(self.layers_a, _label_a), (self.layers_a, _label_a)]
        else:
            xx, yy = self._state["self_a"], self._state["self_b"]
            names = [(self.layers_a, _label_a), (self.layers_b, _label_b)]
        return _ratio_table(cross, xx, yy, names)

    def state_dict(self) -> dict[str, Any]:
        out = self._header() | {
            "kernel": self.kernel,
            "kernel_params": dict(self.kernel_params),
            "same": self.same,
            "batches": self.batches,
            "n": self.n,
        }
        if self._layers is None:
            return out | {"layout": None}
        a, b = self._layers
        return out | {
            "layout": {"a": a.as_json(), "b": None if b is None else b.as_json()},
            "tensors": {k: v.clone() for k, v in self._state.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_header(state)
        if state.get("kernel") != self.kernel or dict(state.get("kernel_params", {})) != self.kernel_params:
            raise RepsimError(f"the state was saved with kernel={state.get('kernel')!r} {state.get('kernel_params')}.")
        self.reset()
        layout = state.get("layout")
        if layout is not None:
            a = _Layout(tuple(layout["a"][0]), tuple(int(x) for x in layout["a"][1]))
            b = None if layout["b"] is None else _Layout(tuple(layout["b"][0]), tuple(int(x) for x in layout["b"][1]))
            self._layers = (a, b)
            self.same = b is None
            self._state = {k: v.to(_F64).clone() for k, v in state["tensors"].items()}
        self.batches, self.n = int(state["batches"]), int(state["n"])
        self._reduced = bool(state.get("reduced", False))


def _self_hsic(K: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC(K_l, K_l) for each stacked Gram (L, m, m) -> (L,)."""
    return torch.stack([_unbiased_hsic_table(K[i : i + 1], K[i : i + 1])[0, 0] for i in range(K.shape[0])])


# --- torchmetrics ---------------------------------------------------------------------------------------------------


class _ChanMerge:
    """``dist_reduce_fx`` for the packed state: merges stacked per-rank (or global + local) states exactly."""

    def __init__(self, a: _Layout, b: _Layout, debiased: bool) -> None:
        self.a, self.b, self.debiased = a, b, debiased

    def __call__(self, stacked: torch.Tensor) -> torch.Tensor:
        rows = stacked.reshape(-1, stacked.shape[-1])
        acc = _Moments.unpack(rows[0], self.a, self.b, self.debiased)
        for row in rows[1:]:
            acc.merge_(_Moments.unpack(row, self.a, self.b, self.debiased))
        return acc.pack()


_TORCHMETRICS_CLASS: type | None = None


def _make_torchmetrics_class() -> type:
    try:
        from torchmetrics import Metric
    except ImportError as err:  # pragma: no cover - torchmetrics is a dev dependency
        raise ModuleNotFoundError(
            "TorchmetricsLinearCKA needs torchmetrics: pip install torchmetrics (or use streaming.LinearCKA)."
        ) from err

    class TorchmetricsLinearCKA(Metric):
        """Exact streaming linear CKA as a ``torchmetrics.Metric`` (DDP sync, ``MetricCollection``, Lightning).

        Feature dimensions are fixed at construction (torchmetrics states need their shapes up front). The whole
        sufficient statistic lives in one float64 state ``stats``; its ``dist_reduce_fx`` is an exact Chan merge of
        the gathered per-rank states, not ``"sum"``: centered moments of different shards are not additive, and a
        shift shared by all ranks would need communication inside ``update``. ``forward`` returns the batch's own
        CKA (a batch needs >= 2 rows, >= 4 debiased) and merges the batch into the running state.
        """

        is_differentiable = False
        higher_is_better = True
        full_state_update = False

        def __init__(self, num_features_x: int, num_features_y: int, debiased: bool = False, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            for name, value in (("num_features_x", num_features_x), ("num_features_y", num_features_y)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise RepsimError(f"{name} must be a positive int, got {value!r}.")
            self.debiased = _check_debiased(debiased)
            self._lay_x = _Layout(("X",), (num_features_x,))
            self._lay_y = _Layout(("Y",), (num_features_y,))
            empty = _Moments(self._lay_x, self._lay_y, self.debiased, torch.device("cpu")).pack()
            self.add_state("stats", default=empty, dist_reduce_fx=_ChanMerge(self._lay_x, self._lay_y, self.debiased))

        def _moments(self) -> _Moments:
            return _Moments.unpack(self.stats, self._lay_x, self._lay_y, self.debiased)

        def update(self, X: Any, Y: Any) -> None:
            X, Y = check_matrix(X, "X"), check_matrix(Y, "Y")
            _check_same_rows([(lambda _: "X", {"X": X}), (lambda _: "Y", {"Y": Y})])
            for name, t, lay in (("X", X, self._lay_x), ("Y", Y, self._lay_y)):
                if t.shape[1] != lay.total:
                    raise InputShapeError(
                        f"{name} has {t.shape[1]} features; this metric was built for {lay.total} "
                        f"(num_features_{name.lower()})."
                    )
            m = self._moments()
            device = self.stats.device
            with torch.no_grad():
                m.update_(X.detach().to(device, _F64), Y.detach().to(device, _F64))
            self.stats = m.pack()

        def compute(self) -> torch.Tensor:
            m = self._moments()
            with torch.no_grad():
                return m.cka((lambda _: "X", lambda _: "Y"))[0, 0]

    # picklable: the class is found again as repsim_plugin.streaming.TorchmetricsLinearCKA (module __getattr__)
    TorchmetricsLinearCKA.__module__ = __name__
    TorchmetricsLinearCKA.__qualname__ = "TorchmetricsLinearCKA"
    return TorchmetricsLinearCKA


def __getattr__(name: str) -> Any:
    global _TORCHMETRICS_CLASS
    if name == "TorchmetricsLinearCKA":
        if _TORCHMETRICS_CLASS is None:
            _TORCHMETRICS_CLASS = _make_torchmetrics_class()
        return _TORCHMETRICS_CLASS
    raise AttributeError(f"module 'repsim_plugin.streaming' has no attribute {name!r}")
