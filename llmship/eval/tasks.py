"""The protocol every eval task follows; the registry (llmship.eval.registry) lists the tasks, and the eval stage
(llmship.eval.run_eval) is a loop over the enabled ones.

A task declares:
- its config section (`section`) and when it runs (`enabled`): the stage key holds the section and the fingerprints
  of its data files (`data_inputs`), nothing else; the preflight (llmship.preflight) checks the same data inputs and
  `length_problems` before anything is built;
- its metrics and their direction (`metric_prefixes`, `lower_is_better`): the gate reads directions from here;
- `prepare`: everything engine-independent, tokenized once per run (the returned object is shared by all engines);
- `score`: one engine's record fields, metrics and (optionally) a reference kept for the paired comparison
  (`compare`) with the baseline; `save_reference` / `load_reference` keep that reference in the baseline cache;
- `summary_rows`: its rows of the OpenCompass summary table, each with `n` (items behind the metric);
- `intervals`: the 95% paired intervals of its metrics (llmship.eval.intervals);
- `units` / `score_unit` / `merge_units`: the pieces its scoring can be split into (one per C-Eval subject and
  mode, one per block of whole batches of the others), so a cluster run (llmship.eval.fanout) can fan them out and merge them into what `score` returns.
"""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from llmship.config import Config
from llmship.runtime.base import Engine

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DataInput:
    """A data file or folder a task reads: the stage key fingerprints it, the preflight checks it."""

    field: str  # the dotted config field naming it (messages, `llmship check`)
    kind: str  # dataset kind (llmship.data.sources.resolve): c4, ceval, cmmlu, alpaca
    path: str  # as configured: '@embedded', a local path or a hub id
    splits: tuple[str, ...] = ()  # the splits the task reads, for the preflight's header check
    subjects: tuple[str, ...] | None = None  # only these subjects (C-Eval, CMMLU)


