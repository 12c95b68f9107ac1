"""compare / compare_checkpoints through the whole hook pipeline, on real trained networks (sklearn digits)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from digits_models import load_digits_split, train_digits_cnn
from torch import nn

import repsim_plugin as rp
from repsim_plugin.capture import Recorder
from repsim_plugin.compare import choose_estimator, load_checkpoint, parse_bytes
from repsim_plugin.compare.engine import Side, make_side
from repsim_plugin.errors import EstimatorChoiceWarning, MemoryBudgetError, RepsimError, StateError

LAYERS = ["conv1", "relu2", "fc1", "relu3", "fc2"]


@pytest.fixture(scope="module")
def cnns():
    a, _ = train_digits_cnn(seed=0)
    b, _ = train_digits_cnn(seed=1)
    return a, b


@pytest.fixture(scope="module")
def batches():
    _, _, Xte, yte = load_digits_split()
    X, y = Xte[:200], yte[:200]
    return [(X[i : i + 32], y[i : i + 32]) for i in range(0, 200, 32)]  # 7 batches, the last one of 8


def _activations(model: nn.Module, batches, layers=LAYERS) -> dict[str, torch.Tensor]:
    with rp.capture(model, layers) as rec:
        for x, _ in batches:
            model(x)
    return rec.activations


def _direct_map(model_a, model_b, batches, measure: str) -> torch.Tensor:
    A, B = _activations(model_a, batches), _activations(model_b, batches)
    m = rp.measures.make(measure)
    return torch.tensor([[float(m(A[i], B[j])) for j in LAYERS] for i in LAYERS], dtype=torch.float64)


@pytest.mark.parametrize(
    ("measure", "estimator"),
    [
        ("cka", "feature_streaming"),
        ("cka", "sample_space"),
        ("debiased_cka", "feature_streaming"),
        ("debiased_cka", "sample_space"),
        ("debiased_cka", "minibatch"),
        ("rbf_cka", "captured"),
        ("cka", "auto"),
    ],
)
def test_self_comparison_has_unit_diagonal(cnns, batches, measure, estimator):
    model, _ = cnns
    result = rp.compare(model, model, batches, LAYERS, measure=measure, estimator=estimator, progress=False)
    assert result.layers_a == result.layers_b == LAYERS
    assert torch.allclose(result.values.diagonal(), torch.ones(len(LAYERS), dtype=torch.float64), atol=1e-6)
    assert torch.allclose(result.values, result.values.T, atol=1e-12)
    assert result.n == 200 and result.fingerprints["a"] == result.fingerprints["b"]


@pytest.mark.parametrize(
    ("measure", "estimator"),
    [
        ("cka", "feature_streaming"),
        ("cka", "sample_space"),
        ("debiased_cka", "feature_streaming"),
        ("debiased_cka", "sample_space"),
        ("rbf_cka", "captured"),
        ("procrustes", "captured"),
    ],
)
def test_map_equals_the_measure_on_captured_activations(cnns, batches, measure, estimator):
    a, b = cnns
    result = rp.compare(a, b, batches, LAYERS, LAYERS, measure=measure, estimator=estimator, progress=False)
    expected = _direct_map(a, b, batches, measure)
    assert torch.allclose(result.values, expected, atol=1e-10, rtol=0)
    assert result.estimator == estimator and result.measure == rp.measures.make(measure).id
    assert result.fingerprints["a"] != result.fingerprints["b"]


def test_minibatch_estimator_sums_hsics_per_batch(cnns, batches):
    """Minibatch CKA (Nguyen et al. 2021) from a textbook loop: sum the unbiased HSICs, normalise at the end."""
    from reference import hsic_unbiased_numpy

    a, b = cnns
    result = rp.compare(a, b, batches[:-1], ["relu2"], ["relu3"], "debiased_cka", estimator="minibatch", progress=False)
    xy = xx = yy = 0.0
    for x, _ in batches[:-1]:
        A = _activations(a, [(x, None)], ["relu2"])["relu2"].double().numpy()
        B = _activations(b, [(x, None)], ["relu3"])["relu3"].double().numpy()
        K, L = A @ A.T, B @ B.T
        xy, xx, yy = xy + hsic_unbiased_numpy(K, L), xx + hsic_unbiased_numpy(K, K), yy + hsic_unbiased_numpy(L, L)
    assert float(result.values[0, 0]) == pytest.approx(xy / (xx * yy) ** 0.5, abs=1e-10)


def test_minibatch_skips_and_records_a_too_small_last_batch(cnns, batches):
    a, b = cnns
    short = [*batches[:-1], (batches[-1][0][:3], batches[-1][1][:3])]  # a last batch of 3 rows
    with pytest.warns(EstimatorChoiceWarning, match="skips a batch of 3 rows"):
        result = rp.compare(a, b, short, ["relu3"], ["relu3"], "debiased_cka", estimator="minibatch", progress=False)
    reference = rp.compare(
        a, b, batches[:-1], ["relu3"], ["relu3"], "debiased_cka", estimator="minibatch", progress=False
    )
    assert torch.equal(result.values, reference.values)
    assert result.extra["minibatch_skipped_rows"] == 3 and result.n == reference.n == 192


def test_one_forward_per_model_per_batch(cnns, batches):
    a, b = cnns
    calls = {"a": 0, "b": 0}
    handles = [
        a.register_forward_hook(lambda *_: calls.__setitem__("a", calls["a"] + 1)),
        b.register_forward_hook(lambda *_: calls.__setitem__("b", calls["b"] + 1)),
    ]
    try:
        rp.compare(a, b, batches, LAYERS, LAYERS, progress=False)
        assert calls == {"a": len(batches), "b": len(batches)}
        rp.compare(a, a, batches, LAYERS, progress=False)  # the same model on both sides runs once per batch
        assert calls["a"] == 2 * len(batches)
        rp.compare(a, None, batches, ["conv1", "relu2"], ["fc1", "fc2"], progress=False)  # two layer sets, one pass
        assert calls["a"] == 3 * len(batches)
    finally:
        for h in handles:
            h.remove()


def test_one_model_two_layer_sets_slices_the_full_map(cnns, batches):
    a, _ = cnns
    full = rp.compare(a, a, batches, LAYERS, progress=False)
    part = rp.compare(a, None, batches, ["conv1", "relu2"], ["fc1", "fc2"], progress=False)
    assert part.layers_a == ["conv1", "relu2"] and part.layers_b == ["fc1", "fc2"]
    assert torch.allclose(part.values, full.values[:2, [2, 4]], atol=1e-12)


def test_models_are_left_exactly_as_they_were(cnns, batches):
    a, b = cnns
    a.train()
    b.fc1.train(False)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    flags = [(m, m.training) for m in [*a.modules(), *b.modules()]]
    hooks = [(m, len(m._forward_hooks), len(m._forward_pre_hooks)) for m in [*a.modules(), *b.modules()]]
    rp.compare(a, b, batches, LAYERS, LAYERS, progress=False)
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())
    assert all(m.training == t for m, t in flags)
    assert all((len(m._forward_hooks), len(m._forward_pre_hooks)) == (f, p) for m, f, p in hooks)
    assert torch.is_grad_enabled()
    a.eval()
    b.eval()


@pytest.mark.parametrize("estimator", ["sample_space", "feature_streaming", "minibatch"])
def test_no_rows_outlive_the_call_in_reference_cycles(cnns, batches, estimator):
    """Everything compare holds is freed by reference counting when it returns, before the heap is trimmed: no
    cycle keeps a batch's rows (or a recorder) alive until the cyclic garbage collector happens to run."""
    a, b = cnns
    measure = "debiased_cka" if estimator == "minibatch" else "cka"
    flags = gc.get_debug()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        result = rp.compare(a, b, batches, LAYERS, LAYERS, measure, estimator=estimator, progress=False)
        del result
        gc.collect()
        held = [o for o in gc.garbage if isinstance(o, torch.Tensor | Recorder | Side)]
    finally:
        gc.set_debug(flags)
        gc.garbage.clear()
        gc.enable()
    assert held == []


