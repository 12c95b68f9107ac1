"""Maps that mean something: null baselines, the long table, the heatmap, trajectories, and the HTML pages.

Pages are read with an HTML parser (tests/html_pages.py): the pictures are embedded PNGs, nothing links outside,
and the numbers in the tables are the map's own.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from digits_models import build_digits_cnn, train_digits_cnn
from html_pages import read_page

import repsim_plugin as rp
from repsim_plugin.measures.kernels import expected_null_cka
from repsim_plugin.nulls import _gaussian, null_baseline, null_baseline_map
from repsim_plugin.report.cells import short_label, short_model

LAYERS = ["relu1", "relu2", "relu3", "fc2"]


@pytest.fixture(scope="module")
def digits():
    a, (_, _, Xte, yte) = train_digits_cnn(seed=0)
    b, _ = train_digits_cnn(seed=1)
    return a, b, list(zip(Xte[:200].split(50), yte[:200].split(50), strict=True))


@pytest.fixture(scope="module")
def cka_map(digits):
    a, b, data = digits
    return rp.compare(a, b, data, LAYERS, LAYERS, measure="cka", progress=False, names=("A", "B"))


# --- null baselines ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "p", "q"), [(200, 30, 10), (100, 400, 150)])
def test_simulated_null_of_linear_cka_matches_the_closed_form(n, p, q):
    simulated = null_baseline("cka", n, p, q, draws=6, simulate=True)
    assert simulated == pytest.approx(expected_null_cka(n, p, q), rel=0.03)
    assert abs(null_baseline("debiased_cka", n, p, q, draws=6, simulate=True)) < 0.01
    assert null_baseline("debiased_cka", n, p, q) == 0.0


def test_the_bartlett_draw_has_the_gram_law_of_wide_gaussian_features():
    """Z Z^T of the (n, n) Bartlett factor is Wishart(p, I): mean p I, and the same measure values on average."""
    rng = np.random.default_rng(0)
    n, p = 12, 300
    grams = [(lambda z: z @ z.T)(_gaussian(rng, n, p, gram_only=True)) for _ in range(200)]
    mean = torch.stack(grams).mean(0)
    assert torch.allclose(mean, p * torch.eye(n, dtype=torch.float64), atol=0.1 * p)
    m = rp.measures.make("procrustes")
    wide = [float(m(_gaussian(rng, 30, 90, True), _gaussian(rng, 30, 60, True))) for _ in range(8)]
    direct = [float(m(_gaussian(rng, 30, 90, False), _gaussian(rng, 30, 60, False))) for _ in range(8)]
    assert np.mean(wide) == pytest.approx(np.mean(direct), abs=0.02)


def test_a_null_that_cannot_be_estimated_says_why():
    null, note = null_baseline_map("mean_cca", 3_000, [5_000], [5_000])
    assert null is None and "size limits" in note


def test_compare_records_the_null_of_every_cell(cka_map, digits):
    a, _, data = digits
    widths = {"relu1": 16 * 6 * 6, "relu2": 32 * 4 * 4, "relu3": 64, "fc2": 10}
    X = torch.cat([x for x, _ in data])
    with rp.capture(a, LAYERS) as rec:
        a(X)
    assert {k: v.shape[1] for k, v in rec.activations.items()} == widths
    expected = torch.tensor([[expected_null_cka(200, widths[i], widths[j]) for j in LAYERS] for i in LAYERS])
    assert torch.allclose(cka_map.null_baseline, expected.double(), atol=1e-12)
    assert "sqrt(pq" in cka_map.extra["null_baseline_note"]
    assert rp.SimilarityMap.from_dict(cka_map.to_dict()) == cka_map  # survives JSON


# --- long table -------------------------------------------------------------------------------------------------


def _with_statistics(result: rp.SimilarityMap) -> rp.SimilarityMap:
    copy = rp.SimilarityMap.from_dict(result.to_dict())
    g = torch.Generator().manual_seed(0)
    copy.p_values = torch.rand(copy.shape, generator=g, dtype=torch.float64)
    copy.intervals = (copy.values - 0.01, copy.values + 0.02)
    copy.q_values = torch.clamp(copy.p_values * 2, max=1.0)  # the field compare(permutations=) fills
    return copy


def test_to_dataframe_long_has_one_row_per_cell_with_every_statistic(cka_map):
    frame = _with_statistics(cka_map).to_dataframe(long=True)
    stats = _with_statistics(cka_map)
    assert list(frame.columns) == [
        "layer_a", "layer_b", "value", "p_value", "q_value", "low", "high", "null", "measure", "estimator",
    ]  # fmt: skip
    assert len(frame) == 16
    row = frame[(frame.layer_a == "relu2") & (frame.layer_b == "relu3")].iloc[0]
    assert row.value == stats["relu2", "relu3"] and row.null == float(stats.null_baseline[1, 2])
    assert row.p_value == float(stats.p_values[1, 2]) and row.q_value == float(stats.q_values[1, 2])
    assert row.low == float(stats.intervals[0][1, 2]) and row.measure == cka_map.measure
    plain = cka_map.to_dataframe(long=True)
    assert plain.p_value.isna().all() and not plain.null.isna().any()
    assert cka_map.to_dataframe().shape == (4, 4)  # the wide form is unchanged


# --- heatmap ----------------------------------------------------------------------------------------------------


def test_heatmap_fixed_range_direction_short_names_and_marked_cells(cka_map):
    fig = cka_map.plot()
    ax, bar = fig.axes
    assert ax.images[0].get_clim() == (0.0, 1.0)
    title = ax.get_title()
    assert title.startswith("cka: A vs B") and "n=200" in title and cka_map.estimator in title
    assert "unrelated features read" in title
    assert "higher = more similar" in bar.get_ylabel()
    weak = int((cka_map.values <= cka_map.null_baseline).sum())
    assert len([p for p in ax.patches if p.get_hatch()]) == weak
    distance = rp.SimilarityMap(
        values=torch.rand(2, 2, dtype=torch.float64),
        layers_a=["a" * 50, "b"],
        layers_b=["c", "d"],
        measure="procrustes-distance=angular",
        extra={"model_a": "hf:/very/long/absolute/path/to/all-MiniLM-L6-v2", "model_b": "B"},
    )
    fig = distance.plot()
    assert "lower = more similar" in fig.axes[1].get_ylabel()
    assert fig.axes[0].get_yticklabels()[0].get_text() == short_label("a" * 50) and len(short_label("a" * 50)) == 28
    assert fig.axes[0].get_ylabel() == "hf:…/all-MiniLM-L6-v2 layers"
    assert short_model("module:pkg.mod:f @ /tmp/x/ckpt.pt") == "module:pkg.mod:f @ …/ckpt.pt"


# --- pages ------------------------------------------------------------------------------------------------------


def _number(text: str) -> float:
    return float("nan") if text == "—" else float(text)


def test_map_page_is_self_contained_and_its_table_is_the_map(cka_map, tmp_path):
    result = _with_statistics(cka_map)
    page = read_page(result.to_html(tmp_path / "map.html"))
    assert (tmp_path / "map.html").stat().st_mode & 0o044  # normal permissions (readable by others), not 0600
    assert len(page.images) == 1
    header, *rows = page.tables[0]
    assert header == ["layer A", "layer B", "value", "p_value", "q_value", "low", "high", "null"]
    assert len(rows) == 16
    for row in rows:
        i, j = result.layers_a.index(row[0]), result.layers_b.index(row[1])
        assert _number(row[2]) == pytest.approx(float(result.values[i, j]), abs=5e-5)
        assert _number(row[7]) == pytest.approx(float(result.null_baseline[i, j]), abs=5e-5)
        assert _number(row[3]) == pytest.approx(float(result.p_values[i, j]), rel=0.01, abs=1e-3)
    text = "".join(page.text)
    for item in (result.measure, result.fingerprints["a"], result.extra["data_fingerprint"], "torch"):
        assert item in text  # provenance


def test_trajectory_from_checkpoints(digits, tmp_path):
    a, b, data = digits
    paths = []
    for k, model in enumerate((a, b, a)):
        paths.append(tmp_path / f"step{k}.pt")
        torch.save(model.state_dict(), paths[-1])
    traj = rp.checkpoint_trajectory(
        build_digits_cnn, paths, data, reference=0, layers=LAYERS, measure="debiased_cka", progress=False
    )
    assert traj.reference == "step0.pt" and traj.checkpoints == ["step1.pt", "step2.pt"]
    assert torch.allclose(traj.values[1], torch.ones(4, dtype=torch.float64), atol=1e-6)  # the same weights
    direct = rp.compare(a, b, data, LAYERS, LAYERS, measure="debiased_cka", progress=False)
    assert torch.allclose(traj.values[0], direct.values.diagonal(), atol=1e-10)
    long = traj.to_dataframe(long=True)
    assert len(long) == 8 and set(long.layer) == set(LAYERS)
    assert len(traj.plot().axes[0].lines) == 8  # one line per layer, one dotted null per layer
    page = read_page(traj.to_html(tmp_path / "t.html"))
    assert len(page.images) == 3  # the trajectory and each checkpoint's map
    values = page.tables[0]
    assert values[0] == ["checkpoint", *LAYERS]
    assert [_number(v) for v in values[1][1:]] == pytest.approx(traj.values[0].tolist(), abs=5e-5)


def test_audit_page(digits, tmp_path):
    a, b, data = digits
    X = torch.cat([x for x, _ in data])
    y = torch.cat([t for _, t in data])
    report = rp.adversarial.audit(a, "relu3", b, "relu3", (X, y), steps=0, measures=("cka", "mean_cca", "svcca"))
    page = read_page(report.to_html(tmp_path / "audit.html"))
    assert len(page.images) == 1
    header, first, *_ = page.tables[0]
    assert header[:3] == ["change", "outputs kept", "cka"] and first[0] == "original (the claim)"
    assert _number(first[2]) == pytest.approx(report.claim, abs=5e-4)
    assert math.isfinite(_number(page.tables[1][1][2]))
