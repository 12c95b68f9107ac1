"""The ``repsim`` command: ``repsim compare``, ``layers``, ``audit``, ``measures``, ``demo``.

Models are named ``timm:NAME`` (built with ``pretrained=False``; give weights with ``--checkpoint-*``),
``hf:PATH`` (a local HuggingFace model folder, loaded offline) or ``module:pkg.mod:factory`` (any callable returning an
``nn.Module``); each may carry keyword arguments after a comma, e.g. ``timm:resnet18,num_classes=10``. Data is a
folder of images, a text file with one sentence per line (for ``hf:`` models), or a ``.pt`` / ``.npy`` tensor file.

``loaders`` reads models, data and labels; each command is one module (``compare``, ``measures``, ``demo``,
``audit``) with ``add_parser(subparsers)`` and its ``cmd_<name>(args)``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import RepsimError
from . import audit, compare, demo, layers, measures
from .loaders import IMAGE_SUFFIXES, LoadedModel, load_data, load_labels, load_model

__all__ = ["IMAGE_SUFFIXES", "LoadedModel", "build_parser", "load_data", "load_labels", "load_model", "main"]

#: The subcommands, in the order ``repsim --help`` lists them.
COMMANDS = (compare, layers, measures, demo, audit)


def build_parser() -> argparse.ArgumentParser:
    """The ``repsim`` argument parser with every subcommand; each parsed namespace carries its ``func``."""
    parser = argparse.ArgumentParser(prog="repsim", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``repsim`` console script; returns the exit status (2 on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RepsimError as exc:
        print(f"repsim {args.command}: error: {exc}", file=sys.stderr)
        return 2
