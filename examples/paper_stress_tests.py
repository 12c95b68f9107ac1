"""The stress tests of Davari et al. (ICLR 2023, "Reliability of CKA as a Similarity Measure in Deep Learning"),
Sections 3 to 4.2, reproduced offline as PNG curves and a JSON of the figures (checked by tests/test_examples.py).

1. **subset translation and outlier** (Theorem 1, the single-outlier limit): linear CKA between a representation and
   itself with one class (or one sample) moved by c, against c, with the limits the theory predicts;
2. **two cubes**: points in two cubes, one cube moved away; linear CKA against RBF CKA at several bandwidths;
3. **invertible linear maps** X -> X M in three regimes of the entries of M (mean 0 / std 1: about
   1/sqrt(2 + 1/p); mean 1 / std 1; mean 10 / std 0.1: close to rank one, near 1/sqrt(p));
4. **early layers**: a digits CNN trained normally, one trained on shuffled labels and one left at random
   initialisation: high CKA between their first layers although they predict differently;
5. **side by side** under the class translation of 1., on a trained digits CNN's penultimate layer where the
   classifier cannot see the move: linear and RBF CKA, Procrustes, and the CCA family (mean CCA, SVCCA, PWCCA).

Run ``python examples/paper_stress_tests.py [--out paper-out] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import repsim_plugin as rp
from repsim_plugin import adversarial as adv
from repsim_plugin._utils.plotting import axes_for, save_figure
from repsim_plugin.digits import PENULTIMATE, accuracy, build_digits_cnn, load_digits_split, train_digits_cnn
from repsim_plugin.errors import SmallSampleBiasWarning


def _cs(quick: bool) -> list[float]:
    return [10 ** (k / 2) for k in range(-2, 11, 2 if quick else 1)]


def _figure(path: Path, xlabel: str, ylabel: str, title: str, curves: dict[str, tuple[list[float], list[float]]],
            hlines: dict[str, float], logx: bool = True) -> None:  # fmt: skip
    fig, ax = axes_for(None, (7.0, 4.2), 120)
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    for label, y in hlines.items():
        ax.axhline(y, linestyle=":", color="black", linewidth=1, label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def subset_and_outlier(out: Path, quick: bool) -> dict[str, Any]:
    """1. CKA(X, X with one class / one sample moved by c) against c, next to Theorem 1's and the outlier limit."""
    model, (_, _, Xte, yte) = train_digits_cnn(seed=0)
    with rp.capture(model, [PENULTIMATE]) as rec:
        model(Xte)
    H = rec.activations[PENULTIMATE].double()
    mask = yte == 0
    g = torch.Generator().manual_seed(0)
    v = torch.randn(H.shape[1], generator=g, dtype=torch.float64)
    cs = _cs(quick)
    subset = [rp.similarity(H, adv.translate_subset(H, mask, v, c)) for c in cs]
    outlier = [rp.similarity(H, adv.add_outlier(H, 0, v, c)) for c in cs]
    limit = float(adv.subset_translation_limit(H, mask))
    o_limit = float(adv.outlier_limit(H, 0))
    _figure(out / "subset_and_outlier.png", "c", "linear CKA(X, X moved)",
            f"one class (rho = {float(mask.double().mean()):.2f}) or one sample moved by c along a random direction",
            {"class 0 moved": (cs, subset), "sample 0 moved": (cs, outlier)},
            {f"Theorem 1 limit {limit:.3f}": limit, f"outlier limit {o_limit:.4f}": o_limit})  # fmt: skip
    return {
        "subset_limit": limit,
        "subset_at_largest_c": subset[-1],
        "subset_closed_form_at_largest_c": float(adv.subset_translation_cka(H, mask, v, cs[-1])),
        "outlier_limit": o_limit,
        "outlier_at_largest_c": outlier[-1],
        "largest_c": cs[-1],
    }


