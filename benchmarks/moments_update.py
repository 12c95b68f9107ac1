"""Feature-space streaming updates of W2's shape: what ``spatial="mean"`` adds to each batch of the forward passes.

Two sides of W2's eight resnet18 block widths (64, 64, 128, 128, 256, 256, 512, 512: 1920 features a side), eight
batches of 128 rows into one ``LinearCKAMap``, biased and debiased; the best of ``--repeats`` fills. To compare two
checkouts, run it from each (``PYTHONPATH=<tree>`` from a directory outside both), alternating.

Run: ``.venv/bin/python benchmarks/moments_update.py [--quick] [--repeats 15]``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

import repsim_plugin as rp
from repsim_plugin.errors import SmallSampleBiasWarning
from repsim_plugin.streaming import LinearCKAMap

WIDTHS = (64, 64, 128, 128, 256, 256, 512, 512)


def fill_seconds(debiased: bool, repeats: int, quick: bool) -> float:
    """Best time of ``repeats`` fills of a fresh two-sided map with the same batches."""
    g = torch.Generator().manual_seed(0)
    widths, rows, count = (WIDTHS[:4], 32, 3) if quick else (WIDTHS, 128, 8)
    batches = [
        tuple({f"{side}{i}": torch.rand(rows, d, generator=g) for i, d in enumerate(widths)} for side in "ab")
        for _ in range(count)
    ]
    best = float("inf")
    for _ in range(repeats + 1):  # the first fill warms the allocator and the BLAS up
        start = time.perf_counter()
        acc = LinearCKAMap(debiased)
        for acts_a, acts_b in batches:
            acc.update(acts_a, acts_b)
        best = min(best, time.perf_counter() - start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleBiasWarning)
        acc.compute()
    return best


def main(argv: list[str] | None = None) -> dict[str, float | str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=15, help="timed fills; the best is reported")
    args = parser.parse_args(argv)
    out: dict[str, float | str] = {"package": rp.__file__}
    for debiased in (False, True):
        out["debiased" if debiased else "biased"] = fill_seconds(debiased, args.repeats, args.quick)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
