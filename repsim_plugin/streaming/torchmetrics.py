"""Exact streaming linear CKA as a ``torchmetrics.Metric`` (torchmetrics is optional).

This module imports torchmetrics; ``repsim_plugin.streaming`` imports it only when ``TorchmetricsLinearCKA`` is
first asked for, so that importing the streaming package never imports torchmetrics.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchmetrics import Metric

from .._utils.checks import Bool, Where, check_params
from .._utils.inputs import check_matrix
from ..errors import InputShapeError
from ._moments import _Moments
from ._rows import F64, _Layout, check_same_rows, label_x, label_y

__all__ = ["TORCHMETRICS_LINEAR_CKA_PARAMS", "TorchmetricsLinearCKA"]

_POSITIVE_INT = Where(
    lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive int", bad=(0, True, 2.5)
)
TORCHMETRICS_LINEAR_CKA_PARAMS = {"num_features_x": _POSITIVE_INT, "num_features_y": _POSITIVE_INT, "debiased": Bool()}


def pack(m: _Moments) -> torch.Tensor:
    """The whole state as one flat float64 tensor: ``n``, then every statistic of :meth:`_Moments.spec`."""
    keys = [k for k, *_ in m.spec(m.a, m.b, m.debiased)]
    n = torch.tensor([float(m.n)], dtype=F64, device=m.device)
    return torch.cat([n] + [m.t[k].reshape(-1) for k in keys])


def unpack(flat: torch.Tensor, a: _Layout, b: _Layout | None, debiased: bool) -> _Moments:
    """The inverse of :func:`pack`."""
    tensors, off = {}, 1
    for key, shape, _, _ in _Moments.spec(a, b, debiased):
        size = math.prod(shape)
        tensors[key] = flat[off : off + size].reshape(shape).clone()
        off += size
    return _Moments.from_tensors(a, b, debiased, round(float(flat[0])), tensors)


class _ChanMerge:
    """``dist_reduce_fx`` for the packed state: merges stacked per-rank (or global + local) states exactly."""

    def __init__(self, a: _Layout, b: _Layout, debiased: bool) -> None:
        self.a, self.b, self.debiased = a, b, debiased

    def __call__(self, stacked: torch.Tensor) -> torch.Tensor:
        rows = stacked.reshape(-1, stacked.shape[-1])
        acc = unpack(rows[0], self.a, self.b, self.debiased)
        for row in rows[1:]:
            acc.merge_(unpack(row, self.a, self.b, self.debiased))
        return pack(acc)


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
    stats: torch.Tensor  # the packed moments (see pack)

    def __init__(self, num_features_x: int, num_features_y: int, debiased: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_params(
            TORCHMETRICS_LINEAR_CKA_PARAMS,
            num_features_x=num_features_x,
            num_features_y=num_features_y,
            debiased=debiased,
        )
        self.debiased = debiased
        self._lay_x = _Layout(("X",), (num_features_x,))
        self._lay_y = _Layout(("Y",), (num_features_y,))
        empty = pack(_Moments(self._lay_x, self._lay_y, self.debiased, torch.device("cpu")))
        self.add_state("stats", default=empty, dist_reduce_fx=_ChanMerge(self._lay_x, self._lay_y, self.debiased))

    def _moments(self) -> _Moments:
        return unpack(self.stats, self._lay_x, self._lay_y, self.debiased)

    def update(self, X: Any, Y: Any) -> None:
        X, Y = check_matrix(X, "X"), check_matrix(Y, "Y")
        check_same_rows([(label_x, {"X": X}), (label_y, {"Y": Y})])
        for name, t, lay in (("X", X, self._lay_x), ("Y", Y, self._lay_y)):
            if t.shape[1] != lay.total:
                raise InputShapeError(
                    f"{name} has {t.shape[1]} features; this metric was built for {lay.total} "
                    f"(num_features_{name.lower()})."
                )
        m = self._moments()
        device = self.stats.device
        with torch.no_grad():
            m.update_(X.detach().to(device), Y.detach().to(device))  # upcast a chunk of rows at a time
        self.stats = pack(m)

    def compute(self) -> torch.Tensor:
        m = self._moments()
        with torch.no_grad():
            return m.cka((label_x, label_y))[0, 0]
