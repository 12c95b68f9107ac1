"""Capture on plain nn.Modules: layer selection, reductions against loop references, hook hygiene, streaming.

Every reference below is written out independently (Python loops over samples and tokens, manual forward passes
through the same small real modules); nothing calls the reduction code it checks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from repsim_plugin.adapters import GenericAdapter, for_model
from torch import nn

import repsim_plugin as rp
from repsim_plugin.capture import (
    LayerFiringError,
    Recorder,
    capture,
    reduce_output,
    resolve_layers,
    select_output,
)
from repsim_plugin.errors import (
    DegenerateInputError,
    InputDtypeError,
    InputShapeError,
    RepsimError,
    UnknownNameError,
)


# ------------------------------------------------------------------------------------------------------------
# small real models
# ------------------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(width, width)
        self.act = nn.GELU()
        self.lin2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin2(self.act(self.lin1(x)))


class Net(nn.Module):
    """stem -> 3 residual blocks -> dropout -> head; dropout makes train / eval mode observable."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(3)])
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.drop(h))


class Shared(nn.Module):
    """One block used at two call sites per forward, plus a branch that runs only for positive inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.block = nn.Linear(5, 5)
        self.branch = nn.Linear(5, 5)
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.inp(x))
        if self.fail:
            raise RuntimeError("boom inside forward")
        h = self.block(torch.tanh(h))
        if bool((x > 0).all()):
            h = self.branch(h)
        return h


class TokenNet(nn.Module):
    """(batch, tokens, features) model taking an attention mask like a transformer: embed -> mix -> out."""

    def __init__(self, features: int = 6) -> None:
        super().__init__()
        self.embed = nn.Linear(features, features)
        self.mix = nn.Linear(features, features)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.mix(torch.relu(self.embed(x)))


class ConvNet(nn.Module):
    """conv -> relu -> conv; ``channels_last_out`` returns the second map as NHWC (the same numbers)."""

    def __init__(self, channels_last_out: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.to_nhwc = Permute() if channels_last_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_nhwc(self.conv2(torch.relu(self.conv1(x))))


class Permute(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.lin(x)
        return h, 2 * h


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.lin(x)
        return {"hidden": h, "doubled": 2 * h, "count": 3}  # type: ignore[dict-item]


class Wrap(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> object:
        return self.inner(x)


def hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Sizes of every hook dict of every module (forward / pre / kwargs / always-called / backward)."""
    counts = {}
    for name, module in model.named_modules():
        counts[name] = (
            len(module._forward_hooks),
            len(module._forward_pre_hooks),
            len(module._forward_hooks_with_kwargs),
            len(module._forward_pre_hooks_with_kwargs),
            len(module._forward_hooks_always_called),
            len(module._backward_hooks),
            len(module._backward_pre_hooks),
        )
    return counts


