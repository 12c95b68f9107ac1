"""rp.compare on two timm resnet18 (8 blocks, 2048 images 3x64x64, batch 128) against the forward passes alone.

Each configuration runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its own; time is the
wall clock of the whole pass over the data (after the models are built). The "forward only" line runs exactly the
same batches through both models under ``no_grad``, without hooks: the ratio column is compare / forward.

Run: ``.venv/bin/python benchmarks/bench_compare.py [--quick] [--device cuda] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings

N_IMAGES, BATCH, SIZE = 2048, 128, 64
LAYERS = ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"]
CONFIGS = {
    "forward only (both models, no hooks)": {},
    "compare cka, spatial=flatten, auto": {"spatial": "flatten"},
    "compare cka, spatial=mean, auto": {"spatial": "mean"},
    "compare debiased_cka, spatial=mean, feature_streaming": {
        "spatial": "mean",
        "measure": "debiased_cka",
        "estimator": "feature_streaming",
    },
    "compare debiased_cka, spatial=flatten, minibatch": {
        "spatial": "flatten",
        "measure": "debiased_cka",
        "estimator": "minibatch",
    },
}


def run_one(name: str, n_images: int, device: str, repeats: int) -> dict:
    import timm
    import torch

    import repsim_plugin as rp

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    a = timm.create_model("resnet18", pretrained=False, num_classes=10).eval().to(device)
    b = timm.create_model("resnet18", pretrained=False, num_classes=10).eval().to(device)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(BATCH, 3, SIZE, SIZE, generator=g) for _ in range(n_images // BATCH)]
    kwargs = CONFIGS[name]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad():  # warm-up: thread pools, allocator, kernels (not timed)
        a(data[0][:8].to(device))
        b(data[0][:8].to(device))
    sync()

    def one_pass() -> str:
        if not kwargs:
            with torch.no_grad():
                for x in data:
                    x = x.to(device)
                    a(x)
                    b(x)
            return "-"
        return rp.compare(a, b, data, LAYERS, LAYERS, progress=False, **kwargs).estimator

    times = []
    for _ in range(repeats):  # best of `repeats`: the machine may be shared
        start = time.perf_counter()
        estimator = one_pass()
        sync()
        times.append(time.perf_counter() - start)
    elapsed = min(times)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return {
        "config": name,
        "estimator": estimator,
        "seconds": elapsed,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": peak_gpu,
        "device": device,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="512 images instead of 2048")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per configuration (the best is kept)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n_images = 512 if args.quick else N_IMAGES
    if args.child:
        print(json.dumps(run_one(args.child, n_images, args.device, args.repeats)))
        return
    rows = []
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--child", name, "--device", args.device, "--repeats", str(args.repeats)]
        cmd += ["--quick"] if args.quick else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    base = rows[0]["seconds"]
    print(
        f"two timm resnet18, {len(LAYERS)} blocks each, {n_images} images 3x{SIZE}x{SIZE}, batch {BATCH}, "
        f"device {args.device}"
    )
    print(
        "| configuration | estimator | time (s) | x forward | peak RSS (MiB) |"
        + (" peak GPU (MiB) |" if args.device != "cpu" else "")
    )
    print("|---|---|---|---|---|" + ("---|" if args.device != "cpu" else ""))
    for r in rows:
        gpu = f" {r['peak_gpu_mib']:.0f} |" if r["peak_gpu_mib"] is not None else ""
        print(
            f"| {r['config']} | {r['estimator']} | {r['seconds']:.2f} | {r['seconds'] / base:.2f} | "
            f"{r['peak_rss_mib']:.0f} |{gpu}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
