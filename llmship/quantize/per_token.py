"""Dynamic int8 with one activation scale per token (per row of the MatMul input), as SmoothQuant, vLLM and
TensorRT-LLM call "per-token dynamic" W8A8, built from ONNX Runtime operators.

ONNX Runtime's own dynamic quantization (DynamicQuantizeLinear / DynamicQuantizeMatMul) takes one range per call, that
is per tensor over the whole prompt, so one outlier token coarsens every other token's grid. Here each token's row
gets its own symmetric scale:

    peak = max(max(|x|, axis=-1), 1e-12)                 (once per distinct input: q/k/v and gate/up share it)
    xq   = QuantizeLinear(x / peak, 1/127, 128)          (uint8: MLAS's fast u8s8 kernels want unsigned activations)
    y    = MatMulIntegerToFloat(xq, Wq, peak, w_scale / 127, 128)

The 1/127 of the activation scale is folded into the weight scales, which saves one elementwise op per activation:
at batch 1 these small ops, not the GEMMs, are what per-token costs over one range per call.

MatMulIntegerToFloat (com.microsoft) accepts an A scale of shape [..., M, 1], i.e. one per row, and folds the
int32 -> float rescale into the GEMM; MatMulInteger alone allows only a per-tensor A zero point.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx
from onnx import helper, numpy_helper

from llmship.quantize.graph import to_array

MS_DOMAIN = "com.microsoft"
UINT8_MIDPOINT = 128
INT8_MAX = 127
REDUCED_INT8_MAX = 63  # 7-bit weights (reduce_range), for u8s8 products on CPUs without VNNI
# Rows that are all zero (padding) would divide by zero; any positive floor keeps them at zero.
MIN_PEAK = 1e-12
# The first level's rounding error is at most half a step (1/254 of the peak); the second level spans it with 127 steps.
ERROR_RANGE = 2 * INT8_MAX


def quantize_weight(weight: np.ndarray, per_channel: bool, reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of a [K, N] weight: (int8 values, float scales of shape [N] or [1])."""
    top = REDUCED_INT8_MAX if reduce_range else INT8_MAX
    amax = np.abs(weight).max(axis=0) if per_channel else np.abs(weight).max(keepdims=True)
    scale = np.maximum(amax, MIN_PEAK).astype(np.float32) / top
    levels = np.divide(weight, scale)  # one temporary, rounded and clipped in place (a 7B MLP weight is 180 MB)
    np.rint(levels, out=levels)
    np.clip(levels, -top, top, out=levels)
    return levels.astype(np.int8), scale.astype(np.float32)


