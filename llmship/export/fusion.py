"""Fused decoder graphs for ONNX Runtime from llmship's torch.onnx (dynamo) export.

The pass runs onnxscript's ORT fusions (`onnxscript.rewriter.ort_fusions`, the rules behind
`optimize_for_ort`) with what the dynamo export of LLaMA needs on top:

- sums of symbolic dims written in one order (the exporter writes 'sequence_length +
  past_sequence_length' on one value and the reverse on another; the attention rules compare dims
  as strings and would not match);
- a cos/sin-cache rule for the rotary embedding as the exporter writes it (`pos * inv_freq` as a Mul,
  not HF's batched MatMul), so rotary becomes ORT's `com.microsoft.RotaryEmbedding` with a cos/sin
  table of `rotary_table_rows(max_positions)` rows (room past the trained length, `ROTARY_TABLE_FACTOR`)
  instead of Cos/Sin computed on every step (positions beyond the table are an ORT error, never a
  silent wrong answer; llmship.runtime.layout.graph_position_limit reads the table size back for the runtime);
- a GroupQueryAttention rule for models without kv groups (LLaMA 1 / Llama 2 7B: HF skips repeat_kv);
- packing of the projections that read the same activation (q/k/v, gate/up) into one MatMul
  followed by a Split: one weight read and one kernel per group, still a plain MatMul with a
  constant weight, so dynamic int8, QDQ and MatMulNBits quantization apply to it unchanged; the
  packed node keeps the exporter's module scopes ('...self_attn.qkv_proj') for exclude patterns.

Attention forms: "mha" (default) gives MultiHeadAttention (com.microsoft) that keeps the 4D additive
mask built from `attention_mask`, so left-padded batches and the optimum I/O contract (input_ids,
attention_mask, position_ids, past_key_values.N.key|value -> logits, present.N.key|value) are
unchanged. "gqa" gives GroupQueryAttention with rotary inside and packed QKV (the fastest form, what
onnxruntime-genai's builder emits; in-place KV possible): that op ignores the mask and takes per-row
lengths from position_ids, so batches must be right-padded (`GQA_CONTRACT`; llmship.runtime.padding's
`left_padded_to_right`, `right_padded_to_left`); the report's "padding" says which layout the runtime must use. Norms fuse to
SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization in both.
"""

from __future__ import annotations

import ast
import collections
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llmship.errors import CheckFailed, UserError
from llmship.files import INLINE_WEIGHTS_LIMIT
from llmship.runtime.padding import Padding, padded_batch
from llmship.runtime.providers import CPU_ONLY

Attention = Literal["mha", "gqa", "none"]
# Which projections sharing an input to pack: q/k/v only (default: measured as fast as onnxruntime-genai's
# builder graph; packing gate/up as well added a Split and was ~4% slower at int4), all groups, or none.
Pack = Literal["qkv", "all", "none"]

# What a runtime must feed a graph whose attention was fused to GroupQueryAttention (ORT contrib op).
# Names and dtypes of inputs/outputs are unchanged; only the batch layout differs.
GQA_CONTRACT = (
    "right padding: row b's n_b prompt tokens sit at cache positions [0, n_b), pads after; position_ids "
    "0..n_b-1 for the prompt and n_b for the next token (GQA reads each row's length as max(position_ids) + 1 "
    "and ignores attention_mask, which is still fed); decode feeds present.* back as past_key_values.* and "
    "row b's new key/value lands at index n_b. With llmship's left-padded Engine interface only prefill "
    "changes: ids_r, positions_r, _ = left_padded_to_right(ids, mask); run (ids_r, mask, positions_r, empty "
    "past); logits = right_padded_to_left(logits, mask). Decode is unchanged (position = mask.sum() - 1 after appending the "
    "new column = n_b). Fed left-padded, padded rows get wrong logits (parity's batch check catches it). "
    "onnxruntime-genai drives it as is (past_present_share_buffer true or false)."
)

