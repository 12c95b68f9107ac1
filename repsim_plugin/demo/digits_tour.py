"""The digits sections of the tour: two CNNs compared, checkpoints of one, the stress test, the audit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..digits import PENULTIMATE, accuracy, build_digits_cnn, load_digits_split, train_digits_cnn
from ..report.html import Cell, esc, figure_png, img, table, write_page
from ..report.pages import IndexEntry, audit_section, map_section, map_summary, trajectory_section
from . import section, statistics_options
from . import table as text_table

LAYERS = ["relu1", "relu2", "relu3", "fc2"]
#: Every family side by side in the stress test.
STRESS_MEASURES = ("cka", "debiased_cka", "rbf_cka", "procrustes", "mean_cca", "svcca", "pwcca", "mutual_knn")
AUDIT_MEASURES = ("cka", "debiased_cka", "procrustes", "mean_cca")


@dataclass
class Models:
    """The two trained CNNs and the digits split."""

    a: nn.Sequential
    b: nn.Sequential
    Xtr: torch.Tensor
    ytr: torch.Tensor
    Xte: torch.Tensor
    yte: torch.Tensor

    def batches(self) -> list[Any]:
        return list(zip(self.Xte.split(64), self.yte.split(64), strict=True))


def train_models(progress: bool) -> Models:
    """Step 0: the two CNNs (seeds 0 and 1, about a second each) and the 1347 / 450 split."""
    section("0. two small CNNs trained on real digits (sklearn's 8x8 images), seeds 0 and 1")
    from tqdm.auto import tqdm

    trained = [train_digits_cnn(seed=s) for s in tqdm([0, 1], desc="train CNNs", disable=not progress, leave=False)]
    (a, split), (b, _) = trained
    Xtr, ytr, Xte, yte = split
    print(f"test accuracy: A {accuracy(a, Xte, yte):.3f}, B {accuracy(b, Xte, yte):.3f} on {len(yte)} held-out digits")
    return Models(a, b, Xtr, ytr, Xte, yte)


def _print_map(result: Any) -> None:
    rows = [[name, *(f"{v:.3f}" for v in result.values[i].tolist())] for i, name in enumerate(result.layers_a)]
    print(text_table(rows, ["A \\ B", *result.layers_b]))
    if result.null_baseline is not None:
        print(
            "null baseline (unrelated features of each cell's shape), diagonal:",
            " ".join(f"{v:.3f}" for v in result.null_baseline.diagonal().tolist()),
        )
    if result.p_values is not None:
        print("p-values, diagonal:", " ".join(f"{v:.3g}" for v in result.p_values.diagonal().tolist()))


def compare_step(models: Models, out: Path, *, permutations: int, progress: bool) -> IndexEntry:
    """Step 1: the layer x layer maps (biased and debiased CKA), saved as JSON, PNG and a page."""
    from ..compare import compare

    section("1. compare: layer x layer similarity of A and B")
    extra = statistics_options(compare, permutations)
    if not extra:
        print("(this version's compare has no permutations=: the maps show the null baseline, no p-values)")
    parts, maps = [], {}
    for measure in ("cka", "debiased_cka"):
        result = compare(
            models.a,
            models.b,
            models.batches(),
            LAYERS,
            LAYERS,
            measure=measure,
            progress=progress,
            names=("CNN seed 0", "CNN seed 1"),
            **extra,
        )
        maps[measure] = result
        print(f"\n{measure}  (estimator {result.estimator}, n={result.n}; rows: A's layers, columns: B's)")
        _print_map(result)
        stem = out / f"map_{measure}"
        result.save(stem.with_suffix(".json"))
        result.plot(stem.with_suffix(".png"))
        print(f"saved {stem}.json and {stem}.png")
        parts.append(map_section(result, heading=f"{measure}: CNN seed 0 vs CNN seed 1"))
    print("\nBiased CKA of the wide conv layers is close to what unrelated features of that shape read (the null);")
    print("debiased CKA reads about 0 for unrelated features, so its diagonal is the evidence.")
    lead = (
        '<p class="lead">Two CNNs with the same architecture, trained from different seeds on the same digits, '
        "compared on 450 held-out digits. Biased CKA of the wide convolutional layers sits near its null baseline "
        "(what independent random features of that shape read); debiased CKA has a null of about 0.</p>"
    )
    write_page(
        out / "compare.html", "two digits CNNs, layer by layer", lead + "".join(parts), nav=[("index", "index.html")]
    )
    return IndexEntry(
        "1. two digits CNNs compared layer by layer",
        "compare.html",
        map_summary(maps["debiased_cka"]),
        figure_png(maps["debiased_cka"].plot()),
    )


def _train_with_checkpoints(folder: Path, epochs: tuple[int, ...], progress: bool) -> list[Path]:
    """A CNN (seed 2) trained for max(epochs) epochs, saved as safetensors after each epoch in ``epochs``."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    Xtr, ytr, _, _ = load_digits_split()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest and deterministic (see repsim_plugin.digits)
    paths = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(2)
            model = build_digits_cnn()
        generator = torch.Generator().manual_seed(2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
        model.train()
        for epoch in tqdm(range(1, max(epochs) + 1), desc="train with checkpoints", disable=not progress, leave=False):
            for idx in torch.randperm(len(Xtr), generator=generator).split(128):
                loss = nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if epoch in epochs:
                path = folder / f"epoch{epoch:02d}.safetensors"
                folder.mkdir(parents=True, exist_ok=True)
                save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(path))
                paths.append(path)
    finally:
        torch.set_num_threads(threads)
    return paths


