"""Every bad input gets a ValueError subclass whose message names the problem and the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import repsim_plugin as rp
from repsim_plugin.errors import (
    DegenerateInputError,
    InputDtypeError,
    InputShapeError,
    NonFiniteInputError,
    RepsimError,
    TooFewSamplesError,
    UnknownNameError,
)

ALL = ["cka", "debiased_cka", "rbf_cka", "debiased_rbf_cka"]


@pytest.fixture
def XY():
    g = torch.Generator().manual_seed(0)
    return torch.randn(20, 4, generator=g), torch.randn(20, 3, generator=g)


@pytest.mark.parametrize("name", ALL)
def test_mismatched_samples(name, XY):
    X, Y = XY
    with pytest.raises(InputShapeError, match=r"X has 20 samples .* Y has 19"):
        rp.measures.make(name)(X, Y[:19])


def test_transposed_input_gets_a_hint(XY):
    X, _ = XY
    with pytest.raises(InputShapeError, match="transpose"):
        rp.similarity(X, X.T @ X)  # (4, 4) against (20, 4): looks like (features, samples)


@pytest.mark.parametrize(("name", "minimum"), [("cka", 2), ("debiased_cka", 4), ("debiased_rbf_cka", 4)])
def test_too_few_samples(name, minimum, XY):
    X, Y = XY
    with pytest.raises(TooFewSamplesError, match=f"at least {minimum}"):
        rp.measures.make(name)(X[: minimum - 1], Y[: minimum - 1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ALL)
def test_non_finite(bad, name, XY):
    X, Y = XY
    Y = Y.clone()
    Y[7, 1] = bad
    with pytest.raises(NonFiniteInputError, match=r"Y contains .* row 7"):
        rp.measures.make(name)(X, Y)


@pytest.mark.parametrize("name", ALL)
def test_zero_variance(name, XY):
    X, _ = XY
    with pytest.raises(DegenerateInputError, match="zero variance"):
        rp.measures.make(name)(X, torch.full((20, 3), 0.1))


def test_median_bandwidth_zero_is_an_error_not_nan():
    X = torch.zeros(20, 2)
    X[:3] = torch.randn(3, 2)  # 17 identical samples: the median distance is 0
    with pytest.raises(DegenerateInputError, match="median"):
        rp.similarity(X, torch.randn(20, 2), "rbf_cka")
    # the fixed-bandwidth rule is the way out the message names
    assert 0 <= rp.similarity(X, torch.randn(20, 2), "rbf_cka", bandwidth="fixed", sigma=1.0) <= 1


@pytest.mark.parametrize("shape", [(20,), (20, 3, 2), (2, 20, 3, 2)])
def test_wrong_number_of_dimensions(shape, XY):
    _, Y = XY
    with pytest.raises(InputShapeError, match="2-D"):
        rp.similarity(torch.randn(*shape), Y)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_integer_bool_complex_dtypes(dtype, XY):
    _, Y = XY
    with pytest.raises(InputDtypeError, match="floating-point"):
        rp.similarity(torch.ones(20, 3).to(dtype), Y)


def test_integer_numpy_and_lists(XY):
    _, Y = XY
    with pytest.raises(InputDtypeError, match="astype"):
        rp.similarity(np.arange(60).reshape(20, 3), Y)
    with pytest.raises(InputDtypeError, match=r"torch\.Tensor or a numpy array"):
        rp.similarity([[1.0, 2.0]] * 20, Y)


def test_no_features(XY):
    _, Y = XY
    with pytest.raises(InputShapeError, match="no features"):
        rp.similarity(torch.randn(20, 0), Y)


def test_unknown_measure_suggests():
    with pytest.raises(UnknownNameError, match="Did you mean 'debiased_cka'"):
        rp.measures.make("debiassed_cka")


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"sigma": 0.5}, "kernel='rbf'"),
        ({"kernel": "laplace"}, "unknown kernel"),
        ({"hsic": "lange"}, "unknown HSIC estimator"),
        ({"kernel": "rbf", "sigma": -1}, "positive"),
        ({"kernel": "rbf", "bandwidth": "mean"}, "bandwidth rule"),
        ({"debiased": True, "hsic": "gretton"}, "contradicts"),
        ({"colour": "red"}, "no parameter"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(RepsimError, match=match):
        rp.measures.make("cka", **params)


def test_every_error_is_a_value_error():
    for cls in (InputShapeError, InputDtypeError, NonFiniteInputError, DegenerateInputError, TooFewSamplesError):
        assert issubclass(cls, ValueError)
