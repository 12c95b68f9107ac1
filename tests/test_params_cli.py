"""Invalid parameters of the conformance harness, the map's plot and the digits helpers, generated from their tables.

Every value a constraint lists in ``bad_values()`` must be rejected by the entry point itself, before any work, with
the one message form "<name> must be <...>, got <value>." The command line's own options stay argparse's job
(tests/test_cli.py); these are the library entries the commands sit on.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch

from repsim_plugin._utils.checks import Constraint
from repsim_plugin.digits import (
    LOAD_DIGITS_SPLIT_PARAMS,
    TRAIN_DIGITS_PARAMS,
    load_digits_split,
    train_digits_cnn,
    train_digits_mlp,
)
from repsim_plugin.errors import RepsimError
from repsim_plugin.results import PLOT_PARAMS, SimilarityMap
from repsim_plugin.testing import (
    CHECK_MEASURE_PARAMS,
    RANDOM_ORTHOGONAL_PARAMS,
    check_measure,
    invariance_transforms,
    random_orthogonal,
)


def _small_map() -> SimilarityMap:
    return SimilarityMap(torch.eye(2), ["a1", "a2"], ["b1", "b2"], "cka")


# entry name -> (table, the call with one parameter replaced, the function whose signature the table describes)
ENTRIES: dict[str, tuple[Mapping[str, Constraint], Callable[[dict[str, Any]], Any], Callable[..., Any]]] = {
    "check_measure": (
        CHECK_MEASURE_PARAMS,
        lambda kw: check_measure(kw.pop("measure", "cka"), **kw),
        check_measure,
    ),
    "SimilarityMap.plot": (PLOT_PARAMS, lambda kw: _small_map().plot(**kw), SimilarityMap.plot),
    "random_orthogonal": (
        RANDOM_ORTHOGONAL_PARAMS,
        lambda kw: random_orthogonal(kw.get("d", 3), kw.get("generator", torch.Generator())),
        random_orthogonal,
    ),
    "invariance_transforms": (
        RANDOM_ORTHOGONAL_PARAMS,
        lambda kw: invariance_transforms(kw.get("d", 3), kw.get("generator", torch.Generator())),
        invariance_transforms,
    ),
    "load_digits_split": (LOAD_DIGITS_SPLIT_PARAMS, lambda kw: load_digits_split(**kw), load_digits_split),
    "train_digits_cnn": (TRAIN_DIGITS_PARAMS, lambda kw: train_digits_cnn(**kw), train_digits_cnn),
    "train_digits_mlp": (TRAIN_DIGITS_PARAMS, lambda kw: train_digits_mlp(**kw), train_digits_mlp),
}


def _rejected(constraint: Constraint) -> list[Any]:
    # Optional(Bool()).bad_values() passes on Bool's None, which Optional accepts: keep only real rejections
    return [value for value in constraint.bad_values() if not constraint.accepts(value)]


CASES = [
    pytest.param(entry, name, bad, id=f"{entry}-{name}-{i}")
    for entry, (table, _, _) in ENTRIES.items()
    for name, constraint in table.items()
    for i, bad in enumerate(_rejected(constraint))
]


def test_every_parameter_has_bad_values():
    for entry, (table, _, _) in ENTRIES.items():
        for name, constraint in table.items():
            assert _rejected(constraint), f"{entry}: {name} lists no rejected values"


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_tables_name_real_parameters(entry):
    table, _, function = ENTRIES[entry]
    assert set(table) <= set(inspect.signature(function).parameters), entry


@pytest.mark.parametrize(("entry", "name", "bad"), CASES)
def test_bad_parameter_is_rejected_in_the_one_message_form(entry, name, bad):
    _, call, _ = ENTRIES[entry]
    with pytest.raises(RepsimError, match=rf"^{re.escape(name)} must be .+, got .+\."):
        call({name: bad})


def test_unknown_colormap_suggests_close_names():
    with pytest.raises(RepsimError, match=r"cmap must be .*, got 'viridiss'\. Did you mean 'viridis'"):
        _small_map().plot(cmap="viridiss")


def _subparser(command: str) -> Any:
    from repsim_plugin.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command]


def _option(parser: Any, dest: str) -> Any:
    return next(a for a in parser._actions if a.dest == dest)


def test_command_choices_are_the_librarys_constants():
    from repsim_plugin.capture import SPATIAL_POLICIES, TOKEN_POLICIES
    from repsim_plugin.compare import ESTIMATOR_CHOICES

    compare, audit = _subparser("compare"), _subparser("audit")
    assert list(_option(compare, "estimator").choices) == list(ESTIMATOR_CHOICES)
    for parser in (compare, audit):
        assert list(_option(parser, "tokens").choices) == list(TOKEN_POLICIES)
        assert list(_option(parser, "spatial").choices) == list(SPATIAL_POLICIES)


def test_audit_command_defaults_are_the_functions_defaults():
    from repsim_plugin.adversarial import audit as audit_fn

    parameters = inspect.signature(audit_fn).parameters
    parser = _subparser("audit")
    for dest in ("claim_measure", "tolerance", "steps", "seed", "batch_size", "tokens", "spatial"):
        assert _option(parser, dest).default == parameters[dest].default, dest
    assert _option(parser, "measures").default == list(parameters["measures"].default)
    assert _option(parser, "targets").default == list(parameters["targets"].default)
    for dest in ("lr", "temperature", "lambda_init"):  # left to shift's own defaults unless given
        assert _option(parser, dest).default is None
