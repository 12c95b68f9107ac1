"""``shift(..., mixup_similarity=True)``: the similarity term sees the mixed inputs too, and ``criterion="cosine_min"``:
every evaluation sample's output kept, not the mean.

Checked against independent references: the minibatch loss on real + mixed rows is the float64 textbook debiased
CKA of ``reference.py`` on the rows stacked; on the first step (the copy still equals the original) the similarity
of the copy's rows of the real and mixed inputs to the original's is exactly 1, which holds only when the
original's rows are those of the same mixed inputs, in the same order.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from digits_models import PENULTIMATE, train_digits_cnn
from reference import debiased_cka_numpy

import repsim_plugin as rp
from repsim_plugin.adversarial import shift
from repsim_plugin.adversarial._bookkeeping import Fidelity
from repsim_plugin.adversarial._data import Chunk
from repsim_plugin.adversarial.objective import MinibatchMeasure, OutputChecks
from repsim_plugin.adversarial.targets import Evaluation, MapTarget, MixedRows, PairTarget
from repsim_plugin.errors import RepsimError, TargetNotReachedWarning
from repsim_plugin.measures import make

pytestmark = [
    pytest.mark.filterwarnings("ignore::repsim_plugin.errors.SmallSampleBiasWarning"),
    pytest.mark.filterwarnings("ignore::repsim_plugin.errors.TargetNotReachedWarning"),
    pytest.mark.usefixtures("one_thread"),
]


def textbook(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Debiased linear CKA in float64: Song et al.'s unbiased HSIC of the linear Grams."""
    x, y = X.double().numpy(), Y.double().numpy()
    return debiased_cka_numpy(x @ x.T, y @ y.T)


def test_pair_loss_with_mixed_rows_is_the_debiased_cka_of_real_and_mixed_rows_stacked():
    g = torch.Generator().manual_seed(0)
    X, Y, Xm, Ym = (torch.randn(24, d, generator=g, dtype=torch.float64) for d in (7, 5, 7, 5))
    Y, Ym = Y + 0.5 * X[:, :5], Ym + 0.5 * Xm[:, :5]  # related, so that the value is far from 0
    target = PairTarget("layer", 0.3, None, None)
    chunk = Chunk(inputs=torch.zeros(30, 1), labels=None, n=30, reference=torch.cat([Y, torch.zeros(6, 5)]))
    index = torch.arange(24)
    estimate = MinibatchMeasure(make("cka"))
    loss, value = target.loss(estimate, {"layer": X}, chunk, index, MixedRows({"layer": Xm}, Ym))
    expected = textbook(torch.cat([X, Xm]), torch.cat([Y, Ym]))
    assert value == pytest.approx(expected, abs=1e-12)
    assert float(loss) == pytest.approx(math.log(math.cosh(expected - 0.3)), abs=1e-12)
    _, alone = target.loss(estimate, {"layer": X}, chunk, index)
    assert alone == pytest.approx(textbook(X, Y), abs=1e-12) and abs(alone - expected) > 1e-3


def test_map_loss_with_mixed_rows_is_the_map_of_real_and_mixed_rows_stacked():
    g = torch.Generator().manual_seed(1)
    rows = {name: torch.randn(20, 6, generator=g, dtype=torch.float64) for name in ("a", "b", "c")}
    mixed = {name: torch.randn(20, 6, generator=g, dtype=torch.float64) + rows[name] for name in rows}
    matrix = torch.full((3, 3), 0.5, dtype=torch.float64)
    target = MapTarget(matrix, ["a", "b", "c"], None)
    chunk = Chunk(inputs=torch.zeros(20, 1), labels=None, n=20)
    _, error = target.loss(MinibatchMeasure(make("cka")), rows, chunk, torch.arange(20), MixedRows(mixed, None))
    stacked = {name: torch.cat([rows[name], mixed[name]]) for name in rows}
    M = np.array([[textbook(stacked[i], stacked[j]) for j in "abc"] for i in "abc"])
    assert error == pytest.approx(float(np.abs(M - 0.5).mean()), abs=1e-10)  # every entry is constrained


