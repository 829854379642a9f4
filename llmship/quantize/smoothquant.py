"""SmoothQuant (mit-han-lab/smoothquant, `smooth_ln_fcs_llama_like`) on an exported ONNX decoder.

Per LLaMA decoder layer, the RMSNorm that feeds several linear layers (input_layernorm -> q/k/v,
post_attention_layernorm -> gate/up) gets its weight divided by s and the rows (input channels) of those linears'
weights multiplied by s, with

    s_j = clamp(a_j^alpha / w_j^(1 - alpha), min=1e-5)
    a_j = max over calibration tokens of |x_j| (the norm's output, i.e. the linears' input)
    w_j = max over the group's linears of max_i |W[j, i]|  (clamped at 1e-5)

so the float model computes the same function while activation outliers move into the weights. o_proj, down_proj
and lm_head are left as they are (the final norm -> lm_head is not a SmoothQuant group). Groups are found in the
graph, not by name: a norm scale (Mul by a 1-D initializer, or the scale of a [Skip]SimplifiedLayerNormalization)
whose output feeds only linear MatMuls (q/k/v and gate/up, or their packed forms), none of which writes the logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from llmship.quantize.feeds import probe_session
from llmship.quantize.graph import initializers, module_name

# SmoothQuant's library default (smooth_lm); its examples use 0.85 for Llama-2-7B/13B, 0.8 for Mistral-7B.
DEFAULT_ALPHA = 0.5
# Lower clamp of weight maxima and of the scales (smooth.py).
MIN_SCALE = 1e-5
# `alpha: auto`: each group's alpha is searched on this grid, as Intel Neural Compressor's SmoothQuant auto-tuning does
# per layer (alpha_min 0, alpha_max 1; INC steps by 0.1, a finer step costs little here).
ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))
# Calibration tokens per group kept to score the alphas (the maxima and ranges still see every token).
SEARCH_ROWS = 4096
FUSED_NORMS = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}


@dataclass
class SmoothGroup:
    activation: str               # tensor the linears read (the norm's output)
    norm_node: str
    norm_weight: str              # 1-D initializer scaled by 1/s
    linears: list[onnx.NodeProto]


def find_groups(model: onnx.ModelProto) -> list[SmoothGroup]:
    inits = initializers(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    groups = []
    for node in model.graph.node:
        weight = _norm_weight(node, inits)
        if weight is None:
            continue
        out = node.output[0]
        users = consumers.get(out, [])
        hidden = inits[weight].dims[0]
        linear = [u for u in users if u.op_type == "MatMul" and u.input[0] == out and u.input[1] in inits
                  and len(inits[u.input[1]].dims) == 2 and inits[u.input[1]].dims[0] == hidden]
        head = any(u.output[0] in graph_outputs or module_name(u) == "lm_head" or "lm_head" in u.input[1] for u in linear)
        if linear and len(linear) == len(users) and out not in graph_outputs and not head:
            groups.append(SmoothGroup(out, node.name, weight, linear))
    return groups


def _norm_weight(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str | None:
    if node.op_type in FUSED_NORMS:
        idx = FUSED_NORMS[node.op_type]
        name = node.input[idx] if len(node.input) > idx else None
        return name if name in inits and len(inits[name].dims) == 1 else None
    if node.op_type == "Mul":
        for name in node.input:
            if name in inits and len(inits[name].dims) == 1 and inits[name].dims[0] > 1:
                return name
    return None


def activation_maxima(model: onnx.ModelProto, tensors: list[str], feeds: list[dict[str, np.ndarray]],
                      scratch: Path) -> dict[str, np.ndarray]:
    """Per-channel max over all tokens of |x| for each tensor (running max over the feeds)."""
    session = probe_session(model, tensors, scratch, exact=False)
    maxima: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(tensors, session.run(tensors, feed), strict=True):
            peak = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0).astype(np.float64)
            maxima[name] = peak if name not in maxima else np.maximum(maxima[name], peak)
    return maxima


@dataclass
class ActivationStats:
    """Per-channel |x| max, min and max over every calibration token, and a sample of token rows."""

    abs_max: np.ndarray
    low: np.ndarray
    high: np.ndarray
    rows: np.ndarray


def activation_statistics(model: onnx.ModelProto, tensors: list[str], feeds: list[dict[str, np.ndarray]],
                          scratch: Path) -> dict[str, ActivationStats]:
    session = probe_session(model, tensors, scratch, exact=False)
    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    rows: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
    for feed in feeds:
        for name, value in zip(tensors, session.run(tensors, feed), strict=True):
            flat = value.reshape(-1, value.shape[-1]).astype(np.float64)
            low[name] = flat.min(axis=0) if name not in low else np.minimum(low[name], flat.min(axis=0))
            high[name] = flat.max(axis=0) if name not in high else np.maximum(high[name], flat.max(axis=0))
            if sum(len(r) for r in rows[name]) < SEARCH_ROWS:
                rows[name].append(flat)
    return {name: ActivationStats(np.maximum(-low[name], high[name]), low[name], high[name],
                                  np.concatenate(rows[name])[:SEARCH_ROWS]) for name in tensors}


def search_alpha(stats: ActivationStats, weights: list[np.ndarray]) -> float:
    """The alpha of ALPHA_GRID whose smoothed, int8-rounded group (activations per tensor over the calibration
    range, asymmetric, as static QDQ calibrates them; weights per output channel, symmetric) reproduces the float
    outputs best: least sum over the group's linears of the relative squared error on the sampled tokens."""
    errors = {alpha: group_error(stats, weights, smoothing_scales(stats.abs_max, weights, alpha)) for alpha in ALPHA_GRID}
    return min(errors, key=errors.get)