def rewrite_per_token(model: onnx.ModelProto, todo: list[onnx.NodeProto], per_channel: bool, reduce_range: bool,
                      two_level: Collection[str] = ()) -> int:
    """Replace each MatMul in `todo` (B a float initializer) by per-token dynamic int8; the MatMuls named in
    `two_level` read two-level activations (see `_two_level_activation`). Returns how many distinct activations are
    quantized."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    shared = _add_constants(graph)
    first_use: dict[str, int] = {}
    for node in todo:
        first_use.setdefault(node.input[0], min(i for i, n in enumerate(graph.node) if node.input[0] in n.input))
    quantized_input = {x: (f"{_clean(x)}_q8", f"{_clean(x)}_q8_peak") for x in first_use}
    deep = {node.input[0] for node in todo if node.name in two_level}
    weights: dict[str, tuple[str, str]] = {}
    replace = {}
    for node in todo:
        x = node.input[0]
        if node.name in two_level:
            replace[id(node)] = _two_level_matmul(node, inits, (f"{_clean(x)}_q8x2", f"{_clean(x)}_q8x2_peak"),
                                                  weights, per_channel, reduce_range, graph, opset)
        else:
            replace[id(node)] = [_matmul_node(node, inits, quantized_input[x], weights, per_channel, reduce_range, graph)]
    by_position: dict[int, list[str]] = {}
    for x, at in first_use.items():
        by_position.setdefault(at, []).append(x)
    nodes = []
    for i, node in enumerate(graph.node):
        for x in by_position.get(i, []):
            nodes.extend(_quantize_activation(x, *quantized_input[x], shared, opset))
            if x in deep:
                nodes.extend(_two_level_activation(x, *quantized_input[x], shared))
        nodes.extend(replace.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(first_use)


def _two_level_activation(x: str, xq: str, peak: str, c: dict[str, str]) -> list[onnx.NodeProto]:
    """A second int8 row per token for the rounding error of the first: x ~ peak * (q1 / 127 + q2 / (127 * 254)).
    Both rows go through one GEMM stacked along the token axis, so the weights are read once per step; the
    activations carry about 15 bits instead of 8."""
    base = _clean(x)
    return [
        helper.make_node("DequantizeLinear", [xq, c["step"], c["zero_point"]], [f"{base}_unit_q"],
                         name=f"{base}_PerTokenDequantize"),
        helper.make_node("Sub", [f"{base}_unit", f"{base}_unit_q"], [f"{base}_unit_err"], name=f"{base}_PerTokenError"),
        helper.make_node("QuantizeLinear", [f"{base}_unit_err", c["fine_step"], c["zero_point"]], [f"{base}_q8_err"],
                         name=f"{base}_PerTokenQuantizeError"),
        helper.make_node("Mul", [peak, c["fine_ratio"]], [f"{base}_q8_err_peak"], name=f"{base}_PerTokenErrorPeak"),
        helper.make_node("Concat", [xq, f"{base}_q8_err"], [f"{base}_q8x2"], axis=-2, name=f"{base}_PerTokenStack"),
        helper.make_node("Concat", [peak, f"{base}_q8_err_peak"], [f"{base}_q8x2_peak"], axis=-2,
                         name=f"{base}_PerTokenStackPeak"),
    ]


def _clean(name: str) -> str:
    return name.replace("/", "_").replace(":", "_")


def _add_constants(graph: onnx.GraphProto) -> dict[str, str]:
    values = {"step": np.array(1.0 / INT8_MAX, np.float32), "floor": np.array(MIN_PEAK, np.float32),
              "fine_step": np.array(1.0 / (INT8_MAX * ERROR_RANGE), np.float32),
              "fine_ratio": np.array(1.0 / ERROR_RANGE, np.float32),
              "zero_point": np.array(UINT8_MIDPOINT, np.uint8), "last_axis": np.array([-1], np.int64)}
    names = {}
    for key, value in values.items():
        names[key] = f"per_token_{key}"
        graph.initializer.append(numpy_helper.from_array(value, names[key]))
    return names


def _quantize_activation(x: str, xq: str, peak: str, c: dict[str, str], opset: int) -> list[onnx.NodeProto]:
    base = _clean(x)
    if opset >= 18:
        reduce = helper.make_node("ReduceMax", [f"{base}_abs", c["last_axis"]], [f"{base}_amax"], keepdims=1,
                                  name=f"{base}_PerTokenMax")
    else:
        reduce = helper.make_node("ReduceMax", [f"{base}_abs"], [f"{base}_amax"], axes=[-1], keepdims=1,
                                  name=f"{base}_PerTokenMax")
    return [
        helper.make_node("Abs", [x], [f"{base}_abs"], name=f"{base}_PerTokenAbs"),
        reduce,
        helper.make_node("Max", [f"{base}_amax", c["floor"]], [peak], name=f"{base}_PerTokenFloor"),
        helper.make_node("Div", [x, peak], [f"{base}_unit"], name=f"{base}_PerTokenDiv"),
        helper.make_node("QuantizeLinear", [f"{base}_unit", c["step"], c["zero_point"]], [xq],
                         name=f"{base}_PerTokenQuantize"),
    ]


def _matmul_node(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], quantized: tuple[str, str],
                 weights: dict[str, tuple[str, str]], per_channel: bool, reduce_range: bool,
                 graph: onnx.GraphProto) -> onnx.NodeProto:
    """The MatMulIntegerToFloat standing in for `node`; a weight shared by several MatMuls is stored once."""
    name = node.input[1]
    if name not in weights:
        q, scale = quantize_weight(to_array(inits[name]), per_channel, reduce_range)
        weights[name] = (f"{name}_int8", f"{name}_int8_scale")
        graph.initializer.append(numpy_helper.from_array(q, weights[name][0]))
        # the activation's 1/127 step rides on the weight scale (the A scale input is the row's peak)
        graph.initializer.append(numpy_helper.from_array((scale / INT8_MAX).astype(np.float32), weights[name][1]))
    xq, x_peak = quantized
    return helper.make_node("MatMulIntegerToFloat", [xq, weights[name][0], x_peak, weights[name][1],
                                                     "per_token_zero_point"], list(node.output), name=node.name,
                            domain=MS_DOMAIN)




def _two_level_matmul(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], stacked: tuple[str, str],
                      weights: dict[str, tuple[str, str]], per_channel: bool, reduce_range: bool,
                      graph: onnx.GraphProto, opset: int) -> list[onnx.NodeProto]:
    """One GEMM over the stacked rows, then the two halves summed."""
    out = node.output[0]
    gemm = _matmul_node(node, inits, stacked, weights, per_channel, reduce_range, graph)
    gemm.output[:] = [f"{_clean(out)}_x2"]
    split_attrs = {"num_outputs": 2} if opset >= 18 else {}
    return [
        gemm,
        helper.make_node("Split", [f"{_clean(out)}_x2"], [f"{_clean(out)}_hi", f"{_clean(out)}_lo"], axis=-2,
                         name=f"{node.name}_SplitLevels", **split_attrs),
        helper.make_node("Add", [f"{_clean(out)}_hi", f"{_clean(out)}_lo"], [out], name=f"{node.name}_SumLevels"),
    ]
