"""The eval stage on a Ray cluster (`cluster.backend: ray`): one Ray task per (engine, task unit), merged by the
driver into the same engine records a local run builds (llmship.eval.tasks.score_engine), so results.json, the
summaries, JUnit and the gate follow unchanged.

- The driver reads and tokenizes the data once (as a local run does) and ships the prepared data and the tokenizer
  through Ray's object store; engines are loaded on the workers from output.dir and the model path, which every node
  must see (llmship.cluster.probe_nodes checks it first).
- A unit is `EvalTask.score_unit` (C-Eval and CMMLU: one subject in one mode; perplexity and consistency: a block
  of whole batches of the local run);
  `EvalTask.merge_units` puts an engine's units back together in question order.
- Each finished unit is stored under `<output.dir>/.llmship/eval-units/<key>.pkl`, its key derived from the engine's
  files, the task's config and data, the batch size, the runtime settings and the library versions (as every stage
  key): a run stopped by a failed unit, or rerun with one more variant, scores only what is missing.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmship.cache import folder_fingerprint, stage_key
from llmship.cluster import Unit, connected, probe_nodes, run_units, this_node
from llmship.config import Config, ModelConfig, RuntimeConfig
from llmship.data.sources import resolve
from llmship.eval.tasks import EvalTask
from llmship.files import write_atomic
from llmship.source import resolve_model_path

log = logging.getLogger("llmship")

UNIT_FOLDER = Path(".llmship") / "eval-units"

EngineSource = ModelConfig | Path  # what llmship.runtime.load_engine takes: the source model or a variant folder


# --------------------------------------------------------------------------- on a worker
# One engine kept per worker process: Ray reuses a worker for the next task, and consecutive units of the same
# engine then skip the load (seconds on a 7B model).
_loaded: dict[str, Any] = {}


def _engine(source: EngineSource, runtime: RuntimeConfig) -> Any:
    from llmship.runtime import load_engine

    key = repr((str(source) if isinstance(source, Path) else source.model_dump(), runtime.model_dump()))
    if _loaded.get("key") != key:
        if "engine" in _loaded:
            _loaded.pop("engine").close()
        _loaded.update(key=key, engine=load_engine(source, runtime))
    return _loaded["engine"]


def score_unit(source: EngineSource, runtime: RuntimeConfig, task: EvalTask, prepared: Any, unit: str,
               tokenizer: Any) -> dict[str, Any]:
    """One unit on the worker this Ray task landed on: the task's (fields, metrics, reference) and the engine's info."""
    engine = _engine(source, runtime)
    start = time.perf_counter()
    part = task.score_unit(engine, prepared, unit, tokenizer)
    return {"part": part, "info": engine.info(), "vocab_size": int(engine.vocab_size),
            "wall_s": time.perf_counter() - start, "node": this_node()}


# --------------------------------------------------------------------------- on the driver
def engine_identity(source: EngineSource) -> Any:
    """What an engine's scores are a function of besides the task: its files (and the model config)."""
    if isinstance(source, Path):
        return folder_fingerprint(source)
    adapter = source.adapter and folder_fingerprint(Path(source.adapter).expanduser())
    return [folder_fingerprint(Path(resolve_model_path(source.path)).expanduser()), adapter, source.model_dump()]


def shared_paths(cfg: Config, tasks: list[EvalTask], sources: dict[str, EngineSource]) -> dict[str, Path]:
    """Every local path a worker reads, by the config field (or variant) naming it: what the probe checks."""
    paths: dict[str, Path] = {}
    for name, source in sources.items():
        if isinstance(source, Path):
            paths[f"variant {name}"] = source
            continue
        model = Path(resolve_model_path(source.path)).expanduser()
        if model.exists():
            paths["model.path"] = model
        if source.adapter:
            paths["model.adapter"] = Path(source.adapter).expanduser()
    for task in tasks:  # read on the driver, checked anyway: a node that sees other data than the driver is misconfigured
        for data in task.data_inputs():
            local = resolve(data.path, data.kind)
            if isinstance(local, Path) and local.exists():
                paths[data.field] = local
    return paths


