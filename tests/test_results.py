"""SimilarityMap: lossless JSON, schema checks, validation, views (pandas, matplotlib)."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import repsim_plugin as rp
from repsim_plugin.errors import InputShapeError, NonFiniteInputError, RepsimError, UnknownNameError
from repsim_plugin.results import SCHEMA_VERSION, SimilarityMap, collect_versions, state_dict_fingerprint


def _map(values=None, **kw) -> SimilarityMap:
    values = torch.tensor([[1.0, 0.25, 0.5], [0.125, 0.75, 1.0 / 3.0]]) if values is None else values
    return SimilarityMap(
        values=values,
        layers_a=kw.pop("layers_a", ["blocks.0", "blocks.1"]),
        layers_b=kw.pop("layers_b", ["layer1", "layer2", "layer3"]),
        measure=kw.pop("measure", "cka-kernel=linear-hsic=gretton-score"),
        estimator=kw.pop("estimator", "feature_streaming"),
        reduction=kw.pop("reduction", {"tokens": "mean", "spatial": "flatten"}),
        n=kw.pop("n", 512),
        dtype=kw.pop("dtype", "float32"),
        seed=kw.pop("seed", 0),
        fingerprints=kw.pop("fingerprints", {"a": "sha256:aa", "b": "sha256:bb"}),
        **kw,
    )


def _bits(t: torch.Tensor) -> list[int]:
    return [struct.unpack("<q", struct.pack("<d", v))[0] for v in t.reshape(-1).tolist()]


finite64 = st.floats(allow_nan=False, allow_infinity=False, width=64)
edge_values = st.sampled_from(
    [0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -1.7976931348623157e308, 1 / 3]
)


@given(
    data=st.data(),
    la=st.integers(1, 4),
    lb=st.integers(1, 4),
    with_intervals=st.booleans(),
)
def test_json_roundtrip_is_bit_exact(tmp_path_factory, data, la, lb, with_intervals):
    values = torch.tensor(
        [[data.draw(st.one_of(finite64, edge_values)) for _ in range(lb)] for _ in range(la)], dtype=torch.float64
    )
    kw = {}
    if with_intervals:
        low = (
            values
            - torch.tensor(data.draw(st.lists(st.floats(0, 1), min_size=la * lb, max_size=la * lb)))
            .reshape(la, lb)
            .double()
        )
        kw["intervals"] = (torch.where(torch.isfinite(low), low, values), values)
        kw["interval_level"] = 0.95
        kw["p_values"] = torch.rand(la, lb, dtype=torch.float64)
    m = _map(values, layers_a=[f"a{i}" for i in range(la)], layers_b=[f"b.{j}" for j in range(lb)], **kw)
    path = tmp_path_factory.mktemp("maps") / "map.json"
    m.save(path)
    back = SimilarityMap.load(path)
    assert _bits(back.values) == _bits(values)
    assert back == m
    if with_intervals:
        assert _bits(back.intervals[0]) == _bits(m.intervals[0])
        assert _bits(back.p_values) == _bits(m.p_values)
    assert SimilarityMap.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_all_metadata_survives(tmp_path):
    m = _map(extra={"model_a": "timm:resnet18", "data": {"images": 2048, "size": [3, 64, 64]}})
    path = m.save(tmp_path / "sub" / "m.json")
    back = rp.SimilarityMap.load(path)
    for field in ("layers_a", "layers_b", "measure", "estimator", "reduction", "n", "dtype", "seed"):
        assert getattr(back, field) == getattr(m, field), field
    assert back.fingerprints == {"a": "sha256:aa", "b": "sha256:bb"}
    assert back.versions == m.versions and back.versions["torch"] == torch.__version__
    assert back.extra["data"]["size"] == [3, 64, 64]
    assert back.values.dtype == torch.float64
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]  # no temporary file left behind


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    _map().save(path)
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        _map(n=1).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_load_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RepsimError, match="not valid JSON"):
        SimilarityMap.load(bad)
    doc = _map().to_dict()
    with pytest.raises(RepsimError, match="not a SimilarityMap"):
        SimilarityMap.from_dict(doc | {"schema": "other"})
    with pytest.raises(RepsimError, match="newer"):
        SimilarityMap.from_dict(doc | {"schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(RepsimError, match="required field"):
        SimilarityMap.from_dict({k: v for k, v in doc.items() if k != "values"})
    with pytest.raises(InputShapeError, match="shape"):
        SimilarityMap.from_dict(doc | {"values": [[1.0, 2.0]]})


def test_validation_errors():
    with pytest.raises(InputShapeError, match=r"must be \(2, 3\)"):
        _map(torch.zeros(3, 2))
    with pytest.raises(InputShapeError, match="duplicate"):
        _map(layers_a=["x", "x"])
    with pytest.raises(InputShapeError, match="list of layer names"):
        _map(layers_a="blocks.0")
    with pytest.raises(NonFiniteInputError, match="row 1, column 2"):
        _map(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, float("nan")]]))
    with pytest.raises(InputShapeError, match="intervals"):
        _map(intervals=(torch.zeros(2, 3),))
    with pytest.raises(RepsimError, match="low bounds exceed"):
        _map(intervals=(torch.ones(2, 3), torch.zeros(2, 3)))
    with pytest.raises(RepsimError, match=r"\[0, 1\]"):
        _map(p_values=torch.full((2, 3), 1.5))
    with pytest.raises(RepsimError, match="JSON data"):
        _map(extra={"model": object()})
    with pytest.raises(NonFiniteInputError):
        _map(extra={"x": float("inf")})
    with pytest.raises(RepsimError, match="n must be"):
        _map(n=-1)


def test_access_by_names():
    m = _map()
    assert m["blocks.1", "layer3"] == pytest.approx(1 / 3)
    assert m[0, -1] == 0.5
    with pytest.raises(UnknownNameError, match="Did you mean 'layer2'"):
        m["blocks.0", "layer_2"]
    assert m.argmax_per_row() == {"blocks.0": "layer1", "blocks.1": "layer2"}
    with pytest.raises(InputShapeError, match="square"):
        m.diagonal()
    sq = _map(torch.tensor([[1.0, 0.2], [0.3, 0.9]], dtype=torch.float64), layers_b=["blocks.0", "blocks.1"])
    assert sq.diagonal().tolist() == [1.0, 0.9]
    assert "2x2" in repr(sq)


def test_values_are_copied_to_cpu_float64():
    src = torch.tensor([[0.5, 0.25, 0.125], [1.0, 0.0, 0.75]], dtype=torch.float32, requires_grad=True)
    m = _map(src)
    assert m.values.dtype == torch.float64 and not m.values.requires_grad
    with torch.no_grad():
        src.zero_()
    assert m.values[0, 0] == 0.5


def test_to_dataframe():
    pd = pytest.importorskip("pandas")
    frame = _map().to_dataframe()
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.index) == ["blocks.0", "blocks.1"] and list(frame.columns) == ["layer1", "layer2", "layer3"]
    assert frame.loc["blocks.1", "layer2"] == 0.75
    assert frame.attrs["measure"].startswith("cka")


def test_plot_writes_a_real_png(tmp_path):
    import matplotlib.image as mpimg

    m = _map(
        torch.rand(6, 8, dtype=torch.float64),
        layers_a=[f"a{i}" for i in range(6)],
        layers_b=[f"b{i}" for i in range(8)],
    )
    path = tmp_path / "map.png"
    fig = m.plot(path)
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(raw) > 10_000
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert float(np.std(image[..., :3])) > 0.05  # not a blank canvas
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == m.layers_a
    assert [t.get_text() for t in ax.get_xticklabels()] == m.layers_b
    assert ax.get_title().startswith("cka: ") and "n=512" in ax.get_title()  # short name, n, estimator
    assert ax.images[0].get_clim() == (0.0, 1.0)  # the measure's declared range, not the data's
    assert "higher = more similar" in fig.axes[1].get_ylabel()
    assert len(fig.axes) == 2  # heatmap + colorbar
    assert len(ax.texts) == 48  # annotated cells
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.png"]


def test_plot_into_existing_axes_and_no_annotation_for_big_maps():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot(1, 1, 1)
    small = _map()
    assert small.plot(ax, annotate=False) is ax
    assert len(ax.texts) == 0
    big = _map(
        torch.rand(20, 20, dtype=torch.float64),
        layers_a=[f"a{i}" for i in range(20)],
        layers_b=[f"b{i}" for i in range(20)],
    )
    assert len(big.plot().axes[0].texts) == 0


def test_versions_and_fingerprints():
    v = collect_versions()
    assert {"repsim_plugin", "python", "torch", "numpy"} <= set(v)
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    b = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    b.load_state_dict(a.state_dict())
    assert state_dict_fingerprint(a) == state_dict_fingerprint(b) == state_dict_fingerprint(a.state_dict())
    with torch.no_grad():
        b[0].weight[0, 0] = torch.nextafter(b[0].weight[0, 0], torch.tensor(1.0))  # one ulp
    assert state_dict_fingerprint(a) != state_dict_fingerprint(b)
    b.load_state_dict(a.state_dict())
    b[1].running_mean += 1  # buffers count
    assert state_dict_fingerprint(a) != state_dict_fingerprint(b)
    half = {k: v.to(torch.bfloat16) for k, v in a.state_dict().items() if v.is_floating_point()}
    assert state_dict_fingerprint(half).startswith("sha256:")
