"""Quantize building blocks on small graphs: option validation, fp16 overflow fallback, SmoothQuant equivalence,
block-quantized embeddings, GPTQ, exclusions. The quality bar on the embedded model is in test_quantize_embedded.py."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from llmship.config import VariantConfig
from llmship.errors import UserError
from llmship.quantize import SCHEMES, build_scheme, resolve_variant
from llmship.quantize.embedding import dequantize_blocks, quantize_blocks, quantize_embeddings
from llmship.quantize.feeds import calibration_feeds, decoder_inputs
from llmship.quantize.graph import linear_nodes, load_model, module_name, save_model
from llmship.quantize.registry import QuantizeJob
from llmship.quantize.smoothquant import activation_maxima, find_groups, smooth_model


def session(model: onnx.ModelProto | Path, optimize: bool = True) -> ort.InferenceSession:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("variant", "field", "text"), [
    ({"scheme": "w4a16", "method": "awq2"}, "quantize.method", "rtn, hqq, gptq, awq"),
    ({"scheme": "w4a16", "method": "rtn", "options": {"actorder": True}}, "quantize.options.actorder", "method gptq"),
    ({"scheme": "w4a16", "method": "awq", "options": {"true_sequential": True}}, "quantize.options.true_sequential",
     "method gptq"),
    ({"scheme": "w4a16", "method": "gptq", "options": {"awq_clip": False}}, "quantize.options.awq_clip", "method awq"),
    ({"scheme": "w4a16", "method": "awq", "options": {"awq_clip": "sometimes"}}, "quantize.options.awq_clip", "boolean"),
    ({"scheme": "w8a8-static", "method": "mse"}, "quantize.method", "minmax, entropy, percentile"),
    ({"scheme": "w4a16", "options": {"blocksize": 32}}, "quantize.options.blocksize", "block_size"),
    ({"scheme": "w4a16", "options": {"block_size": 24}}, "quantize.options.block_size", "power of two"),
    ({"scheme": "w8a16", "options": {"accuracy_level": 7}}, "quantize.options.accuracy_level", "less than or equal"),
    ({"scheme": "fp16", "method": "fast"}, "quantize.method", "no methods"),
    ({"scheme": "w8a8-static", "options": {"alpha": 0.8}}, "quantize.options.alpha", "smoothquant"),
    ({"scheme": "w8a8-dynamic", "options": {"per_chanel": True}}, "quantize.options.per_chanel", "per_channel"),
])
def test_resolve_variant_names_the_field(variant, field, text):
    with pytest.raises(UserError) as err:
        resolve_variant(VariantConfig(**variant), where="quantize")
    assert err.value.where == field
    assert text in str(err.value)


def test_every_scheme_of_the_config_has_a_quantizer_with_defaults():
    assert set(SCHEMES) == {"none", "fp16", "w8a8-dynamic", "w8a8-static", "w8a16", "w4a16"}
    assert build_scheme(VariantConfig(scheme="w4a16")).method == "rtn"
    assert build_scheme(VariantConfig(scheme="w8a8-static")).method == "minmax"
    assert build_scheme(VariantConfig(scheme="w8a16")).options.accuracy_level == 4
    assert resolve_variant(VariantConfig(scheme="none")).folder_name == "fp32"
    with pytest.raises(UserError):
        resolve_variant(VariantConfig(scheme="none", method="rtn"))
    with pytest.raises(UserError):
        resolve_variant(VariantConfig(scheme="none", options={"block_size": 32}))


# --------------------------------------------------------------------------- fp16 overflow fallback
def overflow_graph() -> tuple[onnx.ModelProto, np.ndarray]:
    """ids -> embedding -> x*3000 (up to ~1e5: overflows fp16) -> Transpose x2 -> *1/3000 -> MatMul -> logits.

    Run with graph optimizations off, every node computes in its declared type (as fp16 kernels on a GPU do);
    ORT's CPU optimizer would otherwise fold the transposes and casts of this small graph away."""
    rng = np.random.default_rng(0)
    table = rng.uniform(5, 30, size=(16, 8)).astype(np.float32)
    head = rng.normal(size=(8, 16)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["h"], name="embed_gather"),
        helper.make_node("Mul", ["h", "big"], ["h_big"], name="scale_up"),
        helper.make_node("Transpose", ["h_big"], ["h_t"], name="transpose", perm=[0, 2, 1]),
        helper.make_node("Transpose", ["h_t"], ["h_tt"], name="transpose_back", perm=[0, 2, 1]),
        helper.make_node("Mul", ["h_tt", "small"], ["h_back"], name="scale_down"),
        helper.make_node("MatMul", ["h_back", "head"], ["logits"], name="lm_head"),
    ]
    inits = [numpy_helper.from_array(table, "embed"), numpy_helper.from_array(np.array(3000.0, np.float32), "big"),
             numpy_helper.from_array(np.array(1 / 3000.0, np.float32), "small"), numpy_helper.from_array(head, "head")]
    graph = helper.make_graph(nodes, "overflow", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), table @ head


