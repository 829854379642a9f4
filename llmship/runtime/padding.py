"""Batch layouts: how token lists become padded arrays, and how a right-padded run maps back to the left-padded
layout the Engine interface speaks.

The Engine interface is left-padded (pad positions have attention_mask 0; positions from the mask, as Hugging Face
generation does). Two runtimes need the other side: a GroupQueryAttention graph reads each row's length from
position_ids (llmship.export.fusion.GQA_CONTRACT), and onnxruntime-genai masks pad ids found after the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

Padding = Literal["left", "right"]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists into (input_ids, attention_mask) int64 arrays."""
    return padded_batch(sequences, pad_id, "left")


def padded_batch(sequences: Sequence[Sequence[int]], pad_id: int, padding: Padding,
                 dtype: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) of token lists padded with `pad_id` on the given side."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=dtype)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        if len(seq):
            cols = slice(width - len(seq), width) if padding == "left" else slice(0, len(seq))
            ids[row, cols], mask[row, cols] = seq, 1
    return ids, mask


def positions_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Position ids of a left-padded batch: cumsum of the mask minus one, pads clamped to 0."""
    pos = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask > 0, pos, 0).astype(np.int64)


def left_padded_to_right(input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A left-padded batch (input_ids, attention_mask) repacked right-padded: (input_ids, position_ids, lengths), the
    layout a GroupQueryAttention graph needs: row b's n_b tokens first, positions 0..n_b-1, pads after (pad ids and
    positions 0). Feed attention_mask as it is (the GQA graph does not read it)."""
    mask = np.asarray(attention_mask) > 0
    lengths = mask.sum(axis=1).astype(np.int64)
    ids = np.zeros_like(input_ids)
    positions = np.zeros(input_ids.shape, dtype=np.int64)
    for row, n in enumerate(lengths):
        ids[row, :n] = input_ids[row][mask[row]]
        positions[row, :n] = np.arange(n)
    return ids, positions, lengths


def right_padded_to_left(values: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Per-token outputs (B, T, ...) of a right-padded run back in the caller's left-padded layout (pad positions get
    zeros), so `logits[:, -1]` is each row's last real token again."""
    mask = np.asarray(attention_mask) > 0
    out = np.zeros_like(values)
    for row in range(values.shape[0]):
        n = int(mask[row].sum())
        out[row][mask[row]] = values[row, :n]
    return out


def right_padded_mask(lengths: np.ndarray, width: int | None = None) -> np.ndarray:
    """Right-padded attention mask: row b's first lengths[b] positions are ones."""
    lengths = np.asarray(lengths, dtype=np.int64)
    width = int(lengths.max()) if width is None else width
    return (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
