"""``compare`` and ``compare_checkpoints``: layer x layer similarity maps of two models or of checkpoints.

The data flow is one pass over the data (:mod:`.engine`): every batch goes through each model once (hooks record
every requested layer at the same time), and every layer pair's statistics are updated from those rows. Linear
CKA streams from exact float64 sufficient statistics (memory O(d^2) per layer pair, never O(n d)); the estimator
actually used is chosen under a memory budget (:mod:`.plan`) and recorded in the result, and an approximate
choice is announced with a warning. :mod:`._maps` runs the pass and turns each pair into its map.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._utils.batches import check_data
from .._utils.checks import Bool, Instance, Int, Optional, Where, check_params
from .._utils.heap import release_now, with_retained_heap
from .._utils.io import load_state_dict
from ..capture import Recorder
from ..errors import RepsimError
from ..measures import Measure, make
from ..results import SimilarityMap
from ..trajectory import Trajectory
from ._maps import pair_map, resumed, run_pass
from .engine import Pair, Side, make_side
from .plan import DEFAULT_MEMORY_BUDGET

__all__ = [
    "COMPARE_PARAMS",
    "checkpoint_trajectory",
    "compare",
    "compare_checkpoints",
    "load_checkpoint",
    "release_memory",
]

#: Constraints of the options of :func:`compare` and :func:`compare_checkpoints` (the capture options and the
#: estimator are checked where they are used: by the recorder and the planner).
COMPARE_PARAMS = {
    "progress": Bool(),
    "max_batches": Optional(Int(minimum=1)),
    "seed": Optional(Int()),
    "fingerprint_data": Bool(),
    "permutations": Optional(Int(minimum=1)),
    "bootstrap": Optional(Int(minimum=2)),
    "estimator": Instance(str, "an estimator name (see ESTIMATOR_CHOICES)"),
    "names": Optional(
        Where(
            lambda v: isinstance(v, tuple | list) and len(v) == 2 and all(isinstance(x, str) for x in v),
            "a pair of model labels (str, str)",
            bad=(("a",), "ab"),
        )
    ),
}


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file loaded with ``weights_only=True`` (no pickle code runs).

    A torch file holding ``{"state_dict": ...}`` or ``{"model": ...}`` (a training checkpoint) yields the nested
    state dict.
    """
    return load_state_dict(path)


def _as_list(layers: Any) -> list[Any] | None:
    if layers is None:
        return None
    if isinstance(layers, str | int | nn.Module):
        return [layers]
    return list(layers)


def _sides_for(
    model_a: nn.Module,
    model_b: nn.Module | None,
    layers_a: Any,
    layers_b: Any,
    capture_args: Mapping[str, Any],
    names: tuple[str, str] | None,
    adapters: tuple[Any, Any],
    two_streams: bool,
) -> tuple[list[Side], Pair]:
    """The sides and the pair of one comparison; a model with itself runs once per batch on one recorder."""
    labels = (
        (names[0], names[1]) if names else (f"{type(model_a).__name__} (a)", f"{type(model_b or model_a).__name__} (b)")
    )
    if (model_b is None or model_b is model_a) and not two_streams:
        list_a, list_b = _as_list(layers_a), _as_list(layers_b)
        if list_b is None or list_b == list_a:
            return [make_side(labels[0], model_a, layers_a, capture_args, adapters[0])], Pair(0, 0)
        # one recorder on the union of both layer sets; each side of the map selects its own modules
        adapter = Recorder(model_a, None, adapter=adapters[0]).adapter
        list_a = list_a if list_a is not None else adapter.default_layers()
        sub_a = tuple(Recorder(model_a, list_a, adapter=adapter).modules)
        sub_b = tuple(Recorder(model_a, list_b, adapter=adapter).modules)
        side = make_side(labels[0], model_a, list(dict.fromkeys(sub_a + sub_b)), capture_args, adapter)
        return [side], Pair(0, 0, sub_a, sub_b)
    sides = [
        make_side(labels[0], model_a, layers_a, capture_args, adapters[0]),
        make_side(labels[1], model_b or model_a, layers_b, capture_args, adapters[1]),
    ]
    sides[1].stream = 1 if two_streams else 0
    return sides, Pair(0, 1)


