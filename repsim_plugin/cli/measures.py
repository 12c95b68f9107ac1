"""``repsim measures``: the registered measures, as a markdown table or as their full metadata in JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .._utils.suggest import close_matches
from ..errors import UnknownNameError
from ..measures import aliases, list_measures, make
from ..measures.table import measures_table_markdown

__all__ = ["add_parser", "cmd_measures"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``measures`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    meas = subparsers.add_parser(
        "measures",
        help="list the registered measures with their metadata",
        description="List the registered measures (ids, aliases, direction, invariances, estimators).",
        epilog="examples:\n  repsim measures\n  repsim measures 'cka*'\n  repsim measures procrustes --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    meas.add_argument("pattern", nargs="?", default="*", help="glob over ids and aliases, e.g. 'cka*' (default: *)")
    meas.add_argument("--json", action="store_true", help="full metadata as JSON")
    meas.set_defaults(func=cmd_measures)
    return meas


def cmd_measures(args: argparse.Namespace) -> int:
    """Print the measures matching ``args.pattern``; no match is an error that suggests close names."""
    ids = list_measures(args.pattern)
    if not ids:
        known = [*list_measures(), *aliases()]
        hints = close_matches(args.pattern.strip("*?"), known) or close_matches(args.pattern, known)
        hint = f" Did you mean {', '.join(repr(h) for h in hints)}?" if hints else ""
        raise UnknownNameError(
            f"no measure matches {args.pattern!r}.{hint} Run `repsim measures` for the full list; globs use * and ?, "
            "e.g. 'cka*'."
        )
    if args.json:
        print(json.dumps([make(mid).metadata() for mid in ids], indent=1))
    else:
        print(measures_table_markdown(args.pattern))
    return 0
