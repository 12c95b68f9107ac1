"""Invalid parameters of ``shift`` and ``audit``, generated from their constraint tables.

Every value a constraint lists in ``bad_values()`` must be rejected, before any work is done, with the table's
own message (``"<name> must be <...>, got <value>."``) and error class.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from torch import nn

from repsim_plugin.adversarial import ShiftConfig, audit, shift
from repsim_plugin.adversarial.auditing import AUDIT_PARAMS
from repsim_plugin.adversarial.shifting import SHIFT_PARAMS
from repsim_plugin.adversarial.targets import TARGET_PARAMS


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


X = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))

CASES = [
    (table, name, bad) for table in (SHIFT_PARAMS, TARGET_PARAMS) for name in table for bad in table[name].bad_values()
]
AUDIT_CASES = [(name, bad) for name in AUDIT_PARAMS for bad in AUDIT_PARAMS[name].bad_values()]


def _expect(constraint, name, bad):
    """The table's own error for this value: same class, same message."""
    expected = constraint.error(name, bad)
    return pytest.raises(type(expected), match=f"^{re.escape(str(expected))}$")


@pytest.mark.parametrize(("table", "name", "bad"), CASES, ids=[f"{n}={b!r}" for _, n, b in CASES])
def test_shift_rejects_each_bad_value_with_the_tables_message(table, name, bad):
    if name == "model":
        call = lambda: shift(bad, "0", X, steps=0)  # noqa: E731
    elif name == "target":
        call = lambda: shift(_model(), "0", X, target=bad, steps=0)  # noqa: E731
    else:
        call = lambda: shift(_model(), "0", X, **{"steps": 0, name: bad})  # noqa: E731
    with _expect(table[name], name, bad):
        call()


SHIFT_OPTION_CASES = [(n, b) for t, n, b in CASES if t is SHIFT_PARAMS and n != "model"]


@pytest.mark.parametrize(("name", "bad"), SHIFT_OPTION_CASES, ids=[f"{n}={b!r}" for n, b in SHIFT_OPTION_CASES])
def test_shift_config_checks_the_same_table(name, bad):
    with _expect(SHIFT_PARAMS[name], name, bad):
        ShiftConfig(**{name: bad})


@pytest.mark.parametrize(("name", "bad"), AUDIT_CASES, ids=[f"{n}={b!r}" for n, b in AUDIT_CASES])
def test_audit_rejects_each_bad_value_with_the_tables_message(name, bad):
    args = {"model_a": _model(), "layer_a": "0", "model_b": _model(), "layer_b": "0"}
    keywords: dict = {"steps": 0}
    if name in args:
        args[name] = bad
    else:
        keywords[name] = bad
    with _expect(AUDIT_PARAMS[name], name, bad):
        audit(args["model_a"], args["layer_a"], args["model_b"], args["layer_b"], X, **keywords)


def test_defaults_pass_the_tables_and_numbers_are_normalised():
    config = ShiftConfig(lr=1, lambda_init=10, tolerance=0)
    assert config.lr == 1.0 and isinstance(config.lr, float) and isinstance(config.lambda_init, float)
    assert config.eval_batch == 256 and ShiftConfig(batch_size=300).eval_batch == 300


def test_every_option_has_a_constraint_and_is_keyword_only():
    """shift(model, layer, data, target=..., *, ...) and audit(model_a, layer_a, model_b, layer_b, data, *, ...)."""
    params = inspect.signature(shift).parameters
    assert list(params)[:4] == ["model", "layer", "data", "target"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(params.values())[4:])
    config_fields = set(inspect.signature(ShiftConfig).parameters)
    assert set(SHIFT_PARAMS) - {"model"} == config_fields
    assert config_fields <= set(params)
    for name in config_fields:  # the config and the function agree on every default
        assert inspect.signature(ShiftConfig).parameters[name].default == params[name].default
    audit_params = inspect.signature(audit).parameters
    assert list(audit_params)[:5] == ["model_a", "layer_a", "model_b", "layer_b", "data"]
    assert all(
        p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD)
        for p in list(audit_params.values())[5:]
    )
    assert set(AUDIT_PARAMS) <= set(audit_params)
