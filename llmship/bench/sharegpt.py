"""ShareGPT requests sampled the way vLLM's serving benchmark samples them, plus one llmship rule.

vLLM (`vllm/benchmarks/datasets/sharegpt.py` ShareGPTDataset, `datasets/utils.py` is_valid_sequence,
`abstractions.py` maybe_oversample_requests):
1. keep entries with at least two turns; `random.seed(seed)`; `random.shuffle`;
2. walk the shuffled list until `num_prompts` are kept: prompt = turn 0, completion = turn 1,
   lengths = `len(tokenizer(text).input_ids)` (BOS included), output length = completion length or the fixed
   `output_len`; drop when prompt < 4, output < 4 (not checked with a fixed `output_len`), prompt > 1024 or
   prompt + output > 2048;
3. too few kept: reseed with the same seed and top up with `random.choice` of the kept ones (oversampling).

llmship adds: turn 0 must come from a human (a conversation that opens with a gpt or system turn has no user
prompt). The rule is checked during the walk, so the shuffled order is exactly vLLM's and the kept requests are
vLLM's minus those conversations. A request failing several rules is counted under the first that fails, in the
order: not human first, prompt too short, output too short, prompt too long, total too long.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmship.errors import UserError

# vLLM's is_valid_sequence defaults (benchmark_serving.py's original sample_sharegpt_requests).
VLLM_MIN_LEN = 4
VLLM_MAX_PROMPT_LEN = 1024
VLLM_MAX_TOTAL_LEN = 2048
HUMAN_ROLES = ("human", "user")
DROP_RULES = ("fewer_than_2_turns", "not_human_first", "prompt_too_short", "output_too_short", "prompt_too_long",
              "total_too_long")


@dataclass
class Request:
    """One benchmark request: the prompt's token ids (BOS included) and the number of tokens to generate."""

    index: int
    conversation_id: str
    prompt_ids: list[int]
    output_len: int
    oversampled: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclass
class SamplingReport:
    """How the requests were chosen: counts per rule and the limits in force."""

    read: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_RULES, 0))
    examined: int = 0
    kept: int = 0
    oversampled: int = 0
    used: int = 0
    limits: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Limits:
    min_len: int = VLLM_MIN_LEN
    max_prompt_len: int = VLLM_MAX_PROMPT_LEN
    max_total_len: int = VLLM_MAX_TOTAL_LEN

    @classmethod
    def clipped(cls, min_len: int, max_prompt_len: int, max_total_len: int, max_positions: int | None) -> Limits:
        """The configured limits, clipped so that prompt + output fits the model's position table."""
        if max_positions is not None:
            max_total_len = min(max_total_len, max_positions)
            max_prompt_len = min(max_prompt_len, max_total_len - 1)
        return cls(min_len=min_len, max_prompt_len=max_prompt_len, max_total_len=max_total_len)


def load_conversations(path: str | Path) -> list[dict[str, Any]]:
    """ShareGPT V3 entries from a local file/folder, a hub dataset id or '@embedded' (the shared reader)."""
    from llmship.data.sources import read_sharegpt

    return read_sharegpt(path)


def token_count(tokenizer: Any, text: str) -> list[int]:
    # vLLM: tokenizer(prompt).input_ids, special tokens (LLaMA's BOS) included.
    return list(tokenizer(text).input_ids)


def drop_rule(entry: dict[str, Any], prompt_len: int | None, output_len: int | None, limits: Limits,
              fixed_output: bool) -> str | None:
    """The first rule `entry` breaks (None: keep). Lengths may be None for the human-first check alone."""
    if str(entry["conversations"][0].get("from", "")).lower() not in HUMAN_ROLES:
        return "not_human_first"
    if prompt_len is None or output_len is None:
        return None
    if prompt_len < limits.min_len:
        return "prompt_too_short"
    if not fixed_output and output_len < limits.min_len:
        return "output_too_short"
    if prompt_len > limits.max_prompt_len:
        return "prompt_too_long"
    if prompt_len + output_len > limits.max_total_len:
        return "total_too_long"
    return None


def sample_requests(entries: list[dict[str, Any]], tokenizer: Any, num_prompts: int, *, seed: int = 0,
                    output_len: int | None = None, limits: Limits | None = None,
                    oversample: bool = True) -> tuple[list[Request], SamplingReport]:
    """Sample `num_prompts` requests from ShareGPT entries as vLLM does (see module docstring)."""
    limits = limits or Limits()
    report = SamplingReport(read=len(entries), limits=asdict(limits) | {"output_len": output_len, "seed": seed})
    candidates = [e for e in entries if len(e.get("conversations", [])) >= 2]
    report.dropped["fewer_than_2_turns"] = len(entries) - len(candidates)
    rng = random.Random(seed)  # same generator and call sequence as vLLM's module-level random.seed + random.shuffle
    rng.shuffle(candidates)
    kept: list[Request] = []
    for entry in candidates:
        if len(kept) >= num_prompts:
            break
        report.examined += 1
        if drop_rule(entry, None, None, limits, output_len is not None):
            report.dropped["not_human_first"] += 1
            continue
        prompt_ids = token_count(tokenizer, entry["conversations"][0]["value"])
        new_output_len = len(token_count(tokenizer, entry["conversations"][1]["value"])) if output_len is None else output_len
        rule = drop_rule(entry, len(prompt_ids), new_output_len, limits, output_len is not None)
        if rule:
            report.dropped[rule] += 1
            continue
        kept.append(Request(len(kept), str(entry.get("id", "")), prompt_ids, new_output_len))
    report.kept = len(kept)
    if not kept:
        raise UserError(f"no ShareGPT conversation passes the sampling rules (dropped: {_nonzero(report.dropped)})",
                        where="bench.dataset")
    requests = list(kept)
    if oversample and len(requests) < num_prompts:
        rng.seed(seed)  # vLLM reseeds before topping up
        for i in range(num_prompts - len(kept)):
            pick = rng.choice(kept)
            requests.append(Request(len(kept) + i, pick.conversation_id, pick.prompt_ids, pick.output_len, oversampled=True))
        report.oversampled = len(requests) - len(kept)
    report.used = len(requests)
    return requests, report


def _nonzero(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "none"
