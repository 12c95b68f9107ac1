"""Reduction policies: pure functions that turn one layer output into (rows, features).

A reduction *policy* is one small function in a registry: ``@token_policy("mean")`` reduces (batch, tokens,
channels) outputs, ``@spatial_policy("flatten")`` reduces spatial maps. Adding a policy is adding one function::

    @token_policy("max", rows="input")
    def max_over_tokens(batch: TokenBatch) -> torch.Tensor:
        return batch.tensor.masked_fill(~batch.body.unsqueeze(-1), float("-inf")).amax(dim=1)

after which ``rp.capture(model, layers, tokens="max")`` uses it and :data:`TOKEN_POLICIES` lists it.
:data:`TOKEN_POLICIES` and :data:`SPATIAL_POLICIES` are live, read-only views of the registries (not snapshots),
so a name registered later, by anyone, is listed (and accepted) by every module that imported them earlier.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch

from repsim_plugin._utils.suggest import did_you_mean
from repsim_plugin.adapters import LAYOUTS
from repsim_plugin.errors import (
    DegenerateInputError,
    InputDtypeError,
    InputShapeError,
    NonFiniteInputError,
    RepsimError,
    UnknownNameError,
)

from .outputs import RANK

__all__ = [
    "SPATIAL_POLICIES",
    "TOKEN_POLICIES",
    "Policy",
    "PolicyRegistry",
    "SpatialBatch",
    "TokenBatch",
    "reduce_output",
    "rows_unit",
    "spatial_policy",
    "token_policy",
]


# ----------------------------------------------------------------------------------------------------------------
# what a policy gets
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenBatch:
    """One (batch, tokens, channels) output and what the token policies need to reduce it.

    Attributes:
        tensor: the output, floating point (float16 / bfloat16 already upcast to float32).
        real: (batch, tokens) bool, True for real (unpadded) tokens, prefix tokens included.
        prefix_tokens: leading tokens (CLS, registers) that ``mean``, ``flatten`` and ``as_samples`` leave out.
        where: ``"layer 'name'"`` (or ``"the output"``), for error messages.
    """

    tensor: torch.Tensor
    real: torch.Tensor
    prefix_tokens: int
    where: str

    @property
    def body(self) -> torch.Tensor:
        """``real`` with the prefix positions switched off: the tokens that are averaged / kept as rows."""
        body = self.real.clone()
        body[:, : min(self.prefix_tokens, body.shape[1])] = False
        return body

    def require_a_real_token(self) -> None:
        """Raise :class:`DegenerateInputError` naming the sequences that are all padding."""
        has_real = self.real.any(dim=1)
        if not bool(has_real.all()):
            empty = torch.nonzero(~has_real).flatten().tolist()
            raise DegenerateInputError(f"{self.where}: sequences {empty} have no real token (all padding)")


@dataclass(frozen=True)
class SpatialBatch:
    """One spatial map in NCHW order (channels-last maps are permuted first) and where it comes from."""

    tensor: torch.Tensor
    where: str


# ----------------------------------------------------------------------------------------------------------------
# the registries
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    """A registered reduction: its name, the function, and what one row of its result is.

    ``rows`` is recorded in :attr:`Recorder.policy`: ``"input"`` (one row per input), ``"token"`` or
    ``"position"`` (one row per token / spatial position: rows are no longer the inputs).
    """

    name: str
    reduce: Callable[[Any], torch.Tensor]
    rows: str = "input"


class PolicyNames(Sequence[str]):
    """A live, read-only view of a registry's names in registration order; compares equal to a tuple of them."""

    def __init__(self, policies: Mapping[str, Policy]) -> None:
        self._policies = policies

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return tuple(self._policies)[index]

    def __len__(self) -> int:
        return len(self._policies)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._policies))

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._policies
        except TypeError:  # an unhashable value is no policy name
            return False

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __repr__(self) -> str:
        return repr(tuple(self))


