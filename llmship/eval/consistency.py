"""How closely a variant follows the baseline on alpaca prompts.

- top-1 agreement: % of positions where both engines' next-token argmax agree;
- KL(baseline || variant): mean over positions of sum_v p_b(v) (log p_b(v) - log p_v(v)), in nats;
- greedy prefix: mean number of leading tokens of the greedy continuation that the variant shares with
  the baseline (out of GREEDY_TOKENS; EOS ends a continuation).
Positions are those that predict the alpaca response (output + EOS, at most MAX_POSITIONS) under teacher
forcing, the same tokens for every engine; the baseline's log-probabilities are kept (and cached) for the comparison.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmship.config import Config
from llmship.eval.intervals import top1_interval
from llmship.eval.lm import batch_blocks, for_each_logits, log_softmax64
from llmship.eval.perplexity import alpaca_examples, eval_records
from llmship.eval.tasks import DataInput, EvalTask, Progress, counter, short_hash
from llmship.runtime.base import Engine

GREEDY_TOKENS = 32  # new tokens of the greedy-prefix comparison
# Response positions compared per prompt: bounds the cached baseline distributions (positions x vocab floats).
MAX_POSITIONS = 128
# A cluster unit of consistency: one batch, teacher-forced or greedy. A greedy batch is GREEDY_TOKENS sequential
# decode steps, and a teacher-forced batch returns batch x MAX_POSITIONS x vocab float32 log-probs (128 MB at batch
# 8 and a 32k vocabulary), so one batch is already a unit the size of a C-Eval subject.
CONSISTENCY_BATCHES_PER_UNIT = 1


def reference(engine: Engine, examples: Sequence[dict[str, Any]], batch_size: int,
              on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Log-probs (float32, response positions) and greedy continuations of one engine."""
    return {"logprobs": response_logprobs(engine, examples, batch_size, on_batch),
            "greedy": greedy_continuations(engine, examples, batch_size)}