def test_a_recorder_outliving_its_side_refuses_rows(cnns):
    side = make_side("A", cnns[0], LAYERS, {})
    recorder = side.recorder
    del side
    with pytest.raises(StateError, match="has ended"):
        recorder.on_batch({})


def test_samples_are_checked_not_assumed(cnns, batches):
    a, b = cnns
    same_order = [(x.clone(), y.clone()) for x, y in batches]
    reference = rp.compare(a, b, batches, LAYERS, LAYERS, progress=False)
    with_own_stream = rp.compare(a, b, batches, LAYERS, LAYERS, data_b=same_order, progress=False)
    assert torch.equal(reference.values, with_own_stream.values)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    shuffled = [(x[perm], y[perm]) if i == 0 else (x, y) for i, (x, y) in enumerate(batches)]
    with pytest.raises(RepsimError, match="different labels"):
        rp.compare(a, b, batches, LAYERS, LAYERS, data_b=shuffled, progress=False)
    with pytest.raises(RepsimError, match="different numbers of rows"):
        rp.compare(a, b, batches, LAYERS, LAYERS, data_b=[(x[:-1], y[:-1]) for x, y in batches], progress=False)
    with pytest.raises(RepsimError, match="data_b ended after"):  # streams of different lengths
        rp.compare(a, b, batches, LAYERS, LAYERS, data_b=batches[:-1], progress=False)
    with pytest.raises(RepsimError, match="must yield labels"):
        rp.compare(a, b, [x for x, _ in batches], LAYERS, LAYERS, data_b=[x for x, _ in batches], progress=False)


