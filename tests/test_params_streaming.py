"""Invalid parameters of the streaming accumulators, generated from their constraint tables.

Every value a constraint lists as bad (``Constraint.bad_values()``) must be refused by the entry point with the
one message form ``"<name> must be <...>, got <value>."``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import repsim_plugin as rp
from repsim_plugin.errors import RepsimError
from repsim_plugin.streaming import KeptRowsMap, LinearCKA, LinearCKAMap, MinibatchCKAMap, SampleSpaceCKAMap
from repsim_plugin.streaming.base import COMPUTE_PARAMS
from repsim_plugin.streaming.kept import KEPT_ROWS_PARAMS
from repsim_plugin.streaming.linear import LINEAR_CKA_MAP_PARAMS, LINEAR_CKA_PARAMS
from repsim_plugin.streaming.minibatch import MINIBATCH_CKA_MAP_PARAMS
from repsim_plugin.streaming.sample_space import SAMPLE_SPACE_PARAMS

_CKA = rp.measures.make("cka")

#: entry point -> (its table, a call taking one parameter by name)
ENTRIES: dict[str, tuple[Any, Callable[..., Any]]] = {
    "LinearCKA": (LINEAR_CKA_PARAMS, lambda **kw: LinearCKA(**kw)),
    "LinearCKAMap": (LINEAR_CKA_MAP_PARAMS, lambda **kw: LinearCKAMap(**kw)),
    "SampleSpaceCKAMap": (SAMPLE_SPACE_PARAMS, lambda **kw: SampleSpaceCKAMap(**kw)),
    "MinibatchCKAMap": (MINIBATCH_CKA_MAP_PARAMS, lambda **kw: MinibatchCKAMap(**kw)),
    "KeptRowsMap": (KEPT_ROWS_PARAMS, lambda **kw: KeptRowsMap(**({"measure": _CKA} | kw))),
    "LinearCKA.compute": (COMPUTE_PARAMS, lambda **kw: LinearCKA().compute(**kw)),
    "LinearCKAMap.compute": (COMPUTE_PARAMS, lambda **kw: LinearCKAMap().compute(**kw)),
    "MinibatchCKAMap.compute": (COMPUTE_PARAMS, lambda **kw: MinibatchCKAMap().compute(**kw)),
}

CASES = [
    pytest.param(entry, name, bad, id=f"{entry}-{name}-{bad!r}")
    for entry, (table, _) in ENTRIES.items()
    for name, constraint in table.items()
    for bad in constraint.bad_values()
]


def _expect_refused(call: Callable[..., Any], name: str, bad: Any) -> None:
    with pytest.raises(RepsimError) as info:
        call(**{name: bad})
    message = str(info.value)
    assert message.startswith(f"{name} must be ") and f", got {bad!r}." in message, message


@pytest.mark.parametrize(("entry", "name", "bad"), CASES)
def test_bad_values_are_refused_with_the_one_message_form(entry, name, bad):
    _, call = ENTRIES[entry]
    _expect_refused(call, name, bad)


def test_every_table_has_bad_values():
    for entry, (table, _) in ENTRIES.items():
        for name, constraint in table.items():
            assert constraint.bad_values(), (entry, name)


def test_torchmetrics_table():
    pytest.importorskip("torchmetrics")
    from repsim_plugin.streaming.torchmetrics import TORCHMETRICS_LINEAR_CKA_PARAMS, TorchmetricsLinearCKA

    for name, constraint in TORCHMETRICS_LINEAR_CKA_PARAMS.items():
        for bad in constraint.bad_values():
            _expect_refused(
                lambda **kw: TorchmetricsLinearCKA(**({"num_features_x": 3, "num_features_y": 2} | kw)), name, bad
            )
