"""``repsim demo``: the offline demo of :mod:`repsim_plugin.demo` (two digits CNNs compared, then the claim audited)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "cmd_demo"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    demo = subparsers.add_parser("demo", help="the offline demo: compare two digits CNNs and audit the claim")
    demo.add_argument("--out", default="out", help="folder for the map, the report and the plots")
    demo.add_argument("--quick", action="store_true", help="a shorter run (fewer optimisation steps)")
    demo.set_defaults(func=cmd_demo)
    return demo


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo with the command's ``--out`` and ``--quick``."""
    from ..demo import main as demo_main  # the demo trains models: load it only when it runs

    return demo_main(["--out", args.out] + (["--quick"] if args.quick else []))
