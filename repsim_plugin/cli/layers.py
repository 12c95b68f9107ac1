"""``repsim layers``: the layer names of a model spec, and which of them the adapter captures by default."""

from __future__ import annotations

import argparse
import fnmatch
import textwrap
from typing import Any

from .loaders import load_model

__all__ = ["add_parser", "cmd_layers"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``layers`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    parser = subparsers.add_parser(
        "layers",
        help="list a model's layer names (and the default layers compare captures)",
        description=textwrap.fill(
            "Build MODEL (timm:NAME, hf:PATH or module:pkg.mod:factory, as for `repsim compare`) and list its "
            "modules: name, type and parameter count, with the adapter's default layers marked '*'. Use the names "
            "(or globs of them) with --layers-a / --layers-b."
        ),
        epilog=(
            "examples:\n  repsim layers timm:resnet18\n  repsim layers hf:/path/to/minilm --match 'encoder.layer.*'\n"
            "  repsim layers module:repsim_plugin.digits:build_digits_cnn --defaults"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="timm:NAME, hf:PATH or module:pkg.mod:factory")
    parser.add_argument("--match", help="only names matching this glob (e.g. 'layer*'; default: all)")
    parser.add_argument("--defaults", action="store_true", help="only the adapter's default layers, one per line")
    parser.set_defaults(func=cmd_layers)
    return parser


def cmd_layers(args: argparse.Namespace) -> int:
    """Print the module names of ``args.model`` with their types; '*' marks the adapter's default layers."""
    from ..adapters import for_model

    loaded = load_model(args.model)
    adapter = for_model(loaded.model)
    defaults = adapter.default_layers()
    if args.defaults:
        print("\n".join(defaults))
        return 0
    rows = []
    for name, module in loaded.model.named_modules():
        if not name or (args.match and not fnmatch.fnmatchcase(name, args.match)):
            continue
        params = sum(p.numel() for p in module.parameters(recurse=True))
        rows.append(("*" if name in defaults else " ", name, type(module).__name__, params))
    width = max([len(r[1]) for r in rows] + [10])
    print(f"{args.model}: {type(loaded.model).__name__}, adapter {type(adapter).__name__}")
    print(f"default layers ({len(defaults)}, marked *): {' '.join(defaults)}\n")
    for mark, name, kind, params in rows:
        print(f"{mark} {name:<{width}}  {kind:<24} {params:>12,}")
    if not rows:
        print(f"(no module name matches {args.match!r})")
    return 0
