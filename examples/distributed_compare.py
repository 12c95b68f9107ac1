"""A layer map computed by several processes with ``torch.distributed``: each rank streams its shard of the data,
one all-reduce per statistic merges them, and every rank ends with the map one process would compute.

Run on CPUs with two processes and the gloo backend (nothing else is needed)::

    torchrun --standalone --nproc_per_node 2 examples/distributed_compare.py [--out dist-out] [--quick]

(``python -m torch.distributed.run`` is the same launcher where the ``torchrun`` script is not on the PATH.) Both
ranks train the same two digits CNNs (training is deterministic), take every other batch of the held-out digits,
and call ``rp.compare`` as usual: linear CKA streams from exact float64 statistics, so the merged map equals the
one-process map to rounding (checked by tests/test_examples.py). Rank 0 writes ``map.json`` and the page.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import repsim_plugin as rp
from repsim_plugin.digits import load_digits_split, train_digits_cnn
from repsim_plugin.errors import SmallSampleBiasWarning

LAYERS = ["relu1", "relu2", "relu3", "fc2"]


def batches(quick: bool) -> list[torch.Tensor]:
    """The held-out digits in batches of 32 (all 450, or 256 in quick mode)."""
    _, _, Xte, _ = load_digits_split()
    return list(Xte[: 256 if quick else None].split(32))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", default="dist-out", help="folder for rank 0's map.json and index.html")
    parser.add_argument("--quick", action="store_true", help="256 digits instead of 450")
    parser.add_argument("--measure", default="debiased_cka", help="a streaming measure (default: debiased_cka)")
    args = parser.parse_args()
    warnings.simplefilter("ignore", SmallSampleBiasWarning)
    if "RANK" not in os.environ:
        raise SystemExit("run me with torchrun: torchrun --standalone --nproc_per_node 2 " + __file__)
    torch.set_num_threads(1)  # two processes on a small machine: one thread each
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        a, _ = train_digits_cnn(seed=0)
        b, _ = train_digits_cnn(seed=1)
        shard = batches(args.quick)[rank::world]
        result = rp.compare(a, b, shard, LAYERS, LAYERS, measure=args.measure, progress=False, names=("A", "B"))
        print(f"rank {rank}/{world}: {sum(len(x) for x in shard)} rows here, n={result.n} in the merged map")
        if rank == 0:
            out = Path(args.out)
            result.save(out / "map.json")
            page = result.to_html(out / "index.html", title=f"{args.measure} over {world} processes")
            print(result.to_dataframe().round(3).to_string())
            print(f"open {page.resolve()}")
        dist.barrier()  # every rank leaves together: a rank tearing gloo down while another still runs can abort
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
