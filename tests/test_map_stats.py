"""Statistics on maps: p-values, BH q-values and bootstrap intervals against plain float64 loops, and calibration.

The loops below are what one would write by hand: for each permutation (or resample) drawn from the same seeded
generator, every cell's CKA recomputed from the activations in float64 with numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import cka_numpy, debiased_cka_numpy
from scipy import stats as scipy_stats
from torch import nn

import repsim_plugin as rp
from repsim_plugin.errors import RepsimError
from repsim_plugin.map_stats import benjamini_hochberg, map_bootstrap, map_permutation_test

N, PERMUTATIONS, BOOT, SEED = 48, 60, 25, 7
LAYERS = ["0", "1", "2", "3"]


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 16), nn.ReLU()).eval()


@pytest.fixture(scope="module")
def setting():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 10, generator=g)
    batches = [x[i : i + 16] for i in range(0, N, 16)]
    a, b = _mlp(0), _mlp(1)
    acts = []
    for model in (a, b):
        with rp.capture(model, LAYERS) as rec:
            for batch in batches:
                model(batch)
        acts.append({k: v.double().numpy() for k, v in rec.activations.items()})
    return a, b, batches, acts


def _cka(X: np.ndarray, Y: np.ndarray, debiased: bool) -> float:
    if not debiased:
        return cka_numpy(X, Y)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    return debiased_cka_numpy(Xc @ Xc.T, Yc @ Yc.T)


def _loop_null(acts, debiased: bool) -> np.ndarray:
    A, B = acts
    generator = torch.Generator().manual_seed(SEED)
    null = np.empty((PERMUTATIONS, len(LAYERS), len(LAYERS)))
    for t in range(PERMUTATIONS):
        perm = torch.randperm(N, generator=generator).numpy()
        for i, la in enumerate(LAYERS):
            for j, lb in enumerate(LAYERS):
                null[t, i, j] = _cka(A[la], B[lb][perm], debiased)
    return null


def _grams(side) -> torch.Tensor:
    return torch.stack([torch.from_numpy((X - X.mean(0)) @ (X - X.mean(0)).T) for X in side.values()])


@pytest.mark.parametrize("debiased", [False, True])
def test_p_q_and_intervals_equal_plain_float64_loops(setting, debiased):
    a, b, batches, acts = setting
    measure = "debiased_cka" if debiased else "cka"
    result = rp.compare(
        a, b, batches, LAYERS, LAYERS, measure, permutations=PERMUTATIONS, bootstrap=BOOT, seed=SEED, progress=False
    )
    assert result.estimator == "sample_space" and result.seed == SEED
    observed = np.array([[_cka(acts[0][i], acts[1][j], debiased) for j in LAYERS] for i in LAYERS])
    np.testing.assert_allclose(result.values.numpy(), observed, atol=1e-12, rtol=0)
    null = _loop_null(acts, debiased)
    expected_p = (1 + (null >= observed - 1e-10 * np.maximum(1, np.abs(observed))).sum(0)) / (1 + PERMUTATIONS)
    np.testing.assert_allclose(result.p_values.numpy(), expected_p, atol=1e-12, rtol=0)
    _, ours = map_permutation_test(
        _grams(acts[0]), _grams(acts[1]), permutations=PERMUTATIONS, seed=SEED, debiased=debiased, return_null=True
    )
    np.testing.assert_allclose(ours.numpy(), null, atol=1e-12, rtol=0)
    q = scipy_stats.false_discovery_control(expected_p.reshape(-1)).reshape(expected_p.shape)
    np.testing.assert_allclose(result.q_values.numpy(), q, atol=1e-12, rtol=0)
    # bootstrap: the same resamples for every cell, the centred percentile interval of rp.stats.bootstrap_ci
    generator = torch.Generator().manual_seed(SEED)
    samples = np.empty((BOOT, len(LAYERS), len(LAYERS)))
    for r in range(BOOT):
        index = torch.randint(0, N, (N,), generator=generator).numpy()
        for i, la in enumerate(LAYERS):
            for j, lb in enumerate(LAYERS):
                samples[r, i, j] = _cka(acts[0][la][index], acts[1][lb][index], debiased)
    single = rp.stats.bootstrap_ci(measure, acts[0]["0"], acts[1]["2"], n_boot=BOOT, seed=SEED)
    assert single.low == pytest.approx(float(result.intervals[0][0, 2]), abs=1e-12)
    assert single.high == pytest.approx(float(result.intervals[1][0, 2]), abs=1e-12)
    t = torch.from_numpy(samples)
    offsets = torch.quantile(t - t.median(dim=0).values, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)
    np.testing.assert_allclose(result.intervals[0].numpy(), observed + offsets[0].numpy(), atol=1e-12, rtol=0)
    np.testing.assert_allclose(result.intervals[1].numpy(), observed + offsets[1].numpy(), atol=1e-12, rtol=0)
    assert result.interval_level == 0.95
    again = rp.SimilarityMap.from_dict(result.to_dict())
    assert torch.equal(again.q_values, result.q_values) and torch.equal(again.p_values, result.p_values)


@pytest.mark.parametrize("debiased", [False, True])
def test_p_values_are_uniform_on_unrelated_layers(debiased):
    """Independent layers: per-cell p-values are uniform (Kolmogorov-Smirnov), and related ones are tiny."""
    g = torch.Generator().manual_seed(11)
    p_values = []
    for rep in range(24):
        KA = _grams({str(k): torch.randn(30, 5, generator=g).double().numpy() for k in range(4)})
        KB = _grams({str(k): torch.randn(30, 4, generator=g).double().numpy() for k in range(4)})
        p, _ = map_permutation_test(KA, KB, permutations=199, seed=rep, debiased=debiased)
        p_values.append(p.reshape(-1))
    flat = torch.cat(p_values).numpy()
    assert scipy_stats.kstest(flat, "uniform").pvalue > 0.01
    X = torch.randn(30, 5, generator=g).double().numpy()
    K = _grams({"x": X})
    p, _ = map_permutation_test(K, K, permutations=99, seed=0, debiased=debiased)
    assert float(p[0, 0]) == pytest.approx(0.01)


def test_benjamini_hochberg_and_the_errors():
    p = torch.tensor([[0.01, 0.04], [0.03, 0.5]])
    expected = scipy_stats.false_discovery_control(p.reshape(-1).numpy()).reshape(2, 2)
    np.testing.assert_allclose(benjamini_hochberg(p).numpy(), expected, atol=1e-15)
    with pytest.raises(RepsimError, match=r"\[0, 1\]"):
        benjamini_hochberg(torch.tensor([0.5, 1.5]))
    a, b = _mlp(0), _mlp(1)
    data = [torch.randn(16, 10)]
    with pytest.raises(RepsimError, match="does not declare"):
        rp.compare(a, b, data, ["0"], ["0"], "procrustes", permutations=10, progress=False)
    with pytest.raises(RepsimError, match="sample_space"):
        rp.compare(a, b, data, ["0"], ["0"], permutations=10, estimator="feature_streaming", progress=False)
    with pytest.raises(ValueError, match="permutations"):
        rp.compare(a, b, data, ["0"], ["0"], permutations=0, progress=False)
    K = _grams({"x": torch.randn(8, 3).double().numpy()})
    with pytest.raises(RepsimError, match="bootstrap"):
        map_bootstrap(K, K, torch.ones(1, 1), bootstrap=1)
