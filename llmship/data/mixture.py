"""The calibration set: a seeded mixture of C4, C-Eval and alpaca samples, tokenized with the model's tokenizer.

- C4 (the train split: sources.read_c4) follows GPTQ's `get_c4` (IST-DASLab/gptq datautils.py): `random.seed(seed)`; per sample, draw documents with
  `randint(0, len - 1)` until one tokenizes (BOS included) to more than `seq_len` tokens, then take the window
  `ids[i:i + seq_len]` with `i = randint(0, n - seq_len - 1)`. (GPTQ accepts n == seq_len and then crashes in
  randint; llmship draws again instead.)
- C-Eval: one sample per dev question, rendered as an OpenCompass in-context example (the C-Eval question
  template followed by its answer), subjects in sorted order, rows in file order, then a seeded shuffle.
- alpaca: one sample per record of the calibration part (sources.alpaca_part: the records eval does not score), rendered with the Stanford Alpaca template (with or without input) followed by
  the response, seeded shuffle.
ceval/alpaca samples keep their own length, cut to `seq_len` tokens. Every source draws from its own
`random.Random(seed)`, so adding a source does not change another's samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmship.config import CalibrationConfig, CalibSource
from llmship.data import sources, templates
from llmship.errors import UserError

log = logging.getLogger("llmship")


@dataclass
class CalibrationSet:
    samples: list[list[int]]
    fingerprint: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids with the tokenizer's special tokens (a LLaMA BOS), as GPTQ and OpenCompass encode."""
    return list(tokenizer(text)["input_ids"])


def c4_windows(texts: list[str], tokenizer: Any, count: int, seq_len: int, seed: int, where: str) -> list[list[int]]:
    """GPTQ's random C4 windows (see the module doc); UserError when no document is long enough."""
    if not texts:
        raise UserError("no C4 documents (empty after reading)", where=where)
    rng = random.Random(seed)
    cache: dict[int, list[int]] = {}
    windows = []
    for _ in range(count):
        while True:
            doc = rng.randint(0, len(texts) - 1)
            if doc not in cache:
                cache[doc] = encode(tokenizer, texts[doc])
            ids = cache[doc]
            if len(ids) > seq_len:
                break
            if len(cache) == len(texts) and all(len(v) <= seq_len for v in cache.values()):
                raise UserError(f"no C4 document is longer than seq_len={seq_len} tokens "
                                f"(longest: {max(len(v) for v in cache.values())})", where=where)
        start = rng.randint(0, len(ids) - seq_len - 1)
        windows.append(ids[start:start + seq_len])
    return windows


def shuffled_texts(texts: list[str], tokenizer: Any, count: int, seq_len: int, seed: int) -> list[list[int]]:
    """The first `count` texts after a seeded shuffle, each tokenized and cut to `seq_len` tokens."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [encode(tokenizer, texts[i])[:seq_len] for i in order[:count]]


def ceval_texts(path: str) -> list[str]:
    data = sources.read_ceval(path)
    texts = []
    for subject in sorted(data.subjects):
        info = data.subjects[subject]
        for row in info.dev:
            texts.append(templates.ceval_example(row, info.name_zh))
    return texts


def alpaca_texts(path: str) -> list[str]:
    records = sources.alpaca_part(sources.read_alpaca(path), "calibration")
    return [templates.alpaca_prompt(rec) + rec["output"] for rec in records]


def c4_texts(path: str) -> list[str]:
    return list(sources.read_c4(path, split="train"))


READERS: dict[str, Callable[[str], list[str]]] = {"c4": c4_texts, "ceval": ceval_texts, "alpaca": alpaca_texts}


def source_samples(source: CalibSource, tokenizer: Any, seq_len: int, seed: int, where: str) -> list[list[int]]:
    texts = READERS[source.kind](source.path)
    if source.kind == "c4":
        return c4_windows(texts, tokenizer, source.samples, seq_len, seed, where)
    samples = [s for s in shuffled_texts(texts, tokenizer, source.samples, seq_len, seed) if len(s) >= 2]
    if not samples:
        raise UserError(f"no usable {source.kind} samples (empty after reading)", where=where)
    return samples


def build_calibration_set(calib_cfg: CalibrationConfig, tokenizer: Any, max_positions: int) -> CalibrationSet:
    """Tokenized calibration samples of every source, in config order, with their fingerprint."""
    if calib_cfg.seq_len > max_positions:
        raise UserError(f"seq_len {calib_cfg.seq_len} exceeds the model's max positions ({max_positions})",
                        where="calibration.seq_len")
    samples: list[list[int]] = []
    counts: dict[str, int] = {}
    described = []
    short = []
    for i, source in enumerate(calib_cfg.sources):
        where = f"calibration.sources.{i} ({source.kind}: {source.path})"
        got = source_samples(source, tokenizer, calib_cfg.seq_len, calib_cfg.seed, where)
        if len(got) < source.samples:
            short.append(f"{source.kind} {source.path}: {len(got)} of {source.samples}")
        samples.extend(got)
        key = f"{source.kind}:{source.path}"
        counts[key] = counts.get(key, 0) + len(got)
        described.append({"kind": source.kind, "path": source.path, "asked": source.samples, "taken": len(got),
                          "tokens": sum(len(s) for s in got)})
    if short:
        message = "fewer calibration samples than asked: " + "; ".join(short)
        if not calib_cfg.allow_partial:
            raise UserError(message + " (set calibration.allow_partial: true to accept)", where="calibration.sources")
        log.warning("%s", message)
    fingerprint = {
        "sources": described,
        "seq_len": calib_cfg.seq_len,
        "seed": calib_cfg.seed,
        "samples": len(samples),
        "tokens": sum(len(s) for s in samples),
        "sha256": token_hash(samples),
    }
    return CalibrationSet(samples, fingerprint, counts)


def require_a_full_sample(calibration: CalibrationSet, calib_cfg: CalibrationConfig) -> CalibrationSet:
    """Refuse a set whose every sample is shorter than calibration.seq_len, for a scheme that packs the samples into
    rows of the longest one's length (Scheme.packs_calibration: gptq, awq, static W8A8): it would calibrate on short
    contexts only, not the seq_len the config asks for. A c4 source gives windows of exactly seq_len tokens. An empty
    set passes: each scheme says what it does without one."""
    longest = max((len(s) for s in calibration.samples), default=0)
    if calibration.samples and longest < calib_cfg.seq_len:
        sources = ", ".join(f"{s.kind} {s.path}" for s in calib_cfg.sources) or "none"
        raise UserError(f"every calibration sample is shorter than calibration.seq_len={calib_cfg.seq_len} "
                        f"tokens (the longest has {longest}; sources: {sources}); add a c4 source (windows of "
                        "seq_len tokens) or lower seq_len", where="calibration.sources")
    return calibration


def token_hash(samples: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(samples, separators=(",", ":")).encode()).hexdigest()

