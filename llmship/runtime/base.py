"""The one interface every engine implements, so bench, eval and parity compare like with like.

Engines (built by `llmship.runtime.load_engine` from the registry `llmship.runtime.ENGINES`): `TorchEngine` (the
PyTorch baseline, HF model in its source dtype, KV cache), `OrtEngine` (an exported llmship folder under ONNX Runtime)
and `GenaiEngine` (the same folder under onnxruntime-genai). Token ids go in and out as numpy int64 arrays;
logits come out as float32 numpy arrays whatever the engine computes in.

Batches are left-padded (pad positions have attention_mask 0); position ids are derived from the
mask (cumsum - 1), as Hugging Face generation does, so a padded row gives the same logits as the
same row alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmship.runtime.padding import left_pad


@dataclass
class Cache:
    """KV cache of a batch, opaque to callers.

    `past` is engine-specific (torch tensors or numpy arrays per layer); `attention_mask` (B, L) covers
    every position seen so far, so the next position of row b is attention_mask[b].sum().
    """

    past: Any
    attention_mask: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


StepCallback = Callable[[int, np.ndarray], None]
"""Called by `generate` after each step with (step index, tokens of that step (B,)), for timing."""


class Engine(ABC):
    """Prefill, decode with cache, greedy generation and batched scoring over one model."""

    name: str
    vocab_size: int
    eos_token_id: int | None
    pad_token_id: int
    max_positions: int  # the model's trained length (max_position_embeddings): what prompts are truncated to
    # Positions the engine can run, past max_positions too (None: no limit). LLaMA's rotary embedding is a function
    # of the position, so PyTorch has none; a fused ONNX graph is bounded by its cos/sin table.
    position_limit: int | None = None
    steps_freely = True  # False: serves teacher-forced runs only (a layer-at-a-time engine), no free generation

    @abstractmethod
    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, Cache]:
        """Run the prompt (B, T) with an empty cache: logits (B, T, V) float32 and the cache."""

    @abstractmethod
    def decode(self, tokens: np.ndarray, cache: Cache) -> tuple[np.ndarray, Cache]:
        """Feed one token per row (B,): logits (B, V) float32 and the grown cache."""

    def prefill_for_generation(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int
                               ) -> tuple[np.ndarray, Cache]:
        """`prefill` when the number of tokens to come is known (engines may size an in-place cache by it)."""
        return self.prefill(input_ids, attention_mask)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int],
        *,
        ignore_eos: bool = False,
        on_step: StepCallback | None = None,
    ) -> list[list[int]]:
        """Greedy generation of a left-padded batch; each row stops at its own budget (or EOS)."""
        budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        self.check_positions(max((len(p) + max(b, 1) - 1 for p, b in zip(prompts, budgets, strict=True)), default=0))
        ids, mask = left_pad(prompts, self.pad_token_id)
        logits, cache = self.prefill_for_generation(ids, mask, max(budgets, default=0))
        step_logits = logits[:, -1, :]
        outputs: list[list[int]] = [[] for _ in prompts]
        done = np.array([b <= 0 for b in budgets])
        for step in range(max(budgets, default=0)):
            tokens = step_logits.argmax(axis=-1).astype(np.int64)
            for row, tok in enumerate(tokens):
                if not done[row]:
                    outputs[row].append(int(tok))
                    hit_eos = not ignore_eos and self.eos_token_id is not None and tok == self.eos_token_id
                    done[row] = hit_eos or len(outputs[row]) >= budgets[row]
            if on_step is not None:
                on_step(step, tokens)
            if done.all():
                break
            step_logits, cache = self.decode(tokens, cache)
        return outputs

    def check_positions(self, needed: int) -> None:
        """A clear error, before any work, when a run needs more positions than the engine has."""
        if self.position_limit is not None and needed > self.position_limit:
            from llmship.errors import UserError

            raise UserError(f"{needed} positions needed, the graph's rotary cos/sin table has {self.position_limit} "
                            "(an earlier llmship sized it at max positions: compile the graph again)",
                            where=str(getattr(self, "path", None) or self.name))

    def logits(self, sequences: Sequence[Sequence[int]], batch_size: int = 8) -> list[np.ndarray]:
        """Full-sequence logits, one (len, V) float32 array per sequence (batched, left-padded)."""
        out: list[np.ndarray] = []
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            ids, mask = left_pad(chunk, self.pad_token_id)
            logits, _ = self.prefill(ids, mask)
            width = ids.shape[1]
            out.extend(logits[row, width - len(seq) :] for row, seq in enumerate(chunk))
        return out

    def score(self, sequences: Sequence[Sequence[int]], batch_size: int = 8) -> list[np.ndarray]:
        """log p(token_t | tokens_<t) for t = 1..n-1 of each sequence, float64 arrays of length n-1."""
        scores = []
        for seq, logit in zip(sequences, self.logits(sequences, batch_size), strict=True):
            logp = log_softmax(logit[:-1].astype(np.float64))
            scores.append(logp[np.arange(len(seq) - 1), np.asarray(seq[1:], dtype=np.int64)])
        return scores

    def forced_runs(self, prompts: Sequence[Sequence[int]], fed: Sequence[Sequence[int]]
                    ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]]:
        """Teacher-forced runs (a parity check's): each prompt alone, prefilled and then fed the tokens of `fed` one
        at a time through its own cache, as (prefill logits (len, V), logits after each fed token (n, V)); and the
        prompts' logits in one left-padded batch, as `logits` gives them."""
        solo = []
        for prompt, tokens in zip(prompts, fed, strict=True):
            logits, cache = self.prefill(*left_pad([list(prompt)], self.pad_token_id))
            steps = []
            for token in tokens:
                step, cache = self.decode(np.array([token], dtype=np.int64), cache)
                steps.append(step[0])
            vocab = logits.shape[-1]
            solo.append((logits[0], np.stack(steps) if steps else np.zeros((0, vocab), np.float32)))
        return solo, self.logits(prompts, batch_size=max(len(prompts), 1))

    def info(self) -> dict[str, Any]:
        """Engine name, provider, threads, dtype, path: recorded in reports."""
        return {"engine": self.name}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions or models."""


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def special_ids(tokenizer: Any, generation_config: Any, config: Any) -> tuple[int | None, int]:
    """(eos, pad): pad = tokenizer's, else generation_config's, else eos, else 0 (OpenCompass convention)."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if isinstance(eos, list | tuple):
        eos = eos[0] if eos else None
    pad = tokenizer.pad_token_id if tokenizer is not None else None
    if pad is None:
        pad = getattr(generation_config, "pad_token_id", None)
    if pad is None:
        pad = eos if eos is not None else 0
    return eos, int(pad)
