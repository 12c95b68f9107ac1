"""The registry: canonical ids, aliases, make / list / register, parameter round trips."""

from __future__ import annotations

import pytest
import torch

import repsim_plugin as rp
from repsim_plugin.errors import RepsimError, UnknownNameError
from repsim_plugin.measures import Spec


def test_canonical_ids_follow_the_similarity_repository_grammar():
    assert rp.measures.make("cka").id == "cka-kernel=linear-hsic=gretton-score"
    assert rp.measures.make("debiased_cka").id == "cka-kernel=linear-hsic=song-score"
    assert rp.measures.make("rbf_cka").id == "cka-kernel=(rbf-sigma=0.5)-hsic=gretton-score"
    assert rp.measures.make("cka", kernel="rbf", sigma=0.5).id == "cka-kernel=(rbf-sigma=0.5)-hsic=gretton-score"
    assert (
        rp.measures.make("cka", kernel="rbf", sigma=1, debiased=True).id == "cka-kernel=(rbf-sigma=1.0)-hsic=song-score"
    )
    assert rp.measures.make("debiased_cka", debiased=False).id == "cka-kernel=linear-hsic=gretton-score"


def test_non_default_bandwidth_rule_is_part_of_the_id():
    m = rp.measures.make("rbf_cka", bandwidth="median_dist_offdiag")
    assert m.id == "cka-kernel=(rbf-sigma=0.5-bandwidth=median_dist_offdiag)-hsic=gretton-score"
    fixed = rp.measures.make("rbf_cka", bandwidth="fixed", sigma=2.0)
    assert "isotropic_scaling" not in fixed.invariances  # a fixed bandwidth is not scale invariant
    X = torch.randn(30, 4)
    assert rp.similarity(X, 10 * X, fixed) < 0.99


@pytest.mark.parametrize("mid", rp.measures.list())
def test_make_of_id_round_trips(mid):
    m = rp.measures.make(mid)
    assert m.id == mid
    assert rp.measures.make(m.id).id == mid
    assert Spec.parse(mid).render() == mid


def test_every_alias_resolves_to_a_listed_id():
    listed = set(rp.measures.list())
    for alias, target in rp.measures.aliases().items():
        assert target in listed
        assert rp.measures.make(alias).id == target
        assert alias in rp.measures.make(target).aliases


def test_list_with_globs():
    assert "cka-kernel=linear-hsic=gretton-score" in rp.measures.list("cka*")
    assert rp.measures.list("cka-kernel=(rbf*") == sorted(i for i in rp.measures.list() if "(rbf" in i)
    assert rp.measures.list("debiased_cka") == ["cka-kernel=linear-hsic=song-score"]  # aliases match too
    assert rp.measures.list("no-such-*") == []


def test_spec_parse_nested_and_errors():
    spec = Spec.parse("cka-kernel=(rbf-sigma=0.5)-hsic=gretton-score")
    assert spec.name == "cka" and spec.suffix == "score"
    assert spec.get("kernel") == Spec("rbf", (("sigma", "0.5"),))
    for bad in ("cka-kernel=(rbf-sigma=0.5-hsic=x", "cka-kernel=linear-score-hsic=x", "=x"):
        with pytest.raises(RepsimError):
            Spec.parse(bad)
    with pytest.raises(RepsimError, match="cannot appear in an id"):
        Spec("cka", (("kernel", "a-b"),)).render()


def test_wrong_suffix_is_rejected():
    with pytest.raises(UnknownNameError, match="end in 'score'"):
        rp.measures.make("cka-kernel=linear-hsic=gretton-distance")


def test_metadata_of_cka_family():
    m = rp.measures.make("cka")
    md = m.metadata()
    assert md["larger_is_more_similar"] and md["symmetric"] and not md["is_metric"]
    assert set(md["invariances"]) == {"orthogonal", "isotropic_scaling", "translation", "permutation"}
    assert md["streamable"] and md["differentiable"] and md["min_samples"] == 2
    assert "Kornblith" in md["reference"]
    assert not rp.measures.make("rbf_cka").streamable
    assert rp.measures.make("debiased_cka").value_range == (-1.0, 1.0)


def test_register_decorator_call_and_params():
    name = "test_negdist"
    try:

        @rp.measures.register(name, larger_is_more_similar=False, symmetric=True, invariances=["translation"])
        def mean_distance(X: torch.Tensor, Y: torch.Tensor, power: float = 1.0) -> torch.Tensor:
            """Distance between centered first columns."""
            a, b = X[:, 0] - X[:, 0].mean(), Y[:, 0] - Y[:, 0].mean()
            return (a - b).abs().pow(power).mean()

        assert isinstance(mean_distance, rp.measures.Measure)
        assert rp.measures.make(name) is mean_distance
        X = torch.randn(10, 2, dtype=torch.float64)
        assert float(mean_distance(X, X + 3)) == pytest.approx(0.0, abs=1e-12)
        squared = rp.measures.make(name, power=2.0)
        assert squared.id == f"{name}-power=2.0"
        Y = torch.randn(10, 2, dtype=torch.float64)
        expected = ((X[:, 0] - X[:, 0].mean()) - (Y[:, 0] - Y[:, 0].mean())).pow(2).mean()
        assert float(squared(X, Y)) == pytest.approx(float(expected))
        assert mean_distance.description == "Distance between centered first columns."
        with pytest.raises(RepsimError, match="already registered"):
            rp.measures.register(name, lambda X, Y: X.sum(), larger_is_more_similar=True, symmetric=False)
    finally:
        rp.measures.unregister(name)
    with pytest.raises(UnknownNameError):
        rp.measures.make(name)


def test_register_validates_metadata():
    with pytest.raises(RepsimError, match="unknown invariances"):
        rp.measures.register(
            "test-bad", lambda X, Y: X.sum(), larger_is_more_similar=True, symmetric=True, invariances=["rotation"]
        )
    with pytest.raises(RepsimError, match="metric is a distance"):
        rp.measures.register(
            "test-bad2", lambda X, Y: X.sum(), larger_is_more_similar=True, symmetric=True, is_metric=True
        )
    assert not rp.measures.list("test-bad*")


def test_similarity_returns_float():
    X = torch.randn(30, 3)
    value = rp.similarity(X, X @ torch.randn(3, 3), "debiased_cka")
    assert isinstance(value, float)
    assert rp.similarity(X, X, rp.measures.make("cka")) == pytest.approx(1.0)
