"""``repsim audit``: audit a similarity claim between two models' layers from the command line.

Models and data are read as by ``repsim compare`` (``timm:NAME``, ``hf:PATH``, ``module:pkg.mod:factory`` with
``--checkpoint-*``; an image folder, a ``.txt`` of sentences for ``hf:`` models, or a ``.pt`` / ``.npy`` tensor).
The report is printed as markdown and written under ``--out`` as ``audit.md``, ``audit.json`` and ``audit.png``.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

from .._utils.io import write_text
from ..adapters import for_model
from ..adversarial import AuditReport, audit
from ..capture import SPATIAL_POLICIES, TOKEN_POLICIES
from ..capture.layers import resolve_layers
from ..errors import RepsimError
from .checks import check_writable, positive_int
from .loaders import inputs_only, load_data, load_labels, load_model, model_label

__all__ = ["add_parser", "cmd_audit"]

#: Options passed on to the fine-tuning (``audit(**shift_kwargs)``): left out unless given, so that
#: :func:`~repsim_plugin.adversarial.shift` applies its own defaults.
SHIFT_OPTIONS = ("lr", "temperature", "lambda_init")
REPORT_FILES = ("audit.md", "audit.json", "audit.png")


def audit_defaults() -> dict[str, Any]:
    """The defaults of :func:`repsim_plugin.adversarial.audit`: the command reads them instead of copying them."""
    parameters = inspect.signature(audit).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``audit`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    defaults = audit_defaults()
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
        "--measures", nargs="+", default=list(defaults["measures"]), help="measure ids or aliases, side by side"
    )
    parser.add_argument(
        "--claim-measure",
        default=defaults["claim_measure"],
        help=f"the measure the claim is about (default: {defaults['claim_measure']})",
    )
    parser.add_argument(
        "--tolerance", type=float, default=defaults["tolerance"], help="outputs kept: agreement >= 1 - tolerance"
    )
    parser.add_argument(
        "--steps", type=int, default=defaults["steps"], help="fine-tuning steps per run (0: analytic tests only)"
    )
    parser.add_argument("--targets", type=float, nargs=2, default=list(defaults["targets"]), metavar=("LOW", "HIGH"))
    parser.add_argument("--lr", type=float, help="fine-tuning learning rate (default: shift's)")
    parser.add_argument("--temperature", type=float, help="distillation temperature (default: shift's)")
    parser.add_argument(
        "--lambda-init", type=float, help="initial lambda of the fine-tuning objective (default: shift's)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=defaults["batch_size"])
    parser.add_argument("--tokens", default=defaults["tokens"], choices=list(TOKEN_POLICIES))
    parser.add_argument("--spatial", default=defaults["spatial"], choices=list(SPATIAL_POLICIES))
    parser.add_argument("--image-size", type=int, help="resize images to this size (default: the model's)")
    parser.add_argument("--seed", type=int, default=defaults["seed"])
    parser.add_argument("--out", default="repsim-audit", help="folder for audit.md, audit.json and audit.png")
    parser.add_argument(
        "--report", metavar="DIR", help="also write DIR/index.html (a self-contained page) and its files"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=cmd_audit)
    return parser


def cmd_audit(args: argparse.Namespace) -> int:
    """Load the models and data, run :func:`~repsim_plugin.adversarial.audit`, write and print the report."""
    check_writable(Path(args.out))  # before the fine-tuning runs, not after
    model_a = load_model(args.model_a, args.checkpoint_a, seed=args.seed)
    spec_b = args.model_b or args.model_a
    model_b = load_model(spec_b, args.checkpoint_b, seed=None if args.seed is None else args.seed + 1)
    for flag, model, layer in (("--layer-a", model_a, args.layer_a), ("--layer-b", model_b, args.layer_b)):
        if layer is not None:  # an unknown layer: a usage error now, naming the flag
            try:
                resolve_layers(model.model, [layer], for_model(model.model))
            except RepsimError as exc:
                raise RepsimError(f"{flag} {layer!r}: {exc}") from None
    read = {"batch_size": args.batch_size, "image_size": args.image_size}
    data = inputs_only(load_data(args.data, model_a, **read))
    eval_data = inputs_only(load_data(args.eval_data, model_a, **read)) if args.eval_data else None
    labels = load_labels(args.labels) if args.labels else None
    eval_labels = load_labels(args.eval_labels) if args.eval_labels else None
    if eval_labels is not None and eval_data is None:
        raise RepsimError("--eval-labels needs --eval-data.")
    shift_options = {name: getattr(args, name) for name in SHIFT_OPTIONS if getattr(args, name) is not None}
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
        names=(model_label(args.model_a, args.checkpoint_a), model_label(spec_b, args.checkpoint_b)),
        **shift_options,
    )
    _write_report(report, Path(args.out))
    if args.report:
        from .report import audit_report

        audit_report(report, Path(args.report))
    return 0


def _write_report(report: AuditReport, out: Path) -> None:
    """The files first (``audit.md`` atomically, then the report's JSON and plot), then the console."""
    markdown = report.to_markdown()
    write_text(out / "audit.md", markdown)
    report.save(out / "audit.json")
    report.plot(out / "audit.png")
    print(markdown)
    for name in REPORT_FILES:
        print(f"wrote {out / name}")