def checkpoints_step(out: Path, *, progress: bool) -> IndexEntry:
    """Step 2: one CNN saved after epochs 1, 2, 4 and 10; every layer against the final checkpoint."""
    from ..compare import checkpoint_trajectory

    section("2. checkpoints: one CNN early, midway and late in training, against its final weights")
    paths = _train_with_checkpoints(out / "checkpoints", (1, 2, 4, 10), progress)
    _, _, Xte, yte = load_digits_split()
    traj = checkpoint_trajectory(
        build_digits_cnn,
        paths,
        list(zip(Xte.split(64), yte.split(64), strict=True)),
        reference=len(paths) - 1,
        layers=LAYERS,
        measure="debiased_cka",
        progress=progress,
    )
    print(f"debiased CKA of each layer with {traj.reference} (n={traj.n}):")
    rows = [[c, *(f"{v:.3f}" for v in traj.values[t].tolist())] for t, c in enumerate(traj.checkpoints)]
    print(text_table(rows, ["checkpoint", *traj.layers]))
    traj.save(out / "trajectory.json")
    traj.plot(out / "trajectory.png")
    print("Early layers settle first: their similarity to the final weights is high from the first epoch on.")
    body = trajectory_section(traj, heading=None)
    write_page(
        out / "checkpoints.html",
        "checkpoints of one CNN against its final weights",
        body,
        nav=[("index", "index.html")],
    )
    return IndexEntry(
        "2. checkpoints of one CNN (epochs 1, 2, 4) against its final weights",
        "checkpoints.html",
        f"Debiased CKA of every layer with <code>{esc(traj.reference)}</code> across the series; the page also has "
        "each checkpoint's full map.",
        figure_png(traj.plot()),
    )


def _measure_rows(H: torch.Tensor, moved: torch.Tensor, HB: torch.Tensor) -> list[list[str]]:
    from ..measures import make

    rows = []
    for name in STRESS_MEASURES:
        m = make(name)
        values = [f"{float(m(first, second)):.3f}" for first, second in ((H, moved), (H, HB), (moved, HB))]
        rows.append([name, m.id, *values, "higher" if m.larger_is_more_similar else "lower"])
    return rows