def response_logprobs(engine: Engine, examples: Sequence[dict[str, Any]], batch_size: int,
                      on_batch: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Teacher-forced log-probs over the vocabulary at each response position, batched by length (llmship.eval.lm)."""
    logprobs: list[np.ndarray] = [np.empty(0)] * len(examples)

    def visit(i: int, logits: np.ndarray) -> None:
        start = examples[i]["start"]
        logprobs[i] = log_softmax64(logits[start - 1:-1][:MAX_POSITIONS]).astype(np.float32)

    for_each_logits(engine, [e["ids"] for e in examples], batch_size, visit, on_batch)
    return logprobs


def greedy_continuations(engine: Engine, examples: Sequence[dict[str, Any]], batch_size: int) -> list[list[int]]:
    """GREEDY_TOKENS greedy tokens after each prompt, batched in prompt order."""
    greedy: list[list[int]] = []
    for first in range(0, len(examples), batch_size):
        chunk = [e["prompt_ids"] for e in examples[first:first + batch_size]]
        greedy += engine.generate(chunk, GREEDY_TOKENS)
    return greedy


def prefix_match(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def compare(base: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    """consistency/top1 (%), consistency/kl (nats), consistency/greedy_prefix (tokens)."""
    agree, kls = [], []
    for lb, lv in zip(base["logprobs"], other["logprobs"], strict=True):
        lb64, lv64 = lb.astype(np.float64), lv.astype(np.float64)
        agree.append(lb64.argmax(-1) == lv64.argmax(-1))
        kls.append((np.exp(lb64) * (lb64 - lv64)).sum(-1))
    prefix = [prefix_match(a, b) for a, b in zip(base["greedy"], other["greedy"], strict=True)]
    if not agree:
        return {}
    return {"consistency/top1": 100.0 * float(np.concatenate(agree).mean()),
            "consistency/kl": max(0.0, float(np.concatenate(kls).mean())),  # >= 0; float noise can dip below
            "consistency/greedy_prefix": float(np.mean(prefix))}


def top1_per_prompt(base: dict[str, Any], other: dict[str, Any]) -> list[list[int]]:
    """[positions whose argmax agrees, positions compared] per prompt (the prompt-level data behind
    consistency/top1, which its interval resamples)."""
    return [[int((lb.argmax(-1) == lv.argmax(-1)).sum()), int(lb.shape[0])]
            for lb, lv in zip(base["logprobs"], other["logprobs"], strict=True)]


METRICS = ("consistency/top1", "consistency/kl", "consistency/greedy_prefix")
# Summary table: metric column of each row, in METRICS order.
ROW_METRICS = ("top1_agreement", "kl_baseline_variant", "greedy_prefix_tokens")
REFERENCE_FILE = "consistency.npz"


class Consistency(EvalTask):
    """Next-token agreement, KL and greedy prefix of each variant with the baseline on alpaca prompts
    (eval.consistency_prompts, prompts from eval.perplexity.alpaca_path)."""

    name = "consistency"
    title = "consistency"
    section = "eval.consistency_prompts"
    metric_prefixes = ("consistency/",)
    lower_is_better = ("consistency/kl",)

    @classmethod
    def enabled(cls, cfg: Config) -> bool:
        return cfg.eval.consistency_prompts > 0

    def settings(self) -> Any:
        return {"prompts": self.cfg.eval.consistency_prompts, "alpaca_path": self.cfg.eval.perplexity.alpaca_path}

    def data_inputs(self) -> list[DataInput]:
        return [DataInput("eval.perplexity.alpaca_path", "alpaca", self.cfg.eval.perplexity.alpaca_path)]

    def prepare(self, tokenizer: Any, positions: int) -> list[dict[str, Any]]:
        count = self.cfg.eval.consistency_prompts
        examples = alpaca_examples(eval_records(self.cfg.eval.perplexity.alpaca_path), tokenizer, 10 * count, positions)
        return [e for e in examples if len(e["prompt_ids"]) + GREEDY_TOKENS <= positions][:count]

    def metric_names(self, prepared: list[dict[str, Any]]) -> set[str]:
        return set(METRICS) if prepared else set()

    def score(self, engine: Engine, prepared: list[dict[str, Any]], tokenizer: Any, progress: Progress | None,
              ) -> tuple[dict[str, Any], dict[str, float], Any]:
        if not prepared:
            return {}, {}, None
        ref = reference(engine, prepared, self.cfg.eval.batch_size, counter(progress, "consistency", len(prepared)))
        return {}, {}, ref

    def blocks(self, prepared: list[dict[str, Any]]) -> dict[str, list[int]]:
        """Unit name -> its prompts (indices, in batch order). `score` batches the prompts twice: teacher-forced by
        length (llmship.eval.lm.batches), greedy in prompt order; a unit is a run of whole batches of one of the two,
        'teacher-forced batches <first>-<last>' or 'greedy batches <first>-<last>', so every batch is the whole run's."""
        size = self.cfg.eval.batch_size
        forced = batch_blocks([len(e["ids"]) for e in prepared], size, CONSISTENCY_BATCHES_PER_UNIT)
        per_unit = size * CONSISTENCY_BATCHES_PER_UNIT
        greedy = {f"batches {first // size}-{(min(first + per_unit, len(prepared)) - 1) // size}":
                  list(range(first, min(first + per_unit, len(prepared))))
                  for first in range(0, len(prepared), per_unit)}
        return {**{f"teacher-forced {name}": indices for name, indices in forced.items()},
                **{f"greedy {name}": indices for name, indices in greedy.items()}}

    def units(self, prepared: list[dict[str, Any]]) -> list[str]:
        return list(self.blocks(prepared)) if prepared else [self.name]

    def score_unit(self, engine: Engine, prepared: list[dict[str, Any]], unit: str, tokenizer: Any,
                   progress: Progress | None = None) -> tuple[dict[str, Any], dict[str, float], Any]:
        if not prepared:
            return super().score_unit(engine, prepared, unit, tokenizer, progress)
        block = [prepared[i] for i in self.blocks(prepared)[unit]]
        size = self.cfg.eval.batch_size
        if unit.startswith("greedy "):
            return {}, {}, {"greedy": greedy_continuations(engine, block, size)}
        return {}, {}, {"logprobs": response_logprobs(engine, block, size, counter(progress, "consistency", len(block)))}

    def merge_units(self, prepared: list[dict[str, Any]], parts: list[tuple[dict[str, Any], dict[str, float], Any]],
                    ) -> tuple[dict[str, Any], dict[str, float], Any]:
        if not prepared:
            return super().merge_units(prepared, parts)
        ref: dict[str, list[Any]] = {"logprobs": [None] * len(prepared), "greedy": [None] * len(prepared)}
        for indices, (_, _, part) in zip(self.blocks(prepared).values(), parts, strict=True):
            (kind, values), = part.items()
            for i, value in zip(indices, values, strict=True):
                ref[kind][i] = value
        return {}, {}, ref

    def compare(self, prepared: Any, base: dict[str, Any], base_ref: Any, rec: dict[str, Any], ref: Any) -> None:
        if base_ref is None or ref is None:
            return
        rec["metrics"].update(compare(base_ref, ref))
        if ref is not base_ref:
            rec["consistency_top1_prompts"] = top1_per_prompt(base_ref, ref)

    def summary_rows(self, prepared: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not prepared:
            return []
        version = short_hash(["consistency", self.cfg.eval.consistency_prompts, GREEDY_TOKENS])
        return [{"dataset": "alpaca-consistency", "version": version, "metric": metric, "mode": "gen", "name": name,
                 "n": len(prepared)} for name, metric in zip(METRICS, ROW_METRICS, strict=True)]

    def intervals(self, prepared: Any, engines: Any, baseline: str) -> dict[str, dict[str, dict]]:
        out: dict[str, dict[str, dict]] = {}
        for name, rec in engines.items():
            top1 = top1_interval(rec.get("consistency_top1_prompts") or []) if name != baseline else None
            if top1 is not None:
                out[name] = {"consistency/top1": top1}
        return out

    def save_reference(self, ref: Any, folder: Path) -> None:
        if ref is None:
            return
        arrays = {f"lp{i}": lp for i, lp in enumerate(ref["logprobs"])}
        np.savez(folder / REFERENCE_FILE, count=np.array(len(ref["logprobs"])),
                 greedy=np.array(json.dumps(ref["greedy"])), **arrays)

    def load_reference(self, folder: Path) -> Any:
        if not (folder / REFERENCE_FILE).is_file():
            return None
        with np.load(folder / REFERENCE_FILE) as npz:
            count = int(npz["count"])
            return {"logprobs": [npz[f"lp{i}"] for i in range(count)], "greedy": json.loads(str(npz["greedy"]))}
