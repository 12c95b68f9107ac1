"""How far can a similarity claim be pushed while the model's outputs stay the same?

``transforms`` holds the paper's analytic stress tests (Davari et al., ICLR 2023) and is imported eagerly: it
needs only torch (and scipy for one QP). The model-level tools, ``shift`` (module ``shifting``) and ``audit``
(module ``audit``), are loaded on first attribute access, so importing this package stays cheap and does not
fail where those modules or their dependencies are absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

from .transforms import (
    add_outlier,
    invertible_linear,
    logit_change,
    outlier_limit,
    participation_ratio,
    scale_for_target_cka,
    separability_preserving_direction,
    subset_translation_cka,
    subset_translation_limit,
    translate_subset,
)

# public name -> (submodule, attribute)
_LAZY: dict[str, tuple[str, str]] = {
    "shift": ("shifting", "shift"),
    "ShiftResult": ("result", "ShiftResult"),
    "audit": ("audit", "audit"),
    "AuditReport": ("audit", "AuditReport"),
}


def _available(submodule: str) -> bool:
    return importlib.util.find_spec(f"{__name__}.{submodule}") is not None


__all__ = [
    "add_outlier",
    "invertible_linear",
    "logit_change",
    "outlier_limit",
    "participation_ratio",
    "scale_for_target_cka",
    "separability_preserving_direction",
    "subset_translation_cka",
    "subset_translation_limit",
    "translate_subset",
]
# Star-imports must not trip over a lazy name whose module is not there.
__all__ += [name for name, (submodule, _) in _LAZY.items() if _available(submodule)]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    submodule, attribute = _LAZY[name]
    try:
        module = importlib.import_module(f"{__name__}.{submodule}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{submodule}":
            raise  # a dependency of the submodule is missing: say which
        raise AttributeError(
            f"{__name__}.{name} is not available: the module {__name__}.{submodule} is not part of this installation."
        ) from error
    value = getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keep a public function from being shadowed by the submodule of the same name.

    Importing ``repsim_plugin.adversarial.audit`` (e.g. ``from repsim_plugin.adversarial.audit import AuditReport``
    in the CLI) makes the import system bind the *module* to this package's attribute ``audit``; the function
    ``audit`` would then be unreachable as ``rp.adversarial.audit(...)``. Bind the function instead.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        lazy = _LAZY.get(name)
        if (
            lazy is not None
            and lazy[0] == name
            and isinstance(value, types.ModuleType)
            and value.__name__ == f"{__name__}.{name}"
            and hasattr(value, lazy[1])
        ):
            value = getattr(value, lazy[1])
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
