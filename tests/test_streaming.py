"""Streaming accumulators against one-shot CKA and independent textbook references.

References: ``reference.cka_numpy`` / ``reference.debiased_cka_numpy`` (explicit H and Song's formula in numpy) on
data centered in float64 first, and the one-shot ``linear_cka``. The float32 + 1e4 cases are the ones where a naive
``X^T X - n mu mu^T`` accumulator fails (shown in ``test_naive_float32_accumulator_is_wrong``).
"""

from __future__ import annotations

import io
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import cka_numpy, debiased_cka_numpy, hsic_unbiased_numpy, rbf_gram_numpy

import repsim_plugin as rp
from repsim_plugin import streaming
from repsim_plugin.errors import (
    DegenerateInputError,
    InputDtypeError,
    InputShapeError,
    NonFiniteInputError,
    RepsimError,
    SmallSampleBiasWarning,
    TooFewSamplesError,
    UnknownNameError,
)
from repsim_plugin.measures.cka import linear_cka
from repsim_plugin.streaming import (
    LinearCKA,
    LinearCKAMap,
    MinibatchCKA,
    MinibatchCKAMap,
    SampleSpaceCKAMap,
)
from repsim_plugin.streaming._moments import _Moments
from repsim_plugin.streaming._rows import _Layout

TOL = 1e-10


@pytest.fixture(autouse=True)
def _quiet_bias_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleBiasWarning)
        yield


