"""One "did you mean" for every unknown name (measures, layers, policies, adapters, map rows)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_matches(name: object, known: Iterable[str], n: int = 4) -> list[str]:
    """Up to ``n`` known names closest to ``name`` (difflib ratio >= 0.5), best first."""
    return difflib.get_close_matches(str(name), list(known), n=n, cutoff=0.5)


#: up to this many known names are all listed in an unknown-name message (beyond it: the closest ones only)
FEW = 16


def did_you_mean(name: object, known: Iterable[str], n: int = 4) -> str:
    """``" Did you mean 'a', 'b'?"`` for the closest known names; when there are few (an ``nn.Sequential``'s
    ``'0'``, ``'1'``, ...) all of them are listed too, so a name that resembles none still shows what exists."""
    names = list(dict.fromkeys(known))
    close = close_matches(name, names, n)
    out = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    if 0 < len(names) <= FEW:
        out += f" The known names are: {', '.join(map(repr, names))}."
    return out
