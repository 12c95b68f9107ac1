"""captum-native classes, driven by captum's own AttackComparator and MinParamPerturbation on a trained digits CNN."""

from __future__ import annotations

import copy

import pytest
import torch
from captum.attr import IntegratedGradients, Saliency
from captum.robust import FGSM, AttackComparator, MinParamPerturbation
from digits_models import train_digits_cnn
from reference import cka_numpy

import repsim_plugin as rp
from repsim_plugin.captum import AttributionSimilarity, LayerSimilarity, RepresentationShift, attribution_change
from repsim_plugin.results import state_dict_fingerprint


@pytest.fixture(scope="module")
def cnn() -> tuple[torch.nn.Sequential, torch.Tensor, torch.Tensor]:
    model, (_, _, Xte, yte) = train_digits_cnn(0)
    return model, Xte[:96], yte[:96]


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_layer_similarity_equals_compare(cnn) -> None:
    model, x, _ = cnn
    other, _ = train_digits_cnn(1)
    before = state_dict_fingerprint(model)
    names = ["relu3", "relu1", "conv2"]
    mine = LayerSimilarity(model, [model.relu3, model.relu1, model.conv2]).compare(
        x, LayerSimilarity(other, [other.relu1, other.relu3])
    )
    ref = rp.compare(model, other, [x], names, ["relu1", "relu3"], progress=False)
    assert mine.layers_a == names and mine.layers_b == ["relu1", "relu3"]
    for a in names:  # rp.compare lists layers in model order, LayerSimilarity in the order given
        for b in ["relu1", "relu3"]:
            assert abs(mine[a, b] - ref[a, b]) < 1e-10
    own = LayerSimilarity(model, [model.relu1, model.relu3]).compare(x)
    ref_own = rp.compare(model, None, [x], ["relu1", "relu3"], progress=False)
    assert torch.allclose(own.values, ref_own.values, atol=1e-10, rtol=0)
    with torch.no_grad():
        expected = cka_numpy(model[:2](x).flatten(1).double().numpy(), other[:7](x).double().numpy())
    assert abs(float(mine.values[1, 1]) - expected) < 1e-10
    assert _no_hooks(model) and _no_hooks(other) and state_dict_fingerprint(model) == before


def test_plain_function_additional_args_and_layer_input(cnn) -> None:
    model, x, _ = cnn
    scale = torch.tensor(2.0)
    by_function = LayerSimilarity(lambda inp, s: model(inp * s), [model.relu3]).compare(
        x, additional_forward_args=(scale,)
    )
    assert by_function.layers_a == ["ReLU_0"] and float(by_function.values[0, 0]) == pytest.approx(1.0, abs=1e-12)
    # the input of fc1 is the output of flatten
    as_input = LayerSimilarity(model, [model.fc1, model.relu3]).compare(x, attribute_to_layer_input=True)
    ref = rp.compare(model, None, [x], ["flatten", "fc1"], progress=False)
    assert torch.allclose(as_input.values, ref.values, atol=1e-10, rtol=0)
    with pytest.raises(rp.RepsimError, match="not submodules"):
        LayerSimilarity(model, [torch.nn.Linear(2, 2)])
    assert _no_hooks(model)


def _shift(model: torch.nn.Module) -> RepresentationShift:
    return RepresentationShift(model, model.relu3, target=0.3, epsilon=0.2, steps=12, lower_bound=0.0, upper_bound=1.0)


def test_attack_comparator_runs_representation_shift(cnn) -> None:
    model, x, y = cnn
    x, y = x[:48], y[:48]
    shift = _shift(model)
    comparator = AttackComparator(forward_func=shift.forward_with_rows, metric=shift.metric)
    comparator.add_attack(shift, "RepresentationShift")
    comparator.add_attack(
        FGSM(model, lower_bound=0.0, upper_bound=1.0),
        "FGSM",
        attack_kwargs={"epsilon": 0.2},
        additional_attack_arg_names=["target"],
    )
    comparator.evaluate(x, target=y, clean=x)
    summary = comparator.summary()
    original, moved, fgsm = (summary[k]["mean"] for k in ("Original", "RepresentationShift", "FGSM"))
    assert float(original.similarity) == pytest.approx(1.0, abs=1e-9) and float(original.agreement) == 1.0
    assert float(moved.agreement) == 1.0 and float(moved.accuracy) == float(original.accuracy)
    assert float(moved.similarity) < 0.75  # CKA moved far while every prediction stayed
    assert float(fgsm.agreement) < 0.9  # a classic attack at the same epsilon changes predictions
    perturbed = shift.perturb(x)
    assert float((perturbed - x).abs().max()) <= 0.2 + 1e-6 and _no_hooks(model)


