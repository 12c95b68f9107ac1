"""rp.compare under torch.distributed: two CPU processes (gloo, loopback), each comparing its shard of the batches,
give the one-process map within 1e-10 for every streaming estimator.

The test runs this file as a script twice (``--worker RANK``); the ranks train the same two digits CNNs (training is
deterministic), take every other batch, and write their maps as JSON.
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

LAYERS = ["relu1", "relu2", "fc1", "relu3"]
ESTIMATORS = [
    ("cka", "feature_streaming"),
    ("debiased_cka", "feature_streaming"),
    ("cka", "sample_space"),
    ("debiased_cka", "minibatch"),
]


def batches() -> list[torch.Tensor]:
    sys.path.insert(0, str(Path(__file__).parent))
    from digits_models import load_digits_split

    _, _, Xte, _ = load_digits_split()
    return list(Xte[:256].split(32))


def maps(data: list[torch.Tensor]) -> dict[str, dict]:
    import repsim_plugin as rp
    from repsim_plugin.digits import train_digits_cnn

    a, _ = train_digits_cnn(seed=0)
    b, _ = train_digits_cnn(seed=1)
    out = {}
    for measure, estimator in ESTIMATORS:
        result = rp.compare(a, b, data, LAYERS, LAYERS, measure, estimator=estimator, progress=False)
        out[f"{measure}/{estimator}"] = {
            "values": result.values.tolist(),
            "n": result.n,
            "world": result.extra["world_size"],
        }
    return out


def worker(rank: int, out_dir: Path) -> None:
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    shard = batches()[rank::2]  # each rank sees every other batch
    finish(rank, out_dir, maps(shard))


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_map(tmp_path):
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(rank), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = maps(batches())
    for key, ref in reference.items():
        for r in ranks:
            got = torch.tensor(r[key]["values"], dtype=torch.float64)
            assert torch.allclose(got, torch.tensor(ref["values"], dtype=torch.float64), atol=1e-10, rtol=0), key
            assert r[key]["n"] == ref["n"] == 256 and r[key]["world"] == 2


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    worker(int(sys.argv[2]), Path(sys.argv[3]))