def test_one_model_on_two_data_streams(cnns, batches):
    """The same model on clean and on noisy inputs: two sides share one model, each hooked only in its forward."""
    a, _ = cnns
    g = torch.Generator().manual_seed(0)
    noisy = [(x + 0.2 * torch.randn(x.shape, generator=g), y) for x, y in batches]
    result = rp.compare(a, a, batches, ["relu3"], ["relu3"], data_b=noisy, progress=False)
    clean_rows = _activations(a, batches, ["relu3"])["relu3"]
    noisy_rows = _activations(a, noisy, ["relu3"])["relu3"]
    assert float(result.values[0, 0]) == pytest.approx(rp.similarity(clean_rows, noisy_rows), abs=1e-10)
    assert 0.5 < float(result.values[0, 0]) < 0.999
    assert result.extra["data_fingerprint"] != result.extra["data_fingerprint_b"]


def test_result_provenance_and_round_trip(cnns, batches, tmp_path):
    a, b = cnns
    result = rp.compare(a, b, batches, LAYERS, LAYERS, measure="debiased_cka", seed=3, progress=False)
    assert result.reduction["tokens"] == "mean" and result.reduction["spatial"] == "flatten"
    assert result.reduction["layout"]["conv1"] == "NCHW"
    assert result.dtype == "float32" and result.seed == 3
    assert result.extra["estimator_reason"] and len(result.extra["data_fingerprint"]) == 64
    unhashed = rp.compare(a, b, batches, LAYERS, LAYERS, "debiased_cka", fingerprint_data=False, progress=False)
    assert unhashed.extra["data_fingerprint"] is None and torch.equal(unhashed.values, result.values)
    assert result.fingerprints["a"] == rp.adapters.for_model(a).fingerprint()
    loaded = rp.SimilarityMap.load(result.save(tmp_path / "map.json"))
    assert loaded == result and torch.equal(loaded.values, result.values)
    png = result.plot(tmp_path / "map.png")
    assert (tmp_path / "map.png").stat().st_size > 1000 and png is not None


