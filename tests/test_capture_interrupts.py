"""A capture interrupted anywhere leaves the model as it was; a second thread on a captured model is refused.

The interrupt is a real ``KeyboardInterrupt`` raised from inside the hook machinery (standing in for a Ctrl-C in a
notebook, which lands between any two bytecodes): at every handle removal of ``stop()``, inside a forward, and in
a layer hook. After each: no hook left, train / eval flags and grad mode as before, parameters bit-identical.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

import repsim_plugin as rp
from repsim_plugin.errors import StateError


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.1), *[nn.Linear(8, 8) for _ in range(6)])
    model.train()
    model[2].eval()  # mixed per-module flags must come back as they were
    return model


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, flags: list[bool], state: dict[str, torch.Tensor]) -> None:
    assert _hooks(model) == 0
    assert _flags(model) == flags
    assert torch.is_grad_enabled()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("interrupt_at", range(1, 12))
def test_an_interrupt_at_any_hook_removal_leaves_nothing_behind(monkeypatch, interrupt_at):
    model = _model()
    flags, state = _flags(model), _state(model)
    original = RemovableHandle.remove
    calls = {"n": 0}

    def flaky_remove(self: RemovableHandle) -> None:
        calls["n"] += 1
        if calls["n"] == interrupt_at:
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(RemovableHandle, "remove", flaky_remove)
    with pytest.raises(KeyboardInterrupt), rp.capture(model, None) as rec:
        model(torch.randn(4, 8))
    monkeypatch.setattr(RemovableHandle, "remove", original)
    if calls["n"] < interrupt_at:
        pytest.skip(f"only {calls['n']} handles to remove")
    _unchanged(model, flags, state)
    for _ in range(3):  # nothing keeps recording the model's later forwards
        model(torch.randn(4, 8))
    assert rec.num_forwards == 1 and not rec.active


def test_an_interrupt_inside_a_forward_or_a_layer_hook_leaves_nothing_behind():
    model = _model()
    flags, state = _flags(model), _state(model)

    def interrupt(module: nn.Module, args: object, output: object) -> None:
        raise KeyboardInterrupt

    handle = model[4].register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), torch.no_grad(), rp.capture(model, ["3", "5"]):
        model(torch.randn(4, 8))
    handle.remove()
    _unchanged(model, flags, state)

    def interrupted_data():
        yield torch.randn(4, 8)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rp.compare(model, None, interrupted_data(), ["3"], progress=False)
    _unchanged(model, flags, state)


def test_a_second_thread_is_refused_and_the_model_is_never_changed():
    model = _model()
    flags, state = _flags(model), _state(model)
    inside, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        with rp.capture(model, ["3"]):
            model(torch.randn(4, 8))
            inside.set()
            release.wait(10)

    def second() -> None:
        inside.wait(10)
        try:
            with rp.capture(model, ["5"]):
                model(torch.randn(4, 8))
        except StateError as error:
            errors.append(error)
        finally:
            release.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(errors) == 1 and "another thread" in str(errors[0]) and "deepcopy" in str(errors[0])
    _unchanged(model, flags, state)
    with rp.capture(model, ["3"]) as rec:  # free again once the first thread is done
        model(torch.randn(4, 8))
    assert rec.activations["3"].shape == (4, 8)


def test_nested_captures_in_one_thread_still_work_and_restore_in_order():
    model = _model()
    flags = _flags(model)
    with rp.capture(model, ["3"]) as outer:
        with rp.capture(model, ["5"]) as inner:
            model(torch.randn(4, 8))
        model(torch.randn(2, 8))
    assert inner.num_forwards == 1 and outer.num_forwards == 2
    assert _flags(model) == flags and _hooks(model) == 0


def test_a_forward_from_another_thread_is_not_recorded():
    model = _model().eval()
    with torch.no_grad(), rp.capture(model, ["3"]) as rec:
        t = threading.Thread(target=lambda: model(torch.randn(7, 8)))
        t.start()
        t.join(10)
        model(torch.randn(4, 8))
    assert rec.num_forwards == 1 and rec.activations["3"].shape == (4, 8)