def training_flags(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


# ------------------------------------------------------------------------------------------------------------
# layer selection
# ------------------------------------------------------------------------------------------------------------
def test_glob_star_matches_one_segment_and_double_star_any() -> None:
    model = Net()
    assert list(resolve_layers(model, "blocks.*")) == ["blocks.0", "blocks.1", "blocks.2"]
    assert list(resolve_layers(model, "blocks.*.lin1")) == ["blocks.0.lin1", "blocks.1.lin1", "blocks.2.lin1"]
    assert list(resolve_layers(model, "**.lin2")) == ["blocks.0.lin2", "blocks.1.lin2", "blocks.2.lin2"]
    below = list(resolve_layers(model, "blocks.**"))
    assert "blocks" not in below  # a trailing ** is what lies below, not the container itself
    assert below[:5] == ["blocks.0", "blocks.0.lin1", "blocks.0.act", "blocks.0.lin2", "blocks.1"]
    assert len(below) == 12
    assert list(resolve_layers(model, "blocks.[02]")) == ["blocks.0", "blocks.2"]


def test_layers_come_back_in_model_order_without_duplicates() -> None:
    model = Net()
    resolved = resolve_layers(model, ["head", "blocks.1", model.stem, "blocks.*", "head"])
    assert list(resolved) == ["stem", "blocks.0", "blocks.1", "blocks.2", "head"]


def test_int_layers_index_the_adapters_default_layers() -> None:
    model = Net()
    adapter = for_model(model)
    assert isinstance(adapter, GenericAdapter)
    assert adapter.default_layers() == ["stem", "blocks", "drop", "head"]
    assert list(resolve_layers(model, [0, -1])) == ["stem", "head"]
    with pytest.raises(UnknownNameError, match="out of range"):
        resolve_layers(model, 7)


def test_module_objects_and_aliases_resolve_to_the_first_name() -> None:
    model = Net()
    model.alias = model.blocks[1]  # the same block registered a second time
    assert list(resolve_layers(model, [model.blocks[1]])) == ["blocks.1"]
    assert list(resolve_layers(model, ["alias"])) == ["blocks.1"]
    with pytest.raises(UnknownNameError, match="not part of"):
        resolve_layers(model, [nn.Linear(2, 2)])
    with pytest.raises(UnknownNameError, match="model itself"):
        resolve_layers(model, [model])


def test_unknown_names_fail_with_suggestions() -> None:
    model = Net()
    with pytest.raises(UnknownNameError, match=r"blocks\.0\.lin1"):
        resolve_layers(model, "blocks.0.lni1")
    with pytest.raises(UnknownNameError, match="matches no module"):
        resolve_layers(model, "encoder.layer.*")
    with pytest.raises(UnknownNameError):
        resolve_layers(model, [1.5])  # type: ignore[list-item]
    with pytest.raises(UnknownNameError, match="mean"):
        capture(model, "head", tokens="maen")
    with pytest.raises(UnknownNameError):
        capture(model, "head", spatial="avg")
    with pytest.raises(UnknownNameError, match="timm"):
        capture(model, "head", adapter="tim")
    assert issubclass(UnknownNameError, ValueError)


# ------------------------------------------------------------------------------------------------------------
# values
# ------------------------------------------------------------------------------------------------------------
def test_rows_equal_a_manual_forward_over_several_batches() -> None:
    model = Net()
    batches = [torch.randn(5, 4), torch.randn(3, 4)]
    with capture(model, ["stem", "blocks.*", "head"]) as rec:
        for x in batches:
            model(x)
    # the expected rows come from the same per-batch forwards the capture saw (CPU GEMMs round differently for
    # different batch sizes, so one forward of all 8 rows need not agree bit for bit)
    per_batch: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for x in batches:
            h = model.stem(x)
            per_batch.setdefault("stem", []).append(h)
            for i, block in enumerate(model.blocks):
                h = block(h)
                per_batch.setdefault(f"blocks.{i}", []).append(h)
            per_batch.setdefault("head", []).append(model.head(h))  # eval mode: dropout is the identity
    expected = {name: torch.cat(rows) for name, rows in per_batch.items()}
    assert rec.layers == ["stem", "blocks.0", "blocks.1", "blocks.2", "head"]
    assert rec.num_forwards == 2 and rec.num_inputs == 8
    assert rec.num_rows == dict.fromkeys(rec.layers, 8)
    for name, value in expected.items():
        torch.testing.assert_close(rec.activations[name], value, rtol=0, atol=0)
    assert rec.last_batch["head"].shape == (3, 2)


def test_rp_capture_is_callable_even_after_importing_the_submodule() -> None:
    import repsim_plugin.capture as capture_module

    model = Net()
    assert callable(rp.capture)
    with rp.capture(model, "head") as rec, capture_module(model, "stem") as rec2:
        model(torch.randn(2, 4))
    assert rec.activations["head"].shape == (2, 2)
    assert rec2.activations["stem"].shape == (2, 8)
    assert isinstance(rec, Recorder)


# ------------------------------------------------------------------------------------------------------------
# token reductions against loop references
# ------------------------------------------------------------------------------------------------------------
def _loop_reference(x: np.ndarray, real: np.ndarray, prefix: int, policy: str) -> np.ndarray:
    rows = []
    for b in range(x.shape[0]):
        positions = [t for t in range(x.shape[1]) if real[b, t]]
        body = [t for t in positions if t >= prefix]
        if policy == "mean":
            rows.append(sum(x[b, t] for t in body) / len(body))
        elif policy == "cls":
            rows.append(x[b, positions[0]])
        elif policy == "last":
            rows.append(x[b, positions[-1]])
        elif policy == "as_samples":
            rows.extend(x[b, t] for t in body)
        elif policy == "flatten":
            rows.append(np.concatenate([x[b, t] for t in range(prefix, x.shape[1])]))
    return np.stack(rows)


@st.composite
def token_batches(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, str]:
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 7))
    channels = draw(st.integers(1, 5))
    prefix = draw(st.integers(0, min(2, length - 1)))
    side = draw(st.sampled_from(["right", "left", "random", "none"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    x = rng.standard_normal((batch, length, channels))
    real = np.ones((batch, length), dtype=bool)
    for b in range(batch):
        n_real = int(rng.integers(prefix + 1, length + 1))
        if side == "right":
            real[b, n_real:] = False
        elif side == "left":
            real[b, : length - n_real] = False
            real[b, :prefix] = True  # prefix tokens are always real
        elif side == "random":
            real[b] = rng.random(length) < 0.6
            real[b, : prefix + 1] = True
    return x, real, prefix, side


@given(token_batches(), st.sampled_from(["mean", "cls", "last", "as_samples"]))
def test_token_policies_match_a_loop_reference(data: tuple, policy: str) -> None:
    x, real, prefix, _ = data
    got = reduce_output(
        torch.from_numpy(x), "NLC", tokens=policy, mask=torch.from_numpy(real.astype(np.int64)), prefix_tokens=prefix
    )
    np.testing.assert_allclose(got.numpy(), _loop_reference(x, real, prefix, policy), rtol=1e-12, atol=1e-12)


@given(token_batches())
def test_token_flatten_matches_reference_and_rejects_padding(data: tuple) -> None:
    x, real, prefix, _ = data
    full = np.ones_like(real)
    got = reduce_output(torch.from_numpy(x), "NLC", tokens="flatten", mask=torch.from_numpy(full), prefix_tokens=prefix)
    np.testing.assert_array_equal(got.numpy(), _loop_reference(x, full, prefix, "flatten"))
    if not real.all():
        with pytest.raises(InputShapeError, match="equal length"):
            reduce_output(torch.from_numpy(x), "NLC", tokens="flatten", mask=torch.from_numpy(real))


def test_token_reduction_errors() -> None:
    x = torch.randn(2, 3, 4)
    with pytest.raises(InputShapeError, match="attention mask"):
        reduce_output(x, "NLC", mask=torch.ones(2, 5))
    with pytest.raises(DegenerateInputError, match=r"\[1\]"):
        reduce_output(x, "NLC", tokens="mean", mask=torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(DegenerateInputError):
        reduce_output(x, "NLC", tokens="last", mask=torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(DegenerateInputError, match="prefix"):  # only the CLS token is real
        reduce_output(x, "NLC", tokens="mean", mask=torch.tensor([[1, 0, 0], [1, 1, 0]]), prefix_tokens=1)
    with pytest.raises(InputDtypeError):
        reduce_output(torch.ones(2, 3, dtype=torch.long), None)
    half = reduce_output(x.to(torch.bfloat16), "NLC", tokens="mean")
    assert half.dtype == torch.float32


def test_mask_is_read_from_keyword_and_positional_arguments() -> None:
    model = TokenNet()
    x = torch.randn(3, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        hidden = model(x)
    expected = torch.stack([hidden[b][mask[b].bool()].mean(0) for b in range(3)])
    with capture(model, "mix", tokens="mean") as by_keyword:
        model(x, attention_mask=mask)
    with capture(model, "mix", tokens="mean") as by_position:
        model(x, mask)
    with capture(model, "mix", tokens="mean", attention_mask=mask) as explicit:
        model(x)
    with capture(model, "mix", tokens="mean") as unmasked:
        model(x)
    for rec in (by_keyword, by_position, explicit):
        torch.testing.assert_close(rec.activations["mix"], expected)
    torch.testing.assert_close(unmasked.activations["mix"], hidden.mean(1))
    assert by_keyword.policy["layout"] == {"mix": "NLC"}


def test_as_samples_counts_real_tokens_and_records_the_unit() -> None:
    model = TokenNet()
    x = torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    with capture(model, ["embed", "mix"], tokens="as_samples") as rec:
        model(x, attention_mask=mask)
    assert rec.activations["mix"].shape == (5, 6)
    assert rec.num_rows == {"embed": 5, "mix": 5} and rec.num_inputs == 2
    assert rec.policy["rows"] == {"embed": "token", "mix": "token"}


# ------------------------------------------------------------------------------------------------------------
# spatial reductions
# ------------------------------------------------------------------------------------------------------------
def test_spatial_policies_match_references_and_nhwc_gives_equal_columns() -> None:
    nchw_model = ConvNet()
    nhwc_model = ConvNet(channels_last_out=True)
    nhwc_model.load_state_dict(nchw_model.state_dict())
    x = torch.randn(2, 3, 5, 6)
    with torch.no_grad():
        conv2 = nchw_model.conv2(torch.relu(nchw_model.conv1(x)))
    for policy in ("flatten", "mean", "as_samples"):
        with capture(nchw_model, "conv2", spatial=policy) as a:
            nchw_model(x)
        with capture(nhwc_model, "to_nhwc", spatial=policy, layout={"to_nhwc": "NHWC"}) as b:
            nhwc_model(x)
        if policy == "flatten":  # C*H*W in NCHW order, as the literature does
            expected = torch.stack([torch.cat([conv2[i, c].reshape(-1) for c in range(5)]) for i in range(2)])
        elif policy == "mean":
            expected = torch.stack([torch.stack([conv2[i, c].mean() for c in range(5)]) for i in range(2)])
        else:
            expected = torch.stack([conv2[i, :, h, w] for i in range(2) for h in range(5) for w in range(6)])
        torch.testing.assert_close(a.activations["conv2"], expected)
        torch.testing.assert_close(b.activations["to_nhwc"], expected)
        assert a.policy["layout"] == {"conv2": "NCHW"} and b.policy["layout"] == {"to_nhwc": "NHWC"}
    assert a.policy["rows"] == {"conv2": "position"}


def test_forced_layout_of_the_wrong_rank_fails() -> None:
    model = ConvNet()
    with pytest.raises(InputShapeError, match="NLC"), capture(model, "conv2", layout="NLC"):
        model(torch.randn(1, 3, 4, 4))
    with pytest.raises(UnknownNameError):
        capture(model, "conv2", layout="NCWH")


def test_feature_count_change_between_batches_fails() -> None:
    model = ConvNet()
    with pytest.raises(InputShapeError, match="features"), capture(model, "conv2", spatial="flatten"):
        model(torch.randn(1, 3, 4, 4))
        model(torch.randn(1, 3, 6, 6))


# ------------------------------------------------------------------------------------------------------------
# output selection
# ------------------------------------------------------------------------------------------------------------
def test_output_selection_for_tuples_dicts_and_callables() -> None:
    x = torch.randn(3, 3)
    tuple_model = Wrap(TupleOut())
    with capture(tuple_model, "inner") as first, capture(tuple_model, "inner", output=1) as second:
        tuple_model(x)
    with torch.no_grad():
        h = tuple_model.inner.lin(x)
    torch.testing.assert_close(first.activations["inner"], h)
    torch.testing.assert_close(second.activations["inner"], 2 * h)

    dict_model = Wrap(DictOut())
    with (
        capture(dict_model, "inner") as default,
        capture(dict_model, "inner", output="doubled") as by_key,
        capture(dict_model, "inner", output=lambda out: out["hidden"] + 1) as by_callable,
    ):
        dict_model(x)
    with torch.no_grad():
        h = dict_model.inner.lin(x)
    torch.testing.assert_close(default.activations["inner"], h)
    torch.testing.assert_close(by_key.activations["inner"], 2 * h)
    torch.testing.assert_close(by_callable.activations["inner"], h + 1)
    assert by_key.policy["output"] == "doubled"
    assert isinstance(by_callable.policy["output"], str)

    with pytest.raises(UnknownNameError, match="doubled"), capture(dict_model, "inner", output="doubeld"):
        dict_model(x)
    with pytest.raises(RepsimError, match="not a tensor"), capture(dict_model, "inner", output="count"):
        dict_model(x)
    with pytest.raises(RepsimError, match="out of range"):
        select_output((h,), 3)


# ------------------------------------------------------------------------------------------------------------
# firing: shared modules, never-firing layers, unexpected counts
# ------------------------------------------------------------------------------------------------------------
def test_a_module_called_twice_is_recorded_twice() -> None:
    model = Shared()
    x = -torch.rand(4, 3)  # negative: the branch does not run
    with capture(model, ["block"]) as rec:
        model(x)
    with torch.no_grad():
        first = model.block(model.inp(x))
        second = model.block(torch.tanh(first))
    assert rec.layers == ["block#0", "block#1"]
    torch.testing.assert_close(rec.activations["block#0"], first)
    torch.testing.assert_close(rec.activations["block#1"], second)
    with capture(model, ["block", "inp"], expected_calls={"block": 2, "inp": 1}) as both:
        assert both.layers == ["inp", "block#0", "block#1"]  # known before the first forward
        model(x)
    torch.testing.assert_close(both.activations["block#1"], second)
    with capture(model, ["block#1", "inp"], expected_calls={"block": 2}) as only_second:
        model(x)
    assert only_second.layers == ["inp", "block#1"]
    torch.testing.assert_close(only_second.activations["block#1"], second)


def test_a_layer_that_never_fires_raises_naming_it() -> None:
    model = Shared()
    with pytest.raises(LayerFiringError, match="'branch' never ran"), capture(model, ["inp", "branch"]):
        model(-torch.rand(2, 3))
    with pytest.raises(LayerFiringError, match="call #2"), capture(model, ["block#2"]):
        model(-torch.rand(2, 3))


def test_unexpected_call_counts_raise() -> None:
    model = Shared()
    with pytest.raises(LayerFiringError, match="expected_calls says 1"), capture(model, "block", expected_calls=1):
        model(-torch.rand(2, 3))
    # the first forward runs the branch once; a later forward that skips it breaks the count
    with pytest.raises(LayerFiringError, match="branch"), capture(model, ["branch"]):
        model(torch.rand(2, 3))
        model(-torch.rand(2, 3))
    with pytest.raises(RepsimError):
        capture(model, "block", expected_calls=0)
    with pytest.raises(UnknownNameError):
        capture(model, "block", expected_calls={"blokc": 2})


def test_a_layer_called_outside_the_model_raises() -> None:
    model = Net()
    with pytest.raises(LayerFiringError, match="outside"), capture(model, "stem"):
        model.stem(torch.randn(2, 4))


def test_outputs_that_lose_the_batch_dimension_are_rejected() -> None:
    class Windows(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(-1, 2)

    model = nn.Sequential(nn.Linear(4, 4), Windows())
    with pytest.raises(InputShapeError, match="batch"), capture(model, "1"):
        model(torch.randn(3, 4))


# ------------------------------------------------------------------------------------------------------------
# hygiene: hooks, modes, grad, nesting
# ------------------------------------------------------------------------------------------------------------
def test_one_submodule_left_in_train_mode_is_captured_in_eval_and_restored() -> None:
    """An eval model whose one submodule trains still runs every module in eval (the switch is skipped only when
    every flag is already eval), and that one flag comes back."""
    model = Shared()
    model.eval()
    model.block.train()
    before = training_flags(model)
    with capture(model, ["inp", "block"]):
        assert not any(training_flags(model).values())
        model(torch.rand(2, 3))
    assert training_flags(model) == before and model.block.training and not model.training


def test_an_exception_inside_forward_leaves_hooks_modes_and_grad_as_before() -> None:
    model = Shared()
    model.train()
    model.inp.eval()  # mixed flags must come back exactly
    foreign = model.block.register_forward_hook(lambda *args: None)
    before_hooks, before_flags = hook_counts(model), training_flags(model)
    model.fail = True
    with pytest.raises(RuntimeError, match="boom"), capture(model, ["inp", "block"]):
        assert not torch.is_grad_enabled() and not model.training and not model.inp.training
        model(-torch.rand(2, 3))
    assert hook_counts(model) == before_hooks
    assert training_flags(model) == before_flags
    assert torch.is_grad_enabled()
    foreign.remove()


def test_a_caught_exception_drops_the_partial_batch_and_capture_goes_on() -> None:
    model = Shared()
    x = -torch.rand(2, 3)
    with capture(model, ["inp", "block"]) as rec:
        model.fail = True
        with pytest.raises(RuntimeError):
            model(x)
        model.fail = False
        model(x)
    assert rec.num_forwards == 1
    assert rec.activations["inp"].shape == (2, 5)
    assert rec.layers == ["inp", "block#0", "block#1"]


def test_an_error_in_a_capture_hook_also_cleans_up() -> None:
    model = Shared()
    before = hook_counts(model)
    with pytest.raises(LayerFiringError), capture(model, ["branch"]):
        model(-torch.rand(2, 3))
    assert hook_counts(model) == before


def test_foreign_hooks_survive_and_keep_firing() -> None:
    model = Net()
    seen: list[str] = []
    handles = [
        model.stem.register_forward_hook(lambda m, i, o: seen.append("post")),
        model.stem.register_forward_pre_hook(lambda m, a, k: seen.append("pre-kw"), with_kwargs=True),
        model.register_forward_hook(lambda m, i, o: seen.append("top"), always_call=True),
    ]
    before = hook_counts(model)
    with capture(model, ["stem", "head"]):
        model(torch.randn(2, 4))
    assert hook_counts(model) == before
    model(torch.randn(2, 4))
    assert seen == ["pre-kw", "post", "top"] * 2
    for handle in handles:
        handle.remove()


def test_capture_inside_capture() -> None:
    model = Net()
    model.train()
    x = torch.randn(4, 4)
    before = hook_counts(model)
    with capture(model, ["stem", "blocks.1"]) as outer:
        model(x)
        with capture(model, ["blocks.1", "head"], device="cpu") as inner:
            model(x)
        assert not model.training and not torch.is_grad_enabled()
    assert model.training and torch.is_grad_enabled()
    assert hook_counts(model) == before
    assert outer.num_forwards == 2 and inner.num_forwards == 1
    torch.testing.assert_close(outer.activations["blocks.1"][4:], inner.activations["blocks.1"])


def test_eval_mode_is_on_while_capturing_and_can_be_left_off() -> None:
    model = Net()
    model.train()
    x = torch.randn(64, 4)
    with capture(model, "head") as rec:
        model(x)
        model(x)
    first, second = rec.activations["head"].split(64)
    torch.testing.assert_close(first, second)  # dropout off
    with capture(model, "head", eval_mode=False) as rec_train:
        assert model.training
        model(x)
        model(x)
    first, second = rec_train.activations["head"].split(64)
    assert not torch.allclose(first, second)


def test_grad_true_keeps_the_graph_and_grad_false_detaches() -> None:
    model = Net()
    x = torch.randn(5, 4)
    with torch.no_grad():
        with capture(model, ["blocks.2"], grad=True) as rec:
            assert torch.is_grad_enabled()
            out = model(x)
        assert not torch.is_grad_enabled()  # the surrounding no_grad is back
    rows = rec.activations["blocks.2"]
    assert rows.requires_grad and out.requires_grad
    rows.pow(2).sum().backward()
    assert model.stem.weight.grad is not None and model.stem.weight.grad.abs().sum() > 0
    assert model.head.weight.grad is None  # the head comes after the captured block

    with capture(model, ["blocks.2"]) as plain:
        model(x)
        with torch.enable_grad():
            model(x)  # the user turned grad back on: rows are still detached
    assert not plain.activations["blocks.2"].requires_grad


# ------------------------------------------------------------------------------------------------------------
# streaming
# ------------------------------------------------------------------------------------------------------------
def test_on_batch_streams_each_forward_and_keep_false_stores_nothing() -> None:
    model = Net()
    batches = [torch.randn(n, 4) for n in (3, 5, 2)]
    streamed: list[dict[str, torch.Tensor]] = []
    with capture(model, ["blocks.*"], on_batch=streamed.append, keep=False) as rec:
        for x in batches:
            model(x)
    with capture(model, ["blocks.*"]) as kept:
        for x in batches:
            model(x)
    assert [batch["blocks.0"].shape[0] for batch in streamed] == [3, 5, 2]
    for name in kept.layers:
        torch.testing.assert_close(torch.cat([batch[name] for batch in streamed]), kept.activations[name])
    with pytest.raises(RepsimError, match="keep=False"):
        rec.activations  # noqa: B018
    assert rec.num_rows == dict.fromkeys(rec.layers, 10)
    with pytest.raises(RepsimError, match="on_batch"):
        capture(model, "head", keep=False)


def test_activations_before_any_forward_fail_clearly() -> None:
    model = Net()
    with capture(model, "head") as rec:
        pass
    assert rec.layers == ["head"]
    with pytest.raises(RepsimError, match="no forward"):
        rec.activations  # noqa: B018


def test_rec_forward_runs_a_loader_batch_and_clear_drops_rows() -> None:
    model = Net()
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 0, 1])
    with capture(model, "head") as rec:
        out = rec.forward((x, y))
        assert out.shape == (4, 2)
        rec.clear()
        rec.forward(x)
    assert rec.activations["head"].shape == (4, 2)
    with pytest.raises(RepsimError, match="inside"):
        rec.forward(x)


def test_policy_is_plain_json() -> None:
    model = Net()
    with capture(model, ["stem", "head"], tokens="cls", spatial="mean") as rec:
        model(torch.randn(2, 4))
    policy = json.loads(json.dumps(rec.policy))
    assert policy["tokens"] == "cls" and policy["spatial"] == "mean"
    assert policy["layout"] == {"stem": None, "head": None}
    assert policy["rows"] == {"stem": "input", "head": "input"}
    assert policy["adapter"] == "generic"


# ------------------------------------------------------------------------------------------------------------
# generic adapter
# ------------------------------------------------------------------------------------------------------------
def test_generic_adapter_splits_batches_and_finds_the_main_output() -> None:
    adapter = for_model(Net())
    x, y = torch.randn(2, 4), torch.tensor([1, 0])
    assert adapter.split_batch(x) == (x, None)
    inputs, labels = adapter.split_batch((x, y))
    assert inputs is x and labels is y
    inputs, labels = adapter.split_batch({"x": x, "labels": y})
    assert set(inputs) == {"x"} and labels is y
    with pytest.raises(RepsimError, match="ambiguous"):
        adapter.split_batch((x, y, y))
    assert adapter.main_output(x) is x
    assert adapter.main_output((x, y)) is x
    assert adapter.main_output({"loss": torch.tensor(0.0), "logits": x}) is x
    with pytest.raises(RepsimError):
        adapter.main_output("text")
    assert adapter.attention_mask({"attention_mask": y}) is y and adapter.attention_mask(x) is None
    with pytest.raises(RepsimError, match="explicitly"):
        for_model(nn.Linear(2, 2)).default_layers()


def test_fingerprint_tracks_every_value_buffer_and_dtype() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    base = for_model(model).fingerprint()
    assert base.startswith("sha256:") and len(base) == len("sha256:") + 64
    clone = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert for_model(clone).fingerprint() != base
    clone.load_state_dict(model.state_dict())
    assert for_model(clone).fingerprint() == base
    with torch.no_grad():
        clone[0].weight[1, 2] = torch.nextafter(clone[0].weight[1, 2], torch.tensor(1.0))
    assert for_model(clone).fingerprint() != base
    clone.load_state_dict(model.state_dict())
    clone[1].running_mean += 1e-3  # buffers count
    assert for_model(clone).fingerprint() != base
    clone.load_state_dict(model.state_dict())
    assert for_model(clone.double()).fingerprint() != base


IMPORT_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import repsim_plugin as rp
    import repsim_plugin.adapters
    from repsim_plugin.capture import capture
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    with rp.capture(model, "0") as rec:
        model(torch.randn(4, 2))
    assert rec.activations["0"].shape == (4, 3)
    assert rp.adapters.for_model(model).name == "generic"
    print(sorted(m for m in ("transformers", "timm") if m in sys.modules))
    torch.manual_seed(123)
    print(rp.adapters.for_model(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))).fingerprint())
    """
)


def test_a_fresh_process_imports_no_transformers_or_timm_and_fingerprints_alike() -> None:
    result = subprocess.run([sys.executable, "-c", IMPORT_SCRIPT], capture_output=True, text=True, check=True)
    imported, fingerprint = result.stdout.strip().splitlines()[-2:]
    assert imported == "[]"
    torch.manual_seed(123)
    assert fingerprint == for_model(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))).fingerprint()


def test_adapter_can_be_forced_by_name_class_or_instance() -> None:
    class ChannelsLast(GenericAdapter):
        name = "channels-last"
        spatial_layout = "NHWC"

        def default_layers(self) -> list[str]:
            return ["to_nhwc"]

    model = ConvNet(channels_last_out=True)
    x = torch.randn(2, 3, 4, 5)
    with capture(model, adapter=ChannelsLast, spatial="mean") as rec:
        out = model(x)
    assert rec.layers == ["to_nhwc"] and rec.policy["layout"] == {"to_nhwc": "NHWC"}
    assert rec.policy["adapter"] == "channels-last"
    torch.testing.assert_close(rec.activations["to_nhwc"], out.mean((1, 2)))
    instance = ChannelsLast(model)
    assert for_model(model, instance) is instance
    assert isinstance(for_model(model, "generic"), GenericAdapter)
    with pytest.raises(RepsimError, match="another model"):
        for_model(Net(), instance)


def test_outputs_written_in_place_later_in_the_forward_are_captured_as_the_module_returned_them() -> None:
    """torchvision's ResNet runs ReLU(inplace=True) on bn1's output and adds the shortcut into bn2's output in
    place: the captured rows must be what each module returned, not what the rest of the forward left there."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    layers = ["bn1", "layer1.0.bn2", "layer1.0", "fc"]
    truth: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda m, i, out, name=name: truth.__setitem__(name, out.detach().clone())
        )
        for name in layers
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    assert float(truth["bn1"].min()) < 0  # before the in-place ReLU
    with rp.capture(model, layers) as rec, torch.no_grad():
        model(x)
    for name in layers:
        assert torch.equal(rec.activations[name], truth[name].flatten(1)), name
    a = rp.compare(model, None, [x[:3], x[3:]], ["bn1", "layer1.0.bn2"], progress=False)
    ref = rp.similarity(truth["bn1"].flatten(1), truth["layer1.0.bn2"].flatten(1))
    assert float(a.values[0, 1]) == pytest.approx(ref, abs=1e-10)


def test_with_grad_an_output_written_in_place_later_is_reported() -> None:
    """grad=True keeps the live output (gradients flow to it), so a later in-place write cannot be undone: warned."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    warned = pytest.warns(rp.errors.RepsimWarning, match="'bn1' was written in place")
    with warned as seen, rp.capture(model, ["bn1", "layer1.0"], grad=True) as rec:
        model(x)
    assert not any("layer1.0'" in str(w.message) for w in seen)  # a block's output is not written into
    assert rec.activations["bn1"].requires_grad
