"""audit(..., attributions=IntegratedGradients): each fine-tuning run reports whether A's explanations were kept.

Judged by an independent computation: captum's own IntegratedGradients on both models and a float64 textbook
linear CKA of the per-sample attribution rows (tests/reference.py), on the same evaluation inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients
from reference import cka_numpy

import repsim_plugin as rp
from repsim_plugin.digits import train_digits_cnn
from repsim_plugin.errors import RepsimError

pytestmark = [pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def audited():
    model_a, (Xtr, ytr, Xte, yte) = train_digits_cnn(0)
    model_b, _ = train_digits_cnn(1)
    before = {k: v.clone() for k, v in model_a.state_dict().items()}
    report = rp.adversarial.audit(
        model_a, "relu3", model_b, "relu3", Xtr[:400], labels=ytr[:400], eval_data=Xte[:96], eval_labels=yte[:96],
        steps=40, progress=False, measures=["cka"], attributions=IntegratedGradients,
        attribution_kwargs={"n_steps": 8}, attribution_samples=48,
    )  # fmt: skip
    return model_a, Xte[:48], report, before


def _ig_rows(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    attr = IntegratedGradients(model).attribute(x, target=target, n_steps=8)
    return attr.detach().reshape(x.shape[0], -1).double().numpy()


def test_each_fine_tuning_row_carries_the_attribution_similarity_of_an_independent_computation(audited):
    model_a, x, report, _ = audited
    runs = [c for c in report.changes if c.kind == "finetune"]
    assert len(runs) == 2 and all(c.attributions is not None for c in runs)
    target = model_a(x).argmax(1)
    for change, shifted in zip(runs, report.shifts.values(), strict=True):
        expected = cka_numpy(_ig_rows(model_a, x, target), _ig_rows(shifted.model, x, target))
        assert change.attributions == pytest.approx(expected, abs=1e-5)
        assert 0.0 < change.attributions <= 1.0 + 1e-9
    others = [c for c in report.changes if c.kind in ("subset_translation", "outlier")]
    assert others and all(c.attributions is None for c in others)


def test_the_report_shows_it_and_the_model_is_untouched(audited):
    model_a, _, report, before = audited
    text = report.to_markdown()
    assert "attributions kept" in text and "IntegratedGradients attributions on 48 evaluation inputs" in text
    assert report.to_dict()["changes"][1]["attributions"] is not None
    assert all(torch.equal(before[k], v) for k, v in model_a.state_dict().items())
    assert not any(p.grad is not None for p in model_a.parameters())


def test_attributions_must_be_an_attribution_class():
    model, (Xtr, _, _, _) = train_digits_cnn(0)
    with pytest.raises(RepsimError, match="captum attribution class"):
        rp.adversarial.audit(model, "relu3", model, "relu3", Xtr[:64], steps=0, progress=False, attributions=3)