class PolicyRegistry:
    """Named reductions of one kind; calling it with a name gives the decorator that registers a function."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._policies: dict[str, Policy] = {}
        #: live view of the registered names (see :data:`TOKEN_POLICIES`)
        self.names = PolicyNames(self._policies)

    def __call__(
        self, name: str, *, rows: str = "input", replace: bool = False
    ) -> Callable[[Callable[[Any], torch.Tensor]], Callable[[Any], torch.Tensor]]:
        """``@token_policy("name", rows="input")``: register the decorated function under ``name``."""
        if not isinstance(name, str) or not name:
            raise RepsimError(f"a {self.kind} name must be a non-empty string, got {name!r}.")
        if rows not in ("input", "token", "position"):
            raise RepsimError(f"rows must be one of 'input', 'token', 'position', got {rows!r}.")
        if name in self._policies and not replace:
            raise RepsimError(f"a {self.kind} named {name!r} is already registered; pass replace=True to replace it")

        def register(function: Callable[[Any], torch.Tensor]) -> Callable[[Any], torch.Tensor]:
            self._policies[name] = Policy(name, function, rows)
            return function

        return register

    def unregister(self, name: str) -> None:
        """Remove a registered policy (for tests and plugins that clean up after themselves)."""
        self.get(name)
        del self._policies[name]

    def get(self, name: str) -> Policy:
        """The policy registered as ``name``; an unknown name lists the known ones and the closest."""
        if name not in self.names:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names)}.{did_you_mean(name, self.names)}"
            )
        return self._policies[name]


#: Register a reduction of (batch, tokens, channels) outputs: ``@token_policy("name")`` over ``f(TokenBatch)``.
token_policy = PolicyRegistry("tokens policy")
#: Register a reduction of spatial maps: ``@spatial_policy("name")`` over ``f(SpatialBatch)`` (NCHW).
spatial_policy = PolicyRegistry("spatial policy")

#: Reductions of (batch, tokens, channels) outputs. ``mean``: average of the real (unpadded, non-prefix) tokens;
#: ``cls``: the first real token; ``last``: the last real token (right or left padding); ``flatten``: all
#: non-prefix tokens concatenated (needs unpadded, equal-length sequences); ``as_samples``: every real
#: non-prefix token is a row. A live view: policies registered later are listed too.
TOKEN_POLICIES: Sequence[str] = token_policy.names

#: Reductions of spatial maps. ``flatten``: C*H*W features in NCHW order (channels-last maps are converted first,
#: so equal features give equal columns); ``mean``: global average pool to C; ``as_samples``: every position
#: is a row of C features. A live view, like :data:`TOKEN_POLICIES`.
SPATIAL_POLICIES: Sequence[str] = spatial_policy.names


# ----------------------------------------------------------------------------------------------------------------
# the built-in policies (registration order is the order of TOKEN_POLICIES / SPATIAL_POLICIES)
# ----------------------------------------------------------------------------------------------------------------
@token_policy("mean")
def _tokens_mean(batch: TokenBatch) -> torch.Tensor:
    body = batch.body
    counts = body.sum(dim=1)
    if not bool((counts > 0).all()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise DegenerateInputError(
            f"{batch.where}: sequences {empty} have no real token after {batch.prefix_tokens} prefix tokens, so "
            "their mean is undefined; drop empty inputs or use tokens='cls'"
        )
    tensor = batch.tensor
    summed = torch.where(body.unsqueeze(-1), tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))
    return summed.sum(dim=1) / counts.unsqueeze(-1).to(tensor.dtype)


def _pick_token(batch: TokenBatch, index: torch.Tensor) -> torch.Tensor:
    return batch.tensor[torch.arange(batch.tensor.shape[0], device=batch.tensor.device), index]


@token_policy("cls")
def _tokens_cls(batch: TokenBatch) -> torch.Tensor:
    batch.require_a_real_token()
    length = batch.tensor.shape[1]
    positions = torch.arange(length, device=batch.tensor.device)
    return _pick_token(batch, torch.where(batch.real, positions, length).amin(dim=1))


@token_policy("last")
def _tokens_last(batch: TokenBatch) -> torch.Tensor:
    batch.require_a_real_token()
    positions = torch.arange(batch.tensor.shape[1], device=batch.tensor.device)
    return _pick_token(batch, torch.where(batch.real, positions, -1).amax(dim=1))


@token_policy("flatten")
def _tokens_flatten(batch: TokenBatch) -> torch.Tensor:
    if not bool(batch.real.all()):
        raise InputShapeError(
            f"tokens='flatten' needs sequences of equal length, but {batch.where} has padded positions; use "
            "tokens='mean', 'last' or 'as_samples', or batch sequences of one length without padding"
        )
    return batch.tensor[:, batch.prefix_tokens :].reshape(batch.tensor.shape[0], -1)


@token_policy("as_samples", rows="token")
def _tokens_as_samples(batch: TokenBatch) -> torch.Tensor:
    return batch.tensor[batch.body]


@spatial_policy("flatten")
def _spatial_flatten(maps: SpatialBatch) -> torch.Tensor:
    return maps.tensor.reshape(maps.tensor.shape[0], -1)


@spatial_policy("mean")
def _spatial_mean(maps: SpatialBatch) -> torch.Tensor:
    return maps.tensor.mean(dim=(2, 3))


@spatial_policy("as_samples", rows="position")
def _spatial_as_samples(maps: SpatialBatch) -> torch.Tensor:
    return maps.tensor.permute(0, 2, 3, 1).reshape(-1, maps.tensor.shape[1])


# ----------------------------------------------------------------------------------------------------------------
# reduction
# ----------------------------------------------------------------------------------------------------------------
def rows_unit(layout: str | None, tokens: str, spatial: str) -> str:
    """What one row of a layer's reduced output is ("input", "token" or "position"), from the policy used."""
    if layout == "NLC":
        return token_policy.get(tokens).rows
    if layout in ("NCHW", "NHWC"):
        return spatial_policy.get(spatial).rows
    return "input"


