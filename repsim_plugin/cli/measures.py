"""``repsim measures``: the registered measures, as a markdown table or as their full metadata in JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..measures import list_measures, make
from ..measures.table import measures_table_markdown

__all__ = ["add_parser", "cmd_measures"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``measures`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    meas = subparsers.add_parser("measures", help="list the registered measures with their metadata")
    meas.add_argument("pattern", nargs="?", default="*", help="glob over ids and aliases, e.g. 'cka*'")
    meas.add_argument("--json", action="store_true", help="full metadata as JSON")
    meas.set_defaults(func=cmd_measures)
    return meas


def cmd_measures(args: argparse.Namespace) -> int:
    """Print the measures matching ``args.pattern``."""
    if args.json:
        print(json.dumps([make(mid).metadata() for mid in list_measures(args.pattern)], indent=1))
    else:
        print(measures_table_markdown(args.pattern))
    return 0
