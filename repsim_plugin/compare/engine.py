"""One pass over the data: every batch through each model once, every layer-pair map updated from shared rows.

Each model is a *side* (its recorder and the rows of the current batch); a *pair* is the map of side i's layers
against side j's. The estimator is chosen at the first batch (:mod:`.plan`) from what the measure declares, one
accumulator is built per pair, and every later batch updates them all. Nothing here knows a measure by name.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._utils.batches import digest, lockstep, model_device, to_device
from .._utils.names import module_of
from .._utils.warnings import warn
from ..capture import Recorder
from ..errors import EstimatorChoiceWarning, MemoryBudgetError, RepsimError, StateError, TooFewSamplesError
from ..measures import Measure
from .plan import Plan, choose_estimator, gib

__all__ = ["Engine", "Pair", "Side", "make_side", "run"]

Rows = dict[str, torch.Tensor]


@dataclass
class Side:
    """One model taking part in a comparison: its recorder and the rows of the current batch."""

    label: str
    model: nn.Module
    recorder: Recorder
    rows: Rows | None = None
    stream: int = 0  # which data stream feeds this side (0: ``data``; 1: ``data_b``)
    n: int = 0

    def receive(self, rows: Rows) -> None:
        self.rows = dict(rows)

    def batch_rows(self) -> int:
        return int(next(iter((self.rows or {}).values())).shape[0])


@dataclass(frozen=True)
class Pair:
    """Side i's layers against side j's; ``sub_*`` restrict a side to some of its modules (None: all)."""

    i: int
    j: int
    sub_i: tuple[str, ...] | None = None
    sub_j: tuple[str, ...] | None = None

    @property
    def same(self) -> bool:
        return self.i == self.j and self.sub_i == self.sub_j


def select(rows: Mapping[str, torch.Tensor], modules: tuple[str, ...] | None) -> Rows:
    """Rows of the layers recorded from ``modules`` (layer names may carry a ``#k`` call suffix)."""
    if modules is None:
        return dict(rows)
    return {name: t for name, t in rows.items() if module_of(name) in modules}


@contextmanager
def sharing(acc: Any, pair: Pair, cache: dict[Any, torch.Tensor] | None) -> Iterator[bool]:
    """Lend ``cache`` to ``acc`` (a map with ``shared_grams``) keyed by ``pair``'s sides for the block; yields
    whether it was lent (None, or a map that shares nothing: not lent)."""
    if cache is None or not hasattr(acc, "shared_grams"):
        yield False
        return
    acc.shared_grams, acc.side_keys = cache, (pair.i, pair.j)
    try:
        yield True
    finally:
        acc.shared_grams = acc.side_keys = None


def make_side(
    label: str, model: nn.Module, layers: Any, capture_args: Mapping[str, Any], adapter: Any = "auto"
) -> Side:
    """A side whose recorder hands each batch's rows to the side (kept nowhere else).

    The recorder reaches its side through a weak reference: a strong one would close a cycle (side -> recorder ->
    callback -> side) that keeps the last batch's rows (60 MiB at W2) alive after the call until the cyclic
    garbage collector runs, past the heap trim of :func:`~repsim_plugin._utils.heap.retained_heap`.
    """
    if not isinstance(model, nn.Module):
        raise RepsimError(f"model {label!r} must be a torch.nn.Module, got {type(model).__name__}.")
    holder: list[weakref.ref[Side]] = []

    def receive(rows: Rows) -> None:
        side = holder[0]()
        if side is None:
            raise StateError(f"the comparison that captured {label!r} has ended; its recorder takes no more rows")
        side.receive(rows)

    recorder = Recorder(model, layers, adapter=adapter, keep=False, on_batch=receive, **capture_args)
    side = Side(label=label, model=model, recorder=recorder)
    holder.append(weakref.ref(side))
    return side


class Engine:
    """The maps of one comparison: plan at the first batch, then one accumulator update per pair per batch."""

    def __init__(
        self, sides: list[Side], pairs: list[Pair], measure: Measure, *, estimator: str, memory_budget: int
    ) -> None:
        self.sides, self.pairs, self.measure = sides, pairs, measure
        self.requested = estimator
        self.memory_budget = memory_budget
        self.plan: Plan | None = None
        self.accumulators: dict[Pair, Any] = {}
        self.dtype: torch.dtype | None = None
        #: rows of batches too small for the estimator (minibatch CKA's unbiased HSIC needs 4), left out
        self.skipped_rows = 0
        #: bytes of rows kept by estimators that keep rows (checked against the budget as they grow)
        self.kept_bytes = 0
        #: per data stream: sha256 of the inputs (None when not fingerprinted) and of the labels / sample ids
        self.data_hashes: list[Any] = []
        self.label_hashes: list[Any] = []
        self._weights: list[str] | None = None
        #: each side's Grams while a pair that names the side is still to be computed (see :meth:`compute`)
        self._grams: dict[Any, torch.Tensor] = {}
        self._computed: set[Pair] = set()

    def weights_fingerprints(self) -> list[str]:
        """Each side's weights fingerprint after the pass, hashed once however many pairs name the side.

        Every distinct model is hashed once (two sides may share a model), in threads: ``hashlib`` releases the GIL,
        so on two cores two models take about the time of one. Per pair, N checkpoints would cost N (N - 1)
        hashes of the weights instead of N.
        """
        if self._weights is None:
            models = {(id(side.model), type(side.recorder.adapter)): side for side in self.sides}
            workers = max(1, min(len(models), os.cpu_count() or 1))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                digests = list(pool.map(lambda side: side.recorder.adapter.fingerprint(), models.values()))
            hashed = dict(zip(models, digests, strict=True))
            self._weights = [hashed[id(side.model), type(side.recorder.adapter)] for side in self.sides]
        return self._weights

    def rows(self, pair: Pair) -> tuple[Rows, Rows | None]:
        rows_i = select(self.sides[pair.i].rows or {}, pair.sub_i)
        if pair.same:
            return rows_i, None
        return rows_i, select(self.sides[pair.j].rows or {}, pair.sub_j)

    def start(self, n_estimate: int | None) -> None:
        """Choose the estimator from the first batch's shapes and build one accumulator per pair."""
        dims = []
        for pair in self.pairs:
            rows_a, rows_b = self.rows(pair)
            dims_b = None if rows_b is None else [int(t.shape[1]) for t in rows_b.values()]
            dims.append(([int(t.shape[1]) for t in rows_a.values()], dims_b))
        first = next(iter((self.sides[0].rows or {}).values()))
        self.dtype = first.dtype
        self.plan = choose_estimator(
            self.measure,
            dims,
            n_estimate=n_estimate,
            batch_size=int(first.shape[0]),
            itemsize=first.element_size(),
            requested=self.requested,
            memory_budget=self.memory_budget,
            side_maps=self._side_maps(),
        )
        if self.plan.declaration.note:
            warn(self.plan.declaration.note, EstimatorChoiceWarning)
        self.accumulators = {pair: self.plan.build(same=pair.same) for pair in self.pairs}
        if not any(side.recorder.grad for side in self.sides):
            for acc in self.accumulators.values():  # the recorders' rows are private copies: kept without another
                if isinstance(getattr(acc, "copy", None), bool):
                    acc.copy = False
        if self.measure.mixed_fn is None and self.measure.dtype == torch.float64:
            for acc in self.accumulators.values():  # an explicit dtype=torch.float64: no float32 products anywhere
                acc.full_float64 = True

    def _side_maps(self) -> list[tuple[list[int], list[int] | None]] | None:
        """Every side's layer widths once, as maps of two sides (an odd one alone), when several maps of whole
        sides share them without copies (no grad: the maps keep the recorders' rows as they are); else None."""
        if len(self.pairs) < 2 or any(side.recorder.grad for side in self.sides):
            return None
        if any(pair.sub_i is not None or pair.sub_j is not None or pair.same for pair in self.pairs):
            return None
        used = sorted({k for pair in self.pairs for k in (pair.i, pair.j)})
        widths = [[int(t.shape[1]) for t in (self.sides[k].rows or {}).values()] for k in used]
        return [(widths[k], widths[k + 1] if k + 1 < len(widths) else None) for k in range(0, len(widths), 2)]

    def update(self) -> None:
        """Feed the current batch's rows to every pair's accumulator."""
        assert self.plan is not None
        first = next(iter(self.accumulators.values()))
        min_rows = int(getattr(first, "min_batch_rows", 0))
        rows = self.sides[0].batch_rows()
        if rows < min_rows:
            if not self.skipped_rows:
                warn(
                    f"{self.plan.estimator} skips a batch of {rows} rows: each batch needs at least {min_rows} "
                    "(minibatch CKA's unbiased HSIC). The result records the skipped rows "
                    "(extra['minibatch_skipped_rows']); use drop_last=True or a batch size that divides the data "
                    "to avoid it.",
                    EstimatorChoiceWarning,
                )
            self.skipped_rows += rows
            return
        # maps that form per-batch Grams (minibatch) share each side's for this batch: N checkpoints in every pair
        # would form N (N - 1) sides' Grams a batch instead of N
        batch_grams: dict[Any, torch.Tensor] | None = {} if len(self.pairs) > 1 else None
        for pair, acc in self.accumulators.items():
            rows_a, rows_b = self.rows(pair)
            with sharing(acc, pair, batch_grams):
                if rows_b is None:
                    acc.update(rows_a)
                else:
                    acc.update(rows_a, rows_b)
        if hasattr(first, "kept_bytes"):
            self._check_kept()

    def _check_kept(self) -> None:
        for side in self.sides:
            self.kept_bytes += sum(t.numel() * t.element_size() for t in (side.rows or {}).values())
        if self.kept_bytes > self.memory_budget:
            assert self.plan is not None
            others = sorted(set(self.measure.estimators) - {self.plan.estimator})
            raise MemoryBudgetError(
                f"kept activations reached {gib(self.kept_bytes)}, over the memory budget of "
                f"{gib(self.memory_budget)} (the {self.plan.estimator!r} estimator keeps every row; it was chosen "
                "from the first batch's size). Raise memory_budget=, capture fewer layers, reduce features, use "
                f"max_batches={'' if not others else ', or an estimator whose memory does not grow with n: '}"
                f"{', '.join(repr(o) for o in others)}."
            )

    def compute(self, pair: Pair) -> tuple[torch.Tensor, list[str], list[str]]:
        """The map of ``pair``; with several pairs, each side's Grams are formed once and shared by its pairs.

        A sample-space map forms both sides' (L, n, n) Grams, most of its time; N checkpoints compared in every
        pair would form N (N - 1) sides' Grams instead of N. A side's Grams are held until its last pair is
        computed: at most every side's at once, which the plan counts (``_side_maps``: each side's rows and Grams).
        """
        acc = self.accumulators[pair]
        with sharing(acc, pair, self._grams if len(self.pairs) > 1 else None) as shared:
            try:
                values = acc.compute()
            finally:
                if shared:
                    self._computed_shared(pair)
        return values, list(acc.layers_a), list(acc.layers_b)

    def _computed_shared(self, pair: Pair) -> None:
        """Count ``pair`` as computed and free the Grams of each of its sides whose last pair it was."""
        self._computed.add(pair)
        done = {side for side in (pair.i, pair.j) if all(p in self._computed for p in self.pairs if side in (p.i, p.j))}
        for key in [key for key in self._grams if key[0] in done]:
            del self._grams[key]


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


def _total(streams: Sequence[Iterable[Any]], max_batches: int | None) -> int | None:
    try:
        total = len(streams[0])  # type: ignore[arg-type]  # a DataLoader or list has a length, a generator not
    except TypeError:
        return max_batches
    return total if max_batches is None else min(total, max_batches)


def _forward_all(engine: Engine, group: Sequence[Any], index: int) -> dict[str, int]:
    """Split, fingerprint and run one batch (per stream) through every side; returns the rows per side."""
    split: dict[int, tuple[Any, Any]] = {}
    for side in engine.sides:
        if side.stream not in split:  # split and fingerprint each stream's batch once
            inputs, labels = side.recorder.adapter.split_batch(group[side.stream])
            if engine.data_hashes[side.stream] is not None:
                digest(engine.data_hashes[side.stream], inputs)
            if labels is not None:
                digest(engine.label_hashes[side.stream], labels)
            split[side.stream] = (inputs, labels)
        side.rows = None
        # each side's hooks are active during its own forward only: two sides may share one model
        with side.recorder:
            side.recorder.adapter.forward(to_device(split[side.stream][0], model_device(side.model)))
        if side.rows is None:
            raise RepsimError(
                f"model {side.label!r} produced no rows for batch {index}: its forward did not complete "
                "through the captured model."
            )
        side.n += side.batch_rows()
    counts = {side.label: side.batch_rows() for side in engine.sides}
    if len(set(counts.values())) > 1:
        raise RepsimError(
            f"batch {index}: the models produced different numbers of rows {counts}; they must see the "
            "same samples (with tokens='as_samples', the same tokens)."
        )
    return counts


def run(
    sides: list[Side],
    pairs: list[Pair],
    streams: Sequence[Iterable[Any]],
    measure: Measure,
    *,
    estimator: str,
    memory_budget: int,
    progress: bool,
    max_batches: int | None,
    fingerprint_data: bool = True,
    resume: Any = None,
    keep_grams: bool = False,
) -> Engine:
    """Feed every batch through every side once, check the sides saw the same samples, update every pair.

    ``streams[k]`` feeds the sides whose ``stream`` is k; with several streams they are read in lockstep.
    ``resume`` (a :class:`.resume.Resume`) skips the batches its state file counted and saves the state.
    """
    engine = Engine(sides, pairs, measure, estimator=estimator, memory_budget=memory_budget)
    engine.data_hashes = [hashlib.sha256() if fingerprint_data else None for _ in streams]
    engine.label_hashes = [hashlib.sha256() for _ in streams]
    batches = lockstep(streams) if len(streams) > 1 else ((b,) for b in streams[0])
    for index, group in enumerate(_progress(batches, progress, _total(streams, max_batches), "compare")):
        if max_batches is not None and index >= max_batches:
            break
        if resume is not None and resume.skip(engine, group, index):  # counted in the state file: verified
            continue
        counts = _forward_all(engine, group, index)
        if index == 0:
            engine.start(_estimate_n(streams[0], max_batches, counts[sides[0].label]))
            for acc in engine.accumulators.values():
                if keep_grams:
                    acc.keep_grams = True
        engine.update()
        if resume is not None:
            resume.counted(engine, group, index)
    if resume is not None:
        resume.finish(engine)
    if engine.plan is None:
        raise RepsimError("the data yielded no batches; pass an iterable of batches (a DataLoader, a list, ...).")
    if engine.skipped_rows and engine.skipped_rows >= sides[0].n:
        raise TooFewSamplesError(
            f"every batch had fewer rows than {engine.plan.estimator} needs per batch (at least "
            f"{getattr(next(iter(engine.accumulators.values())), 'min_batch_rows', 0)} rows), so no batch was counted: "
            "use larger batches, or another estimator."
        )
    if len(streams) > 1:
        check_same_samples(engine.label_hashes)
    return engine


def check_same_samples(label_hashes: Sequence[Any]) -> None:
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
