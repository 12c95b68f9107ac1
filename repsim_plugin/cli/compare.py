"""``repsim compare``: the layer x layer similarity map of two models, or of every pair of checkpoints of one model.

Each map is written as ``.json`` (lossless, :meth:`SimilarityMap.save`) and ``.png`` (its heatmap), and summarised
on the console with each layer of A's best match in B.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..capture import SPATIAL_POLICIES, TOKEN_POLICIES
from ..compare import ESTIMATOR_CHOICES, compare, compare_checkpoints
from ..errors import RepsimError
from ..results import SimilarityMap
from .checks import check_writable, checkpoint_stems, out_stem, positive_int, with_suffix
from .loaders import load_data, load_model, model_label

__all__ = ["add_parser", "cmd_compare"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    cmp = subparsers.add_parser("compare", help="layer x layer similarity map of two models or of checkpoints")
    cmp.add_argument("--model-a", help="timm:NAME, hf:PATH or module:pkg.mod:factory")
    cmp.add_argument("--model-b", help="as --model-a (default: the same architecture)")
    cmp.add_argument("--checkpoint-a", help="weights for model A (.safetensors, or a torch state dict)")
    cmp.add_argument("--checkpoint-b", help="weights for model B")
    cmp.add_argument("--model", help="architecture of --checkpoints")
    cmp.add_argument("--checkpoints", nargs="+", help="compare these checkpoints of --model (every pair)")
    cmp.add_argument("--reference", help="with --checkpoints: compare each checkpoint against this one only")
    cmp.add_argument("--data", required=True, help="image folder, .txt of sentences, or .pt / .npy tensor file")
    cmp.add_argument("--layers-a", nargs="+", help="layer names or globs (default: the adapter's blocks)")
    cmp.add_argument("--layers-b", nargs="+", help="layer names or globs for model B")
    cmp.add_argument("--measure", default="cka", help="measure id or alias (see `repsim measures`)")
    cmp.add_argument("--estimator", default="auto", choices=list(ESTIMATOR_CHOICES))
    cmp.add_argument("--tokens", default="mean", choices=list(TOKEN_POLICIES))
    cmp.add_argument("--spatial", default="flatten", choices=list(SPATIAL_POLICIES))
    cmp.add_argument("--batch-size", type=positive_int, default=32)
    cmp.add_argument("--image-size", type=int, help="resize images to this size (default: the model's)")
    cmp.add_argument("--max-batches", type=positive_int)
    cmp.add_argument("--memory-budget", default="4GiB")
    cmp.add_argument("--seed", type=int)
    cmp.add_argument("--out", default="repsim-map", help="output path without suffix: writes .json and .png")
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
    cmp.add_argument("--no-progress", action="store_true")
    cmp.set_defaults(func=cmd_compare)
    return cmp


def cmd_compare(args: argparse.Namespace) -> int:
    """Run ``repsim compare``: a map of two models, or of checkpoints with ``--checkpoints``."""
    check_writable(out_stem(args.out).parent)  # a read-only --out is found now, not after the whole run
    if args.checkpoints:
        return _compare_checkpoints(args)
    return _compare_models(args)


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
    maps = compare_checkpoints(
        lambda: load_model(args.model, seed=args.seed).model,
        args.checkpoints,
        data,
        reference=args.reference,
        layers=_layers(args.layers_a),
        **_common(args),
    )
    stems = checkpoint_stems([str(Path(p)) for p in args.checkpoints])
    folder = Path(args.out)
    for result in maps.values():
        a, b = stems[result.extra["checkpoint_a"]], stems[result.extra["checkpoint_b"]]
        _report(result, folder / f"{a}__vs__{b}")
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
    result = compare(
        model_a.model,
        model_b.model,
        data,
        _layers(args.layers_a),
        _layers(args.layers_b),
        data_b=data_b,
        names=(model_label(args.model_a, args.checkpoint_a), model_label(spec_b, args.checkpoint_b)),
        **_common(args),
    )
    _report(result, out_stem(args.out))
    return 0


def _layers(values: Sequence[str] | None) -> list[str] | None:
    return list(values) if values else None


def _report(result: SimilarityMap, out: Path) -> None:
    """Write ``out.json`` and ``out.png`` (both atomically), say so, and print the summary."""
    written = [result.save(with_suffix(out, ".json")), with_suffix(out, ".png")]
    result.plot(written[1])
    for path in written:
        print(f"wrote {path}")
    print(f"{result.measure} ({result.estimator}, n={result.n}): {len(result.layers_a)} x {len(result.layers_b)} map")
    for layer, match in result.best_match_per_row().items():
        print(f"  {layer:<30} best match {match:<30} {result[layer, match]:.4f}")
