"""The conformance checks behind :func:`repsim_plugin.testing.check_measure`: one function per property.

Each check takes a :class:`Context` (the measure, its tolerances, one shared generator, the random problems) and
returns None when the property holds, else what went wrong; :func:`run_checks` runs them in the order
:func:`plan` gives (they share one generator, so the order matters) and fills a :class:`ConformanceReport`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from ._utils.checks import Instance, Int, check_params
from .errors import RepsimError, RepsimWarning, TooFewSamplesError
from .measures import INVARIANCES, Measure

__all__ = [
    "RANDOM_ORTHOGONAL_PARAMS",
    "ConformanceReport",
    "Context",
    "invariance_transforms",
    "random_orthogonal",
    "run_checks",
]


@dataclass
class ConformanceReport:
    """Outcome of :func:`check_measure`: which checks ran and the ones that failed, with details."""

    measure_id: str
    passed: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    #: properties that hold numerically but are not declared (e.g. ``"invariance:translation"``), with details
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        lines = [f"{self.measure_id}: {len(self.passed)} checks passed, {len(self.failures)} failed"]
        lines += [f"  FAIL {name}: {detail}" for name, detail in self.failures.items()]
        lines += [f"  NOTE {name}: {detail}" for name, detail in self.notes.items()]
        return "\n".join(lines)


#: The parameters of :func:`random_orthogonal` and :func:`invariance_transforms`.
RANDOM_ORTHOGONAL_PARAMS = {"d": Int(minimum=1), "generator": Instance(torch.Generator, "a torch.Generator")}


def random_orthogonal(d: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal (d, d) matrix (QR of a Gaussian matrix with sign correction)."""
    check_params(RANDOM_ORTHOGONAL_PARAMS, d=d, generator=generator)
    A = torch.randn(d, d, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return Q * torch.sign(torch.diagonal(R))


def invariance_transforms(d: int, generator: torch.Generator) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """One random instance of each invariance transformation for data with ``d`` features."""
    check_params(RANDOM_ORTHOGONAL_PARAMS, d=d, generator=generator)
    Q = random_orthogonal(d, generator)
    # a well-conditioned but far from orthogonal map: singular values spread over [0.3, 3]
    U, V = random_orthogonal(d, generator), random_orthogonal(d, generator)
    s = torch.logspace(math.log10(0.3), math.log10(3.0), d, dtype=torch.float64)
    M = U @ torch.diag(s) @ V.T
    shift = 5.0 * torch.randn(1, d, generator=generator, dtype=torch.float64)
    perm = torch.randperm(d, generator=generator)
    return {
        "orthogonal": lambda X: X @ Q,
        "isotropic_scaling": lambda X: 37.5 * X,
        "translation": lambda X: X + shift,
        "invertible_linear": lambda X: X @ M,
        "permutation": lambda X: X[:, perm],
    }


def _pair(n: int, p: int, q: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Related but not identical representations: Y is a noisy nonlinear map of X."""
    X = torch.randn(n, p, generator=generator, dtype=torch.float64)
    W = torch.randn(p, q, generator=generator, dtype=torch.float64)
    Y = torch.tanh(X @ W / math.sqrt(p)) + 0.3 * torch.randn(n, q, generator=generator, dtype=torch.float64)
    return X, Y


def _close(a: float, b: float, atol: float, rtol: float) -> bool:
    return abs(a - b) <= atol + rtol * abs(b)


# --- the checks ---------------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What every check works on: the measure, the tolerances, one shared generator and the random problems."""

    m: Measure
    n: int
    p: int
    q: int
    seed: int
    atol: float
    rtol: float
    trials: int
    gradcheck_n: int | None
    gen: torch.Generator
    problems: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def draw(
        cls,
        m: Measure,
        n: int | None,
        p: int,
        q: int,
        seed: int,
        atol: float,
        rtol: float,
        trials: int,
        gradcheck_n: int | None,
    ) -> Context:
        n = n if n is not None else max(60, 4 * m.min_samples)
        gen = torch.Generator().manual_seed(seed)
        problems = [_pair(n, p, q, gen) for _ in range(trials)]
        return cls(m, n, p, q, seed, atol, rtol, trials, gradcheck_n, gen, problems)

    def value(self, X: Any, Y: Any) -> float:
        return float(self.m(X, Y).detach())

    def close(self, a: float, b: float) -> bool:
        return _close(a, b, self.atol, self.rtol)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64)


#: A check returns None when it passes, else what went wrong.
Check = Callable[[Context], str | None]


def _output_contract(ctx: Context) -> str | None:
    """A finite 0-d tensor in the compute dtype, on the inputs' device; numpy and float32 inputs agree."""
    m, (X, Y) = ctx.m, ctx.problems[0]
    out = m(X, Y)
    if not isinstance(out, torch.Tensor) or out.ndim != 0:
        return f"returned {type(out).__name__} of shape {getattr(out, 'shape', None)}, not a 0-d tensor"
    if m.dtype is not None and out.dtype != m.dtype:
        return f"returned dtype {out.dtype}, expected the compute dtype {m.dtype}"
    if out.device != X.device:
        return f"returned on {out.device}, inputs on {X.device}"
    if not math.isfinite(float(out)):
        return f"returned {float(out)} on well-conditioned data"
    from_numpy = ctx.value(X.numpy(), Y.numpy())
    if not ctx.close(from_numpy, float(out)):
        return f"numpy input gave {from_numpy}, torch input {float(out)}"
    from_f32 = ctx.value(X.float(), Y.float())
    if not _close(from_f32, float(out), 1e-4, 1e-4):
        return f"float32 input gave {from_f32}, float64 input {float(out)}"
    return None


def _invariance(ctx: Context, kind: str) -> str | None:
    """Transforming X, Y or both by a random ``kind`` transformation leaves the value unchanged."""
    for X, Y in ctx.problems:
        base = ctx.value(X, Y)
        tx = invariance_transforms(X.shape[1], ctx.gen)[kind]
        ty = invariance_transforms(Y.shape[1], ctx.gen)[kind]
        for label, args in (("X", (tx(X), Y)), ("Y", (X, ty(Y))), ("both", (tx(X), ty(Y)))):
            moved = ctx.value(*args)
            if not ctx.close(moved, base):
                return f"transforming {label}: {moved!r} != {base!r}"
    return None


def _symmetry(ctx: Context) -> str | None:
    for X, Y in ctx.problems:
        a, b = ctx.value(X, Y), ctx.value(Y, X)
        if not ctx.close(a, b):
            return f"m(X, Y) = {a!r} but m(Y, X) = {b!r}"
    return None


def _self_value(ctx: Context) -> str | None:
    declared = ctx.m.self_value
    for X, Y in ctx.problems:
        for Z in (X, Y):
            got = ctx.value(Z, Z)
            if declared is not None and not ctx.close(got, float(declared)):
                return f"m(X, X) = {got!r}, declared {declared!r}"
    return None


def _value_range(ctx: Context) -> str | None:
    low, high = ctx.m.value_range
    X0, _ = ctx.problems[0]
    candidates = [*ctx.problems, (X0, X0), (X0, ctx.randn(*X0.shape))]
    for X, Y in candidates:
        got = ctx.value(X, Y)
        slack = ctx.atol + ctx.rtol * abs(got)
        if (low is not None and got < low - slack) or (high is not None and got > high + slack):
            return f"value {got!r} outside the declared range {ctx.m.value_range}"
    return None


def _minimum_samples(ctx: Context) -> str | None:
    m, (X, Y) = ctx.m, ctx.problems[0]
    k = m.min_samples
    if k > 1:
        try:
            m(X[: k - 1], Y[: k - 1])
        except TooFewSamplesError:
            pass
        else:
            return f"accepted n={k - 1} although min_samples={k}"
    # at n = min_samples a well-spread input must either work or fail with a RepsimError, never crash;
    # a package warning (e.g. "too few samples for p features") is expected at this size
    Xs, Ys = ctx.randn(k, ctx.p), ctx.randn(k, ctx.q)
    with contextlib.suppress(RepsimError), warnings.catch_warnings():
        warnings.simplefilter("ignore", RepsimWarning)
        m(Xs, Ys)
    return None


def _metric_axioms(ctx: Context) -> str | None:
    p, q, atol = ctx.p, ctx.q, ctx.atol
    for t in range(3 * ctx.trials):
        # the last trials mix feature counts: a metric between representations must allow p != q
        pa, pb, pc = (p, p, p) if t < 2 * ctx.trials else (p, q, p + 2)
        A, B = ctx.randn(ctx.n, pa), ctx.randn(ctx.n, pb)
        B[:, : min(pa, pb)] += A[:, : min(pa, pb)]
        C = ctx.randn(ctx.n, pc)
        for first, second, third in ((A, B, C), (B, C, A), (C, A, B)):
            ab, bc, ac = ctx.value(first, second), ctx.value(second, third), ctx.value(first, third)
            if min(ab, bc, ac) < -atol:
                return f"negative distance {min(ab, bc, ac)!r}"
            if ac > ab + bc + atol:
                return f"triangle inequality fails: d(A,C) = {ac!r} > d(A,B) + d(B,C) = {ab + bc!r}"
        if abs(ctx.value(A, A)) > atol:
            return f"d(A, A) = {ctx.value(A, A)!r} != 0"
    return None


def _direction(ctx: Context) -> str | None:
    """A slightly perturbed copy must not look less similar than independent data of the same shape."""
    larger = ctx.m.larger_is_more_similar
    for X, Y in ctx.problems:
        near = ctx.value(X, X + 0.05 * X.std() * ctx.randn(*X.shape))
        far = ctx.value(X, ctx.randn(*Y.shape))
        # a declared direction that is backwards shows as a strict reversal (a constant measure ties: fine)
        reversed_order = near < far if larger else near > far
        if reversed_order:
            word = "larger" if larger else "smaller"
            return f"declared {word} = more similar, but a near copy scores {near!r} and independent data {far!r}"
    return None


def _no_stray_warnings(ctx: Context) -> str | None:
    X, Y = ctx.problems[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx.m(X, Y)
    stray = [w for w in caught if not issubclass(w.category, RepsimWarning)]
    if stray:
        w = stray[0]
        return f"emitted {w.category.__name__} on well-conditioned data: {w.message}"
    return None


def _gradients(ctx: Context) -> str | None:
    """``torch.autograd.gradcheck`` in float64 on a small problem of its own (seeded ``seed + 1``)."""
    k = ctx.gradcheck_n or max(12, ctx.m.min_samples + 8)
    g = torch.Generator().manual_seed(ctx.seed + 1)
    X = torch.randn(k, 3, generator=g, dtype=torch.float64, requires_grad=True)
    Y = (X.detach() @ torch.randn(3, 3, generator=g, dtype=torch.float64)).tanh()
    Y = (Y + 0.3 * torch.randn(k, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    measure64 = ctx.m.with_dtype(torch.float64)
    out = measure64(X, Y)
    if out.grad_fn is None:
        return "declared differentiable, but the output carries no autograd graph"
    ok = torch.autograd.gradcheck(lambda a, b: measure64(a, b), (X, Y), eps=1e-6, atol=1e-5, rtol=1e-4)
    return None if ok else "gradcheck failed"


# --- the runner ---------------------------------------------------------------------------------------------------


def plan(m: Measure) -> Iterator[tuple[str, Check, str | None]]:
    """``(name, check, note)`` in the order the checks run (they share one generator, so the order matters).

    ``note`` is None for a declared property (a problem is a failure); otherwise the property is undeclared and
    ``note`` is what ``report.notes`` says when it holds anyway.
    """
    yield "output_contract", _output_contract, None
    yield "no_stray_warnings", _no_stray_warnings, None
    yield "direction", _direction, None
    for kind in sorted(m.invariances):
        yield f"invariance:{kind}", partial(_invariance, kind=kind), None
    for kind in sorted(INVARIANCES - m.invariances):
        note = f"{m.id} seems invariant to {kind} transformations"
        yield f"invariance:{kind}", partial(_invariance, kind=kind), note
    asymmetric = f"m(X, Y) == m(Y, X) on every trial although {m.id} is declared asymmetric"
    yield "symmetric", _symmetry, None if m.symmetric else asymmetric
    if not m.is_metric and not m.larger_is_more_similar:
        yield "metric_axioms", _metric_axioms, f"{m.id} satisfies the metric axioms on random triples"
    if m.self_value is not None:
        yield "self_value", _self_value, None
    if m.value_range != (None, None):
        yield "value_range", _value_range, None
    yield "min_samples", _minimum_samples, None
    if m.is_metric:
        yield "metric_axioms", _metric_axioms, None
    if m.differentiable:
        yield "gradcheck", _gradients, None


def run_checks(ctx: Context) -> ConformanceReport:
    """Run the plan: a declared property passes or fails (a crash is a failure, reported with the rest); an
    undeclared one that holds is noted (a crash or a problem means it does not hold: nothing to note)."""
    report = ConformanceReport(ctx.m.id)
    for name, check, note in plan(ctx.m):
        try:
            problem = check(ctx)
        except Exception as exc:
            problem = f"raised {type(exc).__name__}: {exc}"
            if note is not None:
                continue
        if note is not None:
            if not problem:
                report.notes[name] = note
        elif problem:
            report.failures[name] = problem
        else:
            report.passed.append(name)
    return report
