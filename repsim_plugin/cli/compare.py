"""``repsim compare``: the layer x layer similarity map of two models, or of every pair of checkpoints of one model.

Each map is written as ``.json`` (lossless, :meth:`SimilarityMap.save`) and ``.png`` (its heatmap), and summarised
on the console: each layer of A's best match in B, next to what unrelated features of that shape would read (the
null baseline) and, with ``--permutations``, its p-value. ``--report DIR`` also writes ``DIR/index.html``.

The command's default measure is debiased CKA, unlike the library's ``compare`` (linear CKA, the measure of the
literature): the command is typically run on few inputs (tens of images) and wide layers, where biased CKA of
unrelated features is already close to 1 (0.998 for resnet18's ``act1`` on 64 images), while debiased CKA reads
about 0 for them. ``--measure cka`` gives the biased estimator, with a note when it is inflated.
"""

from __future__ import annotations

import argparse
import inspect
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..capture import SPATIAL_POLICIES, TOKEN_POLICIES
from ..compare import ESTIMATOR_CHOICES, compare, compare_checkpoints
from ..errors import RepsimError, SmallSampleBiasWarning
from ..results import SimilarityMap
from ..trajectory import Trajectory
from .checks import check_writable, checkpoint_stems, out_stem, positive_int, with_suffix
from .loaders import load_data, load_model, model_label

__all__ = ["DEFAULT_MEASURE", "add_parser", "cmd_compare"]

#: The command's default measure (see the module docstring for why it is not the library's).
DEFAULT_MEASURE = "debiased_cka"

EXAMPLES = """examples:
  # two timm models on a folder of images (weights with --checkpoint-a / --checkpoint-b)
  repsim compare --model-a timm:resnet18 --model-b timm:resnet34 --data images/ --image-size 64 --out maps/r18_r34
  # two checkpoints of one model, with a page to open in a browser and permutation p-values
  repsim compare --model module:repsim_plugin.digits:build_digits_cnn --checkpoints early.pt late.pt \
      --data x.npy --permutations 200 --report report/
  # a series of checkpoints against the first one: a trajectory per layer
  repsim compare --model timm:resnet18 --checkpoints e1.pt e5.pt e10.pt --reference e1.pt --data images/
  # a local HuggingFace model against itself on sentences, the biased estimator
  repsim compare --model-a hf:/path/to/minilm --data sentences.txt --measure cka
  # which layers are there?   repsim layers timm:resnet18
"""


