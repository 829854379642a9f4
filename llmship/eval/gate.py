"""Regression gate: YAML goals per metric, checked for every variant against the baseline.

Goal kinds (`gate.goals[].type`), with `v` the goal's value and `b` the baseline's value of the metric:
- `threshold`: higher-is-better metrics need value >= v, lower-is-better ones value <= v.
- `max-degradation` (absolute): value >= b - v (higher is better) or value <= b + v (lower is better).
- `percent-max-degradation`: value >= b - |b| * v / 100 or value <= b + |b| * v / 100.

A metric's direction comes from the goal (`higher_is_better`) or, when unset, from the eval task that produces it
(llmship.eval.registry): perplexities and divergences are lower-is-better, accuracies and agreements higher-is-better.

What is compared with the limit (`judge`): `point` compares the measured value. `interval` compares the worse end of
the 95% interval (llmship.eval.intervals): for a degradation goal, the baseline plus the pessimistic end of the paired
interval of the difference (its lower end for a higher-is-better metric); for a threshold, the pessimistic end of the
variant's own interval. A goal judged by its interval passes only when the data show that it holds beyond sampling
noise: a release gate should not ship a variant on a difference that a handful of questions could erase (the
non-inferiority convention: the confidence bound, not the estimate, must clear the margin; ICH E9/E10). The default
(`judge` unset) judges by interval every metric that has one (C-Eval accuracies, agreements, consistency/top1) and by
point the rest (perplexities, KL, greedy prefix).
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmship.config import Goal
from llmship.errors import UserError
from llmship.eval.registry import higher_is_better as metric_higher_is_better
from llmship.files import write_atomic

log = logging.getLogger("llmship")


def higher_is_better(goal: Goal) -> bool:
    if goal.higher_is_better is not None:
        return goal.higher_is_better
    return metric_higher_is_better(goal.metric)


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


def check_metrics_known(goals: Sequence[Goal], known: set[str], source: str | None = None) -> None:
    """Fail before any scoring when a goal names a metric this eval does not produce (`source`: the config file)."""
    for i, goal in enumerate(goals):
        if goal.metric not in known:
            groups = sorted(m for m in known if m.count("/") <= 1 or m.split("/")[-1] in ("average", "hard", "stem", "agreement"))
            raise UserError(f"unknown metric '{goal.metric}'; this eval produces e.g. {', '.join(groups)}",
                            where=f"{source}: gate.goals.{i}.metric" if source else f"gate.goals.{i}.metric")


def evaluate_goals(goals: Sequence[Goal], results: Mapping[str, Mapping[str, float]], baseline_name: str,
                   intervals: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None) -> list[dict]:
    """One row per goal x variant it applies to: value, baseline, limit, interval, n, judged value, passed, message.

    `results` maps engine name -> metric name -> value and holds the baseline under `baseline_name`
    (measured in the same run or read from `gate.baseline_json`). `intervals` maps variant -> metric ->
    {diff, low, high, n, value_low, value_high} (llmship.eval.intervals). A metric missing for a variant fails;
    so does a goal judged by interval whose variant has no interval (its predictions could not be paired).
    """
    baseline = results.get(baseline_name, {})
    variants = [name for name in results if name != baseline_name]
    intervals = intervals or {}
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
            interval = (intervals.get(variant) or {}).get(goal.metric)
            # Unset `judge` falls back to the point where no paired interval exists; an explicit interval never does.
            judge = "interval" if goal.judged_by_interval and (interval is not None or goal.judge) else "point"
            judged = _judged_value(goal, value, base, interval, higher) if judge == "interval" else value
            relation = ">=" if higher else "<="
            if value is None or not math.isfinite(value):
                passed, message = False, f"{goal.metric} was not measured (or is not finite) for {variant}"
            elif limit is None:
                passed, message = False, f"no baseline value of {goal.metric} to compare against"
            elif judged is None:
                passed, message = False, f"no paired interval of {goal.metric} for {variant} (judge: interval)"
            else:
                passed = judged >= limit if higher else judged <= limit
                message = _message(judge, judged, value, limit, relation, passed, interval)
            rows.append({"goal": goal_label(goal), "metric": goal.metric, "type": goal.type, "target": goal.value,
                         "higher_is_better": higher, "variant": variant, "value": value, "baseline": base,
                         "limit": limit, "judge": judge, "judged": judged, **_interval_fields(interval),
                         "passed": passed, "message": message})
    return rows


def _judged_value(goal: Goal, value: float | None, base: float | None, interval: Mapping[str, Any] | None,
                  higher: bool) -> float | None:
    """The pessimistic end of the 95% interval, on the metric's own scale (None when there is no interval)."""
    if interval is None or value is None:
        return None
    if goal.type == "threshold":
        return interval["value_low"] if higher else interval["value_high"]
    if base is None:
        return None
    return base + (interval["low"] if higher else interval["high"])


def _interval_fields(interval: Mapping[str, Any] | None) -> dict[str, Any]:
    if interval is None:
        return {"diff_low": None, "diff_high": None, "n": None}
    return {"diff_low": interval["low"], "diff_high": interval["high"], "n": interval["n"]}


def _message(judge: str, judged: float, value: float, limit: float, relation: str, passed: bool,
             interval: Mapping[str, Any] | None) -> str:
    verdict = f"{judged:.4f} {relation} {limit:.4f}" if passed else f"{judged:.4f} is not {relation} {limit:.4f}"
    if judge == "point" or interval is None:
        return verdict
    point_passes = value >= limit if relation == ">=" else value <= limit
    text = (f"95% interval's worse end {verdict} (point {value:.4f}; difference [{interval['low']:+.2f}, "
            f"{interval['high']:+.2f}] over n={interval['n']})")
    if point_passes and not passed:
        text += f"; the point meets the limit but n={interval['n']} cannot show it: more questions or a wider limit"
    return text


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
                            f"limit {row['limit']}{_interval_text(row)}: {row['message']}")
        elif row.get("judge") == "interval":
            ET.SubElement(case, "system-out").text = row["message"]
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_junit(rows: Sequence[dict], path: Path) -> Path:
    return write_atomic(path, junit_xml(rows))


def _interval_text(row: Mapping[str, Any]) -> str:
    if row.get("diff_low") is None:
        return ""
    return f", difference 95% interval [{row['diff_low']:+.2f}, {row['diff_high']:+.2f}] (n={row['n']})"


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def _ci(row: Mapping[str, Any]) -> str:
    return "-" if row.get("diff_low") is None else f"[{row['diff_low']:+.2f}, {row['diff_high']:+.2f}]"


def failure_table(rows: Sequence[dict]) -> str:
    """Plain-text table of the failed rows (empty string when everything passed)."""
    failed = [r for r in rows if not r["passed"]]
    if not failed:
        return ""
    header = ["variant", "goal", "value", "baseline", "limit", "judged", "diff 95% CI", "n"]
    body = [[r["variant"], r["goal"], _fmt(r["value"]), _fmt(r["baseline"]), _fmt(r["limit"]),
             f"{_fmt(r.get('judged'))} ({r.get('judge', 'point')})", _ci(r), _fmt(r.get("n"))] for r in failed]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [header, *body]]
    return "\n".join(lines)


def log_failures(rows: Sequence[dict]) -> None:
    table = failure_table(rows)
    if table:
        log.error("gate: %d of %d goal(s) failed:\n%s", sum(not r["passed"] for r in rows), len(rows), table)