# Rows of the fused graph's cos/sin tables, as a multiple of max_position_embeddings. LLaMA's rotary embedding is a
# function of the position (HF computes it from position_ids, no table), so positions past the trained length are
# well defined; OpenCompass truncates a C-Eval prompt at max positions and generates past them (METHODS.md (a)),
# and llmship's GEN mode does the same. Twice the trained length leaves room for up to max_positions new tokens
# (OpenCompass's hf_llama2_7b.py: 1024 of 4096) and costs head_dim x 4 bytes per row (cos and sin, fp32): 1 MiB
# more on LLaMA-7B, 2 MiB on Llama-2-7B.
ROTARY_TABLE_FACTOR = 2


def rotary_table_rows(max_positions: int) -> int:
    """Rows of the cos/sin tables the fusion writes for a model with `max_positions` trained positions."""
    return ROTARY_TABLE_FACTOR * max_positions


def _cos_sin_cache_rule(table_rows: int):
    """RotaryEmbedding (onnxscript's intermediate form) fed by Cos/Sin of `pos * inv_freq` ->
    com.microsoft.RotaryEmbedding(x, position_ids, cos_cache, sin_cache), tables of `table_rows` positions."""
    import onnx_ir as ir
    from onnxscript.rewriter import pattern

    class CosSinCacheFromMul(pattern.RewriteRuleClassBase):
        def __init__(self):
            # cos/sin values are shared by every layer: keep the matched nodes, dead-code removal drops them.
            super().__init__("CosSinCacheFromMul", remove_nodes=False)
            self._tables: dict[int, tuple[Any, Any]] = {}

        def pattern(self, op, x, position_ids, axes, inv_freq, interleaved, num_heads):
            positions = op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT)
            freqs = op.Mul(positions, inv_freq)
            emb = op.Concat(freqs, freqs, axis=-1)
            cos = op.Unsqueeze(op.Cos(emb), [1])
            sin = op.Unsqueeze(op.Sin(emb), [1])
            return op.RotaryEmbedding(
                x, cos, sin, interleaved=interleaved, num_heads=num_heads, _domain="ai.onnxruntime._fusion"
            )

        def check(self, context, x, position_ids, axes, inv_freq, **_):
            result = pattern.MatchResult()
            if position_ids.shape is None or position_ids.shape.rank() != 2:
                return result.fail("position_ids is not 2D", position_ids)
            axes_value = axes.const_value
            if axes_value is None or axes_value.numpy().reshape(-1).tolist() not in ([-1], [2]):
                return result.fail("position_ids not unsqueezed on the last axis", axes)
            if inv_freq.const_value is None:
                return result.fail("inv_freq is not a constant", inv_freq)
            freq = inv_freq.const_value.numpy()
            if freq.ndim < 1 or int(np.prod(freq.shape[:-1])) != 1:
                return result.fail("inv_freq is not a vector", inv_freq)
            if x.shape is None or x.shape.rank() != 4 or not isinstance(x.shape[3], int) or x.shape[3] != 2 * freq.shape[-1]:
                return result.fail("rotary input is not (B, H, S, 2*len(inv_freq))", x)
            return result

        def rewrite(self, op, x, position_ids, inv_freq, interleaved, num_heads, **_):
            key = id(inv_freq)
            if key not in self._tables:
                freq = inv_freq.const_value.numpy().reshape(1, -1).astype(np.float32)
                angles = np.arange(table_rows, dtype=np.float32).reshape(-1, 1) * freq
                cos = op.initializer(ir.tensor(np.cos(angles).astype(np.float32)), name="rotary_cos_cache")
                sin = op.initializer(ir.tensor(np.sin(angles).astype(np.float32)), name="rotary_sin_cache")
                self._tables[key] = (cos, sin)
            cos, sin = self._tables[key]
            return op.RotaryEmbedding(
                x, position_ids, cos, sin, interleaved=interleaved, num_heads=num_heads, _domain="com.microsoft"
            )

    return pattern.RewriteRuleSet([CosSinCacheFromMul.rule()], commute=True)