#: The subcommand's description (``repsim compare --help``).
DESCRIPTION = textwrap.fill(
    "Run the same data through two models (or several checkpoints of one) and write the layer x layer "
    "similarity map as JSON and PNG, with each layer's best match on the console next to what unrelated "
    "features of that shape would read. Models: timm:NAME (pretrained=False), hf:PATH (a local folder), "
    "module:pkg.mod:factory, each optionally followed by ,key=value arguments. Data: a folder of images, a "
    ".txt file with one sentence per line (hf: models), or a .pt / .npy tensor file. The default measure "
    f"is {DEFAULT_MEASURE}: biased CKA reads close to 1 for unrelated wide layers on few samples."
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    cmp = subparsers.add_parser(
        "compare",
        help="layer x layer similarity map of two models or of checkpoints",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_inputs(cmp)
    _add_estimate(cmp)
    _add_outputs(cmp)
    cmp.set_defaults(func=cmd_compare)
    return cmp


def _add_inputs(cmp: argparse.ArgumentParser) -> None:
    """What is compared: the models or the checkpoints, the data, and the layers."""
    cmp.add_argument("--model-a", help="timm:NAME, hf:PATH or module:pkg.mod:factory")
    cmp.add_argument(
        "--model-b", help="as --model-a (default: model A itself, or its architecture with --checkpoint-b)"
    )
    cmp.add_argument("--checkpoint-a", help="weights for model A (.safetensors, or a torch state dict)")
    cmp.add_argument("--checkpoint-b", help="weights for model B")
    cmp.add_argument("--model", help="architecture of --checkpoints")
    cmp.add_argument("--checkpoints", nargs="+", help="compare these checkpoints of --model (every pair)")
    cmp.add_argument(
        "--reference", help="with --checkpoints: compare each checkpoint against this one only (a trajectory)"
    )
    cmp.add_argument("--data", required=True, help="image folder, .txt of sentences, or .pt / .npy tensor file")
    cmp.add_argument(
        "--layers-a", nargs="+", help="layer names or globs (default: the adapter's blocks; see `repsim layers`)"
    )
    cmp.add_argument("--layers-b", nargs="+", help="layer names or globs for model B (default: as for A)")


def _add_estimate(cmp: argparse.ArgumentParser) -> None:
    """How the map is computed: the measure and estimator, the reductions, the batches, the permutations, the seed."""
    cmp.add_argument(
        "--measure",
        default=DEFAULT_MEASURE,
        help=f"measure id or alias, see `repsim measures` (default: {DEFAULT_MEASURE}; cka = biased linear CKA)",
    )
    cmp.add_argument(
        "--estimator", default="auto", choices=list(ESTIMATOR_CHOICES), help="how to compute it (default: auto)"
    )
    cmp.add_argument(
        "--tokens",
        default="mean",
        choices=list(TOKEN_POLICIES),
        help="token reduction for (n, L, d) outputs (default: mean)",
    )
    cmp.add_argument(
        "--spatial",
        default="flatten",
        choices=list(SPATIAL_POLICIES),
        help="spatial reduction for (n, C, H, W) outputs (default: flatten)",
    )
    cmp.add_argument("--batch-size", type=positive_int, default=32, help="inputs per forward pass (default: 32)")
    cmp.add_argument("--image-size", type=int, help="resize images to this size (default: the model's)")
    cmp.add_argument("--max-batches", type=positive_int, help="stop after this many batches (default: all the data)")
    cmp.add_argument("--memory-budget", default="4GiB", help="memory the estimator may use (default: 4GiB)")
    cmp.add_argument(
        "--permutations",
        type=positive_int,
        help="permutation test per cell with this many permutations: p- and q-values (default: none)",
    )
    cmp.add_argument(
        "--seed",
        type=int,
        help="seed of the models the command builds and of the permutations, recorded (default: none)",
    )


def _add_outputs(cmp: argparse.ArgumentParser) -> None:
    """What the run writes and shows: the map files, the report, the state file to resume from, the progress bar."""
    cmp.add_argument(
        "--out", default="repsim-map", help="output path without suffix: writes .json and .png (default: repsim-map)"
    )
    cmp.add_argument("--report", metavar="DIR", help="also write DIR/index.html (a self-contained page) and its files")
    cmp.add_argument(
        "--resume-from",
        metavar="PATH",
        help="state file: saved every --save-every batches; re-running the same command resumes from it",
    )
    cmp.add_argument(
        "--save-every",
        type=positive_int,
        metavar="K",
        help="with --resume-from: save every K batches (default: adaptive, under ~5%% of the run time)",
    )
    cmp.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_compare(args: argparse.Namespace) -> int:
    """Run ``repsim compare``: a map of two models, or of checkpoints with ``--checkpoints``."""
    check_writable(out_stem(args.out).parent)  # a read-only --out is found now, not after the whole run
    if args.checkpoints:
        return _compare_checkpoints(args)
    return _compare_models(args)


def _statistics(function: Any, args: argparse.Namespace) -> dict[str, Any]:
    """``permutations=`` for ``function`` when asked for, and a clear error when this version cannot do it."""
    if args.permutations is None:
        return {}
    if args.permutations < 1:
        raise RepsimError(f"--permutations must be a positive number of permutations, got {args.permutations}.")
    if "permutations" not in inspect.signature(function).parameters:
        raise RepsimError(
            f"--permutations is not available yet: this version's {function.__name__}() has no permutation test "
            "per cell. Drop the flag, or use rp.stats.permutation_test on one pair of layers."
        )
    return {"permutations": args.permutations}


def _common(args: argparse.Namespace) -> dict[str, Any]:
    """The options :func:`~repsim_plugin.compare` and :func:`~repsim_plugin.compare_checkpoints` share."""
    return {
        "measure": args.measure,
        "estimator": args.estimator,
        "tokens": args.tokens,
        "spatial": args.spatial,
        "progress": not args.no_progress,
        "max_batches": args.max_batches,
        "memory_budget": args.memory_budget,
        "seed": args.seed,
        "resume_from": args.resume_from,
        "save_every": args.save_every,
    }


def _compare_checkpoints(args: argparse.Namespace) -> int:
    if not args.model:
        raise RepsimError("--checkpoints needs --model: the architecture the checkpoints belong to.")
    first = load_model(args.model, seed=args.seed)
    data = load_data(args.data, first, batch_size=args.batch_size, image_size=args.image_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SmallSampleBiasWarning)
        maps = compare_checkpoints(
            lambda: load_model(args.model, seed=args.seed).model,
            args.checkpoints,
            data,
            reference=args.reference,
            layers=_layers(args.layers_a),
            **_common(args),
            **_statistics(compare_checkpoints, args),
        )
    _replay(caught)
    names = checkpoint_stems([str(Path(p)) for p in args.checkpoints])
    stems = {}
    for key, result in maps.items():
        stems[key] = f"{names[result.extra['checkpoint_a']]}__vs__{names[result.extra['checkpoint_b']]}"
        _report(result, Path(args.out) / stems[key])
    trajectory = Trajectory.from_maps(maps) if args.reference and len(maps) > 1 else None
    if trajectory is not None:
        _print_trajectory(trajectory)
    if args.report:
        from .report import checkpoints_report

        checkpoints_report(maps, stems, trajectory, Path(args.report))
    return 0


def _compare_models(args: argparse.Namespace) -> int:
    if not args.model_a:
        raise RepsimError("give --model-a (and --model-b, or --checkpoints with --model).")
    model_a = load_model(args.model_a, args.checkpoint_a, seed=args.seed)
    spec_b = args.model_b or args.model_a
    model_b = (
        model_a
        if (args.model_b is None and args.checkpoint_b is None)
        else load_model(spec_b, args.checkpoint_b, seed=None if args.seed is None else args.seed + 1)
    )
    data = load_data(args.data, model_a, batch_size=args.batch_size, image_size=args.image_size)
    data_b = None
    if model_b.kind == "hf" and model_b.source != model_a.source and Path(args.data).suffix == ".txt":
        data_b = load_data(args.data, model_b, batch_size=args.batch_size)  # model B's own tokenizer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SmallSampleBiasWarning)
        result = compare(
            model_a.model,
            model_b.model,
            data,
            _layers(args.layers_a),
            _layers(args.layers_b),
            data_b=data_b,
            names=(model_label(args.model_a, args.checkpoint_a), model_label(spec_b, args.checkpoint_b)),
            **_common(args),
            **_statistics(compare, args),
        )
    _replay(caught)
    _report(result, out_stem(args.out))
    if args.report:
        from .report import map_report

        map_report(result, Path(args.report))
    return 0


def _replay(caught: list[warnings.WarningMessage]) -> None:
    """Warnings other than the small-sample bias one go out as usual; that one is said in the table instead."""
    for item in caught:
        if not issubclass(item.category, SmallSampleBiasWarning):
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)


def _layers(values: Sequence[str] | None) -> list[str] | None:
    return list(values) if values else None


def _report(result: SimilarityMap, out: Path) -> None:
    """Write ``out.json`` and ``out.png`` (both atomically), say so, and print the summary."""
    written = [result.save(with_suffix(out, ".json")), with_suffix(out, ".png")]
    result.plot(written[1])
    for path in written:
        print(f"wrote {path}")
    print(summary(result))


def summary(result: SimilarityMap) -> str:
    """The console summary: each layer of A's best match, its null baseline and p / q-value, marks, and notes."""
    from ..report.cells import measure_info, not_significant, weak_cells

    info = measure_info(result.measure)
    lines = [
        f"{info.short} = {result.measure} ({info.direction}; {result.estimator}, n={result.n}): "
        f"{len(result.layers_a)} x {len(result.layers_b)} map"
    ]
    stats = result.statistics()
    weak = weak_cells(result)
    width = min(30, max([len(n) for n in [*result.layers_a, *result.layers_b]] + [15]))
    header = f"  {'layer of A':<{width}}  {'best match in B':<{width}}  {'value':>7}  {'null':>7}"
    header += "".join(f"  {k.split('_')[0]:>7}" for k in ("p_value", "q_value") if stats[k] is not None)
    lines.append(header)
    pick = (lambda row: int(row.argmax())) if info.larger_is_more_similar else (lambda row: int(row.argmin()))
    for i, layer in enumerate(result.layers_a):
        j = pick(result.values[i])
        null = stats["null"]
        row = f"  {layer:<{width}}  {result.layers_b[j]:<{width}}  {float(result.values[i, j]):>7.4f}"
        row += f"  {float(null[i, j]):>7.4f}" if null is not None else f"  {'n/a':>7}"
        for key in ("p_value", "q_value"):
            matrix = stats[key]
            if matrix is not None:
                row += f"  {float(matrix[i, j]):>7.3g}"
        if weak is not None and bool(weak[i, j]):
            row += "  (not beating the null baseline)" if not _beats(result, i, j) else "  (not significant)"
        lines.append(row)
    if stats["null"] is None:
        lines.append(f"  null baseline: {result.extra.get('null_baseline_note', 'not recorded')}")
    else:
        lines.append("  null: what independent random features of each cell's shape read (the map's null_baseline)")
    weak_sig, stat = not_significant(result)
    if weak_sig is not None:
        lines.append(f"  {int(weak_sig.sum())} of {weak_sig.numel()} cells have {stat} >= 0.05")
    null = stats["null"]
    if null is not None and "hsic=gretton" in result.measure and float(null.max()) > 0.1:
        lines.append(
            f"note: biased CKA is inflated at n={result.n}: unrelated features of these shapes already read up to "
            f"{float(null.max()):.2f}. Rerun with --measure debiased_cka (about 0 for unrelated features), or use "
            "more samples."
        )
    return "\n".join(lines)


def _beats(result: SimilarityMap, i: int, j: int) -> bool:
    from ..report.cells import beats_null

    beats = beats_null(result)
    return True if beats is None else bool(beats[i, j])


def _print_trajectory(trajectory: Trajectory) -> None:
    print(f"trajectory: each layer against {trajectory.reference}")
    width = max(len(c) for c in trajectory.checkpoints)
    print(f"  {'checkpoint':<{width}}  " + "  ".join(f"{layer[-12:]:>12}" for layer in trajectory.layers))
    for t, ckpt in enumerate(trajectory.checkpoints):
        print(f"  {ckpt:<{width}}  " + "  ".join(f"{v:>12.4f}" for v in trajectory.values[t].tolist()))
