"""One "did you mean" for every unknown name (measures, layers, policies, adapters, map rows)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_matches(name: object, known: Iterable[str], n: int = 4) -> list[str]:
    """Up to ``n`` known names closest to ``name`` (difflib ratio >= 0.5), best first."""
    return difflib.get_close_matches(str(name), list(known), n=n, cutoff=0.5)


def did_you_mean(name: object, known: Iterable[str], n: int = 4) -> str:
    """``" Did you mean 'a', 'b'?"`` for the closest known names, or ``""`` when none is close."""
    close = close_matches(name, known, n)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""
