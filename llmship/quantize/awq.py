"""AWQ (Lin et al. 2023, activation-aware weight quantization) on an exported ONNX decoder, before int4 RTN.

Follows mit-han-lab/llm-awq `awq/quantize/auto_scale.py` (`auto_scale_block`, `_search_module_scale`) and
`awq/quantize/auto_clip.py` (`auto_clip_layer`), as AutoAWQ (casper-hansen/AutoAWQ `awq/quantize/quantizer.py`,
`_search_best_scale`, `_compute_best_clip`) repeats them:

* scale search, per group of linears reading one activation x: for alpha in {0, 1/20, ..., 19/20},
  s = mean_tokens(|x|)^alpha clamped at 1e-4 and normalized by sqrt(max(s) * min(s)); the group's weights W are
  fake-quantized as Q(diag(s) W) diag(s)^-1 (ONNX weights are [in, out]: rows scaled) and the alpha whose output
  is closest (mean squared error) to the float output wins.
* clip search (`auto_clip`), per linear except those that feed the q.k product: per output channel and block,
  the weight range is shrunk to (1 - i/20) of its max for i < 10 and the shrink with the smallest squared error of
  the block's partial products (x_block . w_block, on up to 512 tokens) is written into the float weights.

The scales are folded as SmoothQuant's are (llmship/quantize/smoothquant.py): into the RMSNorm before q/k/v and
before gate/up (weight / s), and for up -> down into up's output columns (/ s) with down's rows (* s), so the float
model is unchanged. The groups, as llm-awq's LlamaDecoderLayer branch:

* input_layernorm -> q/k/v (packed or not); error measured on the projections' outputs. llm-awq measures the
  attention module's output; the attention op between the projections and o_proj is not re-run here.
* post_attention_layernorm -> gate/up; error measured on the MLP output down(silu(x Wg) * x Wu) as llm-awq's
  `module2inspect=module.mlp` (on the projections' outputs when the graph packs gate/up).
* up -> down (found in the graph: down reads Mul(silu(gate), up) and up's output feeds only that Mul).
* v -> o is NOT scaled: llm-awq skips it when v_proj and o_proj differ in shape (GQA), and in the exported graph
  v reaches o_proj through the fused attention op.

All statistics come from the float model (llm-awq's `run_awq` also feeds each block the float block's inputs).
The lm_head is left to plain RTN: AWQ keeps it in float and searches nothing for it.
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
from llmship.quantize.smoothquant import _replace, find_groups

N_GRID = 20  # llm-awq `_search_module_scale`: n_grid = 20 ratios in [0, 1)
MIN_SCALE = 1e-4  # llm-awq: x_max.pow(ratio).clamp(min=1e-4)
CLIP_SHRINK = 0.5  # llm-awq `auto_clip_layer`: max_shrink=0.5 on the same 20-step grid
CLIP_TOKENS = 512  # llm-awq `auto_clip_layer`: n_sample_token=512
# Tokens kept per activation for the error of the scale search (llm-awq runs all 128 x 512 calibration tokens on a
# GPU; evenly spaced rows keep this numpy search bounded on CPU).
SEARCH_TOKENS = 4096
# llm-awq skips the linears whose outputs meet in the q.k product: clipping them is hard to do precisely.
NO_CLIP = ("q_proj", "k_proj", "qkv_proj")


@dataclass
class ScaleGroup:
    kind: str                       # "norm" (RMSNorm -> linears) or "linear" (up -> down)
    activation: str                 # tensor the scaled linears read
    linears: list[onnx.NodeProto]   # weights scaled by s (rows)
    norm_node: str | None = None
    norm_weight: str | None = None  # "norm": 1-D initializer divided by s
    previous: onnx.NodeProto | None = None  # "linear": the MatMul whose output columns are divided by s
    mlp: tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto] | None = None  # (gate, up, down) to inspect


def fake_quantize(weight: np.ndarray, bits: int, block: int, symmetric: bool) -> np.ndarray:
    """Blockwise round-to-nearest of an ONNX weight [K, N] along K, dequantized, on the grid of onnxruntime's
    MatMulNBits quantizer (MLAS `MlasQuantizeBlockwise`): asymmetric blocks span [min(w, 0), max(w, 0)]; symmetric
    ones put the signed value of largest magnitude on the lowest level (scale = v / -2^(bits-1))."""
    k, n = weight.shape
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), dtype=np.float64)
    padded[:k] = weight
    w = padded.reshape(blocks, block, n)
    maxq = (1 << bits) - 1
    if symmetric:
        peak = np.take_along_axis(w, np.abs(w).argmax(axis=1)[:, None, :], axis=1)[:, 0]
        scale = peak / -(1 << (bits - 1))
        zero = np.full_like(scale, 1 << (bits - 1))
    else:
        low, high = np.minimum(w.min(axis=1), 0), np.maximum(w.max(axis=1), 0)
        scale = (high - low) / maxq
        zero = np.round(-low / np.where(scale == 0, 1.0, scale))
    scale = np.where(scale == 0, 1.0, scale)
    levels = np.clip(np.round(w / scale[:, None]) + zero[:, None], 0, maxq)
    return ((levels - zero[:, None]) * scale[:, None]).reshape(blocks * block, n)[:k]


def find_scale_groups(model: onnx.ModelProto, skip: set[str]) -> list[ScaleGroup]:
    """The norm -> linears groups (SmoothQuant's) and the up -> down pairs; linears in `skip` (excluded from
    quantization) are never scaled, and a group that holds one is left out whole."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = initializers(model)
    groups = []
    for g in find_groups(model):
        if any(n.name in skip for n in g.linears):
            continue
        group = ScaleGroup("norm", g.activation, g.linears, norm_node=g.norm_node, norm_weight=g.norm_weight)
        group.mlp = _mlp_of(g.linears, producer, consumers, inits)
        groups.append(group)
    for node in model.graph.node:
        pair = _up_down(node, producer, consumers, inits)
        if pair and not {pair[0].name, node.name} & skip:
            groups.append(ScaleGroup("linear", node.input[0], [node], previous=pair[0]))
    return groups


