"""Minibatch CKA (Nguyen, Raghu & Kornblith 2021): summed unbiased HSICs of each batch, normalized at the end.

It is its own estimator, not full-data CKA: close, not equal. Every batch counts equally, whatever its size (use
equal batch sizes), and each needs at least :attr:`MinibatchCKAMap.min_batch_rows` rows (unbiased HSIC). Any kernel
of ``measures.kernels.KERNELS`` works, since only each batch's Grams are formed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from .._utils.checks import check_params
from .._utils.inputs import check_matrix
from ..errors import RepsimError, TooFewSamplesError
from ..measures.kernels import (
    KERNEL_PARAMS,
    KERNELS,
    cka_from_hsic,
    hsic_unbiased,
    hsic_unbiased_table,
    resolve_kernel,
)
from ..measures.mixed import deviation_gram64
from ._reductions import COUNT, SUM, SUM3
from ._rows import (
    F64,
    Acts,
    _Layout,
    check_same_rows,
    label_a,
    label_b,
    label_x,
    label_y,
    order_like,
    ratio_table,
    self_hsic,
)
from .base import SAME, Accumulator, MapAccumulator, Maps

__all__ = ["MINIBATCH_CKA_MAP_PARAMS", "MINIBATCH_ROWS", "MinibatchCKA", "MinibatchCKAMap"]

MINIBATCH_CKA_MAP_PARAMS = {"same": SAME}
#: unbiased HSIC needs 4 rows, so every batch of minibatch CKA does
MINIBATCH_ROWS = 4


def kernel_config(kernel: Any, kernel_params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Validated kernel name and its full parameters (defaults filled in), as the CKA measures resolve them."""
    params = {"kernel": kernel, **kernel_params}
    name, full = resolve_kernel(params)
    if params:  # what resolve_kernel leaves is not the kernel's, and nothing else here takes parameters
        accepted = sorted(KERNEL_PARAMS.get(name, {}))
        raise RepsimError(
            f"kernel {name!r} takes no parameter(s) {sorted(params)}"
            + (f"; it accepts {accepted}." if accepted else ".")
            + (" Pass kernel='rbf' to use sigma." if "sigma" in params else "")
        )
    return name, full


def check_batch_rows(b: int) -> None:
    if b < MINIBATCH_ROWS:
        raise TooFewSamplesError(
            f"minibatch CKA needs at least {MINIBATCH_ROWS} rows per batch (unbiased HSIC), got a batch of {b}. Use "
            "larger batches, or drop the last short batch (DataLoader(..., drop_last=True))."
        )


def _no_sums() -> torch.Tensor:
    """What a rank that saw no batch contributes to the all-reduced sums."""
    return torch.zeros(3, dtype=F64)