class EvalTask(ABC):
    """One eval task bound to a run's config."""

    name: ClassVar[str]  # the task's key (registry, stage key, record fields)
    title: ClassVar[str]  # how messages name it
    section: ClassVar[str]  # the dotted config section it reads
    metric_prefixes: ClassVar[tuple[str, ...]]  # every metric it produces starts with one of these
    lower_is_better: ClassVar[tuple[str, ...]] = ()  # prefixes (of its metrics) where a lower value is better

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    # ------------------------------------------------------------------ declaration
    @classmethod
    @abstractmethod
    def enabled(cls, cfg: Config) -> bool:
        """Whether this config runs the task."""

    @abstractmethod
    def settings(self) -> Any:
        """The config the task's scores depend on (part of the stage key)."""

    @abstractmethod
    def data_inputs(self) -> list[DataInput]:
        """Every data file or folder it reads."""

    def length_problems(self, positions: int) -> list[str]:
        """What in its config cannot fit in `positions` (the model's max positions), each naming the field; the
        preflight reports them before anything is built."""
        return []

    def data_fingerprints(self) -> dict[str, str]:
        from llmship.data.sources import data_fingerprint

        return {data.field: data_fingerprint(data.path, data.kind) for data in self.data_inputs()}

    def declaration(self) -> dict[str, Any]:
        """What the task's scores are a function of, besides the model and the engines: its config and its data."""
        return {"config": self.settings(), "data": self.data_fingerprints()}

    @classmethod
    def produces(cls, metric: str) -> bool:
        return metric.startswith(cls.metric_prefixes)

    @classmethod
    def higher_is_better(cls, metric: str) -> bool:
        return not metric.startswith(cls.lower_is_better)

    # ------------------------------------------------------------------ preparation
    @abstractmethod
    def prepare(self, tokenizer: Any, positions: int) -> Any:
        """Read the data and tokenize every prompt once (`positions`: the smallest max positions of the engines)."""

    @abstractmethod
    def metric_names(self, prepared: Any) -> set[str]:
        """Every metric name this run of the task will produce."""

    def positions_needed(self, prepared: Any) -> int:
        """Positions an engine must be able to run (beyond max positions only when the task generates past them)."""
        return 0

    length_hint: ClassVar[str] = ""  # the config fields that shorten what `positions_needed` counts

    # ------------------------------------------------------------------ scoring
    @abstractmethod
    def score(self, engine: Engine, prepared: Any, tokenizer: Any, progress: Progress | None,
              ) -> tuple[dict[str, Any], dict[str, float], Any]:
        """(record fields, metrics, reference for `compare` or None) of one engine."""

    def compare(self, prepared: Any, base: dict[str, Any], base_ref: Any, rec: dict[str, Any], ref: Any) -> None:
        """Add the metrics that pair an engine with the baseline to `rec` (the baseline itself included); most tasks
        have none."""
        return

    def units(self, prepared: Any) -> list[str]:
        """The pieces `score_unit` scores separately; together they are the whole task."""
        return [self.name]

    def score_unit(self, engine: Engine, prepared: Any, unit: str, tokenizer: Any,
                   progress: Progress | None = None) -> tuple[dict[str, Any], dict[str, float], Any]:
        """`score` restricted to one unit of `units`."""
        if unit != self.name:
            raise KeyError(unit)
        return self.score(engine, prepared, tokenizer, progress)

    def merge_units(self, prepared: Any, parts: list[tuple[dict[str, Any], dict[str, float], Any]],
                    ) -> tuple[dict[str, Any], dict[str, float], Any]:
        """What `score` returns, from the `score_unit` results of every unit of `units`, in that order (a cluster
        run scores them apart). A task of one unit: that unit's result."""
        if len(parts) != 1:
            raise ValueError(f"{self.name}: {len(parts)} unit results for a task of one unit")
        return parts[0]

    # ------------------------------------------------------------------ reporting
    @abstractmethod
    def summary_rows(self, prepared: Any) -> list[dict[str, Any]]:
        """Summary rows {dataset, version, metric, mode, name, n}, in table order."""

    def intervals(self, prepared: Any, engines: Mapping[str, Mapping[str, Any]], baseline: str,
                  ) -> dict[str, dict[str, dict]]:
        """variant -> metric -> 95% paired interval of its difference from the baseline."""
        return {}

    def notes(self, prepared: Any) -> list[str]:
        return []

    def results_fields(self, prepared: Any) -> dict[str, Any]:
        """Top-level results.json fields describing the scored data (C-Eval: subjects, groups, prompt versions)."""
        return {}

    # ------------------------------------------------------------------ baseline cache
    def save_reference(self, ref: Any, folder: Path) -> None:
        """Store the baseline's reference in the cache folder (tasks whose `score` returns one)."""
        return

    def load_reference(self, folder: Path) -> Any:
        return None


def short_hash(obj: Any) -> str:
    """The 6-hex 'version' of a summary row: a hash of what the row's prompts and settings are."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:6]


def counter(progress: Progress | None, description: str, total: int) -> Callable[[int], None]:
    """A step callback that reports `done of total` under `description`."""
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(description, done[0], total)

    return step


def cumulative(progress: Progress | None) -> Progress | None:
    """`progress` for a run of units: each description's count goes on from where the previous unit's ended (a unit
    counts its own `done of total` from zero)."""
    if progress is None:
        return None
    ended: dict[str, int] = {}  # description -> work of the units that finished
    last: dict[str, tuple[int, int]] = {}

    def report(description: str, done: int, total: int) -> None:
        prev_done, prev_total = last.get(description, (0, -1))
        if prev_done == prev_total:  # the previous unit under this description is complete: a new one starts
            ended[description] = ended.get(description, 0) + max(prev_total, 0)
        last[description] = (done, total)
        base = ended.get(description, 0)
        progress(description, base + done, base + total)

    return report


def score_engine(engine: Engine, tasks: list[EvalTask], prepared: Mapping[str, Any], tokenizer: Any,
                 progress: Progress | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every task on one engine: (record with info, metrics and each task's fields; task name -> reference)."""
    start = time.perf_counter()
    rec: dict[str, Any] = {"info": engine.info(), "vocab_size": int(engine.vocab_size), "metrics": {}}
    refs: dict[str, Any] = {}
    for task in tasks:
        fields, metrics, ref = task.score(engine, prepared[task.name], tokenizer, progress)
        rec.update(fields)
        rec["metrics"].update(metrics)
        if ref is not None:
            refs[task.name] = ref
    rec["wall_s"] = round(time.perf_counter() - start, 3)
    return rec, refs