def _real_tokens(tensor: torch.Tensor, mask: torch.Tensor | None, where: str) -> torch.Tensor:
    batch, length, _ = tensor.shape
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=tensor.device)
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] != length:
        raise InputShapeError(
            f"{where} has {batch} sequences of {length} tokens but the attention mask has shape "
            f"{tuple(mask.shape)}; pass attention_mask= with shape (batch, tokens) for this layer, or "
            "capture layers that see the masked sequence"
        )
    if mask.is_floating_point() and not bool(torch.isfinite(mask).all()):
        raise NonFiniteInputError(
            f"the attention mask of {where} holds NaN or Inf; pass a mask of 0 (padding) and 1 (real token)"
        )
    return mask.to(device=tensor.device) != 0


def _floating(tensor: torch.Tensor, where: str) -> torch.Tensor:
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise InputDtypeError(
            f"{where} has dtype {tensor.dtype}; only floating-point activations can be compared — select a float "
            "output with output=..."
        )
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor


def reduce_output(
    tensor: torch.Tensor,
    layout: str | None,
    *,
    tokens: str = "mean",
    spatial: str = "flatten",
    mask: torch.Tensor | None = None,
    prefix_tokens: int = 0,
    layer: str = "",
) -> torch.Tensor:
    """Reduce one layer output to rows of features (see :data:`TOKEN_POLICIES` and :data:`SPATIAL_POLICIES`).

    ``layout`` None means the tensor is already (batch, features). ``mask`` is a (batch, tokens) padding mask
    (nonzero = real token) used by the token policies; ``prefix_tokens`` leading tokens (CLS, registers) are left
    out of ``mean``, ``flatten`` and ``as_samples``. float16 / bfloat16 are upcast to float32 before any sum.
    """
    where = f"layer {layer!r}" if layer else "the output"
    tensor = _floating(tensor, where)
    if layout is None:
        if tensor.dim() != 2:
            raise InputShapeError(f"{where} has shape {tuple(tensor.shape)}; layout None needs (batch, features)")
        return tensor
    if layout not in RANK:
        raise UnknownNameError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if tensor.dim() != RANK[layout]:
        raise InputShapeError(f"{where} has shape {tuple(tensor.shape)}, which is not {layout}")
    if layout == "NLC":
        token_reduction = token_policy.get(tokens)
        return token_reduction.reduce(TokenBatch(tensor, _real_tokens(tensor, mask, where), prefix_tokens, where))
    spatial_reduction = spatial_policy.get(spatial)
    if layout == "NHWC":
        tensor = tensor.permute(0, 3, 1, 2)
    return spatial_reduction.reduce(SpatialBatch(tensor, where))
