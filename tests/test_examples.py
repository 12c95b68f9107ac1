"""The examples run offline in their quick mode and say what the paper says (Davari et al., ICLR 2023).

Tolerances: Theorem 1's and the outlier's limits are exact as c -> infinity (checked at c = 1e5); the isotropic
invertible-map prediction 1/sqrt(2 + 1/p) holds to finite-n bias (0.03 at n = 2000); a near-rank-one map gives
about 1/sqrt(p) (0.02); early layers of networks that predict differently stay above 0.85 debiased CKA.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from html_pages import read_page

import repsim_plugin as rp

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _run(*argv: str) -> str:
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=ENV, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_paper_stress_tests_reproduce_the_papers_figures(tmp_path):
    _run(str(ROOT / "examples" / "paper_stress_tests.py"), "--quick", "--out", str(tmp_path))
    for name in ("subset_and_outlier", "two_cubes", "invertible_linear", "early_layers", "side_by_side"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    f = json.loads((tmp_path / "figures.json").read_text())
    s = f["subset_and_outlier"]
    assert s["subset_at_largest_c"] == pytest.approx(s["subset_limit"], abs=2e-3)
    assert s["subset_at_largest_c"] == pytest.approx(s["subset_closed_form_at_largest_c"], abs=1e-9)
    assert s["outlier_at_largest_c"] == pytest.approx(s["outlier_limit"], rel=0.05)
    cubes = f["two_cubes"]
    assert cubes["linear_at_largest_c"] == pytest.approx(cubes["limit"], abs=0.01)
    assert cubes["rbf_at_largest_c"]["0.2"] < cubes["rbf_at_largest_c"]["1.0"] - 0.2  # a small bandwidth sees it
    inv = f["invertible_linear"]["values"]
    for p in ("32", "128"):
        assert inv["mean 0, std 1"][p] == pytest.approx(1 / math.sqrt(2 + 1 / int(p)), abs=0.03)
        assert inv["mean 10, std 0.1"][p] == pytest.approx(1 / math.sqrt(int(p)), abs=0.02)
        assert inv["mean 10, std 0.1"][p] < inv["mean 1, std 1"][p] < inv["mean 0, std 1"][p]
    early = f["early_layers"]
    assert early["cka"]["normal vs shuffled labels"]["relu1"] > 0.85
    assert early["cka"]["normal vs random init"]["relu1"] > 0.85
    assert early["accuracy"]["normal"] > 0.9 and early["accuracy"]["shuffled labels"] < 0.3
    side = f["side_by_side"]
    assert side["predictions_kept"]
    low = side["min_over_c_and_classes"]
    assert low["mean_cca"] > 0.999 and low["pwcca"] > 0.999  # span-only measures do not move
    assert low["svcca"] < 0.99 and low["cka"] < 0.3  # SVCCA does move (it drops low-variance directions first)


@pytest.mark.slow
def test_hf_layer_map(tmp_path):
    out = _run(str(ROOT / "examples" / "hf_layer_map.py"), "--quick", "--out", str(tmp_path))
    assert out.strip().splitlines()[-1] == f"open {(tmp_path / 'index.html').resolve()}"
    index = read_page(tmp_path / "index.html")
    assert [u for u in index.urls if u.endswith(".html")] == ["minilm_mean.html", "minilm_cls.html"]
    for tokens in ("mean", "cls"):
        result = rp.SimilarityMap.load(tmp_path / f"minilm_{tokens}.json")
        assert result.n == 32 and result.reduction["tokens"] == tokens and len(result.layers_a) == 6
        assert torch.allclose(result.values.diagonal(), torch.ones(6, dtype=torch.float64), atol=1e-6)
        assert read_page(tmp_path / f"minilm_{tokens}.html").images


@pytest.mark.slow
def test_compare_timm_checkpoints(tmp_path):
    _run(str(ROOT / "examples" / "compare_timm_checkpoints.py"), "--quick", "--out", str(tmp_path))
    traj = json.loads((tmp_path / "trajectory.json").read_text())
    assert traj["reference"] == "step0003.safetensors" and len(traj["checkpoints"]) == 3
    assert traj["layers"] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert all(-1 <= v <= 1 for row in traj["values"] for v in row)
    assert len(read_page(tmp_path / "index.html").images) == 4  # the trajectory and three maps


@pytest.mark.slow
def test_distributed_compare_with_torchrun_matches_one_process(tmp_path):
    from repsim_plugin.digits import train_digits_cnn

    script = ROOT / "examples" / "distributed_compare.py"
    _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), "--quick",
         "--out", str(tmp_path))  # fmt: skip
    merged = rp.SimilarityMap.load(tmp_path / "map.json")
    a, (_, _, Xte, _) = train_digits_cnn(seed=0)
    b, _ = train_digits_cnn(seed=1)
    layers = ["relu1", "relu2", "relu3", "fc2"]
    single = rp.compare(a, b, list(Xte[:256].split(32)), layers, layers, measure="debiased_cka", progress=False)
    assert merged.n == 256 and merged.extra["world_size"] == 2
    assert torch.allclose(merged.values, single.values, atol=1e-10)


@pytest.mark.slow
def test_section43_maps_quick_moves_the_map_and_draws_it(tmp_path):
    out = _run(str(ROOT / "examples" / "section43_maps.py"), "--quick", "--out", str(tmp_path))
    assert "cartoon" in out and "other_net" in out
    table = json.loads((tmp_path / "section43.json").read_text())
    assert set(table) == {"cartoon", "other_net"}
    cartoon = table["cartoon"]  # judged by the script on the 450 test digits (its own float64 CKA map)
    assert cartoon["reached"] and cartoon["test_error_before"] >= 0.2  # measured 0.277
    assert cartoon["test_error_after"] <= 0.05  # measured 0.013
    assert cartoon["inverted_error_after"] <= 0.5 * cartoon["inverted_error_before"]  # measured 0.260 -> 0.062
    assert cartoon["test_accuracy_before"] - cartoon["test_accuracy_after"] <= 0.01  # measured 0.971 -> 0.971
    assert table["other_net"]["test_error_after"] < table["other_net"]["test_error_before"]  # measured 0.013 -> 0.004
    for name in table:
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