class _WritesIntoItsInputs(nn.Module):
    """A real model that scales its input tensor in place before its layers (some preprocessing modules do)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.mul_(2.0))


def test_fingerprints_are_those_of_the_inputs_and_weights_as_given(cnns, batches):
    """The fingerprints are the sha256 of the weights and of each batch's inputs as the caller passed them, even
    when a model writes into its inputs in place (each batch is hashed before its forward passes)."""
    import copy
    import hashlib

    a, b = cnns
    writer = _WritesIntoItsInputs(copy.deepcopy(b)).eval()
    inputs = [x.clone() for x, _ in batches]
    expected = hashlib.sha256()  # an independent sha256 of the batches, in order: dtype and shape, then the bytes
    for x in inputs:
        expected.update(f"{x.dtype}{tuple(x.shape)}".encode())
        expected.update(x.numpy().tobytes())
    weights = [rp.results.state_dict_fingerprint(m) for m in (a, writer)]
    result = rp.compare(a, writer, inputs, ["relu3"], ["net.relu3"], progress=False)
    assert result.extra["data_fingerprint"] == expected.hexdigest()
    assert [result.fingerprints["a"], result.fingerprints["b"]] == weights
    assert torch.equal(inputs[0], 2.0 * batches[0][0])  # the model did write into the batches it was given


def test_auto_estimator_choices_and_budget(cnns, batches):
    a, b = cnns
    cka = rp.measures.make("cka")
    # wide layers, few samples: the n x n form
    plan = choose_estimator(cka, [([20000, 30000], [20000])], n_estimate=200, batch_size=32, itemsize=4)
    assert plan.estimator == "sample_space"
    # narrow layers, many samples: feature-space statistics
    plan = choose_estimator(cka, [([64, 128], [64])], n_estimate=10**6, batch_size=32, itemsize=4)
    assert plan.estimator == "feature_streaming"
    # neither exact form fits: minibatch, announced
    with pytest.warns(EstimatorChoiceWarning, match="minibatch"):
        result = rp.compare(a, b, batches, ["relu2"], ["relu3"], memory_budget=20_000, progress=False)
    assert result.estimator == "minibatch" and "budget" in result.extra["estimator_reason"]
    with pytest.raises(MemoryBudgetError, match="memory budget"):
        rp.compare(a, b, batches, LAYERS, LAYERS, estimator="feature_streaming", memory_budget="1MB", progress=False)
    with pytest.raises(MemoryBudgetError, match="kept activations"):
        rp.compare(a, b, batches, LAYERS, LAYERS, measure="procrustes", memory_budget="100kB", progress=False)
    with pytest.raises(RepsimError, match=r"not available for .*it declares \[.minibatch.\]"):
        rp.compare(a, b, batches, LAYERS, LAYERS, measure="rbf_cka", estimator="sample_space", progress=False)
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes(1000) == 1000
    with pytest.raises(RepsimError, match="memory_budget"):
        parse_bytes("lots")


def test_plan_counts_each_shared_side_once():
    """Four checkpoints in every pair: the kept rows and Grams are per side, so the plan counts 4 sides, not 12."""
    cka = rp.measures.make("cka")
    n, widths = 1024, [16384, 8192]
    per_pair, side_maps = [(widths, widths)] * 6, [(widths, widths)] * 2
    rows, grams, deviations = n * sum(widths) * 4, 8 * len(widths) * n**2, 4 * n * max(widths)
    # each side once; per two sides, a deviation buffer (x2) for each of the two workers that form the Grams
    shared_need = 4 * (rows + grams) + 2 * 2 * 2 * deviations
    options = {"n_estimate": n, "batch_size": 128, "itemsize": 4, "memory_budget": parse_bytes("1.5GiB")}
    plan = choose_estimator(cka, per_pair, side_maps=side_maps, **options)
    assert plan.estimator == "sample_space" and plan.memory == shared_need < options["memory_budget"]
    with pytest.warns(EstimatorChoiceWarning, match="minibatch"):  # counted per pair: 2.06 GiB, over the budget
        assert choose_estimator(cka, per_pair, **options).estimator == "minibatch"


def test_compare_checkpoints_exact_within_a_budget_counted_per_side(cnns, batches, tmp_path):
    """A budget that the rows counted once per pair exceed but the rows of each checkpoint once fit."""
    from digits_models import build_digits_cnn

    from repsim_plugin.streaming.sample_space import SampleSpaceCKAMap

    a, b = cnns
    c, _ = train_digits_cnn(seed=2)
    models = {"a.pt": a, "b.pt": b, "c.pt": c}
    for name, model in models.items():
        torch.save(model.state_dict(), tmp_path / name)
    widths = [int(t.shape[1]) for t in _activations(a, batches[:1], LAYERS).values()]
    n = sum(len(x) for x, _ in batches)
    per_side = SampleSpaceCKAMap.memory_bytes(n, widths)  # one side: rows, Grams, deviation buffer
    per_pair = SampleSpaceCKAMap.memory_bytes(n, widths, widths)
    budget = 2 * per_side + per_pair  # 3 pairs would need 3 * per_pair; 3 sides as 2 maps (a+b, c) fit
    assert 3 * per_pair > budget
    paths = [tmp_path / name for name in models]
    kw = {"layers": LAYERS, "estimator": "sample_space", "progress": False}
    maps = rp.compare_checkpoints(build_digits_cnn, paths, batches, memory_budget=budget, **kw)
    alone = rp.compare(b, c, batches, LAYERS, LAYERS, estimator="sample_space", progress=False)
    assert torch.equal(maps[("b.pt", "c.pt")].values, alone.values)
    with pytest.raises(MemoryBudgetError, match="sample_space"):  # two sides counted once each still need more
        rp.compare_checkpoints(build_digits_cnn, paths, batches, memory_budget=2 * per_side, **kw)


def test_max_batches_progress_and_empty_data(cnns, batches, capsys):
    a, b = cnns
    result = rp.compare(a, b, batches, ["fc1"], ["fc1"], max_batches=2, progress=True)
    assert result.n == 64
    with pytest.raises(RepsimError, match="no batches"):
        rp.compare(a, b, [], ["fc1"], ["fc1"], progress=False)
    with pytest.raises(RepsimError, match="max_batches"):
        rp.compare(a, b, batches, ["fc1"], ["fc1"], max_batches=0, progress=False)


def test_huggingface_models_with_dict_batches():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64
    )
    a, b = BertModel(config).eval(), BertModel(config).eval()
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(4):
        ids = torch.randint(1, 100, (8, 12), generator=g)
        mask = torch.ones(8, 12, dtype=torch.long)
        mask[:4, 8:] = 0  # padded sentences
        data.append({"input_ids": ids, "attention_mask": mask})
    self_map = rp.compare(a, a, data, progress=False)
    assert self_map.layers_a == [f"encoder.layer.{i}" for i in range(3)]
    assert torch.allclose(self_map.values.diagonal(), torch.ones(3, dtype=torch.float64), atol=1e-6)
    cross = rp.compare(a, b, data, measure="debiased_cka", progress=False)
    with rp.capture(a) as rec_a, rp.capture(b) as rec_b:
        for batch in data:
            a(**batch)
            b(**batch)
    expected = rp.similarity(rec_a.activations["encoder.layer.2"], rec_b.activations["encoder.layer.1"], "debiased_cka")
    assert float(cross["encoder.layer.2", "encoder.layer.1"]) == pytest.approx(expected, abs=1e-10)


# --- checkpoints --------------------------------------------------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_compare_checkpoints_all_pairs_and_reference(cnns, batches, tmp_path):
    from digits_models import build_digits_cnn
    from safetensors.torch import save_file

    a, b = cnns
    c, _ = train_digits_cnn(seed=2)
    save_file(a.state_dict(), tmp_path / "a.safetensors")
    torch.save(b.state_dict(), tmp_path / "b.pt")
    torch.save({"state_dict": c.state_dict(), "epoch": 3}, tmp_path / "c.pt")  # a training checkpoint
    paths = [tmp_path / "a.safetensors", tmp_path / "b.pt", tmp_path / "c.pt"]
    maps = rp.compare_checkpoints(build_digits_cnn, paths, batches, layers=LAYERS, progress=False)
    assert set(maps) == {("a.safetensors", "b.pt"), ("a.safetensors", "c.pt"), ("b.pt", "c.pt")}
    direct = rp.compare(b, c, batches, LAYERS, LAYERS, progress=False)
    assert torch.allclose(maps[("b.pt", "c.pt")].values, direct.values, atol=1e-12)
    assert maps[("b.pt", "c.pt")].fingerprints == direct.fingerprints
    assert maps[("a.safetensors", "b.pt")].extra["checkpoint_a"].endswith("a.safetensors")
    ref = rp.compare_checkpoints(build_digits_cnn, paths, batches, reference="b.pt", layers=LAYERS, progress=False)
    assert set(ref) == {("b.pt", "a.safetensors"), ("b.pt", "c.pt")}
    assert torch.allclose(ref[("b.pt", "c.pt")].values, direct.values, atol=1e-12)


def test_compare_checkpoints_hashes_each_checkpoint_once(cnns, batches, tmp_path, monkeypatch):
    """Four checkpoints, six pairs: the weights are hashed four times (not twelve), each map names its own."""
    from digits_models import build_digits_cnn

    import repsim_plugin.results as results

    a, b = cnns
    c, _ = train_digits_cnn(seed=2)
    models = {"a.pt": a, "b.pt": b, "c.pt": c, "a_again.pt": a}
    for name, model in models.items():
        torch.save(model.state_dict(), tmp_path / name)
    expected = {name: results.state_dict_fingerprint(model) for name, model in models.items()}
    hashed = []
    real = results.state_dict_fingerprint

    def counting(model_or_state_dict):
        hashed.append(model_or_state_dict)
        return real(model_or_state_dict)

    monkeypatch.setattr(results, "state_dict_fingerprint", counting)
    paths = [tmp_path / name for name in models]
    maps = rp.compare_checkpoints(build_digits_cnn, paths, batches[:2], layers=["fc1"], progress=False)
    assert len(maps) == 6 and len(hashed) == 4
    for (name_a, name_b), m in maps.items():
        assert m.fingerprints == {"a": expected[name_a], "b": expected[name_b]}
    assert expected["a.pt"] == expected["a_again.pt"] != expected["b.pt"]
    hashed.clear()
    same = rp.compare(a, a, batches[:2], ["fc1"], ["fc1"], progress=False)  # one model on both sides: one hash
    assert len(hashed) == 1 and same.fingerprints == {"a": expected["a.pt"], "b": expected["a.pt"]}


def _four_checkpoints(cnns, folder) -> dict[str, nn.Module]:
    """Four trained digits CNNs, each saved in ``folder`` under its name ("a.pt" ... "d.pt")."""
    a, b = cnns
    models = {"a.pt": a, "b.pt": b, "c.pt": train_digits_cnn(seed=2)[0], "d.pt": train_digits_cnn(seed=3)[0]}
    for name, model in models.items():
        torch.save(model.state_dict(), folder / name)
    return models


@pytest.mark.parametrize("reference", [None, "b.pt"])
def test_compare_checkpoints_forms_each_sides_grams_once(cnns, batches, tmp_path, monkeypatch, reference):
    """Sample-space maps of four checkpoints: each checkpoint's Grams are formed once (not once per pair that
    names it), none is held after the last pair, and every map has the bits of that pair compared alone."""
    from digits_models import build_digits_cnn

    from repsim_plugin.streaming.sample_space import SampleSpaceCKAMap

    models = _four_checkpoints(cnns, tmp_path)
    formed, alive_before = [], []
    real = SampleSpaceCKAMap._form_grams

    def counting(self, stores):
        gc.collect()
        alive = sum(ref() is not None for ref in formed)
        stacks = real(self, stores)
        alive_before.extend([alive] * len(stacks))
        formed.extend(weakref.ref(K) for K in stacks)
        return stacks

    monkeypatch.setattr(SampleSpaceCKAMap, "_form_grams", counting)
    layers = ["relu2", "fc1", "fc2"]
    options = {"layers": layers, "estimator": "sample_space", "progress": False, "reference": reference}
    maps = rp.compare_checkpoints(build_digits_cnn, [tmp_path / n for n in models], batches, **options)
    assert len(maps) == (6 if reference is None else 3)
    assert len(formed) == 4  # one (L, n, n) stack per checkpoint: 12 / 6 before they were shared
    # held until the last pair that names the side: against a reference, only the reference's outlives its pair
    # (the first pair forms both its sides in one call, with none alive before)
    assert alive_before == ([0, 0, 2, 3] if reference is None else [0, 0, 1, 1])
    gc.collect()
    assert all(ref() is None for ref in formed)  # nothing held after the call
    formed.clear()
    for (name_a, name_b), m in maps.items():
        alone = rp.compare(models[name_a], models[name_b], batches, layers, layers, estimator="sample_space",
                           progress=False)  # fmt: skip
        assert torch.equal(m.values, alone.values), (name_a, name_b)
    assert len(formed) == 2 * len(maps)  # a single pair shares nothing


@pytest.mark.parametrize("reference", [None, "b.pt"])
def test_compare_checkpoints_minibatch_forms_each_sides_batch_grams_once(
    cnns, batches, tmp_path, monkeypatch, reference
):
    """Minibatch maps of four checkpoints: each checkpoint's batch Grams are formed once a batch (not once per pair
    that names it), and every map has the bits of that pair compared alone."""
    from digits_models import build_digits_cnn

    from repsim_plugin.streaming.minibatch import MinibatchCKAMap

    models = _four_checkpoints(cnns, tmp_path)
    formed = []
    real = MinibatchCKAMap._grams

    def counting(self, tensors, device):
        formed.append(len(tensors))
        return real(self, tensors, device)

    monkeypatch.setattr(MinibatchCKAMap, "_grams", counting)
    layers, data = ["relu2", "fc1", "fc2"], batches[:6]  # six batches of 32 rows
    options = {"layers": layers, "measure": "debiased_cka", "estimator": "minibatch", "progress": False}
    options["reference"] = reference
    maps = rp.compare_checkpoints(build_digits_cnn, [tmp_path / n for n in models], data, **options)
    assert len(maps) == (6 if reference is None else 3)
    assert formed == [3] * 4 * len(data)  # one (L, b, b) stack per checkpoint a batch: 12 / 6 before
    formed.clear()
    for (name_a, name_b), m in maps.items():
        alone = rp.compare(models[name_a], models[name_b], data, layers, layers, measure="debiased_cka",
                           estimator="minibatch", progress=False)  # fmt: skip
        assert torch.equal(m.values, alone.values), (name_a, name_b)
    assert formed == [3] * 2 * len(data) * len(maps)  # a single pair shares nothing


def test_checkpoints_never_run_pickle_code(tmp_path, capsys):
    from digits_models import build_digits_cnn

    evil = tmp_path / "evil.pt"
    torch.save({"fc1.weight": _Payload()}, evil)  # a torch file whose unpickling would run code
    with pytest.raises(RepsimError, match="weights_only"):
        load_checkpoint(evil)
    assert "pickle code ran" not in capsys.readouterr().out
    torch.save({"weights": [1, 2]}, tmp_path / "notes.pt")
    with pytest.raises(RepsimError, match="does not hold a state dict"):
        load_checkpoint(tmp_path / "notes.pt")
    with pytest.raises(RepsimError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "other.pt")
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "other2.pt")
    with pytest.raises(RepsimError, match="does not fit"):
        rp.compare_checkpoints(build_digits_cnn, [tmp_path / "other.pt", tmp_path / "other2.pt"], [], progress=False)
    with pytest.raises(RepsimError, match="given twice"):
        rp.compare_checkpoints(build_digits_cnn, [tmp_path / "other.pt", tmp_path / "other.pt"], [], progress=False)
