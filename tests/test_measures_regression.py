"""Linear regression R^2 against scikit-learn (LinearRegression + r2_score, variance weighted), asymmetry,
rank deficiency and the trivial-fit warning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score

import repsim_plugin as rp
from repsim_plugin.errors import RepsimError, UnknownNameError
from repsim_plugin.measures.cca import TrivialCorrelationWarning
from repsim_plugin.testing import check_measure


def sklearn_r2(source: np.ndarray, target: np.ndarray) -> float:
    fit = LinearRegression().fit(source, target)
    return float(r2_score(target, fit.predict(source), multioutput="variance_weighted"))


def pair(n: int, p: int, q: int, seed: int):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) * rng.uniform(0.1, 5, p) + 10
    Y = np.sin(X @ rng.standard_normal((p, q)) / 5) + 0.3 * rng.standard_normal((n, q))
    return X, Y


@pytest.mark.parametrize(("n", "p", "q", "seed"), [(100, 5, 3, 0), (60, 2, 7, 1), (200, 20, 20, 2)])
def test_r2_matches_sklearn_in_both_directions(n, p, q, seed):
    X, Y = pair(n, p, q, seed)
    xy = float(rp.measures.make("linreg")(X, Y))
    yx = float(rp.measures.make("linreg-direction=yx-r2")(X, Y))
    assert xy == pytest.approx(sklearn_r2(X, Y), abs=1e-10)
    assert yx == pytest.approx(sklearn_r2(Y, X), abs=1e-10)


def test_r2_is_asymmetric():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((80, 6))
    Y = X[:, :2] @ rng.standard_normal((2, 2))  # Y is a linear function of X, not the other way round
    assert float(rp.measures.make("linreg")(X, Y)) == pytest.approx(1.0, abs=1e-12)
    assert float(rp.measures.make("linreg")(Y, X)) < 0.6


def test_invertible_maps_of_the_predictor_do_not_matter_but_of_the_target_do():
    X, Y = pair(90, 4, 3, 4)
    rng = np.random.default_rng(5)
    M = rng.standard_normal((4, 4)) + 3 * np.eye(4)
    N = np.diag([1.0, 10.0, 0.1])
    m = rp.measures.make("linreg")
    assert float(m(X @ M, Y)) == pytest.approx(float(m(X, Y)), abs=1e-10)
    assert abs(float(m(X, Y @ N)) - float(m(X, Y))) > 1e-3
    assert "invertible_linear" not in m.invariances  # the harness needs an invariance on both sides


def test_rank_deficient_predictors_use_the_minimum_norm_fit():
    X, Y = pair(50, 4, 3, 6)
    redundant = np.hstack([X, X[:, :2] + X[:, 2:], np.full((50, 2), 1.0)])
    assert float(rp.measures.make("linreg")(redundant, Y)) == pytest.approx(sklearn_r2(X, Y), abs=1e-9)


def test_a_predictor_spanning_every_direction_warns_and_fits_noise_perfectly():
    rng = np.random.default_rng(7)
    X, Y = rng.standard_normal((15, 14)), rng.standard_normal((15, 2))
    with pytest.warns(TrivialCorrelationWarning, match="R\\^2 = 1"):
        got = float(rp.measures.make("linreg")(X, Y))
    assert got == pytest.approx(1.0, abs=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rp.measures.make("linreg")(*pair(40, 5, 2, 8))


def test_gradients_flow():
    X = torch.randn(20, 3, dtype=torch.float64, requires_grad=True)
    Y = torch.randn(20, 2, dtype=torch.float64, requires_grad=True)
    m = rp.measures.make("linreg")
    assert torch.autograd.gradcheck(lambda a, b: m(a, b), (X, Y), eps=1e-6, atol=1e-5)


def test_builder_errors():
    with pytest.raises(UnknownNameError):
        rp.measures.make("linreg", direction="both")
    with pytest.raises(RepsimError, match="no parameter"):
        rp.measures.make("linreg", ridge=0.1)


@pytest.mark.parametrize("mid", rp.measures.list("linreg*"))
def test_regression_declares_everything_that_holds(mid):
    check_measure(mid, strict=True)
