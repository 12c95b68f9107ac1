"""``make bench`` in its quick mode: the workloads run and write markdown + JSON (timings are never asserted)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workloads():
    """``benchmarks/workloads.py`` as a module (the folder is not a package)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import workloads
    finally:
        sys.path.pop(0)
    return workloads


def test_quick_benchmark_writes_markdown_and_json(workloads, tmp_path):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    argv = ["--quick", "--rounds", "1", "--only", "W1,W4", "--json", str(out_json), "--markdown", str(out_md)]
    assert workloads.main(argv) == 0
    doc = json.loads(out_json.read_text())
    w1, w4 = doc["results"]
    names = {r["name"]: r for r in w1["rows"]}
    assert names["ours cka"]["abs_error_vs_float64"] < 1e-8
    assert names["ours debiased_cka"]["abs_error_vs_float64"] < 1e-8
    assert names["GEMM bound (3 float32 products)"]["x_bound"] == 1.0
    assert set(workloads.PEERS) <= set(names) | set(w1["not_run"])  # every peer is run or says why not
    assert {r["name"] for r in w4["rows"]} >= {"ours rp.stats.permutation_test"}
    text = out_md.read_text()
    assert "### W1" in text and "### W4" in text and "| ours cka |" in text
    assert "not run: x: why" in workloads.markdown({"workload": "W3", "rows": [], "not_run": {"x": "why"}})


def test_w2_ratio_to_pytorch_cka_per_round_and_on_first_calls(workloads):
    ours = [{"seconds": 3.3}, {"seconds": 4.0}, {"seconds": 3.6}]
    peer = [{"seconds": 3.0}, {"error": "failed"}, {"seconds": 2.4}]  # round 2 of the peer failed: left out
    by_round = workloads._ratios_by_round(ours, peer)
    assert by_round == [3.3 / 3.0, 3.6 / 2.4]
    assert workloads._ratios_by_round(ours, None) is None
    firsts = [{"first_call_seconds": t} for t in (3.0, 4.0, 3.5)], [{"first_call_seconds": t} for t in (2.0, 3.0)]
    assert workloads._first_call_ratio(*firsts) == 3.5 / 2.5
    text = workloads.markdown({"workload": "W2", "rows": [], "ours_default_vs_pytorch_cka_by_round": by_round})
    assert "ours_default_vs_pytorch_cka_by_round: 1.1, 1.5" in text


def test_w2_summary_pairs_rounds_and_judges_minibatch_against_pytorch_cka(workloads):
    """W2's ratios from the children's timings (synthetic results in place of the timed processes)."""
    seconds = {  # per configuration, one entry per round; round 3 had a load spike on ours' side
        "forward only": [3.0, 3.1, 3.2],
        "forward only" + workloads.RETAINED: [2.0, 2.0, 2.2],
        workloads.W2_KEPT_ROWS: [2.2, 2.3, 2.3],
        workloads.W2_GEMM_BOUND: [0.6, 0.6, 0.7],
        workloads.W2_OURS: [3.3, 3.4, 4.4],
        workloads.W2_MINIBATCH: [2.7, 2.8, 2.9],
        "pytorch-cka": [3.0, 3.2, 3.3],
    }
    calls: dict[str, int] = {}

    same_process = {  # ours' time outside the forwards, and the GEMM bound timed in the same process
        "statistics_seconds": [0.9, 1.0, 1.5],
        "gemm_bound_same_process_seconds": [0.6, 0.8, 1.0],
    }

    def child(workload, config, quick):
        assert workload == "W2" and quick is False
        k = calls[config] = calls.get(config, 0) + 1
        out = {"config": config, "seconds": seconds[config][k - 1], "first_call_seconds": 9.0, "peak_rss_mib": 1.0}
        if config == workloads.W2_OURS:
            out.update({key: values[k - 1] for key, values in same_process.items()})
        return out

    result = workloads.w2(False, 3, list(seconds), run_child=child)
    assert calls == dict.fromkeys(seconds, 3)
    assert result["ours_default_vs_pytorch_cka"] == pytest.approx(3.4 / 3.2)
    assert result["ours_default_vs_pytorch_cka_by_round"] == pytest.approx([3.3 / 3.0, 3.4 / 3.2, 4.4 / 3.3])
    assert result["ours_default_vs_pytorch_cka_median_of_rounds"] == pytest.approx(3.3 / 3.0)
    assert result["ours_minibatch_vs_pytorch_cka"] == pytest.approx(2.8 / 3.2)
    overheads = {r["name"]: r["overhead_over_forward"] for r in result["rows"]}
    assert overheads[workloads.W2_OURS] == pytest.approx(3.4 / 2.0 - 1)  # against the forward on its own heap
    assert overheads["pytorch-cka"] == pytest.approx(3.2 / 3.1 - 1)
    assert overheads[workloads.W2_KEPT_ROWS] == pytest.approx(2.3 / 2.0 - 1)  # what keeping the rows costs
    assert result["exact_floor_seconds"] == pytest.approx(2.3 + 0.6)  # the forwards keeping rows + the products
    assert result["exact_floor_vs_pytorch_cka"] == pytest.approx(2.9 / 3.2)
    assert result["ours_default_vs_exact_floor"] == pytest.approx(3.4 / 2.9)
    assert result["ours_default_statistics_vs_gemm_bound_by_round"] == pytest.approx([1.5, 1.25, 1.5])
    assert result["ours_default_statistics_vs_gemm_bound_same_process"] == pytest.approx(1.5)
    statistics_rows = {r["name"]: r["statistics_seconds"] for r in result["rows"]}
    assert statistics_rows[workloads.W2_OURS] == pytest.approx(1.0)
    assert statistics_rows["pytorch-cka"] is None
    text = workloads.markdown(result)
    assert "ours_default_vs_pytorch_cka_median_of_rounds: 1.1" in text
    assert "ours_minibatch_vs_pytorch_cka: 0.875" in text
    assert "exact_floor_vs_pytorch_cka: 0.906" in text
    assert "ours_default_statistics_vs_gemm_bound_by_round: 1.5, 1.25, 1.5" in text


