"""The Grams of an exact sample-space map, formed one layer after another on all threads or two side by side.

W2's 16 layers (two resnet18, 1024 rows; 2048-16384 features) as float32 rows in one ``SampleSpaceCKAMap``:
the time of its Gram phase (``_form_grams``, what ``compute()`` spends nearly all its time in) with the layers one
after another on all of torch's threads (``split_threads`` made sequential) and two side by side on half the
threads each (the default), alternating, best of ``--repeats``; and whether the two give the same bits. Half the
time of a full float32 ``D @ D.T`` per layer, the GEMM bound of the Grams, is timed in the same run.

Run: ``.venv/bin/python benchmarks/gram_threads.py [--quick] [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from unittest import mock

import torch

import repsim_plugin as rp
from repsim_plugin.streaming import SampleSpaceCKAMap

WIDTHS = (16384, 16384, 8192, 8192, 4096, 4096, 2048, 2048)


def _one_after_another(tasks: list[Callable[[int], None]], device: torch.device) -> None:
    for task in tasks:
        task(0)


def main(argv: list[str] | None = None) -> dict[str, float | bool | str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds; the best of each is reported")
    args = parser.parse_args(argv)
    n, widths = (256, (2048, 1024)) if args.quick else (1024, WIDTHS)
    g = torch.Generator().manual_seed(0)
    sides = [{f"{side}{i}": torch.rand(n, d, generator=g) for i, d in enumerate(widths)} for side in "ab"]
    acc = SampleSpaceCKAMap(copy=False)
    acc.update(*sides)
    stores = [(acc._rows_a, acc._labels[0]), (acc._rows_b, acc._labels[1])]
    best = {"one_after_another_s": float("inf"), "side_by_side_s": float("inf"), "gemm_bound_s": float("inf")}
    grams: dict[str, list[torch.Tensor]] = {}
    for _ in range(args.repeats + 1):  # the first round warms the allocator and the BLAS up
        for name in ("one_after_another_s", "side_by_side_s"):
            sequential = name == "one_after_another_s"
            target = "repsim_plugin.streaming.sample_space.split_threads"
            with mock.patch(target, _one_after_another) if sequential else contextlib.nullcontext():
                start = time.perf_counter()
                grams[name] = acc._form_grams(stores)
                best[name] = min(best[name], time.perf_counter() - start)
        start = time.perf_counter()
        for side in sides:
            for D in side.values():
                D @ D.T
        best["gemm_bound_s"] = min(best["gemm_bound_s"], (time.perf_counter() - start) / 2)
    same = all(torch.equal(a, b) for a, b in zip(grams["one_after_another_s"], grams["side_by_side_s"], strict=True))
    out: dict[str, float | bool | str] = {"package": rp.__file__, "threads": torch.get_num_threads(), **best}
    out["same_bits"] = same
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
