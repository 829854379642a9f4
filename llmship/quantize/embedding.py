"""Block-quantized token embeddings: Gather(table) -> com.microsoft GatherBlockQuantized (uint8 data, 4 or 8 bits).

On a small-vocabulary-heavy model (the embedded one; any 7B has 2 x 131M embedding/head weights) the tables are a
large share of the file, so the int8 and int4 size targets need them quantized. The rows are gathered first and
dequantized after, so the runtime keeps the table in its quantized form too.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from llmship.quantize.graph import embedding_nodes, excluded, initializers

MS_DOMAIN = "com.microsoft"


def quantize_blocks(table: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric blockwise quantization along the last axis: (q uint8 unpacked, scales, zero points)."""
    rows, cols = table.shape
    blocks = -(-cols // block_size)
    padded = np.zeros((rows, blocks * block_size), dtype=np.float32)
    padded[:, :cols] = table
    padded[:, cols:] = table[:, -1:] if cols % block_size else 0  # pad with a real value so min/max are unchanged
    view = padded.reshape(rows, blocks, block_size)
    qmax = (1 << bits) - 1
    lo = np.minimum(view.min(axis=-1), 0.0)
    hi = np.maximum(view.max(axis=-1), 0.0)
    scale = (hi - lo) / qmax
    safe = np.where(scale == 0, 1.0, scale)
    zero = np.clip(np.round(-lo / safe), 0, qmax)
    q = np.divide(view, safe[..., None])  # one temporary, shifted, rounded and clipped in place
    q += zero[..., None]
    np.round(q, out=q)
    np.clip(q, 0, qmax, out=q)
    return q.reshape(rows, -1)[:, :cols].astype(np.uint8), scale.astype(np.float32), zero.astype(np.uint8)


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, block_size: int) -> np.ndarray:
    rows, cols = q.shape
    idx = np.arange(cols) // block_size
    return (q.astype(np.float32) - zero[:, idx].astype(np.float32)) * scale[:, idx]


def pack_low_first(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack `bits`-wide values along the last axis into bytes, low-order bits first (ORT's layout)."""
    if bits == 8:
        return values.astype(np.uint8)
    per_byte = 8 // bits
    rows, cols = values.shape
    padded = np.zeros((rows, -(-cols // per_byte) * per_byte), dtype=np.uint8)
    padded[:, :cols] = values
    grouped = padded.reshape(rows, -1, per_byte)
    packed = np.zeros(grouped.shape[:2], dtype=np.uint8)
    for j in range(per_byte):
        packed |= (grouped[..., j] << (bits * j)).astype(np.uint8)
    return packed


# Rows of an embedding table quantized at a time: its blocks run along each row, so rows are independent, and the
# float temporaries of a whole 7B table (0.5 GB each) would take GBs.
TABLE_CHUNK_BYTES = 64 << 20


def quantize_table(table: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(packed levels, scales, packed zero points, max |error|) of a table, quantized in chunks of rows."""
    step = max(1, TABLE_CHUNK_BYTES // max(1, 4 * table.shape[1]))
    packed, scales, zeros, err = [], [], [], 0.0
    for start in range(0, table.shape[0], step):
        part = table[start:start + step]
        q, scale, zero = quantize_blocks(part, bits, block_size)
        err = max(err, float(np.abs(dequantize_blocks(q, scale, zero, block_size) - part).max()))
        packed.append(pack_low_first(q, bits))
        scales.append(scale)
        zeros.append(pack_low_first(zero, bits))
    return np.concatenate(packed), np.concatenate(scales), np.concatenate(zeros), err


def quantize_embeddings(model: onnx.ModelProto, bits: int, block_size: int, exclude: list[str]) -> list[dict]:
    """Replace every Gather over a float embedding table (not excluded) in place; returns report rows."""
    inits = initializers(model)
    rows = []
    replaced: dict[str, onnx.NodeProto] = {}
    for node in embedding_nodes(model):
        if excluded(node, exclude, inits):
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if axis != 0:
            continue
        table = np.asarray(numpy_helper.to_array(inits[node.input[0]]), dtype=np.float32)
        packed, scale, zeros, err = quantize_table(table, bits, block_size)
        base = f"{node.input[0]}_Q{bits}B{block_size}"
        shape = list(table.shape)
        del table
        new_inits = [
            helper.make_tensor(base, onnx.TensorProto.UINT8, [shape[0], -(-shape[1] * bits // 8)], packed.tobytes(), raw=True),
            numpy_helper.from_array(scale, base + "_scales"),
            helper.make_tensor(base + "_zero_points", onnx.TensorProto.UINT8,
                               [shape[0], -(-scale.shape[1] * bits // 8)], zeros.tobytes(), raw=True),
        ]
        model.graph.initializer.extend(new_inits)
        replaced[node.name] = helper.make_node(
            "GatherBlockQuantized", [base, node.input[1], base + "_scales", base + "_zero_points"], list(node.output),
            name=node.name + f"_Q{bits}", domain=MS_DOMAIN, bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1,
        )
        rows.append({"node": node.name, "weight": node.input[0], "op": "Gather", "as": f"GatherBlockQuantized(bits={bits})",
                     "shape": shape, "max_abs_error": err})
    if not replaced:
        return rows
    nodes = [replaced.get(n.name, n) for n in model.graph.node]
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    _drop_unused_initializers(model)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return rows


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(keep)