def test_forward_clock_times_the_models_forwards_alone_and_removes_its_hooks(workloads):
    """The W2 children's split of a call into the forwards and the rest, on a real small model."""
    import time

    import torch

    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    x = torch.randn(512, 64)
    clock = workloads._ForwardClock([model])
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
        time.sleep(0.05)  # work outside the forward: not counted
        model(x)
    total = time.perf_counter() - start
    assert 0 < clock.seconds < total - 0.05
    clock.seconds = 0.0
    clock.remove()
    model(x)
    assert clock.seconds == 0.0 and not model._forward_hooks and not model._forward_pre_hooks


def test_w5_summary_sets_one_pass_against_pytorch_cka_pair_by_pair(workloads):
    """W5's ratios from synthetic children; a configuration that failed is listed, not timed."""
    w5 = workloads.w5_checkpoints
    seconds = {w5.FORWARD: [7.0, 7.2], w5.OURS: [12.0, 12.4], w5.OURS_MINIBATCH: [9.0, 9.4], w5.PEER: [25.0, 26.0]}

    def child(workload, config, quick):
        assert workload == "W5" and quick is False
        times = seconds[config]
        return {"config": config, "seconds": times.pop(0), "peak_rss_mib": 2.0, "estimator": "sample_space"}

    result = w5.summarise(False, 2, child)
    assert result["ours_checkpoints_vs_pytorch_cka_pairwise"] == pytest.approx(12.2 / 25.5)
    assert result["ours_minibatch_checkpoints_vs_pytorch_cka_pairwise"] == pytest.approx(9.2 / 25.5)
    overheads = {r["name"]: r["overhead_over_forward"] for r in result["rows"]}
    assert overheads[w5.OURS] == pytest.approx(12.2 / 7.1 - 1) and overheads[w5.FORWARD] is None
    assert "ours_checkpoints_vs_pytorch_cka_pairwise: 0.478" in workloads.markdown(result)
    seconds.update({w5.FORWARD: [7.0], w5.OURS: [12.0], w5.OURS_MINIBATCH: [9.0]})

    def peer_fails(workload, config, quick):
        return {"config": config, "error": "no peer"} if config == w5.PEER else child(workload, config, quick)

    failed = w5.summarise(False, 1, peer_fails)
    assert failed["not_run"] == {w5.PEER: "no peer"} and failed["ours_checkpoints_vs_pytorch_cka_pairwise"] is None


def _gpu_check_on_cpu(*flags: str) -> str:
    """``benchmarks/gpu_check.py`` run on the CPU (``GPU_CHECK_DEVICE=cpu``): the script itself is checked here, so a
    lent GPU's few minutes are not spent finding its bugs."""
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *flags]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_device_check_script_passes_on_the_cpu():
    out = _gpu_check_on_cpu()
    assert "FAIL" not in out and sum(line.startswith("ok   ") for line in out.splitlines()) == 5  # its 5 checks
    assert out.rstrip().endswith("all device checks passed")


@pytest.mark.slow
def test_device_performance_script_runs_every_step_on_small_sizes():
    out = _gpu_check_on_cpu("--perf", "--quick")
    errors = [float(e) for e in re.findall(r"\|fast - float64\| (\S+)", out)]
    assert len(errors) == 2 and max(errors) < 1e-8  # W1: cka and debiased_cka, each against float64
    for label in ("forward passes", "default (exact)", "minibatch", "spatial=mean"):
        assert f"W2 {label}: " in out
    assert re.search(r"ViT-B/16 12 x 12 block map, 4 images: forward \S+ s, compare \S+ s", out)


def _quick_json(script: str) -> dict:
    """Run ``benchmarks/<script>`` in its quick mode with one repeat; its last line of output, as JSON."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--repeats", "1"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_moments_update_benchmark_times_both_forms_on_small_sizes():
    out = _quick_json("moments_update.py")
    assert out["biased"] > 0 and out["debiased"] > 0 and out["package"].endswith("__init__.py")


def test_gram_threads_benchmark_times_both_schedules_with_the_same_bits():
    out = _quick_json("gram_threads.py")
    assert out["same_bits"] is True
    assert min(out["one_after_another_s"], out["side_by_side_s"], out["gemm_bound_s"]) > 0
