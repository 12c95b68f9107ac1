"""One registry for every similarity measure: specs, canonical ids, aliases, plugins.

Canonical ids follow the grammar of the similarity-repository registry so results cross-reference:
``name-key=value-key=value-suffix``, where a value may itself be a parenthesised spec, e.g.
``cka-kernel=(rbf-sigma=0.5)-hsic=gretton-score``. The id is always *rendered* from a structured :class:`Spec`,
never written by hand, and ``make(m.id)`` rebuilds the same measure.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .._utils.inputs import prepare_pair
from ..errors import DegenerateInputError, RepsimError, UnknownNameError
from ._store import Registry
from .ids import Spec, from_similarity_repository

INVARIANCES = frozenset({"orthogonal", "isotropic_scaling", "translation", "invertible_linear", "permutation"})
ENTRY_POINT_GROUP = "repsim_plugin.measures"


# --- estimators a measure declares -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimator:
    """How an engine can compute a measure batch by batch: an accumulator class and the options it is built with.

    ``accumulator`` is a class or a ``"module:Class"`` path (resolved on first use, so that declaring an
    estimator does not import the streaming machinery). The class follows the map-accumulator protocol of
    :mod:`repsim_plugin.streaming` (``update(acts_a, acts_b=None)``, ``merge``, ``compute``, ``state_dict``, ...,
    and the planning hooks ``memory_needed`` / ``relative_cost``); it is built as ``cls(same=..., **options)``.
    ``exact``: whether it computes the measure itself (to rounding) or an approximation of it (minibatch CKA);
    ``note``: said in a warning when an approximate estimator is used for this measure.
    """

    accumulator: str | type
    options: Mapping[str, Any] = field(default_factory=dict)
    exact: bool = True
    note: str = ""

    def resolve(self) -> type:
        """The accumulator class (importing its module when given as a path)."""
        if isinstance(self.accumulator, type):
            return self.accumulator
        module, _, name = self.accumulator.partition(":")
        try:
            found: type = getattr(importlib.import_module(module), name)
            return found
        except (ImportError, AttributeError) as exc:
            raise RepsimError(f"estimator accumulator {self.accumulator!r} cannot be imported: {exc}") from exc

    def build(self, *, same: bool, **extra: Any) -> Any:
        """A fresh accumulator for one layer x layer map (``same``: one model's layers against themselves)."""
        return self.resolve()(same=same, **{**self.options, **extra})


# --- the measure object -------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Measure:
    """A similarity measure: ``measure(X, Y) -> 0-d tensor`` plus the metadata that the harness verifies.

    ``X`` (n, d1) and ``Y`` (n, d2) hold the same samples in the same order; numpy arrays and any float dtype
    are accepted. The result is computed in ``dtype`` (float64 by default) on the inputs' device, and keeps
    autograd intact when ``differentiable`` is true.
    """

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    spec: Spec
    larger_is_more_similar: bool
    symmetric: bool
    is_metric: bool = False
    invariances: frozenset[str] = frozenset()
    differentiable: bool = False
    streamable: bool = False
    min_samples: int = 2
    reference: str = ""
    description: str = ""
    #: (low, high) bounds of the value, ``None`` where unbounded.
    value_range: tuple[float | None, float | None] = (None, None)
    #: value of ``measure(X, X)``; ``None`` when it depends on X.
    self_value: float | None = None
    dtype: torch.dtype | None = torch.float64
    params: Mapping[str, Any] = field(default_factory=dict)
    #: batch-by-batch estimators by name (``"feature_streaming"``, ``"sample_space"``, ``"minibatch"``, or a
    #: plugin's own); engines choose among them from what they declare. Every measure can also run on kept rows
    #: (the ``"captured"`` estimator), which needs no declaration.
    estimators: Mapping[str, Estimator] = field(default_factory=dict)
    #: bytes one call needs beyond its inputs, for (n, p) and (n, q) inputs; None: float64 copies of both
    working_memory: Callable[[int, int, int], int] | None = None
    #: optional fast form for float32 / half inputs under the default compute dtype: it receives the validated
    #: inputs in float32 (no float64 copies) and must form every sum in float64 itself (see measures/cka.py);
    #: ``with_dtype(torch.float64)`` (or ``make(..., dtype=torch.float64)``) turns it off for full float64
    mixed_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        self.dtype = _compute_dtype(self.dtype)
        self.estimators = dict(self.estimators)
        for name, estimator in self.estimators.items():
            if not isinstance(name, str) or not isinstance(estimator, Estimator):
                raise RepsimError(f"estimators must map names to Estimator declarations, got {name!r}: {estimator!r}.")
        if any(e.exact for e in self.estimators.values()):
            self.streamable = True
        self.invariances = frozenset(self.invariances)
        unknown = self.invariances - INVARIANCES
        if unknown:
            raise RepsimError(f"unknown invariances {sorted(unknown)}; choose from {sorted(INVARIANCES)}.")
        if self.is_metric and self.larger_is_more_similar:
            raise RepsimError("a metric is a distance: declare larger_is_more_similar=False.")
        if int(self.min_samples) < 1:
            raise RepsimError(f"min_samples must be >= 1, got {self.min_samples}.")

    @property
    def id(self) -> str:
        """Canonical id, rendered from :attr:`spec`."""
        return self.spec.render()

    @property
    def aliases(self) -> tuple[str, ...]:
        """Short names that resolve to this id."""
        return tuple(sorted(a for a, target in _REGISTRY.aliases.items() if target == self.id))

    def __call__(self, X: Any, Y: Any) -> torch.Tensor:
        fn = self.fn
        if self.mixed_fn is not None and self.dtype == torch.float64:
            Xt, Yt = prepare_pair(X, Y, min_samples=self.min_samples, dtype=None)
            if Xt.dtype == torch.float32:
                fn = self.mixed_fn
            else:
                Xt, Yt = Xt.to(torch.float64), Yt.to(torch.float64)
        else:
            Xt, Yt = prepare_pair(X, Y, min_samples=self.min_samples, dtype=self.dtype)
        if "isotropic_scaling" in self.invariances:  # scale-free: compute at unit scale, where nothing overflows
            Xt, Yt = unit_scale(Xt), unit_scale(Yt)
        value = fn(Xt, Yt)
        if not bool(torch.isfinite(value.detach()).all()):
            raise DegenerateInputError(
                f"{self.id} gave {float(value.detach().reshape(-1)[0])} for finite inputs of shapes "
                f"{tuple(Xt.shape)} and {tuple(Yt.shape)}: an intermediate overflowed or the measure is undefined "
                "here. Rescale the activations (e.g. divide each by its largest absolute value), or check the "
                "measure's own definition for such inputs."
            )
        return value

    def check_target(self, value: float | torch.Tensor, name: str = "target") -> None:
        """Refuse a value (or matrix of values) outside the measure's declared range: it can never be reached."""
        low, high = self.value_range
        values = torch.as_tensor(value, dtype=torch.float64)
        if (low is not None and bool((values < low).any())) or (high is not None and bool((values > high).any())):
            shown = f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"
            raise RepsimError(
                f"{name} {float(values.min() if low is not None and bool((values < low).any()) else values.max()):g} "
                f"lies outside {self.id}'s range {shown}, so it can never be reached; give a value in that range."
            )

    def exact_estimators(self) -> dict[str, Estimator]:
        """The declared estimators that compute this measure exactly, in declaration order."""
        return {name: e for name, e in self.estimators.items() if e.exact}

    def approximate_estimators(self) -> dict[str, Estimator]:
        """The declared estimators that approximate this measure (e.g. minibatch CKA)."""
        return {name: e for name, e in self.estimators.items() if not e.exact}

    def memory_per_call(self, n: int, p: int, q: int) -> int:
        """Bytes one call on (n, p) and (n, q) inputs needs beyond the inputs (see ``working_memory``)."""
        if self.working_memory is not None:
            return int(self.working_memory(n, p, q))
        return 8 * n * (p + q)

    def with_dtype(self, dtype: torch.dtype | None) -> Measure:
        """The same measure computed in another dtype (``None``: the inputs' own, at least float32).

        An explicit dtype also turns off :attr:`mixed_fn`: ``with_dtype(torch.float64)`` is full float64 throughout.
        """
        return _copy(self, dtype=_compute_dtype(dtype), mixed_fn=None)

    def metadata(self) -> dict[str, Any]:
        """Plain-data description (for the CLI, README tables and results)."""
        return {
            "id": self.id,
            "aliases": list(self.aliases),
            "larger_is_more_similar": self.larger_is_more_similar,
            "symmetric": self.symmetric,
            "is_metric": self.is_metric,
            "invariances": sorted(self.invariances),
            "differentiable": self.differentiable,
            "streamable": self.streamable,
            "estimators": sorted(self.estimators),
            "min_samples": self.min_samples,
            "value_range": list(self.value_range),
            "self_value": self.self_value,
            "reference": self.reference,
            "description": self.description,
        }

    def __repr__(self) -> str:
        return f"Measure({self.id!r})"


#: a largest absolute value within 2**+-UNIT_SCALE_SLACK is left as it is: nothing over- or underflows there, and
#: scaling by a power of two would change no digit of a scale-free measure, only cost a pass over the data
UNIT_SCALE_SLACK = 16


def unit_scale(X: torch.Tensor) -> torch.Tensor:
    """``X`` divided by the power of two nearest below its largest absolute value: exact (only the exponents
    change), so a measure invariant to isotropic scaling gives the same value at any scale of its inputs, from
    1e-300 to 1e300, instead of overflowing or underflowing in its Gram and norm sums. Gradients flow through.
    Data already near unit scale (within ``2**+-UNIT_SCALE_SLACK``) are returned as they are, without a copy."""
    low, high = torch.aminmax(X.detach())
    peak = torch.maximum(-low, high)
    if not bool(peak > 0) or not bool(torch.isfinite(peak)):
        return X
    _, exponent = torch.frexp(peak)
    shift = int(exponent) - 1
    if abs(shift) <= UNIT_SCALE_SLACK:
        return X
    return torch.ldexp(X, torch.tensor(-shift, device=X.device))


def _compute_dtype(dtype: Any) -> torch.dtype | None:
    """float64 (the default), float32 or None (the inputs' own, at least float32): sums never run in half."""
    if dtype is None or dtype in (torch.float32, torch.float64):
        return dtype
    raise RepsimError(
        f"a measure's compute dtype must be torch.float64, torch.float32 or None (the inputs' own, upcast to at "
        f"least float32), got {dtype!r}. Half precision overflows in the Gram and covariance sums; cast "
        "activations, not the compute dtype."
    )


def _copy(measure: Measure, **changes: Any) -> Measure:
    from dataclasses import replace

    return replace(measure, **changes)


# --- the registry ---------------------------------------------------------------------------------------------------

Builder = Callable[[dict[str, Any]], Measure]

_REGISTRY: Registry[Measure] = Registry()


def register(
    id: str,
    fn: Callable[..., torch.Tensor] | None = None,
    *,
    larger_is_more_similar: bool,
    symmetric: bool,
    is_metric: bool = False,
    invariances: Iterable[str] = (),
    differentiable: bool = False,
    streamable: bool = False,
    min_samples: int = 2,
    reference: str = "",
    description: str = "",
    value_range: tuple[float | None, float | None] = (None, None),
    self_value: float | None = None,
    aliases: Iterable[str] = (),
    overwrite: bool = False,
    estimators: Mapping[str, Estimator] | None = None,
    working_memory: Callable[[int, int, int], int] | None = None,
) -> Any:
    """Register ``fn(X, Y) -> 0-d tensor`` under ``id``; usable as a decorator or a plain call.

    ``fn`` receives validated float64 tensors of shape (n, d1), (n, d2). Every declared property (invariances,
    symmetry, metric, differentiability, ``min_samples``, range, self value) is checked by
    :func:`repsim_plugin.testing.check_measure`. Returns the :class:`Measure` (also from the decorator form).
    ``estimators`` declares accumulators that compute the measure batch by batch (see :class:`Estimator`):
    ``rp.compare`` then streams it instead of keeping every row.
    Extra keyword arguments given to ``make(id, **params)`` are passed to ``fn`` and appended to the id.
    """

    def decorate(func: Callable[..., torch.Tensor]) -> Measure:
        spec = Spec.parse(id)
        measure = Measure(
            fn=func,
            spec=spec,
            larger_is_more_similar=larger_is_more_similar,
            symmetric=symmetric,
            is_metric=is_metric,
            invariances=frozenset(invariances),
            differentiable=differentiable,
            streamable=streamable,
            min_samples=min_samples,
            reference=reference,
            description=description or (func.__doc__ or "").strip().split("\n")[0],
            value_range=value_range,
            self_value=self_value,
            estimators=dict(estimators or {}),
            working_memory=working_memory,
        )
        _REGISTRY.add(measure, aliases=aliases, overwrite=overwrite)
        return measure

    if fn is not None:
        return decorate(fn)
    return decorate


def register_family(
    name: str,
    build: Builder,
    *,
    variants: Iterable[Mapping[str, Any]] = (),
    aliases: Mapping[str, Mapping[str, Any]] | None = None,
    replaces: Mapping[str, Iterable[str]] | None = None,
    overwrite: bool = False,
) -> None:
    """Register a parameterised family of measures.

    ``build(params) -> Measure`` receives the parameters parsed from an id (strings and nested :class:`Spec`)
    merged with those given to :func:`make`, and must reject unknown ones. ``variants`` are listed by
    :func:`list_measures`; ``aliases`` maps a short name to the parameters of the measure it stands for.
    ``replaces`` maps a convenience parameter of :func:`make` to the id parameters it overrides, so that
    ``make("cka", debiased=True)`` replaces the alias's ``hsic=gretton`` instead of contradicting it.
    """
    _REGISTRY.add_family(name, build, variants, aliases or {}, replaces or {}, overwrite)


def unregister(id_or_alias: str) -> None:
    """Remove a measure (and the aliases pointing at it) or a single alias."""
    _REGISTRY.remove(id_or_alias)


def make(id_or_alias: str | Measure, **params: Any) -> Measure:
    """Build a measure from a canonical id or an alias, optionally overriding parameters.

    ``make("cka")``, ``make("cka-kernel=linear-hsic=song-score")``, ``make("cka", kernel="rbf", sigma=0.5)``.
    ``dtype=`` sets the compute dtype (float64 by default) without changing the id.
    """
    dtype = params.pop("dtype", "default")
    if not isinstance(id_or_alias, str | Measure):
        raise UnknownNameError(
            f"a measure is an id or alias string (e.g. 'cka') or a Measure, got {type(id_or_alias).__name__} "
            f"{id_or_alias!r}. `repsim measures` or rp.measures.list() shows every registered id."
        )
    if isinstance(id_or_alias, Measure):
        measure = id_or_alias if not params else make(id_or_alias.id, **params)
    else:
        measure = _make(id_or_alias, params)
    return measure if dtype == "default" else measure.with_dtype(dtype)


def _make(name: str, params: dict[str, Any]) -> Measure:
    load_plugins()
    target = _REGISTRY.aliases.get(name, name)
    if target not in _REGISTRY.measures:  # similarity-repository's spelling of one of ours
        target = from_similarity_repository(target) or target
    if not params and target in _REGISTRY.measures:
        return _REGISTRY.measures[target]
    try:
        spec = Spec.parse(target)
    except RepsimError:
        raise _REGISTRY.unknown(name) from None
    build = _REGISTRY.families.get(spec.name)
    if build is not None:
        merged = dict(spec.params)
        for given in params:
            for replaced in _REGISTRY.replaces.get(spec.name, {}).get(given, ()):
                if replaced not in params:
                    merged.pop(replaced, None)
        merged.update(params)
        measure = build(merged)
        if spec.suffix is not None and measure.spec.suffix != spec.suffix:
            raise UnknownNameError(
                f"{name!r}: measures of family {spec.name!r} end in {measure.spec.suffix!r}, not {spec.suffix!r}."
            )
        return measure
    if target in _REGISTRY.measures:
        return _bind(_REGISTRY.measures[target], params)
    raise _REGISTRY.unknown(name)


def _bind(measure: Measure, params: dict[str, Any]) -> Measure:
    """A registered measure with extra keyword arguments bound; its declared estimators do not know them."""
    spec = Spec(measure.spec.name, measure.spec.params + tuple(sorted(params.items())), measure.spec.suffix)
    return _copy(measure, fn=functools.partial(measure.fn, **params), spec=spec, params=dict(params), estimators={})


def list_measures(pattern: str = "*") -> list[str]:
    """Canonical ids whose id or one of whose aliases matches the glob ``pattern``, sorted."""
    load_plugins()
    with _REGISTRY.lock:
        hits = {mid for mid in _REGISTRY.measures if fnmatch.fnmatchcase(mid, pattern)}
        hits |= {t for a, t in _REGISTRY.aliases.items() if fnmatch.fnmatchcase(a, pattern)}
    return sorted(hits)


def aliases() -> dict[str, str]:
    """Every alias and the canonical id it resolves to."""
    load_plugins()
    return dict(sorted(_REGISTRY.aliases.items()))


# --- plugins ---------------------------------------------------------------------------------------------------------


def load_plugins(force: bool = False) -> list[str]:
    """Load third-party measures from the entry-point group ``repsim_plugin.measures`` (once, lazily).

    An entry point may name a :class:`Measure` (registered as is) or a callable taking no arguments that
    registers measures itself. A plugin that fails to load becomes a :class:`PluginLoadWarning`; the rest of the
    registry keeps working. Returns the names of the entry points loaded successfully.
    """
    return _REGISTRY.load_plugins(ENTRY_POINT_GROUP, Measure, force)