def _gqa_without_repeat_kv_rule():
    """onnxscript's GroupQueryAttention rule for models with as many kv heads as heads (LLaMA 1, MHA):
    Hugging Face skips repeat_kv there, so the Unsqueeze/Expand/Reshape the stock rule expects is absent."""
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter.ort_fusions.gqa import GroupQueryAttention

    class GroupQueryAttentionNoRepeat(GroupQueryAttention):
        def pattern(self, op, query_BSD, key_BSDkv, value_BSDkv, past_key, past_value, position_ids, cos, sin, mask):
            query_BSHDh = op.Reshape(query_BSD, pattern.ANY_VALUE, _outputs=["query_BSHDh"])
            query_BHSDh = op.Transpose(query_BSHDh, perm=[0, 2, 1, 3])
            key_BSHkvDh = op.Reshape(key_BSDkv, pattern.ANY_VALUE, _outputs=["key_BSHkvDh"])
            key_BHkvSDh = op.Transpose(key_BSHkvDh, perm=[0, 2, 1, 3])
            value_BSHkvDh = op.Reshape(value_BSDkv, pattern.ANY_VALUE, _outputs=["value_BSHkvDh"])
            value_BHkvSDh = op.Transpose(value_BSHkvDh, perm=[0, 2, 1, 3])
            query_rope = op.RotaryEmbedding(query_BHSDh, position_ids, cos, sin, _domain="com.microsoft",
                                            _outputs=["query_BHSDh_rope"])
            key_rope = op.RotaryEmbedding(key_BHkvSDh, position_ids, cos, sin, _domain="com.microsoft",
                                          _outputs=["key_BHkvSDh_rope"])
            key_seq = op.Concat(past_key, key_rope, axis=-2)
            value_seq = op.Concat(past_value, value_BHkvSDh, axis=-2)
            attention = op.SDPA(query_rope, key_seq, value_seq, mask, key_format="BHSd", _domain="ai.onnxruntime._fusion")
            attention_BSHDh = op.Transpose(attention, perm=[0, 2, 1, 3])
            attention_BSD = op.Reshape(attention_BSHDh, pattern.ANY_VALUE, _outputs=["attention_BSD"])
            return attention_BSD, key_seq, value_seq

    return pattern.RewriteRuleSet([GroupQueryAttentionNoRepeat.rule()])


def canonical_symbolic_dims(model) -> int:
    """Write sums of symbolic dims in one order ('sequence_length + past_sequence_length' and
    'past_sequence_length + sequence_length' are the same axis, but the fusion rules compare dims as
    strings; the exporter writes both forms depending on the dim names). Returns how many dims changed."""
    import onnx_ir as ir

    changed = 0
    values = list(model.graph.inputs) + [out for node in model.graph for out in node.outputs]
    for value in values:
        shape = value.shape
        if shape is None:
            continue
        dims = []
        for dim in shape:
            text = dim.value if isinstance(dim, ir.SymbolicDim) else None
            if isinstance(text, str) and " + " in text and not any(c in text for c in "*-/()"):
                canonical = " + ".join(sorted(t.strip() for t in text.split(" + ")))
                if canonical != text:
                    changed += 1
                    dim = ir.SymbolicDim(canonical)
            dims.append(dim)
        value.shape = ir.Shape(dims)
    return changed


def _count_ops(model) -> dict[str, int]:
    counts = collections.Counter()
    for node in model.graph:
        counts[f"{node.domain or 'ai.onnx'}::{node.op_type}"] += 1
    return dict(counts)