def run_fp16(tmp_path: Path, options: dict) -> tuple[np.ndarray, dict]:
    model, _ = overflow_graph()
    save_model(model, tmp_path / "fp32")
    scheme = build_scheme(VariantConfig(scheme="fp16", options=options))
    job = QuantizeJob(source=tmp_path / "fp32" / "model.onnx", folder=tmp_path / "fp32", target=tmp_path / "fp16",
                      samples=[[0, 3, 7, 15], [2, 9]], exclude=[])
    report = scheme.quantize(job)
    out = session(tmp_path / "fp16" / "model.onnx", optimize=False).run(None, {"input_ids": np.array([[0, 3, 7, 15]])})[0]
    return out, report


def test_fp16_keeps_overflowing_nodes_in_fp32(tmp_path):
    _, reference = overflow_graph()
    out, report = run_fp16(tmp_path / "scan", {})
    kept = {row["node"]: row for row in report["kept_fp32"]}
    assert set(kept) == {"scale_up", "transpose", "transpose_back", "scale_down"}  # all that touch the 1e5 values
    assert kept["scale_up"]["max_abs"] > 65504
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0], reference[[0, 3, 7, 15]], rtol=2e-2, atol=2e-2)


def test_fp16_without_the_scan_overflows(tmp_path):
    out, report = run_fp16(tmp_path / "plain", {"overflow_scan": False, "max_rounds": 0})
    assert report["kept_fp32"] == []
    assert not np.isfinite(out).all()  # the graph really overflows: the fallback above is what fixes it


def segment(position: int) -> onnx.ModelProto:
    """A decoder-layer segment as the layer-wise compile cuts it: a carried activation `x` in (fp32, |x| up to 1e5 from
    the layer before) and a shared constant `C` (the rotary caches of every layer) read by a node that must stay fp32
    (`keep_*`, excluded) and by one that goes fp16; `y` carried out, untyped as segments' outputs are."""
    nodes = [helper.make_node("Mul", ["x", "small"], ["x_small"], name=f"shrink_{position}"),
             helper.make_node("Add", ["x_small", "C"], ["kept"], name=f"keep_{position}"),
             helper.make_node("Mul", ["x_small", "C"], ["half"], name=f"half_{position}"),
             helper.make_node("Add", ["kept", "half"], [f"y{position}"], name=f"sum_{position}")]
    inits = [numpy_helper.from_array(np.array(1e-3, np.float32), "small"),
             numpy_helper.from_array(np.linspace(0.5, 1.5, 8, dtype=np.float32), "C")]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [onnx.ValueInfoProto(name=f"y{position}")], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_fp16_layer_keeps_readers_of_an_out_of_range_input_and_names_its_casts_apart(tmp_path):
    """fp16's overflow scan one decoder layer at a time (Fp16.quantize_layer): a node that reads an activation past
    fp16's range from an earlier segment stays fp32 although its own output is small, the float outputs are carried,
    and two converted segments share no node or tensor name the conversion made (they are joined into one graph)."""
    from llmship.quantize.layerwise import LayerJob

    scheme = build_scheme(VariantConfig(scheme="fp16"))
    feeds = [{"x": np.linspace(-1e5, 1e5, 8, dtype=np.float32).reshape(1, 8)}]
    converted, carried = [], []
    for position in (1, 2):
        job = LayerJob(model=segment(position), feeds=feeds, position=position, layers=3, scratch=tmp_path,
                       exclude=["keep_*"], carry=carried.append)
        model, report = scheme.quantize_layer(job)
        kept = {row["node"]: row for row in report["kept_fp32"]}
        assert kept[f"shrink_{position}"]["tensor"] == "x" and kept[f"keep_{position}"]["reason"] == "excluded"
        assert set(kept) == {f"shrink_{position}", f"keep_{position}"}
        out = session(model, optimize=False).run(None, feeds[0])[0]
        np.testing.assert_allclose(out, session(segment(position)).run(None, feeds[0])[0], rtol=2e-3, atol=2e-3)
        converted.append(model)
    assert len(carried) == 2 and all(m.graph.node[0].name.startswith("shrink") for m in carried)  # the float graphs
    made = [{n.name for n in m.graph.node} | {o for n in m.graph.node for o in n.output} for m in converted]
    shared = made[0] & made[1]
    assert shared == {"x_small", "kept", "half"} and any("cast" in n for n in made[0])  # the source's own names only


