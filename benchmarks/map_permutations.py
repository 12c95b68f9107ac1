"""The cost of per-cell permutation p-values on the W2 workload: ``compare`` alone against ``permutations=1000``.

W2: two timm resnet18 (random weights, seeds 0 / 1, zero_init_last=False), 1024 random 3x64x64 images in batches of
128, the 8 x 8 map of their residual blocks, default measure (linear CKA, sample-space estimator).
Run: ``python benchmarks/map_permutations.py [--permutations 1000]``.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

import repsim_plugin as rp

LAYERS = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet18", pretrained=False, zero_init_last=False).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--permutations", type=int, default=1000)
    args = parser.parse_args()
    a, b = _net(0), _net(1)
    g = torch.Generator().manual_seed(0)
    data = [torch.rand(128, 3, 64, 64, generator=g) for _ in range(8)]
    for label, options in [
        ("compare", {}),
        (f"compare, permutations={args.permutations}", {"permutations": args.permutations}),
    ]:
        started = time.perf_counter()
        result = rp.compare(a, b, data, LAYERS, LAYERS, progress=False, seed=0, **options)
        print(f"{label}: {time.perf_counter() - started:.1f} s ({result.estimator})", flush=True)


if __name__ == "__main__":
    main()
