"""``shift`` with its defaults on a timm model, judged on digits the fine-tuning never saw (issue 13, point 5).

The model: timm's ``test_convnext`` (``pretrained=False``: a four-stage ConvNeXt with 24-64 channels, 0.2M
parameters), ``in_chans=1``, ``num_classes=10``, trained briefly here on 1400 of scikit-learn's digits upsampled to
32 x 32; layer ``"stages.2"`` (48 channels on a 2 x 2 grid, the counterpart of the digits CNN's pooled features in
``test_shift_defaults.py``). Every number is recomputed with plain torch forwards, a forward hook of this file's and
the float64 linear CKA of ``test_shift_defaults.py`` on the 397 held-out digits.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_shift_defaults import digits_split, judged, train
from torch.nn import functional as F  # noqa: N812

import repsim_plugin as rp
from repsim_plugin.adversarial import shift
from repsim_plugin.errors import TargetNotReachedWarning

timm = pytest.importorskip("timm")

pytestmark = [
    pytest.mark.filterwarnings("ignore::repsim_plugin.errors.SmallSampleBiasWarning"),
    pytest.mark.usefixtures("one_thread"),  # conftest.py: tiny models train faster and reproducibly on one thread
]

LAYER = "stages.2"


def upsampled(X: torch.Tensor) -> torch.Tensor:
    return F.interpolate(X, size=32, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def convnext():
    Xtr, ytr, Xte, yte = digits_split(0)
    Xtr, Xte = upsampled(Xtr), upsampled(Xte)
    torch.manual_seed(0)
    model = timm.create_model("test_convnext", pretrained=False, num_classes=10, in_chans=1)
    return train(model, Xtr, ytr, epochs=8), Xtr, ytr, Xte, yte


@pytest.mark.slow
def test_default_shift_of_a_timm_convnext_reaches_the_target_on_digits_it_never_saw(convnext):
    model, Xtr, ytr, Xte, yte = convnext
    fingerprint = rp.results.state_dict_fingerprint(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TargetNotReachedWarning)  # reached: no warning
        result = shift(model, LAYER, (Xtr, ytr), target=0.2)
    assert rp.results.state_dict_fingerprint(model) == fingerprint
    assert result.reached and result.kept and result.stopped_at is not None  # stopped early, not at the budget

    # on the 397 digits neither the training nor the shift saw
    j = judged(model, result, LAYER, Xte, yte)
    assert abs(j["cka"] - 0.2) <= 0.1  # measured 0.208
    assert j["agreement"] >= 0.97  # measured 0.992
    assert j["accuracy_before"] - j["accuracy_after"] <= 0.02  # measured 0.977 -> 0.980
    assert j["accuracy_before"] >= 0.95  # measured 0.977: the model is a trained classifier, not a chance one

    # the library's numbers are the held-out part of data it recorded, recomputed here
    held = torch.tensor(result.held_out_indices)
    h = judged(model, result, LAYER, Xtr[held], ytr[held])
    assert h["cka"] == pytest.approx(result.measure_after, abs=1e-5)
    assert abs(result.measure_after - 0.2) <= result.target_tolerance
    assert h["agreement"] == pytest.approx(result.agreement) and h["agreement"] >= 0.985  # tolerance 0.015
    # biased CKA is the estimator here: 280 held-out digits against few effective dimensions
    assert result.estimator == "cka-kernel=linear-hsic=gretton-score" and result.estimator_reason == ""
