"""Perplexity on C4-format text (GPTQ convention, METHODS.md (b)) and on alpaca-cleaned responses.

C4 (the validation split; calibration reads the train split): `windows` windows of `seq_len` tokens drawn as GPTQ's `get_c4` draws its validation windows
(random.seed(0) whatever the calibration seed; per window pick a random document until one has enough
tokens, then a random offset), concatenated and cut into non-overlapping seq_len windows (`llama_eval`):
ppl = exp(mean over windows of the window's mean cross-entropy over its seq_len - 1 targets).
Deviation: GPTQ's `randint(0, n - seq_len - 1)` raises when a document has exactly seq_len tokens; such a
document is skipped here (the draw goes on as if it were too short).

alpaca: the held-out part of the file (sources.alpaca_part; calibration never draws it), in Stanford Alpaca's
supervised format (train.py): source = the prompt template, target = output +
EOS; the loss covers the target tokens only; ppl = exp(total target NLL / target tokens).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llmship.data.templates import alpaca_prompt
from llmship.errors import UserError
from llmship.eval.lm import sequence_logprobs
from llmship.runtime.base import Engine

C4_EVAL_SEED = 0  # GPTQ datautils.get_c4: the validation windows always use random.seed(0)
MAX_DRAWS_PER_WINDOW = 10_000  # a document pool with no long-enough text would otherwise loop forever

def c4_windows(texts: Sequence[str], tokenizer: Any, seq_len: int, windows: int, seed: int = C4_EVAL_SEED,
               where: str = "eval.perplexity.c4_path") -> list[list[int]]:
    """GPTQ get_c4 validation windows (BOS of each document tokenization included, as GPTQ's tokenizer call)."""
    if not texts:
        raise UserError("no C4 documents to score", where=where)
    rng = random.Random(seed)
    cache: dict[int, list[int]] = {}
    out = []
    for _ in range(windows):
        for _draw in range(MAX_DRAWS_PER_WINDOW):
            d = rng.randint(0, len(texts) - 1)
            if d not in cache:
                cache[d] = list(tokenizer(texts[d])["input_ids"])
            if len(cache[d]) > seq_len:
                break
        else:
            raise UserError(f"no C4 document has more than {seq_len} tokens; lower eval.perplexity.seq_len", where=where)
        ids = cache[d]
        i = rng.randint(0, len(ids) - seq_len - 1)
        out.append(ids[i:i + seq_len])
    return out


def c4_perplexity(engine: Engine, windows: Sequence[Sequence[int]], batch_size: int,
                  on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    own, _ = sequence_logprobs(engine, windows, batch_size, on_batch=on_batch)
    window_nll = [float(-lp.mean()) for lp in own]
    return {"ppl": math.exp(float(np.mean(window_nll))), "window_nll": window_nll}


def alpaca_examples(records: Sequence[dict[str, Any]], tokenizer: Any, count: int, max_positions: int) -> list[dict[str, Any]]:
    """The first `count` records (file order) with a non-empty output that fit in max_positions:
    {'ids': prompt + output + EOS, 'start': index of the first response token, 'prompt_ids'}."""
    eos = tokenizer.eos_token_id
    out = []
    for n, record in enumerate(records):
        if len(out) >= count:
            break
        output = str(record.get("output") or "")
        if not output.strip():
            continue
        prompt = alpaca_prompt(record)
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        full = list(tokenizer(prompt + output)["input_ids"]) + ([eos] if eos is not None else [])
        if len(full) > max_positions or len(full) <= len(prompt_ids):
            continue
        out.append({"record": n, "ids": full, "start": len(prompt_ids), "prompt_ids": prompt_ids})
    return out


def alpaca_perplexity(engine: Engine, examples: Sequence[dict[str, Any]], batch_size: int,
                      on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    own, _ = sequence_logprobs(engine, [e["ids"] for e in examples], batch_size, on_batch=on_batch)
    # own[k][t - 1] is log p(ids[t] | ids[:t]); response tokens are t >= start.
    nll = [float(-lp[e["start"] - 1:].sum()) for e, lp in zip(examples, own, strict=True)]
    tokens = sum(len(e["ids"]) - e["start"] for e in examples)
    return {"ppl": math.exp(sum(nll) / tokens), "tokens": tokens, "records": len(examples)}
