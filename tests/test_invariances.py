"""Property tests (hypothesis): CKA's invariances hold for random shapes, transformations and data."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import repsim_plugin as rp
from repsim_plugin.testing import random_orthogonal

MEASURES = ["cka", "debiased_cka", "rbf_cka", "debiased_rbf_cka"]


@st.composite
def problems(draw):
    n = draw(st.integers(8, 48))
    p = draw(st.integers(1, 12))
    q = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    relu = draw(st.booleans())
    Y = torch.randn(n, q, generator=g, dtype=torch.float64) + X[:, :1] * draw(st.floats(0, 3))
    if relu:  # skewed, mostly non-negative activations (leaky, so samples stay distinct)
        X = torch.nn.functional.leaky_relu(X, 0.05)
    return X, Y, g


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-8, abs_tol=1e-9)


@pytest.mark.parametrize("name", MEASURES)
@given(problem=problems(), log_scale=st.floats(-3, 3))
def test_isotropic_scaling(name, problem, log_scale):
    X, Y, _ = problem
    m = rp.measures.make(name)
    assert _close(float(m(X * 10**log_scale, Y)), float(m(X, Y)))


@pytest.mark.parametrize("name", MEASURES)
@given(problem=problems(), magnitude=st.floats(-1e4, 1e4))
def test_translation(name, problem, magnitude):
    X, Y, g = problem
    m = rp.measures.make(name)
    shift = magnitude * torch.rand(1, X.shape[1], generator=g, dtype=torch.float64)
    assert _close(float(m(X + shift, Y)), float(m(X, Y)))


@pytest.mark.parametrize("name", MEASURES)
@given(problem=problems())
def test_orthogonal(name, problem):
    X, Y, g = problem
    m = rp.measures.make(name)
    Q = random_orthogonal(X.shape[1], g)
    assert _close(float(m(X @ Q, Y)), float(m(X, Y)))


@pytest.mark.parametrize("name", MEASURES)
@given(problem=problems())
def test_permutation_of_features_and_symmetry(name, problem):
    X, Y, g = problem
    m = rp.measures.make(name)
    perm = torch.randperm(X.shape[1], generator=g)
    base = float(m(X, Y))
    assert _close(float(m(X[:, perm], Y)), base)
    assert _close(float(m(Y, X)), base)


@given(problem=problems())
def test_sample_order_matters_only_jointly(problem):
    """Permuting the rows of both inputs together leaves CKA unchanged (rows are paired samples)."""
    X, Y, g = problem
    perm = torch.randperm(X.shape[0], generator=g)
    assert _close(rp.similarity(X[perm], Y[perm]), rp.similarity(X, Y))


def test_linear_cka_is_not_invertible_linear_invariant():
    """PAPER.md: CKA(X, XM) for Gaussian M is about 1/sqrt(2 + 1/p) on isotropic data, not 1."""
    g = torch.Generator().manual_seed(0)
    p = 64
    X = torch.randn(20000, p, generator=g, dtype=torch.float64)
    vals = [rp.similarity(X, X @ torch.randn(p, p, generator=g, dtype=torch.float64)) for _ in range(5)]
    assert sum(vals) / len(vals) == pytest.approx(1 / math.sqrt(2 + 1 / p), abs=0.03)
