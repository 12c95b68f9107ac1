"""Reports people read in a browser: self-contained HTML pages of maps, checkpoint trajectories and audits.

``SimilarityMap.to_html``, ``Trajectory.to_html`` and ``AuditReport.to_html`` write one page each
(:mod:`.pages`); :func:`~.pages.index_page` links several; :mod:`.heatmap` draws a map so that its numbers read
right (fixed range, direction, null baseline, marked cells); :mod:`.cells` decides which cells are marked.
"""

from __future__ import annotations

from .pages import IndexEntry, audit_page, index_page, map_page, trajectory_page

__all__ = ["IndexEntry", "audit_page", "index_page", "map_page", "trajectory_page"]
