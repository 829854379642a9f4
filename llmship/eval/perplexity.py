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

from llmship.config import Config
from llmship.data import templates
from llmship.data.sources import alpaca_part, read_alpaca, read_c4
from llmship.data.templates import alpaca_prompt
from llmship.errors import UserError
from llmship.eval.lm import batch_blocks, batches, sequence_logprobs
from llmship.eval.tasks import DataInput, EvalTask, Progress, counter, short_hash
from llmship.runtime.base import Engine

C4_EVAL_SEED = 0  # GPTQ datautils.get_c4: the validation windows always use random.seed(0)
MAX_DRAWS_PER_WINDOW = 10_000  # a document pool with no long-enough text would otherwise loop forever
# A cluster unit of C4 perplexity: this many of the eval's batches (at batch 8 and 2,048 tokens, 4 batches are 64k
# tokens: seconds on a GPU, the same order as a C-Eval subject).
C4_BATCHES_PER_UNIT = 4
# A cluster unit of alpaca perplexity: this many of the eval's length-sorted batches (as C4's units; the responses
# are far shorter than C4's windows, so the default 32 records at batch 8 stay one unit).
ALPACA_BATCHES_PER_UNIT = 4


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
    return {"ppl": perplexity_of(window_nll), "window_nll": window_nll}


def perplexity_of(window_nll: Sequence[float]) -> float:
    """GPTQ's llama_eval: exp of the mean over windows of each window's mean NLL."""
    return math.exp(float(np.mean(window_nll)))


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
    return alpaca_result(examples, response_nll(engine, examples, batch_size, on_batch))


def response_nll(engine: Engine, examples: Sequence[dict[str, Any]], batch_size: int,
                 on_batch: Callable[[int], None] | None = None) -> list[float]:
    """Each example's response NLL (nats, summed over its response tokens)."""
    own, _ = sequence_logprobs(engine, [e["ids"] for e in examples], batch_size, on_batch=on_batch)
    # own[k][t - 1] is log p(ids[t] | ids[:t]); response tokens are t >= start.
    return [float(-lp[e["start"] - 1:].sum()) for e, lp in zip(examples, own, strict=True)]


def alpaca_result(examples: Sequence[dict[str, Any]], nll: Sequence[float]) -> dict[str, Any]:
    """Response perplexity from each example's NLL (summed in example order, whatever order they were scored in)."""
    tokens = sum(len(e["ids"]) - e["start"] for e in examples)
    return {"ppl": math.exp(sum(nll) / tokens), "tokens": tokens, "records": len(examples)}


def eval_texts(path: str) -> list[str]:
    """C4's validation split: calibration reads the train split, so a variant is never scored on its calibration text."""
    return read_c4(path, split="validation")


def eval_records(path: str) -> list[dict[str, Any]]:
    """The held-out part of alpaca-cleaned (the records calibration never draws)."""
    return alpaca_part(read_alpaca(path), "eval")


# --------------------------------------------------------------------------- the tasks
class C4Perplexity(EvalTask):
    """GPTQ-convention perplexity on C4's validation split (eval.perplexity)."""

    name = "c4"
    title = "C4 perplexity"
    section = "eval.perplexity"
    metric_prefixes = ("ppl/c4",)
    lower_is_better = ("ppl/",)

    @classmethod
    def enabled(cls, cfg: Config) -> bool:
        return cfg.eval.perplexity.enabled

    def settings(self) -> Any:
        pt = self.cfg.eval.perplexity
        return {"c4_path": pt.c4_path, "seq_len": pt.seq_len, "windows": pt.windows}

    def data_inputs(self) -> list[DataInput]:
        return [DataInput("eval.perplexity.c4_path", "c4", self.cfg.eval.perplexity.c4_path, ("validation",))]

    def length_problems(self, positions: int) -> list[str]:
        seq_len = self.cfg.eval.perplexity.seq_len
        if seq_len > positions:
            return [f"eval.perplexity.seq_len: seq_len {seq_len} exceeds the model's {positions} positions"]
        return []

    def prepare(self, tokenizer: Any, positions: int) -> list[list[int]]:
        pt = self.cfg.eval.perplexity
        for problem in self.length_problems(positions):
            raise UserError(problem)
        return c4_windows(eval_texts(pt.c4_path), tokenizer, pt.seq_len, pt.windows)

    def metric_names(self, prepared: Any) -> set[str]:
        return {"ppl/c4"}

    def score(self, engine: Engine, prepared: list[list[int]], tokenizer: Any, progress: Progress | None,
              ) -> tuple[dict[str, Any], dict[str, float], Any]:
        c4 = c4_perplexity(engine, prepared, self.cfg.eval.batch_size, counter(progress, "ppl c4", len(prepared)))
        return {"c4": c4}, {"ppl/c4": c4["ppl"]}, None

    def units(self, prepared: list[list[int]]) -> list[str]:
        """Blocks of windows, 'windows <first>-<last>', each a whole number of the batches `score` runs (the windows
        have one length, so the batches are consecutive runs of windows): a block's window NLLs are the whole run's."""
        per_batch = len(batches([len(w) for w in prepared], self.cfg.eval.batch_size)[0]) if prepared else 1
        size = per_batch * C4_BATCHES_PER_UNIT
        return [f"windows {first}-{min(first + size, len(prepared)) - 1}" for first in range(0, len(prepared), size)]

    def score_unit(self, engine: Engine, prepared: list[list[int]], unit: str, tokenizer: Any,
                   progress: Progress | None = None) -> tuple[dict[str, Any], dict[str, float], Any]:
        if unit not in self.units(prepared):
            raise KeyError(unit)
        first, last = (int(n) for n in unit.removeprefix("windows ").split("-"))
        block = prepared[first:last + 1]
        c4 = c4_perplexity(engine, block, self.cfg.eval.batch_size, counter(progress, "ppl c4", len(block)))
        return {"c4": {"window_nll": c4["window_nll"]}}, {}, None

    def merge_units(self, prepared: list[list[int]], parts: list[tuple[dict[str, Any], dict[str, float], Any]],
                    ) -> tuple[dict[str, Any], dict[str, float], Any]:
        window_nll = [nll for fields, _, _ in parts for nll in fields["c4"]["window_nll"]]
        c4 = {"ppl": perplexity_of(window_nll), "window_nll": window_nll}
        return {"c4": c4}, {"ppl/c4": c4["ppl"]}, None

    def summary_rows(self, prepared: list[list[int]]) -> list[dict[str, Any]]:
        pt = self.cfg.eval.perplexity
        return [{"dataset": "c4", "version": short_hash(["gptq-c4", pt.seq_len, pt.windows, C4_EVAL_SEED]),
                 "metric": "perplexity", "mode": "ppl", "name": "ppl/c4", "n": len(prepared)}]


