"""``repsim demo``: the offline tour of :mod:`repsim_plugin.demo`; it ends with ``OUT/index.html``."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "cmd_demo"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    demo = subparsers.add_parser(
        "demo",
        help="the offline tour: digits CNNs, checkpoints, MiniLM, the stress test, an audit; writes OUT/index.html",
        description="The offline tour of the package (a few minutes on 2 cores); every section is a page under --out.",
    )
    demo.add_argument("--out", default="out", help="folder for the pages, maps, plots and reports (default: out)")
    demo.add_argument("--quick", action="store_true", help="a shorter run (fewer optimisation steps)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)
    return demo


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo with the command's ``--out`` and ``--quick``."""
    from ..demo import main as demo_main  # the demo trains models: load it only when it runs

    flags = (["--quick"] if args.quick else []) + (["--no-progress"] if getattr(args, "no_progress", False) else [])
    return demo_main(["--out", args.out, *flags])
