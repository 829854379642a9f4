"""Token log-probabilities from any `Engine`, batched and left-padded, reduced batch by batch.

Sequences are sorted by length before batching (less padding) and the results put back in order;
pad positions never enter a loss, so a sequence scores the same alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from llmship.runtime.base import Engine, left_pad

# Upper bound on batch x width per forward pass, so long prompts do not build (B, T, V) logits of gigabytes.
MAX_BATCH_TOKENS = 16384


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def logsumexp(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp, accumulated in float64 without a float64 copy of (T, V) logits."""
    top = logits.max(axis=-1, keepdims=True)
    return np.log(np.exp(logits - top).sum(axis=-1, dtype=np.float64)) + top[..., 0].astype(np.float64)


def batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), capped by MAX_BATCH_TOKENS."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) >= batch_size or (len(current) + 1) * width > MAX_BATCH_TOKENS):
            out.append(current)
            current = []
        current.append(i)
    if current:
        out.append(current)
    return out


def batch_blocks(lengths: Sequence[int], batch_size: int, per_block: int) -> dict[str, list[int]]:
    """Runs of `per_block` consecutive batches of `batches` (cluster units), 'batches <first>-<last>' -> their
    indices in batch order. Batching a block's sequences again, in that order, forms the same batches: the block is
    a run of the length order (a stable sort keeps it), and the grouping starts afresh at a batch boundary."""
    groups = batches(lengths, batch_size)
    return {f"batches {first}-{min(first + per_block, len(groups)) - 1}":
            [i for group in groups[first:first + per_block] for i in group]
            for first in range(0, len(groups), per_block)}


def for_each_logits(engine: Engine, sequences: Sequence[Sequence[int]], batch_size: int,
                    visit: Callable[[int, np.ndarray], None], on_batch: Callable[[int], None] | None = None) -> None:
    """Call visit(index, logits (len, V) float32) for every sequence, one batched prefill at a time."""
    for group in batches([len(s) for s in sequences], batch_size):
        chunk = [sequences[i] for i in group]
        ids, mask = left_pad(chunk, engine.pad_token_id)
        logits, _ = engine.prefill(ids, mask)
        width = ids.shape[1]
        for row, i in enumerate(group):
            visit(i, logits[row, width - len(chunk[row]):])
        if on_batch is not None:
            on_batch(len(group))


def sequence_logprobs(engine: Engine, sequences: Sequence[Sequence[int]], batch_size: int,
                      tail_targets: Sequence[Sequence[int]] | None = None,
                      on_batch: Callable[[int], None] | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """log p(x_t | x_<t) for t = 1..n-1 of each sequence (float64, length n-1) and, when `tail_targets`
    is given, log p(y | whole sequence) of each candidate y after the last position (shared-prefix scoring)."""
    own: list[np.ndarray] = [np.empty(0)] * len(sequences)
    tail: list[np.ndarray] = [np.empty(0)] * len(sequences)

    def visit(i: int, logits: np.ndarray) -> None:
        seq = np.asarray(sequences[i], dtype=np.int64)
        lse = logsumexp(logits)
        own[i] = logits[np.arange(len(seq) - 1), seq[1:]].astype(np.float64) - lse[:-1]
        if tail_targets is not None:
            tail[i] = logits[-1, np.asarray(tail_targets[i], dtype=np.int64)].astype(np.float64) - lse[-1]

    for_each_logits(engine, sequences, batch_size, visit, on_batch)
    return own, tail