def _is_linear(node: onnx.NodeProto | None, inits: dict[str, onnx.TensorProto]) -> bool:
    return node is not None and node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2


def _silu_input(name: str, producer: dict[str, onnx.NodeProto]) -> str | None:
    """x when `name` is x * Sigmoid(x) (how the exporter writes SiLU), else None."""
    mul = producer.get(name)
    if mul is None or mul.op_type != "Mul":
        return None
    for a, b in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        sig = producer.get(b)
        if sig is not None and sig.op_type == "Sigmoid" and sig.input[0] == a:
            return a
    return None


def _gated_product(mul: onnx.NodeProto, producer, inits) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """(gate, up) linears when `mul` computes silu(gate output) * up output."""
    if mul.op_type != "Mul":
        return None
    for a, b in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        gate_out = _silu_input(a, producer)
        gate, up = producer.get(gate_out) if gate_out else None, producer.get(b)
        if _is_linear(gate, inits) and _is_linear(up, inits):
            return gate, up
    return None


def _up_down(down: onnx.NodeProto, producer, consumers, inits) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """(up, down) when down reads silu(gate) * up and up's output feeds nothing else (so its columns can carry 1/s)."""
    if not _is_linear(down, inits) or down.input[0] not in producer:
        return None
    found = _gated_product(producer[down.input[0]], producer, inits)
    if not found:
        return None
    _, up = found
    if len(consumers.get(up.output[0], [])) != 1 or len(consumers.get(down.input[0], [])) != 1:
        return None
    if inits[up.input[1]].dims[1] != inits[down.input[1]].dims[0]:
        return None
    return up, down


