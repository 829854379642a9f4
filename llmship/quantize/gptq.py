"""GPTQ (IST-DASLab/gptq, `GPTQ.fasterquant` + `quant.Quantizer`) for ONNX MatMul weights, and MatMulNBits packing.

Written out here because onnxruntime's numpy port (`neural_compressor.weight_only.gptq`) propagates the
quantization error along the wrong axis of its upper Cholesky factor (a column below the diagonal, which is zero),
so it returns plain round-to-nearest; and its MatMulNBits packer breaks on an odd number of blocks along K.

Conventions kept from upstream: blocks of 128 columns (`blocksize`), `percdamp` 0.01 of the mean Hessian diagonal,
dead inputs (zero Hessian diagonal) zeroed, per-group scale/zero found on the weights as updated before the current
block, asymmetric min/max grid with zero included; `actorder` uses static groups (`static_groups=True`) so each
group still covers contiguous input rows, as MatMulNBits needs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from llmship.quantize.embedding import pack_low_first

BLOCKSIZE = 128  # GPTQ's column block of the lazy batch update
PERCDAMP = 0.01  # GPTQ --percdamp default


def find_params(x: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """quant.Quantizer.find_params (per output channel): scale and zero of each row of x [rows, cols]."""
    maxq = (1 << bits) - 1
    xmin = np.minimum(x.min(axis=1), 0)
    xmax = np.maximum(x.max(axis=1), 0)
    if symmetric:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = np.where(both_zero, -1, xmin)
    xmax = np.where(both_zero, 1, xmax)
    scale = (xmax - xmin) / maxq
    zero = np.full_like(scale, (maxq + 1) / 2) if symmetric else np.round(-xmin / scale)
    return scale, zero


def quantize_column(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Integer levels of one input channel (a column of the torch-layout weight)."""
    return np.clip(np.round(w / scale) + zero, 0, (1 << bits) - 1)


def gptq_weight(weight: np.ndarray, hessian: np.ndarray, *, bits: int = 4, group_size: int = 128, symmetric: bool = False,
                percdamp: float = PERCDAMP, actorder: bool = False,
                blocksize: int = BLOCKSIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of an ONNX weight [K, N] (MatMul B) given the input Hessian [K, K].

    Returns (levels [K, N] uint8, scales [k_blocks, N], zeros [k_blocks, N] uint8); dequantized weight =
    (levels - zeros[k // group_size]) * scales[k // group_size].
    """
    W = weight.T.astype(np.float64).copy()  # noqa: N806 - torch layout [out, in] as upstream
    H = hessian.astype(np.float64).copy()  # noqa: N806
    rows, cols = W.shape
    groups = -(-cols // group_size)
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = [find_params(W[:, g * group_size:(g + 1) * group_size], bits, symmetric) for g in range(groups)] if actorder else None
    perm = np.argsort(-np.diag(H), kind="stable") if actorder else np.arange(cols)
    W = W[:, perm]  # noqa: N806
    H = H[perm][:, perm]  # noqa: N806
    H[np.diag_indices(cols)] += percdamp * np.mean(np.diag(H))
    # Upper Cholesky factor of H^-1 (torch: cholesky -> cholesky_inverse -> cholesky(upper=True)).
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # noqa: N806
    levels = np.zeros_like(W)
    scales = np.zeros((groups, rows))
    zeros = np.zeros((groups, rows))
    scale, zero = find_params(W[:, :group_size], bits, symmetric) if not actorder else (None, None)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].copy()  # noqa: N806
        Err1 = np.zeros_like(W1)  # noqa: N806
        Hinv1 = Hinv[i1:i2, i1:i2]  # noqa: N806
        for i in range(i2 - i1):
            col = i1 + i
            orig = perm[col]
            if actorder:
                scale, zero = static[orig // group_size]
            elif col % group_size == 0:
                scale, zero = find_params(W[:, col:col + group_size], bits, symmetric)
            g = orig // group_size
            scales[g], zeros[g] = scale, zero
            w = W1[:, i]
            q = quantize_column(w, scale, zero, bits)
            levels[:, col] = q
            err = (w - scale * (q - zero)) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inverse = np.argsort(perm)
    levels = levels[:, inverse]
    return levels.T.astype(np.uint8), scales.astype(np.float32), zeros.astype(np.uint8)


def dequantize(levels: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int) -> np.ndarray:
    group = np.arange(levels.shape[0]) // group_size
    return (levels.astype(np.float32) - zeros[group].astype(np.float32)) * scales[group]


def matmul_nbits_node(node: onnx.NodeProto, levels: np.ndarray, scales: np.ndarray, zeros: np.ndarray, *, bits: int,
                      block_size: int, accuracy_level: int) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A com.microsoft MatMulNBits replacing `node` (B = levels [K, N] with per-block scales/zeros [k_blocks, N])."""
    k, n = levels.shape
    k_blocks = -(-k // block_size)
    padded = np.zeros((k_blocks * block_size, n), dtype=np.uint8)
    padded[:k] = levels
    # B: [N, k_blocks, block_size * bits / 8], each block's values packed low bits first.
    per_column = padded.T.reshape(n, k_blocks * block_size)
    blob = pack_low_first(per_column, bits).reshape(n, k_blocks, block_size * bits // 8)
    zero_blob = pack_low_first(zeros.T.copy(), bits)  # [N, ceil(k_blocks * bits / 8)]
    base = f"{node.input[1]}_Q{bits}G{block_size}"
    inits = [
        helper.make_tensor(base, onnx.TensorProto.UINT8, list(blob.shape), blob.tobytes(), raw=True),
        numpy_helper.from_array(np.ascontiguousarray(scales.T).reshape(-1).astype(np.float32), base + "_scales"),
        helper.make_tensor(base + "_zero_points", onnx.TensorProto.UINT8, [zero_blob.size], zero_blob.tobytes(), raw=True),
    ]
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block_size}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    new = helper.make_node("MatMulNBits", [node.input[0], base, base + "_scales", base + "_zero_points"], list(node.output),
                           name=node.name + f"_Q{bits}", domain="com.microsoft", **attrs)
    return new, inits
