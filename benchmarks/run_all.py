"""``make bench``: the five workloads of the performance issue, written as markdown and JSON.

``python benchmarks/run_all.py [--quick] [--out DIR] [--rounds N]`` writes ``DIR/bench.md`` and ``DIR/bench.json``
(default ``out/bench``). The older focused scripts (bench_streaming.py, bench_permutation.py, bench_compare.py)
run on their own. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import workloads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="out/bench")
    parser.add_argument("--rounds", default="3")
    parser.add_argument("--only", default="W1,W2,W3,W4,W5")
    args = parser.parse_args()
    out = Path(args.out)
    argv = ["--rounds", args.rounds, "--only", args.only, "--json", str(out / "bench.json")]
    argv += ["--markdown", str(out / "bench.md")] + (["--quick"] if args.quick else [])
    status = workloads.main(argv)
    print(f"wrote {out / 'bench.md'} and {out / 'bench.json'}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
