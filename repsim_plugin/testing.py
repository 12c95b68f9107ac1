"""Conformance checks that any measure (built-in or a plugin's) can be run through.

``check_measure(measure)`` verifies every property the measure *declares*, numerically:
each invariance, symmetry, the metric axioms (also across different feature counts), the value range and self
value, ``min_samples`` enforcement, the output contract (0-d tensor, compute dtype, numpy input, float32 / float16
input, no stray non-package warnings), the direction (a near copy must not look less similar than independent
data), and ``torch.autograd.gradcheck`` for differentiable measures. A new measure is tested by registering it: the test
suite runs this over every registered id.

It also probes the properties a measure does *not* declare (invariances, symmetry, the metric axioms of a
distance): one that holds numerically is listed in ``report.notes`` ("declared too little"), and with
``strict=True`` it counts as a failure. Warnings of the package (``RepsimWarning``) are expected at the tiny
sample sizes some checks use and are silenced there.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import RepsimError, RepsimWarning, SmallSampleBiasWarning, TooFewSamplesError
from .measures import INVARIANCES, Measure, list_measures, make


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


def random_orthogonal(d: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal (d, d) matrix (QR of a Gaussian matrix with sign correction)."""
    A = torch.randn(d, d, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return Q * torch.sign(torch.diagonal(R))


def invariance_transforms(d: int, generator: torch.Generator) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """One random instance of each invariance transformation for data with ``d`` features."""
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


def check_measure(
    measure: Measure | str,
    *,
    n: int | None = None,
    p: int = 6,
    q: int = 5,
    seed: int = 0,
    atol: float = 1e-7,
    rtol: float = 1e-7,
    trials: int = 2,
    gradcheck_n: int | None = None,
    raise_on_failure: bool = True,
    strict: bool = False,
) -> ConformanceReport:
    """Verify numerically every property ``measure`` declares; raise ``AssertionError`` listing the failures.

    ``n`` defaults to ``max(60, 4 * min_samples)`` so that nearest-neighbour and CCA-type measures are well
    defined; ``trials`` random problems are drawn per check. ``strict=True`` also fails on properties that hold
    but are not declared (listed in ``report.notes`` otherwise).
    """
    m = make(measure) if isinstance(measure, str) else measure
    with warnings.catch_warnings():
        # the checks use small n on purpose; the small-sample bias warning is expected noise here
        warnings.simplefilter("ignore", SmallSampleBiasWarning)
        report = _run_checks(m, n, p, q, seed, atol, rtol, trials, gradcheck_n)
    if strict:
        report.failures.update({name: f"holds but is not declared: {detail}" for name, detail in report.notes.items()})
    if raise_on_failure and not report.ok:
        raise AssertionError(str(report))
    return report


def _run_checks(
    m: Measure,
    n: int | None,
    p: int,
    q: int,
    seed: int,
    atol: float,
    rtol: float,
    trials: int,
    gradcheck_n: int | None,
) -> ConformanceReport:
    report = ConformanceReport(m.id)
    n = n or max(60, 4 * m.min_samples)
    gen = torch.Generator().manual_seed(seed)

    def run(name: str, check: Callable[[], str | None]) -> None:
        try:
            problem = check()
        except Exception as exc:  # a crash is a failed check, reported with the rest
            problem = f"raised {type(exc).__name__}: {exc}"
        if problem:
            report.failures[name] = problem
        else:
            report.passed.append(name)

    problems = [_pair(n, p, q, gen) for _ in range(trials)]

    def value(X: Any, Y: Any) -> float:
        return float(m(X, Y).detach())

    def output_contract() -> str | None:
        X, Y = problems[0]
        out = m(X, Y)
        if not isinstance(out, torch.Tensor) or out.ndim != 0:
            return f"returned {type(out).__name__} of shape {getattr(out, 'shape', None)}, not a 0-d tensor"
        if m.dtype is not None and out.dtype != m.dtype:
            return f"returned dtype {out.dtype}, expected the compute dtype {m.dtype}"
        if out.device != X.device:
            return f"returned on {out.device}, inputs on {X.device}"
        if not math.isfinite(float(out)):
            return f"returned {float(out)} on well-conditioned data"
        from_numpy = value(X.numpy(), Y.numpy())
        if not _close(from_numpy, float(out), atol, rtol):
            return f"numpy input gave {from_numpy}, torch input {float(out)}"
        from_f32 = value(X.float(), Y.float())
        if not _close(from_f32, float(out), 1e-4, 1e-4):
            return f"float32 input gave {from_f32}, float64 input {float(out)}"
        return None

    def invariance(kind: str) -> Callable[[], str | None]:
        def check() -> str | None:
            for X, Y in problems:
                base = value(X, Y)
                tx = invariance_transforms(X.shape[1], gen)[kind]
                ty = invariance_transforms(Y.shape[1], gen)[kind]
                for label, args in (("X", (tx(X), Y)), ("Y", (X, ty(Y))), ("both", (tx(X), ty(Y)))):
                    moved = value(*args)
                    if not _close(moved, base, atol, rtol):
                        return f"transforming {label}: {moved!r} != {base!r}"
            return None

        return check

    def symmetry() -> str | None:
        for X, Y in problems:
            a, b = value(X, Y), value(Y, X)
            if not _close(a, b, atol, rtol):
                return f"m(X, Y) = {a!r} but m(Y, X) = {b!r}"
        return None

    def self_value() -> str | None:
        for X, Y in problems:
            for Z in (X, Y):
                got = value(Z, Z)
                if not _close(got, float(m.self_value), atol, rtol):  # type: ignore[arg-type]
                    return f"m(X, X) = {got!r}, declared {m.self_value!r}"
        return None

    def value_range() -> str | None:
        low, high = m.value_range
        X0, _ = problems[0]
        candidates = [*problems, (X0, X0), (X0, torch.randn(X0.shape, generator=gen, dtype=torch.float64))]
        for X, Y in candidates:
            got = value(X, Y)
            slack = atol + rtol * abs(got)
            if (low is not None and got < low - slack) or (high is not None and got > high + slack):
                return f"value {got!r} outside the declared range {m.value_range}"
        return None

    def minimum_samples() -> str | None:
        X, Y = problems[0]
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
        Xs = torch.randn(k, p, generator=gen, dtype=torch.float64)
        Ys = torch.randn(k, q, generator=gen, dtype=torch.float64)
        with contextlib.suppress(RepsimError), warnings.catch_warnings():
            warnings.simplefilter("ignore", RepsimWarning)
            m(Xs, Ys)
        return None

    def metric_axioms() -> str | None:
        for t in range(3 * trials):
            # the last trials mix feature counts: a metric between representations must allow p != q
            pa, pb, pc = (p, p, p) if t < 2 * trials else (p, q, p + 2)
            A = torch.randn(n, pa, generator=gen, dtype=torch.float64)
            B = torch.randn(n, pb, generator=gen, dtype=torch.float64)
            B[:, : min(pa, pb)] += A[:, : min(pa, pb)]
            C = torch.randn(n, pc, generator=gen, dtype=torch.float64)
            for first, second, third in ((A, B, C), (B, C, A), (C, A, B)):
                ab, bc, ac = value(first, second), value(second, third), value(first, third)
                if min(ab, bc, ac) < -atol:
                    return f"negative distance {min(ab, bc, ac)!r}"
                if ac > ab + bc + atol:
                    return f"triangle inequality fails: d(A,C) = {ac!r} > d(A,B) + d(B,C) = {ab + bc!r}"
            if abs(value(A, A)) > atol:
                return f"d(A, A) = {value(A, A)!r} != 0"
        return None

    def direction() -> str | None:
        # a slightly perturbed copy must not look less similar than independent data of the same shape
        for X, Y in problems:
            near = value(X, X + 0.05 * X.std() * torch.randn(X.shape, generator=gen, dtype=torch.float64))
            far = value(X, torch.randn(Y.shape, generator=gen, dtype=torch.float64))
            # a declared direction that is backwards shows as a strict reversal (a constant measure ties: fine)
            reversed_order = near < far if m.larger_is_more_similar else near > far
            if reversed_order:
                word = "larger" if m.larger_is_more_similar else "smaller"
                return f"declared {word} = more similar, but a near copy scores {near!r} and independent data {far!r}"
        return None

    def no_stray_warnings() -> str | None:
        X, Y = problems[0]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m(X, Y)
        stray = [w for w in caught if not issubclass(w.category, RepsimWarning)]
        if stray:
            w = stray[0]
            return f"emitted {w.category.__name__} on well-conditioned data: {w.message}"
        return None

    def gradients() -> str | None:
        k = gradcheck_n or max(12, m.min_samples + 8)
        g = torch.Generator().manual_seed(seed + 1)
        X = torch.randn(k, 3, generator=g, dtype=torch.float64, requires_grad=True)
        Y = (X.detach() @ torch.randn(3, 3, generator=g, dtype=torch.float64)).tanh()
        Y = (Y + 0.3 * torch.randn(k, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
        measure64 = m.with_dtype(torch.float64)
        out = measure64(X, Y)
        if out.grad_fn is None:
            return "declared differentiable, but the output carries no autograd graph"
        ok = torch.autograd.gradcheck(lambda a, b: measure64(a, b), (X, Y), eps=1e-6, atol=1e-5, rtol=1e-4)
        return None if ok else "gradcheck failed"

    def probe(name: str, check: Callable[[], str | None], detail: str) -> None:
        """An undeclared property: note it when it holds (it might deserve declaring)."""
        try:
            problem = check()
        except Exception:  # a crash or failure means the property does not hold: nothing to note
            return
        if not problem:
            report.notes[name] = detail

    run("output_contract", output_contract)
    run("no_stray_warnings", no_stray_warnings)
    run("direction", direction)
    for kind in sorted(m.invariances):
        run(f"invariance:{kind}", invariance(kind))
    for kind in sorted(INVARIANCES - m.invariances):
        probe(f"invariance:{kind}", invariance(kind), f"{m.id} seems invariant to {kind} transformations")
    if m.symmetric:
        run("symmetric", symmetry)
    else:
        probe("symmetric", symmetry, f"m(X, Y) == m(Y, X) on every trial although {m.id} is declared asymmetric")
    if not m.is_metric and not m.larger_is_more_similar:
        probe("metric_axioms", metric_axioms, f"{m.id} satisfies the metric axioms on random triples")
    if m.self_value is not None:
        run("self_value", self_value)
    if m.value_range != (None, None):
        run("value_range", value_range)
    run("min_samples", minimum_samples)
    if m.is_metric:
        run("metric_axioms", metric_axioms)
    if m.differentiable:
        run("gradcheck", gradients)
    return report


def check_all(pattern: str = "*", **kwargs: Any) -> dict[str, ConformanceReport]:
    """Run :func:`check_measure` over every registered measure matching ``pattern``; never raises."""
    return {mid: check_measure(mid, raise_on_failure=False, **kwargs) for mid in list_measures(pattern)}


def registered_ids(pattern: str = "*") -> Iterable[str]:
    """Registered ids, for ``pytest.mark.parametrize``."""
    return list_measures(pattern)


__all__ = [
    "ConformanceReport",
    "check_all",
    "check_measure",
    "invariance_transforms",
    "random_orthogonal",
    "registered_ids",
]
