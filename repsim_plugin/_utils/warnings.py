"""One rule for where a warning points: the first frame outside repsim_plugin and the libraries it calls through.

A warning raised deep inside a comparison (a forward hook called by torch, an accumulator called by the engine)
should name the user's line, whatever the depth of the call chain.
"""

from __future__ import annotations

import sys
import warnings

#: module-name prefixes of frames that are never the user's: this package, and the libraries that call back into it
_INTERNAL = ("repsim_plugin", "torch", "contextlib", "functools", "tqdm", "importlib")


def _internal(module: str) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in _INTERNAL)


def caller_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` issued by the caller of this function (pointing at the user's frame)."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and _internal(str(frame.f_globals.get("__name__", ""))):
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` pointing at the user's frame (see :func:`caller_stacklevel`)."""
    warnings.warn(message, category, stacklevel=caller_stacklevel())
