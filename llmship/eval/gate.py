"""Regression gate: YAML goals per metric, checked for every variant against the baseline.

Goal kinds (`gate.goals[].type`), with `v` the goal's value and `b` the baseline's value of the metric:
- `threshold`: higher-is-better metrics need value >= v, lower-is-better ones value <= v.
- `max-degradation` (absolute): value >= b - v (higher is better) or value <= b + v (lower is better).
- `percent-max-degradation`: value >= b - |b| * v / 100 or value <= b + |b| * v / 100.

A metric's direction comes from the goal (`higher_is_better`) or, when unset, from its name: perplexities
(`ppl/...`) and divergences (`.../kl`) are lower-is-better, accuracies and agreements higher-is-better.
"""

from __future__ import annotations

import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmship.config import Goal
from llmship.errors import UserError

log = logging.getLogger("llmship")

LOWER_IS_BETTER_PREFIXES = ("ppl/",)
LOWER_IS_BETTER_SUFFIXES = ("/kl",)


def higher_is_better(goal: Goal) -> bool:
    if goal.higher_is_better is not None:
        return goal.higher_is_better
    metric = goal.metric
    return not (metric.startswith(LOWER_IS_BETTER_PREFIXES) or metric.endswith(LOWER_IS_BETTER_SUFFIXES))


def goal_label(goal: Goal) -> str:
    unit = "%" if goal.type == "percent-max-degradation" else ""
    return f"{goal.metric} {goal.type} {goal.value:g}{unit}"


def _limit(goal: Goal, baseline: float | None, higher: bool) -> float | None:
    """The worst value that still passes (None when the goal needs a baseline that is missing)."""
    if goal.type == "threshold":
        return goal.value
    if baseline is None or not math.isfinite(baseline):
        return None
    allowed = goal.value if goal.type == "max-degradation" else abs(baseline) * goal.value / 100.0
    return baseline - allowed if higher else baseline + allowed


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def check_metrics_known(goals: Sequence[Goal], known: set[str]) -> None:
    """Fail before any scoring when a goal names a metric this eval does not produce."""
    for i, goal in enumerate(goals):
        if goal.metric not in known:
            groups = sorted(m for m in known if m.count("/") <= 1 or m.split("/")[-1] in ("average", "hard", "stem", "agreement"))
            raise UserError(f"unknown metric '{goal.metric}'; this eval produces e.g. {', '.join(groups)}",
                            where=f"gate.goals.{i}.metric")


def evaluate_goals(goals: Sequence[Goal], results: Mapping[str, Mapping[str, float]], baseline_name: str) -> list[dict]:
    """One row per goal x variant it applies to: value, baseline, limit, passed, message.

    `results` maps engine name -> metric name -> value and holds the baseline under `baseline_name`
    (measured in the same run or read from `gate.baseline_json`). A metric missing for a variant fails.
    """
    baseline = results.get(baseline_name, {})
    variants = [name for name in results if name != baseline_name]
    rows = []
    for i, goal in enumerate(goals):
        unknown = sorted(set(goal.variants or []) - set(variants))
        if unknown:
            log.warning("gate.goals.%d names variant(s) not evaluated here: %s", i, ", ".join(unknown))
        higher = higher_is_better(goal)
        applies = variants if goal.variants is None else [v for v in variants if v in goal.variants]
        for variant in applies:
            value = _number(results[variant].get(goal.metric))
            base = _number(baseline.get(goal.metric))
            limit = _limit(goal, base, higher)
            if value is None or not math.isfinite(value):
                passed, message = False, f"{goal.metric} was not measured (or is not finite) for {variant}"
            elif limit is None:
                passed, message = False, f"no baseline value of {goal.metric} to compare against"
            else:
                passed = value >= limit if higher else value <= limit
                relation = ">=" if higher else "<="
                message = f"{value:.4f} {relation} {limit:.4f}" if passed else f"{value:.4f} is not {relation} {limit:.4f}"
            rows.append({"goal": goal_label(goal), "metric": goal.metric, "type": goal.type, "target": goal.value,
                         "higher_is_better": higher, "variant": variant, "value": value, "baseline": base,
                         "limit": limit, "passed": passed, "message": message})
    return rows


def junit_xml(rows: Sequence[dict], suite: str = "llmship-gate") -> bytes:
    """JUnit XML, one testcase per goal x variant, so CI systems list every goal."""
    failures = sum(not r["passed"] for r in rows)
    root = ET.Element("testsuites", name=suite, tests=str(len(rows)), failures=str(failures), errors="0")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(rows)), failures=str(failures), errors="0", skipped="0")
    for row in rows:
        case = ET.SubElement(ts, "testcase", classname=f"llmship.gate.{row['variant']}", name=row["goal"], time="0")
        if not row["passed"]:
            failure = ET.SubElement(case, "failure", message=row["message"], type=row["type"])
            failure.text = (f"variant {row['variant']}: {row['metric']} = {row['value']}, baseline {row['baseline']}, "
                            f"limit {row['limit']}: {row['message']}")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_junit(rows: Sequence[dict], path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(junit_xml(rows))
    os.replace(tmp, path)
    return path


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def failure_table(rows: Sequence[dict]) -> str:
    """Plain-text table of the failed rows (empty string when everything passed)."""
    failed = [r for r in rows if not r["passed"]]
    if not failed:
        return ""
    header = ["variant", "goal", "value", "baseline", "limit"]
    body = [[r["variant"], r["goal"], _fmt(r["value"]), _fmt(r["baseline"]), _fmt(r["limit"])] for r in failed]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [header, *body]]
    return "\n".join(lines)


def log_failures(rows: Sequence[dict]) -> None:
    table = failure_table(rows)
    if table:
        log.error("gate: %d of %d goal(s) failed:\n%s", sum(not r["passed"] for r in rows), len(rows), table)