# --------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize(("bits", "cols", "block"), [(8, 64, 32), (8, 48, 128), (4, 64, 16), (4, 40, 32)])
def test_block_quantized_embeddings_match_numpy_dequantization(bits, cols, block):
    rng = np.random.default_rng(1)
    table = rng.normal(size=(50, cols)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gather", ["embed", "ids"], ["out"], name="g")], "t",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(table, "embed")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    rows = quantize_embeddings(model, bits, block, exclude=[])
    assert [n.op_type for n in model.graph.node] == ["GatherBlockQuantized"]
    ids = np.array([[0, 3, 49, 7]])
    out = session(model).run(None, {"ids": ids})[0]
    q, scale, zero = quantize_blocks(table, bits, block)
    np.testing.assert_array_equal(out, dequantize_blocks(q, scale, zero, block)[ids])
    step = (table.max() - table.min()) / ((1 << bits) - 1)
    assert rows[0]["max_abs_error"] <= step  # half a step per block, at most
    assert np.abs(out - table[ids]).max() > 0  # really quantized


# --------------------------------------------------------------------------- a tiny exported LLaMA
@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmship.export.onnx_export import export_decoder

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.1)
        # Outlier channels in the norm weights, as trained LLMs have: what SmoothQuant exists for.
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] = 20.0
            layer.post_attention_layernorm.weight[5:7] = 15.0
    folder = tmp_path_factory.mktemp("tiny")
    export_decoder(model, folder)
    config.to_json_file(str(folder / "config.json"))
    return folder


@pytest.fixture(scope="module")
def fused_decoder(tiny_decoder, tmp_path_factory) -> Path:
    """The same decoder after llmship's ORT fusions (what export_fp32 ships): fused RMSNorms, packed q/k/v, gate/up."""
    import shutil

    from llmship.export.fusion import fuse_decoder

    folder = tmp_path_factory.mktemp("fused")
    fuse_decoder(tiny_decoder / "model.onnx", folder / "model.onnx", 4, 2, 64, max_positions=128)
    shutil.copy2(tiny_decoder / "config.json", folder / "config.json")
    return folder


def tiny_samples(count: int = 6, length: int = 24, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 128) for _ in range(length - 1)] for _ in range(count)]