class UnitCache:
    """Finished units of this output.dir, one pickle each, keyed as described in the module doc."""

    def __init__(self, cfg: Config, tasks: list[EvalTask]):
        self.folder = Path(cfg.output.dir).expanduser() / UNIT_FOLDER
        self.common = [cfg.eval.batch_size, cfg.runtime.model_dump()]
        self.declarations = {task.name: task.declaration() for task in tasks}
        self.used: set[str] = set()

    def key(self, identity: Any, task: EvalTask, unit: str) -> str:
        key = stage_key("eval-unit", identity, task.name, self.declarations[task.name], *self.common, unit)
        self.used.add(key)
        return key

    def load(self, key: str) -> dict[str, Any] | None:
        try:
            return pickle.loads((self.folder / f"{key}.pkl").read_bytes())
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
            return None

    def save(self, key: str, result: dict[str, Any]) -> None:
        write_atomic(self.folder / f"{key}.pkl", pickle.dumps(result))

    def prune(self) -> None:
        """Drop units no longer asked for (another config, a rebuilt variant): they would never be read again."""
        for file in self.folder.glob("*.pkl"):
            if file.stem not in self.used:
                file.unlink(missing_ok=True)


def score_engines(cfg: Config, tasks: list[EvalTask], prepared: dict[str, Any], tokenizer: Any,
                  sources: dict[str, EngineSource], progress: Callable[[str, int, int], None],
                  ) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Engine name -> (record, task name -> reference), as `score_engine` returns them, every unit a Ray task."""
    cache = UnitCache(cfg, tasks)
    results: dict[tuple[str, str, str], dict[str, Any]] = {}
    todo: list[tuple[str, EngineSource, EvalTask, str, str]] = []
    for name, source in sources.items():
        identity = engine_identity(source)
        for task in tasks:
            for unit in task.units(prepared[task.name]):
                key = cache.key(identity, task, unit)
                hit = cache.load(key)
                if hit is None:
                    todo.append((name, source, task, unit, key))
                else:
                    results[(name, task.name, unit)] = hit
    total, description = len(results) + len(todo), "eval units (cluster)"
    progress(description, len(results), total)
    if todo:
        log.info("eval: %d unit(s) to score on the cluster, %d reused from %s", len(todo), len(results), cache.folder)
        with connected(cfg.cluster) as ray:
            probe_nodes(ray, Path(cfg.output.dir).expanduser(), shared_paths(cfg, tasks, sources))
            shipped = {task.name: ray.put(prepared[task.name]) for task in tasks}
            tokenizer_ref = ray.put(tokenizer)
            units = [Unit(f"eval unit {task.name} {unit} of {name}",
                          (source, cfg.runtime, task, shipped[task.name], unit, tokenizer_ref))
                     for name, source, task, unit, _ in todo]
            where = {unit.label: item for unit, item in zip(units, todo, strict=True)}

            def finished(unit: Unit, result: dict[str, Any]) -> None:
                name, _, task, unit_name, key = where[unit.label]
                cache.save(key, result)
                results[(name, task.name, unit_name)] = result
                progress(description, len(results), total)

            run_units(ray, cfg.cluster, score_unit, units, finished)
    cache.prune()
    return {name: merged_record(tasks, prepared, results, name) for name in sources}


def merged_record(tasks: list[EvalTask], prepared: dict[str, Any], results: dict[tuple[str, str, str], dict[str, Any]],
                  name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One engine's record and references from its units, in the layout of llmship.eval.tasks.score_engine, plus the
    nodes its units ran on; wall_s is the sum of its units' scoring times (what one worker would have spent)."""
    mine = [result for (engine, _, _), result in results.items() if engine == name]
    rec: dict[str, Any] = {"info": mine[0]["info"], "vocab_size": mine[0]["vocab_size"], "metrics": {}}
    refs: dict[str, Any] = {}
    for task in tasks:
        parts = [results[(name, task.name, unit)]["part"] for unit in task.units(prepared[task.name])]
        fields, metrics, ref = task.merge_units(prepared[task.name], parts)
        rec.update(fields)
        rec["metrics"].update(metrics)
        if ref is not None:
            refs[task.name] = ref
    rec["nodes"] = sorted({result["node"] for result in mine})
    rec["wall_s"] = round(sum(result["wall_s"] for result in mine), 3)
    return rec, refs
