"""The paper's Section 4.3 (Davari et al., ICLR 2023) on the digits CNN: its CKA map over relu1, relu2, relu3 moved
to each of the paper's targets while test accuracy stays within a point.

Targets: identity (each layer unlike the others), first layer equal to the last with the other entries held at their
current values, a cartoon pattern, and another network's map (the CNN trained with seed 1). Every number is
recomputed here with plain torch forwards and a float64 linear CKA written in this file (not the library's), on the
450 test digits that neither the training nor the shift saw, and on inverted digits ``1 - x`` (carry-over to data
of another kind). The mechanism the paper reports for low-CKA shifts is measured too: one principal direction
comes to dominate the layer and part of one class forms its extreme tail. The shifted models are computed once per
module (``shifted``) and shared between the tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from repsim_plugin.adversarial import shift
from repsim_plugin.digits import train_digits_cnn

pytestmark = [
    pytest.mark.filterwarnings("ignore::repsim_plugin.errors.SmallSampleBiasWarning"),
    pytest.mark.usefixtures("one_thread"),  # conftest.py: tiny models train faster and reproducibly on one thread
]

LAYERS = ["relu1", "relu2", "relu3"]

#: The arguments passed to ``shift`` per target, beyond ``target_map`` / ``map_layers`` / ``progress=False``.
#: identity: the defaults reach it (test map error 0.583 -> 0.025) but test accuracy falls 0.971 -> 0.951 (2 points);
#: a tighter output criterion (``tolerance=0.005``: held-out accuracy at most half a point below the original's) and
#: a larger starting lambda keep it within a point. first=last / other net: the mean map error starts small (only two
#: entries move, or the two maps are alike), so the defaults stop as soon as the mean is within 0.025 with entry
#: [0, -1] still at 0.92; ``target_tolerance=0.01`` makes them move the entries that differ.
SHIFT_ARGS: dict[str, dict[str, float]] = {
    "identity": {"tolerance": 0.005, "lambda_init": 30.0},
    "first_last": {"tolerance": 0.005, "target_tolerance": 0.01},
    "cartoon": {},
    "other_net": {"tolerance": 0.005, "target_tolerance": 0.01},
}


# --- independent references ---------------------------------------------------------------------------------------


def cka64(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA in float64 numpy: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) on column-centred data."""
    A, B = X.double().numpy(), Y.double().numpy()
    A, B = A - A.mean(0), B - B.mean(0)
    return float(np.linalg.norm(B.T @ A) ** 2 / (np.linalg.norm(A.T @ A) * np.linalg.norm(B.T @ B)))


@torch.no_grad()
def layer_rows(model: nn.Module, X: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each of LAYERS' outputs (flattened) and the logits, by forward hooks of this test's own."""
    seen: dict[str, torch.Tensor] = {}

    def grab(name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
            seen[name] = output.flatten(1)

        return hook

    handles = [model.get_submodule(name).register_forward_hook(grab(name)) for name in LAYERS]
    try:
        logits = model(X)
    finally:
        for handle in handles:
            handle.remove()
    return [seen[name] for name in LAYERS], logits


def cka_map(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """The (3, 3) float64 CKA map of LAYERS on X."""
    H, _ = layer_rows(model, X)
    return torch.tensor([[cka64(a, b) for b in H] for a in H], dtype=torch.float64)


def map_error(M: torch.Tensor, target: torch.Tensor) -> float:
    """Mean absolute difference over all entries (the targets here have no free entries)."""
    return float((M - target).abs().mean())


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).double().mean())


def pc1_share(H: torch.Tensor) -> float:
    """Share of the variance along the first principal direction (float64 SVD of the centred rows)."""
    A = H.double().numpy()
    s = np.linalg.svd(A - A.mean(0), compute_uv=False)
    return float(s[0] ** 2 / (s**2).sum())


def pc1_tail(H: torch.Tensor, y: torch.Tensor, k: int) -> tuple[int, int]:
    """(class, count): the most common class among the k samples with the most extreme projection on PC1."""
    A = H.double().numpy()
    A = A - A.mean(0)
    _, _, vt = np.linalg.svd(A, full_matrices=False)
    projection = A @ vt[0]
    projection = projection * np.sign(projection[np.argmax(np.abs(projection))])  # the extreme tail is positive
    tail = y.numpy()[np.argsort(-projection)[:k]]
    classes, counts = np.unique(tail, return_counts=True)
    return int(classes[counts.argmax()]), int(counts.max())


# --- the models and the shifts, once per module -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnns() -> dict[str, object]:
    model, split = train_digits_cnn(seed=0)
    other, _ = train_digits_cnn(seed=1)
    Xtr = split[0]
    current = cka_map(model, Xtr)
    first_last = current.clone()
    first_last[0, -1] = first_last[-1, 0] = 1.0  # first layer equal to the last, the rest held where it is
    targets = {
        "identity": torch.eye(3, dtype=torch.float64),
        "first_last": first_last,
        "cartoon": torch.tensor([[1, 0.3, 0.9], [0.3, 1, 0.3], [0.9, 0.3, 1]], dtype=torch.float64),
        "other_net": cka_map(other, Xtr),  # the seed-1 CNN's map, on the same training digits
    }
    return {"model": model, "split": split, "targets": targets}


@pytest.fixture(scope="module")
def shifted(cnns) -> Callable[[str], dict[str, object]]:
    """``shifted(name)``: the shift toward target ``name`` (computed on first use) and its seconds."""
    done: dict[str, dict[str, object]] = {}

    def get(name: str) -> dict[str, object]:
        if name not in done:
            Xtr, ytr, _, _ = cnns["split"]
            target = cnns["targets"][name]
            started = time.perf_counter()
            result = shift(
                cnns["model"], None, (Xtr, ytr), target_map=target, map_layers=LAYERS, progress=False,
                **SHIFT_ARGS[name],
            )  # fmt: skip
            done[name] = {"result": result, "target": target, "seconds": time.perf_counter() - started}
        return done[name]

    return get


# --- each target reached, accuracy within a point, on the test digits -----------------------------------------------

#: per target: (test map error before at least, after at most, inverted-digits error after / before at most)
BARS = {
    "identity": (0.5, 0.05, 0.3),  # measured 0.583 -> 0.021; inverted 0.570 -> 0.106
    "first_last": (0.03, 0.02, 0.8),  # measured
    "cartoon": (0.2, 0.05, 0.5),  # measured 0.277 -> 0.013; inverted 0.260 -> 0.062
    "other_net": (0.01, 0.007, 0.9),  # measured
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHIFT_ARGS))
def test_each_target_map_is_reached_with_test_accuracy_within_a_point(name, cnns, shifted):
    run = shifted(name)
    result, target = run["result"], run["target"]
    model = cnns["model"]
    _, _, Xte, yte = cnns["split"]
    assert result.reached and result.map_error_after <= result.target_tolerance

    before, after = cka_map(model, Xte), cka_map(result.model, Xte)
    at_least, at_most, carry = BARS[name]
    assert map_error(before, target) >= at_least
    assert map_error(after, target) <= at_most
    acc_before, acc_after = accuracy(model, Xte, yte), accuracy(result.model, Xte, yte)
    assert acc_before - acc_after <= 0.01

    # carry-over: on inverted digits (never used by the shift, another kind of input) the map moves too
    inverted = [map_error(cka_map(m, 1 - Xte), target) for m in (model, result.model)]
    assert inverted[1] <= carry * inverted[0]
