"""95% intervals of a variant's difference from the baseline, paired over the same questions.

Method: paired, stratified percentile bootstrap (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993:
the percentile interval, ch. 13.3; stratified resampling of one-sample-per-stratum designs, ch. 8). One resample
draws, within each C-Eval subject, as many questions as the subject has, with replacement, and scores the baseline
and the variant on the SAME drawn questions (paired); every metric is then recomputed from the resampled subjects
exactly as the eval computes it. That matters because OpenCompass's C-Eval average (and each category and the hard
set) is the unweighted mean of subject accuracies, not the accuracy over all questions: resampling questions across
subjects would change each subject's weight from one resample to the next. The interval is the 2.5th and 97.5th
percentile of the resampled differences (variant - baseline, in the metric's points).

The resamples come from one fixed seed and are drawn per subject in the data's subject order, so a rerun on the same
predictions gives the same interval, and every variant of a run is compared on the same resamples.

`consistency/top1` (the % of next-token argmaxes equal to the baseline's) is resampled by prompt (a cluster
bootstrap: positions of one prompt are not independent); the baseline's own top-1 is 100 by definition.

Each interval comes with `n`, the number of questions (prompts for consistency/top1) behind the metric; a difference
resolves in steps of about 100 / n points (one C-Eval question of 96 is 1.04 points of a subject-weighted average).
Perplexities, KL and the greedy prefix get no interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Number of bootstrap resamples and their seed: 10,000 keeps the Monte Carlo error of a 2.5% percentile well below
# one question's step (Efron & Tibshirani 1993, ch. 19: 1,000-2,000 suffice for percentile intervals).
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
METHOD = (f"paired stratified percentile bootstrap (questions resampled within subjects, {BOOTSTRAP_RESAMPLES} "
          f"resamples, seed {BOOTSTRAP_SEED}; Efron & Tibshirani 1993)")


def percentile_interval(samples: np.ndarray) -> tuple[float, float]:
    """The central CONFIDENCE interval of bootstrap samples (percentile method)."""
    tail = 100.0 * (1.0 - CONFIDENCE) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def _entry(point: float, samples: np.ndarray, n: int, value_samples: np.ndarray | None = None) -> dict[str, Any]:
    low, high = percentile_interval(samples)
    entry = {"diff": float(point), "low": low, "high": high, "n": int(n)}
    if value_samples is not None:
        entry["value_low"], entry["value_high"] = percentile_interval(value_samples)
    return entry


def _by_subject(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        out.setdefault(r["subject"], []).append(r)
    return out


def ceval_intervals(mode: str, groups: Mapping[str, Sequence[str]], baseline: Sequence[Mapping[str, Any]],
                    variants: Mapping[str, Sequence[Mapping[str, Any]]],
                    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                    prefix: str = "ceval") -> dict[str, dict[str, dict]]:
    """variant -> metric -> {diff, low, high, n, value_low, value_high} for <prefix>/<mode>/<subject|group|agreement>
    (prefix: the multiple-choice task, ceval or cmmlu).

    `baseline` and each variant's records are the eval's per-question predictions ({subject, idx, pred, correct});
    a variant whose questions are not the baseline's, in the same order, gets no intervals (nothing to pair).
    `groups` maps each group slug (category, hard, average) to its subjects, as the eval aggregates them.
    """
    keys = [(r["subject"], r["idx"]) for r in baseline]
    paired = {name: recs for name, recs in variants.items() if [(r["subject"], r["idx"]) for r in recs] == keys}
    if not keys or not paired:
        return {name: {} for name in variants}
    rng = np.random.default_rng(seed)
    base_subjects = _by_subject(baseline)
    var_subjects = {name: _by_subject(recs) for name, recs in paired.items()}
    base_acc: dict[str, np.ndarray] = {}  # subject -> resampled baseline accuracy (x100)
    var_acc: dict[str, dict[str, np.ndarray]] = {name: {} for name in paired}
    same = {name: np.zeros(resamples) for name in paired}  # resampled count of questions predicted as the baseline
    out: dict[str, dict[str, dict]] = {name: {} for name in variants}
    for subject, recs in base_subjects.items():
        n = len(recs)
        draw = rng.integers(0, n, size=(resamples, n))
        base_hits = np.array([bool(r["correct"]) for r in recs])
        base_acc[subject] = 100.0 * base_hits[draw].mean(axis=1)
        base_preds = [r["pred"] for r in recs]
        for name in paired:
            vrecs = var_subjects[name][subject]
            hits = np.array([bool(r["correct"]) for r in vrecs])
            var_acc[name][subject] = 100.0 * hits[draw].mean(axis=1)
            same[name] += np.array([a == r["pred"] for a, r in zip(base_preds, vrecs, strict=True)])[draw].sum(axis=1)
            point = 100.0 * (hits.mean() - base_hits.mean())
            out[name][f"{prefix}/{mode}/{subject}"] = _entry(point, var_acc[name][subject] - base_acc[subject], n,
                                                          var_acc[name][subject])
    sizes = {subject: len(recs) for subject, recs in base_subjects.items()}
    for slug, members in groups.items():
        present = [m for m in members if m in base_acc]
        if not present:
            continue
        base_mean = np.mean([base_acc[m] for m in present], axis=0)
        for name in paired:
            var_mean = np.mean([var_acc[name][m] for m in present], axis=0)
            point = float(np.mean([out[name][f"{prefix}/{mode}/{m}"]["diff"] for m in present]))
            out[name][f"{prefix}/{mode}/{slug}"] = _entry(point, var_mean - base_mean, sum(sizes[m] for m in present),
                                                       var_mean)
    total = len(keys)
    for name, recs in paired.items():
        agree = 100.0 * same[name] / total
        point = 100.0 * float(np.mean([a["pred"] == b["pred"] for a, b in zip(baseline, recs, strict=True)]))
        out[name][f"{prefix}/{mode}/agreement"] = _entry(point - 100.0, agree - 100.0, total, agree)
    return out


def top1_interval(per_prompt: Sequence[Sequence[int]], resamples: int = BOOTSTRAP_RESAMPLES,
                  seed: int = BOOTSTRAP_SEED) -> dict[str, Any] | None:
    """consistency/top1's difference from the baseline's 100, prompts resampled (cluster bootstrap).

    `per_prompt` holds [positions that agree, positions compared] for each consistency prompt.
    """
    counts = np.array([[int(a), int(t)] for a, t in per_prompt], dtype=float).reshape(-1, 2)
    if len(counts) == 0 or counts[:, 1].sum() == 0:
        return None
    draw = np.random.default_rng(seed).integers(0, len(counts), size=(resamples, len(counts)))
    agree, compared = counts[draw, 0].sum(axis=1), counts[draw, 1].sum(axis=1)
    value = 100.0 * agree / np.maximum(compared, 1.0)
    point = 100.0 * counts[:, 0].sum() / counts[:, 1].sum()
    entry = _entry(point - 100.0, value - 100.0, len(counts), value)
    entry["positions"] = int(counts[:, 1].sum())
    return entry


def engine_intervals(engines: Mapping[str, Mapping[str, Any]], baseline_name: str,
                     groups: Mapping[str, Sequence[str]]) -> dict[str, dict[str, dict]]:
    """variant -> metric -> interval for every metric that has one, from the eval's per-engine records
    (`predictions` per C-Eval mode, `consistency_top1_prompts`)."""
    variants = {name: rec for name, rec in engines.items() if name != baseline_name}
    out: dict[str, dict[str, dict]] = {name: {} for name in variants}
    base_preds = engines.get(baseline_name, {}).get("predictions") or {}
    for mode, base_records in base_preds.items():
        per_mode = {name: (rec.get("predictions") or {}).get(mode) for name, rec in variants.items()}
        found = ceval_intervals(mode, groups, base_records, {n: r for n, r in per_mode.items() if r is not None})
        for name, metrics in found.items():
            out[name].update(metrics)
    for name, rec in variants.items():
        top1 = top1_interval(rec.get("consistency_top1_prompts") or [])
        if top1 is not None:
            out[name]["consistency/top1"] = top1
    return out