class AlpacaPerplexity(EvalTask):
    """Perplexity of held-out alpaca-cleaned responses under the Stanford Alpaca prompt (eval.perplexity)."""

    name = "alpaca"
    title = "alpaca perplexity"
    section = "eval.perplexity"
    metric_prefixes = ("ppl/alpaca",)
    lower_is_better = ("ppl/",)

    @classmethod
    def enabled(cls, cfg: Config) -> bool:
        return cfg.eval.perplexity.enabled

    def settings(self) -> Any:
        pt = self.cfg.eval.perplexity
        return {"alpaca_path": pt.alpaca_path, "alpaca_samples": pt.alpaca_samples}

    def data_inputs(self) -> list[DataInput]:
        return [DataInput("eval.perplexity.alpaca_path", "alpaca", self.cfg.eval.perplexity.alpaca_path)]

    def prepare(self, tokenizer: Any, positions: int) -> list[dict[str, Any]]:
        pt = self.cfg.eval.perplexity
        examples = alpaca_examples(eval_records(pt.alpaca_path), tokenizer, pt.alpaca_samples, positions)
        if not examples:
            raise UserError(f"no alpaca record fits in {positions} positions", where="eval.perplexity.alpaca_path")
        return examples

    def metric_names(self, prepared: Any) -> set[str]:
        return {"ppl/alpaca"}

    def score(self, engine: Engine, prepared: list[dict[str, Any]], tokenizer: Any, progress: Progress | None,
              ) -> tuple[dict[str, Any], dict[str, float], Any]:
        alpaca = alpaca_perplexity(engine, prepared, self.cfg.eval.batch_size,
                                   counter(progress, "ppl alpaca", len(prepared)))
        return {"alpaca": alpaca}, {"ppl/alpaca": alpaca["ppl"]}, None

    def blocks(self, prepared: list[dict[str, Any]]) -> dict[str, list[int]]:
        """Unit name -> its examples (indices, in batch order): runs of whole batches of the length-sorted batching
        `score` runs, so every batch, and with it every example's NLL, is the whole run's."""
        return batch_blocks([len(e["ids"]) for e in prepared], self.cfg.eval.batch_size, ALPACA_BATCHES_PER_UNIT)

    def units(self, prepared: list[dict[str, Any]]) -> list[str]:
        return list(self.blocks(prepared))

    def score_unit(self, engine: Engine, prepared: list[dict[str, Any]], unit: str, tokenizer: Any,
                   progress: Progress | None = None) -> tuple[dict[str, Any], dict[str, float], Any]:
        block = [prepared[i] for i in self.blocks(prepared)[unit]]
        nll = response_nll(engine, block, self.cfg.eval.batch_size, counter(progress, "ppl alpaca", len(block)))
        return {"alpaca": {"nll": nll}}, {}, None

    def merge_units(self, prepared: list[dict[str, Any]], parts: list[tuple[dict[str, Any], dict[str, float], Any]],
                    ) -> tuple[dict[str, Any], dict[str, float], Any]:
        nll = [0.0] * len(prepared)
        for indices, (fields, _, _) in zip(self.blocks(prepared).values(), parts, strict=True):
            for i, value in zip(indices, fields["alpaca"]["nll"], strict=True):
                nll[i] = value
        alpaca = alpaca_result(prepared, nll)
        return {"alpaca": alpaca}, {"ppl/alpaca": alpaca["ppl"]}, None

    def summary_rows(self, prepared: list[dict[str, Any]]) -> list[dict[str, Any]]:
        version = short_hash([templates.ALPACA_PROMPT_INPUT, templates.ALPACA_PROMPT_NO_INPUT,
                              self.cfg.eval.perplexity.alpaca_samples])
        return [{"dataset": "alpaca-cleaned", "version": version, "metric": "response_perplexity", "mode": "ppl",
                 "name": "ppl/alpaca", "n": len(prepared)}]

    def notes(self, prepared: list[dict[str, Any]]) -> list[str]:
        if len(prepared) < self.cfg.eval.perplexity.alpaca_samples:
            return [f"alpaca perplexity over {len(prepared)} records (fewer fit than asked)"]
        return []
