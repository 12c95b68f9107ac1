"""Streaming CKA: throughput against one-shot CKA, sharing in layer maps, accuracy against naive accumulators.

Run: ``.venv/bin/python benchmarks/bench_streaming.py [--quick] [--json out.json]``. Speed is measured here, never
asserted in tests. torchmetrics (1.9) has no CKA metric, so the torchmetrics line times our own
``TorchmetricsLinearCKA`` wrapper against the plain accumulator it packs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from collections.abc import Callable

import torch

from repsim_plugin.errors import SmallSampleBiasWarning
from repsim_plugin.measures.cka import linear_cka
from repsim_plugin.streaming import LinearCKA, LinearCKAMap, MinibatchCKAMap, SampleSpaceCKAMap

warnings.simplefilter("ignore", SmallSampleBiasWarning)
DEVICE = torch.device("cpu")


def dev(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()  # warm-up (allocator, kernels)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def batches(X: torch.Tensor, size: int):
    for i in range(0, X.shape[0], size):
        yield i, min(i + size, X.shape[0])


def bench_pair(n: int, d: int, batch: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    X = torch.relu(torch.randn(n, d, generator=g)) + 1e4
    Y = dev(torch.relu(X[:, : d // 2].repeat(1, 2) - 1e4 + 0.5 * torch.randn(n, d, generator=g)) + 1e4)
    X = dev(X)
    rows = []
    for debiased in (False, True):

        def streamed(debiased: bool = debiased) -> torch.Tensor:
            acc = LinearCKA(debiased=debiased)
            for i, j in batches(X, batch):
                acc.update(X[i:j], Y[i:j])
            return acc.compute()

        def one_shot(debiased: bool = debiased) -> torch.Tensor:
            return linear_cka(X.double(), Y.double(), debiased=debiased, space="feature")

        t_stream, t_once = best_of(streamed), best_of(one_shot)
        rows.append(
            {
                "case": f"pair n={n} p=q={d} batch={batch} {'debiased' if debiased else 'biased'}",
                "streaming_s": t_stream,
                "one_shot_s": t_once,
                "streaming_rows_per_s": n / t_stream,
                "abs_diff": abs(float(streamed()) - float(one_shot())),
                "state_MiB": LinearCKA.memory_bytes(d, d, debiased=debiased) / 2**20,
                "one_shot_inputs_MiB": 2 * n * d * 8 / 2**20,
            }
        )
    return rows


def bench_map(n: int, layers: int, d: int, batch: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    acts = {}
    h = torch.randn(n, d, generator=g)
    W = torch.randn(d, d, generator=g) / d**0.5
    for i in range(layers):
        h = torch.relu(h @ W + 0.1 * torch.randn(n, d, generator=g))
        acts[f"layer{i}"] = dev(h)
    rows = []

    def shared_same() -> torch.Tensor:
        m = LinearCKAMap(same=True)
        for i, j in batches(h, batch):
            m.update({k: v[i:j] for k, v in acts.items()})
        return m.compute()

    def shared_two() -> torch.Tensor:
        m = LinearCKAMap(same=False)
        for i, j in batches(h, batch):
            part = {k: v[i:j] for k, v in acts.items()}
            m.update(part, dict(part))
        return m.compute()

    def per_pair() -> torch.Tensor:
        accs = {(a, b): LinearCKA() for a in acts for b in acts}
        for i, j in batches(h, batch):
            for (a, b), acc in accs.items():
                acc.update(acts[a][i:j], acts[b][i:j])
        return torch.stack([acc.compute() for acc in accs.values()]).reshape(layers, layers)

    def minibatch_map() -> torch.Tensor:
        m = MinibatchCKAMap(same=True)
        for i, j in batches(h, batch):
            if j - i >= 4:
                m.update({k: v[i:j] for k, v in acts.items()})
        return m.compute()

    t_same, t_two, t_mb = best_of(shared_same, 2), best_of(shared_two, 2), best_of(minibatch_map, 2)
    t_pair = best_of(per_pair, 1)
    diff = float((shared_same() - per_pair()).abs().max())
    dims = [d] * layers
    rows.append(
        {
            "case": f"map {layers}x{layers} layers d={d} n={n} batch={batch}",
            "same_model_map_s": t_same,
            "two_sided_map_s": t_two,
            "per_pair_accumulators_s": t_pair,
            "minibatch_map_s": t_mb,
            "max_abs_diff_same_vs_per_pair": diff,
            "state_same_MiB": LinearCKAMap.memory_bytes(dims) / 2**20,
            "state_two_sided_MiB": LinearCKAMap.memory_bytes(dims, dims) / 2**20,
            "state_per_pair_MiB": layers * layers * LinearCKA.memory_bytes(d, d) / 2**20,
        }
    )
    return rows


def bench_accuracy(n: int, d: int, batch: int) -> list[dict]:
    """float32 activations with a 1e4 offset: naive X^T X - n mu mu^T accumulators against ours."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    X = (torch.relu(base) + 1e4).float()
    Y = (torch.relu(base @ torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5) + 1e4).float()
    truth = float(linear_cka(X.double(), Y.double()))

    def naive(dtype: torch.dtype) -> float:
        sx = torch.zeros(d, dtype=dtype)
        sy = torch.zeros(d, dtype=dtype)
        xx = torch.zeros(d, d, dtype=dtype)
        yy = torch.zeros(d, d, dtype=dtype)
        xy = torch.zeros(d, d, dtype=dtype)
        for i, j in batches(X, batch):
            a, b = X[i:j].to(dtype), Y[i:j].to(dtype)
            sx += a.sum(0)
            sy += b.sum(0)
            xx += a.T @ a
            yy += b.T @ b
            xy += a.T @ b
        mx, my = sx / n, sy / n
        cxx, cyy, cxy = xx - n * torch.outer(mx, mx), yy - n * torch.outer(my, my), xy - n * torch.outer(mx, my)
        return float((cxy**2).sum() / torch.sqrt((cxx**2).sum() * (cyy**2).sum()))

    acc = LinearCKA()
    for i, j in batches(X, batch):
        acc.update(X[i:j], Y[i:j])
    return [
        {
            "case": f"accuracy n={n} d={d} float32 + 1e4 offset, batch={batch}",
            "true_cka": truth,
            "naive_float32_abs_err": abs(naive(torch.float32) - truth),
            "naive_float64_abs_err": abs(naive(torch.float64) - truth),
            "streaming_abs_err": abs(float(acc.compute()) - truth),
        }
    ]


