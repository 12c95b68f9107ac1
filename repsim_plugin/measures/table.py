"""The README's table of measures, rendered from the registry's metadata (never written by hand)."""

from __future__ import annotations

from .registry import list_measures, make

_SHORT = {
    "orthogonal": "O",
    "isotropic_scaling": "S",
    "translation": "T",
    "invertible_linear": "IL",
    "permutation": "P",
}
_ORDER = ("orthogonal", "isotropic_scaling", "translation", "permutation", "invertible_linear")


def _direction(larger_is_more_similar: bool, is_metric: bool) -> str:
    if larger_is_more_similar:
        return "higher = more similar"
    return "lower = more similar (metric)" if is_metric else "lower = more similar"


def measures_table_markdown(pattern: str = "*") -> str:
    """A markdown table of every registered measure matching ``pattern``.

    Columns: canonical id, aliases, direction (and whether it is a metric), symmetric, invariances
    (O orthogonal, S isotropic scaling, T translation, P feature permutation, IL invertible linear),
    streamable, differentiable. A legend follows the table.
    """
    rows = [
        "| id | aliases | direction | symmetric | invariances | streamable | differentiable |",
        "|---|---|---|---|---|---|---|",
    ]
    for mid in list_measures(pattern):
        m = make(mid)
        aliases = ", ".join(f"`{a}`" for a in m.aliases) or "-"
        invariances = ", ".join(_SHORT[k] for k in _ORDER if k in m.invariances) or "-"
        rows.append(
            f"| `{m.id}` | {aliases} | {_direction(m.larger_is_more_similar, m.is_metric)} | "
            f"{'yes' if m.symmetric else 'no'} | {invariances} | {'yes' if m.streamable else 'no'} | "
            f"{'yes' if m.differentiable else 'no'} |"
        )
    legend = (
        "Invariances: O orthogonal, S isotropic scaling, T translation, P feature permutation, IL invertible "
        "linear map, each verified numerically by `repsim_plugin.testing.check_measure`. Any member of a "
        "family can be built with other parameters, e.g. `make('svcca', dims=20)`, `make('mutual_knn', topk=5)`."
    )
    return "\n".join(rows) + "\n\n" + legend + "\n"


__all__ = ["measures_table_markdown"]
