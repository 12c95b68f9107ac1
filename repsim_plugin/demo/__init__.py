"""The offline demo behind ``make demo`` / ``repsim demo``: a tour of the package that ends in a page to open.

1. **compare**: two small CNNs trained on scikit-learn's bundled digits (seeds 0 and 1), layer by layer, with
   biased and debiased CKA, the null baseline of every cell, and per-cell p-values when this version's
   ``compare`` has ``permutations=``;
2. **checkpoints**: one CNN saved early, midway and late in training, each layer's similarity to the final
   checkpoint (a trajectory) and the early-vs-late map;
3. **MiniLM**: the pretrained sentence encoder's six blocks against each other on 96 bundled sentences
   (token policy ``mean``: padding excluded);
4. **stress test**: Theorem 1 of Davari et al. (ICLR 2023): one class moved where the classifier cannot see it;
   every prediction stays, linear CKA collapses to the theorem's limit; every measure side by side;
5. **audit**: how low and high CKA can be pushed by fine-tuning while 98% of held-out predictions are kept.

Every section is a page under ``--out``; ``index.html`` links them (self-contained HTML, no network). Run
``python -m repsim_plugin.demo [--out out] [--quick]``.
"""

from __future__ import annotations

import argparse
import inspect
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import SmallSampleBiasWarning

__all__ = ["main", "table"]


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def section(title: str) -> None:
    """Print a section heading."""
    print(f"\n=== {title} " + "=" * max(0, 100 - len(title)), flush=True)


def statistics_options(function: Any, permutations: int) -> dict[str, Any]:
    """``permutations=`` and ``seed=`` when ``function`` has them (this version's compare may not)."""
    if "permutations" in inspect.signature(function).parameters:
        return {"permutations": permutations, "seed": 0}
    return {}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="repsim demo", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", default="out", help="folder for the pages, maps, plots and reports (default: out)")
    parser.add_argument("--quick", action="store_true", help="fewer fine-tuning steps and permutations (for tests)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tour; every section writes its page under ``--out``; the last line says where the index is."""
    from ..report.pages import index_page
    from . import digits_tour, minilm_tour

    args = _parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    warnings.simplefilter("ignore", SmallSampleBiasWarning)  # the tour shows the null baseline and debiased CKA
    start = time.perf_counter()
    models = digits_tour.train_models(progress)
    entries = [
        digits_tour.compare_step(models, out, permutations=100 if args.quick else 500, progress=progress),
        digits_tour.checkpoints_step(out, progress=progress),
        minilm_tour.minilm_step(out, progress=progress),
        digits_tour.stress_step(models, out),
        digits_tour.audit_step(models, out, steps=200 if args.quick else 600, progress=progress),
    ]
    intro = (
        "A tour of repsim-plugin on real models, offline: two digits CNNs compared layer by layer, checkpoints of "
        "one of them, the pretrained MiniLM's blocks, the paper's stress test and an audit of a CKA claim. "
        f"Written in {time.perf_counter() - start:.0f} s."
    )
    page = index_page(out / "index.html", "repsim-plugin demo", entries, intro=intro)
    print(f"\ndone in {time.perf_counter() - start:.0f} s; every output is in {out}/")
    print(f"open {page.resolve()}")
    return 0
