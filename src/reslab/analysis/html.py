"""Self-contained HTML pages: every image is embedded (base64), so a page can be mailed or moved alone.

``Page`` collects headings, paragraphs, tables and images, then writes one file. Used by the run report
(``report.html``) and by ``reslab explain`` (``index.html``).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } img { max-width: 100%; } figcaption { color: #666; font-size: 0.85em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


class Page:
    """An HTML page built top to bottom: ``Page(title).heading(...).text(...).image(...).write(path)``."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str) -> Page:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")
        return self

    def text(self, lines: str | Sequence[str]) -> Page:
        """Paragraphs, one per line."""
        for line in [lines] if isinstance(lines, str) else lines:
            self.parts.append(f"<p>{html.escape(line)}</p>")
        return self

    def code(self, text: str) -> Page:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")
        return self

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Page:
        """A table; a header of empty strings (a list of name-value pairs) leaves out the header row."""
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        self.parts.append(f"<table>{f'<tr>{head}</tr>' if any(header) else ''}{body}</table>")
        return self

    def image(self, path: str | Path, caption: str = "") -> Page:
        """Embed a PNG file; its bytes are copied into the page."""
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        alt = html.escape(caption or Path(path).name)
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">{cap}</figure>')
        return self

    def link(self, href: str, text: str) -> Page:
        self.parts.append(f'<p><a href="{html.escape(href)}">{html.escape(text)}</a></p>')
        return self

    def render(self) -> str:
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(self.parts)
            + "\n</body></html>\n"
        )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render(), encoding="utf-8")
        return path
