"""``rp.adversarial.audit``, ``repsim audit`` and ``examples/audit_digits.py`` on two real digits CNNs.

The claim and every analytic change are recomputed here from the captured representations with float64 numpy
(``reference.py``: textbook Gram-form CKA; textbook CCA from QR + SVD written below), and "predictions kept" is
checked by running the network's head on the changed rows, independently of the audit's own end-to-end check.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from digits_models import PENULTIMATE, hidden, train_digits_cnn
from reference import cka_numpy

import repsim_plugin as rp
from repsim_plugin.adversarial import AuditReport, audit
from repsim_plugin.cli import main as repsim_main
from repsim_plugin.errors import DegenerateInputError, RepsimError
from repsim_plugin.measures import Measure
from repsim_plugin.measures.registry import Spec

pytestmark = [
    pytest.mark.filterwarnings("ignore::repsim_plugin.errors.SmallSampleBiasWarning"),
    pytest.mark.usefixtures("one_thread"),  # conftest.py: tiny models train faster and reproducibly on one thread
]

MEASURES = ("cka", "debiased_cka", "procrustes", "mean_cca")
KEEP_HELD_OUT = {"temperature": 1.0, "tolerance": 0.02}  # see test_adversarial_shift.py for the measured margins
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_cnns():
    model_a, (Xtr, ytr, Xte, yte) = train_digits_cnn(seed=0)
    model_b, _ = train_digits_cnn(seed=1)
    return model_a, model_b, Xtr, ytr, Xte, yte


@pytest.fixture(scope="module")
def report(two_cnns) -> AuditReport:
    model_a, model_b, Xtr, ytr, Xte, yte = two_cnns
    before = (rp.results.state_dict_fingerprint(model_a), rp.results.state_dict_fingerprint(model_b))
    result = audit(
        model_a, PENULTIMATE, model_b, PENULTIMATE, (Xtr, ytr), measures=MEASURES, eval_data=(Xte, yte),
        steps=600, names=("CNN seed 0", "CNN seed 1"), **KEEP_HELD_OUT,
    )  # fmt: skip
    after = (rp.results.state_dict_fingerprint(model_a), rp.results.state_dict_fingerprint(model_b))
    assert before == after  # neither model is modified
    return result


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    X64, Y64 = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    return cka_numpy(X64 - X64.mean(0), Y64 - Y64.mean(0))


def column_basis(X: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the centred columns' span (dead units dropped: numpy's matrix_rank rule)."""
    U, _, _ = np.linalg.svd(X - X.mean(0), full_matrices=False)
    return U[:, : np.linalg.matrix_rank(X - X.mean(0))]


def mean_cca(X: np.ndarray, Y: np.ndarray) -> float:
    """Textbook CCA: the canonical correlations are the singular values of Ux^T Uy (bases of the two spans)."""
    return float(np.linalg.svd(column_basis(X).T @ column_basis(Y), compute_uv=False).clip(0, 1).mean())


