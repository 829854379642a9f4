"""Fused decoder graphs: same logits as the plain export, fused ops present, quantizers still apply."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest

from llmship.errors import CheckFailed, UserError
from llmship.export.fusion import compare_decoders, fuse_decoder
from llmship.runtime.layout import runtime_layout, runtime_padding
from llmship.runtime.padding import left_padded_to_right, right_padded_to_left

HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 2, 4, 2, 128
PROMPTS = [[5, 9, 17, 33, 2, 61, 8, 90, 11, 4, 7], [3, 44, 12, 100], [7, 8, 9, 10, 11, 12, 13]]


def export_tiny_llama(folder: Path, kv_heads: int = KV_HEADS) -> Path:
    """A tiny random LLaMA exported by llmship's exporter (torch.onnx dynamo, KV cache, optimum names)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmship.export.onnx_export import export_decoder

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # weights large enough for logits of std ~1 (HF's init gives near-uniform logits)
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0, 0.15)
            else:
                param.uniform_(0.5, 1.5)
    export_decoder(model, folder)
    return folder / "model.onnx"


def op_counts(path: Path) -> collections.Counter:
    graph = onnx.load(str(path), load_external_data=False).graph
    return collections.Counter(n.op_type for n in graph.node)


_EXPORTS: dict[str, Path] = {}


