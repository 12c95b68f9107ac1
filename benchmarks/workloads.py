"""The five workloads of the performance issue, ours against the GEMM bound and against the peer libraries.

W1  linear CKA of X (10000 x 2048) vs Y (10000 x 1024), float32 input: the GEMM bound (Xc^T Yc, Xc^T Xc, Yc^T Yc
    in float32), ours (biased, debiased, full float64; and on Y = X's first 1024 features + 1% noise) and the
    peers that take matrices; values against float64.
W2  8 x 8 block map of two timm resnet18 (zero_init_last=False, seeds 0 / 1), 1024 random 3x64x64 images in
    batches of 128: forward passes alone, ours (default exact, minibatch, spatial="mean") and the peers' maps; time,
    overhead over the forward, peak RSS, max difference from the exact float64 map. One fresh process per
    configuration and round: its first call, then the median of W2_WARM_CALLS warm calls (the "seconds"). Our
    calls also report the time outside the models' forwards ("statistics_seconds"); the default's process times
    the GEMM bound after its calls, so their ratio needs no second process (the forwards swing between processes).
W3  rp.streaming.LinearCKA over n rows (d = 256, batches of 10k): time and peak RSS per n, one process each,
    beside the peak RSS of generating the same batches alone.
W4  permutation test of linear CKA (n = 2000, d = 512, 1000 permutations) against its GEMM bound.
W5  four resnet18 checkpoints in every pair on W2's data and layers: ``compare_checkpoints`` (one pass, the
    checkpoints' rows, Grams and hashes shared by the pairs) against pytorch-cka pair by pair (w5_checkpoints.py).

Timings are medians of interleaved rounds in one run (the machine may be shared): compare ratios, not seconds.
Peers come from the optional ``bench`` extra (``pip install -e ".[bench]"``); a peer that cannot be imported or
run is listed with the reason. ``--quick`` shrinks every size (seconds in all; the test suite smoke-runs it).

Run: ``python benchmarks/workloads.py [--quick] [--only W1,W2] [--rounds 3] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import w5_checkpoints  # W5, beside this file

warnings.simplefilter("ignore")
PEERS = {"pytorch-cka": "cka", "ckatorch": "ckatorch", "torch-cka": "torch_cka", "cka-pytorch": "cka_pytorch"}


def _peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM (per address space, so reset by exec, unlike ru_maxrss, which
    Linux carries over from the parent image)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peer(name: str) -> Any:
    import importlib

    return importlib.import_module(PEERS[name])


def _median_times(fns: dict[str, Callable[[], Any]], rounds: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Interleaved rounds (one warm-up first); a function that raises is reported, not timed."""
    values, errors = {}, {}
    for name, fn in list(fns.items()):
        try:
            values[name] = fn()
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
            fns.pop(name)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}, {"values": values, "errors": errors}


# --- W1 ----------------------------------------------------------------------------------------------------------


NEAR = "ours cka, Y = X[:, :q] + 1% noise"


