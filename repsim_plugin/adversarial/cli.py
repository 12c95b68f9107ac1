"""``repsim audit``: audit a similarity claim between two models' layers from the command line.

Models and data are read as by ``repsim compare`` (``timm:NAME``, ``hf:PATH``, ``module:pkg.mod:factory`` with
``--checkpoint-*``; an image folder, a ``.txt`` of sentences for ``hf:`` models, or a ``.pt`` / ``.npy`` tensor).
The report is printed as markdown and written under ``--out`` as ``audit.md``, ``audit.json`` and ``audit.png``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import RepsimError
from .audit import DEFAULT_MEASURES

__all__ = ["add_audit_parser", "load_labels", "run_audit_command"]


def add_audit_parser(subparsers: Any, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """Add the ``audit`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``), calling ``func``."""
    parser = subparsers.add_parser(
        "audit",
        help="how far can a similarity claim between two layers be moved while model A's outputs stay the same",
        description=(
            "Measure the claim (linear CKA between --layer-a of model A and --layer-b of model B), fine-tune A toward "
            "a low and a high CKA while its outputs are kept, apply the paper's analytic stress tests (a class moved "
            "where the next linear layer cannot see it, a single outlier), and report every measure before and after."
        ),
    )
    parser.add_argument("--model-a", required=True, help="timm:NAME, hf:PATH or module:pkg.mod:factory")
    parser.add_argument("--checkpoint-a", help="weights for model A (.safetensors, or a torch state dict)")
    parser.add_argument("--model-b", help="as --model-a (default: the same architecture)")
    parser.add_argument("--checkpoint-b", help="weights for model B")
    parser.add_argument("--layer-a", required=True, help="the layer of model A the claim is about")
    parser.add_argument("--layer-b", help="the layer of model B (default: --layer-a)")
    parser.add_argument("--data", required=True, help="inputs to fine-tune on (image folder, .txt, .pt / .npy)")
    parser.add_argument("--eval-data", help="held-out inputs for the reported numbers (default: --data)")
    parser.add_argument("--labels", help=".pt / .npy file of class labels for --data (optional)")
    parser.add_argument("--eval-labels", help=".pt / .npy file of class labels for --eval-data (optional)")
    parser.add_argument(
        "--measures", nargs="+", default=list(DEFAULT_MEASURES), help="measure ids or aliases, side by side"
    )
    parser.add_argument("--claim-measure", default="cka", help="the measure the claim is about (default: cka)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="outputs kept: agreement >= 1 - tolerance")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per run (0: analytic tests only)")
    parser.add_argument("--targets", type=float, nargs=2, default=[0.0, 1.0], metavar=("LOW", "HIGH"))
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=0.1, help="distillation temperature")
    parser.add_argument("--lambda-init", type=float, default=500.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--tokens", default="mean", choices=["mean", "cls", "last", "flatten", "as_samples"])
    parser.add_argument("--spatial", default="flatten", choices=["flatten", "mean", "as_samples"])
    parser.add_argument("--image-size", type=int, help="resize images to this size (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="repsim-audit", help="folder for audit.md, audit.json and audit.png")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=func)
    return parser


def load_labels(path: str) -> torch.Tensor:
    """A 1-D integer label tensor from a ``.pt`` (``torch.load(weights_only=True)``) or ``.npy`` file."""
    p = Path(path)
    if not p.is_file():
        raise RepsimError(f"labels file {path!r} does not exist.")
    if p.suffix == ".npy":
        labels = torch.from_numpy(np.ascontiguousarray(np.load(p, allow_pickle=False)))
    elif p.suffix in (".pt", ".pth"):
        try:
            labels = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise RepsimError(f"cannot load {path} with torch.load(weights_only=True): {exc}") from exc
    else:
        raise RepsimError(f"labels {path!r}: give a .pt or .npy file holding one integer class index per sample.")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise RepsimError(f"{path} must hold a 1-D integer tensor of class indices, got {shape}.")
    return labels.long()


def _inputs_only(batches: list[Any]) -> list[Any]:
    """Text batches from ``load_data`` carry sentence indices as ``labels``: those are not classes, drop them."""
    return [{k: v for k, v in b.items() if k != "labels"} if isinstance(b, dict) else b for b in batches]


def run_audit_command(args: argparse.Namespace) -> int:
    """Load the models and data, run :func:`~repsim_plugin.adversarial.audit`, print and write the report."""
    from ..cli import load_data, load_model
    from .audit import audit

    model_a = load_model(args.model_a, args.checkpoint_a)
    spec_b = args.model_b or args.model_a
    model_b = load_model(spec_b, args.checkpoint_b)
    read = {"batch_size": args.batch_size, "image_size": args.image_size}
    data = _inputs_only(load_data(args.data, model_a, **read))
    eval_data = _inputs_only(load_data(args.eval_data, model_a, **read)) if args.eval_data else None
    labels = load_labels(args.labels) if args.labels else None
    eval_labels = load_labels(args.eval_labels) if args.eval_labels else None
    if eval_labels is not None and eval_data is None:
        raise RepsimError("--eval-labels needs --eval-data.")

    def label(spec: str, checkpoint: str | None) -> str:
        return f"{spec} @ {Path(checkpoint).name}" if checkpoint else spec

    report = audit(
        model_a.model,
        args.layer_a,
        model_b.model,
        args.layer_b or args.layer_a,
        data,
        measures=args.measures,
        tolerance=args.tolerance,
        claim_measure=args.claim_measure,
        targets=tuple(args.targets),
        steps=args.steps,
        eval_data=eval_data,
        labels=labels,
        eval_labels=eval_labels,
        seed=args.seed,
        progress=not args.no_progress,
        tokens=args.tokens,
        spatial=args.spatial,
        batch_size=args.batch_size,
        names=(label(args.model_a, args.checkpoint_a), label(spec_b, args.checkpoint_b)),
        lr=args.lr,
        temperature=args.temperature,
        lambda_init=args.lambda_init,
    )
    from ..results import _atomic_write

    markdown = report.to_markdown()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "audit.md", lambda handle: handle.write(markdown))  # files first, then the console
    report.save(out / "audit.json")
    report.plot(out / "audit.png")
    print(markdown)
    for name in ("audit.md", "audit.json", "audit.png"):
        print(f"wrote {out / name}")
    return 0