def offset_pair(n: int, seed: int = 0, p: int = 6, q: int = 4, offset: float = 1e4):
    """Post-ReLU activations + a large common offset, stored in float32 (the hard case)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, p, generator=g, dtype=torch.float64)
    X = torch.relu(base) + offset
    Y = torch.relu(base[:, :3] @ torch.randn(3, q, generator=g, dtype=torch.float64)) + offset
    Y = Y + 0.3 * torch.randn(n, q, generator=g, dtype=torch.float64)
    return X.float(), Y.float()


def gaussian_pair(n: int, seed: int = 0, p: int = 5, q: int = 3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    Y = X[:, :q] @ torch.randn(q, q, generator=g, dtype=torch.float64) + torch.randn(
        n, q, generator=g, dtype=torch.float64
    )
    return X, Y


def textbook(X: torch.Tensor, Y: torch.Tensor, debiased: bool) -> float:
    """Independent reference on the same values upcast to float64, centered first (CKA is translation invariant)."""
    Xc = X.double().numpy()
    Yc = Y.double().numpy()
    Xc, Yc = Xc - Xc.mean(0), Yc - Yc.mean(0)
    if debiased:
        return debiased_cka_numpy(Xc @ Xc.T, Yc @ Yc.T)
    return cka_numpy(Xc, Yc)


def stream(X, Y, batch: int, debiased: bool) -> LinearCKA:
    acc = LinearCKA(debiased=debiased)
    for i in range(0, X.shape[0], batch):
        acc.update(X[i : i + batch], Y[i : i + batch])
    return acc


# --- exactness over batch sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
@pytest.mark.parametrize("batch", [1, 7, 64, 10_000], ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("data", ["gaussian_f64", "relu_offset1e4_f32"])
def test_streaming_equals_one_shot(debiased, batch, data):
    X, Y = gaussian_pair(203) if data == "gaussian_f64" else offset_pair(203)
    acc = stream(X, Y, batch, debiased)
    got = acc.compute()
    assert got.dtype == torch.float64 and got.shape == ()
    assert acc.n == 203
    one_shot = float(linear_cka(X.double(), Y.double(), debiased=debiased))
    assert float(got) == pytest.approx(one_shot, abs=TOL)
    assert float(got) == pytest.approx(textbook(X, Y, debiased), abs=TOL)


def test_naive_float32_accumulator_is_wrong():
    """The offset case is a real trap: X^T X - n mu mu^T in float32 is far off, so the tests above can fail."""
    X, Y = offset_pair(203)

    def naive(A, B):
        n = A.shape[0]
        mA, mB = A.mean(0), B.mean(0)
        return A.T @ B - n * torch.outer(mA, mB)

    Cxy, Cxx, Cyy = naive(X, Y), naive(X, X), naive(Y, Y)
    value = float((Cxy**2).sum() / torch.sqrt((Cxx**2).sum() * (Cyy**2).sum()))
    assert abs(value - float(linear_cka(X.double(), Y.double()))) > 1e-3


def test_drifting_data_one_row_at_a_time():
    """Rows sorted by a feature (each batch far from the running mean) with batch size 1: still exact."""
    X, Y = offset_pair(150, seed=3)
    order = torch.argsort(X[:, 0] + 5 * Y[:, 1])
    X, Y = X[order], Y[order]
    X[:, 1] += torch.linspace(0, 50, 150)  # a trend the running mean keeps chasing
    for debiased in (False, True):
        got = float(stream(X, Y, 1, debiased).compute())
        assert got == pytest.approx(textbook(X, Y, debiased), abs=TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_are_upcast_before_summing(dtype):
    X, Y = offset_pair(120, seed=4, offset=30.0)
    X, Y = X.to(dtype), Y.to(dtype)
    for debiased in (False, True):
        got = float(stream(X, Y, 16, debiased).compute())
        assert got == pytest.approx(textbook(X, Y, debiased), abs=TOL)


def test_numpy_input():
    X, Y = gaussian_pair(50, seed=5)
    acc = LinearCKA()
    acc.update(X[:20].numpy(), Y[:20].numpy())
    acc.update(X[20:].numpy().astype(np.float32), Y[20:].numpy())
    ref = textbook(torch.cat([X[:20], X[20:].float().double()]), Y, False)
    assert float(acc.compute()) == pytest.approx(ref, abs=TOL)


def test_values_are_detached():
    X, Y = gaussian_pair(30, seed=6)
    X.requires_grad_(True)
    acc = LinearCKA()
    acc.update(X, Y)
    assert not acc.compute().requires_grad


# --- merge in any order (hypothesis) ---------------------------------------------------------------------------------


@st.composite
def _splits(draw):
    n = draw(st.integers(8, 70))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=8)))
    chunks = list(zip([0, *cuts], [*cuts, n], strict=True))
    groups = draw(st.integers(1, len(chunks)))
    owner = [draw(st.integers(0, groups - 1)) for _ in chunks]
    merge_order = draw(st.permutations(list(range(groups))))
    return n, chunks, owner, merge_order, groups


@given(split=_splits(), debiased=st.booleans(), offset_f32=st.booleans(), seed=st.integers(0, 2**16))
def test_any_split_and_merge_order_gives_the_same_value(split, debiased, offset_f32, seed):
    n, chunks, owner, merge_order, groups = split
    X, Y = offset_pair(n, seed) if offset_f32 else gaussian_pair(n, seed)
    accs = [LinearCKA(debiased=debiased) for _ in range(groups)]
    for (lo, hi), k in zip(chunks, owner, strict=True):
        accs[k].update(X[lo:hi], Y[lo:hi])
    total = LinearCKA(debiased=debiased)
    for k in merge_order:
        total.merge(accs[k])
    assert total.n == n
    if debiased and n < 4:
        return
    assert float(total.compute()) == pytest.approx(textbook(X, Y, debiased), abs=TOL)


@given(split=_splits(), seed=st.integers(0, 2**16))
def test_map_merge_order_independent(split, seed):
    n, chunks, owner, merge_order, groups = split
    X, Y = offset_pair(n, seed)
    acts = {"x": X, "y": Y, "xy": torch.cat([X[:, :2], Y[:, :1]], 1)}
    accs = [LinearCKAMap(debiased=True, same=True) for _ in range(groups)]
    for (lo, hi), k in zip(chunks, owner, strict=True):
        accs[k].update({name: t[lo:hi] for name, t in acts.items()})
    total = LinearCKAMap(debiased=True, same=True)
    for k in merge_order:
        total.merge(accs[k])
    got = total.compute()
    for i, a in enumerate(acts.values()):
        for j, b in enumerate(acts.values()):
            assert float(got[i, j]) == pytest.approx(textbook(a, b, True), abs=TOL)


def test_merge_after_compute_and_continue():
    """compute() finalizes the center in place; merging and updating afterwards stays exact."""
    X, Y = offset_pair(90, seed=7)
    a, b = LinearCKA(True), LinearCKA(True)
    a.update(X[:30], Y[:30])
    a.compute()
    b.update(X[30:31], Y[30:31])
    b.merge(a)
    b.compute()
    b.update(X[31:], Y[31:])
    assert float(b.compute()) == pytest.approx(textbook(X, Y, True), abs=TOL)


# --- the re-centering identity itself --------------------------------------------------------------------------------


def _brute_moments(XA: torch.Tensor, XB: torch.Tensor | None, a: _Layout, b: _Layout | None, c_a, c_b):
    """Every statistic of _Moments computed directly from rows around the given centers."""
    same = b is None
    B, XB, c_b = (a, XA, c_a) if same else (b, XB, c_b)
    Xa, Xb = XA - c_a, XB - c_b

    def rownorms(Xh, lay):
        return torch.stack([Xh[:, blk].square().sum(1) for blk in lay.blocks()], 1)

    Ra, Rb = rownorms(Xa, a), rownorms(Xb, B)
    out = {"a.first": Xa.sum(0), "cross": Xa.T @ Xb, "cross.quart": Ra.T @ Rb, "cross.u": Ra.T @ Xb}
    if not same:
        out["b.first"] = Xb.sum(0)
        out["cross.v"] = Xa.T @ Rb
        for key, Xh, R, lay in (("a", Xa, Ra, a), ("b", Xb, Rb, B)):
            out[f"{key}.grams"] = torch.cat([(Xh[:, blk].T @ Xh[:, blk]).reshape(-1) for blk in lay.blocks()])
            out[f"{key}.quart"] = (R * R).sum(0)
            out[f"{key}.third"] = torch.cat([(Xh[:, blk] * R[:, [i]]).sum(0) for i, blk in enumerate(lay.blocks())])
    return out


@pytest.mark.parametrize("same", [False, True], ids=["two_sides", "same"])
def test_recenter_identity_matches_brute_force(same):
    g = torch.Generator().manual_seed(8)
    a = _Layout(("l1", "l2"), (3, 2))
    b = None if same else _Layout(("m1", "m2", "m3"), (2, 1, 4))
    n = 17
    XA = torch.randn(n, a.total, generator=g, dtype=torch.float64) + 2.0
    XB = None if same else torch.randn(n, b.total, generator=g, dtype=torch.float64) * 3 - 1.0
    m = _Moments(a, b, True, torch.device("cpu"))
    m.update_(XA, XB)
    m.update_(XA[:5] * 0.5, None if same else XB[:5] - 4.0)  # a second batch: the state is merged, F != 0 later
    rows_a = torch.cat([XA, XA[:5] * 0.5])
    rows_b = None if same else torch.cat([XB, XB[:5] - 4.0])
    for _ in range(2):  # two arbitrary moves, the second from a center with non-zero first moments
        da = torch.randn(a.total, generator=g, dtype=torch.float64)
        db = None if same else torch.randn(b.total, generator=g, dtype=torch.float64)
        m.recenter_(da, db)
        expected = _brute_moments(rows_a, rows_b, a, b, m.t["a.center"], None if same else m.t["b.center"])
        for key, value in expected.items():
            torch.testing.assert_close(m.t[key], value, rtol=1e-12, atol=1e-9, msg=key)


@pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
@pytest.mark.parametrize("same", [False, True], ids=["two_sides", "same"])
def test_center_moves_only_when_a_mean_drifts_past_its_spread(debiased, same):
    """iid batches keep the first batch's center; a batch that drags a mean past the spread moves it; exact both."""

    def check(acts, batches):
        other = {"z2": acts["z"][:, :5], "x": acts["x"]}
        acc = LinearCKAMap(debiased, same=same)
        for rows in batches:
            acc.update({k: v[rows] for k, v in acts.items()}, None if same else {k: v[rows] for k, v in other.items()})
        center = acc._m.t["a.center"].clone()
        M = acc.compute()
        for i, a in enumerate(acts.values()):
            for j, b in enumerate((acts if same else other).values()):
                assert float(M[i, j]) == pytest.approx(textbook(a, b, debiased), abs=TOL)
        return center

    acts = _layers(300, 13)
    center = check(acts, [slice(i, i + 60) for i in range(0, 300, 60)])
    first = torch.cat([v[:60].double() for v in acts.values()], 1).mean(0)
    torch.testing.assert_close(center, first, rtol=0, atol=1e-9)  # iid batches: never moved
    acts["x"] = torch.cat([acts["x"][:6], acts["x"][6:] + 300.0])  # after 6 rows the mean jumps by ~100 sigmas
    center = check(acts, [slice(0, 6), slice(6, 300)])
    jump = center[: acts["x"].shape[1]] - acts["x"][:6].double().mean(0)
    assert bool((jump > 250).all()), "the center did not follow a mean that drifted past the spread"