def w1(quick: bool, rounds: int) -> dict[str, Any]:
    import repsim_plugin as rp

    n, p, q = (1500, 256, 160) if quick else (10000, 2048, 1024)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, p, generator=g)
    Y = X[:, :q] @ torch.randn(q, q, generator=g) / q**0.5 + torch.randn(n, q, generator=g)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    # features that nearly coincide (a layer against its slightly changed copy): the hardest case for float32 products
    Y_near = X[:, :q] + 0.01 * torch.randn(n, q, generator=g)
    cka, dcka = rp.measures.make("cka"), rp.measures.make("debiased_cka")
    full = rp.measures.make("cka", dtype=torch.float64)
    fns: dict[str, Callable[[], Any]] = {
        "GEMM bound (3 float32 products)": lambda: (Xc.T @ Yc, Xc.T @ Xc, Yc.T @ Yc),
        "ours cka": lambda: float(cka(X, Y)),
        "ours debiased_cka": lambda: float(dcka(X, Y)),
        NEAR: lambda: float(cka(X, Y_near)),
        "ours cka dtype=float64": lambda: float(full(X, Y)),
    }
    missing = {}
    for peer, call in {
        "pytorch-cka": lambda m: float(m.cka_from_features(X, Y)),
        "ckatorch": lambda m: float(m.cka_base(X, Y)),
        "torch-cka": None,
        "cka-pytorch": None,
    }.items():
        try:
            module = _peer(peer)
        except Exception as exc:
            missing[peer] = f"not installed ({type(exc).__name__})"
            continue
        if call is None:
            missing[peer] = "has no function on matrices (model hooks only)"
            continue
        fns[peer] = lambda call=call, module=module: call(module)
    times, info = _median_times(fns, rounds)
    X64, Y64 = X.double(), Y.double()
    exact = float(rp.measures.cka.linear_cka(X64, Y64))
    exact_d = float(rp.measures.cka.linear_cka(X64, Y64, debiased=True))
    exact_near = float(rp.measures.cka.linear_cka(X64, Y_near.double()))
    bound = times["GEMM bound (3 float32 products)"]
    rows = []
    for name, seconds in times.items():
        value = info["values"].get(name)
        # pytorch-cka's cka_from_features uses the unbiased HSIC (it matches debiased CKA, not CKA)
        reference = exact_d if ("debiased" in name or name == "pytorch-cka") else exact
        reference = exact_near if name == NEAR else reference
        rows.append(
            {
                "name": name,
                "seconds": seconds,
                "x_bound": seconds / bound,
                "value": value if isinstance(value, float) else None,
                "abs_error_vs_float64": abs(value - reference) if isinstance(value, float) else None,
            }
        )
    fastest_peer = min((times[k] for k in PEERS if k in times), default=None)
    return {
        "workload": "W1",
        "shape": [n, p, q],
        "rows": rows,
        "speedup_vs_fastest_peer": None if fastest_peer is None else fastest_peer / times["ours cka"],
        "not_run": {**missing, **info["errors"]},
    }


# --- W2 ----------------------------------------------------------------------------------------------------------

W2_LAYERS = ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"]
W2_GEMM_BOUND = "GEMM bound of the Grams (float32, half of D D^T per layer)"
#: The same products on oneDNN's float32 kernels (every layer, whatever its width): the fastest GEMM torch carries
W2_GEMM_BOUND_ONEDNN = "GEMM bound of the Grams on oneDNN (float32, half of D D^T per layer)"
W2_BOUNDS = (W2_GEMM_BOUND, W2_GEMM_BOUND_ONEDNN)
#: Suffix of the configurations run inside ``retained_heap`` (the freed-memory policy our compare runs under), so
#: that ours is also set against the forward passes and pytorch-cka without glibc's page-fault churn.
RETAINED = " (retained heap)"
#: Suffix of our configurations run with the retained heap switched off (glibc's own policy, as before it).
HEAP_OFF = " REPSIM_RETAIN_HEAP=0"
#: Suffix of our default with its long products on oneDNN (opt-in: faster here, but it rounds worse).
ONEDNN_ON = " REPSIM_ONEDNN=1"
W2_OURS = "ours default (cka, exact, spatial=flatten)"
W2_MINIBATCH = "ours debiased_cka estimator=minibatch"
#: The forward passes on the retained heap with every W2 layer's output cloned and kept, as an exact sample-space map
#: must keep them: with the GEMM bound, the floor of any exact map of this workload (``exact_floor_vs_pytorch_cka``).
W2_KEPT_ROWS = "forward only, rows kept" + RETAINED
W2_CONFIGS = [
    "forward only",
    "forward only" + RETAINED,
    W2_KEPT_ROWS,
    W2_GEMM_BOUND,
    W2_GEMM_BOUND_ONEDNN,
    W2_OURS,
    W2_OURS + ONEDNN_ON,
    W2_OURS + HEAP_OFF,
    W2_MINIBATCH,
    W2_MINIBATCH + HEAP_OFF,
    "ours cka spatial=mean",
    "ours cka spatial=mean" + HEAP_OFF,
    "ours exact float64 (reference)",
    "pytorch-cka",
    "pytorch-cka" + RETAINED,
    "torch-cka",
    "cka-pytorch",
    "ckatorch",
]


