"""Checks the commands make before any work starts, and the names of the files they write.

Every result file name is derived here: ``--out`` is a stem (``.json`` / ``.png`` are appended, so a dot in it
stays), a trailing slash or an existing folder means "write into this folder", checkpoint maps are named from
the parts of their paths that differ, and two results never share one path. The output folder is checked to be
writable before a comparison runs, not after.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import RepsimError

__all__ = ["check_writable", "checkpoint_stems", "out_stem", "positive_int", "with_suffix"]

#: the stem used when ``--out`` names a folder
DEFAULT_STEM = "repsim-map"


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (a batch size, a number of batches)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def out_stem(out: str) -> Path:
    """The path stem of ``--out``: ``dir/`` or an existing folder -> ``dir/repsim-map``; ``name_v0.5`` stays."""
    if out.endswith(("/", os.sep)) or Path(out).is_dir():
        return Path(out) / DEFAULT_STEM
    return Path(out)


def with_suffix(stem: Path, suffix: str) -> Path:
    """``stem`` + ``suffix`` (appended: ``Path.with_suffix`` would replace whatever follows a dot)."""
    return stem.with_name(stem.name + suffix)


def check_writable(folder: Path, what: str = "--out") -> None:
    """Create ``folder`` if needed and check a file can be written there (before the run, not after it)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise RepsimError(
            f"{what}: cannot write into {str(folder)!r} ({exc.strerror or exc}); choose a writable folder."
        ) from None


def checkpoint_stems(paths: Sequence[str]) -> dict[str, str]:
    """A distinct file stem per checkpoint: its file name without the last suffix, with as many parent folders
    as it takes to tell the paths apart (``r1/model.pt``, ``r2/model.pt`` -> ``r1_model``, ``r2_model``)."""
    parts = [Path(p) for p in paths]
    for depth in range(1, max(len(p.parts) for p in parts) + 1):
        stems = ["_".join((*p.parent.parts[len(p.parent.parts) - depth + 1 :], p.stem)) for p in parts]
        stems = [s.replace(os.sep, "_") for s in stems]
        if len(set(stems)) == len(stems):
            return dict(zip(paths, stems, strict=True))
    return {p: f"{k}_{Path(p).stem}" for k, p in enumerate(paths)}