def pack_matmuls(model, min_group: int = 2) -> dict[str, int]:  # min_group 3: q/k/v only
    """Replace MatMuls that read the same activation with constant 2D weights by one MatMul on the
    weights concatenated along N, followed by a Split (dropped when GroupQueryAttention takes the packed
    QKV itself). Returns {"qkv": n, "gate_up": n, "other": n, "qkv_into_gqa": n}."""
    import onnx_ir as ir

    graph = model.graph
    groups: dict[int, list] = collections.defaultdict(list)
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        weight = node.inputs[1]
        if weight is None or weight.const_value is None or weight.shape is None or weight.shape.rank() != 2:
            continue
        groups[id(node.inputs[0])].append(node)
    counts = {"qkv": 0, "gate_up": 0, "other": 0, "qkv_into_gqa": 0}
    for nodes in groups.values():
        if len(nodes) < min_group:
            continue
        weights = [n.inputs[1].const_value.numpy() for n in nodes]
        if len({w.shape[0] for w in weights}) != 1 or len({w.dtype for w in weights}) != 1:
            continue
        kind = "qkv" if len(nodes) == 3 else "gate_up" if len(nodes) == 2 else "other"
        counts[kind] += 1
        first = nodes[0]
        packed_name, metadata = _packed_identity(nodes, kind, taken=graph.initializers)
        packed_weight = ir.Value(name=f"{packed_name}.weight", const_value=ir.tensor(np.concatenate(weights, axis=1)))
        packed_weight.shape = ir.Shape(packed_weight.const_value.shape)
        packed_weight.dtype = packed_weight.const_value.dtype
        graph.register_initializer(packed_weight)
        matmul = ir.node("MatMul", [first.inputs[0], packed_weight], name=packed_name, num_outputs=1, metadata_props=metadata)
        sizes = ir.Value(name=f"{packed_name}.split_sizes", const_value=ir.tensor(np.array([w.shape[1] for w in weights], np.int64)))
        sizes.shape = ir.Shape([len(weights)])
        sizes.dtype = ir.DataType.INT64
        graph.register_initializer(sizes)
        split = ir.node("Split", [matmul.outputs[0], sizes], attributes={"axis": -1}, name=f"{packed_name}.split", num_outputs=len(nodes))
        graph.insert_before(first, [matmul, split])
        for node, out in zip(nodes, split.outputs, strict=True):
            old = node.outputs[0]
            out.name, out.shape, out.dtype = old.name, old.shape, old.dtype
            old.name = None
            old.replace_all_uses_with(out, replace_graph_outputs=True)
            graph.remove(node, safe=True)
        if _feed_packed_qkv(split):
            graph.remove(split, safe=True)
            counts["qkv_into_gqa"] += 1
    return counts


def _feed_packed_qkv(split) -> bool:
    """When the three parts of a packed projection are exactly GroupQueryAttention's query, key and value,
    give GQA the packed tensor (its packed-QKV form: key and value left empty) and drop the Split."""
    if len(split.outputs) != 3:
        return False
    uses = [list(out.uses()) for out in split.outputs]
    if any(len(u) != 1 for u in uses):
        return False
    consumers = {id(u[0].node) for u in uses}
    node = uses[0][0].node
    if len(consumers) != 1 or node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
        return False
    if [u[0].idx for u in uses] != [0, 1, 2]:
        return False
    node.replace_input_with(0, split.inputs[0])
    node.replace_input_with(1, None)
    node.replace_input_with(2, None)
    return True


# Metadata the torch exporter writes on each node: the module path of the Hugging Face layer it came from.
# llmship.quantize reads it to find modules (lm_head, layers.N.mlp.down_proj) for exclude patterns.
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
PACKED_FROM_KEY = "llmship.packed_from"


def _scopes(node) -> list[str] | None:
    try:
        scopes = ast.literal_eval(node.metadata_props.get(NAME_SCOPES_KEY, ""))
    except (ValueError, SyntaxError):
        return None
    return scopes if isinstance(scopes, list) and len(scopes) >= 2 else None


def _packed_identity(nodes, kind: str, taken) -> tuple[str, dict[str, str]]:
    """Name and metadata of a packed MatMul. With the exporter's name scopes, q/k/v_proj of
    'model.model.layers.0.self_attn' become module 'model.model.layers.0.self_attn.qkv_proj' (gate/up ->
    'mlp.gate_up_proj'), so exclude patterns such as 'model.layers.0.*' or '*qkv_proj' find it; the
    original modules are listed under PACKED_FROM_KEY."""
    scopes = [_scopes(n) for n in nodes]
    metadata: dict[str, str] = {}
    if all(scopes):
        modules = [sc[-2] for sc in scopes]
        parent = os.path.commonprefix(modules)
        parent = parent[: parent.rfind(".")] if "." in parent else ""
        module = f"{parent}.{kind}_proj" if parent else f"{kind}_proj"
        metadata[NAME_SCOPES_KEY] = repr([*scopes[0][:-2], module, "linear"])
        metadata[PACKED_FROM_KEY] = repr(modules)
        base = module
    else:
        base = f"{nodes[0].name or 'MatMul'}_{kind}_packed"
    name, index = base, 1
    while f"{name}.weight" in taken:
        name, index = f"{base}_{index}", index + 1
    return name, metadata


