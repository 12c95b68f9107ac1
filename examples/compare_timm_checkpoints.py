"""Checkpoints of a timm model during training, compared layer by layer with the final one (offline).

A timm ``resnet18`` (``pretrained=False``, one input channel, 10 classes) is trained for a few hundred steps on
scikit-learn's bundled digits upscaled to 32x32 (16x16 in quick mode); a checkpoint is saved as safetensors at the
start and at three points of the run. ``rp.checkpoint_trajectory`` then compares each layer the timm adapter names
by default (the stem and the four stages) with the same layer of the final checkpoint, in one pass over held-out
digits: early stages settle first. Writes the trajectory (JSON, PNG) and a page with every checkpoint's map.

Run ``python examples/compare_timm_checkpoints.py [--out timm-out] [--quick]``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from torch import nn

import repsim_plugin as rp
from repsim_plugin.digits import load_digits_split
from repsim_plugin.errors import SmallSampleBiasWarning


def build() -> nn.Module:
    """The architecture every checkpoint belongs to (random weights; nothing is downloaded)."""
    return timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)


def upscale(X: torch.Tensor, size: int) -> torch.Tensor:
    return nn.functional.interpolate(X, size=(size, size), mode="bilinear", align_corners=False)


def train(out: Path, steps: int, size: int, batch: int) -> list[Path]:
    """Train with AdamW; save at step 0 and after 1/3, 2/3 and all of ``steps``."""
    Xtr, ytr, _, _ = load_digits_split()
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    saves = sorted({0, steps // 3, 2 * steps // 3, steps})
    paths = []
    g = torch.Generator().manual_seed(0)
    for step in range(steps + 1):
        if step in saves:
            paths.append(out / f"step{step:04d}.safetensors")
            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(paths[-1]))
        if step == steps:
            break
        model.train()
        idx = torch.randint(len(Xtr), (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(upscale(Xtr[idx], size)), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", default="timm-out", help="folder for the checkpoints, the trajectory and the page")
    parser.add_argument("--quick", action="store_true", help="3 steps on 16x16 images, 48 held-out digits (for tests)")
    args = parser.parse_args()
    out = Path(args.out)
    warnings.simplefilter("ignore", SmallSampleBiasWarning)
    start = time.perf_counter()
    size = 16 if args.quick else 32
    paths = train(out / "checkpoints", steps=3 if args.quick else 300, size=size, batch=16 if args.quick else 64)
    _, _, Xte, yte = load_digits_split()
    n = 48 if args.quick else 256
    data = list(zip(upscale(Xte[:n], size).split(24), yte[:n].split(24), strict=True))
    traj = rp.checkpoint_trajectory(
        build, paths, data, reference=len(paths) - 1, measure="debiased_cka", spatial="mean", progress=False
    )
    print(f"debiased CKA of each layer with {traj.reference} (n={traj.n}, spatial=mean):")
    print(traj.to_dataframe().round(3).to_string())
    traj.save(out / "trajectory.json")
    traj.plot(out / "trajectory.png")
    page = traj.to_html(out / "index.html", title=f"timm resnet18 checkpoints against {traj.reference}")
    print(f"done in {time.perf_counter() - start:.0f} s; open {page.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
