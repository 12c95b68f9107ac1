"""Two CPU processes (gloo on loopback) give the one-process result within 1e-10.

The test runs this file as a script twice (``--worker RANK``); each rank streams its own uneven shard, reduces,
and writes its results as JSON; the parent compares them with one-process accumulators and one-shot CKA. The
workers also count ``torch.distributed.all_reduce`` calls (one per state tensor, plus the layout check and the
shift agreement) and check that errors (a rank without data, mismatched layers) raise on *every* rank instead of
hanging.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from gloo_workers import finish, free_port

N = 203
SPLIT = 72  # rank 0 gets rows [0, 72), rank 1 rows [72, 203): uneven shards, different local means
MB = 8  # minibatch rows; SPLIT is a multiple of MB so both ranks see whole batches of the one-process stream
WORLD = 2


def data() -> dict[str, torch.Tensor]:
    """Post-ReLU float32 activations with a 1e4 offset, and a trend so that the shards' means differ."""
    g = torch.Generator().manual_seed(1234)
    base = torch.randn(N, 6, generator=g, dtype=torch.float64)
    base[:, 0] += torch.linspace(-3, 3, N, dtype=torch.float64)
    x = (torch.relu(base) + 1e4).float()
    y = (torch.relu(base[:, :3] @ torch.randn(3, 4, generator=g, dtype=torch.float64)) + 1e4).float()
    z = (torch.tanh(base) @ torch.randn(6, 9, generator=g, dtype=torch.float64) + 300.0).float()
    return {"x": x, "y": y, "z": z}