@pytest.mark.parametrize("graph", ["exported", "fused"])
def test_smoothquant_folding_keeps_the_float_model_output(graph, tiny_decoder, fused_decoder, tmp_path):
    folder = tiny_decoder if graph == "exported" else fused_decoder
    model = load_model(folder / "model.onnx")
    feeds = calibration_feeds(tiny_samples(), decoder_inputs(model, folder))
    groups = find_groups(model)
    # q/k/v after input_layernorm and gate/up after post_attention_layernorm, per layer; not the final norm -> lm_head.
    assert len(groups) == 4  # 2 layers x (input_layernorm, post_attention_layernorm)
    if graph == "exported":
        assert sorted(len(g.linears) for g in groups) == [2, 2, 3, 3]
    else:  # fused RMSNorm ops; the fusion packs projections that read one activation
        assert {n.op_type for g in groups for n in model.graph.node if n.name == g.norm_node} <= {
            "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}
    assert {n.op_type for g in groups for n in g.linears} == {"MatMul"}
    assert all(module_name(n) != "lm_head" for g in groups for n in g.linears)
    before = activation_maxima(model, [g.activation for g in groups], feeds, tmp_path)
    report = smooth_model(model, feeds, alpha=0.5, scratch=tmp_path)
    assert report["groups"] == 4 and min(r["scale_max"] / r["scale_min"] for r in report["smoothed"]) > 3
    after = activation_maxima(model, [g.activation for g in groups], feeds, tmp_path)
    for name in before:  # outlier channels are flattened: max/median of the per-channel maxima drops
        assert after[name].max() / np.median(after[name]) < 0.5 * before[name].max() / np.median(before[name])
    original = session(folder / "model.onnx")
    smoothed = session(model)
    for feed in feeds[:3]:
        ref = original.run(["logits"], feed)[0]
        got = smoothed.run(["logits"], feed)[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_gptq_uses_the_calibration_set_and_beats_rtn_on_it(tiny_decoder, tmp_path):
    samples = tiny_samples(8, 32)

    def quantized_logits(method: str) -> np.ndarray:
        scheme = build_scheme(VariantConfig(scheme="w4a16", method=method, options={"block_size": 16, "quantize_embeddings": False}))
        job = QuantizeJob(source=tiny_decoder / "model.onnx", folder=tiny_decoder, target=tmp_path / method,
                          samples=samples, exclude=[])
        report = scheme.quantize(job)
        assert len(report["quantized"]) == 15  # 7 linears x 2 layers + lm_head
        model = onnx.load(str(tmp_path / method / "model.onnx"))
        assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 15
        feeds = calibration_feeds(samples, decoder_inputs(model, tiny_decoder))
        sess = session(model)
        return np.concatenate([sess.run(["logits"], f)[0] for f in feeds], axis=1)

    reference = session(tiny_decoder / "model.onnx")
    ref = np.concatenate([reference.run(["logits"], f)[0]
                          for f in calibration_feeds(samples, decoder_inputs(load_model(tiny_decoder / "model.onnx"), tiny_decoder))], axis=1)
    err = {m: float(np.mean((quantized_logits(m) - ref) ** 2)) for m in ("rtn", "gptq")}
    assert err["gptq"] < err["rtn"]


def test_exclusions_keep_lm_head_float_and_report_it(tiny_decoder, tmp_path):
    scheme = build_scheme(VariantConfig(scheme="w8a16", exclude=["lm_head", "*layers.1.mlp.down_proj*"],
                                        options={"quantize_embeddings": False}))
    job = QuantizeJob(source=tiny_decoder / "model.onnx", folder=tiny_decoder, target=tmp_path / "w8",
                      samples=None, exclude=["lm_head", "*layers.1.mlp.down_proj*"])
    report = scheme.quantize(job)
    kept = sorted(row["name"].split(" ")[0] for row in report["kept_float"])
    assert kept == ["lm_head", "model.layers.1.mlp.down_proj"]
    model = onnx.load(str(tmp_path / "w8" / "model.onnx"))
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 13
    assert len(linear_nodes(model)) == 2 and not report["embeddings_quantized"]


# --------------------------------------------------------------------------- per-token dynamic int8
def per_token_reference(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """numpy per-token symmetric int8 activations x per-channel symmetric int8 weights, dequantized."""
    x_scale = np.maximum(np.abs(x).max(-1, keepdims=True) / 127, 1e-12)
    xq = np.clip(np.rint(x / x_scale), -127, 127)
    w_scale = np.abs(weight).max(0) / 127
    wq = np.clip(np.rint(weight / w_scale), -127, 127)
    return (xq @ wq) * x_scale * w_scale


def test_per_token_int8_matches_numpy_and_shares_the_activation_quantization():
    from llmship.quantize.per_token import rewrite_per_token

    rng = np.random.default_rng(0)
    w1, w2 = (rng.normal(size=(64, n)).astype(np.float32) for n in (48, 32))
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["h"], name="relu"),
                               helper.make_node("MatMul", ["h", "w1"], ["y1"], name="q"),
                               helper.make_node("MatMul", ["h", "w2"], ["y2"], name="k")], "t",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, 64])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [None, None, None]) for y in ("y1", "y2")],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert rewrite_per_token(model, list(model.graph.node[1:]), per_channel=True, reduce_range=False) == 1
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("MatMulIntegerToFloat") == 2 and "MatMul" not in ops
    # One token with a 100x outlier: a per-tensor scale would flatten every other token to a few int8 levels.
    x = rng.normal(size=(2, 5, 64)).astype(np.float32)
    x[0, 0] *= 100
    h = np.maximum(x, 0)
    y1, y2 = session(model).run(None, {"x": x})
    np.testing.assert_allclose(y1, per_token_reference(h, w1), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(y2, per_token_reference(h, w2), rtol=1e-5, atol=1e-3)
    quiet = np.abs(y1[1] - h[1] @ w1).max() / np.abs(h[1] @ w1).max()
    assert quiet < 0.02  # the tokens beside the outlier keep their own resolution


def test_two_level_activations_carry_the_rounding_error():
    """down_proj/lm_head's second int8 level: the product matches float activations x int8 weights to ~15 bits, where
    one level is off by the 8-bit rounding; both rows go through one GEMM."""
    from llmship.quantize.per_token import quantize_weight, rewrite_per_token

    rng = np.random.default_rng(1)
    weight = rng.normal(size=(64, 40)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="down")], "t",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, None])],
                              [numpy_helper.from_array(weight, "w")])
    one, two = (helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]) for _ in range(2))
    rewrite_per_token(one, list(one.graph.node), per_channel=True, reduce_range=False)
    rewrite_per_token(two, list(two.graph.node), per_channel=True, reduce_range=False, two_level={"down"})
    onnx.checker.check_model(two)
    assert [n.op_type for n in two.graph.node].count("MatMulIntegerToFloat") == 1
    x = rng.standard_t(3, size=(2, 7, 64)).astype(np.float32)  # heavy tails, as down_proj's input
    q, scale = quantize_weight(weight, per_channel=True, reduce_range=False)
    exact = x @ (q.astype(np.float32) * scale)  # float activations, the same int8 weights
    err_one = np.abs(session(one).run(None, {"x": x})[0] - exact).max()
    err_two = np.abs(session(two).run(None, {"x": x})[0] - exact).max()
    assert err_two < err_one / 50 and err_two < 1e-3 * np.abs(exact).max()


