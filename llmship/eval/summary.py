"""OpenCompass-style summary tables (`dataset | version | metric | mode | <baseline> | <variant>...`)
written as txt, csv and md with two decimals, plus atomic file writes for every eval output.

summary.txt keeps OpenCompass's layout exactly. summary.csv and summary.md add, after the engines' columns, `n`
(questions, windows, records or prompts behind the row) and each variant's 95% paired interval of its difference
from the baseline (llmship.eval.intervals) where the metric has one: csv `<variant>_diff_low`, `<variant>_diff_high`;
md `<variant> - <baseline> [95% CI]`."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmship.files import write_atomic

COLUMNS = ("dataset", "version", "metric", "mode")


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


def _interval_columns(rows: Sequence[dict[str, Any]], engines: Sequence[str], baseline: str | None) -> list[str]:
    """Variants that have an interval on some row (none when no baseline is named)."""
    if baseline is None:
        return []
    return [e for e in engines if e != baseline and any(e in (r.get("intervals") or {}) for r in rows)]


def _ci(row: dict[str, Any], variant: str) -> dict[str, Any] | None:
    return (row.get("intervals") or {}).get(variant)


def to_csv(rows: Sequence[dict[str, Any]], engines: Sequence[str], baseline: str | None = None) -> str:
    header, body = table(rows, engines)
    variants = _interval_columns(rows, engines, baseline)
    if baseline is not None:
        header = [*header, "n", *(f"{v}_diff_{end}" for v in variants for end in ("low", "high"))]
        for line, row in zip(body, rows, strict=True):
            ends = [(_ci(row, v) or {}).get(end) for v in variants for end in ("low", "high")]
            line += [cell(row.get("n")), *(cell(None if e is None else float(e)) for e in ends)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(body)
    return buf.getvalue()


def interval_cell(ci: dict[str, Any] | None) -> str:
    """'-1.04 [-3.13, +0.00]': the difference from the baseline and its 95% interval."""
    return "-" if ci is None else f"{ci['diff']:+.2f} [{ci['low']:+.2f}, {ci['high']:+.2f}]"


def to_md(rows: Sequence[dict[str, Any]], engines: Sequence[str], baseline: str | None = None,
          footer: Sequence[str] = ()) -> str:
    header, body = table(rows, engines)
    variants = _interval_columns(rows, engines, baseline)
    if baseline is not None:
        header = [*header, "n", *(f"{v} - {baseline} [95% CI]" for v in variants)]
        for line, row in zip(body, rows, strict=True):
            line += [cell(row.get("n")), *(interval_cell(_ci(row, v)) for v in variants)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in body]
    if footer:
        lines += ["", *footer]
    return "\n".join(lines) + "\n"


def write_tables(out_dir: Path, rows: Sequence[dict[str, Any]], engines: Sequence[str],
                 baseline: str | None = None, footer: Sequence[str] = ()) -> dict[str, str]:
    """summary.txt (OpenCompass's layout, nothing added), summary.csv and summary.md (the table, then `footer` lines:
    which baseline ran)."""
    return {
        "summary_txt": str(write_atomic(out_dir / "summary.txt", to_txt(rows, engines))),
        "summary_csv": str(write_atomic(out_dir / "summary.csv", to_csv(rows, engines, baseline))),
        "summary_md": str(write_atomic(out_dir / "summary.md", to_md(rows, engines, baseline, footer))),
    }