@with_retained_heap
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
    resume_from: str | Path | None = None,
    save_every: int | None = None,
    permutations: int | None = None,
    bootstrap: int | None = None,
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

    ``resume_from`` (a file path) saves the accumulated state there every ``save_every`` batches (default None: as often
    as keeps saving under ~5% of the run time) and at the end; re-running the same call resumes from it, skipping the
    forward passes of the batches it counted (verified by fingerprint) and giving the map an uninterrupted run gives.
    ``result.extra["resumed_batches"]`` says how many batches came from the file. A file from other data, models,
    layers or settings is refused (:class:`~repsim_plugin.errors.ResumeStateError`). See :mod:`.resume`.

    ``permutations=N`` fills ``result.p_values`` (one permutation test per cell, the same N permutations for every
    cell, from the kept Grams: :func:`repsim_plugin.map_stats.map_permutation_test`) and ``result.q_values``
    (Benjamini-Hochberg over the map); ``bootstrap=B`` fills ``result.intervals`` (95%, the same B row resamples
    for every cell). Both need the sample-space estimator of linear CKA (chosen for you under ``estimator="auto"``);
    ``seed`` (0 when None) seeds them and is recorded.
    """
    _check_options(
        data, data_b, progress=progress, max_batches=max_batches, seed=seed, fingerprint_data=fingerprint_data,
        estimator=estimator, names=names, permutations=permutations, bootstrap=bootstrap,
    )  # fmt: skip
    m = make(measure)
    with_stats = permutations is not None or bootstrap is not None
    run_estimator = stats_estimator(m, estimator) if with_stats else estimator
    seed = 0 if seed is None and with_stats else seed
    capture_args = {"tokens": tokens, "spatial": spatial, "output": output, "device": device}
    sides, pair = _sides_for(
        model_a, model_b, layers_a, layers_b, capture_args, names, (adapter_a, adapter_b), data_b is not None
    )
    engine, resume = run_pass(
        sides, [pair], [data] if data_b is None else [data, data_b], m, estimator=run_estimator,
        memory_budget=memory_budget, progress=progress, max_batches=max_batches, fingerprint_data=fingerprint_data,
        resume_from=resume_from, save_every=save_every, call="compare", keep_grams=with_stats,
    )  # fmt: skip
    result = pair_map(engine, pair, seed=seed, extra=resumed(resume))
    if with_stats:
        _fill_statistics(result, engine.accumulators[pair], estimator, permutations, bootstrap, seed)
    return result


def _check_options(data: Iterable[Any], data_b: Iterable[Any] | None = None, **options: Any) -> None:
    """Check ``options`` against :data:`COMPARE_PARAMS` (in the order given), then the data."""
    check_params(COMPARE_PARAMS, **options)
    check_data(data)
    if data_b is not None:
        check_data(data_b, "data_b")


def _fill_statistics(
    result: SimilarityMap, acc: Any, estimator: str, permutations: int | None, bootstrap: int | None, seed: int | None
) -> None:
    """``permutations=`` / ``bootstrap=`` of :func:`compare` (``estimator``: the one asked for) into ``result``."""
    if estimator == "auto":
        result.extra["estimator_reason"] = "chosen for permutations= / bootstrap=: they need the kept (n, n) Grams"
    add_statistics(result, acc, permutations=permutations, bootstrap=bootstrap, seed=0 if seed is None else seed)


def stats_estimator(m: Measure, estimator: str) -> str:
    """The estimator for a map with statistics: they are computed from the kept Grams (sample space)."""
    if "sample_space" not in m.estimators:
        raise RepsimError(
            f"permutations= / bootstrap= on a map are computed from kept (n, n) Grams, which {m.id} does not "
            "declare (only linear CKA, 'cka' / 'debiased_cka', does). Use a linear CKA measure, or "
            "rp.stats.permutation_test / bootstrap_ci on captured activations of one layer pair."
        )
    if estimator not in ("auto", "sample_space"):
        raise RepsimError(
            f"permutations= / bootstrap= need estimator='sample_space' (the kept Grams), got estimator={estimator!r}."
        )
    return "sample_space"


def add_statistics(
    result: SimilarityMap, acc: Any, *, permutations: int | None, bootstrap: int | None, seed: int
) -> None:
    """Fill p-values, q-values and intervals of ``result`` from the Grams ``acc`` kept at compute()."""
    from ..map_stats import benjamini_hochberg, map_bootstrap, map_permutation_test

    KA, KB = acc.kept_grams
    debiased = bool(acc.debiased)
    if permutations is not None:
        result.p_values, _ = map_permutation_test(KA, KB, permutations=permutations, seed=seed, debiased=debiased)
        result.q_values = benjamini_hochberg(result.p_values)
        result.extra["permutations"] = int(permutations)
    if bootstrap is not None:
        boot = map_bootstrap(KA, KB, result.values, bootstrap=bootstrap, seed=seed, debiased=debiased)
        result.intervals = (boot.low, boot.high)
        result.interval_level = boot.level
        result.extra["bootstrap"] = int(bootstrap)
    acc.kept_grams = None


def _build_from_checkpoint(build_model: Callable[[], nn.Module], path: str | Path) -> nn.Module:
    model = build_model()
    if not isinstance(model, nn.Module):
        raise RepsimError(f"build_model() must return a torch.nn.Module, got {type(model).__name__}.")
    state = load_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RepsimError(f"checkpoint {str(path)!r} does not fit the model build_model() returns: {exc}") from exc
    return model


def _checkpoint_names(paths: Sequence[Path]) -> list[str]:
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    if len(set(names)) < len(names):
        raise RepsimError("the same checkpoint path is given twice; pass each checkpoint once.")
    return names


def _checkpoint_pairs(paths: Sequence[Path], names: Sequence[str], reference: int | str | Path | None) -> list[Pair]:
    if reference is None:
        return [Pair(i, j) for i, j in itertools.combinations(range(len(paths)), 2)]
    if isinstance(reference, bool):
        raise RepsimError(f"reference must be a checkpoint index (int) or path, got {reference!r}.")
    if isinstance(reference, int):
        if not 0 <= reference < len(paths):
            raise RepsimError(f"reference index {reference} is out of range for {len(paths)} checkpoints.")
        ref = reference
    else:
        matches = [k for k, p in enumerate(paths) if Path(reference) in (p, Path(p.name))]
        if not matches:
            raise RepsimError(f"reference {str(reference)!r} is not one of the checkpoints {list(names)}.")
        ref = matches[0]
    return [Pair(ref, k) for k in range(len(paths)) if k != ref]


@with_retained_heap
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
    resume_from: str | Path | None = None,
    save_every: int | None = None,
) -> dict[tuple[str, str], SimilarityMap]:
    """Compare checkpoints of one architecture: every pair, or each against ``reference`` (index or path).

    ``build_model()`` returns a fresh model; each checkpoint is loaded into one (safetensors, or
    ``torch.load(weights_only=True)``). All models run side by side in one pass over the data (one forward per
    model per batch), so N checkpoints cost N forwards per batch, not N^2. Returns ``{(name_a, name_b): map}``
    keyed by the checkpoints' file names (or full paths where file names repeat). ``resume_from`` /
    ``save_every`` as in :func:`compare`: one state file holds every pair's state, with each checkpoint's weights
    fingerprint (a changed checkpoint is named when the file is refused).
    """
    _check_options(
        data,
        progress=progress,
        max_batches=max_batches,
        seed=seed,
        fingerprint_data=fingerprint_data,
        estimator=estimator,
    )
    if isinstance(checkpoints, str | Path) or not isinstance(checkpoints, Sequence):
        raise RepsimError(f"checkpoints must be a list of paths, got {type(checkpoints).__name__}.")
    paths = [Path(p) for p in checkpoints]
    if len(paths) < 2:
        raise RepsimError(f"compare_checkpoints needs at least 2 checkpoints, got {len(paths)}.")
    names = _checkpoint_names(paths)
    pairs = _checkpoint_pairs(paths, names, reference)
    m = make(measure)
    capture_args = {"tokens": tokens, "spatial": spatial, "output": output, "device": device}
    sides = [
        make_side(name, _build_from_checkpoint(build_model, path), layers, capture_args)
        for name, path in zip(names, paths, strict=True)
    ]
    engine, resume = run_pass(
        sides, pairs, [data], m, estimator=estimator, memory_budget=memory_budget, progress=progress,
        max_batches=max_batches, fingerprint_data=fingerprint_data, resume_from=resume_from, save_every=save_every,
        call="compare_checkpoints",
    )  # fmt: skip
    return {
        (names[p.i], names[p.j]): pair_map(
            engine,
            p,
            seed=seed,
            extra={"checkpoint_a": str(paths[p.i]), "checkpoint_b": str(paths[p.j]), **resumed(resume)},
        )
        for p in pairs
    }


def checkpoint_trajectory(
    build_model: Callable[[], nn.Module],
    checkpoints: Sequence[str | Path],
    data: Iterable[Any],
    *,
    reference: int | str | Path = 0,
    **options: Any,
) -> Trajectory:
    """Each layer's similarity to the ``reference`` checkpoint across the series (a :class:`Trajectory`).

    ``compare_checkpoints(build_model, checkpoints, data, reference=reference, **options)``, read along the
    series: layer k of the reference against layer k of every other checkpoint, in the order given.
    """
    return Trajectory.from_maps(compare_checkpoints(build_model, checkpoints, data, reference=reference, **options))


def release_memory() -> bool:
    """Give back to the system now the memory the last :func:`compare` / :func:`compare_checkpoints` freed.

    On glibc those calls keep their freed rows and activations in the heap for one second after returning, so that
    a next call reuses them instead of faulting them in again, and trim the heap then. Call this where the memory
    is wanted back at once (before a memory-hungry step of your own). Returns whether there was memory waiting
    (False when none was, or on other platforms, where nothing is kept).
    """
    return release_now()