def two_cubes(out: Path, quick: bool) -> dict[str, Any]:
    """2. Two cubes of points, the second moved away along a diagonal: linear vs RBF CKA at several bandwidths."""
    g = torch.Generator().manual_seed(1)
    n_half = 100 if quick else 200
    X = torch.cat([torch.rand(n_half, 3, generator=g), torch.rand(n_half, 3, generator=g) + 2.0]).double()
    mask = torch.arange(2 * n_half) >= n_half
    v = torch.ones(3, dtype=torch.float64)
    cs = [0.1 * 2**k for k in range(0, 12, 2 if quick else 1)]
    curves = {"linear CKA": (cs, [rp.similarity(X, adv.translate_subset(X, mask, v, c)) for c in cs])}
    rbf = {}
    for sigma in (0.2, 0.5, 1.0):
        values = [rp.similarity(X, adv.translate_subset(X, mask, v, c), "rbf_cka", sigma=sigma) for c in cs]
        curves[f"RBF CKA sigma={sigma}"] = (cs, values)
        rbf[str(sigma)] = values[-1]
    limit = float(adv.subset_translation_limit(X, mask))
    _figure(out / "two_cubes.png", "c (distance the second cube moves)", "CKA(X, X moved)",
            "two cubes, the second moved away: linear CKA falls to Theorem 1's limit, RBF CKA depends on sigma",
            curves, {f"Theorem 1 limit {limit:.3f}": limit})  # fmt: skip
    return {"limit": limit, "linear_at_largest_c": curves["linear CKA"][1][-1], "rbf_at_largest_c": rbf}


def invertible_maps(out: Path, quick: bool) -> dict[str, Any]:
    """3. CKA(X, X M) for Gaussian M in three regimes of its entries' mean and std, against the width p."""
    g = torch.Generator().manual_seed(2)
    n = 2000
    widths = [8, 32, 128] if quick else [4, 8, 16, 32, 64, 128]
    regimes = {"mean 0, std 1": (0.0, 1.0), "mean 1, std 1": (1.0, 1.0), "mean 10, std 0.1": (10.0, 0.1)}
    curves, at = {}, {}
    for label, (mu, sd) in regimes.items():
        ys = []
        for p in widths:
            X = torch.randn(n, p, generator=g, dtype=torch.float64)
            M = mu + sd * torch.randn(p, p, generator=g, dtype=torch.float64)
            ys.append(rp.similarity(X, adv.invertible_linear(X, M, max_condition=1e12)))
        curves[label] = (widths, ys)
        at[label] = dict(zip(map(str, widths), ys, strict=True))
    predicted = [1 / math.sqrt(2 + 1 / p) for p in widths]
    curves["1/sqrt(2 + 1/p) (isotropic prediction)"] = (widths, predicted)
    curves["1/sqrt(p)"] = (widths, [1 / math.sqrt(p) for p in widths])
    _figure(out / "invertible_linear.png", "p (features)", "linear CKA(X, X M)",
            "invertible linear maps: linear CKA is not invariant to them", curves, {})  # fmt: skip
    return {"widths": widths, "values": at}


