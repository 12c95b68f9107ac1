"""The offline demo behind ``make demo`` / ``repsim demo``: compare two networks, then audit the claim.

It trains two small CNNs on scikit-learn's bundled digits (real images, about a second each, different seeds) and
walks through the package:

1. **compare**: the layer x layer CKA map of the two networks on held-out digits, biased and debiased, saved as
   JSON and PNG;
2. **stress test**: Theorem 1 of Davari et al. (ICLR 2023) on the penultimate layer: one class is translated along
   a direction the classifier cannot see, so every prediction stays the same while linear CKA collapses to the
   theorem's limit; the CCA family barely moves;
3. **audit**: how low and how high CKA can be pushed by fine-tuning while the predictions are kept, next to the
   other measures, written as a markdown report.

Run ``python -m repsim_plugin.demo [--out out] [--quick]``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ._utils.io import write_text
from .digits import PENULTIMATE
from .errors import SmallSampleBiasWarning

MEASURES = ("cka", "debiased_cka", "rbf_cka", "procrustes", "mean_cca", "mutual_knn")
LAYERS = ["relu1", "relu2", "relu3", "fc2"]


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 100 - len(title)))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="repsim demo", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", default="out", help="folder for the map, the plots and the report")
    parser.add_argument("--quick", action="store_true", help="fewer fine-tuning steps (for tests)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo's three steps on two freshly trained digits CNNs; outputs go to ``--out``."""
    args = _parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore", SmallSampleBiasWarning)  # the demo reports debiased CKA next to biased
    start = time.perf_counter()
    model_a, model_b, (Xtr, ytr, Xte, yte) = _train_models()
    _compare(model_a, model_b, list(zip(Xte.split(64), yte.split(64), strict=True)), out)
    _stress_test(model_a, model_b, Xte, yte)
    _audit(model_a, model_b, (Xtr, ytr), (Xte, yte), steps=200 if args.quick else 600, out=out)
    print(f"\ndone in {time.perf_counter() - start:.0f} s; outputs in {out}/")
    return 0


def _train_models() -> tuple[nn.Sequential, nn.Sequential, tuple[torch.Tensor, ...]]:
    """Step 0: the two CNNs (seeds 0 and 1) and the digits split ``(Xtr, ytr, Xte, yte)``."""
    from .digits import accuracy, train_digits_cnn

    _section("0. two small CNNs trained on real digits (sklearn's 8x8 images), seeds 0 and 1")
    model_a, split = train_digits_cnn(seed=0)
    model_b, _ = train_digits_cnn(seed=1)
    _, _, Xte, yte = split
    print(
        f"test accuracy: A {accuracy(model_a, Xte, yte):.3f}, B {accuracy(model_b, Xte, yte):.3f} "
        f"on {len(yte)} held-out digits"
    )
    return model_a, model_b, split


def _compare(model_a: nn.Module, model_b: nn.Module, data: list[Any], out: Path) -> None:
    """Step 1: the layer x layer maps (biased and debiased CKA), printed and saved as JSON and PNG."""
    from .compare import compare

    _section("1. compare: layer x layer similarity of A and B")
    for measure in ("cka", "debiased_cka"):
        result = compare(model_a, model_b, data, LAYERS, LAYERS, measure=measure, progress=False)
        print(f"\n{result.measure}  (estimator {result.estimator}, n={result.n}; rows: A's layers, columns: B's)")
        rows = [[name, *(f"{v:.3f}" for v in result.values[i].tolist())] for i, name in enumerate(LAYERS)]
        print(_table(rows, ["A \\ B", *LAYERS]))
        stem = out / f"map_{measure}"
        result.save(stem.with_suffix(".json"))
        result.plot(stem.with_suffix(".png"))
        print(f"saved {stem}.json and {stem}.png")
    print("\nThe diagonal is high: the two networks learned similar representations layer by layer. How much of")
    print("that number is about what the networks compute, and how much is an artifact of CKA?")


