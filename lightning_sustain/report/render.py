"""A tiny document model rendered to Markdown and to self-contained HTML.

The report is assembled once as a list of blocks and rendered twice, so the Markdown and
the HTML always state the same numbers.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    """A section heading (level 1-3)."""

    text: str
    level: int = 2


@dataclass
class Para:
    """A paragraph of plain text."""

    text: str


@dataclass
class Callout:
    """A highlighted note (simulated data, interrupted runs...)."""

    text: str


@dataclass
class Bullets:
    """A bulleted list of plain-text items."""

    items: list[str]


@dataclass
class Table:
    """A table with a header row; ``align`` is ``"l"`` or ``"r"`` per column."""

    header: list[str]
    rows: list[list[str]]
    align: list[str] = field(default_factory=list)


@dataclass
class Image:
    """A PNG, referenced relative to the report in Markdown and embedded in HTML."""

    alt: str
    path: Path


Block = Heading | Para | Callout | Bullets | Table | Image


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block], base_dir: Path) -> str:
    """Render blocks as GitHub-flavoured Markdown; images relative to ``base_dir``."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Callout):
            out += ["> **Note:** " + b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            align = b.align or ["l"] * len(b.header)
            out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            out.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif isinstance(b, Image):
            rel = b.path.relative_to(base_dir).as_posix()
            out += [f"![{b.alt}]({rel})", ""]
    return "\n".join(out).rstrip() + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:60rem;
margin:2rem auto;padding:0 1rem;color:#1b1b1b;line-height:1.45}
table{border-collapse:collapse;margin:0.5rem 0 1rem}
th,td{border:1px solid #ccc;padding:0.25rem 0.6rem;vertical-align:top}
th{background:#f2f2f2}td.r{text-align:right;font-variant-numeric:tabular-nums}
.note{background:#fff4d6;border-left:4px solid #e0a800;padding:0.5rem 0.8rem}
img{max-width:100%;border:1px solid #eee;margin:0.5rem 0}
h1{border-bottom:2px solid #333}h2{border-bottom:1px solid #ccc;margin-top:2rem}
"""


def to_html(blocks: list[Block], title: str) -> str:
    """Render blocks as one self-contained HTML page (PNGs embedded as base64)."""
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
    ]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{esc(b.text)}</p>")
        elif isinstance(b, Callout):
            out.append(f'<p class="note"><strong>Note:</strong> {esc(b.text)}</p>')
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            align = b.align or ["l"] * len(b.header)
            head = "".join(f"<th>{esc(h)}</th>" for h in b.header)
            body = "".join(
                "<tr>"
                + "".join(
                    f'<td class="r">{esc(c)}</td>' if a == "r" else f"<td>{esc(c)}</td>"
                    for c, a in zip(row, align, strict=False)
                )
                + "</tr>"
                for row in b.rows
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            out.append(
                f'<figure><img alt="{esc(b.alt)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(b.alt)}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out) + "\n"
