"""The PyTorch baseline's scores: stored (`gate.baseline_json`), cached, or scored now.

The cache is an ordinary cached stage of the cache layer (llmship.cache), named `eval-baseline`: its key is derived
from the model's files and config and from what the enabled tasks declare (their config and data fingerprints,
llmship.eval.tasks), its artifact is `<output.dir>/.llmship/eval-baseline/<key>/` (baseline.json + each task's
reference, e.g. consistency.npz), built in a temp sibling and swapped in whole, and its record is written only after
the swap. `eval.baseline_cache: false` neither reads nor writes it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from llmship.artifact import atomic_folder
from llmship.cache import cached, folder_fingerprint, rebuilding, record, stage_key
from llmship.config import Config
from llmship.errors import UserError
from llmship.eval.summary import write_json
from llmship.eval.tasks import EvalTask, Progress, score_engine

log = logging.getLogger("llmship")

STAGE = "eval-baseline"
RECORD_FILE = "baseline.json"


def baseline_key(cfg: Config, tasks: list[EvalTask]) -> str:
    """The cache key: model files and config, batch size, the tasks' declarations, and the dtype the baseline computes
    in when that is not model.dtype (a layer-at-a-time fallback runs fp32: its scores are not the bf16 model's)."""
    from llmship.source import resolve_model_path

    adapter = cfg.model.adapter
    return stage_key(STAGE, folder_fingerprint(Path(resolve_model_path(cfg.model.path)).expanduser()),
                     adapter and folder_fingerprint(Path(adapter).expanduser()), cfg.model.model_dump(),
                     cfg.eval.batch_size, {task.name: task.declaration() for task in tasks}, *computed_in(cfg))


def computed_in(cfg: Config) -> list[str]:
    """[] when the baseline computes in model.dtype (every key as it was before the memory plan), else the dtype it
    computes in: part of the baseline's and the eval stage's keys."""
    from llmship.runtime.torch_baseline import plan_baseline

    dtype = plan_baseline(cfg.model).dtype
    return [] if dtype == cfg.model.dtype else [f"computed in {dtype}"]


def cache_root(cfg: Config) -> Path:
    return Path(cfg.output.dir).expanduser() / ".llmship" / STAGE


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


def load_cached(folder: Path, tasks: list[EvalTask]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    try:
        rec = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
        refs = {task.name: task.load_reference(folder) for task in tasks}
    except (OSError, ValueError, KeyError):
        return None
    return rec, {name: ref for name, ref in refs.items() if ref is not None}


def save_cached(cfg: Config, tasks: list[EvalTask], key: str, rec: dict[str, Any], refs: dict[str, Any]) -> None:
    out, root = Path(cfg.output.dir).expanduser(), cache_root(cfg)
    folder = root / key
    with rebuilding(out, STAGE):
        with atomic_folder(folder) as tmp:
            write_json(tmp / RECORD_FILE, rec)
            for task in tasks:
                task.save_reference(refs.get(task.name), tmp)
        record(out, STAGE, key, folder)
    for stale in root.iterdir():  # the record names one baseline; older keys would never be read again
        if stale.is_dir() and stale.name != key and ".tmp-" not in stale.name:
            shutil.rmtree(stale, ignore_errors=True)


def reused_baseline(cfg: Config, tasks: list[EvalTask]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(record, task name -> reference) from `gate.baseline_json` or the cache; None when the baseline must be scored."""
    if cfg.gate.baseline_json:
        return stored_baseline(cfg.gate.baseline_json), {}
    folder = cache_root(cfg) / baseline_key(cfg, tasks)
    if cfg.eval.baseline_cache and cached(Path(cfg.output.dir).expanduser(), STAGE, folder.name, folder):
        hit = load_cached(folder, tasks)
        if hit is not None:
            log.info("eval: baseline scores reused from %s", folder)
            return hit
    return None


def keep_baseline(cfg: Config, tasks: list[EvalTask], rec: dict[str, Any], refs: dict[str, Any]) -> None:
    """A freshly scored baseline: its path recorded, and cached unless `eval.baseline_cache: false`."""
    rec["path"] = cfg.model.path
    if cfg.eval.baseline_cache:
        save_cached(cfg, tasks, baseline_key(cfg, tasks), rec, refs)


def baseline_run(rec: dict[str, Any]) -> dict[str, Any]:
    """Which baseline produced `rec`: the plan its engine recorded (engine, dtype, whole or layer at a time, memory),
    or, for a record written before plans were recorded, the engine and dtype it names."""
    info = rec.get("info") or {}
    if isinstance(info.get("baseline"), dict):
        return info["baseline"]
    dtype = info.get("dtype", "unknown dtype")
    return {"engine": info.get("engine", "torch"), "dtype": dtype, "mode": "whole", "label": "whole model",
            "summary": f"PyTorch baseline: whole model, {dtype} (recorded before the memory plan was)"}


def baseline_record(cfg: Config, tasks: list[EvalTask], prepared: dict[str, Any], tokenizer: Any, progress: Progress,
                    ) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """(record, task name -> reference, from_cache): stored JSON, cache hit, or a fresh PyTorch run."""
    hit = reused_baseline(cfg, tasks)
    if hit is not None:
        return hit[0], hit[1], True
    from llmship.runtime import load_engine

    engine = load_engine(cfg.model, cfg.runtime)
    try:
        rec, refs = score_engine(engine, tasks, prepared, tokenizer, progress)
    finally:
        engine.close()
    keep_baseline(cfg, tasks, rec, refs)
    return rec, refs, False