def fuse_graph(model, *, max_positions: int, attention: Attention = "mha", pack: Pack = "qkv") -> dict[str, int]:
    """Run the fusions on an onnx_ir model in place; returns fusion counts (0 = pattern not found)."""
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import (
        _core,
        mha,
        rms_normalization,
        rotary_embedding,
        sdpa,
        sdpa_via_mha,
        skip_normalization,
    )
    from onnxscript.rewriter.ort_fusions import gqa as gqa_rules
    from onnxscript.rewriter.rules.common import _gemm_to_matmul_add

    counts: dict[str, int] = {}
    rewrite(model, [_gemm_to_matmul_add.gemm_to_matmul_add_rule])
    model = _core._pre_optimize(model)
    canonical_symbolic_dims(model)
    counts["rms_normalization"] = rms_normalization.fuse_rms_normalization(model)
    counts["skip_rms_normalization"] = skip_normalization.fuse_skip_rms_normalization(model)
    counts["rotary_pattern"] = rotary_embedding.fuse_rotary_embedding(model)
    counts["rotary_embedding"] = _cos_sin_cache_rule(rotary_table_rows(max_positions)).apply_to_model(model)
    common_passes.CommonSubexpressionEliminationPass()(model)
    if attention != "none":
        canonical_symbolic_dims(model)
        counts["sdpa"] = sdpa.fuse_sdpa(model, apply_shape_inference=True)
        canonical_symbolic_dims(model)
        if attention == "gqa":
            counts["group_query_attention"] = gqa_rules.fuse_gqa(model)
            counts["group_query_attention"] += _gqa_without_repeat_kv_rule().apply_to_model(model)
        counts["multi_head_attention"] = mha.fuse_mha1(model) + mha.fuse_mha2(model)
        counts["multi_head_attention"] += sdpa_via_mha.replace_sdpa_by_mha(model)
    # Inline fusion functions that no ORT op consumed (e.g. rotary when the cos/sin rule did not match).
    optimize(model)
    if pack != "none":
        packed = pack_matmuls(model, min_group=3 if pack == "qkv" else 2)
        counts["packed_qkv"] = packed["qkv"]
        counts["packed_gate_up"] = packed["gate_up"]
        counts["packed_other"] = packed["other"]
        counts["packed_qkv_into_gqa"] = packed["qkv_into_gqa"]
    rewrite(model, _core.ORT_PATTERN_REWRITE_RULES)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model)
    common_passes.RemoveInitializersFromInputsPass()(model)
    common_passes.ShapeInferencePass()(model)
    return counts


