"""Extending capture: a token policy is one function, an adapter is one file; misuse of a recorder's state."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import repsim_plugin as rp
from repsim_plugin.capture import (
    SPATIAL_POLICIES,
    TOKEN_POLICIES,
    TokenBatch,
    capture,
    reduce_output,
    token_policy,
)
from repsim_plugin.errors import RepsimError, StateError, UnknownNameError


# ------------------------------------------------------------------------------------------------------------
# token policies
# ------------------------------------------------------------------------------------------------------------
def test_the_policy_lists_are_the_registered_names_in_order() -> None:
    assert TOKEN_POLICIES == ("mean", "cls", "last", "flatten", "as_samples")
    assert SPATIAL_POLICIES == ("flatten", "mean", "as_samples")
    assert list(TOKEN_POLICIES) == ["mean", "cls", "last", "flatten", "as_samples"] and len(SPATIAL_POLICIES) == 3
    assert "mean" in TOKEN_POLICIES and 3 not in TOKEN_POLICIES and [] not in TOKEN_POLICIES
    assert repr(SPATIAL_POLICIES) == "('flatten', 'mean', 'as_samples')"


def test_a_throwaway_token_policy_is_one_decorated_function() -> None:
    @token_policy("throwaway_max")
    def max_over_real_tokens(batch: TokenBatch) -> torch.Tensor:
        return batch.tensor.masked_fill(~batch.body.unsqueeze(-1), float("-inf")).amax(dim=1)

    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    x = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    try:
        assert TOKEN_POLICIES[-1] == "throwaway_max"  # the list imported before registration is current
        with rp.capture(model, "0", tokens="throwaway_max", attention_mask=mask) as rec:
            model(x)
        with torch.no_grad():
            hidden = model[0](x)
        expected = torch.stack([hidden[i, : int(mask[i].sum())].amax(dim=0) for i in range(3)])
        torch.testing.assert_close(rec.activations["0"], expected, rtol=0, atol=0)
        assert rec.policy["tokens"] == "throwaway_max" and rec.policy["rows"] == {"0": "input"}
        torch.testing.assert_close(reduce_output(hidden, "NLC", tokens="throwaway_max", mask=mask), expected)
        with pytest.raises(RepsimError, match="already registered"):
            token_policy("throwaway_max")(max_over_real_tokens)
    finally:
        token_policy.unregister("throwaway_max")
    assert "throwaway_max" not in TOKEN_POLICIES
    with pytest.raises(UnknownNameError, match="throwaway_max"):
        capture(model, "0", tokens="throwaway_max")
    with pytest.raises(UnknownNameError, match="unknown tokens policy 'throwaway_max'"):
        reduce_output(torch.randn(2, 3, 4), "NLC", tokens="throwaway_max")


# ------------------------------------------------------------------------------------------------------------
# adapters
# ------------------------------------------------------------------------------------------------------------
TOY_ADAPTER = textwrap.dedent(
    '''
    from torch import nn
    from repsim_plugin.adapters.base import Adapter


    class ToyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.body(x))


    class ToyAdapter(Adapter):
        """The throwaway family: its models are ToyNets; by default only the head is captured."""

        name = "toy"
        aliases = ("toy-family",)
        priority = 15

        @classmethod
        def matches(cls, model):
            return type(model).__name__ == "ToyNet"

        def default_layers(self):
            return ["head"]
    '''
)


def test_an_adapter_file_dropped_into_the_package_is_discovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import repsim_plugin.adapters as adapters

    (tmp_path / "toy_family.py").write_text(TOY_ADAPTER)
    monkeypatch.setattr(adapters, "__path__", [*adapters.__path__, str(tmp_path)])
    try:
        found = adapters.discover()
        assert [cls.name for cls in found] == ["huggingface", "toy", "timm", "generic"]  # by priority
        toy = found[1]
        assert toy.__module__ == "repsim_plugin.adapters.toy_family" and toy.aliases == ("toy-family",)
        assert (adapters.HuggingFaceAdapter, adapters.TimmAdapter, adapters.GenericAdapter) == adapters.BUILTIN_ADAPTERS
    finally:
        sys.modules.pop("repsim_plugin.adapters.toy_family", None)


def test_a_registered_adapter_from_another_module_is_tried_first(tmp_path: Path) -> None:
    path = tmp_path / "toy_adapter_plugin.py"
    path.write_text(TOY_ADAPTER)
    spec = importlib.util.spec_from_file_location("toy_adapter_plugin", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.ToyNet()
    assert type(rp.adapters.for_model(model)) is rp.adapters.GenericAdapter
    rp.adapters.register(module.ToyAdapter)
    try:
        assert rp.adapters.ADAPTERS[0] is module.ToyAdapter
        assert type(rp.adapters.for_model(model)) is module.ToyAdapter
        assert type(rp.adapters.for_model(model, "toy-family")) is module.ToyAdapter
        assert type(rp.adapters.for_model(nn.Linear(2, 2))) is rp.adapters.GenericAdapter
        with rp.capture(model) as rec:
            model(torch.randn(5, 3))
        assert rec.layers == ["head"] and rec.policy["adapter"] == "toy"
    finally:
        rp.adapters.unregister(module.ToyAdapter)
    assert module.ToyAdapter not in rp.adapters.ADAPTERS
    assert type(rp.adapters.for_model(model)) is rp.adapters.GenericAdapter
    with pytest.raises(UnknownNameError, match=r"unknown adapter 'toy'; known: auto, huggingface, hf, transformers"):
        rp.adapters.for_model(model, "toy")  # the name is gone with the adapter
    with pytest.raises(RepsimError, match="Adapter subclass"):
        rp.adapters.register(int)  # type: ignore[arg-type]


def test_register_can_name_an_adapter_and_the_builtin_name_comes_back() -> None:
    class MyHF(rp.adapters.GenericAdapter):
        name = "my-hf"

    rp.adapters.register(MyHF, name="huggingface")
    try:
        assert type(rp.adapters.for_model(nn.Linear(2, 2), "huggingface")) is MyHF
    finally:
        rp.adapters.unregister(MyHF)
    assert type(rp.adapters.for_model(nn.Linear(2, 2), "huggingface")) is rp.adapters.HuggingFaceAdapter


# ------------------------------------------------------------------------------------------------------------
# state misuse
# ------------------------------------------------------------------------------------------------------------
def test_misusing_a_recorders_state_raises_state_error() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    rec = capture(model, "1")
    with pytest.raises(StateError, match="no forward"):
        rec.activations  # noqa: B018
    with pytest.raises(StateError, match="inside"):
        rec.forward(torch.randn(2, 4))
    with rec:
        with pytest.raises(StateError, match="already active"):
            rec.start()
        model(torch.randn(2, 4))
    assert rec.activations["1"].shape == (2, 2)
    streamed = capture(model, "1", keep=False, on_batch=lambda rows: None)
    with streamed:
        model(torch.randn(2, 4))
    with pytest.raises(StateError, match="keep=False"):
        streamed.activations  # noqa: B018
    assert issubclass(StateError, RuntimeError) and issubclass(StateError, RepsimError)
