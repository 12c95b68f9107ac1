"""``--report DIR`` of the commands: ``DIR/index.html`` (self-contained) next to the PNG and JSON it shows."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..report.pages import IndexEntry, audit_page, index_page, map_page, map_summary, trajectory_page

__all__ = ["audit_report", "checkpoints_report", "map_report"]


def map_report(result: Any, folder: Path) -> Path:
    """``DIR/index.html``, ``DIR/map.png``, ``DIR/map.json`` for one map; prints where the page is."""
    result.save(folder / "map.json")
    result.plot(folder / "map.png")
    page = map_page(result, folder / "index.html")
    print(f"wrote {folder / 'map.json'}, {folder / 'map.png'}\nreport: {page.resolve()}")
    return page


def checkpoints_report(
    maps: Mapping[tuple[str, str], Any], stems: Mapping[tuple[str, str], str], trajectory: Any, folder: Path
) -> Path:
    """One page per checkpoint pair (with its PNG and JSON), the trajectory when there is one, and an index."""
    entries = []
    if trajectory is not None:
        trajectory.save(folder / "trajectory.json")
        trajectory.plot(folder / "trajectory.png")
        trajectory_page(trajectory, folder / "trajectory.html")
        entries.append(
            IndexEntry(
                f"trajectory against {trajectory.reference}",
                "trajectory.html",
                f"Each layer against {trajectory.reference} across {len(trajectory.checkpoints)} checkpoints.",
                (folder / "trajectory.png").read_bytes(),  # the plot just written, not drawn a second time
            )
        )
    for key, result in maps.items():
        stem = stems[key]
        result.save(folder / f"{stem}.json")
        result.plot(folder / f"{stem}.png")
        map_page(result, folder / f"{stem}.html", title=f"{key[0]} vs {key[1]}")
        thumb = (folder / f"{stem}.png").read_bytes()
        entries.append(IndexEntry(f"{key[0]} vs {key[1]}", f"{stem}.html", map_summary(result), thumb))
    page = index_page(folder / "index.html", "checkpoint comparison", entries)
    print(f"report: {page.resolve()}")
    return page


def audit_report(report: Any, folder: Path) -> Path:
    """``DIR/index.html``, ``DIR/audit.png``, ``DIR/audit.json`` for an audit."""
    report.save(folder / "audit.json")
    report.plot(folder / "audit.png")
    page = audit_page(report, folder / "index.html")
    print(f"report: {page.resolve()}")
    return page