@pytest.mark.parametrize("fine_method", ["two_level", "blocks"])
def test_w8a8_dynamic_reports_each_excluded_layer_once(tiny_decoder, tmp_path, fine_method):
    excluded = ["*layers.0.self_attn.o_proj*", "*layers.1.mlp.down_proj*"]
    scheme = build_scheme(VariantConfig(scheme="w8a8-dynamic", exclude=excluded, options={"fine_method": fine_method}))
    job = QuantizeJob(source=tiny_decoder / "model.onnx", folder=tiny_decoder, target=tmp_path / "w8", samples=None,
                      exclude=excluded)
    report = scheme.quantize(job)
    kept = sorted(row["name"].split(" ")[0] for row in report["kept_float"])
    assert kept == ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    assert "2 kept float" in report["summary"]
    assert len(linear_nodes(onnx.load(str(tmp_path / "w8" / "model.onnx")))) == 2


@pytest.mark.parametrize(("activations", "fine_method"), [("per_token", "two_level"), ("per_tensor", "two_level"),
                                                          ("per_token", "blocks")])
def test_w8a8_dynamic_fine_layers_are_down_proj_and_lm_head(tiny_decoder, tmp_path, activations, fine_method):
    scheme = build_scheme(VariantConfig(scheme="w8a8-dynamic", options={"activations": activations,
                                                                        "fine_method": fine_method}))
    job = QuantizeJob(source=tiny_decoder / "model.onnx", folder=tiny_decoder, target=tmp_path / "w8", samples=None,
                      exclude=[])
    report = scheme.quantize(job)
    model = onnx.load(str(tmp_path / "w8" / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    fine = sorted(row["name"].split(" ")[0] for row in report["quantized"] if "two-level" in row["as"] or "group" in row["as"])
    assert fine == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert not linear_nodes(model) and report["fine_method"] == fine_method
    assert ops.count("MatMulNBits") == (3 if fine_method == "blocks" else 0)
    assert ops.count("Split") == (3 if fine_method == "two_level" else 0)
    assert ("MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops) == (activations == "per_tensor")


# --------------------------------------------------------------------------- AWQ, GPTQ options
def test_awq_fake_quantization_is_the_grid_of_matmul_nbits():
    """AWQ searches with numpy fake quantization; it must round exactly as onnxruntime's MatMulNBits quantizer, or the
    search optimizes for a grid the model never gets."""
    from llmship.quantize.awq import fake_quantize
    from llmship.quantize.weight_only import mnb

    rng = np.random.default_rng(0)
    weight = (rng.normal(size=(96, 24)) * 0.1).astype(np.float32)
    weight[:, 3] += 0.2
    weight[:, 5] -= 0.3
    x = rng.normal(size=(4, 96)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 24])], [numpy_helper.from_array(weight, "w")])
    for symmetric in (False, True):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        algo = mnb.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=symmetric, accuracy_level=0,
                                                op_types_to_quantize=("MatMul",), bits=4)
        quantizer = mnb.MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=symmetric, algo_config=algo)
        quantizer.process()
        got = session(quantizer.model.model).run(None, {"x": x})[0]
        fake = x @ fake_quantize(weight.astype(np.float64), 4, 32, symmetric)
        np.testing.assert_allclose(got, fake, atol=1e-4)
        assert np.abs(got - x @ weight).max() > 0.05  # really quantized


