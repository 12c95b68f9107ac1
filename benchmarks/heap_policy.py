"""W2's default map under both freed-memory policies: time, page faults and RSS held after each call.

``python benchmarks/heap_policy.py`` runs two fresh processes (``REPSIM_RETAIN_HEAP`` on, then ``0``), each timing
four successive ``rp.compare`` calls of W2 (two timm resnet18, 1024 images of 3x64x64 in batches of 128, 8 x 8
block map), and prints per call: seconds, user and system CPU seconds, minor page faults, and the process's RSS
after the call returned (what the process keeps of the run). See ``repsim_plugin/_utils/heap.py``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from repsim_plugin._utils.heap import OFF_SWITCH, applies

CALLS = 4


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child() -> None:
    import timm
    import torch
    from workloads import W2_LAYERS

    import repsim_plugin as rp

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False).eval())
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(128, 3, 64, 64, generator=g) for _ in range(8)]
    for call in range(CALLS):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        rp.compare(models[0], models[1], data, W2_LAYERS, W2_LAYERS, progress=False)
        seconds = time.perf_counter() - start
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        row = {
            "heap": "retained" if applies() else "glibc default",
            "call": call + 1,
            "seconds": round(seconds, 3),
            "user_s": round(r1.ru_utime - r0.ru_utime, 2),
            "sys_s": round(r1.ru_stime - r0.ru_stime, 2),
            "minor_faults": r1.ru_minflt - r0.ru_minflt,
            "rss_after_mib": round(_rss_mib()),
        }
        print(json.dumps(row), flush=True)


def main() -> int:
    if "--child" in sys.argv:
        child()
        return 0
    print("| heap | call | seconds | user s | sys s | minor faults | RSS after the call, MiB |")
    print("|---|---|---|---|---|---|---|")
    for value in ("1", "0"):
        env = {**os.environ, OFF_SWITCH: value}
        done = subprocess.run(
            [sys.executable, __file__, "--child"], env=env, capture_output=True, text=True, check=True
        )
        for line in done.stdout.splitlines():
            r = json.loads(line)
            print(f"| {' | '.join(str(v) for v in r.values())} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