#: Calls timed after the first one in each W2 child: a fresh process's first call carries one-off costs (page
#: faults, kernel selection) that swing from process to process by more than the overheads measured (0.3-1 s).
W2_WARM_CALLS = 3


def _w2_child(config: str, quick: bool) -> dict[str, Any]:
    import timm

    import repsim_plugin as rp

    n_images, size = (128, 32) if quick else (1024, 64)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False).eval())
    a, b = models
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(min(128, n_images), 3, size, size, generator=g) for _ in range(max(1, n_images // 128))]
    if quick:
        data = [x[:64] for x in data] + [x[64:] for x in data]
    images = torch.cat(data)
    labelled = torch.utils.data.TensorDataset(images, torch.zeros(len(images), dtype=torch.long))
    loader = torch.utils.data.DataLoader(labelled, batch_size=data[0].shape[0])
    bare = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=data[0].shape[0])
    with torch.no_grad():
        a(data[0][:4])
        b(data[0][:4])

    def bound_rows() -> list[torch.Tensor]:
        with torch.no_grad():
            widths = [int(h.shape[1]) for m in models for h in _w2_layer_rows(m, data[0][:2])]
        return [torch.randn(len(images), d, generator=g) for d in widths]

    if config in W2_BOUNDS:  # the multiply-adds an exact sample-space map cannot avoid: n^2 d / 2 per layer
        rows = bound_rows()
        from repsim_plugin._utils.gemm import onednn_inner_product

        inner = onednn_inner_product() if config == W2_GEMM_BOUND_ONEDNN else None
        if config == W2_GEMM_BOUND_ONEDNN and inner is None:
            raise RuntimeError("this torch has no float32-exact oneDNN inner product")
        product = (lambda a, b: a @ b.T) if inner is None else inner
        product(rows[0], rows[0])  # warm the BLAS up

    def run() -> Any:
        if config in W2_BOUNDS:
            for D in rows:
                product(D, D)
            return None
        if config.startswith("forward only"):
            kept: list[torch.Tensor] = []
            hooks = [] if config != W2_KEPT_ROWS else _keep_outputs(models, kept)
            try:
                with torch.no_grad():
                    for x in data:
                        a(x)
                        b(x)
            finally:
                for h in hooks:
                    h.remove()
            return None
        if config.startswith("ours"):
            kw: dict[str, Any] = {}
            if "minibatch" in config:
                kw = {"measure": "debiased_cka", "estimator": "minibatch"}
            elif "mean" in config:
                kw = {"spatial": "mean"}
            elif "float64" in config:
                kw = {"measure": rp.measures.make("cka", dtype=torch.float64)}
            return rp.compare(a, b, data, W2_LAYERS, W2_LAYERS, progress=False, **kw).values
        if config.startswith("pytorch-cka"):
            cka = _peer("pytorch-cka")
            return cka.compute_cka(a, b, loader, layers=W2_LAYERS, model2_layers=W2_LAYERS, progress=False)[0]
        if config == "torch-cka":
            c = _peer(config).CKA(a, b, model1_layers=W2_LAYERS, model2_layers=W2_LAYERS, device="cpu")
            c.compare(loader)
            return c.export()["CKA"]
        if config == "cka-pytorch":
            calc = _peer(config).CKACalculator(a, b, W2_LAYERS, W2_LAYERS, verbose=False, hook_recursive=False)
            return calc.calculate_cka_matrix(loader, num_epochs=1)
        if config == "ckatorch":
            return _peer(config).CKA(a, b, W2_LAYERS, W2_LAYERS)(bare, epochs=1)
        raise ValueError(config)

    from repsim_plugin._utils import gemm
    from repsim_plugin._utils.heap import OFF_SWITCH, retained_heap

    if config.endswith(HEAP_OFF):
        os.environ[OFF_SWITCH] = "0"
    if config.endswith(ONEDNN_ON):
        os.environ[gemm.SWITCH] = "1"
    times, inside = [], []
    clock = _ForwardClock(models) if config.startswith("ours") else None
    for _ in range(1 + W2_WARM_CALLS):  # the first call in a fresh process, then warm calls (their median)
        start = time.perf_counter()
        if clock is not None:
            clock.seconds = 0.0
        with retained_heap() if config.endswith(RETAINED) else contextlib.nullcontext():
            values = run()
        times.append(time.perf_counter() - start)
        inside.append(None if clock is None else clock.seconds)
    if config in W2_BOUNDS:
        times = [t / 2 for t in times]  # a full product per layer, timed; the symmetric Gram needs half of it
    out = {
        "config": config,
        "seconds": statistics.median(times[1:]),
        "first_call_seconds": times[0],
        "peak_rss_mib": _peak_rss_mib(),
    }
    if clock is not None:
        clock.remove()
        # the time outside the models' forwards (the capture hooks run inside them): the statistics, fingerprints
        # and checks alone, which the forward passes' swings from process to process do not reach
        out["statistics_seconds"] = statistics.median(t - f for t, f in zip(times[1:], inside[1:], strict=True))
    if config == W2_OURS:  # the GEMM bound again, in this process: the statistics' ratio to it needs no other process
        rows = bound_rows()
        (rows[0] @ rows[0].T)  # warm the BLAS up
        bound_times = []
        for _ in range(W2_WARM_CALLS):
            start = time.perf_counter()
            for D in rows:
                D @ D.T
            bound_times.append((time.perf_counter() - start) / 2)
        out["gemm_bound_same_process_seconds"] = statistics.median(bound_times)
    out["values"] = None if values is None else torch.as_tensor(values, dtype=torch.float64).tolist()
    return out


class _ForwardClock:
    """Seconds spent inside the top-level forwards of ``models`` (pre- and post-forward hooks), reset by the caller."""

    def __init__(self, models: list[torch.nn.Module]) -> None:
        self.seconds = 0.0
        self._started: list[float] = []
        self._handles = [
            h for m in models for h in (m.register_forward_pre_hook(self._start), m.register_forward_hook(self._stop))
        ]

    def _start(self, module: torch.nn.Module, args: Any) -> None:
        self._started.append(time.perf_counter())

    def _stop(self, module: torch.nn.Module, args: Any, out: Any) -> None:
        self.seconds += time.perf_counter() - self._started.pop()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    """Median of ``key`` over the rounds that report it (None when none does)."""
    got = [x[key] for x in runs if x.get(key) is not None]
    return statistics.median(got) if got else None


def _ratios_by_round(ours: list[dict[str, Any]] | None, peer: list[dict[str, Any]] | None) -> list[float] | None:
    """``ours / peer`` (warm seconds) of each round in which both ran; None when either is missing."""
    if not ours or not peer:
        return None
    both = [(o, p) for o, p in zip(ours, peer, strict=True) if "error" not in o and "error" not in p]
    return [o["seconds"] / p["seconds"] for o, p in both]


def _first_call_ratio(ours: list[dict[str, Any]] | None, peer: list[dict[str, Any]] | None) -> float | None:
    """Median first call of ``ours`` over that of ``peer`` (each a fresh process); None when either is missing."""
    if not ours or not peer:
        return None
    first = [statistics.median(r["first_call_seconds"] for r in runs if "error" not in r) for runs in (ours, peer)]
    return first[0] / first[1]


def _on_retained_heap(config: str) -> bool:
    """Whether a W2 configuration's forwards run on the retained heap (ours by default, and the RETAINED rows)."""
    return config.endswith(RETAINED) or (config.startswith("ours") and not config.endswith(HEAP_OFF))


def _overhead(config: str, seconds: float, forward: float | None, forward_retained: float | None) -> float | None:
    """Time over the forward passes alone on the same heap policy (None for the GEMM bound or a missing forward)."""
    base = forward_retained if _on_retained_heap(config) else forward
    return None if base is None or config in W2_BOUNDS else seconds / base - 1


def _keep_outputs(models: list[torch.nn.Module], kept: list[torch.Tensor]) -> list[Any]:
    """Hooks that clone every W2 layer's output of ``models`` into ``kept`` (flattened rows); their handles."""

    def keep(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        kept.append(out.detach().flatten(1).clone())

    return [m.get_submodule(name).register_forward_hook(keep) for m in models for name in W2_LAYERS]


def _w2_layer_rows(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The flattened outputs of W2's layers for a few inputs (their widths size the GEMM bound)."""
    seen: list[torch.Tensor] = []
    handles = _keep_outputs([model], seen)
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _child(workload: str, config: str, quick: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", workload, "--config", config] + (["--quick"] if quick else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"config": config, "error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def w2(
    quick: bool,
    rounds: int,
    configs: list[str] | None = None,
    run_child: Callable[[str, str, bool], dict[str, Any]] = _child,
) -> dict[str, Any]:
    """W2's table and ratios; ``run_child(workload, config, quick)`` times one configuration in a fresh process."""
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in (configs or W2_CONFIGS)}
    for _ in range(rounds):  # interleaved: every configuration once per round, each in a fresh process
        for config in runs:
            runs[config].append(run_child("W2", config, quick))
            print(json.dumps({k: v for k, v in runs[config][-1].items() if k != "values"}), file=sys.stderr, flush=True)
    not_run = {c: r[0]["error"] for c, r in runs.items() if "error" in r[0]}
    ok = {c: r for c, r in runs.items() if c not in not_run}
    median = {c: statistics.median(x["seconds"] for x in r) for c, r in ok.items()}
    reference = ok.get("ours exact float64 (reference)", [{}])[0].get("values")
    forward = median.get("forward only")
    forward_retained = median.get("forward only" + RETAINED)
    rows = []
    for config, r in ok.items():
        values = r[0].get("values")
        diff = None
        if values is not None and reference is not None:
            got, ref = torch.tensor(values, dtype=torch.float64), torch.tensor(reference, dtype=torch.float64)
            diff = float((got - ref).abs().max()) if got.shape == ref.shape else None
            if diff is None:
                not_run[config] = f"its map has shape {tuple(got.shape)}, not {tuple(ref.shape)} (timed, not compared)"
        rows.append(
            {
                "name": config,
                "seconds": median[config],
                "overhead_over_forward": _overhead(config, median[config], forward, forward_retained),
                "first_call_seconds": statistics.median(x["first_call_seconds"] for x in r),
                "peak_rss_mib": max(x["peak_rss_mib"] for x in r),
                "max_abs_diff_vs_exact_float64": diff,
                "statistics_seconds": _median_of(r, "statistics_seconds"),
            }
        )
    peer, peer_retained = median.get("pytorch-cka"), median.get("pytorch-cka" + RETAINED)
    ours = median.get(W2_OURS)
    minibatch = median.get(W2_MINIBATCH)
    by_round = _ratios_by_round(ok.get(W2_OURS), ok.get("pytorch-cka"))
    bound = median.get(W2_GEMM_BOUND)
    bound_onednn = median.get(W2_GEMM_BOUND_ONEDNN)
    kept_rows = median.get(W2_KEPT_ROWS)
    floor = None if not (kept_rows and bound) else kept_rows + bound
    same_process = [
        x["statistics_seconds"] / x["gemm_bound_same_process_seconds"]
        for x in ok.get(W2_OURS, [])
        if x.get("gemm_bound_same_process_seconds")
    ]
    return {
        "workload": "W2",
        "rows": rows,
        "ours_default_vs_pytorch_cka": None if not (peer and ours) else ours / peer,
        # the same ratio in each round (the two processes run one after the other): how far it moves with the load
        "ours_default_vs_pytorch_cka_by_round": by_round,
        # their median: each round's pair ran minutes apart at most, so a slow drift of the load cancels in it
        "ours_default_vs_pytorch_cka_median_of_rounds": statistics.median(by_round) if by_round else None,
        # the first call in a fresh process, what a user running one comparison pays (medians over the rounds)
        "ours_default_vs_pytorch_cka_first_call": _first_call_ratio(ok.get(W2_OURS), ok.get("pytorch-cka")),
        # the same, with pytorch-cka's forwards spared the page-fault churn too (as ours are)
        "ours_default_vs_pytorch_cka_retained_heap": None if not (peer_retained and ours) else ours / peer_retained,
        # the same estimator as pytorch-cka's map (target <= 1)
        "ours_minibatch_vs_pytorch_cka": None if not (peer and minibatch) else minibatch / peer,
        # the statistics' cost (ours - forward, both on the retained heap) against the products the exact Grams
        # need (target <= 1.3)
        "ours_default_overhead_vs_gemm_bound": None
        if not (ours and forward_retained and bound)
        else (ours - forward_retained) / bound,
        # the same target measured inside each process: the time outside the forwards over the GEMM bound timed
        # after them (median over the rounds, and each round), untouched by the forwards' swings between processes
        "ours_default_statistics_vs_gemm_bound_same_process": statistics.median(same_process) if same_process else None,
        "ours_default_statistics_vs_gemm_bound_by_round": same_process or None,
        # the same against the products on oneDNN (ours takes them with REPSIM_ONEDNN=1, layers of 16384+ features)
        "ours_default_overhead_vs_onednn_gemm_bound": None
        if not (ours and forward_retained and bound_onednn)
        else (ours - forward_retained) / bound_onednn,
        # what no exact map of this workload can go below: the forwards keeping the rows, plus the Grams' products
        "exact_floor_seconds": floor,
        "exact_floor_vs_pytorch_cka": None if not (floor and peer) else floor / peer,
        "ours_default_vs_exact_floor": None if not (floor and ours) else ours / floor,
        "not_run": not_run,
    }


# --- W3 ----------------------------------------------------------------------------------------------------------


#: Suffix of a W3 configuration that only generates the batches: the process's memory without the accumulator.
W3_DATA_ONLY = " data only"


def _w3_child(config: str) -> dict[str, Any]:
    """One W3 stream of ``n`` rows (``config``: n, or n + W3_DATA_ONLY); batches generated into reused buffers.

    Fresh tensors per batch (``randn``, ``X @ W``) fragment glibc's heap by themselves: the generation alone
    peaked at 575 MiB for 20k rows and 644 MiB for 1M (AVX2 host, 2026-12-07), which hid the accumulator's own
    memory. Reused buffers keep the data's footprint flat, so the RSS figures are the stream's.
    """
    import repsim_plugin as rp

    data_only = config.endswith(W3_DATA_ONLY)
    n = int(config.removesuffix(W3_DATA_ONLY))
    d, batch = 256, 10000
    acc = rp.streaming.LinearCKA()
    g = torch.Generator().manual_seed(0)
    W = torch.randn(d, d, generator=g) / d**0.5
    X, Y, noise = (torch.empty(batch, d) for _ in range(3))
    start = time.perf_counter()
    for i in range(0, n, batch):
        rows = min(batch, n - i)
        x, y, e = X[:rows], Y[:rows], noise[:rows]
        torch.randn(x.shape, generator=g, out=x)
        torch.randn(e.shape, generator=g, out=e)
        torch.addmm(e, x, W, beta=0.5, out=y)  # Y = X W + 0.5 noise
        if not data_only:
            acc.update(x, y)
    value = None if data_only else float(acc.compute())
    seconds = time.perf_counter() - start
    return {"config": config, "n": n, "seconds": seconds, "value": value, "peak_rss_mib": _peak_rss_mib()}


def w3(quick: bool, rounds: int) -> dict[str, Any]:
    """Per n: the stream's time and peak RSS, with the same batches' generation alone beside it."""
    sizes = [20000, 50000] if quick else [10000, 20000, 100000, 1000000]
    rows = []
    for n in sizes:
        row = _child("W3", str(n), quick)
        data = _child("W3", f"{n}{W3_DATA_ONLY}", quick)
        if "error" not in row:
            row["data_only_peak_rss_mib"] = data.get("peak_rss_mib")
            row["data_only_seconds"] = data.get("seconds")
            rows.append(row)
    base = next((r for r in rows if r["n"] == 20000), rows[0] if rows else None)
    for r in rows:
        r["seconds_per_million_rows"] = r["seconds"] / r["n"] * 1e6
        r["rss_vs_20k"] = None if base is None else r["peak_rss_mib"] / base["peak_rss_mib"]
    return {"workload": "W3", "rows": rows, "not_run": {}}


# --- W4 ----------------------------------------------------------------------------------------------------------


def w4(quick: bool, rounds: int) -> dict[str, Any]:
    import repsim_plugin as rp

    n, d, perms = (300, 64, 50) if quick else (2000, 512, 1000)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5 + torch.randn(
        n, d, generator=g, dtype=torch.float64
    )
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    index = torch.randperm(n, generator=g)
    fns = {
        "GEMM bound (one float64 X~^T P Y~ per permutation)": lambda: [Xc.T @ Yc[index] for _ in range(perms)],
        "ours rp.stats.permutation_test": lambda: rp.stats.permutation_test("cka", X, Y, n_permutations=perms),
    }
    times, info = _median_times(fns, max(1, rounds - 1))
    bound = times["GEMM bound (one float64 X~^T P Y~ per permutation)"]
    rows = [{"name": k, "seconds": v, "x_bound": v / bound} for k, v in times.items()]
    return {"workload": "W4", "shape": [n, d, perms], "rows": rows, "not_run": info["errors"]}


# --- report ----------------------------------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = [f"### {result['workload']}" + (f" {result.get('shape')}" if result.get("shape") else "")]
    if rows:
        keys = [k for k in rows[0] if k not in ("values",)]
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in rows:
            cells = []
            for k in keys:
                v = r.get(k)
                cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
            lines.append("| " + " | ".join(cells) + " |")
    keys = (
        "speedup_vs_fastest_peer",
        "ours_default_vs_pytorch_cka",
        "ours_default_vs_pytorch_cka_median_of_rounds",
        "ours_default_vs_pytorch_cka_first_call",
        "ours_default_vs_pytorch_cka_retained_heap",
        "ours_minibatch_vs_pytorch_cka",
        "ours_default_overhead_vs_gemm_bound",
        "ours_default_statistics_vs_gemm_bound_same_process",
        "exact_floor_vs_pytorch_cka",
        "ours_default_vs_exact_floor",
        "ours_checkpoints_vs_pytorch_cka_pairwise",
        "ours_minibatch_checkpoints_vs_pytorch_cka_pairwise",
    )
    for key in keys:
        if result.get(key) is not None:
            lines.append(f"\n{key}: {result[key]:.3g}")
    for key in ("ours_default_vs_pytorch_cka_by_round", "ours_default_statistics_vs_gemm_bound_by_round"):
        if result.get(key):
            lines.append(f"\n{key}: " + ", ".join(f"{r:.3g}" for r in result[key]))
    for peer, why in result.get("not_run", {}).items():
        lines.append(f"- not run: {peer}: {why}")
    return "\n".join(lines) + "\n"


def w5(quick: bool, rounds: int) -> dict[str, Any]:
    return w5_checkpoints.summarise(quick, rounds, _child)


WORKLOADS = {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "W5": w5}


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: seconds in all (smoke test)")
    parser.add_argument("--only", default="W1,W2,W3,W4,W5", help="comma-separated workloads")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--json", help="write every result here")
    parser.add_argument("--markdown", help="write the tables here")
    parser.add_argument("--w2-configs", help="W2 only: semicolon-separated configurations (default: all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.child == "W5":
            out = w5_checkpoints.child(args.config, args.quick, W2_LAYERS, _peak_rss_mib)
        else:
            out = _w2_child(args.config, args.quick) if args.child == "W2" else _w3_child(args.config)
        print(json.dumps(out))
        return 0
    configs = args.w2_configs.split(";") if args.w2_configs else None
    results = [
        w2(args.quick, args.rounds, configs) if w == "W2" else WORKLOADS[w](args.quick, args.rounds)
        for w in args.only.split(",")
    ]
    text = "\n".join(markdown(r) for r in results)
    print(text)
    doc = {"environment": environment(), "quick": args.quick, "rounds": args.rounds, "results": results}
    from repsim_plugin._utils.io import atomic_write

    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(doc, indent=1)))
    if args.markdown:
        page = f"# Benchmarks\n\nenvironment: {json.dumps(doc['environment'])}\n\n{text}"
        atomic_write(args.markdown, lambda f: f.write(page))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