def _stress_test(model_a: nn.Sequential, model_b: nn.Sequential, Xte: torch.Tensor, yte: torch.Tensor) -> None:
    """Step 2: Theorem 1 on the penultimate layer: one class moved where the classifier cannot see it."""
    from . import adversarial as adv
    from .capture import capture

    _section("2. stress test: move one class where the classifier cannot see it (Theorem 1, Corollary 4)")
    with capture(model_a, [PENULTIMATE]) as rec_a, capture(model_b, [PENULTIMATE]) as rec_b:
        logits = model_a(Xte)
        model_b(Xte)
    H, HB = rec_a.activations[PENULTIMATE].double(), rec_b.activations[PENULTIMATE].double()
    head = cast(nn.Linear, model_a.fc2)  # the classifier after the penultimate layer
    W, b = head.weight.detach().double(), head.bias.detach().double()
    limits = [float(adv.subset_translation_limit(H, yte == k)) for k in range(10)]
    cls = min(range(10), key=lambda k: limits[k])
    mask = yte == cls
    # a direction with every component > 0 (post-ReLU activations stay >= 0) that changes all logits equally
    v = adv.separability_preserving_direction(W, keep="probabilities")
    c = adv.scale_for_target_cka(H, mask, v, target=max(0.2, limits[cls] + 0.05))
    moved = adv.translate_subset(H, mask, v, c)
    same = bool(((moved @ W.T + b).argmax(1) == logits.argmax(1)).all())
    print(f"A' = A's penultimate layer with class {cls} ({int(mask.sum())} of {len(yte)} digits) moved by c={c:.1f}")
    print(
        f"along v >= 0 with W v = const: predictions unchanged: {same}; activations still >= 0: "
        f"{bool((moved >= 0).all())}; Theorem 1 limit of CKA(A, A'): {limits[cls]:.3f}\n"
    )
    print(_table(_measure_rows(H, moved, HB), ["measure", "id", "A vs A'", "A vs B", "A' vs B", "more similar is"]))
    print("\nA and A' make the same predictions from the same class structure, yet linear CKA calls them different")
    print("and the claim 'A is CKA-similar to B' changes with it; mean CCA (invariant to invertible linear maps)")
    print("does not move. Report several measures.")


def _measure_rows(H: torch.Tensor, moved: torch.Tensor, HB: torch.Tensor) -> list[list[str]]:
    """One row per measure of :data:`MEASURES`: A vs A', A vs B, A' vs B and its direction."""
    from .measures import make

    rows = []
    for name in MEASURES:
        m = make(name)
        values = [f"{float(m(first, second)):.3f}" for first, second in ((H, moved), (H, HB), (moved, HB))]
        rows.append([name, m.id, *values, "higher" if m.larger_is_more_similar else "lower"])
    return rows


def _audit(model_a: nn.Module, model_b: nn.Module, train: Any, held_out: Any, *, steps: int, out: Path) -> None:
    """Step 3: the audit of the penultimate-layer claim, printed and saved as ``audit.md``."""
    from .adversarial import audit

    _section("3. audit: how far can fine-tuning move CKA while 98% of held-out predictions stay the same?")
    # fine-tune on the training digits, judge on the held-out ones; "kept" = top-1 agreement with A >= 98%
    report = audit(
        model_a,
        PENULTIMATE,
        model_b,
        PENULTIMATE,
        train,
        eval_data=held_out,
        steps=steps,
        temperature=1.0,
        tolerance=0.02,
        measures=(*MEASURES[:2], "procrustes", "mean_cca"),
    )
    print(
        f"claim: {report.claim:.3f}; reachable with A's predictions kept: {report.lowest:.3f} .. {report.highest:.3f}\n"
    )
    markdown = report.to_markdown()
    print(markdown)
    write_text(out / "audit.md", markdown)
    print(f"saved {out / 'audit.md'}")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