def fuse_decoder(
    model_path_in: Path,
    model_path_out: Path,
    num_heads: int,
    num_kv_heads: int,
    hidden_size: int,
    *,
    max_positions: int = 2048,
    attention: Attention = "mha",
    pack: Pack = "qkv",
) -> dict[str, Any]:
    """Write a fused copy of the exported decoder at `model_path_out` (the input is not touched).

    Returns {"fusions": {name: count}, "ops_before": {...}, "ops_after": {...}, "nodes_before": n,
    "nodes_after": n, "attention": "gqa" | "mha" | "unfused", "padding": "left" | "right" (the batch
    layout the runtime must feed), "io_contract": "unchanged" | GQA_CONTRACT}. Numerical equality is
    the caller's parity check (`compare_decoders` compares the two graphs under ORT directly).
    Peak memory: the packed q/k/v and gate/up weights are built in memory (about 60% of the weights).
    """
    import onnx_ir as ir

    model_path_in, model_path_out = Path(model_path_in), Path(model_path_out)
    if not model_path_in.is_file():
        raise UserError("exported decoder not found", where=str(model_path_in))
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise UserError(f"inconsistent heads: hidden {hidden_size}, heads {num_heads}, kv heads {num_kv_heads}", where="config.json")
    if pack not in ("qkv", "all", "none") or attention not in ("mha", "gqa", "none"):
        raise UserError(f"unknown fusion option pack={pack!r} / attention={attention!r}", where="export.optimize")
    if model_path_in.resolve() == model_path_out.resolve():
        raise UserError("fused output must differ from the input model", where=str(model_path_out))
    model = ir.load(str(model_path_in))
    before = _count_ops(model)
    counts = fuse_graph(model, max_positions=max_positions, attention=attention, pack=pack)
    after = _count_ops(model)
    _check_heads(model, num_heads, num_kv_heads)
    gqa = counts.get("group_query_attention", 0) > 0
    if gqa and (after.get("com.microsoft::MultiHeadAttention") or after.get("ai.onnx::Softmax")):
        # GQA layers need right padding, the others left padding: no runtime layout serves both
        raise CheckFailed("GroupQueryAttention fused in some layers only; use attention='mha' for this model")
    _save_atomic(model, model_path_out)
    return {
        "fusions": counts,
        "ops_before": before,
        "ops_after": after,
        "nodes_before": sum(before.values()),
        "nodes_after": sum(after.values()),
        "attention": "gqa" if gqa else ("mha" if counts.get("multi_head_attention") else "unfused"),
        "padding": "right" if gqa else "left",
        "io_contract": GQA_CONTRACT if gqa else "unchanged",
    }


def _check_heads(model, num_heads: int, num_kv_heads: int) -> None:
    """Fused attention nodes must carry the model's head counts (a mismatch would be silently wrong)."""
    for node in model.graph:
        if node.domain != "com.microsoft":
            continue
        if node.op_type in ("MultiHeadAttention", "GroupQueryAttention"):
            heads = node.attributes.get_int("num_heads", 0)
            if heads != num_heads:
                raise CheckFailed(f"fused {node.op_type} {node.name} has num_heads={heads}, model has {num_heads}")
        if node.op_type == "GroupQueryAttention":
            kv = node.attributes.get_int("kv_num_heads", 0)
            if kv != num_kv_heads:
                raise CheckFailed(f"fused GroupQueryAttention {node.name} has kv_num_heads={kv}, model has {num_kv_heads}")


def _save_atomic(model, target: Path) -> None:
    """Save beside the target under a temp name, then rename (model + external data when large)."""
    import onnx_ir as ir

    target.parent.mkdir(parents=True, exist_ok=True)
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    tmp = target.with_name(f".{target.name}.tmp")
    data_name = f"{target.name}.data"
    tmp_data = tmp.with_name(f".{data_name}.tmp")
    for stale in (tmp, tmp_data):
        stale.unlink(missing_ok=True)
    if size > INLINE_WEIGHTS_LIMIT:
        ir.save(model, str(tmp), external_data=tmp_data.name)
        os.replace(tmp_data, target.with_name(data_name))
        # The graph names its data file; point it at the final name before the rename.
        import onnx

        proto = onnx.load(str(tmp), load_external_data=False)
        for init in proto.graph.initializer:
            for entry in init.external_data:
                if entry.key == "location":
                    entry.value = data_name
        onnx.save(proto, str(tmp))
    else:
        # weights read from an input's external data must be written into this file, not referenced
        ir.external_data.load_to_model(model)
        ir.save(model, str(tmp))
        target.with_name(data_name).unlink(missing_ok=True)
    os.replace(tmp, target)


# Default tolerance of `compare_decoders`: the fp32 export's parity bound (issue 3: logits diff <= 1e-4).
FUSED_MAX_LOGITS_DIFF = 1e-4