def markdown_table(markdown: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the first table after a heading that starts with ``heading``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## " + heading))
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


# --- the report on two digits CNNs ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_lists_every_measure_before_and_after_each_change_as_markdown(report):
    markdown = report.to_markdown()
    assert markdown.startswith("# Similarity audit: CNN seed 0 `relu3` vs CNN seed 1 `relu3`")
    assert f"**{report.claim:.3f}**" in markdown and "450 held-out samples" in markdown
    for title, skip in (("Every measure, A' (changed) vs B", 0), ("How each measure sees the change itself", 1)):
        header, *rows = markdown_table(markdown, title)
        assert header == ["change", "outputs kept", *MEASURES]
        assert [row[0] for row in rows] == [change.name for change in report.changes[skip:]]
        for row, change in zip(rows, report.changes[skip:], strict=True):
            values = change.values if skip == 0 else change.self_values
            for cell, measure in zip(row[2:], MEASURES, strict=True):
                assert float(cell) == pytest.approx(values[measure], abs=5e-4)  # every measure, every change
    names = [change.name for change in report.changes]
    assert names == [
        "original (the claim)",
        "fine-tuned toward 0",
        "fine-tuned toward 1",
        "subset translation",
        "single outlier",
    ]
    assert "## Fine-tuning runs" in markdown and "## Notes" in markdown
    assert re.search(r"ranges from \*\*0\.\d{3}\*\* \(fine-tuned toward 0\) to \*\*0\.9\d\d\*\*", markdown)
    assert "cka-kernel=linear-hsic=gretton-score" in markdown and "cca-mean=r-score" in markdown


@pytest.mark.slow
def test_claim_and_reachable_range(two_cnns, report):
    model_a, model_b, _, _, Xte, _ = two_cnns
    HA, HB = hidden(model_a, Xte), hidden(model_b, Xte)
    assert report.claim == pytest.approx(linear_cka(HA, HB), abs=1e-6)
    assert report.baseline["cka"] == report.claim
    assert report.baseline["mean_cca"] == pytest.approx(mean_cca(HA.double().numpy(), HB.double().numpy()), abs=1e-6)
    low, high = report.shifts["toward 0"], report.shifts["toward 1"]
    for result in (low, high):
        assert result.kept and result.criterion == "agreement"
        with torch.no_grad():
            agreement = float((result.model(Xte).argmax(1) == model_a(Xte).argmax(1)).double().mean())
        assert agreement >= 0.98  # outputs kept: agreement >= 1 - tolerance, checked here from the models
    low_cka = linear_cka(hidden(low.model, Xte), HB)
    high_cka = linear_cka(hidden(high.model, Xte), HB)
    assert report.change("fine-tuned toward 0").values["cka"] == pytest.approx(low_cka, abs=1e-6)
    assert report.lowest == pytest.approx(min(low_cka, *(c.values["cka"] for c in report.changes[3:])), abs=1e-9)
    assert report.highest == pytest.approx(high_cka, abs=1e-6)
    assert report.lowest <= 0.3  # measured 0.10 (claim 0.92)
    assert report.highest >= max(report.claim, 0.95)  # measured 0.998
    assert report.range_sources == {"lowest": "fine-tuned toward 0", "highest": "fine-tuned toward 1"}


@pytest.mark.slow
def test_subset_translation_keeps_predictions_and_only_the_cca_family_is_invariant(two_cnns, report):
    model_a, model_b, _, _, Xte, yte = two_cnns
    change = report.change("subset_translation")
    HA = hidden(model_a, Xte).double()
    rows = torch.tensor(change.details["rows"])
    v = torch.tensor(change.details["direction"], dtype=torch.float64)
    moved = HA.clone()
    moved[rows] += change.details["c"] * v / v.norm()
    # one whole class moves (the class with the smallest Theorem 1 limit)
    assert len(set(yte[rows].tolist())) == 1 and len(rows) == int((yte == yte[rows[0]]).sum())
    assert bool((moved >= 0).all())  # post-ReLU layer: the direction is non-negative
    with torch.no_grad():  # the head sees no difference: predictions identical, logits equal to float precision
        logits, logits_moved = model_a.fc2(HA.float()), model_a.fc2(moved.float())
    assert torch.equal(logits.argmax(1), logits_moved.argmax(1))
    assert change.kept and change.details["agreement"] == 1.0
    assert float((logits_moved - logits).abs().max()) <= 1e-3
    self_cka = linear_cka(HA, moved)
    assert change.self_values["cka"] == pytest.approx(self_cka, abs=1e-6)
    assert change.values["cka"] == pytest.approx(linear_cka(moved, hidden(model_b, Xte)), abs=1e-6)
    p = int(np.linalg.matrix_rank(HA.numpy() - HA.numpy().mean(0)))  # 52 of 64 units are alive
    # rank one: at least p - 1 canonical correlations stay 1 (textbook CCA here), CKA and Procrustes collapse
    assert mean_cca(HA.numpy(), moved.numpy()) >= (p - 1) / p - 1e-9
    assert change.self_values["mean_cca"] >= (p - 1) / p - 1e-9
    assert self_cka <= 0.25  # scaled to reach 0.2
    assert change.self_values["procrustes"] <= 0.8  # measured 0.61
    assert any("mean CCA >= (p-1)/p" in note for note in report.notes)


@pytest.mark.slow
def test_outlier_and_serialisation(tmp_path, two_cnns, report):
    model_a, _, _, _, Xte, _ = two_cnns
    outlier = report.change("outlier")
    assert outlier.kept and outlier.details["agreement"] == 1.0
    HA = hidden(model_a, Xte).double()
    moved = HA.clone()
    v = torch.tensor(outlier.details["direction"], dtype=torch.float64)
    moved[outlier.details["index"]] += outlier.details["c"] * v / v.norm()
    assert outlier.self_values["cka"] == pytest.approx(linear_cka(HA, moved), abs=1e-6)
    assert outlier.self_values["cka"] <= 0.25
    assert outlier.details["c"] > 10 * outlier.details["scale"]  # a single point has to move far
    payload = report.to_dict()
    again = json.loads(json.dumps(payload))
    assert again["claim"] == report.claim and again["measures"] == list(MEASURES)
    assert [c["name"] for c in again["changes"]] == [c.name for c in report.changes]
    assert again["shifts"]["toward 0"]["history"][0]["lambda"] == 10.0
    path = report.save(tmp_path / "sub" / "audit.json")
    assert json.loads(path.read_text())["changes"][3]["values"] == report.changes[3].values
    png = tmp_path / "audit.png"
    report.plot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    assert report.plot(ax) is ax
    assert "shifts" not in repr(report)


# --- analytic audits without fine-tuning (fast) ----------------------------------------------------------------------


def test_analytic_audit_of_a_conv_layer_read_by_a_linear_layer_after_flatten(two_cnns):
    """relu2 (32x4x4) is flattened into fc1: the direction comes from fc1 and is checked end to end."""
    model_a, model_b, _, _, Xte, yte = two_cnns
    result = audit(model_a, "relu2", model_b, "relu2", (Xte, yte), steps=0)
    change = result.change("subset_translation")
    assert "`fc1`" in change.description and change.kept
    assert change.details["head"] == "fc1" and change.details["agreement"] == 1.0
    assert result.features == 512 and result.shifts == {}
    assert [c.kind for c in result.changes] == ["original", "subset_translation", "outlier"]
    assert change.self_values["cka"] == pytest.approx(
        linear_cka(
            hidden(model_a, Xte, "relu2"),
            _translated(hidden(model_a, Xte, "relu2"), change.details),
        ),
        abs=1e-6,
    )


def test_analytic_audit_without_a_linear_reader_uses_a_probe(two_cnns):
    """relu1 feeds a convolution: the separability-preserving direction comes from a linear probe."""
    model_a, model_b, _, _, Xte, yte = two_cnns
    result = audit(model_a, "relu1", model_b, "relu1", (Xte, yte), steps=0, measures=("cka", "debiased_cka"))
    change = result.change("subset_translation")
    assert "probe" in change.description and "linear-probe predictions 100.0% unchanged" in change.kept_by
    assert change.kept and change.details["probe_agreement"] == 1.0
    assert "head" not in change.details
    assert result.measures == ["cka", "debiased_cka"]


def test_audit_adds_the_claim_measure_and_reports_measures_that_fail_or_warn(two_cnns):
    model_a, model_b, _, _, Xte, _ = two_cnns

    def bounded(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        if float(X.abs().max()) > 100:
            raise DegenerateInputError("values above 100")
        return (X.mean() - Y.mean()).abs()

    fragile = Measure(fn=bounded, spec=Spec("mean_gap"), larger_is_more_similar=False, symmetric=True)
    X = Xte[:40]  # 40 samples, 52 live units: CCA is degenerate (p >= n - 1) and warns
    result = audit(model_a, PENULTIMATE, model_b, PENULTIMATE, X, measures=("mean_cca", fragile), steps=0)
    assert result.measures == ["cka", "mean_cca", "mean_gap"]
    assert result.baseline["mean_gap"] is not None and result.change("subset_translation").values["mean_gap"] is None
    assert any(
        n.startswith("mean_gap could not be computed on some representations: values above 100") for n in result.notes
    )
    assert any(n.startswith("mean_cca warned:") for n in result.notes)
    markdown = result.to_markdown()
    assert "| n/a |" in markdown and "mean_gap (distance: lower = similar)" in markdown
    assert result.change("subset_translation").kept_by.startswith("model predictions")  # predicted classes
    with pytest.raises(RepsimError, match="claim measure mean_gap cannot be computed"):
        audit(
            model_a, PENULTIMATE, model_b, PENULTIMATE, X * 1000, measures=(fragile,), claim_measure="mean_gap", steps=0
        )


def test_audit_rejects_bad_arguments(two_cnns):
    model_a, model_b, _, _, Xte, _ = two_cnns
    with pytest.raises(RepsimError, match="steps"):
        audit(model_a, PENULTIMATE, model_b, PENULTIMATE, Xte, steps=-1)
    with pytest.raises(RepsimError, match="layer_b"):
        audit(model_a, PENULTIMATE, model_b, "", Xte, steps=0)
    with pytest.raises(RepsimError, match="model_b"):
        audit(model_a, PENULTIMATE, "model", PENULTIMATE, Xte, steps=0)
    with pytest.raises(RepsimError, match="criterion"):
        audit(model_a, PENULTIMATE, model_b, PENULTIMATE, Xte, steps=0, criterion="accuracy")


def _translated(H: torch.Tensor, details: dict) -> torch.Tensor:
    moved = H.double().clone()
    v = torch.tensor(details["direction"], dtype=torch.float64)
    moved[torch.tensor(details["rows"])] += details["c"] * v / v.norm()
    return moved


# --- the command line and the example ------------------------------------------------------------------------------


def test_repsim_audit_command(tmp_path, capsys, two_cnns):
    model_a, model_b, Xtr, ytr, Xte, yte = two_cnns
    files = {}
    for name, value in (("a", model_a.state_dict()), ("b", model_b.state_dict())):
        files[name] = tmp_path / f"{name}.pt"
        torch.save(value, files[name])
    for name, value in (("xtr", Xtr[:300]), ("ytr", ytr[:300]), ("xte", Xte), ("yte", yte)):
        files[name] = tmp_path / f"{name}.pt"
        torch.save(value, files[name])
    np.save(tmp_path / "yte.npy", yte.numpy())
    spec = "module:repsim_plugin.digits:build_digits_cnn"
    argv = [
        "audit", "--model-a", spec, "--checkpoint-a", str(files["a"]), "--checkpoint-b", str(files["b"]),
        "--layer-a", PENULTIMATE, "--data", str(files["xtr"]), "--labels", str(files["ytr"]),
        "--eval-data", str(files["xte"]), "--eval-labels", str(tmp_path / "yte.npy"), "--steps", "20",
        "--measures", "cka", "procrustes", "--out", str(tmp_path / "out"), "--no-progress",
    ]  # fmt: skip
    assert repsim_main(argv) == 0
    printed = capsys.readouterr().out
    assert "# Similarity audit: module:repsim_plugin.digits:build_digits_cnn @ a.pt" in printed
    assert "| change | outputs kept | cka | procrustes |" in printed
    for name in ("audit.md", "audit.json", "audit.png"):
        assert (tmp_path / "out" / name).is_file() and f"wrote {tmp_path / 'out' / name}" in printed
    saved = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert saved["claim"] == pytest.approx(linear_cka(hidden(model_a, Xte), hidden(model_b, Xte)), abs=1e-5)
    assert saved["n"] == len(Xte) and saved["held_out"] and saved["shifts"]["toward 0"]["steps"] == 20
    assert (tmp_path / "out" / "audit.md").read_text() in printed
    # bad labels: a clear message and exit status 2
    torch.save(torch.rand(300), tmp_path / "float_labels.pt")
    bad = [*argv]
    bad[bad.index("--labels") + 1] = str(tmp_path / "float_labels.pt")
    assert repsim_main(bad) == 2
    assert "1-D integer tensor of class indices" in capsys.readouterr().err


def test_audit_subcommand_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        repsim_main(["audit", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model-a", "--layer-a", "--layer-b", "--data", "--eval-data", "--labels", "--measures"):
        assert option in text


@pytest.mark.slow
def test_audit_digits_example_runs(tmp_path):
    script = ROOT / "examples" / "audit_digits.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "| CKA before | CKA after | top-1 agreement |" in done.stdout
    assert "## Every measure, A' (changed) vs B `relu3`" in done.stdout
    assert (tmp_path / "audit.md").is_file() and (tmp_path / "audit.png").is_file()
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert saved["measures"] == list(MEASURES)