@pytest.mark.parametrize("graph", ["exported", "fused"])
def test_awq_scales_fold_without_changing_the_float_model(graph, tiny_decoder, fused_decoder, tmp_path):
    from llmship.quantize.awq import awq_model, find_scale_groups

    folder = tiny_decoder if graph == "exported" else fused_decoder
    model = load_model(folder / "model.onnx")
    feeds = calibration_feeds(tiny_samples(), decoder_inputs(model, folder))
    groups = find_scale_groups(model, skip=set())
    # Per layer: input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, and up -> down.
    assert sorted(g.kind for g in groups) == ["linear"] * 2 + ["norm"] * 4
    assert sum(g.mlp is not None for g in groups) == 2  # the gate/up groups are judged on the MLP's output
    report = awq_model(model, feeds, bits=4, block_size=16, symmetric=False, skip=set(), clip=[], scratch=tmp_path)
    assert report["groups"] == len(groups) and any(r["alpha"] > 0 for r in report["scaled"])
    assert all(r["error"] <= r["error_alpha0"] for r in report["scaled"])
    original, scaled = session(folder / "model.onnx"), session(model)
    for feed in feeds[:3]:
        ref = original.run(["logits"], feed)[0]
        np.testing.assert_allclose(scaled.run(["logits"], feed)[0], ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_awq_protects_outlier_channels_better_than_rtn(tiny_decoder, tmp_path):
    """The tiny decoder's norms carry 15-20x outlier channels (as trained LLMs have): AWQ's scales must cut the int4
    logits error of plain RTN on text it did not calibrate on."""
    calib, held_out = tiny_samples(8, 32, seed=0), tiny_samples(8, 32, seed=1)
    reference = session(tiny_decoder / "model.onnx")
    feeds = calibration_feeds(held_out, decoder_inputs(load_model(tiny_decoder / "model.onnx"), tiny_decoder))
    ref = np.concatenate([reference.run(["logits"], f)[0] for f in feeds], axis=1)
    err, reports = {}, {}
    for method in ("rtn", "awq"):
        scheme = build_scheme(VariantConfig(scheme="w4a16", method=method, options={"block_size": 32, "quantize_embeddings": False}))
        reports[method] = scheme.quantize(QuantizeJob(source=tiny_decoder / "model.onnx", folder=tiny_decoder,
                                                      target=tmp_path / method, samples=calib, exclude=[]))
        sess = session(tmp_path / method / "model.onnx")
        err[method] = float(np.mean((np.concatenate([sess.run(["logits"], f)[0] for f in feeds], axis=1) - ref) ** 2))
    assert err["awq"] < 0.8 * err["rtn"], err
    searched = reports["awq"]["awq"]
    assert searched["groups"] == 6 and searched["clipped"]
    assert not any("q_proj" in name or "k_proj" in name for name in searched["clipped"])  # llm-awq leaves q/k unclipped
    assert len(reports["awq"]["quantized"]) == 15 and "awq" not in reports["rtn"]


def test_awq_without_a_calibration_set_is_a_user_error(tiny_decoder, tmp_path):
    scheme = build_scheme(VariantConfig(scheme="w4a16", method="awq"))
    assert scheme.uses_calibration() and scheme.block_size == 128
    job = QuantizeJob(source=tiny_decoder / "model.onnx", folder=tiny_decoder, target=tmp_path / "awq", samples=None, exclude=[])
    with pytest.raises(UserError, match="awq needs a calibration set"):
        scheme.quantize(job)
    assert not (tmp_path / "awq" / "model.onnx").exists()


def test_true_sequential_gptq_quantizes_each_projection_after_the_ones_before(tiny_decoder, tmp_path):
    """One Hessian pass per projection input (q/k/v, o, gate/up, down) instead of one per layer: a different, valid
    int4 model whose error on the calibration text stays at plain GPTQ's level."""
    samples = tiny_samples(8, 32)
    feeds = calibration_feeds(samples, decoder_inputs(load_model(tiny_decoder / "model.onnx"), tiny_decoder))
    ref = np.concatenate([session(tiny_decoder / "model.onnx").run(["logits"], f)[0] for f in feeds], axis=1)
    logits = {}
    for name, options in {"layer": {}, "true_sequential": {"true_sequential": True},
                          "actorder": {"actorder": True, "true_sequential": True}}.items():
        scheme = build_scheme(VariantConfig(scheme="w4a16", method="gptq",
                                            options={"block_size": 16, "quantize_embeddings": False, **options}))
        scheme.quantize(QuantizeJob(source=tiny_decoder / "model.onnx", folder=tiny_decoder, target=tmp_path / name,
                                    samples=samples, exclude=[]))
        sess = session(tmp_path / name / "model.onnx")
        logits[name] = np.concatenate([sess.run(["logits"], f)[0] for f in feeds], axis=1)
    err = {name: float(np.mean((value - ref) ** 2)) for name, value in logits.items()}
    assert not np.array_equal(logits["layer"], logits["true_sequential"])
    assert err["true_sequential"] < 1.25 * err["layer"] and err["actorder"] < 1.25 * err["layer"], err


# --------------------------------------------------------------------------- ONNX Runtime's quantizers stay quiet
@pytest.mark.parametrize("variant", [{"scheme": "w8a8-static", "options": {"smoothquant": True}},
                                     {"scheme": "w8a8-dynamic", "options": {"activations": "per_tensor", "fine_layers": []}}],
                         ids=["w8a8-static-smoothquant", "w8a8-dynamic-per-tensor"])
def test_ort_quantizers_do_not_log_the_preprocessing_hint(tiny_decoder, tmp_path, caplog, variant):
    """quantize_static / quantize_dynamic log 'Please consider ... pre-processing' with an image-classification link
    through the root logger; llmship drops that message around its calls and nothing else."""
    import logging

    from llmship.quantize.ort_quiet import without_preprocess_hint

    root_filters = list(logging.getLogger().filters)
    scheme = build_scheme(VariantConfig(**variant))
    job = QuantizeJob(source=tiny_decoder / "model.onnx", folder=tiny_decoder, target=tmp_path / "q",
                      samples=tiny_samples(4, 16), exclude=[])
    with caplog.at_level(logging.WARNING):
        scheme.quantize(job)
        with without_preprocess_hint():
            logging.warning("another root warning")
        logging.warning("Please consider to run pre-processing before quantization.")  # outside: not filtered
    messages = [r.getMessage() for r in caplog.records]
    assert "another root warning" in messages
    assert [m for m in messages if "pre-processing" in m] == ["Please consider to run pre-processing before quantization."]
    assert not [m for m in messages if "image_classification" in m]
    assert logging.getLogger().filters == root_filters
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.node}
    assert ops & {"QuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}  # ORT's quantizer really ran