# --- layer maps -------------------------------------------------------------------------------------------------------


def _layers(n: int, seed: int):
    X, Y = offset_pair(n, seed, p=6, q=4)
    g = torch.Generator().manual_seed(seed + 1)
    Z = (torch.tanh(X.double() - 1e4) @ torch.randn(6, 9, generator=g, dtype=torch.float64) + 500).float()
    return {"x": X, "y": Y, "z": Z, "one": Y[:, :1] * 2}


@pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
def test_map_matches_every_pair_one_shot(debiased):
    acts_a = _layers(97, 9)
    acts_b = {"z2": acts_a["z"][:, :5], "y": acts_a["y"], "x": acts_a["x"]}
    two = LinearCKAMap(debiased)
    one = LinearCKAMap(debiased, same=True)
    for i in range(0, 97, 13):
        two.update({k: v[i : i + 13] for k, v in acts_a.items()}, {k: v[i : i + 13] for k, v in acts_b.items()})
        one.update({k: v[i : i + 13] for k, v in acts_a.items()})
    M, S = two.compute(), one.compute()
    assert M.shape == (4, 3) and S.shape == (4, 4)
    assert two.layers_a == list(acts_a) and two.layers_b == list(acts_b)
    for i, a in enumerate(acts_a.values()):
        for j, b in enumerate(acts_b.values()):
            assert float(M[i, j]) == pytest.approx(textbook(a, b, debiased), abs=TOL)
        for j, b in enumerate(acts_a.values()):
            assert float(S[i, j]) == pytest.approx(textbook(a, b, debiased), abs=TOL)
    torch.testing.assert_close(S, S.T, rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.diagonal(S), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
@pytest.mark.parametrize("same", [False, True], ids=["two_sides", "same"])
def test_rows_upcast_a_chunk_at_a_time_give_the_one_chunk_moments(monkeypatch, debiased, same):
    """A batch of many chunks (5 rows each here, layers in float16 and float32) keeps every moment of one chunk."""
    from repsim_plugin.streaming import _moments

    acts_a = _layers(97, 11)
    acts_a["half"] = (acts_a["y"] - 1e4).half()
    acts_b = {"z2": acts_a["z"][:, :5], "half": acts_a["half"], "y": acts_a["y"]}

    def fill() -> LinearCKAMap:
        acc = LinearCKAMap(debiased, same=same)
        for i in (0, 40):  # the second batch adds around the first batch's center, not around zero
            stop = 40 if i == 0 else 97
            acc.update(
                {k: v[i:stop] for k, v in acts_a.items()},
                None if same else {k: v[i:stop] for k, v in acts_b.items()},
            )
        return acc

    whole = fill()
    assert _moments.chunk_rows(1) >= 97  # the unpatched batches are one chunk each
    monkeypatch.setattr(_moments, "CHUNK_BYTES", 1)
    monkeypatch.setattr(_moments, "CHUNK_MIN_ROWS", 5)
    chunked = fill()
    assert chunked.n == whole.n == 97
    for key, value in whole._m.t.items():
        torch.testing.assert_close(chunked._m.t[key], value, rtol=1e-12, atol=1e-9, msg=key)
    M = chunked.compute()
    for i, a in enumerate(acts_a.values()):
        for j, b in enumerate((acts_a if same else acts_b).values()):
            assert float(M[i, j]) == pytest.approx(textbook(a, b, debiased), abs=TOL)


def test_map_same_detection_and_misuse():
    acts = _layers(20, 10)
    auto = LinearCKAMap()
    auto.update(acts, acts)
    assert auto.same is True
    with pytest.raises(RepsimError, match="same=True"):
        auto.update(acts, dict(acts))
    two = LinearCKAMap(same=False)
    with pytest.raises(RepsimError, match="update\\(acts_a, acts_b\\)"):
        two.update(acts)


def test_map_layer_and_row_errors():
    acts = _layers(20, 11)
    m = LinearCKAMap()
    m.update(acts, {"y": acts["y"]})
    with pytest.raises(InputShapeError, match="missing \\['one'\\]"):
        m.update({k: v for k, v in acts.items() if k != "one"}, {"y": acts["y"]})
    with pytest.raises(InputShapeError, match="row counts differ"):
        m.update(acts, {"y": acts["y"][:5]})
    with pytest.raises(InputShapeError, match="feature dimension"):
        m.update(acts | {"z": acts["z"][:, :2]}, {"y": acts["y"]})
    with pytest.raises(InputShapeError, match="non-empty dict"):
        m.update({}, {"y": acts["y"]})
    with pytest.raises(InputShapeError, match="must be str"):
        LinearCKAMap().update({0: acts["x"]}, {"y": acts["y"]})


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("same", [False, True])
def test_memory_bytes_is_the_state_size(debiased, same):
    acts = _layers(12, 12)
    other = {"p": acts["x"][:, :3], "q": acts["z"]}
    m = LinearCKAMap(debiased, same=same)
    m.update(acts) if same else m.update(acts, other)
    actual = sum(t.nbytes for t in m._m.t.values())
    dims_a = [t.shape[1] for t in acts.values()]
    dims_b = None if same else [t.shape[1] for t in other.values()]
    assert LinearCKAMap.memory_bytes(dims_a, dims_b, debiased=debiased) == actual
    # O(sum d^2 + sum_pairs d_a d_b): per-layer Grams once, no pair-by-pair Grams
    if not same:
        D_a, D_b = sum(dims_a), sum(dims_b)
        grams = sum(d * d for d in dims_a) + sum(d * d for d in dims_b)
        assert actual < 8 * (grams + D_a * D_b + 10 * (D_a + D_b) + 50 * (D_a + D_b))
    assert LinearCKA.memory_bytes(6, 4) == LinearCKAMap.memory_bytes([6], [4])
    assert LinearCKAMap.memory_bytes([768] * 12, debiased=False) > 8 * (768 * 12) ** 2


def test_map_state_dict_roundtrip_through_torch_save():
    acts = _layers(60, 13)
    whole, part = LinearCKAMap(True, same=True), LinearCKAMap(True, same=True)
    whole.update(acts)
    part.update({k: v[:25] for k, v in acts.items()})
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    restored = LinearCKAMap(True)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    restored.update({k: v[25:] for k, v in acts.items()})
    torch.testing.assert_close(restored.compute(), whole.compute(), rtol=0, atol=TOL)
    assert restored.layers_a == list(acts)


# --- single-pair API details ------------------------------------------------------------------------------------------


def test_state_dict_roundtrip_and_reset():
    X, Y = offset_pair(80, seed=14)
    a = stream(X[:40], Y[:40], 9, True)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = LinearCKA(True)
    b.load_state_dict(torch.load(buf, weights_only=True))
    b.update(X[40:], Y[40:])
    assert float(b.compute()) == pytest.approx(textbook(X, Y, True), abs=TOL)
    b.reset()
    assert b.n == 0
    b.update(torch.randn(10, 3), torch.randn(10, 2))  # a new stream may change dimensions after reset
    assert b.n == 10
    with pytest.raises(RepsimError, match="debiased"):
        LinearCKA(False).load_state_dict(a.state_dict())
    with pytest.raises(RepsimError, match="saved from"):
        LinearCKAMap(True).load_state_dict(a.state_dict())
    with pytest.raises(RepsimError, match="malformed"):
        LinearCKA(True).load_state_dict(a.state_dict() | {"tensors": {}})


def test_input_errors():
    X, Y = gaussian_pair(20)
    acc = LinearCKA()
    with pytest.raises(TooFewSamplesError, match="no batch"):
        acc.compute()
    with pytest.raises(InputShapeError, match="row counts differ"):
        acc.update(X, Y[:19])
    with pytest.raises(NonFiniteInputError):
        acc.update(torch.full((3, 5), float("nan")), Y[:3])
    with pytest.raises(InputDtypeError):
        acc.update(torch.ones(3, 5, dtype=torch.int64), Y[:3])
    with pytest.raises(InputShapeError, match="2-D"):
        acc.update(X.reshape(20, 5, 1), Y)
    acc.update(X[:1], Y[:1])
    with pytest.raises(TooFewSamplesError, match="at least 2"):
        acc.compute()
    with pytest.raises(InputShapeError, match="had 5 in earlier updates"):
        acc.update(X[:, :4], Y)
    acc.update(X[1:], Y[1:])
    assert float(acc.compute()) == pytest.approx(textbook(X, Y, False), abs=TOL)
    deb = LinearCKA(debiased=True)
    deb.update(X[:3], Y[:3])
    with pytest.raises(TooFewSamplesError, match="at least 4"):
        deb.compute()
    with pytest.raises(RepsimError, match="sync"):
        acc.compute(sync="yes")
    with pytest.raises(RepsimError, match="init_process_group"):
        acc.compute(sync=True)
    with pytest.raises(RepsimError, match="init_process_group"):
        acc.all_reduce()
    with pytest.raises(RepsimError, match="debiased must be"):
        LinearCKA(debiased="yes")


def test_constant_representation_is_an_error_not_a_number():
    X, _ = gaussian_pair(30)
    const = torch.full((30, 3), 1e4 + 0.1, dtype=torch.float32)  # constant; float rounding must not hide it
    for debiased in (False, True):
        acc = LinearCKA(debiased)
        for i in range(0, 30, 7):
            acc.update(X[i : i + 7], const[i : i + 7])
        with pytest.raises(DegenerateInputError, match="Y has zero variance"):
            acc.compute()
    m = LinearCKAMap()
    m.update({"a": X, "dead": const})
    with pytest.raises(DegenerateInputError, match="'dead'"):
        m.compute()


def test_merge_errors():
    X, Y = gaussian_pair(20)
    a, b = stream(X, Y, 5, False), stream(X, Y, 5, True)
    with pytest.raises(RepsimError, match="debiased"):
        a.merge(b)
    c = LinearCKA()
    c.update(X[:, :2], Y)
    with pytest.raises(RepsimError, match="different layers or feature dimensions"):
        a.merge(c)
    empty = LinearCKA()
    empty.merge(a)
    a.merge(LinearCKA())
    assert float(empty.compute()) == float(a.compute())


def test_small_sample_warning_for_biased_streaming():
    X, Y = gaussian_pair(12, p=10, q=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallSampleBiasWarning)
        acc = stream(X, Y, 4, False)
        with pytest.raises(SmallSampleBiasWarning, match="debiased=True"):
            acc.compute()
        stream(X, Y, 4, True).compute()  # the debiased form does not warn
    with pytest.warns(SmallSampleBiasWarning) as record:
        acc.compute()
    assert record[0].filename == __file__  # points at the caller, not inside the library


def test_public_api_exposes_streaming_lazily():
    assert rp.streaming.LinearCKA is LinearCKA


# --- sample space -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("debiased", [False, True])
def test_sample_space_map_equals_one_shot_when_d_exceeds_n(debiased):
    g = torch.Generator().manual_seed(15)
    base = torch.randn(40, 300, generator=g, dtype=torch.float64)
    acts = {
        "wide": (torch.relu(base) + 1e4).float(),
        "wider": (base @ torch.randn(300, 500, generator=g, dtype=torch.float64)).float(),
    }
    acts["narrow"] = acts["wide"][:, :3]
    ss = SampleSpaceCKAMap(debiased)
    for i in range(0, 40, 9):
        ss.update({k: v[i : i + 9] for k, v in acts.items()})
    assert ss.n == 40 and ss.same
    got = ss.compute()
    for i, a in enumerate(acts.values()):
        for j, b in enumerate(acts.values()):
            assert float(got[i, j]) == pytest.approx(textbook(a, b, debiased), abs=TOL)
    # two sides, merge, state dict
    left, right = SampleSpaceCKAMap(debiased), SampleSpaceCKAMap(debiased)
    left.update({"w": acts["wide"][:20]}, {"n": acts["narrow"][:20], "v": acts["wider"][:20]})
    right.update({"w": acts["wide"][20:]}, {"n": acts["narrow"][20:], "v": acts["wider"][20:]})
    left.merge(right)
    restored = SampleSpaceCKAMap(debiased)
    restored.load_state_dict(left.state_dict())
    two = restored.compute()
    assert two.shape == (1, 2)
    assert float(two[0, 1]) == pytest.approx(textbook(acts["wide"], acts["wider"], debiased), abs=TOL)
    assert SampleSpaceCKAMap.memory_bytes(40, [300, 500, 3]) >= 40 * 803 * 4 + 8 * 3 * 40 * 40


# --- minibatch CKA ----------------------------------------------------------------------------------------------------


def _minibatch_reference(X: np.ndarray, Y: np.ndarray, batch: int, gram) -> float:
    xy = xx = yy = 0.0
    for i in range(0, X.shape[0], batch):
        K, L = gram(X[i : i + batch]), gram(Y[i : i + batch])
        xy += hsic_unbiased_numpy(K, L)
        xx += hsic_unbiased_numpy(K, K)
        yy += hsic_unbiased_numpy(L, L)
    return xy / math.sqrt(xx * yy)


def _linear_gram_np(A: np.ndarray) -> np.ndarray:
    return A @ A.T


@pytest.mark.parametrize(
    ("kernel", "params", "gram"),
    [
        ("linear", {}, _linear_gram_np),
        ("rbf", {"sigma": 0.8}, lambda A: rbf_gram_numpy(A, 0.8)),
    ],
    ids=["linear", "rbf"],
)
def test_minibatch_cka_is_the_ratio_of_summed_unbiased_hsics(kernel, params, gram):
    X, Y = gaussian_pair(96, seed=16)
    acc = MinibatchCKA(kernel, **params)
    for i in range(0, 96, 16):
        acc.update(X[i : i + 16], Y[i : i + 16])
    assert acc.batches == 6 and acc.n == 96
    expected = _minibatch_reference(X.numpy(), Y.numpy(), 16, gram)
    assert float(acc.compute()) == pytest.approx(expected, abs=TOL)
    # not the mean of per-batch CKA values (the estimator the paper warns against)
    per_batch = [debiased_cka_numpy(gram(X[i : i + 16].numpy()), gram(Y[i : i + 16].numpy())) for i in range(0, 96, 16)]
    assert abs(float(acc.compute()) - float(np.mean(per_batch))) > 1e-4


def test_minibatch_merge_map_and_errors():
    acts = {k: v for k, v in _layers(64, 17).items() if k != "one"}
    single = {}
    for a in acts:
        for b in acts:
            single[a, b] = MinibatchCKA()
    halves = [MinibatchCKAMap(), MinibatchCKAMap()]
    two_sided = MinibatchCKAMap(same=False)
    for i in range(0, 64, 8):
        batch = {k: v[i : i + 8] for k, v in acts.items()}
        halves[i // 32].update(batch)
        two_sided.update(batch, {"y": batch["y"], "x": batch["x"]})
        for (a, b), acc in single.items():
            acc.update(batch[a], batch[b])
    halves[1].merge(halves[0])
    got = halves[1].compute()
    for i, a in enumerate(acts):
        for j, b in enumerate(acts):
            assert float(got[i, j]) == pytest.approx(float(single[a, b].compute()), abs=TOL)
    torch.testing.assert_close(got, got.T, rtol=0, atol=1e-14)
    torch.testing.assert_close(two_sided.compute(), got[:, [1, 0]], rtol=0, atol=1e-12)
    state = two_sided.state_dict()
    again = MinibatchCKAMap()
    again.load_state_dict(state)
    torch.testing.assert_close(again.compute(), two_sided.compute(), rtol=0, atol=0)
    m = MinibatchCKA()
    with pytest.raises(TooFewSamplesError, match="at least 4 rows per batch"):
        m.update(acts["x"][:3], acts["y"][:3])
    with pytest.raises(TooFewSamplesError, match="no batch"):
        m.compute()
    with pytest.raises(RepsimError, match="sigma"):
        MinibatchCKA("linear", sigma=0.5)
    with pytest.raises(UnknownNameError):
        MinibatchCKA("poly")
    with pytest.raises(RepsimError, match="merge"):
        MinibatchCKA("rbf").merge(MinibatchCKA())
    a, b = MinibatchCKA(), MinibatchCKA()
    a.update(acts["x"][:8], acts["y"][:8])
    b.update(acts["x"][8:16], acts["y"][8:16])
    b.merge(a)
    whole = MinibatchCKA()
    whole.update(acts["x"][:8], acts["y"][:8])
    whole.update(acts["x"][8:16], acts["y"][8:16])
    assert float(b.compute()) == pytest.approx(float(whole.compute()), abs=1e-14)
    restored = MinibatchCKA()
    restored.load_state_dict(b.state_dict())
    assert float(restored.compute()) == float(b.compute())


# --- torchmetrics -----------------------------------------------------------------------------------------------------


def test_torchmetrics_wrapper():
    pytest.importorskip("torchmetrics")
    from torchmetrics import Metric

    Metric_cls = streaming.TorchmetricsLinearCKA
    assert issubclass(Metric_cls, Metric)
    X, Y = offset_pair(120, seed=18)
    for debiased in (False, True):
        whole = Metric_cls(6, 4, debiased=debiased)
        first, second = Metric_cls(6, 4, debiased=debiased), Metric_cls(6, 4, debiased=debiased)
        for i in range(0, 120, 11):
            whole.update(X[i : i + 11], Y[i : i + 11])
            (first if i < 60 else second).update(X[i : i + 11], Y[i : i + 11])
        expected = textbook(X, Y, debiased)
        assert float(whole.compute()) == pytest.approx(expected, abs=TOL)
        first.merge_state(second)
        assert float(first.compute()) == pytest.approx(expected, abs=TOL)
        # what a DDP sync does: gather every rank's state, stack, apply dist_reduce_fx
        reduce_fx = second._reductions["stats"]
        fresh = Metric_cls(6, 4, debiased=debiased)
        fresh.update(X[:66], Y[:66])  # the rows "first" saw: batches starting below 60
        merged = reduce_fx(torch.stack([fresh.stats, second.stats]))
        fresh.stats = merged
        assert float(fresh.compute()) == pytest.approx(expected, abs=TOL)
    # forward: the batch's own value, and the batch is accumulated
    metric = Metric_cls(6, 4)
    batch_value = metric(X[:50], Y[:50])
    assert float(batch_value) == pytest.approx(textbook(X[:50], Y[:50], False), abs=TOL)
    metric(X[50:], Y[50:])
    assert float(metric.compute()) == pytest.approx(textbook(X, Y, False), abs=TOL)
    clone = pickle.loads(pickle.dumps(metric))
    assert float(clone.compute()) == float(metric.compute())
    with pytest.raises(InputShapeError, match="built for 6"):
        metric.update(X[:, :5], Y)
    with pytest.raises(RepsimError, match="positive int"):
        Metric_cls(0, 4)


def test_non_finite_batch_is_rejected_before_any_state_changes():
    acts = _layers(30, 19)
    m = LinearCKAMap(True, same=True)
    m.update({k: v[:20] for k, v in acts.items()})
    before = m.state_dict()
    for bad_value in (float("nan"), float("inf"), -float("inf")):
        bad = {k: v[20:].clone() for k, v in acts.items()}
        bad["z"][3, 2] = bad_value
        with pytest.raises(NonFiniteInputError, match=r"acts_a\['z'\].*row 3"):
            m.update(bad)
    after = m.state_dict()
    assert after["n"] == before["n"] == 20
    for key, value in before["tensors"].items():
        assert torch.equal(value, after["tensors"][key]), key
    m.update({k: v[20:] for k, v in acts.items()})
    assert float(m.compute()[0, 2]) == pytest.approx(textbook(acts["x"], acts["z"], True), abs=TOL)