def _curve_plot(H: torch.Tensor, mask: torch.Tensor, v: torch.Tensor, limit: float, c_used: float) -> bytes:
    """Every measure between A and A' as the class moves further (c on a log scale), with Theorem 1's limit."""
    from .._utils.plotting import axes_for
    from ..adversarial import translate_subset
    from ..measures import make

    fig, ax = axes_for(None, (7.5, 4.2), 120)
    cs = [0.1 * 10 ** (k / 2) for k in range(9)]
    for name in ("cka", "rbf_cka", "procrustes", "mean_cca", "svcca", "pwcca"):
        m = make(name)
        ax.plot(cs, [float(m(H, translate_subset(H, mask, v, c))) for c in cs], marker="o", label=name)
    ax.axhline(limit, color="black", linestyle=":", label=f"Theorem 1 limit of CKA ({limit:.3f})")
    ax.axvline(c_used, color="0.6", linestyle="--", linewidth=1, label=f"c used above ({c_used:.1f})")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("c: distance the class is moved")
    ax.set_ylabel("A vs A' (higher = more similar)")
    ax.set_title("one class moved where the classifier cannot see it; predictions unchanged at every c", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return figure_png(fig)


def stress_step(models: Models, out: Path) -> IndexEntry:
    """Step 3: Theorem 1 on the penultimate layer: one class moved where the classifier cannot see it."""
    from .. import adversarial as adv
    from ..capture import capture

    section("4. stress test: move one class where the classifier cannot see it (Theorem 1, Corollary 4)")
    with capture(models.a, [PENULTIMATE]) as rec_a, capture(models.b, [PENULTIMATE]) as rec_b:
        logits = models.a(models.Xte)
        models.b(models.Xte)
    H, HB = rec_a.activations[PENULTIMATE].double(), rec_b.activations[PENULTIMATE].double()
    head = cast(nn.Linear, models.a.fc2)
    W, b = head.weight.detach().double(), head.bias.detach().double()
    limits = [float(adv.subset_translation_limit(H, models.yte == k)) for k in range(10)]
    cls = min(range(10), key=lambda k: limits[k])
    mask = models.yte == cls
    v = adv.separability_preserving_direction(W, keep="probabilities")
    c = adv.scale_for_target_cka(H, mask, v, target=max(0.2, limits[cls] + 0.05))
    moved = adv.translate_subset(H, mask, v, c)
    same = bool(((moved @ W.T + b).argmax(1) == logits.argmax(1)).all())
    print(
        f"A' = A's penultimate layer with class {cls} ({int(mask.sum())} of {len(models.yte)} digits) "
        f"moved by c={c:.1f}"
    )
    print(
        f"along v >= 0 with W v = const: predictions unchanged: {same}; activations still >= 0: "
        f"{bool((moved >= 0).all())}; Theorem 1 limit of CKA(A, A'): {limits[cls]:.3f}\n"
    )
    header = ["measure", "id", "A vs A'", "A vs B", "A' vs B", "more similar is"]
    rows = _measure_rows(H, moved, HB)
    print(text_table(rows, header))
    low = [r[0] for r in rows if r[5] == "higher" and float(r[2]) < 0.9]
    print(f"\nA and A' make the same predictions, yet {', '.join(low)} read A vs A' below 0.9; mean CCA and PWCCA")
    print("stay near 1 (the change is rank one). Report several measures.")
    lead = (
        f"<p class=\"lead\">A' is A's penultimate layer (<code>{PENULTIMATE}</code>, 64 units) with class {cls} "
        f"({int(mask.sum())} of {len(models.yte)} held-out digits) moved by c = {c:.1f} along a direction v &ge; 0 "
        f"with W v = const: every logit moves by the same amount, so predictions unchanged: <b>{same}</b>. "
        f"Theorem 1's limit of linear CKA(A, A') is {limits[cls]:.3f}.</p>"
    )
    curve = _curve_plot(H, mask, v, limits[cls], c)
    html_rows = [[r[0], Cell(f"<code>{esc(r[1])}</code>", "l"), *r[2:]] for r in rows]
    body = lead + table(header, html_rows) + '<div class="card">' + img(curve, "measures against c") + "</div>"
    write_page(
        out / "stress.html", "stress test: one class moved, predictions kept", body, nav=[("index", "index.html")]
    )
    return IndexEntry(
        "4. the paper's stress test (Theorem 1, Corollary 4)",
        "stress.html",
        f"Class {cls} moved by c = {c:.1f}; predictions unchanged: {same}. Linear CKA(A, A') {rows[0][2]}, mean CCA "
        f"{rows[4][2]}, SVCCA {rows[5][2]}, PWCCA {rows[6][2]}.",
        curve,
    )


def audit_step(models: Models, out: Path, *, steps: int, progress: bool) -> IndexEntry:
    """Step 5: the audit of the penultimate-layer claim: markdown, JSON, PNG and a page."""
    from .._utils.io import write_text
    from ..adversarial import audit

    section("5. audit: how far can fine-tuning move CKA while 98% of held-out predictions stay the same?")
    report = audit(
        models.a,
        PENULTIMATE,
        models.b,
        PENULTIMATE,
        (models.Xtr, models.ytr),
        eval_data=(models.Xte, models.yte),
        steps=steps,
        temperature=1.0,
        tolerance=0.02,
        measures=AUDIT_MEASURES,
        progress=progress,
        names=("CNN seed 0", "CNN seed 1"),
    )
    print(
        f"claim: {report.claim:.3f}; reachable with A's predictions kept: {report.lowest:.3f} .. {report.highest:.3f}\n"
    )
    markdown = report.to_markdown()
    print(markdown)
    write_text(out / "audit.md", markdown)
    report.save(out / "audit.json")
    report.plot(out / "audit.png")
    write_page(out / "audit.html", "audit of a CKA claim", audit_section(report), nav=[("index", "index.html")])
    print(f"saved {out / 'audit.md'}, audit.json, audit.png, audit.html")
    return IndexEntry(
        "5. audit: how far can CKA move while the predictions are kept?",
        "audit.html",
        f"Claim: CKA {report.claim:.3f} between the penultimate layers; with A's predictions kept it reaches "
        f"{report.lowest:.3f} to {report.highest:.3f}.",
        figure_png(report.plot()),
    )
