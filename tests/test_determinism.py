"""Determinism and memory: the same seed gives bit-identical results; capture keeps no rows and no autograd graphs.

- ``compare`` (every estimator), ``stats`` (permutation test, bootstrap, null baseline) and ``shift`` give
  bit-identical results for the same seed, whatever the global RNG state, and leave that state alone.
- Capturing 200 batches with ``keep=False`` keeps the process's resident memory flat (the rows of a batch are
  handed on and dropped), where keeping them would grow it by the size of the rows.
- Nothing keeps an autograd graph unless asked: captured rows and results have no ``grad_fn`` even when the
  model's parameters require gradients; ``grad=True`` keeps it, as asked.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
from torch import nn

import repsim_plugin as rp


def _model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 5)).train()


def _data(seed: int = 0, batches: int = 5, rows: int = 24) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 8, generator=g) for _ in range(batches)]


@pytest.mark.parametrize("estimator", ["feature_streaming", "sample_space", "minibatch", "captured"])
def test_compare_is_bit_identical_and_leaves_the_rng_alone(estimator: str) -> None:
    a, b = _model(0), _model(1)
    runs = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # a different global RNG state each time: nothing may depend on it
        state = torch.get_rng_state()
        result = rp.compare(a, b, _data(), ["0", "2"], ["0", "4"], estimator=estimator, seed=3, progress=False)
        assert torch.equal(torch.get_rng_state(), state)
        runs.append(result)
    assert torch.equal(runs[0].values, runs[1].values)
    assert runs[0].to_dict() == runs[1].to_dict()


def test_stats_same_seed_bit_identical_other_seed_differs() -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 6, generator=g, dtype=torch.float64)
    Y = X[:, :4] + torch.randn(40, 4, generator=g, dtype=torch.float64)
    for method in ("auto", "generic"):
        first = rp.stats.permutation_test("cka", X, Y, n_permutations=50, seed=7, method=method)
        torch.manual_seed(123)
        again = rp.stats.permutation_test("cka", X, Y, n_permutations=50, seed=7, method=method)
        assert torch.equal(first.null, again.null) and first.p_value == again.p_value
    other = rp.stats.permutation_test("cka", X, Y, n_permutations=50, seed=8)
    assert not torch.equal(first.null, other.null)
    boot = [rp.stats.bootstrap_ci("procrustes", X, Y, n_boot=30, seed=5) for _ in range(2)]
    assert (boot[0].low, boot[0].high) == (boot[1].low, boot[1].high)
    nulls = [rp.stats.null_baseline("cka", 30, 5, 4, n_samples=20, seed=2) for _ in range(2)]
    assert torch.equal(nulls[0].samples, nulls[1].samples)


def test_shift_same_seed_bit_identical() -> None:
    data = _data(batches=4, rows=32)
    results = []
    for noise in (1, 2):
        torch.manual_seed(noise)
        results.append(rp.adversarial.shift(_model(0).eval(), "2", data, target=0.3, steps=3, batch_size=32, seed=4))
    first, second = (r.model.state_dict() for r in results)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert results[0].measure_after == results[1].measure_after
    assert [h.get("measure") for h in results[0].history] == [h.get("measure") for h in results[1].history]


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident memory is read from /proc (Linux)")
def test_capture_200_batches_without_keep_keeps_memory_flat() -> None:
    model = nn.Sequential(nn.Linear(16, 1024), nn.ReLU()).eval()
    x = torch.randn(128, 16)
    seen = []
    rec = rp.capture(model, ["0", "1"], keep=False, on_batch=lambda rows: seen.append(len(rows)))
    per_batch = 2 * 128 * 1024 * 4  # 1 MiB of rows per batch: 180 MiB over 180 batches if they were kept
    with rec:
        for _ in range(20):
            model(x)
        gc.collect()
        start = _rss()
        for _ in range(180):
            model(x)
        gc.collect()
        grown = _rss() - start
    assert len(seen) == 200 and all(count == 2 for count in seen)
    with pytest.raises(rp.errors.StateError, match="keep=False"):
        rec.activations  # noqa: B018  # nothing was kept
    assert grown < 30 * per_batch, f"resident memory grew by {grown / 2**20:.0f} MiB over 180 batches"


def test_no_autograd_graph_is_kept_unless_asked() -> None:
    model = _model(0).eval()
    assert all(p.requires_grad for p in model.parameters())
    x = torch.randn(16, 8)
    with rp.capture(model, ["0", "4"]) as rec:
        model(x)
    assert all(t.grad_fn is None and not t.requires_grad for t in rec.activations.values())
    result = rp.compare(model, _model(1), _data(), ["0"], ["0"], progress=False)
    assert result.values.grad_fn is None and not result.values.requires_grad
    acc = rp.streaming.LinearCKAMap()
    acc.update({"x": model[0](x)}, {"y": model[4](model[0](x).relu())})  # rows that carry a graph
    assert acc.compute().grad_fn is None
    with rp.capture(model, ["0"], grad=True) as rec:  # asked for: the graph is kept
        model(x)
    assert rec.activations["0"].grad_fn is not None
    assert torch.is_grad_enabled()
