"""Read a report page with a real HTML parser: its pictures, its links, its tables (tests only)."""

from __future__ import annotations

import base64
from html.parser import HTMLParser
from pathlib import Path


class Page(HTMLParser):
    """Collects ``<img>`` sources, every URL-bearing attribute, and the text of every table cell by table."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.urls: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src") or "")
        for key in ("href", "src", "action", "data", "poster"):
            if values.get(key):
                self.urls.append(values[key] or "")
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def read_page(path: Path) -> Page:
    """Parse ``path``; check that it is self-contained: pictures are embedded PNGs, links stay local."""
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    for src in page.images:
        assert src.startswith("data:image/png;base64,"), src[:60]
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for url in page.urls:
        assert not url.startswith(("http:", "https:", "//", "ftp:")), url
        assert url.startswith(("data:", "#")) or (path.parent / url).exists(), url
    assert "<link" not in path.read_text(encoding="utf-8") and "<script" not in path.read_text(encoding="utf-8")
    return page
