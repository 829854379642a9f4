"""eval stage: OpenCompass-style accuracy and perplexity of the PyTorch baseline and every variant, then the gate.

`run_eval(cfg, variants, out_dir)` scores the baseline (cfg.model through `load_engine`, PyTorch) and each
compiled variant folder (ONNX Runtime) with the same tokenizer and the same tokenized prompts, writes

  out_dir/summary.txt|csv|md  dataset | version | metric | mode | pytorch | <variant>...  (2 decimals; csv and md
                              add n and each variant's 95% paired interval of its difference from the baseline)
  out_dir/results.json        metrics and per-question predictions of every engine, intervals, gate rows
  out_dir/junit.xml           one testcase per goal x variant

and returns {"summary", "gate", "baseline", "metrics", "paths", ...}; the caller raises CheckFailed when a
gate row has passed == False (the failures are also logged as a table on stderr).

Metric names (gate goals use them; all in results.json["engines"][name]["metrics"]):
  ceval/<mode>/<subject>        accuracy x100 of one subject, mode = ppl | gen
  ceval/<mode>/<category>       stem | social-science | humanities | other (from the data's categories)
  ceval/<mode>/hard             the 8-subject hard set present
  ceval/<mode>/average          unweighted mean of all subjects present (OpenCompass 'ceval')
  ceval/<mode>/agreement        % of questions predicted as the baseline predicts
  ppl/c4                        GPTQ-convention perplexity on C4-format text (lower is better)
  ppl/alpaca                    perplexity of alpaca-cleaned responses (lower is better)
  consistency/top1              % of next-token argmaxes equal to the baseline's (alpaca responses)
  consistency/kl                mean KL(baseline || variant) in nats (lower is better)
  consistency/greedy_prefix     mean tokens of greedy continuation shared with the baseline (of 32)
The baseline's scores are cached under <output.dir>/.llmship/eval-baseline/<key>/, key = model files
fingerprint + model/eval config + data fingerprints + library versions (eval.baseline_cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmship.artifact import atomic_folder
from llmship.data import templates
from llmship.config import Config
from llmship.errors import UserError
from llmship.eval import ceval as ceval_mod
from llmship.eval import consistency, data, perplexity
from llmship.eval.ceval import _counter
from llmship.eval.gate import check_metrics_known, evaluate_goals, log_failures, write_junit
from llmship.eval.intervals import METHOD as INTERVAL_METHOD
from llmship.eval.intervals import engine_intervals
from llmship.eval.summary import write_json, write_tables
from llmship.progress import Counter

__all__ = ["BASELINE_NAME", "run_eval"]

log = logging.getLogger("llmship")

BASELINE_NAME = "pytorch"
CACHE_VERSION = 5  # bump when scoring code changes what a cached baseline holds (3: held-out alpaca part, C4 splits;
#                   4: SentencePiece's dummy prefix on text that starts with a space; 5: C-Eval GEN prompts truncated
#                   at max positions, generation past them)


@dataclass
class Tasks:
    """Everything engine-independent, tokenized once per run."""

    ceval: ceval_mod.CevalSet | None
    c4: list[list[int]] | None
    alpaca: list[dict[str, Any]] | None
    consistency: list[dict[str, Any]] | None

    def metric_names(self) -> set[str]:
        names = set(ceval_mod.metric_names(self.ceval)) if self.ceval else set()
        if self.c4 is not None:
            names.add("ppl/c4")
        if self.alpaca is not None:
            names.add("ppl/alpaca")
        if self.consistency:
            names.update(consistency.METRICS)
        return names


# --------------------------------------------------------------------------- preparation
def eval_tokenizer(cfg: Config) -> Any:
    """The source model's tokenizer (the adapter's when it ships one), used for every engine."""
    from llmship.export.source import load_tokenizer, resolve_model_path

    for folder in (cfg.model.adapter, resolve_model_path(cfg.model.path)):
        if folder and any((Path(folder).expanduser() / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
            return load_tokenizer(Path(folder).expanduser())
    return load_tokenizer(resolve_model_path(cfg.model.path), cfg.model.revision)


def max_positions(cfg: Config, variants: dict[str, Path]) -> int:
    """Smallest max_position_embeddings among the source and the variant folders."""
    from llmship.artifact import max_positions as smallest

    return smallest(cfg.model, variants.values())


def check_position_limits(tasks: Tasks, variants: dict[str, Path]) -> None:
    """Before anything is scored: every variant graph runs the positions C-Eval needs (GEN mode generates past the
    truncated prompt, beyond max positions when it fills them, as OpenCompass does)."""
    from llmship.runtime.ort_engine import folder_position_limit

    if tasks.ceval is None:
        return
    needed = tasks.ceval.positions_needed
    for folder in variants.values():
        limit = folder_position_limit(folder)
        if limit is not None and needed > limit:
            raise UserError(f"C-Eval needs {needed} positions (the longest prompt; GEN mode feeds max_out_len - 1 more) "
                            f"and the graph's rotary table has {limit}: compile the variant again with this llmship "
                            "(tables of twice max positions) or lower eval.ceval.max_out_len / max_seq_len",
                            where=str(folder))


def prepare_tasks(cfg: Config, tokenizer: Any, positions: int) -> Tasks:
    ev = cfg.eval
    cset = None
    if ev.ceval.enabled:
        cset = ceval_mod.prepare(ev.ceval, data.read_ceval(ev.ceval.path), tokenizer, positions)
    c4 = alpaca = None
    records: list[dict[str, Any]] | None = None
    if ev.perplexity.enabled:
        pt = ev.perplexity
        if pt.seq_len > positions:
            raise UserError(f"seq_len {pt.seq_len} exceeds the model's {positions} positions", where="eval.perplexity.seq_len")
        c4 = perplexity.c4_windows(data.read_c4_texts(pt.c4_path), tokenizer, pt.seq_len, pt.windows)
        records = data.read_alpaca(pt.alpaca_path)
        alpaca = perplexity.alpaca_examples(records, tokenizer, pt.alpaca_samples, positions)
        if not alpaca:
            raise UserError(f"no alpaca record fits in {positions} positions", where="eval.perplexity.alpaca_path")
    cons = None
    if ev.consistency_prompts > 0:
        if records is None:
            records = data.read_alpaca(ev.perplexity.alpaca_path)
        cons = [e for e in perplexity.alpaca_examples(records, tokenizer, 10 * ev.consistency_prompts, positions)
                if len(e["prompt_ids"]) + consistency.GREEDY_TOKENS <= positions][: ev.consistency_prompts]
    return Tasks(ceval=cset, c4=c4, alpaca=alpaca, consistency=cons)


# --------------------------------------------------------------------------- scoring one engine
def score_engine(engine: Any, tasks: Tasks, cfg: Config, tokenizer: Any, progress: Callable[[str, int, int], None],
                 ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Every task on one engine: (record with metrics and predictions, consistency reference or None)."""
    start = time.perf_counter()
    batch = cfg.eval.batch_size
    rec: dict[str, Any] = {"info": engine.info(), "vocab_size": int(engine.vocab_size), "metrics": {}}
    if tasks.ceval is not None:
        scored = ceval_mod.score_engine(engine, tasks.ceval, tokenizer, batch, progress)
        rec["metrics"].update(scored["metrics"])
        rec["predictions"] = scored["predictions"]
    if tasks.c4 is not None:
        c4 = perplexity.c4_perplexity(engine, tasks.c4, batch, _counter(progress, "ppl c4", len(tasks.c4)))
        rec["c4"] = c4
        rec["metrics"]["ppl/c4"] = c4["ppl"]
    if tasks.alpaca is not None:
        al = perplexity.alpaca_perplexity(engine, tasks.alpaca, batch, _counter(progress, "ppl alpaca", len(tasks.alpaca)))
        rec["alpaca"] = al
        rec["metrics"]["ppl/alpaca"] = al["ppl"]
    ref = None
    if tasks.consistency:
        ref = consistency.reference(engine, tasks.consistency, batch,
                                    _counter(progress, "consistency", len(tasks.consistency)))
    rec["wall_s"] = round(time.perf_counter() - start, 3)
    return rec, ref