def test_min_param_perturbation_finds_the_smallest_epsilon(cnn) -> None:
    model, x, _ = cnn
    x = x[:48]
    shift = RepresentationShift(model, model.relu3, target=0.3, steps=6, lower_bound=0.0, upper_bound=1.0)
    search = MinParamPerturbation(
        forward_func=shift.forward_with_rows,
        attack=shift,
        arg_name="epsilon",
        arg_min=0.02,
        arg_max=0.2,
        arg_step=0.02,
        correct_fn=shift.still_similar,
    )
    kwargs = {"clean": x, "threshold": 0.95}
    adversarial, epsilon = search.evaluate(x, correct_fn_kwargs=kwargs)
    assert epsilon is not None and 0.02 <= epsilon < 0.2
    out = shift.forward_with_rows(adversarial)
    assert not shift.still_similar(out, **kwargs)
    assert bool((out.output.argmax(1) == model(x).argmax(1)).all())
    if epsilon > 0.02 + 1e-9:  # one grid step less did not get there
        assert shift.still_similar(shift.forward_with_rows(shift.perturb(x, epsilon=epsilon - 0.02)), **kwargs)


def test_attribution_similarity(cnn) -> None:
    model, x, y = cnn
    x = x[:32]
    assert attribution_change(model, model, x, n_steps=8) == pytest.approx(1.0, abs=1e-12)
    other, _ = train_digits_cnn(1)
    changed = attribution_change(model, other, x, n_steps=8)
    assert 0.0 < changed < 0.99
    saliency = AttributionSimilarity(Saliency(model), Saliency(copy.deepcopy(model)))
    assert saliency.compare(x, target=y[:32]) == pytest.approx(1.0, abs=1e-12)
    rows_a, rows_b = AttributionSimilarity(IntegratedGradients(model), IntegratedGradients(other)).rows(
        x, target=y[:32], n_steps=8
    )
    assert (
        rows_a.shape == (32, 64)
        and abs(rp.similarity(rows_a, rows_b) - cka_numpy(rows_a.numpy(), rows_b.numpy())) < 1e-10
    )
    assert _no_hooks(model) and all(p.grad is None for p in model.parameters())


def test_representation_shift_refuses_bad_settings(cnn) -> None:
    model, x, _ = cnn
    with pytest.raises(rp.RepsimError, match="differentiable"):
        RepresentationShift(model, model.relu3, measure="rsa")
    with pytest.raises(rp.RepsimError):
        RepresentationShift(model, model.relu3, epsilon=-1.0)
    with pytest.raises(rp.RepsimError, match="one floating-point"):
        _shift(model).perturb((x, x))  # type: ignore[arg-type]
    with pytest.raises(rp.RepsimError, match="logits"):
        RepresentationShift(lambda inp: {"logits": model(inp)}, model.relu3).perturb(x[:8])
    assert _no_hooks(model)


def test_captum_example_runs_in_quick_mode(cnn, capsys, monkeypatch) -> None:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "captum_integration.py"
    monkeypatch.setattr("sys.argv", [str(script), "--quick"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(script), run_name="__main__")
    assert info.value.code == 0
    out = capsys.readouterr().out.splitlines()
    blocks = [line.split() for line in out if line.strip().startswith("encoder.layer.")]
    assert len(blocks) == 6 and all(float(row[1 + i]) == pytest.approx(1.0, abs=1e-9) for i, row in enumerate(blocks))
    assert float(next(line for line in out if "from rp.compare" in line).split()[-1]) < 1e-10
    rows = {line.split()[0]: line.split() for line in out if line.strip().startswith(("Original", "Represent", "FGSM"))}
    assert float(rows["RepresentationShift"][-2]) == 1.0 and float(rows["RepresentationShift"][-1]) < 0.75
    assert float(next(line for line in out if "with itself" in line).split()[-1]) == pytest.approx(1.0, abs=1e-6)
