"""Time of one resume-state save next to one batch, on the W2 workload (two timm resnet18, 8 x 8 layer map).

    python benchmarks/resume_save.py [--batches 6] [--batch-size 128] [--image-size 64]

Every batch is saved (``save_every=1``) so that each save is timed; the save of batch k writes the state of k
batches (for the sample-space estimator: every kept row), so the table shows how the cost grows.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import repsim_plugin as rp
from repsim_plugin.compare import resume as resume_mod


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--estimator", default="auto")
    args = parser.parse_args()
    import timm

    torch.manual_seed(0)
    a, b = (timm.create_model("resnet18", pretrained=False).eval() for _ in range(2))
    layers = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g) for _ in range(args.batches)]
    saves: list[tuple[float, int]] = []
    original = resume_mod.Resume.save

    def timed(self: resume_mod.Resume, engine: object) -> None:
        start = time.perf_counter()
        original(self, engine)
        saves.append((time.perf_counter() - start, self.path.stat().st_size))

    resume_mod.Resume.save = timed  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        plain = rp.compare(a, b, data, layers, layers, progress=False, estimator=args.estimator)
        per_batch = (time.perf_counter() - start) / args.batches
        saves.clear()
        start = time.perf_counter()
        rp.compare(a, b, data, layers, layers, progress=False, estimator=args.estimator,
                   resume_from=Path(folder) / "s.pt", save_every=1)  # fmt: skip
        with_saves = time.perf_counter() - start
    print(f"estimator {plain.estimator}; {args.batches} batches of {args.batch_size} x 3 x {args.image_size}^2")
    print(f"one batch (2 forwards + 64 map updates): {per_batch * 1e3:.0f} ms")
    print("| save after batch | state file | save time | save / batch |")
    print("|---|---|---|---|")
    for k, (seconds, size) in enumerate(saves[: args.batches], 1):
        print(f"| {k} | {size / 2**20:.1f} MiB | {seconds * 1e3:.0f} ms | {seconds / per_batch:.2f} |")
    print(f"whole run: {per_batch * args.batches:.2f} s without saves, {with_saves:.2f} s saving every batch")


if __name__ == "__main__":
    main()