# --------------------------------------------------------------------------- baseline cache
def baseline_key(cfg: Config) -> str:
    from llmship.cache import folder_fingerprint, library_versions
    from llmship.export.source import resolve_model_path

    ev = cfg.eval
    parts = {
        "version": CACHE_VERSION,
        "model": folder_fingerprint(Path(resolve_model_path(cfg.model.path)).expanduser()),
        "adapter": cfg.model.adapter and folder_fingerprint(Path(cfg.model.adapter).expanduser()),
        "model_cfg": cfg.model.model_dump(),
        "eval": ev.model_dump(exclude={"baseline_cache"}),
        "data": {"ceval": data.fingerprint(ev.ceval.path, "ceval") if ev.ceval.enabled else None,
                 "c4": data.fingerprint(ev.perplexity.c4_path, "c4") if ev.perplexity.enabled else None,
                 "alpaca": data.fingerprint(ev.perplexity.alpaca_path, "alpaca")},
        "libraries": library_versions(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_dir(cfg: Config) -> Path:
    return Path(cfg.output.dir).expanduser() / ".llmship" / "eval-baseline"


def load_cached_baseline(folder: Path) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    try:
        rec = json.loads((folder / "baseline.json").read_text(encoding="utf-8"))
        ref = None
        if (folder / "consistency.npz").is_file():
            with np.load(folder / "consistency.npz") as npz:
                n = int(npz["count"])
                ref = {"logprobs": [npz[f"lp{i}"] for i in range(n)], "greedy": rec.pop("consistency_greedy")}
        return rec, ref
    except (OSError, ValueError, KeyError):
        return None


def save_cached_baseline(folder: Path, rec: dict[str, Any], ref: dict[str, Any] | None) -> None:
    """Write the cache entry into a temp folder, then rename it into place (all or nothing)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stored = dict(rec)
    if ref is not None:
        arrays = {f"lp{i}": lp for i, lp in enumerate(ref["logprobs"])}
        np.savez(tmp / "consistency.npz", count=np.array(len(ref["logprobs"])), **arrays)
        stored["consistency_greedy"] = ref["greedy"]
    write_json(tmp / "baseline.json", stored)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def stored_baseline(path: str) -> dict[str, Any]:
    """Baseline record from `gate.baseline_json`: an earlier results.json (or a cached baseline.json)."""
    file = Path(path).expanduser()
    try:
        stored = json.loads(file.read_text(encoding="utf-8"))
        rec = stored["engines"][stored["baseline"]] if "engines" in stored else stored
        if not isinstance(rec.get("metrics"), dict):
            raise KeyError("metrics")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"not an llmship eval results.json with baseline metrics ({exc})", where="gate.baseline_json") from None
    return rec


def baseline_record(cfg: Config, tasks: Tasks, tokenizer: Any, progress: Counter) -> tuple[dict[str, Any], Any, bool]:
    """(record, consistency reference, from_cache): stored JSON, cache hit, or a fresh PyTorch run."""
    if cfg.gate.baseline_json:
        return stored_baseline(cfg.gate.baseline_json), None, True
    folder = cache_dir(cfg) / baseline_key(cfg)
    if cfg.eval.baseline_cache:
        hit = load_cached_baseline(folder)
        if hit is not None:
            log.info("eval: baseline scores reused from %s", folder)
            return hit[0], hit[1], True
    from llmship.runtime import load_engine

    engine = load_engine(cfg.model, cfg.runtime)
    try:
        rec, ref = score_engine(engine, tasks, cfg, tokenizer, progress.scoped(f"eval {BASELINE_NAME}"))
    finally:
        engine.close()
    rec["path"] = cfg.model.path
    if cfg.eval.baseline_cache:
        save_cached_baseline(folder, rec, ref)
    return rec, ref, False


# --------------------------------------------------------------------------- summary rows
def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:6]


def row_sizes(tasks: Tasks) -> dict[str, int]:
    """Metric -> how many items it averages: C-Eval questions, C4 windows, alpaca records, consistency prompts."""
    sizes: dict[str, int] = {}
    if tasks.ceval:
        per_subject = {s["name"]: s["questions"] for s in tasks.ceval.subjects}
        for mode in tasks.ceval.modes:
            sizes.update({f"ceval/{mode}/{name}": n for name, n in per_subject.items()})
            for slug, members in ceval_mod.group_members(tasks.ceval.subjects).items():
                sizes[f"ceval/{mode}/{slug}"] = sum(per_subject[m] for m in members)
            sizes[f"ceval/{mode}/agreement"] = len(tasks.ceval.questions)
    if tasks.c4 is not None:
        sizes["ppl/c4"] = len(tasks.c4)
    if tasks.alpaca is not None:
        sizes["ppl/alpaca"] = len(tasks.alpaca)
    if tasks.consistency:
        sizes.update({name: len(tasks.consistency) for name in consistency.METRICS})
    return sizes


def summary_rows(cfg: Config, tasks: Tasks) -> list[dict[str, Any]]:
    rows = ceval_mod.summary_rows(tasks.ceval) if tasks.ceval else []
    pt = cfg.eval.perplexity
    if tasks.c4 is not None:
        rows.append({"dataset": "c4", "version": _short_hash(["gptq-c4", pt.seq_len, pt.windows, perplexity.C4_EVAL_SEED]),
                     "metric": "perplexity", "mode": "ppl", "name": "ppl/c4"})
    if tasks.alpaca is not None:
        rows.append({"dataset": "alpaca-cleaned", "version": _short_hash([templates.ALPACA_PROMPT_INPUT,
                     templates.ALPACA_PROMPT_NO_INPUT, pt.alpaca_samples]), "metric": "response_perplexity", "mode": "ppl",
                     "name": "ppl/alpaca"})
    if tasks.consistency:
        version = _short_hash(["consistency", cfg.eval.consistency_prompts, consistency.GREEDY_TOKENS])
        for name, metric in zip(consistency.METRICS, ("top1_agreement", "kl_baseline_variant", "greedy_prefix_tokens"),
                                strict=True):
            rows.append({"dataset": "alpaca-consistency", "version": version, "metric": metric, "mode": "gen", "name": name})
    sizes = row_sizes(tasks)
    for row in rows:
        row["n"] = sizes.get(row["name"])
    return rows


# --------------------------------------------------------------------------- entry point
def run_eval(cfg: Config, variants: dict[str, Path], out_dir: Path, progress: Any = None) -> dict[str, Any]:
    """Score the PyTorch baseline and every variant folder, write the summaries, apply the gate."""
    from llmship.runtime import load_engine

    start = time.perf_counter()
    out_dir = Path(out_dir)
    if BASELINE_NAME in variants:
        raise UserError(f"a variant may not be named '{BASELINE_NAME}' (the baseline's column)", where="quantize")
    bar = Counter(progress)
    tokenizer = eval_tokenizer(cfg)
    tasks = prepare_tasks(cfg, tokenizer, max_positions(cfg, variants))
    check_goals(cfg, tasks.metric_names())
    check_position_limits(tasks, variants)

    base, base_ref, from_cache = baseline_record(cfg, tasks, tokenizer, bar)
    engines: dict[str, dict[str, Any]] = {BASELINE_NAME: base}
    if base_ref is not None:
        base["metrics"].update(consistency.compare(base_ref, base_ref))
    for name, folder in variants.items():
        engine = load_engine(Path(folder), cfg.runtime)
        try:
            if "vocab_size" in base and int(engine.vocab_size) != int(base["vocab_size"]):
                raise UserError(f"vocabulary of {engine.vocab_size} tokens, the baseline has {base['vocab_size']}",
                                where=str(folder))
            rec, ref = score_engine(engine, tasks, cfg, tokenizer, bar.scoped(f"eval {name}"))
        finally:
            engine.close()
        rec["path"] = str(folder)
        if base_ref is not None and ref is not None:
            rec["metrics"].update(consistency.compare(base_ref, ref))
            rec["consistency_top1_prompts"] = consistency.top1_per_prompt(base_ref, ref)
        engines[name] = rec
    _agreements(engines, tasks)

    metrics = {name: rec["metrics"] for name, rec in engines.items()}
    groups = ceval_mod.group_members(tasks.ceval.subjects) if tasks.ceval else {}
    intervals = engine_intervals(engines, BASELINE_NAME, groups)
    rows = summary_rows(cfg, tasks)
    for row in rows:
        row["values"] = {name: _clean(metrics[name].get(row["name"])) for name in engines}
        row["intervals"] = _row_intervals(row["name"], intervals)
    gate_rows = evaluate_goals(cfg.gate.goals, metrics, BASELINE_NAME, intervals)
    log_failures(gate_rows)

    names = list(engines)
    wall = round(time.perf_counter() - start, 3)
    notes = _notes(tasks, from_cache, cfg)
    results = {"baseline": BASELINE_NAME, "baseline_cached": from_cache, "engines": engines, "summary": rows,
               "intervals": intervals, "interval_method": INTERVAL_METHOD, "gate": gate_rows,
               "subjects": tasks.ceval.subjects if tasks.ceval else [],
               "groups": ceval_mod.group_members(tasks.ceval.subjects) if tasks.ceval else {},
               "versions": tasks.ceval.versions if tasks.ceval else {}, "config": cfg.eval.model_dump(mode="json"),
               "notes": notes, "wall_s": wall}
    # Built in a temp sibling and swapped in whole: a killed or failed eval leaves the earlier results as they were.
    with atomic_folder(out_dir) as tmp:
        built = write_tables(tmp, rows, names, BASELINE_NAME)
        built["junit"] = str(write_junit(gate_rows, tmp / "junit.xml"))
        built["results"] = str(write_json(tmp / "results.json", results))
    paths = {key: str(out_dir / Path(value).relative_to(tmp)) for key, value in built.items()}
    log.info("eval: %d engine(s) scored in %.1f s (baseline %s); summary %s", len(engines), wall,
             "cached" if from_cache else "scored", paths["summary_txt"])
    return {"summary": rows, "gate": gate_rows, "baseline": BASELINE_NAME, "baseline_cached": from_cache,
            "metrics": metrics, "intervals": intervals, "interval_method": INTERVAL_METHOD, "paths": paths,
            "notes": notes, "wall_s": wall,
            "engines": {n: {"path": str(r.get("path")), "info": r.get("info"), "wall_s": r.get("wall_s")}
                        for n, r in engines.items()}}


def check_goals(cfg: Config, known: set[str]) -> None:
    """Goals must name metrics this eval produces; consistency goals need the baseline model itself."""
    check_metrics_known(cfg.gate.goals, known, cfg._source)
    if cfg.gate.baseline_json:
        for i, goal in enumerate(cfg.gate.goals):
            if goal.metric.startswith("consistency/"):
                raise UserError("consistency metrics compare next-token distributions with the baseline model, which a "
                                "stored baseline_json does not hold; drop the goal or gate.baseline_json",
                                where=f"gate.goals.{i}.metric")


def _as_stored(rows: Any) -> str:
    """Gate rows as the stage record stores them (NaN written as null), for comparing a fresh gate with a stored one."""
    from llmship.eval.summary import finite_values

    return json.dumps(finite_values(rows), sort_keys=True, default=str)


def regate(cfg: Config, result: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Apply the current `gate.goals` to an earlier eval's metrics (the scores do not depend on the goals, so a
    changed gate re-gates without re-scoring); rewrites junit.xml and the gate rows of results.json."""
    metrics = result["metrics"]
    check_goals(cfg, {name for values in metrics.values() for name in values})
    out_dir = Path(out_dir)
    results_file = out_dir / "results.json"
    intervals = result.get("intervals")
    if intervals is None:  # a record written before intervals existed: compute them from the stored predictions
        intervals = _stored_intervals(results_file, result["baseline"])
    gate_rows = evaluate_goals(cfg.gate.goals, metrics, result["baseline"], intervals)
    log_failures(gate_rows)
    if _as_stored(gate_rows) == _as_stored(result.get("gate")) and "intervals" in result:
        return result
    write_junit(gate_rows, out_dir / "junit.xml")
    if results_file.is_file():
        stored = json.loads(results_file.read_text(encoding="utf-8"))
        stored["gate"] = gate_rows
        stored["intervals"], stored["interval_method"] = intervals, INTERVAL_METHOD
        write_json(results_file, stored)
    summary = [{**row, "intervals": _row_intervals(row["name"], intervals)} for row in result.get("summary", [])]
    return {**result, "gate": gate_rows, "summary": summary, "intervals": intervals, "interval_method": INTERVAL_METHOD}


def _row_intervals(metric: str, intervals: dict[str, Any]) -> dict[str, Any]:
    return {name: found[metric] for name, found in intervals.items() if metric in found}


def _stored_intervals(results_file: Path, baseline: str) -> dict[str, Any]:
    try:
        stored = json.loads(results_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return engine_intervals(stored.get("engines") or {}, baseline, stored.get("groups") or {})


def _agreements(engines: dict[str, dict[str, Any]], tasks: Tasks) -> None:
    """ceval/<mode>/agreement of each engine against the baseline's per-question predictions."""
    if tasks.ceval is None:
        return
    base_preds = engines[BASELINE_NAME].get("predictions") or {}
    for rec in engines.values():
        for mode, records in (rec.get("predictions") or {}).items():
            base = base_preds.get(mode)
            if base is not None and [(r["subject"], r["idx"]) for r in base] == [(r["subject"], r["idx"]) for r in records]:
                rec["metrics"][f"ceval/{mode}/agreement"] = ceval_mod.agreement(base, records)


def _clean(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _notes(tasks: Tasks, from_cache: bool, cfg: Config) -> list[str]:
    notes = []
    if tasks.ceval is not None:
        truncated = sum(q.truncated for q in tasks.ceval.questions)
        if truncated:
            limit = f"max_seq_len {cfg.eval.ceval.max_seq_len}" if cfg.eval.ceval.max_seq_len else "the model's positions"
            notes.append(f"{truncated} C-Eval question(s) had prompts longer than {limit} (left-truncated)")
        dropped = sum(min(q.ppl_shots.values(), default=tasks.ceval.shots) < tasks.ceval.shots or
                      (bool(q.gen_ids) and q.gen_shots < tasks.ceval.shots) for q in tasks.ceval.questions)
        if dropped:
            notes.append(f"{dropped} C-Eval question(s) kept fewer than {tasks.ceval.shots} examples to fit max_seq_len "
                         f"{cfg.eval.ceval.max_seq_len}")
    if tasks.alpaca is not None and len(tasks.alpaca) < cfg.eval.perplexity.alpaca_samples:
        notes.append(f"alpaca perplexity over {len(tasks.alpaca)} records (fewer fit than asked)")
    if cfg.gate.baseline_json:
        notes.append(f"baseline from {cfg.gate.baseline_json} (not re-scored; no consistency figures)")
    elif from_cache:
        notes.append("baseline scores reused from the cache")
    return notes


def stage_inputs(cfg: Config) -> dict[str, Any]:
    """What the eval stage reads besides the variant folders, as fingerprints and config sections: the stage's cache key
    is derived from this (llmship.pipeline). The gate's goals are left out: a changed gate re-gates the stored scores
    instead of re-scoring."""
    from llmship.cache import folder_fingerprint
    from llmship.data.sources import data_fingerprint
    from llmship.export.source import resolve_model_path

    ev, gate = cfg.eval, cfg.gate
    return {
        "model": folder_fingerprint(resolve_model_path(cfg.model.path)), "model_config": cfg.model.model_dump(),
        "eval": ev.model_dump(), "runtime": cfg.runtime.model_dump(),
        "baseline_json": gate.baseline_json and [gate.baseline_json, folder_fingerprint(gate.baseline_json)],
        "data": {"ceval": data_fingerprint(ev.ceval.path, "ceval"), "c4": data_fingerprint(ev.perplexity.c4_path, "c4"),
                 "alpaca": data_fingerprint(ev.perplexity.alpaca_path, "alpaca")},
    }
