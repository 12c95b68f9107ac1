"""Exact float64 statistics of linear CKA: moments around a center that follows the running mean.

The state is a set of float64 moments of the rows around a stored center ``c`` (near the running mean):
``n``, the first moments ``F = sum(x - c)``, the comoments ``C = sum (x - c)(y - c)^T`` (per layer ``X^T X``, per
pair ``X_a^T X_b``) and, for the debiased form, ``Q = sum ||x~||^2 ||y~||^2`` and the third-order vectors
``U = sum ||x~||^2 y~``, ``V = sum ||y~||^2 x~``. Moving the center by ``delta`` is an exact polynomial identity
(see :meth:`_Moments.recenter_`). A batch is added around the center; the state moves to the running mean (Chan /
Welford) whenever some feature's mean has drifted from the center by more than its spread, and to the exact mean
at the end. Nothing is ever formed as ``X^T X - n mu mu^T`` around zero, so a large common offset (post-ReLU
activations, ``X + 1e4`` stored in float32) costs no accuracy, and the result is independent of batch size and
order.

**Distributed** (:meth:`_Moments.all_reduce_`): centered moments cannot be summed across ranks, raw sums around a
*common* shift can. The shift is agreed by one all-reduce of ``n`` and ``n * mean`` (the approximate global mean);
each rank moves its state to that shift (exact algebra) and every statistic tensor is then summed with exactly one
``all_reduce``. The first moments ``F`` travel too, so the rounding of the shift is corrected exactly when the
result is computed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._utils import dist
from ..errors import DegenerateInputError, TooFewSamplesError
from ._rows import F64, Label, _Layout, extremes, ratio_table, warn_bias

#: (key, shape, initial value, reduction) of one state tensor
Spec = tuple[str, tuple[int, ...], float, str]

#: Bytes of float64 rows (both sides) upcast at a time by an update; chunks have at least CHUNK_MIN_ROWS rows.
#: W3 (d = 256 a side, batches of 10k, AVX2 host, fresh processes, peak RSS at 20k -> 1M rows): whole batches
#: upcast 651 -> 652 MiB; chunks of 8 MiB 602-618 -> 632-661 MiB, of 2 MiB 597-613 -> 619 MiB, of 512 KiB
#: (128 rows) 574 -> 574 MiB in every run, at the same speed. One 10000 x (2048 + 1024) update: 2.05-2.23 s
#: for any chunk from 64 rows to the whole batch.
CHUNK_BYTES = 2**19
#: Fewest rows a chunk holds, so that wide layers still multiply in panels the BLAS runs at full speed.
CHUNK_MIN_ROWS = 128


def chunk_rows(width: int) -> int:
    """Rows of a batch of ``width`` features (both sides) upcast to float64 together."""
    return max(CHUNK_MIN_ROWS, CHUNK_BYTES // (8 * max(1, width)))


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


def _rank2(d: torch.Tensor, F: torch.Tensor, e: torch.Tensor, G: torch.Tensor, n: float) -> tuple[Any, Any]:
    """``C - F d_y^T - d_x F_y^T + n d_x d_y^T`` as one rank-2 update: ``[d_x, -F_x] [n d_y - F_y, d_y]^T``."""
    return torch.stack([d, -F], 1), torch.stack([n * e - G, e])


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
            key: torch.full(shape, fill, dtype=F64, device=device) for key, shape, fill, _ in self.spec(a, b, debiased)
        }

    @classmethod
    def from_tensors(
        cls, a: _Layout, b: _Layout | None, debiased: bool, n: int, tensors: dict[str, torch.Tensor]
    ) -> _Moments:
        """A state from saved tensors (``tensors`` must hold exactly the keys and shapes of :meth:`spec`)."""
        out = cls.__new__(cls)
        out.a, out.b, out.debiased, out.n = a, b, debiased, int(n)
        out.t = tensors
        return out

    # layout ---------------------------------------------------------------------------------------------------------
    @staticmethod
    def spec(a: _Layout, b: _Layout | None, debiased: bool) -> list[Spec]:
        """(key, shape, initial value, reduction) of every state tensor."""
        same = b is None
        out: list[Spec] = []
        for key, lay in [("a", a)] if b is None else [("a", a), ("b", b)]:
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
        bb = a if b is None else b
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

    def _b(self) -> _Layout:
        return self.a if self.b is None else self.b

    def grams(self, side: str) -> list[torch.Tensor]:
        lay = self.a if side == "a" else self._b()
        flat, out, off = self.t[f"{side}.grams"], [], 0
        for d in lay.dims:
            out.append(flat[off : off + d * d].view(d, d))
            off += d * d
        return out

    def diagonal(self, side: str) -> torch.Tensor:
        """Per feature of ``side``, the sum of squared deviations from the center (the comoments' diagonal)."""
        if self.same:
            return torch.diagonal(self.t["cross"])
        return torch.cat([g.diagonal() for g in self.grams(side)])

    def traces(self, side: str) -> torch.Tensor:
        """Per-layer trace of the comoment (sum of squared deviations from the center)."""
        return _segsum(self.diagonal(side), self.a if side == "a" else self._b(), 0)

    def mean(self, side: str) -> torch.Tensor:
        return self.t[f"{side}.center"] + self.t[f"{side}.first"] / self.n

    def clone(self, device: torch.device | None = None) -> _Moments:
        return _Moments.from_tensors(
            self.a, self.b, self.debiased, self.n, {k: v.to(device=device, copy=True) for k, v in self.t.items()}
        )

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
        kb = "a" if self.same else "b"
        da = delta_a
        db = da if delta_b is None else delta_b
        assert self.same == (delta_b is None), "a two-sided state moves both centers"
        if self.debiased:
            self._recenter_cross_debiased(da, db)
            if not self.same:
                for key, d in (("a", da), ("b", db)):
                    self._recenter_side_debiased(key, d)
        n = float(self.n)
        Fa, Fb = self.t["a.first"], self.t[f"{kb}.first"]
        self.t["cross"].addmm_(*_rank2(da, Fa, db, Fb, n))
        if not self.same:
            for key, d in (("a", da), ("b", db)):
                F = self.t[f"{key}.first"]
                for g, blk in zip(self.grams(key), (self.a if key == "a" else self._b()).blocks(), strict=True):
                    g.addmm_(*_rank2(d[blk], F[blk], d[blk], F[blk], n))
        Fa.sub_(da, alpha=n)
        self.t["a.center"].add_(da)
        if not self.same:
            Fb.sub_(db, alpha=n)
            self.t["b.center"].add_(db)

    def _recenter_cross_debiased(self, da: torch.Tensor, db: torch.Tensor) -> None:
        """The Q, U, V updates of :meth:`recenter_` (before C and F move)."""
        n, A, B, same = float(self.n), self.a, self._b(), self.same
        Fa, Fb = self.t["a.first"], self.t["a.first" if same else "b.first"]
        C = self.t["cross"]
        sA = self.traces("a")
        sB = sA if same else self.traces("b")
        alA, alB = _segsum(da * da, A, 0), _segsum(db * db, B, 0)
        fdA, fdB = _segsum(Fa * da, A, 0), _segsum(Fb * db, B, 0)
        PA = torch.stack([da[blk] @ C[blk, :] for blk in A.blocks()])  # (LA, DB): d_a^T C_ab
        U, Q = self.t["cross.u"], self.t["cross.quart"]
        V = U.T if same else self.t["cross.v"]
        Q += (
            -2.0 * _segsum(U * db, B, 1)  # d_b . U_ab
            - 2.0 * _segsum(V * da[:, None], A, 0)  # d_a . V_ab
            + 4.0 * _segsum(PA * db, B, 1)
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

    def _recenter_side_debiased(self, key: str, d: torch.Tensor) -> None:
        """The per-layer quart / third updates of one side (two-sided states only)."""
        n, lay = float(self.n), self.a if key == "a" else self._b()
        F = self.t[f"{key}.first"]
        s = self.traces(key)
        al, fd = _segsum(d * d, lay, 0), _segsum(F * d, lay, 0)
        Gd = torch.cat([g @ d[blk] for g, blk in zip(self.grams(key), lay.blocks(), strict=True)])
        third, quart = self.t[f"{key}.third"], self.t[f"{key}.quart"]
        quart += (
            -4.0 * _segsum(d * third, lay, 0)
            + 4.0 * _segsum(d * Gd, lay, 0)
            + 2.0 * al * s
            - 4.0 * al * fd
            + n * al * al
        )
        third += -_expand(s, lay) * d - 2.0 * Gd + 2.0 * _expand(fd, lay) * d + _expand(al, lay) * (F - n * d)

    def _move_to(self, new_a: torch.Tensor, new_b: torch.Tensor | None) -> None:
        self.recenter_(new_a - self.t["a.center"], None if new_b is None else new_b - self.t["b.center"])

    def finalize_(self) -> None:
        """Move the center to the exact mean (F = 0 up to rounding); the statistics are then centered moments."""
        if self.n:
            self.recenter_(self.t["a.first"] / self.n, None if self.same else self.t["b.first"] / self.n)

    # adding data ----------------------------------------------------------------------------------------------------
    def _add_rows_(self, XA: torch.Tensor, XB: torch.Tensor | None, found: list[torch.Tensor]) -> None:
        """Add rows' moments around the current center, upcast to float64 a chunk of rows at a time.

        Each chunk is centred into one float64 buffer per side, allocated once per update: the same blocks every
        chunk, so a long stream does not fragment the heap (W3's peak RSS stays flat to 1M rows).
        """
        two = not self.same
        sides = [("a", XA, self.a)] + ([("b", XA if XB is None else XB, self._b())] if two else [])
        for (key, _, _), ext in zip(sides, found, strict=True):
            torch.minimum(self.t[f"{key}.min"], ext[0], out=self.t[f"{key}.min"])
            torch.maximum(self.t[f"{key}.max"], ext[1], out=self.t[f"{key}.max"])
        b = XA.shape[0]
        step = min(b, chunk_rows(sum(X.shape[1] for _, X, _ in sides)))
        buffers = [torch.empty(step, X.shape[1], dtype=F64, device=self.device) for _, X, _ in sides]
        grams = {key: list(zip(self.grams(key), lay.blocks(), strict=True)) for key, _, lay in sides} if two else {}
        for i in range(0, b, step):
            centred = [
                torch.sub(X[i : i + step], self.t[f"{key}.center"], out=buf[: min(step, b - i)])
                for (key, X, _), buf in zip(sides, buffers, strict=True)
            ]
            self._add_chunk_(centred[0], centred[-1], grams)
        self.n += b

    def _add_chunk_(self, XhA: torch.Tensor, XhB: torch.Tensor, grams: dict[str, list[Any]]) -> None:
        """Add one centred chunk's sums (``XhB is XhA`` on one side; ``grams``: per side its (Gram, block) pairs)."""
        A, B = self.a, self._b()
        for key, Xh in [("a", XhA)] if self.same else [("a", XhA), ("b", XhB)]:
            self.t[f"{key}.first"] += Xh.sum(0)
            for g, blk in grams.get(key, ()):
                g.addmm_(Xh[:, blk].T, Xh[:, blk])
        self.t["cross"].addmm_(XhA.T, XhB)
        if self.debiased:
            RA = _segsum(XhA * XhA, A, 1)
            RB = RA if self.same else _segsum(XhB * XhB, B, 1)
            self.t["cross.quart"].addmm_(RA.T, RB)
            self.t["cross.u"].addmm_(RA.T, XhB)
            if not self.same:
                self.t["cross.v"].addmm_(XhA.T, RB)
                for key, Xh, R, lay in (("a", XhA, RA, A), ("b", XhB, RB, B)):
                    self.t[f"{key}.quart"] += (R * R).sum(0)
                    self.t[f"{key}.third"] += (Xh * _expand(R, lay)).sum(0)

    def update_(self, XA: torch.Tensor, XB: torch.Tensor | None, found: list[torch.Tensor] | None = None) -> None:
        """Add a batch around the current center; move the center to the running mean once it has drifted.

        The first batch sets the center to its mean. Later batches are added around the center as it is, and the
        state moves to the running mean (an exact identity, :meth:`recenter_`) only when some feature's mean has
        drifted from the center by more than its spread (:meth:`_drifted`). The rounding of every moment stays
        within a factor 2 (4 for the debiased fourth moments) of moments around the exact mean, as with a move
        every batch, while iid batches skip the move: for W2's two 1920-wide sides it cost 3 ms of each 23 ms
        update. ``found``: per side the (2, D) column minima and maxima of the batch (computed when not given).
        """
        b = XA.shape[0]
        if b == 0:
            return
        sides = [XA] if self.same or XB is None else [XA, XB]
        if found is None:
            found = extremes(sides)
        if self.n == 0:
            self.t["a.center"].copy_(XA.sum(0, dtype=F64) / b)
            if not self.same:
                self.t["b.center"].copy_((XA if XB is None else XB).sum(0, dtype=F64) / b)
        self._add_rows_(XA, XB, found)
        if self._drifted():
            self._move_to(self.mean("a"), None if self.same else self.mean("b"))

    def _drifted(self) -> bool:
        """Whether a feature's mean is further from the center than its spread: (mean - c)^2 > variance.

        With ``delta = mean - c`` the rounding of the sums around ``c`` grows with ``sum (x - c)^2 = n (var +
        delta^2)``; keeping ``delta^2 <= var`` bounds it by twice that around the mean. In the moments,
        ``F = n delta`` and the diagonal ``S = n (var + delta^2)``, so the test is ``2 F^2 > n S``. A constant
        feature (S = F = 0) never moves the center.
        """
        n = float(self.n)
        keys = ["a"] if self.same else ["a", "b"]
        return any(bool((2.0 * self.t[f"{k}.first"].square() > n * self.diagonal(k)).any()) for k in keys)

    def merge_(self, other: _Moments) -> None:
        """Add ``other``'s moments (same layout): both move to the merged mean, then their sums add."""
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
        d = dist.dist()
        dev = self.device
        parts = [torch.tensor([float(self.n)], dtype=F64, device=dev)]
        for key in ["a"] if self.same else ["a", "b"]:
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
            if shift_b is not None:
                self.t["b.center"].copy_(shift_b)
        ops = {"sum": d.ReduceOp.SUM, "min": d.ReduceOp.MIN, "max": d.ReduceOp.MAX}
        for key, _, _, kind in self.spec(self.a, self.b, self.debiased):
            if kind in ops:
                d.all_reduce(self.t[key], op=ops[kind], group=group)
        self.n = round(total)

    # the result -------------------------------------------------------------------------------------------------------
    def _check_varies(self, labels: tuple[Label, Label]) -> None:
        sides = [("a", self.a, labels[0])] if self.same else [("a", self.a, labels[0]), ("b", self._b(), labels[1])]
        for key, lay, label in sides:
            constant = self.t[f"{key}.max"] == self.t[f"{key}.min"]
            for name, blk in zip(lay.names, lay.blocks(), strict=True):
                if bool(constant[blk].all()):
                    raise DegenerateInputError(
                        f"{label(name)} has zero variance over all {self.n} samples: every sample has the same "
                        "representation, so CKA is undefined. Check that the layer depends on the input (a dead "
                        "ReLU, a constant input, a wrong output index)."
                    )

    def cka(self, labels: tuple[Label, Label]) -> torch.Tensor:
        """(LA, LB) linear CKA matrix from the centered moments (finalizes the center in place)."""
        n = self.n
        need = 4 if self.debiased else 2
        if n < need:
            raise TooFewSamplesError(
                f"{'debiased' if self.debiased else 'biased'} linear CKA needs at least {need} samples, the "
                f"accumulator has seen {n}. Update it with more rows first."
            )
        A, B = self.a, self._b()
        self._check_varies(labels)
        self.finalize_()
        C = self.t["cross"]
        crosssq = torch.stack([_segsum(C[blk, :].square().sum(0), B, 0) for blk in A.blocks()])
        if self.same:
            selfA = selfB = torch.diagonal(crosssq)
        else:
            selfA = torch.stack([g.square().sum() for g in self.grams("a")])
            selfB = torch.stack([g.square().sum() for g in self.grams("b")])
        if not self.debiased:
            warn_bias(n, A, B)
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
        return ratio_table(xy, xx, yy, ((A.names, labels[0]), (B.names, labels[1])))
