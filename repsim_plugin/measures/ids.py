"""Measure ids: the structured :class:`Spec` and the id string rendered from it.

Canonical ids follow the grammar of the similarity-repository registry so results cross-reference:
``name-key=value-key=value-suffix``, where a value may itself be a parenthesised spec, e.g.
``cka-kernel=(rbf-sigma=0.5)-hsic=gretton-score``. The id is always *rendered* from a :class:`Spec`, never written
by hand, and ``Spec.parse(spec.render()) == spec`` up to value types.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import RepsimError

_TOKEN = re.compile(r"^[A-Za-z0-9_.+]+$")


def _render_value(value: Any) -> str:
    if isinstance(value, Spec):
        return f"({value.render()})"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RepsimError(f"parameter values must be finite, got {value}.")
        return repr(value)
    text = str(value)
    if not _TOKEN.match(text):
        raise RepsimError(
            f"parameter value {text!r} cannot appear in an id: use letters, digits, '_', '.' or '+' only."
        )
    return text


@dataclass(frozen=True)
class Spec:
    """Structured form of a measure id: a name, ordered parameters, an optional suffix (``score``, ...)."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    suffix: str | None = None

    def __post_init__(self) -> None:
        for token in (self.name, *(k for k, _ in self.params), *([self.suffix] if self.suffix else [])):
            if not _TOKEN.match(token):
                raise RepsimError(f"{token!r} is not a valid id token: use letters, digits, '_', '.' or '+'.")

    def render(self) -> str:
        """The canonical id string."""
        parts = [self.name, *(f"{k}={_render_value(v)}" for k, v in self.params)]
        if self.suffix:
            parts.append(self.suffix)
        return "-".join(parts)

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    @classmethod
    def parse(cls, text: str) -> Spec:
        """Parse an id string; values in parentheses become nested specs, other values stay strings."""
        parts = _split_top_level(text)
        if not parts or not parts[0] or "=" in parts[0]:
            raise RepsimError(f"{text!r} is not a measure id (expected name-key=value-...).")
        params: list[tuple[str, Any]] = []
        suffix = None
        for i, part in enumerate(parts[1:], start=1):
            if "=" in part:
                key, _, value = part.partition("=")
                if value.startswith("(") and value.endswith(")"):
                    params.append((key, cls.parse(value[1:-1])))
                else:
                    params.append((key, value))
            elif i == len(parts) - 1:
                suffix = part
            else:
                raise RepsimError(f"{text!r}: {part!r} must be key=value (only the last part may be a suffix).")
        return cls(parts[0], tuple(params), suffix)


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise RepsimError(f"unbalanced parentheses in {text!r}.")
        if ch == "-" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise RepsimError(f"unbalanced parentheses in {text!r}.")
    parts.append("".join(current))
    return parts


# --- ids of the similarity-repository registry ---------------------------------------------------------------------
#
# similarity-repository (github.com/nacloos/similarity-repository) standardises measure names across ~30 code bases
# with the same grammar. 28 of our 42 canonical ids appear verbatim in its standardised list (SHARED_IDS); four of
# its names denote one of our measures under another spelling (SIMILARITY_REPOSITORY_NAMES, plus the parametric
# svcca-var=<f>-score / svcca-dim=<k>-score); the rest are ours alone (see the README's table).

#: their name -> our canonical id (the same quantity). Their ``pwcca-score`` is google/svcca's ``compute_pwcca``,
#: which weights the canonical correlations by the side with fewer neurons (X on a tie): our ``direction=fewer``.
SIMILARITY_REPOSITORY_NAMES: dict[str, str] = {
    "cca-score": "cca-mean=r-score",
    "cca-squared_score": "cca-mean=r2-score",
    "pwcca-score": "pwcca-direction=fewer-score",
    "svcca-var=0.99-score": "svcca-keep=0.99-score",
}

#: our canonical ids that similarity-repository's standardised list holds verbatim
SHARED_IDS: frozenset[str] = frozenset(
    {
        "cka-kernel=linear-hsic=gretton-score",
        "cka-kernel=linear-hsic=song-score",
        "cka-kernel=(rbf-sigma=0.5)-hsic=gretton-score",
        "cka-kernel=(rbf-sigma=0.5)-hsic=song-score",
        "cka-kernel=(rbf-sigma=1.0)-hsic=gretton-score",
        "cknna-topk=10",
        "mutual_knn-topk=10",
        "procrustes-distance=angular",
        "procrustes-distance=euclidean",
        "procrustes-score",
        *(
            f"rsa-rdm={rdm}-compare={compare}"
            for rdm in ("correlation", "cosine", "euclidean", "squared_euclidean")
            for compare in ("pearson", "spearman", "kendall")
        ),
        *(f"shape_metric-alpha={a}-distance={d}" for a in ("0.0", "0.5", "1.0") for d in ("angular", "euclidean")),
    }
)

_SVCCA_THEIRS = re.compile(r"^svcca-(var|dim)=([0-9.]+)-score$")


def from_similarity_repository(name: str) -> str | None:
    """Our canonical id for a similarity-repository name that spells one of our measures differently, else None.

    ``cca-score``, ``cca-squared_score``, ``pwcca-score``, ``svcca-var=<fraction>-score`` (their fraction of
    variance kept; ours ``keep=``) and ``svcca-dim=<k>-score`` (ours ``dims=``).
    """
    if name in SIMILARITY_REPOSITORY_NAMES:
        return SIMILARITY_REPOSITORY_NAMES[name]
    hit = _SVCCA_THEIRS.match(name)
    if hit is None:
        return None
    key, value = hit.groups()
    if key == "var":
        return f"svcca-keep={value}-score"
    return f"svcca-dims={value}-score"
