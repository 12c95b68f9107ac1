"""Compare the layers of two models, or of several checkpoints, on the same data: layer x layer similarity maps.

The data flow is one pass over the data: every batch goes through each model once (hooks record every requested
layer at the same time), and every layer pair's statistics are updated from those rows. Linear CKA streams from
exact float64 sufficient statistics (memory O(d^2) per layer pair, never O(n d)); the estimator actually used is
chosen under a memory budget and recorded in the result, and an approximate choice is announced with a warning.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .capture import Recorder
from .errors import EstimatorChoiceWarning, MemoryBudgetError, RepsimError, UnknownNameError
from .measures import Measure, make
from .results import SimilarityMap
from .streaming import LinearCKAMap, MinibatchCKAMap, SampleSpaceCKAMap

__all__ = ["DEFAULT_MEMORY_BUDGET", "ESTIMATOR_CHOICES", "compare", "compare_checkpoints", "load_checkpoint"]

#: Default memory budget for statistics / kept activations: 4 GiB.
DEFAULT_MEMORY_BUDGET = 4 * 2**30
ESTIMATOR_CHOICES = ("auto", "feature_streaming", "sample_space", "minibatch", "captured")
MINIBATCH_MIN_ROWS = 4

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: int | float | str) -> int:
    """``4 * 2**30``, ``"4GiB"``, ``"512 MB"`` -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise RepsimError(f"memory_budget must be positive, got {value!r}.")
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise RepsimError(f"cannot read memory_budget {value!r}; give bytes (an int) or e.g. '4GiB', '512MB'.")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


# --- data plumbing ------------------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None


