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
  cmmlu/<mode>/<subject|group>  the same for CMMLU; groups humanities | stem | social-science | other |
                                china-specific (overlapping, as OpenCompass's) | average; cmmlu/<mode>/agreement
  ppl/c4                        GPTQ-convention perplexity on C4-format text (lower is better)
  ppl/alpaca                    perplexity of alpaca-cleaned responses (lower is better)
  consistency/top1              % of next-token argmaxes equal to the baseline's (alpaca responses)
  consistency/kl                mean KL(baseline || variant) in nats (lower is better)
  consistency/greedy_prefix     mean tokens of greedy continuation shared with the baseline (of 32)
Each dataset is a task (llmship.eval.tasks) listed in llmship.eval.registry; this stage loops over the enabled ones.
The baseline's scores are a cached stage of their own (llmship.eval.baseline, eval.baseline_cache).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from llmship.artifact import atomic_folder
from llmship.artifact import max_positions as smallest_positions
from llmship.config import Config
from llmship.errors import UserError
from llmship.eval.baseline import baseline_record, baseline_run, computed_in, keep_baseline, reused_baseline
from llmship.eval.gate import check_metrics_known, evaluate_goals, log_failures, write_junit
from llmship.eval.intervals import METHOD as INTERVAL_METHOD
from llmship.eval.intervals import engine_intervals
from llmship.eval.registry import enabled_tasks
from llmship.eval.summary import write_json, write_tables
from llmship.eval.tasks import EvalTask, score_engine
from llmship.progress import Counter

__all__ = ["BASELINE_NAME", "regate", "run_eval", "stage_inputs"]

log = logging.getLogger("llmship")

BASELINE_NAME = "pytorch"


# --------------------------------------------------------------------------- preparation
def eval_tokenizer(cfg: Config) -> Any:
    """The source model's tokenizer (the adapter's when it ships one), used for every engine."""
    from llmship.source import load_tokenizer, resolve_model_path

    for folder in (cfg.model.adapter, resolve_model_path(cfg.model.path)):
        if folder and any((Path(folder).expanduser() / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
            return load_tokenizer(Path(folder).expanduser())
    return load_tokenizer(resolve_model_path(cfg.model.path), cfg.model.revision)


def max_positions(cfg: Config, variants: dict[str, Path]) -> int:
    """Smallest max_position_embeddings among the source and the variant folders."""
    return smallest_positions(cfg.model, variants.values())


def check_position_limits(tasks: list[EvalTask], prepared: dict[str, Any], variants: dict[str, Path]) -> None:
    """Before anything is scored: every variant graph runs the positions each task needs (C-Eval's GEN mode generates
    past the truncated prompt, beyond max positions when it fills them, as OpenCompass does)."""
    from llmship.runtime.layout import folder_position_limit

    for task in tasks:
        needed = task.positions_needed(prepared[task.name])
        if not needed:
            continue
        for folder in variants.values():
            limit = folder_position_limit(folder)
            if limit is not None and needed > limit:
                raise UserError(f"{task.title} needs {needed} positions (the longest prompt; GEN mode feeds max_out_len "
                                f"- 1 more) and the graph's rotary table has {limit}: compile the variant again with "
                                f"this llmship (tables of twice max positions) or lower {task.length_hint}",
                                where=str(folder))


def prepare_tasks(tasks: list[EvalTask], tokenizer: Any, positions: int) -> dict[str, Any]:
    """Task name -> its prepared data (read and tokenized once, shared by every engine)."""
    return {task.name: task.prepare(tokenizer, positions) for task in tasks}


def summary_rows(tasks: list[EvalTask], prepared: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for task in tasks for row in task.summary_rows(prepared[task.name])]


# --------------------------------------------------------------------------- entry point
def run_eval(cfg: Config, variants: dict[str, Path], out_dir: Path, progress: Any = None) -> dict[str, Any]:
    """Score the PyTorch baseline and every variant folder, write the summaries, apply the gate."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if BASELINE_NAME in variants:
        raise UserError(f"a variant may not be named '{BASELINE_NAME}' (the baseline's column)", where="quantize")
    bar = Counter(progress)
    tokenizer = eval_tokenizer(cfg)
    tasks = enabled_tasks(cfg)
    prepared = prepare_tasks(tasks, tokenizer, max_positions(cfg, variants))
    check_goals(cfg, {name for task in tasks for name in task.metric_names(prepared[task.name])})
    check_position_limits(tasks, prepared, variants)

    if cfg.cluster.backend == "ray":
        engines, refs, from_cache = score_on_cluster(cfg, tasks, prepared, tokenizer, variants, bar)
    else:
        engines, refs, from_cache = score_here(cfg, tasks, prepared, tokenizer, variants, bar)
    base, base_refs = engines[BASELINE_NAME], refs[BASELINE_NAME]
    for task in tasks:  # the paired metrics (agreements, consistency), the baseline's own included
        for name, rec in engines.items():
            task.compare(prepared[task.name], base, base_refs.get(task.name), rec, refs[name].get(task.name))

    metrics = {name: rec["metrics"] for name, rec in engines.items()}
    intervals: dict[str, dict[str, Any]] = {name: {} for name in engines if name != BASELINE_NAME}
    for task in tasks:
        for name, found in task.intervals(prepared[task.name], engines, BASELINE_NAME).items():
            intervals[name].update(found)
    rows = summary_rows(tasks, prepared)
    for row in rows:
        row["values"] = {name: _clean(metrics[name].get(row["name"])) for name in engines}
        row["intervals"] = _row_intervals(row["name"], intervals)
    gate_rows = evaluate_goals(cfg.gate.goals, metrics, BASELINE_NAME, intervals)
    log_failures(gate_rows)

    names = list(engines)
    wall = round(time.perf_counter() - start, 3)
    ran = baseline_run(base)
    notes = ([note for task in tasks for note in task.notes(prepared[task.name])] + _baseline_notes(from_cache, cfg)
             + [ran["summary"]])
    described: dict[str, Any] = {"subjects": [], "groups": {}, "versions": {}}
    for task in tasks:
        described.update(task.results_fields(prepared[task.name]))
    results = {"baseline": BASELINE_NAME, "baseline_cached": from_cache, "baseline_run": ran, "engines": engines, "summary": rows,
               "intervals": intervals, "interval_method": INTERVAL_METHOD, "gate": gate_rows, **described,
               "config": cfg.eval.model_dump(mode="json"), "notes": notes, "wall_s": wall}
    # Built in a temp sibling and swapped in whole: a killed or failed eval leaves the earlier results as they were.
    with atomic_folder(out_dir) as tmp:
        built = write_tables(tmp, rows, names, BASELINE_NAME, footer=[f"{BASELINE_NAME}: {ran['summary']}."])
        built["junit"] = str(write_junit(gate_rows, tmp / "junit.xml"))
        built["results"] = str(write_json(tmp / "results.json", results))
    paths = {key: str(out_dir / Path(value).relative_to(tmp)) for key, value in built.items()}
    log.info("eval: %d engine(s) scored in %.1f s (baseline %s); summary %s", len(engines), wall,
             "cached" if from_cache else "scored", paths["summary_txt"])
    return {"summary": rows, "gate": gate_rows, "baseline": BASELINE_NAME, "baseline_cached": from_cache, "baseline_run": ran,
            "metrics": metrics, "intervals": intervals, "interval_method": INTERVAL_METHOD, "paths": paths,
            "notes": notes, "wall_s": wall,
            "engines": {n: {"path": str(r.get("path")), "info": r.get("info"), "wall_s": r.get("wall_s")}
                        for n, r in engines.items()}}


def score_here(cfg: Config, tasks: list[EvalTask], prepared: dict[str, Any], tokenizer: Any, variants: dict[str, Path],
               bar: Counter) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], bool]:
    """(engine name -> record, engine name -> references, baseline from cache): one engine after another here."""
    from llmship.runtime import load_engine

    base, base_refs, from_cache = baseline_record(cfg, tasks, prepared, tokenizer, bar.scoped(f"eval {BASELINE_NAME}"))
    engines: dict[str, dict[str, Any]] = {BASELINE_NAME: base}
    refs: dict[str, dict[str, Any]] = {BASELINE_NAME: base_refs}
    for name, folder in variants.items():
        engine = load_engine(Path(folder), cfg.runtime)
        try:
            check_vocabulary(int(engine.vocab_size), base, folder)
            engines[name], refs[name] = score_engine(engine, tasks, prepared, tokenizer, bar.scoped(f"eval {name}"))
        finally:
            engine.close()
        engines[name]["path"] = str(folder)
    return engines, refs, from_cache


def score_on_cluster(cfg: Config, tasks: list[EvalTask], prepared: dict[str, Any], tokenizer: Any,
                     variants: dict[str, Path], bar: Counter,
                     ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], bool]:
    """`score_here`'s result with every (engine, task unit) a Ray task (llmship.eval.fanout); the baseline too, unless
    it is stored or cached."""
    from llmship.eval.fanout import score_engines

    reused = reused_baseline(cfg, tasks)
    sources: dict[str, Any] = {} if reused is not None else {BASELINE_NAME: cfg.model}
    sources.update({name: Path(folder) for name, folder in variants.items()})
    scored = score_engines(cfg, tasks, prepared, tokenizer, sources, bar)
    if reused is None:
        keep_baseline(cfg, tasks, *scored[BASELINE_NAME])
    base, base_refs = reused if reused is not None else scored[BASELINE_NAME]
    engines, refs = {BASELINE_NAME: base}, {BASELINE_NAME: base_refs}
    for name, folder in variants.items():
        engines[name], refs[name] = scored[name]
        check_vocabulary(int(engines[name]["vocab_size"]), base, folder)
        engines[name]["path"] = str(folder)
    return engines, refs, reused is not None


def check_vocabulary(vocab_size: int, base: dict[str, Any], folder: Path) -> None:
    if "vocab_size" in base and vocab_size != int(base["vocab_size"]):
        raise UserError(f"vocabulary of {vocab_size} tokens, the baseline has {base['vocab_size']}", where=str(folder))


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


def _clean(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _baseline_notes(from_cache: bool, cfg: Config) -> list[str]:
    if cfg.gate.baseline_json:
        return [f"baseline from {cfg.gate.baseline_json} (not re-scored; no consistency figures)"]
    return ["baseline scores reused from the cache"] if from_cache else []


def stage_inputs(cfg: Config) -> dict[str, Any]:
    """What the eval stage reads besides the variant folders, as fingerprints and config sections: the stage's cache key
    is derived from this (llmship.pipeline). Each enabled task declares its config and data files
    (llmship.eval.tasks); the gate's goals are left out: a changed gate re-gates the stored scores instead of
    re-scoring."""
    from llmship.cache import folder_fingerprint
    from llmship.source import resolve_model_path

    ev, gate = cfg.eval, cfg.gate
    return {
        "model": folder_fingerprint(resolve_model_path(cfg.model.path)), "model_config": cfg.model.model_dump(),
        "adapter": cfg.model.adapter and folder_fingerprint(Path(cfg.model.adapter).expanduser()),
        "eval": {"batch_size": ev.batch_size, "baseline_cache": ev.baseline_cache},
        "tasks": {task.name: task.declaration() for task in enabled_tasks(cfg)},
        "runtime": cfg.runtime.model_dump(),
        "baseline_json": gate.baseline_json and [gate.baseline_json, folder_fingerprint(gate.baseline_json)],
        **({} if gate.baseline_json or not (dtype := computed_in(cfg)) else {"baseline_computed_in": dtype}),
    }
