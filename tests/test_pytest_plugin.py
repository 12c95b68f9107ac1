"""The pytest plugin, run the way users run it: pytest in a subprocess on a scratch project (a copy of
examples/snapshot_tests), plus in-process checks of the ini defaults and the size warning."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "snapshot_tests" / "test_digits_snapshot.py"
SNAPSHOT = "test_digits_snapshot__test_digits_cnn_representations"

pytest_plugins = ["pytester"]
#: plugins the scratch project does not use (hypothesis' alone takes over a second to import)
QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:anyio")


def _pytest(project: Path, *args: str, replace: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("REPSIM_EXAMPLE_REPLACE", None)
    if replace:
        env["REPSIM_EXAMPLE_REPLACE"] = replace
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *QUIET, *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_snapshot_lifecycle_in_a_scratch_project(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\nrepsim_measure = cka\nrepsim_min_similarity = 0.99\n")
    shutil.copy(EXAMPLE, tmp_path / EXAMPLE.name)
    snapshots = tmp_path / "__repsim_snapshots__"

    missing = _pytest(tmp_path)
    assert missing.returncode == 1, missing.stdout
    assert "--repsim-update" in missing.stdout and not snapshots.exists()

    update = _pytest(tmp_path, "--repsim-update")
    assert update.returncode == 0, update.stdout + update.stderr
    meta = json.loads((snapshots / f"{SNAPSHOT}.json").read_text())
    assert meta["layers"] == ["relu1", "relu2", "fc1", "fc2"] and meta["measure"].startswith("cka-kernel=linear")
    assert meta["policy"]["spatial"] == "mean" and "torch" in meta["versions"]
    rows = load_file(str(snapshots / f"{SNAPSHOT}.safetensors"))  # plain tensors: no pickle anywhere
    assert sorted(rows) == ["layer0", "layer1", "layer2", "layer3"] and rows["layer2"].shape == (200, 64)
    assert (snapshots / f"{SNAPSHOT}.safetensors").stat().st_size < 200_000

    unchanged = _pytest(tmp_path)
    assert unchanged.returncode == 0, unchanged.stdout

    drifted = _pytest(tmp_path, replace="fc2")
    assert drifted.returncode == 1
    lines = drifted.stdout.splitlines()
    first = next(line for line in lines if "layers below" in line)
    assert first.startswith("1 of 4 layers below cka-kernel=linear-hsic=gretton-score >= 0.99: fc2 (")
    table = lines[lines.index(first) + 2 : lines.index(first) + 7]
    assert [row.split()[0] for row in table] == ["layer", "relu1", "relu2", "fc1", "fc2"]
    assert table[-1].split()[-1] == "DRIFTED" and all(row.split()[-1] == "ok" for row in table[1:-1])
    print("\n".join(lines[lines.index(first) - 1 : lines.index(first) + 8]))  # for the issue note


SCRATCH_TEST = """
import torch

def test_small(repsim_snapshot):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh())
    x = torch.randn(4000, 4, generator=torch.Generator().manual_seed(0))
    values = repsim_snapshot.assert_match(model, x, ["0", "1"])
    assert set(values) == {"0", "1"}
"""


def test_ini_defaults_and_the_size_warning(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nrepsim_measure = debiased_cka\nrepsim_snapshot_warn_mb = 1\n")
    pytester.makepyfile(test_scratch=SCRATCH_TEST)
    result = pytester.runpytest_inprocess("--repsim-update", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*SnapshotSizeWarning: representation snapshot*MB (over repsim_snapshot_warn_mb=1)*"])
    meta = json.loads(next((pytester.path / "__repsim_snapshots__").glob("*.json")).read_text())
    assert meta["measure"] == "cka-kernel=linear-hsic=song-score"
    again = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    again.assert_outcomes(passed=1)