def group_error(stats: ActivationStats, weights: list[np.ndarray], scales: np.ndarray) -> float:
    """Sum over the group's linears of |int8(x / s) @ int8(W * s) - x @ W|^2 / |x @ W|^2 on the sampled tokens."""
    x = stats.rows
    xq = fake_quant_activations(x / scales, (stats.low / scales).min(), (stats.high / scales).max())
    total = 0.0
    for w in weights:
        target = x @ w
        total += float(((xq @ fake_quant_weight(w * scales[:, None]) - target) ** 2).sum() / max((target ** 2).sum(), 1e-30))
    return total


def fake_quant_activations(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """Asymmetric per-tensor int8 over [min(low, 0), max(high, 0)] (ONNX Runtime's QDQ activations)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255 or 1.0
    zero = np.round(-128 - low / scale)
    return (np.clip(np.round(x / scale) + zero, -128, 127) - zero) * scale


def fake_quant_weight(w: np.ndarray) -> np.ndarray:
    """Symmetric int8 per output channel (columns of an ONNX [in, out] weight), as static QDQ's weights."""
    scale = np.abs(w).max(axis=0) / 127
    scale = np.where(scale == 0, 1.0, scale)
    return np.clip(np.round(w / scale), -127, 127) * scale


def smoothing_scales(act_max: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_j = clamp(a_j^alpha / w_j^(1-alpha), 1e-5); weights are ONNX [in, out] matrices."""
    w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).clip(min=MIN_SCALE)
    return (np.power(act_max, alpha) / np.power(w_max, 1 - alpha)).clip(min=MIN_SCALE)


def smooth_model(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], alpha: float | str,
                 scratch: Path) -> dict[str, Any]:
    """Fold SmoothQuant scales into the graph in place; returns the report (groups, scale ranges). `alpha` is one
    migration strength for every group, or "auto": searched per group (`search_alpha`)."""
    groups = find_groups(model)
    if not groups:
        return {"groups": 0, "note": "no RMSNorm -> linear groups found; nothing smoothed"}
    stats = activation_statistics(model, [g.activation for g in groups], feeds, scratch) if alpha == "auto" else None
    maxima = ({name: st.abs_max for name, st in stats.items()} if stats is not None
              else activation_maxima(model, [g.activation for g in groups], feeds, scratch))
    inits = initializers(model)
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    rows = []
    for group in groups:
        weights = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float64) for n in group.linears]
        chosen = search_alpha(stats[group.activation], weights) if stats is not None else alpha
        scales = smoothing_scales(maxima[group.activation], weights, chosen)
        norm = numpy_helper.to_array(inits[group.norm_weight]).astype(np.float64)
        _replace(model, inits, group.norm_weight, (norm / scales).astype(np.float32), uses, group.norm_node)
        for node, weight in zip(group.linears, weights, strict=True):
            _replace(model, inits, node.input[1], (weight * scales[:, None]).astype(np.float32), uses, node.name)
        rows.append({
            "norm": group.norm_weight,
            "linears": [module_name(n) or n.name for n in group.linears],
            "alpha": chosen,
            "act_max": float(maxima[group.activation].max()),
            "scale_min": float(scales.min()),
            "scale_max": float(scales.max()),
        })
    return {"groups": len(rows), "alpha": alpha, "samples": len(feeds), "smoothed": rows}


def _replace(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto], name: str, value: np.ndarray,
             uses: dict[str, int], node_name: str) -> None:
    """Overwrite an initializer, or give this node its own copy when another node shares the original."""
    if uses.get(name, 0) <= 1:
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
        return
    new_name = f"{name}_smoothed_{node_name}"
    model.graph.initializer.append(numpy_helper.from_array(value, new_name))
    for node in model.graph.node:
        if node.name == node_name:
            node.input[:] = [new_name if i == name else i for i in node.input]
    uses[name] -= 1