def test_first_step_sees_the_originals_rows_of_the_same_mixed_inputs(digits):
    model, Xtr, _, Xte, _ = digits
    fingerprint = rp.results.state_dict_fingerprint(model)
    common = {"target": 0.3, "eval_data": Xte, "steps": 6, "eval_every": 1, "progress": False, "batch_size": 64}
    with_mixed = shift(model, PENULTIMATE, Xtr, mixup_similarity=True, **common)
    plain = shift(model, PENULTIMATE, Xtr, **common)
    # step 1 runs on the untouched copy: its rows of real and mixed digits against the original's are identical
    assert with_mixed.history[1]["minibatch_value"] == pytest.approx(1.0, abs=1e-9)
    later = [h["minibatch_value"] for h in with_mixed.history[2:]]
    assert later != [h["minibatch_value"] for h in plain.history[2:]]  # the mixed rows change the objective
    assert with_mixed.mixup_similarity and not plain.mixup_similarity
    assert with_mixed.to_dict()["mixup_similarity"] is True
    assert rp.results.state_dict_fingerprint(model) == fingerprint
    assert all(not m._forward_hooks for m in model.modules())


def test_a_map_target_with_mixed_rows_runs_and_names_the_option(digits):
    model, Xtr, _, Xte, _ = digits
    result = shift(
        model, None, Xtr, target_map=0.5, map_layers=["relu1", "relu2", PENULTIMATE], eval_data=Xte, steps=4,
        eval_every=2, mixup_similarity=True, progress=False, batch_size=64,
    )  # fmt: skip
    assert result.mixup_similarity and len(result.history) == 3
    assert all(np.isfinite(h["minibatch_map_error"]) for h in result.history[1:])


def test_mixup_similarity_needs_mixup_and_the_originals_rows(digits):
    model, Xtr, *_ = digits
    other, _ = train_digits_cnn(seed=1)
    with pytest.raises(RepsimError, match="give mixup > 0"):
        shift(model, PENULTIMATE, Xtr, target=0.3, steps=1, mixup=0.0, mixup_similarity=True, progress=False)
    with pytest.raises(RepsimError, match="reference rows of the mixed inputs"):
        shift(
            model, PENULTIMATE, Xtr, target=0.3, steps=1, reference=(other, PENULTIMATE), mixup_similarity=True,
            progress=False,
        )  # fmt: skip


def test_hard_labels_turn_mixup_and_its_similarity_off(digits):
    model, Xtr, ytr, Xte, yte = digits
    result = shift(
        model, PENULTIMATE, (Xtr, ytr), target=0.3, steps=2, preserve="ce", mixup_similarity=True, progress=False,
        eval_data=(Xte, yte),
    )  # fmt: skip
    assert result.mixup == 0.0 and not result.mixup_similarity


def checks(cosines: list[float]) -> Evaluation:
    c = torch.tensor(cosines, dtype=torch.float64)
    return Evaluation(0.5, None, None, OutputChecks(None, None, float(c.mean()), float(c.min()), None))


def test_cosine_min_keeps_only_when_every_sample_is_within_tolerance():
    before = checks([1.0, 1.0, 1.0]).outputs
    one_drifted = checks([0.999, 0.999, 0.975])  # mean 0.991: kept by the mean, not by the smallest
    mean = Fidelity("cosine", 0.01, before)
    smallest = Fidelity("cosine_min", 0.01, before)
    assert mean.kept(one_drifted) and not smallest.kept(one_drifted)
    assert smallest.kept(checks([0.995, 0.991, 0.990]))
    # the best state among those in the target band: the one whose worst sample is closest
    assert smallest.score(checks([0.999, 0.999, 0.991])) < smallest.score(checks([0.995, 0.995, 0.994]))
    assert mean.score(checks([0.999, 0.999, 0.991])) > mean.score(checks([0.995, 0.995, 0.994]))


def test_cosine_min_criterion_in_a_run_is_judged_on_the_smallest_held_out_cosine(digits):
    model, Xtr, _, Xte, _ = digits
    with pytest.warns(TargetNotReachedWarning) as caught:
        result = shift(
            model, PENULTIMATE, Xtr, target=0.3, eval_data=Xte, steps=8, eval_every=2, criterion="cosine_min",
            tolerance=0.002, progress=False, batch_size=64,
        )  # fmt: skip
    assert result.criterion == "cosine_min"
    message = next(str(w.message) for w in caught if w.category is TargetNotReachedWarning)
    assert "(cosine_min within 0.002)" in message and "lost the outputs (cosine_min 0." in message
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(
            result.model(Xte).double(), model(Xte).double(), dim=1
        )  # independent of the library's checks
    assert result.cosine_min == pytest.approx(float(cos.min()), abs=1e-6)
    assert result.kept == (float(cos.min()) >= 1 - 0.002 - 1e-9)
    for entry in result.history:
        assert entry["kept"] == (entry["cosine_min"] >= 1 - 0.002 - 1e-12)