class _Kernel:
    """The kernel options shared by both minibatch accumulators (saved in the state dict, checked on merge)."""

    kernel: str
    kernel_params: dict[str, Any]

    def _options(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "kernel_params": dict(self.kernel_params)}

    def _describe(self, options: Mapping[str, Any]) -> str:
        return f"kernel={options.get('kernel')!r} {options.get('kernel_params')}"

    def _grams(self, tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Stacked (L, b, b) float64 Grams of one batch, one per layer."""
        gram = KERNELS[self.kernel]
        return torch.stack(
            [
                _linear_gram_mixed(t.detach().to(device))
                if self.kernel == "linear" and not getattr(self, "full_float64", False) and _mixed(t)
                else gram(t.detach().to(device, F64), **self.kernel_params)
                for t in tensors
            ]
        )


#: b^2 d from which a batch's float32 Gram (:func:`_linear_gram_mixed`) beats its float64 one. Lower than the
#: one-shot measures' ``mixed.MIXED_MIN_FLOPS``: a map forms a Gram per layer and batch, so the float64 ones add up
#: (W2's minibatch map: 64 of 2048- and 4096-feature layers). Best of 5, AVX2 host, float32 against float64 ms:
#: b = 128, d = 1024: 0.49 / 0.64; b = 64, d = 4096: 0.52 / 2.2; b = 256, d = 256: 0.57 / 0.49 (2^24 each).
MINIBATCH_MIXED_MIN_FLOPS = 2**24


def _mixed(t: torch.Tensor) -> bool:
    """Float32 / half rows of a batch large enough for float32 products to pay (``MINIBATCH_MIXED_MIN_FLOPS``)."""
    b, d = t.shape
    return t.dtype in (torch.float32, torch.float16, torch.bfloat16) and b * b * d >= MINIBATCH_MIXED_MIN_FLOPS


def _linear_gram_mixed(t: torch.Tensor) -> torch.Tensor:
    """Linear Gram of a batch from float32 deviations (correctly rounded), exact diagonal, in float64.

    The deviations are from the batch's float32 mean, not exactly centred: the unbiased HSIC that minibatch CKA
    sums is exactly invariant to translating the rows, so that residue changes nothing but rounding (~1e-9).
    """
    X = t.to(torch.float32)
    D = X - X.mean(0, keepdim=True)
    return deviation_gram64(D)


class MinibatchCKA(_Kernel, Accumulator):
    """Minibatch CKA (Nguyen, Raghu & Kornblith 2021) of one pair, with any kernel of ``kernels.KERNELS``.

    Each batch adds unbiased HSIC(K, L), HSIC(K, K), HSIC(L, L) of its own Grams; ``compute()`` is
    ``sum_xy / sqrt(sum_xx sum_yy)``. Per-batch CKA values are never averaged. Every batch counts equally, whatever
    its size (use equal batch sizes). It estimates a different quantity from full-data CKA: close, not equal.
    """

    _kind = "MinibatchCKA"
    min_batch_rows: ClassVar[int] = MINIBATCH_ROWS
    batches: int
    n: int
    sums: torch.Tensor | None  # [xy, xx, yy]

    def __init__(self, kernel: str = "linear", *, process_group: Any = None, **kernel_params: Any) -> None:
        super().__init__(process_group=process_group)
        self.kernel, self.kernel_params = kernel_config(kernel, kernel_params)
        self.add_state("batches", 0, COUNT)
        self.add_state("n", 0, COUNT)
        self.add_state("sums", None, SUM3, blank=_no_sums)

    def _has_data(self) -> bool:
        return self.sums is not None

    def update(self, X: Any, Y: Any) -> None:
        """Add one batch (at least 4 rows) of X (b, p) and Y (b, q)."""
        self._check_not_reduced("update")
        X, Y = check_matrix(X, "X"), check_matrix(Y, "Y")
        b = check_same_rows([(label_x, {"X": X}), (label_y, {"Y": Y})])
        check_batch_rows(b)
        device = self.sums.device if self.sums is not None else self._device or X.device
        with torch.no_grad():
            K, L = self._grams([X, Y], device)
            batch = torch.stack([hsic_unbiased(K, L), hsic_unbiased(K, K), hsic_unbiased(L, L)])
        self.sums = batch if self.sums is None else self.sums + batch
        self.batches += 1
        self.n += b

    def _compute_local(self) -> torch.Tensor:
        if self.batches == 0 or self.sums is None:
            raise TooFewSamplesError("MinibatchCKA.compute: no batch has been added yet; call update first.")
        return cka_from_hsic(self.sums[0], self.sums[1], self.sums[2])

    def __repr__(self) -> str:
        return f"MinibatchCKA(kernel={self.kernel!r}, {self.kernel_params}, batches={self.batches}, n={self.n})"


class MinibatchCKAMap(_Kernel, MapAccumulator):
    """Minibatch CKA for every layer pair: each layer's batch Gram is formed once per batch and shared by its pairs.

    ``same`` as in :class:`LinearCKAMap`. State: per layer the summed self-HSIC, per pair the summed cross-HSIC,
    and the batch / sample counts. Transient memory per update: O((La + Lb) b^2) float64 Grams.
    """

    _kind = "MinibatchCKAMap"
    min_batch_rows: ClassVar[int] = MINIBATCH_ROWS
    batches: int
    n: int
    _hsic: dict[str, torch.Tensor]  # "cross" (La, Lb); two sides: "self_a" (La,), "self_b" (Lb,)

    def __init__(
        self, kernel: str = "linear", *, same: bool | None = None, process_group: Any = None, **kernel_params: Any
    ) -> None:
        check_params(MINIBATCH_CKA_MAP_PARAMS, same=same)
        super().__init__(same=same, process_group=process_group)
        self.kernel, self.kernel_params = kernel_config(kernel, kernel_params)
        #: set by an engine whose maps share sides (``compare_checkpoints``) for one batch: a cache of each side's
        #: batch Grams and self-HSICs shared by its maps, and the keys of this map's two sides in it; the same rows
        #: give the same Grams, so each side's are formed once a batch instead of once per map (not part of the state)
        self.shared_grams: dict[Any, torch.Tensor] | None = None
        self.side_keys: tuple[Any, Any] | None = None
        self.add_state("batches", 0, COUNT)
        self.add_state("n", 0, COUNT)
        self.add_state("_hsic", dict, SUM, key="tensors")

    @staticmethod
    def memory_bytes(batch_size: int, n_layers_a: int, n_layers_b: int | None = None) -> int:
        """Transient float64 Grams of one update plus the (tiny) state."""
        layers = n_layers_a + (n_layers_b or 0)
        return 8 * (layers * int(batch_size) ** 2 + n_layers_a * (n_layers_b or n_layers_a) + layers)

    @classmethod
    def memory_needed(cls, maps: Maps, *, n: int | None, batch_size: int, itemsize: int, **options: Any) -> int | None:
        """One update's Grams and the HSIC sums of every map (independent of n)."""
        return sum(cls.memory_bytes(batch_size, len(da), None if db is None else len(db)) for da, db in maps)

    def update(self, acts_a: Acts, acts_b: Acts | None = None) -> None:
        """Add one batch (at least :attr:`min_batch_rows` rows) of every layer."""
        A, B, groups = self._validate_update(acts_a, acts_b)
        b = check_same_rows(groups)
        check_batch_rows(b)
        la, lb = self._layouts(A, B)
        device = self._state_device() or self._device or next(iter(A.values())).device
        with torch.no_grad():
            KA, key_a = self._side_grams(order_like(A, la, "acts_a"), la, 0, device)
            if B is None or lb is None:
                batch = {"cross": hsic_unbiased_table(KA, KA, symmetric=True)}
            else:
                KB, key_b = self._side_grams(order_like(B, lb, "acts_b"), lb, 1, device)
                batch = {"cross": hsic_unbiased_table(KA, KB, symmetric=True), "self_a": self._self_hsic(KA, key_a)}
                batch["self_b"] = self._self_hsic(KB, key_b)
        self._hsic = batch if not self._hsic else {k: v + batch[k] for k, v in self._hsic.items()}
        self._layout = (la, lb)
        self.batches += 1
        self.n += b

    def _side_grams(
        self, tensors: list[torch.Tensor], layout: _Layout, k: int, device: torch.device
    ) -> tuple[torch.Tensor, Any]:
        """One side's stacked batch Grams and its key in ``shared_grams`` (None when not shared), taken from there
        where another map of the same engine formed them this batch, and left there for the maps after it."""
        key = None
        if self.shared_grams is not None and self.side_keys is not None:
            options = (self.kernel, repr(sorted(self.kernel_params.items())), getattr(self, "full_float64", False))
            key = (self.side_keys[k], layout.names, options, str(device))
        return self._shared(key, lambda: self._grams(tensors, device)), key

    def _self_hsic(self, K: torch.Tensor, key: Any) -> torch.Tensor:
        """Unbiased HSIC(K_l, K_l) of a side's batch Grams, shared like the Grams (see :meth:`_side_grams`)."""
        return self._shared(None if key is None else (key, "self"), lambda: self_hsic(K))

    def _shared(self, key: Any, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``make()``, or what another map of the same engine made under ``key`` this batch (None: not shared)."""
        cache = self.shared_grams
        if cache is None or key is None:
            return make()
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def _check_shapes(self) -> None:
        if self._layout is None:
            if self._hsic or self.batches or self.n:
                raise ValueError("sums or counts without a layout")
            return
        la, lb = self._layout
        na, nb = la.n_layers, (la if lb is None else lb).n_layers
        shapes = {"cross": (na, nb)} if lb is None else {"cross": (na, nb), "self_a": (na,), "self_b": (nb,)}
        if set(self._hsic) != set(shapes):
            raise ValueError(f"'tensors' must hold {sorted(shapes)}, got {sorted(self._hsic)}")
        for key, shape in shapes.items():
            if tuple(self._hsic[key].shape) != shape:
                raise ValueError(f"'tensors'[{key!r}] must have shape {shape}, got {tuple(self._hsic[key].shape)}")
        if self.batches < 1 or self.n < self.min_batch_rows * self.batches:
            raise ValueError(f"{self.batches} batches of {self.n} rows cannot have been added")

    def _compute_local(self) -> torch.Tensor:
        if self.batches == 0 or self._layout is None:
            raise TooFewSamplesError("MinibatchCKAMap.compute: no batch has been added yet; call update first.")
        cross = self._hsic["cross"]
        if self.same:
            diagonal = torch.diagonal(cross)
            return ratio_table(cross, diagonal, diagonal, [(self.layers_a, label_a), (self.layers_a, label_a)])
        names = [(self.layers_a, label_a), (self.layers_b, label_b)]
        return ratio_table(cross, self._hsic["self_a"], self._hsic["self_b"], names)
