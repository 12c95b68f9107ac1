"""The demo behind `make demo` runs offline and tells the story it promises (quick mode, real models and data)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import repsim_plugin as rp


@pytest.mark.slow
def test_demo_runs_and_writes_its_outputs(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "repsim_plugin.demo", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for section in ("1. compare", "2. stress test", "3. audit"):
        assert section in out
    assert "predictions unchanged: True" in out
    for measure in ("cka", "debiased_cka"):
        result = rp.SimilarityMap.load(tmp_path / f"map_{measure}.json")
        assert result.layers_a == ["relu1", "relu2", "relu3", "fc2"] and result.n == 450
        assert (tmp_path / f"map_{measure}.png").stat().st_size > 1000
    report = (tmp_path / "audit.md").read_text()
    assert "| change | outputs kept | cka | debiased_cka | procrustes | mean_cca |" in report


def test_repsim_demo_subcommand_is_wired():
    from repsim_plugin.cli import build_parser

    args = build_parser().parse_args(["demo", "--quick", "--out", "x"])
    assert args.func.__name__ == "cmd_demo" and args.quick and args.out == "x"