def _rows(acts: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    return {k: v[lo:hi] for k, v in acts.items()}


def run_all(shard: tuple[int, int], accumulators: dict[str, object]) -> None:
    """Feed the rows [lo, hi) to every accumulator, in the batch pattern each one needs."""
    from repsim_plugin.streaming import LinearCKA, MinibatchCKA

    acts = data()
    lo, hi = shard
    for i in range(lo, hi, 7):
        j = min(i + 7, hi)
        for name in ("biased", "debiased"):
            accumulators[name].update(acts["x"][i:j], acts["y"][i:j])
        accumulators["map_two"].update(_rows(acts, i, j), {"y": acts["y"][i:j], "z": acts["z"][i:j]})
        accumulators["map_same"].update(_rows(acts, i, j))
        accumulators["sample"].update(_rows(acts, i, j))
    for i in range(lo, hi, MB):
        j = min(i + MB, hi)
        if j - i < 4:
            continue
        accumulators["minibatch"].update(acts["x"][i:j], acts["z"][i:j])
        accumulators["minibatch_map"].update(_rows(acts, i, j))
    assert isinstance(accumulators["biased"], LinearCKA) and isinstance(accumulators["minibatch"], MinibatchCKA)


def make_accumulators() -> dict[str, object]:
    from repsim_plugin.streaming import LinearCKA, LinearCKAMap, MinibatchCKA, MinibatchCKAMap, SampleSpaceCKAMap

    return {
        "biased": LinearCKA(),
        "debiased": LinearCKA(debiased=True),
        "map_two": LinearCKAMap(debiased=True, same=False),
        "map_same": LinearCKAMap(same=True),
        "sample": SampleSpaceCKAMap(debiased=True),
        "minibatch": MinibatchCKA("rbf", sigma=0.8),
        "minibatch_map": MinibatchCKAMap(),
    }


def _as_list(t: torch.Tensor) -> object:
    return t.tolist()


# --- worker -----------------------------------------------------------------------------------------------------------


def worker(rank: int, out_dir: Path, mode: str) -> None:
    import torch.distributed as dist

    from repsim_plugin.errors import SmallSampleBiasWarning

    warnings.simplefilter("ignore", SmallSampleBiasWarning)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    shard = (0, SPLIT) if rank == 0 else (SPLIT, N)
    finish(rank, out_dir, core_checks(rank, shard) if mode == "core" else torchmetrics_checks(shard))


def torchmetrics_checks(shard: tuple[int, int]) -> dict[str, object]:
    """torchmetrics' own sync (all_gather of the packed state, then the exact merge) runs inside compute()."""
    from repsim_plugin.streaming import TorchmetricsLinearCKA

    acts = data()
    out = {}
    for debiased in (False, True):
        metric = TorchmetricsLinearCKA(6, 4, debiased=debiased)
        for i in range(shard[0], shard[1], 7):
            metric.update(acts["x"][i : min(i + 7, shard[1])], acts["y"][i : min(i + 7, shard[1])])
        out[str(debiased)] = float(metric.compute())
    return out


def core_checks(rank: int, shard: tuple[int, int]) -> dict[str, object]:
    import torch.distributed as dist

    from repsim_plugin.errors import RepsimError
    from repsim_plugin.streaming import LinearCKA, LinearCKAMap
    from repsim_plugin.streaming._moments import _Moments

    calls: list[str] = []
    original = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(str(tuple(tensor.shape)))
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    out: dict[str, object] = {"rank": rank}

    accs = make_accumulators()
    run_all(shard, accs)
    # compute(sync="auto") reduces a copy: the local state stays local and can keep streaming
    out["auto"] = {name: _as_list(acc.compute()) for name, acc in accs.items()}
    out["local_n_after_auto"] = accs["biased"].n
    out["reduced_after_auto"] = accs["biased"].reduced
    out["local_only"] = float(accs["biased"].compute(sync=False))
    # explicit in-place reduction, then compute does not reduce again
    calls.clear()
    accs["debiased"].all_reduce()
    out["calls_linear"] = len(calls)
    out["expected_calls_linear"] = 2 + sum(
        kind != "center" for *_, kind in _Moments.spec(accs["debiased"]._map._m.a, accs["debiased"]._map._m.b, True)
    )
    calls.clear()
    out["explicit_debiased"] = float(accs["debiased"].compute())
    out["calls_compute_after_reduce"] = len(calls)
    out["n_after_reduce"] = accs["debiased"].n
    for action in ("update", "all_reduce"):
        try:
            if action == "update":
                accs["debiased"].update(torch.randn(4, 6), torch.randn(4, 4))
            else:
                accs["debiased"].all_reduce()
            out[f"error_{action}"] = None
        except RepsimError as err:
            out[f"error_{action}"] = str(err)
    accs["map_same"].all_reduce()
    out["explicit_map_same"] = _as_list(accs["map_same"].compute())

    # a rank without any batch: both ranks raise (no hang)
    empty = LinearCKA()
    if rank == 0:
        empty.update(torch.randn(5, 6), torch.randn(5, 4))
    try:
        empty.all_reduce()
        out["error_empty_rank"] = None
    except RepsimError as err:
        out["error_empty_rank"] = str(err)
    # ranks with different layers: both raise
    mismatched = LinearCKAMap()
    mismatched.update({"x": torch.randn(5, 3 + rank)})
    try:
        mismatched.all_reduce()
        out["error_mismatch"] = None
    except RepsimError as err:
        out["error_mismatch"] = str(err)

    dist.all_reduce = original
    return out


# --- the test ---------------------------------------------------------------------------------------------------------


def _one_process_reference() -> dict[str, object]:
    accs = make_accumulators()
    run_all((0, N), accs)
    return {name: acc.compute() for name, acc in accs.items()}


def _launch(tmp_path: Path, mode: str) -> list[dict]:
    """Run the two ranks as separate processes and return what each wrote."""
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")]),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(rank), str(tmp_path), mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=150)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log}"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _one_shot(debiased: bool) -> float:
    from repsim_plugin.measures.cka import linear_cka

    acts = data()
    return float(linear_cka(acts["x"].double(), acts["y"].double(), debiased=debiased))


def test_two_gloo_processes_match_one_process(tmp_path):
    from repsim_plugin.errors import SmallSampleBiasWarning

    r0, r1 = _launch(tmp_path, "core")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleBiasWarning)
        ref = _one_process_reference()
        one_shot = {deb: _one_shot(deb) for deb in (False, True)}
    assert float(ref["biased"]) == pytest.approx(one_shot[False], abs=1e-10)
    assert float(ref["debiased"]) == pytest.approx(one_shot[True], abs=1e-10)

    for r in (r0, r1):
        for name, expected in ref.items():
            got = torch.tensor(r["auto"][name], dtype=torch.float64)
            torch.testing.assert_close(got, expected.to(torch.float64), rtol=0, atol=1e-10, msg=name)
        assert r["explicit_debiased"] == pytest.approx(one_shot[True], abs=1e-10)
        torch.testing.assert_close(
            torch.tensor(r["explicit_map_same"], dtype=torch.float64), ref["map_same"], rtol=0, atol=1e-10
        )
        assert r["calls_linear"] == r["expected_calls_linear"]
        assert r["calls_compute_after_reduce"] == 0
        assert r["n_after_reduce"] == N
        assert r["reduced_after_auto"] is False
        assert "count the other ranks twice" in r["error_update"]
        assert "count the other ranks twice" in r["error_all_reduce"]
        assert "has not received any batch" in r["error_empty_rank"]
        assert "disagree" in r["error_mismatch"]
    assert r0["local_n_after_auto"] == SPLIT and r1["local_n_after_auto"] == N - SPLIT
    # the shards alone give different values: the reduction is doing the work
    assert abs(r0["local_only"] - one_shot[False]) > 1e-4
    assert r0["auto"] == r1["auto"]


@pytest.mark.slow  # importing torchmetrics takes ~10 s per process (it pulls in transformers)
def test_torchmetrics_ddp_sync_matches_one_process(tmp_path):
    pytest.importorskip("torchmetrics")
    for r in _launch(tmp_path, "torchmetrics"):
        assert r["False"] == pytest.approx(_one_shot(False), abs=1e-10)
        assert r["True"] == pytest.approx(_one_shot(True), abs=1e-10)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    worker(int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
