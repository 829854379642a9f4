"""OpenCompass-style summary tables (`dataset | version | metric | mode | <baseline> | <variant>...`)
written as txt, csv and md with two decimals, plus atomic file writes for every eval output."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLUMNS = ("dataset", "version", "metric", "mode")


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write to a temp sibling, then rename over the target (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: Path, data: Any) -> Path:
    # NaN/inf are not JSON: a score that could not be computed is written as null.
    return write_atomic(path, json.dumps(finite_values(data), indent=1, ensure_ascii=False, default=str, allow_nan=False))


def finite_values(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_values(v) for v in value]
    return value


def cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.2f}"  # NaN -> '-'
    return "-" if value is None else str(value)


def table(rows: Sequence[dict[str, Any]], engines: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    header = [*COLUMNS, *engines]
    body = [[str(r[c]) for c in COLUMNS] + [cell(r["values"].get(e)) for e in engines] for r in rows]
    return header, body


def to_txt(rows: Sequence[dict[str, Any]], engines: Sequence[str]) -> str:
    header, body = table(rows, engines)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["    ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [header, *body]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]]) + "\n"


def to_csv(rows: Sequence[dict[str, Any]], engines: Sequence[str]) -> str:
    header, body = table(rows, engines)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(body)
    return buf.getvalue()


def to_md(rows: Sequence[dict[str, Any]], engines: Sequence[str]) -> str:
    header, body = table(rows, engines)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in body]
    return "\n".join(lines) + "\n"


def write_tables(out_dir: Path, rows: Sequence[dict[str, Any]], engines: Sequence[str]) -> dict[str, str]:
    return {
        "summary_txt": str(write_atomic(out_dir / "summary.txt", to_txt(rows, engines))),
        "summary_csv": str(write_atomic(out_dir / "summary.csv", to_csv(rows, engines))),
        "summary_md": str(write_atomic(out_dir / "summary.md", to_md(rows, engines))),
    }
