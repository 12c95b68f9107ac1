"""How far can a similarity claim be pushed while the model's outputs stay the same?

``transforms`` holds the paper's analytic stress tests (Davari et al., ICLR 2023) and is imported eagerly: it
needs only torch (and scipy for one QP, imported when called). The model-level tools are loaded on first
attribute access, so importing this package stays cheap: ``shift`` (module ``shifting``, with its objective in
``objective``, the perturbation in ``perturbation``, the targets in ``targets`` and the result in ``result``) and
``audit`` (module ``auditing``, with its changes in ``changes`` and the report in ``report``). No module is named
like a function, so importing any of them never shadows ``shift`` or ``audit``.
"""

from __future__ import annotations

import importlib
import importlib.util
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
    "ShiftConfig": ("shifting", "ShiftConfig"),
    "MODES": ("shifting", "MODES"),
    "CRITERIA": ("shifting", "CRITERIA"),
    "PRESERVE": ("objective", "PRESERVE"),
    "LowRankAffine": ("perturbation", "LowRankAffine"),
    "ShiftResult": ("result", "ShiftResult"),
    "audit": ("auditing", "audit"),
    "DEFAULT_MEASURES": ("auditing", "DEFAULT_MEASURES"),
    "AuditReport": ("report", "AuditReport"),
    "Change": ("report", "Change"),
    "plot_map_shift": ("plots", "plot_map_shift"),
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
