"""fp32 export of tiny LLaMA shapes (MHA + tied + llama3 rope + fusion + external data, GQA + linear rope, plain):
graph I/O, manifest, side files, parity figures. Atomic writes: test_export_atomic.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from llmship.artifact import Artifact
from llmship.config import Config
from llmship.errors import UserError
from llmship.export import export_fp32
from llmship.export.tiny import make_llama
from llmship.runtime import OrtEngine, left_pad

GREEDY = 16
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0}


def _config(model_dir: Path, **export) -> Config:
    cfg = Config()
    cfg.model.path = str(model_dir)
    cfg.export.parity.greedy_tokens = GREEDY  # tiny models: fewer steps than the default 32 keep the file quick
    for key, value in export.items():
        setattr(cfg.export, key, value)
    return cfg


@pytest.fixture(scope="module")
def mha_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("mha")
    model = make_llama(root / "model", num_key_value_heads=4, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)
    return model, export_fp32(_config(model, external_data="always"), root / "out" / "fp32")


@pytest.fixture(scope="module")
def gqa_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("gqa")
    model = make_llama(root / "model", num_key_value_heads=2, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                                   "rope_theta": 10000.0})
    return model, export_fp32(_config(model, optimize=False), root / "out" / "fp32")


def _assert_parity_passed(artifact: Artifact) -> dict:
    parity = artifact.manifest["parity"]
    assert parity["passed"] and parity["failures"] == []
    assert 0 < parity["max_logits_diff"] <= 1e-4  # exactly 0 would mean the candidate is not ORT at all
    assert parity["top1_agreement"] == 1.0 and parity["greedy_match"] == 1.0
    assert parity["greedy_matched_tokens"] == [GREEDY] * parity["prompts"]
    assert parity["prompts"] >= 3 and len(set(parity["prompt_tokens"])) > 1  # the batch check really pads
    assert abs(parity["nll_increase"]) < 1e-4
    return parity


def _ops(artifact: Artifact) -> set[str]:
    return {f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in onnx.load(str(artifact.onnx_path), load_external_data=False).graph.node}


def test_mha_tied_llama3_rope_export_passes_parity(mha_export):
    _, artifact = mha_export
    _assert_parity_passed(artifact)
    # export.optimize (default on): the fused graph passed the same parity and replaced the plain one.
    optimized = artifact.manifest["optimize"]
    assert optimized["applied"] and optimized["nodes_after"] < optimized["nodes_before"]
    assert optimized["fusions"]["multi_head_attention"] == 2 and optimized["fusions"]["rotary_embedding"] == 4
    assert {"com.microsoft::MultiHeadAttention", "com.microsoft::RotaryEmbedding"} <= _ops(artifact)
    assert 0 < optimized["plain_max_logits_diff"] <= 1e-4
    graph = onnx.load(str(artifact.onnx_path), load_external_data=False).graph
    names = [i.name for i in graph.input]
    assert names == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value",
                     "past_key_values.1.key", "past_key_values.1.value"]
    assert [o.name for o in graph.output] == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    past = graph.input[3].type.tensor_type
    dims = [d.dim_param or d.dim_value for d in past.shape.dim]
    assert isinstance(dims[0], str) and dims[1] == 4 and isinstance(dims[2], str) and dims[3] == 16  # MHA: 4 kv heads
    assert past.elem_type == onnx.TensorProto.FLOAT
    assert (artifact.path / "model.onnx.data").exists() and artifact.manifest["onnx"]["external_data"]  # 'always'
    assert not (artifact.path / ".fused").exists()


def test_manifest_and_side_files(mha_export):
    model_dir, artifact = mha_export
    m = artifact.manifest
    assert m["llmship"]["kind"] == "fp32" and m["scheme"] == "none"
    assert m["libraries"]["torch"] and m["libraries"]["onnxruntime"]
    assert m["source"]["path"] == str(model_dir) and len(m["source"]["fingerprint"]["model"]) == 16
    assert m["config"]["model"]["path"] == str(model_dir)
    assert m["size_bytes"] > m["model"]["parameters"] * 4 * 0.9
    assert (artifact.path / "model.onnx.data").stat().st_size > m["model"]["parameters"] * 4 * 0.9
    for name in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json"):
        assert (artifact.path / name).is_file()
    config = json.loads((artifact.path / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["rope_parameters"]["rope_type"] == "llama3"
    assert not list(artifact.path.parent.glob("fp32.tmp-*"))


def test_rope_scaling_reaches_the_graph(mha_export, tmp_path):
    # Same weights without rope scaling must give different logits past position 0: the scaling is in the graph.
    model_dir, artifact = mha_export
    plain = tmp_path / "plain"
    plain.mkdir()
    for file in model_dir.iterdir():
        (plain / file.name).write_bytes(file.read_bytes())
    config = json.loads((plain / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    (plain / "config.json").write_text(json.dumps(config))
    from llmship.config import ModelConfig
    from llmship.runtime import load_engine

    scaled = OrtEngine(artifact.path)
    unscaled = load_engine(ModelConfig(path=str(plain)))
    ids, mask = left_pad([[1, 40, 50, 60, 70, 80, 90, 100]], 0)
    a, _ = scaled.prefill(ids, mask)
    b, _ = unscaled.prefill(ids, mask)
    assert np.abs(a[0, 0] - b[0, 0]).max() < 1e-4  # position 0: rotation is the identity either way
    assert np.abs(a[0, 1:] - b[0, 1:]).max() > 1e-2


def test_gqa_linear_rope_plain_export_passes_parity(gqa_export):
    _, artifact = gqa_export
    _assert_parity_passed(artifact)
    assert not (artifact.path / "model.onnx.data").exists() and artifact.manifest["onnx"]["external_data"] is False
    assert artifact.manifest["optimize"]["applied"] is False
    assert not any(op.startswith("com.microsoft") for op in _ops(artifact))
    graph = onnx.load(str(artifact.onnx_path), load_external_data=False).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[3].type.tensor_type.shape.dim]
    assert dims[1] == 2  # GQA: 2 kv heads for 4 query heads


def test_bad_model_folder_fails_before_touching_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="config.json"):
        export_fp32(_config(tmp_path), out)
    assert not out.exists()


def test_half_precision_source_exports_fp32_checked_against_fp32(gqa_export, tmp_path):
    model_dir, _ = gqa_export
    cfg = _config(model_dir, optimize=False)
    cfg.model.dtype = "bfloat16"
    cfg.export.parity.greedy_tokens = 4
    artifact = export_fp32(cfg, tmp_path / "fp32")
    parity = artifact.manifest["parity"]
    assert parity["passed"] and parity["max_logits_diff"] <= 1e-4
    assert parity["reference"]["dtype"] == "float32" and artifact.manifest["source"]["dtype"] == "bfloat16"
    assert json.loads((artifact.path / "config.json").read_text())["dtype"] == "float32"
    graph = onnx.load(str(artifact.onnx_path), load_external_data=False).graph
    assert graph.input[3].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_gqa_attention_export_passes_parity_through_the_runtime(tmp_path):
    """export.attention=gqa: GroupQueryAttention (right-padded prompts inside OrtEngine, left-padded interface) passes
    the same parity, the left-padded batch included, and writes a genai_config with the in-place cache."""
    model = make_llama(tmp_path / "model", num_key_value_heads=2)
    artifact = export_fp32(_config(model, attention="gqa"), tmp_path / "fp32")
    parity = _assert_parity_passed(artifact)
    assert artifact.manifest["optimize"]["applied"] and artifact.manifest["optimize"]["fusions"]["group_query_attention"] == 2
    assert "com.microsoft::GroupQueryAttention" in _ops(artifact)
    assert parity["batch_top1"] == 1.0
    engine = OrtEngine(artifact.path)
    assert engine.padding == "right"
    # generation uses the in-place cache (one buffer per layer bound as past and present): same tokens as the grown
    # (concatenated) cache and as PyTorch, on a batch of different lengths
    from llmship.config import ModelConfig
    from llmship.runtime import load_engine

    prompts = [[1, 5, 6, 7, 8, 9, 10], [1, 11, 12], [1, 13, 14, 15, 16]]
    in_place = engine.generate(prompts, 12, ignore_eos=True)
    concat_engine = OrtEngine(artifact.path)
    concat_engine.prefill_for_generation = lambda ids, mask, _n: concat_engine.prefill(ids, mask)
    assert in_place == concat_engine.generate(prompts, 12, ignore_eos=True)
    assert in_place == load_engine(ModelConfig(path=str(model))).generate(prompts, 12, ignore_eos=True)
    assert "in-place" in engine.info()["kv_cache"]
    genai = json.loads((artifact.path / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True
    assert genai["model"]["decoder"]["num_key_value_heads"] == 2
