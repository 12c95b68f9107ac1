"""Third-party measures through the real entry-point machinery (a dist-info folder on sys.path)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

import repsim_plugin as rp
from repsim_plugin.errors import PluginLoadWarning


def _install_fake_distribution(root: Path, name: str, entry_points: dict[str, str], module_source: str) -> None:
    (root / f"{name}.py").write_text(textwrap.dedent(module_source))
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = ["[repsim_plugin.measures]", *(f"{k} = {v}" for k, v in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in [m for m in sys.modules if m.startswith("fake_repsim_plugin")]:
        del sys.modules[mod]


def test_plugin_measure_and_registration_function_are_loaded(plugin_dir):
    _install_fake_distribution(
        plugin_dir,
        "fake_repsim_plugin_ok",
        {
            "first": "fake_repsim_plugin_ok:FIRST_COLUMN",
            "hook": "fake_repsim_plugin_ok:register_all",
        },
        """
        import torch
        import repsim_plugin as rp
        from repsim_plugin.measures import Measure, Spec

        FIRST_COLUMN = Measure(
            fn=lambda X, Y: torch.corrcoef(torch.stack([X[:, 0], Y[:, 0]]))[0, 1],
            spec=Spec("plugin_first_column_corr", (), "score"),
            larger_is_more_similar=True, symmetric=True, invariances={"translation", "isotropic_scaling"},
        )

        def register_all():
            rp.measures.register("plugin_sum_diff", lambda X, Y: (X.sum() - Y.sum()).abs(),
                                 larger_is_more_similar=False, symmetric=True, aliases=["psd"])
        """,
    )
    try:
        loaded = rp.measures.load_plugins(force=True)
        assert sorted(loaded) == ["first", "hook"]
        assert rp.measures.list("plugin_*") == ["plugin_first_column_corr-score", "plugin_sum_diff"]
        X = torch.randn(20, 2, dtype=torch.float64)
        assert float(rp.measures.make("plugin_first_column_corr-score")(X, 3 * X + 1)) == pytest.approx(1.0)
        assert rp.measures.make("psd").id == "plugin_sum_diff"
        # a plugin measure goes through the same conformance harness as ours
        from repsim_plugin.testing import check_measure

        report = check_measure("plugin_first_column_corr-score")
        assert "invariance:translation" in report.passed
    finally:
        for mid in ("plugin_first_column_corr-score", "plugin_sum_diff"):
            rp.measures.unregister(mid)


def test_broken_plugin_is_a_warning_and_the_registry_still_works(plugin_dir):
    _install_fake_distribution(
        plugin_dir,
        "fake_repsim_plugin_broken",
        {"broken": "fake_repsim_plugin_broken:nothing_here", "bad_type": "fake_repsim_plugin_broken:VALUE"},
        "VALUE = 3\n",
    )
    with pytest.warns(PluginLoadWarning) as record:
        loaded = rp.measures.load_plugins(force=True)
    assert loaded == []
    messages = [str(w.message) for w in record]
    assert any("'broken'" in m and "skipped" in m for m in messages)
    assert any("'bad_type'" in m and "not a Measure" in m for m in messages)
    assert rp.similarity(torch.randn(10, 2), torch.randn(10, 2), "cka") >= 0


def test_conformance_harness_catches_a_false_declaration():
    """A measure that claims translation invariance it does not have must fail the harness."""
    from repsim_plugin.measures import Measure, Spec
    from repsim_plugin.testing import check_measure

    liar = Measure(
        fn=lambda X, Y: (X.mean() - Y.mean()).abs(),
        spec=Spec("liar", (), "distance"),
        larger_is_more_similar=False,
        symmetric=True,
        invariances={"translation"},
    )
    with pytest.raises(AssertionError, match="invariance:translation"):
        check_measure(liar)
    report = check_measure(liar, raise_on_failure=False)
    assert "symmetric" in report.passed and not report.ok


def test_conformance_harness_catches_a_broken_gradient():
    from repsim_plugin.measures import Measure, Spec
    from repsim_plugin.testing import check_measure

    detached = Measure(
        fn=lambda X, Y: torch.ones((), dtype=torch.float64),  # declared differentiable, but cut from X and Y
        spec=Spec("detached", (), "score"),
        larger_is_more_similar=True,
        symmetric=True,
        differentiable=True,
        min_samples=5,
        self_value=1.0,
    )
    report = check_measure(detached, raise_on_failure=False)
    assert set(report.failures) == {"gradcheck"}
    assert "min_samples" in report.passed  # Measure.__call__ enforces min_samples for every measure
