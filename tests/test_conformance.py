"""Every registered measure is run through the public conformance harness: registering a measure tests it."""

from __future__ import annotations

import pytest

import repsim_plugin as rp
from repsim_plugin.testing import check_measure

ALL_IDS = rp.measures.list()


def test_registry_is_not_empty():
    assert len(ALL_IDS) >= 5


@pytest.mark.parametrize("mid", ALL_IDS)
def test_measure_conforms_to_its_declared_properties(mid):
    report = check_measure(mid, raise_on_failure=False)
    assert report.ok, str(report)
    m = rp.measures.make(mid)
    # every declared property was actually exercised
    for kind in m.invariances:
        assert f"invariance:{kind}" in report.passed
    if m.differentiable:
        assert "gradcheck" in report.passed
    if m.symmetric:
        assert "symmetric" in report.passed
    if m.is_metric:
        assert "metric_axioms" in report.passed