def _mlp_of(linears, producer, consumers, inits) -> tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto] | None:
    """(gate, up, down) when the group is exactly an MLP's gate and up projections."""
    for node in linears:
        for user in consumers.get(node.output[0], []):
            for candidate in [user, *(consumers.get(user.output[0], []))]:
                found = _gated_product(candidate, producer, inits)
                downs = [d for d in consumers.get(candidate.output[0], []) if _is_linear(d, inits)]
                if found and {n.name for n in found} == {n.name for n in linears} and len(downs) == 1:
                    return found[0], found[1], downs[0]
    return None


class ActivationStats:
    """Per tensor: mean |x| per channel over every calibration token, and evenly spaced rows for the searches."""

    def __init__(self, model: onnx.ModelProto, tensors: list[str], feeds: list[dict[str, np.ndarray]], scratch: Path | None):
        session = probe_session(model, tensors, scratch, exact=False)
        sums: dict[str, np.ndarray] = {}
        rows: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
        count = 0
        stride = None
        for feed in feeds:
            for name, value in zip(tensors, session.run(tensors, feed), strict=True):
                x = value.reshape(-1, value.shape[-1])
                if stride is None:
                    stride = max(1, -(-x.shape[0] * len(feeds) // SEARCH_TOKENS))
                sums[name] = sums.get(name, 0) + np.abs(x).sum(axis=0, dtype=np.float64)
                rows[name].append(x[::stride].astype(np.float64))
            count += x.shape[0]
        self.mean_abs = {t: sums[t] / count for t in tensors}
        self.rows = {t: np.concatenate(rows[t]) for t in tensors}
        self.tokens = count


def search_scale(group: ScaleGroup, weights: dict[str, np.ndarray], stats: ActivationStats, *, bits: int, block: int,
                 symmetric: bool, grid: int = N_GRID) -> tuple[np.ndarray, float, list[float]]:
    """llm-awq `_search_module_scale`: (best scales, best alpha, the error of every alpha)."""
    x = stats.rows[group.activation]
    x_mean = stats.mean_abs[group.activation]
    names = [n.name for n in group.linears]

    def output(ws: dict[str, np.ndarray]) -> np.ndarray:
        if group.mlp is not None:
            gate, up, down = group.mlp
            g = x @ ws[gate.name]
            return (g / (1 + np.exp(-g)) * (x @ ws[up.name])) @ weights[down.name]
        return np.concatenate([x @ ws[n] for n in names], axis=1)

    reference = output({n: weights[n] for n in names})
    best, best_alpha, best_scales, history = np.inf, 0.0, np.ones_like(x_mean), []
    for step in range(grid):
        alpha = step / grid
        s = np.power(x_mean, alpha).clip(min=MIN_SCALE)
        s = s / np.sqrt(s.max() * s.min())
        fake = {n: fake_quantize(weights[n] * s[:, None], bits, block, symmetric) / s[:, None] for n in names}
        loss = float(np.mean((reference - output(fake)) ** 2))
        history.append(loss)
        if loss < best:
            best, best_alpha, best_scales = loss, alpha, s
    return best_scales, best_alpha, history


def search_clip(weight: np.ndarray, x: np.ndarray, *, bits: int, block: int, symmetric: bool,
                grid: int = N_GRID) -> np.ndarray:
    """llm-awq `auto_clip_layer`: the weight [K, N] with each (block, column) clipped to its best shrunk range."""
    k, n = weight.shape
    blocks = -(-k // block)
    rows = x[:: max(1, x.shape[0] // CLIP_TOKENS)]
    padded_w = np.zeros((blocks * block, n))
    padded_w[:k] = weight
    padded_x = np.zeros((rows.shape[0], blocks * block))
    padded_x[:, :k] = rows
    w = padded_w.reshape(blocks, block, n)
    xb = padded_x.reshape(-1, blocks, block)
    reference = np.einsum("tgb,gbn->tgn", xb, w)
    peak = np.abs(w).max(axis=1, keepdims=True)  # [blocks, 1, n]
    best_err = np.full((blocks, 1, n), np.inf)
    best_peak = peak.copy()
    for step in range(int(CLIP_SHRINK * grid)):
        limit = peak * (1 - step / grid)
        clipped = np.clip(w, -limit, limit)
        fake = fake_quantize(clipped.reshape(blocks * block, n), bits, block, symmetric).reshape(blocks, block, n)
        err = ((np.einsum("tgb,gbn->tgn", xb, fake) - reference) ** 2).mean(axis=0)[:, None, :]
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_peak = np.where(better, limit, best_peak)
    return np.clip(w, -best_peak, best_peak).reshape(blocks * block, n)[:k]


def awq_model(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], *, bits: int, block_size: int,
              symmetric: bool, skip: set[str], clip: list[onnx.NodeProto], scratch: Path | None,
              grid: int = N_GRID) -> dict[str, Any]:
    """Search and fold AWQ scales into the float model in place, then clip the ranges of the linears in `clip`
    (less those that feed the q.k product); returns the report. As llm-awq's `run_awq`: every scale is searched on
    the float weights, all are applied, then the clip ranges are searched on the scaled weights and inputs."""
    groups = find_scale_groups(model, skip)
    inits = initializers(model)
    clipped = [n for n in clip if not feeds_qk(n)]
    tensors = sorted({g.activation for g in groups} | {n.input[0] for n in clipped})
    if not tensors:
        return {"groups": 0, "note": "no RMSNorm -> linear or up -> down groups and nothing to clip"}
    stats = ActivationStats(model, tensors, feeds, scratch)
    nodes = {n.name: n for g in groups for n in [*g.linears, *(g.mlp or ()), *([g.previous] if g.previous else [])]}
    nodes.update({n.name: n for n in clipped})
    original = {name: numpy_helper.to_array(inits[n.input[1]]).astype(np.float64) for name, n in nodes.items()}
    searched = [(g, *search_scale(g, original, stats, bits=bits, block=block_size, symmetric=symmetric, grid=grid))
                for g in groups]
    weights = dict(original)
    inputs = {t: stats.rows[t] for t in tensors}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    rows = []
    for group, scales, alpha, history in searched:
        if group.kind == "norm":
            norm = numpy_helper.to_array(inits[group.norm_weight]).astype(np.float64)
            _replace(model, inits, group.norm_weight, (norm / scales).astype(np.float32), uses, group.norm_node)
        else:
            weights[group.previous.name] = weights[group.previous.name] / scales[None, :]
        for node in group.linears:
            weights[node.name] = weights[node.name] * scales[:, None]
        inputs[group.activation] = inputs[group.activation] / scales
        rows.append({
            "prev": group.norm_weight if group.kind == "norm" else (module_name(group.previous) or group.previous.name),
            "linears": [module_name(n) or n.name for n in group.linears],
            "alpha": alpha,
            "error": min(history),
            "error_alpha0": history[0],
            "inspects": "mlp output" if group.mlp else "linear outputs",
        })
    for node in clipped:
        weights[node.name] = search_clip(weights[node.name], inputs[node.input[0]], bits=bits, block=block_size,
                                         symmetric=symmetric, grid=grid)
    for name, node in nodes.items():
        if weights[name] is not original[name]:
            _replace(model, inits, node.input[1], weights[name].astype(np.float32), uses, node.name)
    return {"groups": len(rows), "grid": grid, "tokens": stats.tokens, "search_tokens": int(inputs[tensors[0]].shape[0]),
            "scaled": rows, "clipped": [module_name(n) or n.name for n in clipped]}


def feeds_qk(node: onnx.NodeProto) -> bool:
    names = (module_name(node) or "", node.name, node.input[1])
    return any(part in name for name in names for part in NO_CLIP)
