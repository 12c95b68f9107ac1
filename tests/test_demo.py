"""The demo behind `make demo` runs offline and tells the story it promises (quick mode, real models and data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from html_pages import read_page

import repsim_plugin as rp


@pytest.mark.slow
def test_demo_runs_and_writes_its_outputs(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "repsim_plugin.demo", "--quick", "--no-progress", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for section in ("1. compare", "2. checkpoints", "3. MiniLM", "4. stress test", "5. audit"):
        assert section in out
    assert out.strip().splitlines()[-1] == f"open {(tmp_path / 'index.html').resolve()}"
    index = read_page(tmp_path / "index.html")
    pages = [u for u in index.urls if u.endswith(".html")]
    assert pages == ["compare.html", "checkpoints.html", "minilm.html", "stress.html", "audit.html"]
    for name in pages:
        assert read_page(tmp_path / name).images, name  # every section shows its picture
    assert "tokens=mean" in "".join(read_page(tmp_path / "minilm.html").text)
    minilm = rp.SimilarityMap.load(tmp_path / "minilm.json")
    assert minilm.layers_a == [f"encoder.layer.{k}" for k in range(6)] and minilm.n == 96
    assert torch.allclose(minilm.values.diagonal(), torch.ones(6, dtype=torch.float64), atol=1e-6)
    trajectory = json.loads((tmp_path / "trajectory.json").read_text())
    assert trajectory["reference"] == "epoch10.safetensors" and len(trajectory["checkpoints"]) == 3
    assert "predictions unchanged: True" in out
    for measure in ("cka", "debiased_cka"):
        result = rp.SimilarityMap.load(tmp_path / f"map_{measure}.json")
        assert result.layers_a == ["relu1", "relu2", "relu3", "fc2"] and result.n == 450
        assert (tmp_path / f"map_{measure}.png").stat().st_size > 1000
        assert result.null_baseline is not None
    report = (tmp_path / "audit.md").read_text()
    assert "| change | outputs kept | cka | debiased_cka | procrustes | mean_cca |" in report


def test_repsim_demo_subcommand_is_wired():
    from repsim_plugin.cli import build_parser

    args = build_parser().parse_args(["demo", "--quick", "--out", "x"])
    assert args.func.__name__ == "cmd_demo" and args.quick and args.out == "x"