def compare_decoders(
    reference: Path,
    candidate: Path,
    prompts: list[list[int]],
    *,
    pad_id: int = 0,
    decode_steps: int = 8,
    reference_padding: Padding = "left",
    candidate_padding: Padding = "left",
    max_logits_diff: float | None = FUSED_MAX_LOGITS_DIFF,
    threads: int = 1,
) -> dict[str, Any]:
    """Run two decoder graphs with optimum's I/O names under ORT on a batch of prompts (prefill, then
    greedy decode steps each fed with its own cache) and return the largest logits difference over
    real tokens and whether greedy tokens agree. Each graph gets its batch padded on the given side
    (a GroupQueryAttention graph needs "right"). Raises CheckFailed when `max_logits_diff` is given
    and exceeded or greedy tokens differ."""
    sessions = [_session(reference, threads), _session(candidate, threads)]
    paddings = [reference_padding, candidate_padding]
    (pre_a, dec_a, tok_a), (pre_b, dec_b, tok_b) = (
        _greedy(sess, prompts, pad_id, decode_steps, padding) for sess, padding in zip(sessions, paddings, strict=True)
    )
    figures = {
        "prefill_max_logits_diff": max(float(np.abs(a - b).max()) for a, b in zip(pre_a, pre_b, strict=True)),
        "decode_max_logits_diff": float(np.abs(dec_a - dec_b).max()),
        "greedy_tokens_equal": bool((tok_a == tok_b).all()),
    }
    if max_logits_diff is not None:
        worst = max(figures["prefill_max_logits_diff"], figures["decode_max_logits_diff"])
        if worst > max_logits_diff or not figures["greedy_tokens_equal"]:
            raise CheckFailed(
                f"{candidate.name} differs from {reference.name}: max logits diff {worst:.3g} (allowed {max_logits_diff:g}), "
                f"greedy tokens equal: {figures['greedy_tokens_equal']}"
            )
    return figures


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=CPU_ONLY)


def _greedy(sess, prompts, pad_id: int, steps: int, padding: Padding):
    """Prefill logits of the real tokens (one array per prompt), last-token logits of each step, tokens.

    Left padding: the new token goes at the end of every row (mask grows by a column of ones).
    Right padding: row b's cache holds its tokens at [0, n_b); the new token goes at index n_b, so the
    mask grows by one column and row b's ones cover [0, n_b + 1); position = n_b. This is the layout a
    GroupQueryAttention graph needs (it reads each row's length from position_ids, not the mask)."""
    names_in = {i.name for i in sess.get_inputs()}
    names_present = [o.name for o in sess.get_outputs()[1:]]

    def run(ids, mask, positions, past):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
        logits, *present = sess.run(None, {k: v for k, v in feeds.items() if k in names_in})
        return logits, {n.replace("present", "past_key_values", 1): v for n, v in zip(names_present, present, strict=True)}

    past = {}
    for item in sess.get_inputs():
        if item.name.startswith("past_key_values"):
            shape = [len(prompts) if axis == 0 else (0 if axis == 2 else dim) for axis, dim in enumerate(item.shape)]
            past[item.name] = np.zeros(shape, dtype=np.float32)
    ids, mask = padded_batch(prompts, pad_id, padding)
    positions = np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 0)
    logits, past = run(ids, mask, positions, past)
    lengths = np.array([len(p) for p in prompts])
    prefill = [logits[row][mask[row] > 0] for row in range(len(prompts))]
    last = logits[np.arange(len(prompts)), lengths - 1] if padding == "right" else logits[:, -1]
    step_logits, tokens = [last], []
    for _ in range(steps):
        token = step_logits[-1].argmax(-1).astype(np.int64)[:, None]
        tokens.append(token)
        mask = np.concatenate([mask, np.zeros_like(token)], axis=1)
        if padding == "right":
            mask[np.arange(len(prompts)), lengths] = 1
            positions = lengths[:, None].copy()
        else:
            mask[:, -1] = 1
            positions = mask.sum(axis=1, keepdims=True) - 1
        lengths = lengths + 1
        logits, past = run(token, mask, positions, past)
        step_logits.append(logits[:, -1])
    tokens_array = np.concatenate(tokens, axis=1) if tokens else np.zeros((len(prompts), 0), np.int64)
    return prefill, np.stack(step_logits, axis=1), tokens_array
