"""Self-contained HTML: one page per file, styles inline, pictures embedded as base64 PNG, no network at all.

Small building blocks (escaped text, tables, embedded figures, a provenance list) that the pages of
:mod:`.pages` are assembled from. Nothing here links outside the page except relative links between pages of
one report folder.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._utils.io import write_text

__all__ = ["Cell", "esc", "figure_png", "img", "page", "provenance", "table", "write_page"]

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 32px 60px}
h1{font-size:1.55em;margin:.2em 0 .4em}h2{font-size:1.2em;margin:1.6em 0 .5em;border-bottom:1px solid #d8dce3}
h3{font-size:1.02em;margin:1.2em 0 .4em}
p.lead{font-size:1.04em;color:#333a47;max-width:900px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:14px 18px;margin:14px 0}
figure{margin:0}figure img{max-width:100%;height:auto;border:1px solid #e4e7ec;background:#fff}
figcaption{font-size:.86em;color:#5a6272;margin-top:4px;max-width:900px}
table{border-collapse:collapse;font-size:.86em;margin:6px 0 10px;background:#fff}
th,td{border:1px solid #dde1e8;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#eef1f5;text-align:center}td.l,th.l{text-align:left}
tr.weak td{color:#8a8f99;background:repeating-linear-gradient(135deg,#fff,#fff 5px,#f1f2f4 5px,#f1f2f4 10px)}
td.bad{color:#b42318;font-weight:600}td.good{color:#146c2e}
.scroll{max-height:460px;overflow:auto;border:1px solid #e4e7ec;display:inline-block;max-width:100%}
dl.prov{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;font-size:.85em;margin:6px 0}
dl.prov dt{color:#5a6272}dl.prov dd{margin:0;font-family:ui-monospace,Menlo,Consolas,monospace;word-break:break-all}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em;background:#eef1f5;padding:0 3px;
border-radius:3px}
.note{border-left:4px solid #e0a100;background:#fffaf0;padding:6px 12px;margin:10px 0;max-width:900px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:14px}
nav a{margin-right:14px}footer{margin-top:40px;font-size:.8em;color:#7a8190}
"""


def esc(value: Any) -> str:
    """Text escaped for HTML."""
    return html.escape(str(value), quote=True)


def figure_png(fig: Any, dpi: int | None = None) -> bytes:
    """A matplotlib figure as PNG bytes (in memory)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def img(png: bytes, alt: str, caption: str = "") -> str:
    """A ``<figure>`` with the PNG embedded as a data URI and an optional caption."""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


class Cell(str):
    """A table cell with a CSS class (``l`` left-aligned, ``bad``, ``good``); its text is already HTML."""

    css: str = ""

    def __new__(cls, text: str, css: str = "") -> Cell:
        obj = super().__new__(cls, text)
        obj.css = css
        return obj


def _td(cell: Any) -> str:
    if isinstance(cell, Cell):
        return f'<td class="{cell.css}">{cell}</td>' if cell.css else f"<td>{cell}</td>"
    return f"<td>{esc(cell)}</td>"


def table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], *, row_classes: Sequence[str] | None = None, left: int = 1
) -> str:
    """An HTML table; the first ``left`` columns are left-aligned; ``row_classes`` e.g. ``"weak"`` per row."""
    head = "".join(f'<th class="l">{esc(h)}</th>' if k < left else f"<th>{esc(h)}</th>" for k, h in enumerate(header))
    body = []
    for r, row in enumerate(rows):
        cells = [Cell(esc(c), "l") if k < left and not isinstance(c, Cell) else c for k, c in enumerate(row)]
        css = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        body.append(f"<tr{css}>" + "".join(_td(c) for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def provenance(items: Mapping[str, Any]) -> str:
    """A definition list of provenance entries (dicts are flattened as ``key: value`` pairs)."""
    parts = []
    for key, value in items.items():
        if value is None or value == {} or value == "":
            continue
        text = ", ".join(f"{k}: {v}" for k, v in value.items()) if isinstance(value, Mapping) else str(value)
        parts.append(f"<dt>{esc(key)}</dt><dd>{esc(text)}</dd>")
    return f'<dl class="prov">{"".join(parts)}</dl>'


def page(title: str, body: str, *, nav: Sequence[tuple[str, str]] = ()) -> str:
    """A complete HTML document: ``title``, inline styles, ``body`` (HTML), optional relative ``nav`` links."""
    from .. import __version__

    links = "".join(f'<a href="{esc(href)}">{esc(text)}</a>' for text, href in nav)
    nav_html = f"<nav>{links}</nav>" if links else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{nav_html}<h1>{esc(title)}</h1>{body}"
        f"<footer>written by repsim-plugin {esc(__version__)}; this page is self-contained (no network).</footer>"
        "</main></body></html>\n"
    )


def write_page(path: str | os.PathLike[str], title: str, body: str, *, nav: Sequence[tuple[str, str]] = ()) -> Path:
    """Write :func:`page` atomically (normal file permissions); returns the path."""
    return write_text(path, page(title, body, nav=nav))
