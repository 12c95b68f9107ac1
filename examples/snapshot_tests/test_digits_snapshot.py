"""Representation snapshot tests with the ``repsim_snapshot`` fixture (the pytest plugin of repsim-plugin).

The test stores what four layers of a digits CNN compute on 200 held-out digits (spatial maps averaged: a 100 kB
snapshot) in ``__repsim_snapshots__/`` and, on later runs, fails when any layer's linear CKA with its snapshot falls
below 0.99: a refactor, a dependency upgrade or a quantized build that changes what a layer computes is caught, and
the message names the layer.

    pytest examples/snapshot_tests                     # checks the committed snapshot
    pytest examples/snapshot_tests --repsim-update     # (re)writes it
    REPSIM_EXAMPLE_REPLACE=fc2 pytest examples/snapshot_tests   # replaces fc2's weights: fails naming fc2

The model here is built from a fixed seed so that the example is self-contained; a real suite builds the model
under test from its checkpoint.
"""

from __future__ import annotations

import os

import torch

from repsim_plugin.digits import build_digits_cnn, load_digits_split


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = build_digits_cnn().eval()
    replaced = os.environ.get("REPSIM_EXAMPLE_REPLACE")
    if replaced:  # simulate a regression: one layer's weights replaced by fresh ones
        torch.manual_seed(1)
        layer = getattr(model, replaced)
        with torch.no_grad():
            layer.weight.copy_(torch.randn_like(layer.weight) * layer.weight.std())
    return model


def test_digits_cnn_representations(repsim_snapshot) -> None:
    _, _, images, _ = load_digits_split()
    repsim_snapshot.assert_match(
        _model(), images[:200], ["relu1", "relu2", "fc1", "fc2"], min_similarity=0.99, spatial="mean"
    )