def bench_torchmetrics(n: int, d: int, batch: int) -> list[dict]:
    try:
        from repsim_plugin.streaming import TorchmetricsLinearCKA
    except ModuleNotFoundError:
        return [{"case": "torchmetrics not installed"}]
    g = torch.Generator().manual_seed(3)
    X, Y = dev(torch.randn(n, d, generator=g)), dev(torch.randn(n, d, generator=g))

    def wrapped() -> torch.Tensor:
        m = TorchmetricsLinearCKA(d, d).to(DEVICE)
        for i, j in batches(X, batch):
            m.update(X[i:j], Y[i:j])
        return m.compute()

    def plain() -> torch.Tensor:
        acc = LinearCKA()
        for i, j in batches(X, batch):
            acc.update(X[i:j], Y[i:j])
        return acc.compute()

    return [
        {
            "case": f"torchmetrics wrapper n={n} d={d} batch={batch}",
            "TorchmetricsLinearCKA_s": best_of(wrapped),
            "LinearCKA_s": best_of(plain),
            "abs_diff": abs(float(wrapped()) - float(plain())),
        }
    ]


def check_device(n: int = 3000) -> list[dict]:
    """On DEVICE, every estimator against float64 one-shot CKA computed on the CPU from the same values."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(n, 48, generator=g, dtype=torch.float64)
    acts32 = {
        "relu_1e4": (torch.relu(base[:, :32]) + 1e4).float(),
        "mix": (torch.tanh(base) @ torch.randn(48, 40, generator=g, dtype=torch.float64) + 1e3).float(),
        "narrow": (base[:, :5] ** 2).float(),
    }
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        acts = acts32
        if dtype != torch.float32:  # a 1e4 offset is beyond half precision's resolution: use a smaller one
            acts = {k: (v.double() - (1e4 if k == "relu_1e4" else 1e3) + 30).to(dtype) for k, v in acts32.items()}
        cpu64 = {k: v.double() for k, v in acts.items()}
        names = list(acts)

        def reference(rows_n: int, debiased: bool, cpu64=cpu64, names=names) -> torch.Tensor:
            return torch.tensor(
                [
                    [float(linear_cka(cpu64[a][:rows_n], cpu64[b][:rows_n], debiased=debiased)) for b in names]
                    for a in names
                ],
                dtype=torch.float64,
            )

        on_dev = {k: dev(v) for k, v in acts.items()}
        for debiased in (False, True):
            ref = reference(n, debiased)
            worst = {}
            for batch in (1, 7, 256):
                rows_n = 300 if batch == 1 else n
                ref_b = ref if rows_n == n else reference(rows_n, debiased)
                same, two = LinearCKAMap(debiased, same=True), LinearCKAMap(debiased, same=False)
                pair = LinearCKA(debiased)
                for i in range(0, rows_n, batch):
                    j = min(i + batch, rows_n)
                    part = {k: v[i:j] for k, v in on_dev.items()}
                    same.update(part)
                    two.update(part, dict(reversed(list(part.items()))))
                    pair.update(part["relu_1e4"], part["mix"])
                M, T = same.compute().cpu(), two.compute().cpu()
                worst[f"same_b{batch}"] = float((M - ref_b).abs().max())
                worst[f"two_b{batch}"] = float((T - ref_b.flip(1)).abs().max())
                worst[f"pair_b{batch}"] = abs(float(pair.compute()) - float(ref_b[0, 1]))
            ss = SampleSpaceCKAMap(debiased)
            for i in range(0, 600, 64):
                ss.update({k: v[i : min(i + 64, 600)] for k, v in on_dev.items()})
            worst["sample_space"] = float((ss.compute().cpu() - reference(600, debiased)).abs().max())
            # state saved on the device, restored and continued on the CPU
            half = LinearCKAMap(debiased, same=True)
            half.update({k: v[: n // 2] for k, v in on_dev.items()})
            state = half.state_dict()
            state["tensors"] = {k: v.cpu() for k, v in state["tensors"].items()}
            moved = LinearCKAMap(debiased)
            moved.load_state_dict(state)
            moved.update({k: v[n // 2 :] for k, v in acts.items()})
            worst["device_to_cpu_state"] = float((moved.compute() - ref).abs().max())
            label = str(dtype).replace("torch.", "")
            rows.append(
                {"case": f"device check {DEVICE} {label} debiased={debiased}"}
                | worst
                | {"max_abs_err": max(worst.values())}
            )
    mb, mb_cpu = MinibatchCKAMap(same=True), MinibatchCKAMap(same=True)
    for i in range(0, n - n % 64, 64):
        mb.update({k: dev(v[i : i + 64]) for k, v in acts32.items()})
        mb_cpu.update({k: v[i : i + 64] for k, v in acts32.items()})
    rows.append(
        {
            "case": f"device check {DEVICE} minibatch map vs CPU",
            "max_abs_err": float((mb.compute().cpu() - mb_cpu.compute()).abs().max()),
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--check-only", action="store_true", help="only the device correctness check")
    parser.add_argument("--scale", type=int, default=1, help="multiply n of the throughput cases")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    q = args.quick
    rows = check_device() if DEVICE.type != "cpu" or args.check_only else []
    if args.check_only:
        for row in rows:
            print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        return
    rows += bench_pair((4096 if q else 16384) * args.scale, 256 if q else 512, 256)
    rows += bench_map((2048 if q else 4096) * args.scale, 8, 128 if q else 256, 128)
    rows += bench_accuracy(4096, 64, 128)
    rows += bench_torchmetrics(4096, 128, 128)
    header = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
    }
    print(json.dumps(header))
    for row in rows:
        print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"env": header, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
