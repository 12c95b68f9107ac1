"""similarity-repository's spellings of our measures resolve in make(); assert_similar on real small models."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import cka_numpy

import repsim_plugin as rp
from repsim_plugin.measures.ids import SHARED_IDS, SIMILARITY_REPOSITORY_NAMES, from_similarity_repository
from repsim_plugin.testing import assert_similar, check_measure


def _pair(seed: int = 0, p: int = 5, q: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(80, p, generator=g, dtype=torch.float64)
    Y = X[:, :1].repeat(1, q) + torch.randn(80, q, generator=g, dtype=torch.float64)
    return X, Y


@pytest.mark.parametrize(("theirs", "ours"), sorted(SIMILARITY_REPOSITORY_NAMES.items()))
def test_their_name_builds_our_measure(theirs: str, ours: str) -> None:
    X, Y = _pair()
    assert rp.measures.make(theirs).id == ours
    assert float(rp.measures.make(theirs)(X, Y)) == float(rp.measures.make(ours)(X, Y))


def test_parametric_svcca_names() -> None:
    assert from_similarity_repository("svcca-var=0.95-score") == "svcca-keep=0.95-score"
    assert rp.measures.make("svcca-dim=3-score").id == "svcca-dims=3-score"
    assert from_similarity_repository("cka-kernel=linear-hsic=gretton-score") is None


def test_their_pwcca_weights_by_the_side_with_fewer_neurons() -> None:
    """google/svcca's compute_pwcca weights by the smaller side (X on a tie): xy when p <= q, else yx."""
    theirs = rp.measures.make("pwcca-score")
    X, Y = _pair(p=4, q=9)
    assert float(theirs(X, Y)) == float(rp.measures.make("pwcca-direction=xy-score")(X, Y))
    assert float(theirs(Y, X)) == float(rp.measures.make("pwcca-direction=yx-score")(Y, X))
    assert float(rp.measures.make("pwcca-direction=xy-score")(Y, X)) != pytest.approx(float(theirs(Y, X)))
    assert check_measure(theirs, raise_on_failure=False).ok


def test_shared_ids_are_ours_and_fourteen_are_ours_alone() -> None:
    ids = set(rp.measures.list())
    assert ids >= SHARED_IDS
    assert len(ids - SHARED_IDS) == 14
    assert set(SIMILARITY_REPOSITORY_NAMES.values()) - {"pwcca-direction=fewer-score"} <= ids - SHARED_IDS


# --- assert_similar ---------------------------------------------------------------------------------------------------


def _mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.Tanh())


def test_assert_similar_passes_for_a_copy_and_matches_the_reference() -> None:
    model = _mlp(0)
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    values = assert_similar(model, copy.deepcopy(model), x, ["0", "2"])
    assert values == pytest.approx({"0": 1.0, "2": 1.0}, abs=1e-12)
    other = _mlp(1)
    with pytest.raises(AssertionError) as info:
        assert_similar(model, other, [x[:32], x[32:]], ["0", "2"], min_similarity=0.999)
    first = str(info.value).splitlines()[0]
    assert "0 (" in first and "2 (" in first
    with torch.no_grad():
        expected = cka_numpy(model[0](x).double().numpy(), other[0](x).double().numpy())
    assert f"{expected:.4f}" in first


def test_assert_similar_names_only_the_changed_layer() -> None:
    model = _mlp(0)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[2].weight.copy_(torch.randn_like(changed[2].weight))
    with pytest.raises(AssertionError) as info:
        assert_similar(model, changed, torch.randn(64, 6), ["0", "2"])
    first = str(info.value).splitlines()[0]
    assert first.startswith("1 of 2 layers") and "2 (" in first and "0 (" not in first
    assert "DRIFTED" in str(info.value)


def test_assert_similar_refuses_a_distance() -> None:
    model = _mlp(0)
    with pytest.raises(rp.RepsimError, match="distance"):
        assert_similar(model, model, torch.randn(8, 6), ["0"], measure="procrustes_distance")


def test_assert_similar_on_huggingface_and_timm_models() -> None:
    import timm
    import transformers

    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()
    ids = torch.randint(1, 50, (24, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:8, 5:] = 0  # padded sentences: tokens="mean" averages real tokens only
    batch = {"input_ids": ids, "attention_mask": mask}
    values = assert_similar(bert, copy.deepcopy(bert), batch, ["encoder.layer.*"])
    assert list(values) == ["encoder.layer.0", "encoder.layer.1"]
    changed = copy.deepcopy(bert)
    with torch.no_grad():
        changed.encoder.layer[1].output.dense.weight.normal_()
    with pytest.raises(AssertionError, match=r"^1 of 2 layers .*: encoder\.layer\.1 \("):
        assert_similar(bert, changed, batch, ["encoder.layer.*"])

    net = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert set(assert_similar(net, copy.deepcopy(net), images, ["layer1", "layer4"], spatial="mean")) == {
        "layer1",
        "layer4",
    }
