"""GPTQ (IST-DASLab/gptq, `GPTQ.fasterquant` + `quant.Quantizer`) for ONNX MatMul weights, and MatMulNBits packing.

Written out here because onnxruntime's numpy port (`neural_compressor.weight_only.gptq`) propagates the
quantization error along the wrong axis of its upper Cholesky factor (a column below the diagonal, which is zero),
so it returns plain round-to-nearest; and its MatMulNBits packer breaks on an odd number of blocks along K.

Conventions kept from upstream: blocks of 128 columns (`blocksize`), `percdamp` 0.01 of the mean Hessian diagonal,
dead inputs (zero Hessian diagonal) zeroed, per-group scale/zero found on the weights as updated before the current
block, asymmetric min/max grid with zero included; `actorder` uses static groups (`static_groups=True`) so each
group still covers contiguous input rows, as MatMulNBits needs.

Where the arithmetic runs (`gptq_weight(device=...)`): GPTQ runs in torch float32 on CUDA, as upstream does, when the
runtime provider is cuda and torch sees a GPU (`gptq_device`); a 7B model takes minutes there and hours on a few CPU
cores. On CPU the numpy float64 path is kept: it is what every recorded figure was made with. Both paths share the
grid (`find_params`, `quantize_column`) and the column loop; only the array setup, the permutation order, the
Cholesky factorisation and the copy-out differ.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from llmship.quantize.embedding import pack_low_first

BLOCKSIZE = 128  # GPTQ's column block of the lazy batch update
# Output channels per pass: a weight whose float64 copy is larger goes through in chunks of its output channels.
ROW_CHUNK_BYTES = 256 << 20
# A float64 Hessian larger than this is inverted by Cholesky factors (upstream's route) instead of numpy's inv.
LARGE_HESSIAN_BYTES = 256 << 20
PERCDAMP = 0.01  # GPTQ --percdamp default


def array_namespace(x: Any) -> Any:
    """numpy for an ndarray, torch for a tensor: the shared code calls only functions both spell the same way."""
    if isinstance(x, np.ndarray):
        return np
    import torch

    return torch


def find_params(x: Any, bits: int, symmetric: bool) -> tuple[Any, Any]:
    """quant.Quantizer.find_params (per output channel): scale and zero of each row of x [rows, cols]."""
    xp = array_namespace(x)
    maxq = (1 << bits) - 1
    # clip rather than minimum/maximum with 0: torch's take only tensors; numpy's clip calls the same ufuncs.
    xmin = xp.clip(xp.amin(x, 1), None, 0)
    xmax = xp.clip(xp.amax(x, 1), 0, None)
    if symmetric:
        xmax = xp.maximum(xp.abs(xmin), xmax)
        xmin = xp.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = xp.where(both_zero, -1, xmin)
    xmax = xp.where(both_zero, 1, xmax)
    scale = (xmax - xmin) / maxq
    zero = xp.full_like(scale, (maxq + 1) / 2) if symmetric else xp.round(-xmin / scale)
    return scale, zero


def quantize_column(w: Any, scale: Any, zero: Any, bits: int) -> Any:
    """Integer levels of one input channel (a column of the torch-layout weight)."""
    xp = array_namespace(w)
    return xp.clip(xp.round(w / scale) + zero, 0, (1 << bits) - 1)


def gptq_device(provider: str) -> str | None:
    """The torch device GPTQ runs on for a runtime provider: "cuda" when it is cuda and torch sees a GPU, else None
    (the numpy float64 path)."""
    if provider != "cuda":
        return None
    import torch

    return "cuda" if torch.cuda.is_available() else None


def gptq_weight(weight: np.ndarray, hessian: np.ndarray, *, bits: int = 4, group_size: int = 128, symmetric: bool = False,
                percdamp: float = PERCDAMP, actorder: bool = False, blocksize: int = BLOCKSIZE,
                device: str | None = None, consume_hessian: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of an ONNX weight [K, N] (MatMul B) given the input Hessian [K, K] (float64; with `consume_hessian` the
    numpy path works in it instead of a copy: at 7B's down_proj, 1 GB less).

    `device` None runs in numpy float64; a torch device string ("cpu", "cuda", "cuda:1") runs the same algorithm in
    torch float32 on that device, as upstream. Returns (levels [K, N] uint8, scales [k_blocks, N] float32,
    zeros [k_blocks, N] uint8); dequantized weight = (levels - zeros[k // group_size]) * scales[k // group_size].
    Raises ValueError when the damped Hessian is not positive definite in float32 (torch path).
    """
    H = working_hessian(hessian, device, consume_hessian)  # noqa: N806
    del hessian
    xp = array_namespace(H)
    cols = H.shape[0]
    groups = -(-cols // group_size)
    dead = xp.diag(H) == 0
    H[dead, dead] = 1
    order = list(range(cols))
    perm = None
    if actorder:
        perm = descending_order(xp.diag(H))
        H = H[perm][:, perm]  # noqa: N806
        order = perm.tolist()
    diagonal = np.arange(cols)
    H[diagonal, diagonal] += percdamp * xp.mean(xp.diag(H))
    owned = [H]
    del H  # upper_cholesky_of_inverse frees it before factorizing: two K x K arrays at a time, not three
    hinv = upper_cholesky_of_inverse(owned)
    # Output channels are independent given the Hessian: a large weight goes through in chunks of them, so its
    # float64 working copies stay small (a 7B lm_head: 32000 x 4096, 1 GB per copy).
    rows = weight.shape[1]
    step = max(1, ROW_CHUNK_BYTES // (8 * cols))
    levels, scales, zeros = [], [], []
    for first in range(0, rows, step):
        W = working_weight(weight[:, first:first + step], device)  # noqa: N806 - torch layout [out, in] as upstream
        W[:, dead] = 0
        static = [find_params(W[:, g * group_size:(g + 1) * group_size], bits, symmetric) for g in range(groups)] if actorder else None
        if perm is not None:
            W = W[:, perm]  # noqa: N806
        part = quantize_columns(W, hinv, order, static, bits=bits, group_size=group_size, symmetric=symmetric,
                                blocksize=blocksize)
        del W
        levels.append(to_numpy(part[0])[:, np.argsort(order)].astype(np.uint8))
        scales.append(to_numpy(part[1]).astype(np.float32))
        zeros.append(to_numpy(part[2]).astype(np.uint8))
    return np.concatenate(levels).T, np.concatenate(scales, axis=1), np.concatenate(zeros, axis=1)


def quantize_columns(W: Any, Hinv: Any, order: list[int], static: list[tuple[Any, Any]] | None, *, bits: int,  # noqa: N803
                     group_size: int, symmetric: bool, blocksize: int) -> tuple[Any, Any, Any]:
    """GPTQ.fasterquant's loop over the columns of W [out, in] (already in quantization order; `order` maps each to
    its input channel) with Hinv the upper Cholesky factor of the damped inverse Hessian. W is updated in place.

    Returns levels [out, in] in quantization order and scales, zeros [groups, out]; numpy or torch as W is.
    """
    xp = array_namespace(W)
    cols = W.shape[1]
    levels = xp.zeros_like(W)
    group_params = {}
    scale = zero = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = fresh_copy(W[:, i1:i2])  # noqa: N806 - a copy: find_params reads W as it was before this block
        Err1 = xp.zeros_like(W1)  # noqa: N806
        Hinv1 = Hinv[i1:i2, i1:i2]  # noqa: N806
        for i in range(i2 - i1):
            col = i1 + i
            g = order[col] // group_size
            if static is not None:
                scale, zero = static[g]
            elif col % group_size == 0:
                scale, zero = find_params(W[:, col:col + group_size], bits, symmetric)
            group_params[g] = scale, zero
            w = W1[:, i]
            q = quantize_column(w, scale, zero, bits)
            levels[:, col] = q
            err = (w - scale * (q - zero)) / Hinv1[i, i]
            W1[:, i:] -= xp.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    scales = xp.stack([group_params[g][0] for g in sorted(group_params)])
    zeros = xp.stack([group_params[g][1] for g in sorted(group_params)])
    return levels, scales, zeros


# The few steps numpy and torch spell differently.
def working_hessian(hessian: np.ndarray, device: str | None, consume: bool = False) -> Any:
    """The Hessian to work in: numpy float64 (with `consume`, the float64 array given, not a copy), or torch float32
    on `device` (upstream's float32 Hessian)."""
    if device is None:
        owned = consume and hessian.dtype == np.float64 and hessian.flags.c_contiguous
        return hessian if owned else np.array(hessian, dtype=np.float64)
    import torch

    return torch.tensor(hessian, dtype=torch.float32, device=device)


def working_weight(weight: np.ndarray, device: str | None) -> Any:
    """A fresh copy of an ONNX weight [K, N] in torch layout [N, K]: numpy float64, or torch float32 on `device`
    (upstream's W.float())."""
    if device is None:
        return np.array(weight.T, dtype=np.float64, order="C")
    import torch

    return torch.tensor(np.ascontiguousarray(weight.T), dtype=torch.float32, device=device)


def descending_order(values: Any) -> Any:
    """Indices sorting values from largest to smallest, ties in index order."""
    if isinstance(values, np.ndarray):
        return np.argsort(-values, kind="stable")
    import torch

    return torch.argsort(values, descending=True, stable=True)


def upper_cholesky_of_inverse(owned: list[Any]) -> Any:
    """Upper Cholesky factor of H^-1 (torch: cholesky -> cholesky_inverse -> cholesky(upper=True), as upstream).
    `owned` holds the only reference to H, which is dropped as soon as it is no longer needed."""
    H = owned.pop()  # noqa: N806
    if isinstance(H, np.ndarray) and H.nbytes <= LARGE_HESSIAN_BYTES:
        inverse = np.linalg.inv(H)
        del H
        return np.linalg.cholesky(inverse).T
    if isinstance(H, np.ndarray):
        # numpy's inv holds three K x K arrays at once (its copy of H, the identity it solves for, H): a 7B down_proj
        # would need 3 GB. Upstream's route in float64, each step freeing the one before: two at a time.
        import torch

        lower, info = torch.linalg.cholesky_ex(torch.from_numpy(H))
        del H
        if info.item() == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
        if info.item() != 0:
            raise ValueError(f"GPTQ: the damped Hessian is not positive definite (Cholesky fails at column "
                             f"{info.item() - 1}); raise percdamp")
        return upper.numpy()
    import torch

    lower, info = torch.linalg.cholesky_ex(H)
    if info.item() == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info.item() != 0:
        raise ValueError(f"GPTQ: the damped Hessian [{H.shape[0]}, {H.shape[0]}] is not positive definite in float32 "
                         f"(Cholesky fails at column {info.item() - 1}); raise percdamp")
    return upper


def to_numpy(x: Any) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.cpu().numpy()


def fresh_copy(x: Any) -> Any:
    return x.copy() if isinstance(x, np.ndarray) else x.clone()


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
