"""What the audit report says it checked: the held-out part it evaluates on, the headline range (only changes whose
outputs were checked and kept), runs that did not reach their target, and an audit of A against itself.

Real small models trained here on scikit-learn's digits in about a second; the claim is recomputed with a float64
linear CKA written in this file on the samples the report says it used.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from repsim_plugin.adversarial import audit
from repsim_plugin.adversarial.auditing import SELF_AUDIT
from repsim_plugin.errors import RepsimError, TargetNotReachedWarning

pytestmark = [
    pytest.mark.filterwarnings("ignore::repsim_plugin.errors.SmallSampleBiasWarning"),
    pytest.mark.usefixtures("one_thread"),
]


def cka64(X: torch.Tensor, Y: torch.Tensor) -> float:
    A, B = X.double().numpy(), Y.double().numpy()
    A, B = A - A.mean(0), B - B.mean(0)
    return float(np.linalg.norm(B.T @ A) ** 2 / (np.linalg.norm(A.T @ A) * np.linalg.norm(B.T @ B)))


@torch.no_grad()
def rows(model: nn.Module, layer: str, X: torch.Tensor) -> torch.Tensor:
    seen: dict[str, torch.Tensor] = {}

    def grab(module: nn.Module, args: object, output: torch.Tensor) -> None:  # returns None: the output is kept
        seen["r"] = output.flatten(1)

    handle = model.get_submodule(layer).register_forward_hook(grab)
    try:
        model(X)
    finally:
        handle.remove()
    return seen["r"]


def digits(n: int = 600) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor((d.data / 16.0).astype(np.float32))
    y = torch.tensor(d.target.astype(np.int64))
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))[:n]
    return X[order], y[order]


def mlp(X: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(15):
        for i in torch.randperm(len(X), generator=g).split(64):
            loss = nn.functional.cross_entropy(model(X[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def two_mlps():
    X, y = digits()
    return mlp(X, y, 0), mlp(X, y, 1), X, y


def test_audit_without_eval_data_evaluates_on_a_held_out_part_and_marks_runs_that_missed(two_mlps):
    model_a, model_b, X, y = two_mlps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = audit(model_a, "3", model_b, "3", (X, y), steps=3, progress=False)
    # the rows say "target not reached", with the numbers; the audit does not also warn once per run
    assert not [w for w in caught if w.category is TargetNotReachedWarning]
    assert report.held_out and report.n == 120 and "holdout=0.2" in report.evaluated_on
    # the runs are evaluated on the audit's held-out part (passed as their eval_data), trained on the rest
    for run in report.shifts.values():
        assert run.n_eval == 120 and run.n_train == 480 and run.evaluated_on == "eval_data"
        assert run.reached == (abs(run.measure_after - run.target) <= 0.05)
    assert not report.shifts["toward 0"].reached  # 3 steps
    names = [c.name for c in report.changes]
    high = "fine-tuned toward 1" + ("" if report.shifts["toward 1"].reached else " (target not reached)")
    assert "fine-tuned toward 0 (target not reached)" in names and high in names
    low = report.change("fine-tuned toward 0 (target not reached)")
    assert "target NOT reached" in low.description and "120 held-out samples" in low.kept_by
    # the optimiser's minibatch estimate is named next to the full-data measure (none for the original state)
    assert ("optimiser's own estimate" in low.description) == (report.shifts["toward 0"].best_step > 0)
    text = report.to_markdown()
    assert "120 held-out samples" in text and "not reached" in text
    row = next(line for line in text.splitlines() if line.startswith("| toward 0 |"))
    assert "(120)" in row and "**no**" in row  # the held-out n and "reached: no" in the runs' table
    assert "along a no classifier" not in text and "along an arbitrary" not in text  # a classifier: a real direction


def test_the_claim_is_recomputed_on_the_samples_it_names(two_mlps):
    model_a, model_b, X, y = two_mlps
    report = audit(model_a, "3", model_b, "3", (X, y), steps=0, progress=False)
    assert report.n == len(X) and report.held_out  # nothing fine-tuned: every sample is evaluation data
    assert report.claim == pytest.approx(cka64(rows(model_a, "3", X), rows(model_b, "3", X)), abs=1e-6)


def test_headline_counts_only_changes_whose_outputs_were_checked(two_mlps):
    model_a, model_b, X, y = two_mlps
    report = audit(model_a, "3", model_b, "3", (X, y), steps=0, progress=False)
    checked = [c for c in report.changes if c.kind == "original" or c.kept is True]
    values = [c.values["cka"] for c in checked]
    assert report.lowest == pytest.approx(min(values)) and report.highest == pytest.approx(max(values))
    # mark one change as not checked: it leaves the headline, and the headline says so
    subset = report.change("subset_translation")
    subset.kept, subset.kept_by = None, "not checked (no classifier)"
    text = report.to_markdown()
    assert "Not counted, outputs not checked: subset translation." in text


def test_auditing_a_against_itself_is_said_loudly(two_mlps):
    model_a, _, X, y = two_mlps
    report = audit(model_a, "3", model_a, "3", (X, y), steps=0, progress=False)
    assert report.self_audit and report.notes[0] == SELF_AUDIT
    assert report.claim == pytest.approx(1.0, abs=1e-9)
    text = report.to_markdown()
    assert "A is audited against itself" in text and "AUDITED AGAINST ITSELF" in text
    other = audit(model_a, "3", model_a, "1", (X, y), steps=0, progress=False)  # another layer: a real question
    assert not other.self_audit
    with pytest.raises(RepsimError, match="model_b"):
        audit(model_a, "3", None, "3", (X, y), steps=0, progress=False)
