"""What "unrelated" reads as: the expected value of a measure for independent features of a given shape.

A biased linear CKA of 0.6 means little when two independent random representations of the same shape already
score 0.55 (Murphy et al. 2024: about ``sqrt(pq / ((n+p)(n+q)))``). :func:`null_baseline` estimates, for any
registered measure, its mean over a few draws of independent isotropic Gaussian features X (n, p) and Y (n, q);
:func:`null_baseline_map` does it for every cell of a layer x layer map (one estimate per distinct shape).

Linear CKA (a measure declaring the exact linear-CKA statistics as its estimator) has a closed form: about
``sqrt(pq / ((n+p)(n+q)))`` for the biased estimator, 0 for the debiased one (unbiased HSIC of independent
features has expectation 0); the Monte-Carlo mean agrees with the formula to 0.3% at n=450, p=q=576. Every other
measure is estimated by simulation, cached per (measure, n, p, q).

Wide layers (p > n) are drawn through their Gram matrix: X X^T of an (n, p) Gaussian matrix is Wishart(p, I_n),
and the Bartlett decomposition gives an (n, n) lower-triangular Z with the same distribution of Z Z^T. A measure
declared invariant to orthogonal maps reads only the Gram (rows' inner products), so the draw costs O(n^2), not
O(n p). Other measures on wide layers, and shapes beyond the size limits, get no baseline (``None``), with a
reason; nothing is approximated silently.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .errors import RepsimError
from .measures import Measure, make
from .measures.kernels import expected_null_cka

__all__ = [
    "DRAWS",
    "MAX_CELLS",
    "MAX_N",
    "TIME_BUDGET_S",
    "NullBaselineError",
    "linear_cka_kind",
    "null_baseline",
    "null_baseline_map",
]

#: Independent draws averaged per shape (the spread of the null is small next to the distances users read).
DRAWS = 2
#: A map's simulated baseline stops (None, with the reason) once it has taken this many seconds.
TIME_BUDGET_S = 20.0
#: No baseline for measures that would need more than this many samples (their (n, n) Grams grow as n^2).
MAX_N = 2000
#: ... or more than this many float64 entries per draw (n * (p + q)).
MAX_CELLS = 20_000_000


class NullBaselineError(RepsimError):
    """The null baseline cannot be estimated for this measure and shape (the message says why)."""


def _gaussian(rng: np.random.Generator, n: int, p: int, gram_only: bool) -> torch.Tensor:
    """(n, p) independent N(0, 1) features, or for p > n an (n, n) Bartlett factor with the same Gram law."""
    if p <= n or not gram_only:
        return torch.from_numpy(rng.standard_normal((n, p)))
    z = np.tril(rng.standard_normal((n, n)), k=-1)
    z[np.diag_indices(n)] = np.sqrt(rng.chisquare(p - np.arange(n)))
    return torch.from_numpy(z)


def linear_cka_kind(m: Measure) -> str | None:
    """``"gretton"`` (biased) / ``"song"`` (debiased) when ``m`` declares exact linear-CKA statistics, else None."""
    from .streaming import LinearCKAMap

    for estimator in m.exact_estimators().values():
        if estimator.resolve() is LinearCKAMap:
            return "song" if estimator.options.get("debiased") else "gretton"
    return None


_CACHE: dict[tuple[str, int, int, int, int, int], float] = {}


def null_baseline(
    measure: str | Measure, n: int, p: int, q: int, *, draws: int = DRAWS, seed: int = 0, simulate: bool = False
) -> float:
    """The expected value of ``measure`` for independent Gaussian features of shapes (n, p) and (n, q).

    Closed form for linear CKA (unless ``simulate``), else the mean over ``draws`` independent pairs (cached).
    Raises :class:`NullBaselineError` when the shape is beyond :data:`MAX_N` / :data:`MAX_CELLS` or the measure
    fails on random features (e.g. CCA with more features than samples).
    """
    m = make(measure) if isinstance(measure, str) else measure
    kind = None if simulate else linear_cka_kind(m)
    if kind == "gretton":
        return expected_null_cka(n, p, q)
    if kind == "song":
        return 0.0
    key = (m.id, n, p, q, draws, seed)
    if key not in _CACHE:
        _CACHE[key] = _simulate(m, n, p, q, draws, seed)
    return _CACHE[key]


def _simulate(m: Measure, n: int, p: int, q: int, draws: int, seed: int) -> float:
    if min(n, p, q) < 1:
        raise NullBaselineError(f"a null baseline needs n, p, q >= 1, got n={n}, p={p}, q={q}.")
    gram_only = "orthogonal" in m.invariances
    width = (min(p, n) if gram_only else p) + (min(q, n) if gram_only else q)
    if n * width > MAX_CELLS or (n > MAX_N and not m.streamable):
        raise NullBaselineError(
            f"no null baseline for {m.id} at n={n}, p={p}, q={q}: a draw would exceed the size limits "
            f"(n <= {MAX_N} for measures that do not stream, n * (p + q) <= {MAX_CELLS:,} entries)."
        )
    if not gram_only and max(p, q) > 4 * n:
        raise NullBaselineError(f"no null baseline for {m.id} with {max(p, q)} features for n={n} samples.")
    rng = np.random.default_rng([seed, n, p, q])
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-sample warnings are about the data, not about the null
        for _ in range(draws):
            X, Y = _gaussian(rng, n, p, gram_only), _gaussian(rng, n, q, gram_only)
            try:
                value = float(m(X, Y))
            except Exception as exc:  # a plugin measure may fail any way on random data: no baseline, with why
                raise NullBaselineError(f"no null baseline for {m.id} at n={n}, p={p}, q={q}: {exc}") from exc
            values.append(value)
    mean = float(np.mean(values))
    if not np.isfinite(mean):
        raise NullBaselineError(f"no null baseline for {m.id} at n={n}, p={p}, q={q}: the draws were not finite.")
    return mean


def null_baseline_map(
    measure: str | Measure, n: int, dims_a: Sequence[int], dims_b: Sequence[int], *, seed: int = 0
) -> tuple[torch.Tensor | None, str]:
    """The (La, Lb) matrix of :func:`null_baseline` per cell, and a note (how it was estimated, or why not)."""
    m = make(measure) if isinstance(measure, str) else measure
    cache: dict[tuple[int, int], float] = {}
    start = time.perf_counter()
    out = torch.empty(len(dims_a), len(dims_b), dtype=torch.float64)
    try:
        for i, p in enumerate(dims_a):
            for j, q in enumerate(dims_b):
                key = (int(p), int(q)) if not m.symmetric else (int(min(p, q)), int(max(p, q)))
                if key not in cache:
                    if time.perf_counter() - start > TIME_BUDGET_S:
                        raise NullBaselineError(
                            f"no null baseline: simulating {m.id} for every shape took over {TIME_BUDGET_S:g} s"
                        )
                    cache[key] = null_baseline(m, n, key[0], key[1], seed=seed)
                out[i, j] = cache[key]
    except NullBaselineError as exc:
        return None, str(exc)
    kind = linear_cka_kind(m)
    how = {
        "gretton": "sqrt(pq / ((n+p)(n+q))), biased linear CKA of independent Gaussian features (Murphy et al. 2024)",
        "song": "0: debiased linear CKA of independent features has expectation 0",
    }.get(kind or "", f"mean of {DRAWS} draws of independent Gaussian features of each cell's shape")
    return out, f"{how} (n={n}; {len(cache)} distinct shapes)"
