"""Run every benchmark in turn (``make bench``): ``python benchmarks/run_all.py [--quick] [--device cuda]``.

Each benchmark prints its own markdown table; speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
BENCHMARKS = ["bench_streaming.py", "bench_permutation.py", "bench_compare.py"]


def main() -> int:
    status = 0
    for name in BENCHMARKS:
        print(f"\n## {name}\n", flush=True)
        status |= subprocess.run([sys.executable, str(HERE / name), *sys.argv[1:]], check=False).returncode
    return status


if __name__ == "__main__":
    raise SystemExit(main())
