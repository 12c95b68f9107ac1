"""Files: atomic writes with normal permissions, and loading that never runs pickled code.

Every file the package writes goes through :func:`atomic_write` (a temporary file in the target folder, fsync,
``os.replace``), so a crash leaves the old file or the new one, never half of one. Tensors are read with
``torch.load(weights_only=True)`` or safetensors, and numpy arrays with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import RepsimError

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[Any], None], mode: str = "w") -> Path:
    """Write ``path`` through ``write(handle)`` atomically; the file gets the usual mode (0666 minus the umask)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomic :func:`atomic_write` of a text file (UTF-8)."""
    return atomic_write(path, lambda handle: handle.write(text))


def load_torch(path: str | os.PathLike[str], what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers only, no pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RepsimError(
            f"cannot load {what} {str(path)!r} with torch.load(weights_only=True): {exc}. Only tensors and plain "
            "containers are accepted (no pickled code); re-save it with torch.save of tensors, or use safetensors."
        ) from exc


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:  # pragma: no cover - safetensors ships with the 'all' extra
        raise RepsimError("reading .safetensors needs the safetensors package: pip install safetensors") from exc
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError (truncated, corrupt header) is not an OSError / ValueError
        raise RepsimError(
            f"cannot read {str(path)!r} as safetensors ({type(exc).__name__}: {exc}); the file is truncated or not "
            "a safetensors file. Write it again with safetensors.torch.save_file."
        ) from exc


def load_numpy(path: str | os.PathLike[str]) -> np.ndarray:
    """A ``.npy`` array, read with ``allow_pickle=False``."""
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise RepsimError(f"cannot read {str(path)!r} as a .npy array (no pickled objects allowed): {exc}") from exc


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A model state dict from ``.safetensors`` or a torch file (``weights_only=True``: no pickle code runs).

    A torch file holding ``{"state_dict": ...}`` or ``{"model": ...}`` (a training checkpoint) yields the nested
    state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise RepsimError(f"checkpoint {str(path)!r} does not exist or is not a file.")
    if path.suffix.lower() == ".safetensors":
        return load_safetensors(path)
    state = load_torch(path, "checkpoint")
    if isinstance(state, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            nested = state.get(key)
            if isinstance(nested, Mapping) and all(isinstance(v, torch.Tensor) for v in nested.values()):
                return dict(nested)
        if all(isinstance(v, torch.Tensor) for v in state.values()):
            return dict(state)
    raise RepsimError(
        f"{str(path)!r} does not hold a state dict (a mapping of names to tensors, possibly under 'state_dict' / "
        "'model'); save one with torch.save(model.state_dict(), path)."
    )
