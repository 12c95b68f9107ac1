"""W5: checkpoints compared in every pair, where the pairs can share each checkpoint's work.

Four timm resnet18 checkpoints (zero_init_last=False, seeds 0-3), W2's 1024 random 3x64x64 images in batches of
128 and W2's 8 layers, all 6 pairs: the forward passes alone (each model once per batch), ours
``rp.compare_checkpoints`` (default ``auto``, and ``estimator="minibatch"``), and pytorch-cka pair by pair (one
``compute_cka`` per pair: 12 forwards per batch where ours runs 4). One fresh process per configuration and round,
one call each (what a user runs); the peak RSS is the process's. ``--quick``: 3 checkpoints, 128 images of 32x32.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from itertools import combinations
from typing import Any

import torch

FORWARD = "forward only (each model once per batch)"
OURS = "ours compare_checkpoints (auto)"
OURS_MINIBATCH = "ours compare_checkpoints estimator=minibatch"
PEER = "pytorch-cka, pair by pair"
CONFIGS = [FORWARD, OURS, OURS_MINIBATCH, PEER]


def child(config: str, quick: bool, layers: list[str], peak_rss_mib: Callable[[], float]) -> dict[str, Any]:
    """Time one configuration once in this process."""
    import timm

    import repsim_plugin as rp

    n_models, n_images, size = (3, 128, 32) if quick else (4, 1024, 64)

    def build() -> torch.nn.Module:
        return timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False)

    folder = tempfile.mkdtemp(prefix="w5-")
    paths, models = [], []
    for seed in range(n_models):
        torch.manual_seed(seed)
        model = build().eval()
        paths.append(os.path.join(folder, f"seed{seed}.pt"))
        torch.save(model.state_dict(), paths[-1])
        models.append(model)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(min(128, n_images), 3, size, size, generator=g) for _ in range(max(1, n_images // 128))]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat(data), torch.zeros(n_images, dtype=torch.long)), batch_size=128
    )
    estimator = None
    start = time.perf_counter()
    if config == FORWARD:
        with torch.no_grad():
            for x in data:
                for model in models:
                    model(x)
    elif config in (OURS, OURS_MINIBATCH):
        kw = {"measure": "debiased_cka", "estimator": "minibatch"} if config == OURS_MINIBATCH else {}
        maps = rp.compare_checkpoints(build, paths, data, layers=layers, progress=False, **kw)
        estimator = next(iter(maps.values())).estimator
    elif config == PEER:
        from cka import compute_cka

        for a, b in combinations(models, 2):
            compute_cka(a, b, loader, layers=layers, model2_layers=layers, progress=False)
    else:
        raise ValueError(config)
    seconds = time.perf_counter() - start
    return {"config": config, "seconds": seconds, "peak_rss_mib": peak_rss_mib(), "estimator": estimator}


def summarise(quick: bool, rounds: int, run_child: Callable[[str, str, bool], dict[str, Any]]) -> dict[str, Any]:
    """W5's table and ratios from ``rounds`` interleaved rounds of fresh processes (``run_child``)."""
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    for _ in range(rounds):
        for config in runs:
            runs[config].append(run_child("W5", config, quick))
    not_run = {c: r[0]["error"] for c, r in runs.items() if "error" in r[0]}
    ok = {c: [x for x in r if "error" not in x] for c, r in runs.items() if c not in not_run}
    median = {c: statistics.median(x["seconds"] for x in r) for c, r in ok.items()}
    forward = median.get(FORWARD)
    rows = [
        {
            "name": config,
            "seconds": median[config],
            "overhead_over_forward": None if not forward or config == FORWARD else median[config] / forward - 1,
            "peak_rss_mib": max(x["peak_rss_mib"] for x in r),
            "estimator": r[0].get("estimator"),
        }
        for config, r in ok.items()
    ]
    ours, minibatch, peer = median.get(OURS), median.get(OURS_MINIBATCH), median.get(PEER)
    return {
        "workload": "W5",
        "rows": rows,
        # every pair from one pass (each model once per batch) against the peer's pair-by-pair maps
        "ours_checkpoints_vs_pytorch_cka_pairwise": None if not (ours and peer) else ours / peer,
        "ours_minibatch_checkpoints_vs_pytorch_cka_pairwise": None if not (minibatch and peer) else minibatch / peer,
        "not_run": not_run,
    }
