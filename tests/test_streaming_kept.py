"""KeptRowsMap (the "captured" estimator as an accumulator) against a plain loop of the measure over layer pairs."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import repsim_plugin as rp
from repsim_plugin.errors import RepsimError, SmallSampleBiasWarning, StateError, TooFewSamplesError
from repsim_plugin.streaming import KeptRowsMap


@pytest.fixture(autouse=True)
def _quiet_bias_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleBiasWarning)
        yield


def _acts(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 6, generator=g)
    return {
        "x": torch.relu(base) + 10.0,
        "y": base[:, :3] @ torch.randn(3, 4, generator=g) + 0.3 * torch.randn(n, 4, generator=g),
        "z": torch.tanh(base) @ torch.randn(6, 9, generator=g),
    }


def _loop(measure, acts_a, acts_b) -> torch.Tensor:
    """The reference: the measure on every layer pair, no symmetry shortcut."""
    return torch.tensor([[float(measure(a, b)) for b in acts_b.values()] for a in acts_a.values()], dtype=torch.float64)


def _feed(acc: KeptRowsMap, acts_a, acts_b=None, lo: int = 0, hi: int | None = None, batch: int = 9) -> None:
    hi = next(iter(acts_a.values())).shape[0] if hi is None else hi
    for i in range(lo, hi, batch):
        j = min(i + batch, hi)
        rows_a = {k: v[i:j] for k, v in acts_a.items()}
        acc.update(rows_a) if acts_b is None else acc.update(rows_a, {k: v[i:j] for k, v in acts_b.items()})


@pytest.mark.parametrize("measure_id", ["cka", "debiased_cka", "procrustes", "linreg", "rsa"])
def test_two_models_equal_the_loop(measure_id):
    m = rp.measures.make(measure_id)
    acts_a, acts_b = _acts(60, 0), {k: v[:, :3] * 2 for k, v in _acts(60, 1).items() if k != "x"}
    acc = KeptRowsMap(m)
    _feed(acc, acts_a, acts_b)
    got = acc.compute()
    assert got.dtype == torch.float64 and got.device.type == "cpu" and got.shape == (3, 2)
    assert acc.same is False and acc.layers_a == list(acts_a) and acc.layers_b == list(acts_b) and acc.n == 60
    torch.testing.assert_close(got, _loop(m, acts_a, acts_b), rtol=0, atol=1e-12)


def test_same_map_of_a_symmetric_measure_fills_the_lower_triangle():
    m = rp.measures.make("cka")
    acts = _acts(50, 2)
    acc = KeptRowsMap(m, same=True)
    _feed(acc, acts)
    calls = []
    counted = KeptRowsMap(lambda X, Y: calls.append(1) or m(X, Y), same=True)  # a plain callable: not symmetric
    _feed(counted, acts)
    got = acc.compute()
    torch.testing.assert_close(got, _loop(m, acts, acts), rtol=0, atol=1e-12)
    assert torch.equal(got, got.T)
    torch.testing.assert_close(counted.compute(), got, rtol=0, atol=1e-12)
    assert len(calls) == 9  # no shortcut for a callable that does not declare symmetry


def test_same_map_of_a_non_symmetric_measure_computes_both_triangles():
    m = rp.measures.make("linreg")
    acts = _acts(40, 3)
    acc = KeptRowsMap(m)
    _feed(acc, acts)  # acts_b=None: same=True
    assert acc.same is True
    got = acc.compute()
    torch.testing.assert_close(got, _loop(m, acts, acts), rtol=0, atol=1e-12)
    assert not torch.allclose(got, got.T)


def test_merge_and_state_dict_round_trip():
    m = rp.measures.make("debiased_cka")
    acts_a, acts_b = _acts(70, 4), _acts(70, 5)
    whole, first, second = KeptRowsMap(m), KeptRowsMap(m), KeptRowsMap(m)
    _feed(whole, acts_a, acts_b)
    _feed(first, acts_a, acts_b, 0, 30)
    _feed(second, acts_a, acts_b, 30, 70)
    empty = KeptRowsMap(m)
    empty.merge(first)  # an empty accumulator takes the other's rows
    empty.merge(KeptRowsMap(m))  # merging an empty one changes nothing
    empty.merge(second)
    assert empty.n == 70
    torch.testing.assert_close(empty.compute(), whole.compute(), rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    restored = KeptRowsMap(m)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.n == 30 and restored.layers_b == list(acts_b)
    _feed(restored, acts_a, acts_b, 30, 70)
    torch.testing.assert_close(restored.compute(), whole.compute(), rtol=0, atol=0)
    with pytest.raises(RepsimError, match="saved with measure="):
        KeptRowsMap(rp.measures.make("cka")).load_state_dict(first.state_dict())
    with pytest.raises(RepsimError, match="can only merge"):
        whole.merge(KeptRowsMap(rp.measures.make("cka")))
    other_layers = KeptRowsMap(m)
    _feed(other_layers, {"x": acts_a["x"]}, acts_b)
    with pytest.raises(RepsimError, match="different layers"):
        whole.merge(other_layers)


def test_copy_and_kept_bytes():
    m = rp.measures.make("cka")
    acts = _acts(20, 6)
    copied, shared = KeptRowsMap(m, same=True), KeptRowsMap(m, same=True, copy=False)
    copied.update(acts)
    shared.update(acts)
    assert copied.kept_bytes == shared.kept_bytes == sum(t.numel() * t.element_size() for t in acts.values())
    assert shared._rows_a["x"][0].data_ptr() == acts["x"].data_ptr()  # detached, not copied
    assert copied._rows_a["x"][0].data_ptr() != acts["x"].data_ptr()
    before = copied.compute()
    acts["x"].mul_(-1.0).add_(torch.linspace(0, 5, 20)[:, None])
    torch.testing.assert_close(copied.compute(), before, rtol=0, atol=0)


def test_rows_keep_their_dtype_and_errors():
    m = rp.measures.make("cka")
    acc = KeptRowsMap(m, same=True)
    with pytest.raises(TooFewSamplesError, match="no batch"):
        acc.compute()
    acc.update({"h": torch.randn(8, 3, dtype=torch.float16)})
    assert acc._rows_a["h"][0].dtype == torch.float16
    with pytest.raises(StateError, match="init_process_group"):
        acc.all_reduce()
    with pytest.raises(StateError, match="init_process_group"):
        acc.compute(sync=True)
    with pytest.raises(RepsimError, match="same=True"):
        acc.update({"h": torch.randn(8, 3)}, {"h": torch.randn(8, 3)})
    acc.reset()
    assert acc.n == 0 and acc.layers_a == [] and acc.kept_bytes == 0


def test_the_captured_message_is_the_one_compare_gave():
    from repsim_plugin.streaming.kept import NOT_GATHERED

    assert NOT_GATHERED.startswith("the 'captured' estimator does not gather rows across torch.distributed ranks; ")