def _train(seed: int, shuffle: bool, epochs: int) -> nn.Module:
    """A digits CNN trained for ``epochs`` epochs, on the true labels or on a fixed random shuffle of them."""
    Xtr, ytr, _, _ = load_digits_split()
    g = torch.Generator().manual_seed(seed)
    labels = ytr[torch.randperm(len(ytr), generator=g)] if shuffle else ytr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_digits_cnn()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(epochs):
            for idx in torch.randperm(len(Xtr), generator=g).split(128):
                loss = nn.functional.cross_entropy(model(Xtr[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def early_layers(out: Path, quick: bool) -> dict[str, Any]:
    """4. Normal vs shuffled-label vs random-init networks: CKA of each layer, and what each network predicts."""
    normal, (_, _, Xte, yte) = train_digits_cnn(seed=0)
    shuffled = _train(seed=3, shuffle=True, epochs=5 if quick else 20)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        random_init = build_digits_cnn().eval()
    layers = ["relu1", "relu2", "relu3", "fc2"]
    data = list(Xte.split(150))
    pairs = {"normal vs shuffled labels": shuffled, "normal vs random init": random_init}
    curves, values = {}, {}
    for label, other in pairs.items():
        m = rp.compare(normal, other, data, layers, layers, measure="debiased_cka", progress=False)
        diag = m.values.diagonal().tolist()
        curves[label] = (list(range(len(layers))), diag)
        values[label] = dict(zip(layers, diag, strict=True))
    fig, ax = axes_for(None, (6.0, 4.0), 120)
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xticks(range(len(layers)), labels=layers)
    ax.set(ylim=(-0.05, 1.02), xlabel="layer", ylabel="debiased CKA, same layer")
    ax.set_title("early layers look alike whatever the network learned", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "early_layers.png")
    acc = {"normal": accuracy(normal, Xte, yte), "shuffled labels": accuracy(shuffled, Xte, yte),
           "random init": accuracy(random_init, Xte, yte)}  # fmt: skip
    return {"cka": values, "accuracy": acc}


SIDE_BY_SIDE = ("cka", "rbf_cka", "procrustes", "mean_cca", "svcca", "pwcca")


def side_by_side(out: Path, quick: bool) -> dict[str, Any]:
    """5. Every family under the class translation (predictions kept) on a trained CNN's penultimate layer."""
    model, (_, _, Xte, yte) = train_digits_cnn(seed=0)
    with rp.capture(model, [PENULTIMATE]) as rec:
        logits = model(Xte)
    H = rec.activations[PENULTIMATE].double()
    W, b = model.fc2.weight.detach().double(), model.fc2.bias.detach().double()
    v = adv.separability_preserving_direction(W, keep="probabilities")
    cs = _cs(quick)
    classes = range(0, 10, 5) if quick else range(10)
    per_class: dict[str, dict[str, list[float]]] = {}
    kept = True
    for k in classes:
        mask = yte == k
        rows = {name: [] for name in SIDE_BY_SIDE}
        for c in cs:
            moved = adv.translate_subset(H, mask, v, c)
            kept &= bool(((moved @ W.T + b).argmax(1) == logits.argmax(1)).all())
            for name in SIDE_BY_SIDE:
                rows[name].append(rp.similarity(H, moved, name))
        per_class[str(k)] = rows
    # the c at which linear CKA reaches 0.2, class by class, and what every measure reads there
    at_02 = {}
    for k in classes:
        mask = yte == k
        if float(adv.subset_translation_limit(H, mask)) >= 0.2:
            continue
        c = adv.scale_for_target_cka(H, mask, v, target=0.2)
        moved = adv.translate_subset(H, mask, v, c)
        at_02[str(k)] = {name: rp.similarity(H, moved, name) for name in SIDE_BY_SIDE}
    first = per_class[str(next(iter(classes)))]
    _figure(out / "side_by_side.png", "c", "A vs A' (one class moved, predictions kept)",
            f"class {next(iter(classes))} moved on the penultimate layer: every family side by side",
            {name: (cs, first[name]) for name in SIDE_BY_SIDE}, {})  # fmt: skip
    minimum = {name: min(min(r[name]) for r in per_class.values()) for name in SIDE_BY_SIDE}
    at_min = {name: min(r[name] for r in at_02.values()) for name in SIDE_BY_SIDE} if at_02 else {}
    return {"predictions_kept": kept, "min_over_c_and_classes": minimum, "min_at_cka_0.2": at_min, "cs": cs}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", default="paper-out", help="folder for the PNG curves and figures.json")
    parser.add_argument("--quick", action="store_true", help="fewer points and a shorter training (for tests)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore", SmallSampleBiasWarning)
    start = time.perf_counter()
    figures = {}
    for name, step in [("subset_and_outlier", subset_and_outlier), ("two_cubes", two_cubes),
                       ("invertible_linear", invertible_maps), ("early_layers", early_layers),
                       ("side_by_side", side_by_side)]:  # fmt: skip
        figures[name] = step(out, args.quick)
        print(f"{name}: {json.dumps(figures[name], default=float)[:400]}")
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    print(f"done in {time.perf_counter() - start:.0f} s; curves and figures.json in {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
