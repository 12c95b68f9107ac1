"""Invalid parameters of capture / Recorder, generated from their constraint table (CAPTURE_PARAMS)."""

from __future__ import annotations

import inspect
import re
from typing import Any

import pytest
import torch
from torch import nn

from repsim_plugin._utils.checks import Choice
from repsim_plugin.capture import Recorder, capture
from repsim_plugin.capture.recorder import CAPTURE_PARAMS
from repsim_plugin.errors import RepsimError, UnknownNameError

CASES = [(name, bad) for name, constraint in CAPTURE_PARAMS.items() for bad in constraint.bad_values()]


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


def _call(entry: Any, name: str, value: Any) -> Any:
    if name == "model":
        return entry(value, "0")
    return entry(_model(), "0", **{name: value})


def test_every_table_entry_is_a_parameter_of_capture_and_recorder() -> None:
    for entry in (capture, Recorder):
        assert set(CAPTURE_PARAMS) <= set(inspect.signature(entry).parameters)
    assert all(CAPTURE_PARAMS[name].bad_values() for name in CAPTURE_PARAMS)


@pytest.mark.parametrize("entry", [capture, Recorder], ids=["capture", "Recorder"])
@pytest.mark.parametrize(("name", "bad"), CASES, ids=[f"{name}={bad!r}" for name, bad in CASES])
def test_an_invalid_parameter_is_rejected_in_the_one_message_form(entry: Any, name: str, bad: Any) -> None:
    with pytest.raises(RepsimError, match=rf"^{re.escape(name)} must be .+, got ") as info:
        _call(entry, name, bad)
    if isinstance(CAPTURE_PARAMS[name], Choice) or (name == "layout" and isinstance(bad, str)):
        assert isinstance(info.value, UnknownNameError)  # unknown names list the known ones, with suggestions


def test_the_defaults_and_typical_values_pass() -> None:
    mask = torch.ones(2, 3)
    for name, value in [
        ("tokens", "cls"),
        ("spatial", "mean"),
        ("output", 0),
        ("output", "logits"),
        ("output", lambda out: out),
        ("attention_mask", mask),
        ("on_batch", print),
        ("expected_calls", 1),
        ("expected_calls", {"0": 1}),
        ("device", "cpu"),
        ("device", torch.device("cpu")),
        ("layout", "NLC"),
        ("layout", {"0": "NCHW"}),
    ]:
        assert isinstance(_call(capture, name, value), Recorder)


def test_unknown_policies_list_the_known_ones_and_suggest() -> None:
    with pytest.raises(UnknownNameError, match=r"'mean', 'cls', 'last', 'flatten', 'as_samples'.*Did you mean 'mean'"):
        capture(_model(), "0", tokens="maen")
    with pytest.raises(UnknownNameError, match=r"'flatten', 'mean', 'as_samples'.*Did you mean 'as_samples'"):
        capture(_model(), "0", spatial="as_sample")
    with pytest.raises(UnknownNameError, match=r"Did you mean 'NHWC'"):
        capture(_model(), "0", layout="NHCW")


def test_expected_calls_values_are_checked_per_module() -> None:
    with pytest.raises(RepsimError, match=r"^expected_calls\['0'\] must be a positive integer \(>= 1\), got 0\."):
        capture(_model(), "0", expected_calls={"0": 0})
    with pytest.raises(UnknownNameError, match="Did you mean '0'"):
        capture(_model(), ["0", "1"], expected_calls={"00": 1})