def shared_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny export per test session, also used by test_genai_config.py (exporting takes most of the time)."""
    if "gqa" not in _EXPORTS:
        _EXPORTS["gqa"] = export_tiny_llama(tmp_path_factory.mktemp("tiny"))
    return _EXPORTS["gqa"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_export(tmp_path_factory)


@pytest.fixture(scope="module")
def fused(exported: Path) -> tuple[Path, dict]:
    target = exported.parent / "fused" / "model.onnx"
    report = fuse_decoder(exported, target, HEADS, KV_HEADS, HIDDEN, max_positions=256, pack="all")
    return target, report


def test_fusion_counts_and_ops(exported: Path, fused: tuple[Path, dict]) -> None:
    path, report = fused
    fusions = report["fusions"]
    # per layer: input norm (first layer only) + 2 skip norms, q and k rotary, one attention, qkv and gate/up packing
    assert fusions["rotary_embedding"] == 2 * LAYERS
    assert fusions["skip_rms_normalization"] == 2 * LAYERS
    assert fusions["multi_head_attention"] == LAYERS
    assert fusions["packed_qkv"] == LAYERS
    assert fusions["packed_gate_up"] == LAYERS
    ops = op_counts(path)
    assert ops["RotaryEmbedding"] == 2 * LAYERS
    assert ops["MultiHeadAttention"] == LAYERS
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * LAYERS
    # q, k, v, o, gate, up, down per layer + lm_head  ->  qkv, o, gate_up, down per layer + lm_head
    assert op_counts(exported)["MatMul"] - ops["MatMul"] >= 3 * LAYERS
    assert "Cos" not in ops and "Softmax" not in ops
    assert report["nodes_after"] < report["nodes_before"] / 2
    assert report["io_contract"] == "unchanged" and report["padding"] == "left" and report["attention"] == "mha"
    # the exporter's module scopes survive (quantize's exclude patterns and lm_head detection read them)
    scopes = {n.name: dict((p.key, p.value) for p in n.metadata_props).get("pkg.torch.onnx.name_scopes", "")
              for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "MatMul"}
    assert sum("'model.model.layers.0.self_attn.qkv_proj'" in v for v in scopes.values()) == 1
    assert sum("'model.model.layers.1.mlp.gate_up_proj'" in v for v in scopes.values()) == 1
    assert sum("'model.lm_head'" in v for v in scopes.values()) == 1
    graph_in = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    assert graph_in == [i.name for i in onnx.load(str(exported), load_external_data=False).graph.input]


def test_fused_logits_match_left_padded_batch(exported: Path, fused: tuple[Path, dict]) -> None:
    figures = compare_decoders(exported, fused[0], PROMPTS, decode_steps=8)
    assert figures["prefill_max_logits_diff"] <= 1e-4
    assert figures["decode_max_logits_diff"] <= 1e-4
    assert figures["greedy_tokens_equal"]


def test_fused_graphs_run_past_max_positions_like_the_plain_export(exported: Path, fused: tuple[Path, dict],
                                                                   tmp_path: Path) -> None:
    # The plain export computes cos/sin from the positions (no limit); the fused graphs carry tables of twice the
    # 256 trained positions, so a prompt that fills max positions decodes past them with the same logits.
    gqa = tmp_path / "gqa.onnx"
    fuse_decoder(exported, gqa, HEADS, KV_HEADS, HIDDEN, max_positions=256, attention="gqa")
    assert runtime_layout(exported) == ("left", None)
    assert runtime_layout(fused[0]) == ("left", 512) and runtime_layout(gqa) == ("right", 512)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, VOCAB, size=n).tolist() for n in (256, 250)]
    for graph, padding in ((fused[0], "left"), (gqa, "right")):
        figures = compare_decoders(exported, graph, prompts, decode_steps=12, candidate_padding=padding)
        assert figures["decode_max_logits_diff"] <= 1e-4 and figures["greedy_tokens_equal"]
    # a table of exactly max positions (graphs fused before the headroom) reports it, and ORT refuses position 256
    small = tmp_path / "small.onnx"
    proto = onnx.load(str(fused[0]))
    for init in proto.graph.initializer:
        if init.name.startswith(("rotary_cos_cache", "rotary_sin_cache")):
            init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init)[:256], init.name))
    onnx.save(proto, str(small))
    assert runtime_layout(small) == ("left", 256)
    with pytest.raises(Exception, match="out of range"):
        compare_decoders(exported, small, prompts, decode_steps=2)


def test_compare_decoders_catches_a_wrong_graph(exported: Path, tmp_path: Path) -> None:
    # Scale one weight (what a wrong packing or split would do): such a graph must not pass.
    proto = onnx.load(str(exported))
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul"]
    inits = {i.name: i for i in proto.graph.initializer}
    weight = next(inits[n.input[1]] for n in matmuls if n.input[1] in inits)
    array = onnx.numpy_helper.to_array(weight) * 1.5
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    with pytest.raises(CheckFailed):
        compare_decoders(exported, broken, PROMPTS, decode_steps=2)


def int4(path: Path, target: Path, accuracy_level: int = 4) -> Path:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), block_size=32, is_symmetric=True, accuracy_level=accuracy_level)
    quantizer.process()
    onnx.save(quantizer.model.model, str(target))
    return target


def test_gqa_mode_matches_right_padded_batch(exported: Path, fused: tuple[Path, dict], tmp_path: Path) -> None:
    target = tmp_path / "gqa.onnx"
    report = fuse_decoder(exported, target, HEADS, KV_HEADS, HIDDEN, max_positions=256, attention="gqa")
    assert report["fusions"]["group_query_attention"] == LAYERS
    assert report["fusions"]["packed_qkv_into_gqa"] == LAYERS
    ops = op_counts(target)
    assert ops["GroupQueryAttention"] == LAYERS and ops["MatMul"] == 5 * LAYERS + 1  # qkv, o, gate, up, down + lm_head
    assert report["fusions"]["packed_gate_up"] == 0  # default pack="qkv"
    assert report["padding"] == "right" == runtime_padding(target) and report["io_contract"] != "unchanged"
    assert runtime_padding(exported) == "left"
    # the reference runs left-padded as usual; the GQA graph needs the right-padded layout
    figures = compare_decoders(exported, target, PROMPTS, decode_steps=8, candidate_padding="right")
    assert figures["decode_max_logits_diff"] <= 1e-4 and figures["greedy_tokens_equal"]
    # what OrtEngine does with a GQA graph: the caller's left-padded batch -> right-padded -> run -> left-padded again
    import onnxruntime as ort

    from llmship.runtime.base import left_pad

    ids, mask = left_pad(PROMPTS, 0)
    ids_r, positions_r, lengths = left_padded_to_right(ids, mask)
    assert lengths.tolist() == [len(p) for p in PROMPTS]
    past = {f"past_key_values.{i}.{k}": np.zeros((3, KV_HEADS, 0, HIDDEN // HEADS), np.float32) for i in range(LAYERS) for k in ("key", "value")}
    feeds = {"input_ids": ids_r, "attention_mask": mask, "position_ids": positions_r}
    logits_gqa = ort.InferenceSession(str(target)).run(["logits"], {**feeds, **past})[0]
    feeds["input_ids"], feeds["position_ids"] = ids, np.where(mask > 0, np.cumsum(mask, 1) - 1, 0)
    logits_ref = ort.InferenceSession(str(exported)).run(["logits"], {**feeds, **past})[0]
    aligned = right_padded_to_left(logits_gqa, mask)
    assert np.abs(np.where(mask[..., None] > 0, aligned - logits_ref, 0)).max() <= 1e-4
    # int4 composes: the same blockwise weights whichever attention op reads q/k/v (accuracy level 0: float
    # activations, so 1e-6 attention differences are not amplified by int8 activation rounding)
    gqa4, mha4 = int4(target, tmp_path / "gqa4.onnx", 0), int4(fused[0], tmp_path / "mha4.onnx", 0)
    assert op_counts(gqa4)["MatMulNBits"] == 5 * LAYERS + 1
    compare_decoders(mha4, gqa4, PROMPTS, decode_steps=4, candidate_padding="right")
    # ... and is wrong when fed left-padded rows: the contract in the report matters
    wrong = compare_decoders(exported, target, PROMPTS, decode_steps=2, max_logits_diff=None)
    assert wrong["prefill_max_logits_diff"] > 1e-2


def test_llama1_shape_without_kv_groups(tmp_path: Path) -> None:
    # kv heads == heads: HF skips repeat_kv, a different attention pattern; both attention forms must fuse
    exported = export_tiny_llama(tmp_path, kv_heads=HEADS)
    mha = fuse_decoder(exported, tmp_path / "mha.onnx", HEADS, HEADS, HIDDEN, max_positions=256)
    assert mha["fusions"]["multi_head_attention"] == LAYERS
    compare_decoders(exported, tmp_path / "mha.onnx", PROMPTS, decode_steps=4)
    gqa = fuse_decoder(exported, tmp_path / "gqa.onnx", HEADS, HEADS, HIDDEN, max_positions=256, attention="gqa")
    assert gqa["fusions"]["group_query_attention"] == LAYERS and gqa["padding"] == "right"
    compare_decoders(exported, tmp_path / "gqa.onnx", PROMPTS, decode_steps=4, candidate_padding="right")


def test_quantizers_apply_to_fused_graph(exported: Path, fused: tuple[Path, dict], tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = fused[0]
    weight_matmuls = op_counts(path)["MatMul"]  # attention is fused: every MatMul left reads a constant weight
    assert weight_matmuls == 4 * LAYERS + 1
    int8 = tmp_path / "int8.onnx"
    quantize_dynamic(str(path), str(int8), weight_type=QuantType.QInt8)
    assert op_counts(int8)["MatMulInteger"] == weight_matmuls
    int8_figures = compare_decoders(path, int8, PROMPTS[:1], decode_steps=2, max_logits_diff=None)

    int4_path = int4(path, tmp_path / "int4.onnx")
    assert op_counts(int4_path)["MatMulNBits"] == weight_matmuls
    int4_figures = compare_decoders(path, int4_path, PROMPTS[:1], decode_steps=2, max_logits_diff=None)
    # quantized, so not equal; 8-bit weights closer to fp32 than 4-bit ones
    assert 0 < int8_figures["prefill_max_logits_diff"] < int4_figures["prefill_max_logits_diff"]
    assert int8_figures["prefill_max_logits_diff"] < 0.5


def test_external_data_in_and_out(exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llmship.export.fusion as fusion

    monkeypatch.setattr(fusion, "INLINE_WEIGHTS_LIMIT", 0)  # as for a model over 2 GB
    big = tmp_path / "big" / "model.onnx"
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "model.onnx.data").write_bytes(b"stale")  # never appended to
    fuse_decoder(exported, big, HEADS, KV_HEADS, HIDDEN, max_positions=256)
    assert sorted(p.name for p in big.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert big.with_name("model.onnx.data").stat().st_size > big.stat().st_size
    monkeypatch.setattr(fusion, "INLINE_WEIGHTS_LIMIT", 2**40)
    small = tmp_path / "small" / "model.onnx"  # reads the external weights, writes them inline
    report = fuse_decoder(big, small, HEADS, KV_HEADS, HIDDEN, max_positions=256)
    assert sum(report["fusions"].values()) == 0  # already fused: nothing left to fuse
    assert [p.name for p in small.parent.iterdir()] == ["model.onnx"]
    compare_decoders(exported, small, PROMPTS, decode_steps=2)


def test_bad_inputs(tmp_path: Path, exported: Path) -> None:
    with pytest.raises(UserError):
        fuse_decoder(tmp_path / "missing.onnx", tmp_path / "out.onnx", HEADS, KV_HEADS, HIDDEN)
    with pytest.raises(UserError):
        fuse_decoder(exported, exported, HEADS, KV_HEADS, HIDDEN)
    with pytest.raises(UserError):
        fuse_decoder(exported, tmp_path / "out.onnx", 3, KV_HEADS, HIDDEN)
    with pytest.raises(CheckFailed):
        fuse_decoder(exported, tmp_path / "out.onnx", HEADS // 2, KV_HEADS // 2, HIDDEN)
    assert not (tmp_path / "out.onnx").exists()
