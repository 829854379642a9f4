"""A report as a list of blocks (headings, paragraphs, tables, images) rendered to Markdown and to one
self-contained HTML page (images inlined as base64), so both say the same thing."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Image:
    path: Path
    caption: str


@dataclass
class Document:
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, columns: list[str], rows: list[list[Any]], caption: str = "") -> None:
        if rows:
            self.blocks.append(("table", Table(columns, rows, caption)))

    def image(self, path: Path, caption: str) -> None:
        if path.is_file():
            self.blocks.append(("img", Image(path, caption)))


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"
    return str(value)


def to_markdown(doc: Document, image_dir: Path) -> str:
    out = [f"# {doc.title}", ""]
    for kind, block in doc.blocks:
        if kind == "h2":
            out += [f"## {block}", ""]
        elif kind == "p":
            out += [block, ""]
        elif kind == "table":
            if block.caption:
                out += [f"*{block.caption}*", ""]
            out.append("| " + " | ".join(block.columns) + " |")
            out.append("|" + "---|" * len(block.columns))
            out += ["| " + " | ".join(fmt(v).replace("|", "\\|") for v in row) + " |" for row in block.rows]
            out.append("")
        elif kind == "img":
            rel = block.path.relative_to(image_dir) if block.path.is_relative_to(image_dir) else block.path
            out += [f"![{block.caption}]({rel})", ""]
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:72rem;color:#1b1f24;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}th,td{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:right}
th{background:#f6f8fa}td:first-child,th:first-child{text-align:left}caption{caption-side:top;text-align:left;font-style:italic;padding:.2rem 0}
figure{margin:1rem 0}img{max-width:100%;border:1px solid #d0d7de}figcaption{font-size:.85rem;color:#57606a}
.fail{color:#cf222e;font-weight:600}.pass{color:#1a7f37;font-weight:600}
.wide{overflow-x:auto;max-width:100%}
"""


def _cell(value: Any) -> str:
    text = html.escape(fmt(value))
    if text in ("PASS", "FAIL"):
        return f'<td class="{text.lower()}">{text}</td>'
    return f"<td>{text}</td>"


def to_html(doc: Document) -> str:
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(doc.title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(doc.title)}</h1>"]
    for kind, block in doc.blocks:
        if kind == "h2":
            parts.append(f"<h2>{html.escape(block)}</h2>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(block)}</p>")
        elif kind == "table":
            cap = f"<caption>{html.escape(block.caption)}</caption>" if block.caption else ""
            head = "".join(f"<th>{html.escape(c)}</th>" for c in block.columns)
            body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in block.rows)
            # wide tables scroll inside their own box instead of widening the page
            parts.append(f"<div class='wide'><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")
        elif kind == "img":
            data = base64.b64encode(block.path.read_bytes()).decode()
            alt = html.escape(block.caption)
            parts.append(f"<figure><img alt='{alt}' src='data:image/png;base64,{data}'><figcaption>{alt}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