def _to_device(obj: Any, device: torch.device | None) -> Any:
    """Move the tensors of a batch's model inputs (a tensor, a mapping, a list or tuple of them) to ``device``."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):  # BatchEncoding and other mappings become plain dicts of keyword arguments
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _digest(h: Any, obj: Any) -> None:
    """Feed a batch's tensors (values, shapes, dtypes) into a hash, in a deterministic order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        for key in sorted(obj, key=str):
            h.update(str(key).encode())
            _digest(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _digest(h, item)
    else:
        h.update(repr(obj).encode())


def _batch_rows(rows: Mapping[str, torch.Tensor]) -> int:
    return int(next(iter(rows.values())).shape[0])


@dataclass
class _Side:
    """One model taking part in a comparison: its recorder and the rows of the current batch."""

    label: str
    model: nn.Module
    recorder: Recorder
    rows: dict[str, torch.Tensor] | None = None
    kept: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    stream: int = 0  # which data stream feeds this side (0: ``data``; 1: ``data_b``)
    n: int = 0

    def receive(self, rows: dict[str, torch.Tensor]) -> None:
        self.rows = dict(rows)


@dataclass(frozen=True)
class _Pair:
    """Side i's layers against side j's; ``sub_*`` restrict a side to some of its modules (None: all)."""

    i: int
    j: int
    sub_i: tuple[str, ...] | None = None
    sub_j: tuple[str, ...] | None = None

    @property
    def same(self) -> bool:
        return self.i == self.j and self.sub_i == self.sub_j


def _select(rows: Mapping[str, torch.Tensor], modules: tuple[str, ...] | None) -> dict[str, torch.Tensor]:
    """Rows of the layers recorded from ``modules`` (layer names may carry a ``#k`` call suffix)."""
    if modules is None:
        return dict(rows)
    return {name: t for name, t in rows.items() if name.split("#")[0] in modules}


# --- estimator choice ---------------------------------------------------------------------------------------------


def _linear_cka_kind(measure: Measure) -> tuple[bool, bool]:
    """(is linear CKA, debiased) for a measure of the CKA family."""
    params = dict(measure.params)
    is_cka = measure.spec.name == "cka"
    return is_cka and params.get("kernel") == "linear", params.get("hsic") == "song"


@dataclass
class _Plan:
    estimator: str
    reason: str
    memory: int


def choose_estimator(
    measure: Measure,
    dims: Sequence[tuple[Sequence[int], Sequence[int] | None]],
    *,
    n_estimate: int | None,
    batch_size: int,
    itemsize: int,
    requested: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> _Plan:
    """Pick the estimator for ``measure`` under ``memory_budget`` bytes; ``dims`` holds, per layer pair map, the
    feature dims of side a and of side b (None when a map compares one set of layers with itself).

    Linear CKA: exact feature-space streaming (O(sum d^2) state) or the exact sample-space form (keeps rows,
    O(n sum d) + O(L n^2)), whichever fits and costs less; minibatch CKA when neither fits. Other CKA kernels:
    exact on kept rows when they fit, else minibatch. Any other measure runs on kept rows, or fails clearly.
    """
    if requested not in ESTIMATOR_CHOICES:
        raise UnknownNameError(f"unknown estimator {requested!r}; choose one of {ESTIMATOR_CHOICES}.")
    is_linear, debiased = _linear_cka_kind(measure)
    is_cka = measure.spec.name == "cka"
    all_dims = [d for da, db in dims for d in [*da, *(db or [])]]
    n_layers = len(all_dims)
    n_maps = len(dims)

    def feature_bytes() -> int:
        return sum(LinearCKAMap.memory_bytes(da, db, debiased=debiased, batch_size=batch_size) for da, db in dims)

    def sample_bytes() -> int | None:
        if n_estimate is None:
            return None
        return sum(SampleSpaceCKAMap.memory_bytes(n_estimate, da, db, itemsize=itemsize) for da, db in dims)

    def minibatch_bytes() -> int:
        return sum(
            MinibatchCKAMap.memory_bytes(batch_size, len(da), None if db is None else len(db)) for da, db in dims
        )

    def captured_bytes() -> int | None:
        if n_estimate is None:
            return None
        rows = n_estimate * sum(all_dims) * itemsize
        # the measure works on float64 copies of one pair at a time, plus n x n Grams for kernel measures
        largest_pair = 8 * n_estimate * (2 * max(all_dims)) + (16 * n_estimate**2 if is_cka else 0)
        return rows + largest_pair

    def exact_fits(need: int | None) -> bool:
        return need is not None and need <= memory_budget

    if requested != "auto":
        if requested in ("feature_streaming", "sample_space") and not is_linear:
            raise RepsimError(
                f"estimator {requested!r} computes linear CKA only; {measure.id} needs 'captured' or, for CKA "
                "kernels, 'minibatch'."
            )
        if requested == "minibatch" and not is_cka:
            raise RepsimError(f"estimator 'minibatch' is defined for CKA only, not {measure.id}; use 'captured'.")
        need = {
            "feature_streaming": feature_bytes,
            "sample_space": sample_bytes,
            "minibatch": minibatch_bytes,
            "captured": captured_bytes,
        }[requested]()
        if need is not None and need > memory_budget:
            raise MemoryBudgetError(
                f"estimator {requested!r} needs about {_gib(need)} for {n_layers} layers, over the memory budget "
                f"of {_gib(memory_budget)}. Raise memory_budget=, capture fewer layers, reduce features "
                "(spatial='mean', tokens='mean'), or use fewer samples (max_batches=)."
            )
        return _Plan(requested, "requested", need or 0)

    if is_linear:
        feature, sample = feature_bytes(), sample_bytes()
        d_total = sum(all_dims)
        # cost per sample: feature space ~ (sum d)^2 (Grams and cross moments), sample space ~ n * sum d. Sample
        # space keeps O(n d) rows, so it must be clearly cheaper (4x) to be preferred to O(d^2) statistics.
        sample_cheaper = n_estimate is not None and 4 * n_estimate * d_total < d_total**2 / max(1, n_maps)
        if exact_fits(sample) and (sample_cheaper or feature > memory_budget):
            return _Plan(
                "sample_space",
                f"n ~ {n_estimate} is small next to the {d_total} features: the exact (n x n) Gram form is cheaper"
                if sample_cheaper
                else f"feature-space statistics need {_gib(feature)} > budget; the kept rows fit",
                int(sample or 0),
            )
        if feature <= memory_budget:
            return _Plan("feature_streaming", "exact float64 sufficient statistics fit the budget", feature)
        reason = (
            f"exact linear CKA needs {_gib(feature)} (feature space) and "
            + (
                f"{_gib(sample)} (sample space)"
                if sample is not None
                else "an unknown amount (sample space; n unknown)"
            )
            + f", over the memory budget of {_gib(memory_budget)}"
        )
    elif is_cka:
        captured = captured_bytes()
        if exact_fits(captured):
            return _Plan("captured", "kept rows and n x n Grams fit the budget", int(captured or 0))
        reason = (
            f"exact {measure.id} needs "
            + (_gib(captured) if captured is not None else "an unknown amount (the number of samples is unknown)")
            + f" for kept rows and n x n Grams, over the memory budget of {_gib(memory_budget)}"
        )
    else:
        captured = captured_bytes()
        if captured is None or captured <= memory_budget:
            return _Plan("captured", "measure computed on the kept rows", int(captured or 0))
        raise MemoryBudgetError(
            f"{measure.id} runs on kept activations, which need about {_gib(captured)} for {n_layers} layers, over "
            f"the memory budget of {_gib(memory_budget)}. Raise memory_budget=, capture fewer layers, reduce "
            "features (spatial='mean', tokens='mean'), or use fewer samples (max_batches=)."
        )
    minibatch = minibatch_bytes()
    if minibatch > memory_budget:
        raise MemoryBudgetError(f"{reason}; even minibatch CKA needs {_gib(minibatch)}. Use smaller batches.")
    warnings.warn(
        f"estimator='auto' uses minibatch CKA (Nguyen et al. 2021) instead of exact CKA: {reason}. Minibatch CKA "
        "is its own estimator, close to but not equal to full-data CKA; the result records estimator='minibatch'. "
        "Pass memory_budget= to allow the exact form, or estimator='minibatch' to silence this.",
        EstimatorChoiceWarning,
        stacklevel=5,  # compare() -> _run -> _Engine.start -> here: point at the caller of compare()
    )
    return _Plan("minibatch", reason, minibatch)


# --- the engine ---------------------------------------------------------------------------------------------------


class _Engine:
    """One pass over the data for N models and a set of layer-pair maps, each updated from shared rows."""

    def __init__(
        self,
        sides: list[_Side],
        pairs: list[_Pair],
        measure: Measure,
        *,
        estimator: str,
        memory_budget: int,
    ) -> None:
        self.sides, self.pairs, self.measure = sides, pairs, measure
        self.requested = estimator
        self.memory_budget = memory_budget
        self.plan: _Plan | None = None
        self.accumulators: dict[_Pair, Any] = {}
        self.dtype: torch.dtype | None = None
        #: rows of batches too small for minibatch CKA (unbiased HSIC needs 4), left out and recorded
        self.skipped_rows = 0
        #: per data stream: sha256 of the inputs (None when not fingerprinted) and of the labels / sample ids
        self.data_hashes: list[Any] = []
        self.label_hashes: list[Any] = []

    def _rows(self, pair: _Pair) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        rows_i = _select(self.sides[pair.i].rows or {}, pair.sub_i)
        if pair.same:
            return rows_i, None
        return rows_i, _select(self.sides[pair.j].rows or {}, pair.sub_j)

    def start(self, n_estimate: int | None) -> None:
        dims = []
        for pair in self.pairs:
            rows_a, rows_b = self._rows(pair)
            dims.append(
                (
                    [int(t.shape[1]) for t in rows_a.values()],
                    None if rows_b is None else [int(t.shape[1]) for t in rows_b.values()],
                )
            )
        first = next(iter(self.sides[0].rows.values()))  # type: ignore[union-attr]
        self.dtype = first.dtype
        self.plan = choose_estimator(
            self.measure,
            dims,
            n_estimate=n_estimate,
            batch_size=int(first.shape[0]),
            itemsize=first.element_size(),
            requested=self.requested,
            memory_budget=self.memory_budget,
        )
        _, debiased = _linear_cka_kind(self.measure)
        for pair in self.pairs:
            if self.plan.estimator == "feature_streaming":
                self.accumulators[pair] = LinearCKAMap(debiased=debiased, same=pair.same)
            elif self.plan.estimator == "sample_space":
                self.accumulators[pair] = SampleSpaceCKAMap(debiased=debiased, same=pair.same)
            elif self.plan.estimator == "minibatch":
                params = dict(self.measure.params)
                kernel = params.pop("kernel")
                if params.pop("hsic") != "song":
                    warnings.warn(
                        "minibatch CKA always uses the unbiased HSIC (Nguyen et al. 2021); the biased estimator "
                        f"of {self.measure.id} cannot be computed batch by batch.",
                        EstimatorChoiceWarning,
                        stacklevel=3,
                    )
                self.accumulators[pair] = MinibatchCKAMap(kernel, same=pair.same, **params)

    def update(self) -> None:
        assert self.plan is not None
        if self.plan.estimator == "captured":
            kept_bytes = 0
            for side in self.sides:
                for name, rows in (side.rows or {}).items():
                    side.kept.setdefault(name, []).append(rows.detach())
                    kept_bytes += sum(t.numel() * t.element_size() for t in side.kept[name])
            if kept_bytes > self.memory_budget:
                raise MemoryBudgetError(
                    f"kept activations reached {_gib(kept_bytes)}, over the memory budget of "
                    f"{_gib(self.memory_budget)}. Raise memory_budget=, capture fewer layers, reduce features, or "
                    "use max_batches=."
                )
            return
        if self.plan.estimator == "minibatch":
            rows = _batch_rows(self.sides[0].rows or {})
            if rows < MINIBATCH_MIN_ROWS:
                if not self.skipped_rows:
                    warnings.warn(
                        f"minibatch CKA skips a batch of {rows} rows: each batch's unbiased HSIC needs at least "
                        f"{MINIBATCH_MIN_ROWS}. The result records the skipped rows (extra['minibatch_skipped_rows']); "
                        "use drop_last=True or a batch size that divides the data to avoid it.",
                        EstimatorChoiceWarning,
                        stacklevel=4,
                    )
                self.skipped_rows += rows
                return
        for pair, acc in self.accumulators.items():
            rows_a, rows_b = self._rows(pair)
            if rows_b is None:
                acc.update(rows_a)
            else:
                acc.update(rows_a, rows_b)

    def compute(self, pair: _Pair) -> tuple[torch.Tensor, list[str], list[str]]:
        assert self.plan is not None
        if self.plan.estimator != "captured":
            acc = self.accumulators[pair]
            return acc.compute(), list(acc.layers_a), list(acc.layers_b)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RepsimError(
                "the 'captured' estimator does not gather rows across torch.distributed ranks; use a linear CKA "
                "measure (feature_streaming / sample_space) or minibatch CKA, which reduce across ranks."
            )
        kept_i = _select({k: torch.cat(v) for k, v in self.sides[pair.i].kept.items()}, pair.sub_i)
        kept_j = _select({k: torch.cat(v) for k, v in self.sides[pair.j].kept.items()}, pair.sub_j)
        names_i, names_j = list(kept_i), list(kept_j)
        values = torch.empty(len(names_i), len(names_j), dtype=torch.float64)
        for a, name_a in enumerate(names_i):
            for b, name_b in enumerate(names_j):
                if pair.same and self.measure.symmetric and b < a:
                    values[a, b] = values[b, a]
                    continue
                values[a, b] = self.measure(kept_i[name_a], kept_j[name_b]).detach().to("cpu")
        return values, names_i, names_j


def _estimate_n(data: Any, max_batches: int | None, rows_per_batch: int) -> int | None:
    try:
        n_batches = len(data)
    except TypeError:
        return None if max_batches is None else max_batches * rows_per_batch
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    return n_batches * rows_per_batch


def _progress(iterable: Iterable[Any], enabled: bool, total: int | None, desc: str) -> Iterable[Any]:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


def _run(
    sides: list[_Side],
    pairs: list[_Pair],
    streams: Sequence[Iterable[Any]],
    measure: Measure,
    *,
    estimator: str,
    memory_budget: int,
    progress: bool,
    max_batches: int | None,
    fingerprint_data: bool = True,
) -> _Engine:
    """Feed every batch through every side once, check the sides saw the same samples, update every pair.

    ``streams[k]`` feeds the sides whose ``stream`` is k; with several streams they are read in lockstep.
    """
    engine = _Engine(sides, pairs, measure, estimator=estimator, memory_budget=memory_budget)
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise RepsimError(f"max_batches must be a positive int or None, got {max_batches!r}.")
    engine.data_hashes = [hashlib.sha256() if fingerprint_data else None for _ in streams]
    engine.label_hashes = [hashlib.sha256() for _ in streams]
    try:
        total = len(streams[0])  # type: ignore[arg-type]
        total = total if max_batches is None else min(total, max_batches)
    except TypeError:
        total = max_batches
    batches = zip(*streams, strict=True) if len(streams) > 1 else ((b,) for b in streams[0])
    for index, group in enumerate(_progress(batches, progress, total, "compare")):
        if max_batches is not None and index >= max_batches:
            break
        split: dict[int, tuple[Any, Any]] = {}
        for side in sides:
            if side.stream not in split:  # split and fingerprint each stream's batch once
                inputs, labels = side.recorder.adapter.split_batch(group[side.stream])
                if engine.data_hashes[side.stream] is not None:
                    _digest(engine.data_hashes[side.stream], inputs)
                if labels is not None:
                    _digest(engine.label_hashes[side.stream], labels)
                split[side.stream] = (inputs, labels)
            side.rows = None
            # each side's hooks are active during its own forward only: two sides may share one model
            with side.recorder:
                side.recorder.adapter.forward(_to_device(split[side.stream][0], _model_device(side.model)))
            if side.rows is None:
                raise RepsimError(
                    f"model {side.label!r} produced no rows for batch {index}: its forward did not complete "
                    "through the captured model."
                )
            side.n += _batch_rows(side.rows)
        counts = {side.label: _batch_rows(side.rows) for side in sides}  # type: ignore[arg-type]
        if len(set(counts.values())) > 1:
            raise RepsimError(
                f"batch {index}: the models produced different numbers of rows {counts}; they must see the "
                "same samples (with tokens='as_samples', the same tokens)."
            )
        if index == 0:
            engine.start(_estimate_n(streams[0], max_batches, counts[sides[0].label]))
        engine.update()
    if engine.plan is None:
        raise RepsimError("the data yielded no batches; pass an iterable of batches (a DataLoader, a list, ...).")
    if len(streams) > 1:
        _check_same_samples(engine.label_hashes)
    return engine


def _check_same_samples(label_hashes: Sequence[Any]) -> None:
    """Separate streams must yield the same labels / sample ids in the same order: checked, not assumed."""
    digests = [h.hexdigest() for h in label_hashes]
    if hashlib.sha256().hexdigest() in digests:
        raise RepsimError(
            "with separate data streams per model, each stream must yield labels (or sample ids) as (inputs, labels) "
            "pairs or a 'labels' key, so that the samples can be checked to be the same."
        )
    if len(set(digests)) > 1:
        raise RepsimError(
            "the data streams of the models yielded different labels / sample ids: the models did not see the same "
            "samples in the same order (a shuffled loader on one side?). Use the same order for every model."
        )


def _make_side(
    label: str, model: nn.Module, layers: Any, capture_args: Mapping[str, Any], adapter: Any = "auto"
) -> _Side:
    if not isinstance(model, nn.Module):
        raise RepsimError(f"model {label!r} must be a torch.nn.Module, got {type(model).__name__}.")
    side = _Side(label=label, model=model, recorder=None)  # type: ignore[arg-type]
    side.recorder = Recorder(model, layers, adapter=adapter, keep=False, on_batch=side.receive, **capture_args)
    return side


def _world() -> tuple[int, Any]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist
    return 1, None


def _global_count(n: int, device: torch.device | None) -> int:
    """Samples over all torch.distributed ranks (each rank saw its own shard); ``n`` when not distributed."""
    world, dist = _world()
    if world == 1:
        return n
    backend_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    total = torch.tensor([n], dtype=torch.int64, device=backend_device or device or "cpu")
    dist.all_reduce(total)
    return int(total.item())


def _hexdigest(h: Any) -> str | None:
    return None if h is None else h.hexdigest()


def _result(engine: _Engine, pair: _Pair, *, seed: int | None, extra: Mapping[str, Any]) -> SimilarityMap:
    values, names_a, names_b = engine.compute(pair)
    side_a, side_b = engine.sides[pair.i], engine.sides[pair.j]
    policy_a, policy_b = side_a.recorder.policy, side_b.recorder.policy
    reduction = dict(policy_a) if policy_a == policy_b else {"a": policy_a, "b": policy_b}
    assert engine.plan is not None
    return SimilarityMap(
        values=values.to(torch.float64).cpu(),
        layers_a=names_a,
        layers_b=names_b,
        measure=engine.measure.id,
        estimator=engine.plan.estimator,
        reduction=reduction,
        n=_global_count(side_a.n - engine.skipped_rows, None),
        dtype=str(engine.dtype).replace("torch.", ""),
        seed=seed,
        fingerprints={"a": side_a.recorder.adapter.fingerprint(), "b": side_b.recorder.adapter.fingerprint()},
        extra={
            "model_a": side_a.label,
            "model_b": side_b.label,
            "estimator_reason": engine.plan.reason,
            "data_fingerprint": _hexdigest(engine.data_hashes[side_a.stream]),
            **(
                {"data_fingerprint_b": _hexdigest(engine.data_hashes[side_b.stream])}
                if side_b.stream != side_a.stream
                else {}
            ),
            "world_size": _world()[0],
            **({"minibatch_skipped_rows": engine.skipped_rows} if engine.skipped_rows else {}),
            **extra,
        },
    )


def _as_list(layers: Any) -> list[Any] | None:
    if layers is None:
        return None
    if isinstance(layers, (str, int, nn.Module)):
        return [layers]
    return list(layers)


def compare(
    model_a: nn.Module,
    model_b: nn.Module | None,
    data: Iterable[Any],
    layers_a: Any = None,
    layers_b: Any = None,
    measure: str | Measure = "cka",
    *,
    estimator: str = "auto",
    tokens: str = "mean",
    spatial: str = "flatten",
    output: Any = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    memory_budget: int | str = DEFAULT_MEMORY_BUDGET,
    data_b: Iterable[Any] | None = None,
    adapter_a: Any = "auto",
    adapter_b: Any = "auto",
    seed: int | None = None,
    names: tuple[str, str] | None = None,
    fingerprint_data: bool = True,
) -> SimilarityMap:
    """Layer x layer similarity of two models (``model_b=None`` or the same object: a model with itself).

    ``data`` is any iterable of batches (tensor, ``(inputs, labels)``, or a dict of keyword arguments for
    HuggingFace models); each batch goes through each model once and updates every layer pair; a model compared
    with itself runs once per batch. ``layers_a`` / ``layers_b`` as in :func:`repsim_plugin.capture` (None: the
    adapter's default layers). ``device`` is where rows and statistics go (default: where each layer produces
    them); inputs always go to each model's own device, and the models are never moved or modified. ``data_b``
    feeds model B from its own stream (e.g. another tokenizer); both streams must then yield labels or sample ids,
    which are checked to agree batch by batch. ``fingerprint_data`` records a sha256 of every input batch in
    ``result.extra["data_fingerprint"]`` (provenance; turn it off when hashing the inputs costs more than the
    forward passes, e.g. large images on a fast GPU).
    """
    m = make(measure)
    capture_args = {"tokens": tokens, "spatial": spatial, "output": output, "device": device}
    same_model = model_b is None or model_b is model_a
    label_a, label_b = names or (f"{type(model_a).__name__} (a)", f"{type(model_b or model_a).__name__} (b)")
    if same_model and data_b is None:
        # one model: one recorder on the union of both layer sets, one forward per batch
        list_a, list_b = _as_list(layers_a), _as_list(layers_b)
        if list_b is None or list_b == list_a:
            side = _make_side(label_a, model_a, layers_a, capture_args, adapter_a)
            sides, pair = [side], _Pair(0, 0)
            label_b = label_a
        else:
            adapter = Recorder(model_a, None, adapter=adapter_a).adapter
            list_a = list_a if list_a is not None else adapter.default_layers()
            sub_a = tuple(Recorder(model_a, list_a, adapter=adapter).modules)
            sub_b = tuple(Recorder(model_a, list_b, adapter=adapter).modules)
            side = _make_side(label_a, model_a, list(dict.fromkeys(sub_a + sub_b)), capture_args, adapter)
            sides, pair = [side], _Pair(0, 0, sub_a, sub_b)
    else:
        sides = [
            _make_side(label_a, model_a, layers_a, capture_args, adapter_a),
            _make_side(label_b, model_b or model_a, layers_b, capture_args, adapter_b),
        ]
        sides[1].stream = 0 if data_b is None else 1
        pair = _Pair(0, 1)
    engine = _run(
        sides,
        [pair],
        [data] if data_b is None else [data, data_b],
        m,
        estimator=estimator,
        memory_budget=parse_bytes(memory_budget),
        progress=progress,
        max_batches=max_batches,
        fingerprint_data=fingerprint_data,
    )
    return _result(engine, pair, seed=seed, extra={})


# --- checkpoints --------------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file loaded with ``weights_only=True`` (no pickle code runs).

    A torch file holding ``{"state_dict": ...}`` or ``{"model": ...}`` (a training checkpoint) yields the nested
    state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise RepsimError(f"checkpoint {str(path)!r} does not exist or is not a file.")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - safetensors ships with the 'all' extra
            raise RepsimError("reading .safetensors needs the safetensors package: pip install safetensors") from exc
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RepsimError(
            f"cannot load {str(path)!r} with torch.load(weights_only=True): {exc}. Only tensors and plain "
            "containers are accepted (no pickled code); re-save the state dict, or use safetensors."
        ) from exc
    if isinstance(state, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            nested = state.get(key)
            if isinstance(nested, Mapping) and all(isinstance(v, torch.Tensor) for v in nested.values()):
                return dict(nested)
        if all(isinstance(v, torch.Tensor) for v in state.values()):
            return dict(state)
    raise RepsimError(
        f"{str(path)!r} does not hold a state dict (a mapping of names to tensors, possibly under 'state_dict' / "
        "'model'); save one with torch.save(model.state_dict(), path)."
    )


def _build_from_checkpoint(build_model: Callable[[], nn.Module], path: str | Path) -> nn.Module:
    model = build_model()
    if not isinstance(model, nn.Module):
        raise RepsimError(f"build_model() must return a torch.nn.Module, got {type(model).__name__}.")
    state = load_checkpoint(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RepsimError(f"checkpoint {str(path)!r} does not fit the model build_model() returns: {exc}") from exc
    return model


def compare_checkpoints(
    build_model: Callable[[], nn.Module],
    checkpoints: Sequence[str | Path],
    data: Iterable[Any],
    *,
    reference: int | str | Path | None = None,
    layers: Any = None,
    measure: str | Measure = "cka",
    estimator: str = "auto",
    tokens: str = "mean",
    spatial: str = "flatten",
    output: Any = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    memory_budget: int | str = DEFAULT_MEMORY_BUDGET,
    seed: int | None = None,
    fingerprint_data: bool = True,
) -> dict[tuple[str, str], SimilarityMap]:
    """Compare checkpoints of one architecture: every pair, or each against ``reference`` (index or path).

    ``build_model()`` returns a fresh model; each checkpoint is loaded into one (safetensors, or
    ``torch.load(weights_only=True)``). All models run side by side in one pass over the data (one forward per
    model per batch), so N checkpoints cost N forwards per batch, not N^2. Returns ``{(name_a, name_b): map}``
    keyed by the checkpoints' file names (or full paths where file names repeat).
    """
    paths = [Path(p) for p in checkpoints]
    if len(paths) < 2:
        raise RepsimError(f"compare_checkpoints needs at least 2 checkpoints, got {len(paths)}.")
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    if len(set(names)) < len(names):
        raise RepsimError("the same checkpoint path is given twice; pass each checkpoint once.")
    if reference is None:
        pairs = [_Pair(i, j) for i, j in itertools.combinations(range(len(paths)), 2)]
    else:
        if isinstance(reference, int):
            if not 0 <= reference < len(paths):
                raise RepsimError(f"reference index {reference} is out of range for {len(paths)} checkpoints.")
            ref = reference
        else:
            matches = [k for k, p in enumerate(paths) if Path(reference) in (p, Path(p.name))]
            if not matches:
                raise RepsimError(f"reference {str(reference)!r} is not one of the checkpoints {names}.")
            ref = matches[0]
        pairs = [_Pair(ref, k) for k in range(len(paths)) if k != ref]
    m = make(measure)
    capture_args = {"tokens": tokens, "spatial": spatial, "output": output, "device": device}
    sides = [
        _make_side(name, _build_from_checkpoint(build_model, path), layers, capture_args)
        for name, path in zip(names, paths, strict=True)
    ]
    engine = _run(
        sides,
        pairs,
        [data],
        m,
        estimator=estimator,
        memory_budget=parse_bytes(memory_budget),
        progress=progress,
        max_batches=max_batches,
        fingerprint_data=fingerprint_data,
    )
    return {
        (names[p.i], names[p.j]): _result(
            engine, p, seed=seed, extra={"checkpoint_a": str(paths[p.i]), "checkpoint_b": str(paths[p.j])}
        )
        for p in pairs
    }
