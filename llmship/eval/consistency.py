"""How closely a variant follows the baseline on alpaca prompts.

- top-1 agreement: % of positions where both engines' next-token argmax agree;
- KL(baseline || variant): mean over positions of sum_v p_b(v) (log p_b(v) - log p_v(v)), in nats;
- greedy prefix: mean number of leading tokens of the greedy continuation that the variant shares with
  the baseline (out of GREEDY_TOKENS; EOS ends a continuation).
Positions are those that predict the alpaca response (output + EOS, at most MAX_POSITIONS) under teacher
forcing, the same tokens for every engine; the baseline's log-probabilities are kept (and cached) for the comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llmship.eval.lm import for_each_logits, log_softmax64
from llmship.runtime.base import Engine

GREEDY_TOKENS = 32  # new tokens of the greedy-prefix comparison
# Response positions compared per prompt: bounds the cached baseline distributions (positions x vocab floats).
MAX_POSITIONS = 128


def reference(engine: Engine, examples: Sequence[dict[str, Any]], batch_size: int,
              on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Log-probs (float32, response positions) and greedy continuations of one engine."""
    logprobs: list[np.ndarray] = [np.empty(0)] * len(examples)

    def visit(i: int, logits: np.ndarray) -> None:
        start = examples[i]["start"]
        logprobs[i] = log_softmax64(logits[start - 1:-1][:MAX_POSITIONS]).astype(np.float32)

    for_each_logits(engine, [e["ids"] for e in examples], batch_size, visit, on_batch)
    greedy: list[list[int]] = []
    for first in range(0, len(examples), batch_size):
        chunk = [e["prompt_ids"] for e in examples[first:first + batch_size]]
        greedy += engine.generate(chunk, GREEDY_TOKENS)
    return {"logprobs": logprobs, "greedy": greedy}


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
