"""Invalid parameters of compare, compare_checkpoints and the statistics, generated from their constraint tables.

Each value a constraint lists as bad (``Constraint.bad_values()``) must be refused before any work is done, with
the one message form ``"<name> must be <...>, got <value>."``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import repsim_plugin as rp
from repsim_plugin._utils import checks
from repsim_plugin.compare import COMPARE_PARAMS
from repsim_plugin.errors import RepsimError, UnknownNameError
from repsim_plugin.stats import STATS_PARAMS

_MODEL = nn.Sequential(nn.Linear(4, 3))
_DATA = [torch.randn(8, 4)]
_X, _Y = torch.randn(20, 3), torch.randn(20, 2)

ENTRIES: dict[str, tuple[Any, Callable[..., Any]]] = {
    "compare": (COMPARE_PARAMS, lambda **kw: rp.compare(_MODEL, None, _DATA, ["0"], **kw)),
    "compare_checkpoints": (
        {k: v for k, v in COMPARE_PARAMS.items() if k not in ("names", "permutations", "bootstrap")},
        lambda **kw: rp.compare_checkpoints(lambda: _MODEL, ["a.pt", "b.pt"], _DATA, **kw),
    ),
    "permutation_test": (
        {k: STATS_PARAMS[k] for k in ("n_permutations", "seed", "alternative", "method")},
        lambda **kw: rp.stats.permutation_test("cka", _X, _Y, **kw),
    ),
    "bootstrap_ci": (
        {k: STATS_PARAMS[k] for k in ("n_boot", "alpha", "seed", "resample", "interval")},
        lambda **kw: rp.stats.bootstrap_ci("cka", _X, _Y, **kw),
    ),
    "null_baseline": (
        {k: STATS_PARAMS[k] for k in ("n", "d1", "d2", "n_samples", "seed")},
        lambda **kw: rp.stats.null_baseline("cka", **({"n": 10, "d1": 3} | kw)),
    ),
}

CASES = [
    pytest.param(entry, name, bad, id=f"{entry}-{name}-{bad!r}")
    for entry, (table, _) in ENTRIES.items()
    for name, constraint in table.items()
    for bad in constraint.bad_values()
]


@pytest.mark.parametrize(("entry", "name", "bad"), CASES)
def test_every_bad_value_in_the_tables_is_refused_in_one_form(entry: str, name: str, bad: Any) -> None:
    _, call = ENTRIES[entry]
    with pytest.raises(RepsimError) as info:
        call(**{name: bad})
    message = str(info.value)
    assert message.startswith(f"{name} must be ") and f", got {bad!r}." in message, message


def test_the_tables_name_real_parameters() -> None:
    import inspect

    for entry, fn in (("compare", rp.compare), ("compare_checkpoints", rp.compare_checkpoints)):
        params = set(inspect.signature(fn).parameters)
        assert set(ENTRIES[entry][0]) <= params, entry
    for fn in (rp.stats.permutation_test, rp.stats.bootstrap_ci, rp.stats.null_baseline):
        assert set(inspect.signature(fn).parameters) & set(STATS_PARAMS)


def test_the_constraints_accept_what_they_describe_and_normalise() -> None:
    assert checks.Int(minimum=1).check("k", 3) == 3
    assert checks.Float(positive=True).check("lr", 1) == 1.0 and isinstance(checks.Float().check("x", 2), float)
    assert checks.Optional(checks.Int()).check("s", None) is None
    assert checks.AnyOf((checks.Int(), checks.Choice(("auto",)))).check("x", "auto") == "auto"
    with pytest.raises(UnknownNameError, match=r"mode must be one of 'finetune', 'perturbation'.*Did you mean"):
        checks.Choice(("finetune", "perturbation")).check("mode", "finetun")
    for constraint in (checks.Int(minimum=0), checks.Float(minimum=0.0, below=1.0), checks.Bool()):
        for bad in constraint.bad_values():
            assert not constraint.accepts(bad), (constraint, bad)
    with pytest.raises(KeyError):
        checks.check_params({"a": checks.Bool()}, b=True)  # a table that misses a parameter is a bug


def test_essential_arguments_are_positional_and_the_rest_keyword_only() -> None:
    import inspect

    expected = {
        rp.compare: ["model_a", "model_b", "data", "layers_a", "layers_b", "measure"],
        rp.compare_checkpoints: ["build_model", "checkpoints", "data"],
        rp.capture: ["model", "layers"],
        rp.adversarial.shift: ["model", "layer", "data", "target"],
        rp.adversarial.audit: ["model_a", "layer_a", "model_b", "layer_b", "data"],
    }
    for fn, positional in expected.items():
        kinds = inspect.signature(fn).parameters.values()
        assert [p.name for p in kinds if p.kind is p.POSITIONAL_OR_KEYWORD] == positional, fn.__name__
        rest = [p for p in kinds if p.name not in positional and p.kind is not p.VAR_KEYWORD]
        assert all(p.kind is p.KEYWORD_ONLY for p in rest), fn.__name__
