"""Streaming compile (export.streaming) against today's whole-model path, on the embedded model, and its memory.

The key property: every variant streamed from the checkpoint computes the same logits as the variant built by
exporting the whole fp32 model and quantizing it (the per-tensor quantization is the schemes' own code).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from testkit import ROOT

from llmship.config import EMBEDDED_MODEL_DIR, Config
from llmship.errors import UserError

pytestmark = pytest.mark.skipif(not (EMBEDDED_MODEL_DIR / "config.json").is_file(), reason="embedded model not built")

VARIANTS = [
    {"scheme": "w8a16"},
    {"scheme": "w4a16", "method": "rtn"},
    {"scheme": "w4a16", "method": "hqq"},
    {"scheme": "w8a8-dynamic"},
    {"scheme": "w8a8-dynamic", "name": "w8a8-per-tensor", "options": {"activations": "per_tensor"}},
    {"scheme": "w8a8-dynamic", "name": "w8a8-blocks", "options": {"fine_method": "blocks"}},
    {"scheme": "w8a16", "name": "w8a16-excl", "exclude": ["lm_head", "model.layers.0.*"]},
    # one weight scale per tensor: not column-wise (the fixture makes the scheme claim it is, so that the streaming
    # compile's own check finds the chunks do not merge and sends the weights through whole)
    {"scheme": "w8a8-dynamic", "name": "w8a8-tensor-weights", "options": {"per_channel": False}},
]
NAMES = ["fp32", "w8a16", "w4a16-rtn", "w4a16-hqq", "w8a8-dynamic", "w8a8-per-tensor", "w8a8-blocks", "w8a16-excl",
         "w8a8-tensor-weights"]
TABLE = "model.model.embed_tokens.weight"


def _config(out: Path, streaming: bool) -> Config:
    # the streamed variants' parity runs ONNX a layer at a time (a 7B's default), the whole-model path's whole
    parity = {"layer_at_a_time": "always"} if streaming else {}
    return Config.model_validate({"output": {"dir": str(out)}, "export": {"streaming": streaming, "parity": parity},
                                  "quantize": {"scheme": "none", "variants": VARIANTS}})


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    import llmship.export.streaming as streaming_module
    from llmship.pipeline import run_stage
    from llmship.quantize.w8a8_dynamic import W8A8Dynamic

    folders = {}
    # chunks of 200 checkpoint rows (embedding rows, MatMul output columns): the chunked path runs here on every
    # weight of 100 KB and more (a 7B's on every weight of 64 MB and more)
    chunk, streaming_module.CHUNK_BYTES = streaming_module.CHUNK_BYTES, 200 * 128 * 4
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    claim = W8A8Dynamic.columnwise
    W8A8Dynamic.columnwise = lambda self: True
    try:
        for streaming in (False, True):
            out = tmp_path_factory.mktemp("stream" if streaming else "whole")
            (out / f".skeleton.tmp-{dead.pid}").mkdir()  # what a killed streaming compile leaves
            run_stage("compile", _config(out, streaming), quiet=True)
            folders[streaming] = out
    finally:
        streaming_module.CHUNK_BYTES = chunk
        W8A8Dynamic.columnwise = claim
    return folders


def _logits(folder: Path) -> list[np.ndarray]:
    """Prefill logits of two prompts (one left-padded batch) and two decode steps on the graph's own cache."""
    from llmship.runtime.ort_engine import OrtEngine

    engine = OrtEngine(folder, threads=1)
    try:
        ids = np.array([[0, 0, 5, 17, 300, 42], [7, 8, 9, 10, 11, 12]], dtype=np.int64)
        mask = (np.arange(6)[None, :] >= np.array([[2], [0]])).astype(np.int64)
        logits, cache = engine.prefill(ids, mask)
        seen = [logits]
        for token in ([99, 100], [4, 2999]):
            step, cache = engine.decode(np.array(token, dtype=np.int64), cache)
            seen.append(step)
        return seen
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_streamed_variant_equals_whole_model_variant(both, name):
    whole, streamed = _logits(both[False] / name), _logits(both[True] / name)
    for a, b in zip(whole, streamed, strict=True):
        assert np.abs(a - b).max() <= 1e-6, name
    manifest = json.loads((both[True] / name / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and manifest["quantization"]["streamed"]
    assert manifest["timings"]["peak_rss_mb"] > 100
    assert (both[True] / name / "model.onnx.data").stat().st_size > 500_000
    if name != "fp32":
        whole_rows = json.loads((both[False] / name / "manifest.json").read_text())["quantization"]
        assert len(manifest["quantization"]["quantized"]) == len(whole_rows["quantized"])
        assert len(manifest["quantization"]["kept_float"]) == len(whole_rows["kept_float"])
        shapes = lambda rows: sorted((r.get("op", ""), r.get("shape") or []) for r in rows)  # noqa: E731
        assert shapes(manifest["quantization"]["quantized"]) == shapes(whole_rows["quantized"])  # whole, not chunks
        chunked = manifest["quantization"]["chunked"]
        assert chunked[TABLE] == 16  # 3000 rows: 100, then 14 x 200, then 100
        matmuls = [count for weight, count in chunked.items() if weight != TABLE]
        if name == "w4a16-hqq":
            assert not matmuls  # not column-wise (W4A16.columnwise): whole weights
        else:  # every MatMul weight of 100 KB and more, in chunks, or (not column-wise) whole after two
            assert len(matmuls) >= 12 and set(matmuls) == ({1} if name == "w8a8-tensor-weights" else {3, 16})


@pytest.mark.slow
def test_killed_runs_scratch_is_removed_and_the_reference_is_computed_once(both):
    """A dead compile's skeleton scratch is cleaned up; the layer-at-a-time reference's side of the parity check is
    computed once for the nine variants and stored for later runs."""
    assert not list(both[True].glob(".skeleton*"))
    assert len(list((both[True] / ".llmship" / "parity").glob("reference-*.npz"))) == 1
    assert len(list((both[True] / ".llmship" / "parity").glob("prompts-*.json"))) == 1
    timings = json.loads((both[True] / "w8a16" / "manifest.json").read_text())["timings"]
    assert timings["skeleton_peak_rss_mb"] > 100 and timings["parity_peak_rss_mb"] > 100 and timings["parity_s"] > 0
    computed = [name for name in NAMES
                if json.loads((both[True] / name / "manifest.json").read_text())["timings"]["parity_reference_s"] > 0]
    assert len(computed) == 1  # the first variant's check computed the reference's side, the others read it back


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fp32", "w8a8-dynamic", "w4a16-rtn", "w8a16-excl"])
def test_layer_at_a_time_parity_equals_the_whole_graph_run(both, name):
    """The streamed variants' parity ran ONNX a layer at a time (teacher-forced on the reference's tokens); the same
    check with the whole graph in one session, against the same stored reference, gives the same figures."""
    from llmship.export.parity import check_parity, load_trace
    from llmship.runtime.ort_engine import OrtEngine

    folder = both[True] / name
    recorded = json.loads((folder / "manifest.json").read_text())["parity"]
    assert recorded["candidate"]["layer_at_a_time"] == 4  # one segment per decoder layer of the embedded model
    assert recorded["greedy_raw_run"] == "teacher-forced, each prompt alone"
    assert recorded["prompt_source"]["source"] == "model"  # sampled from the layer-at-a-time reference, kept
    kept = both[True] / ".llmship" / "parity"
    trace = load_trace(next(kept.glob("reference-*.npz")))
    prompts = json.loads(next(kept.glob("prompts-*.json")).read_text())["prompts"]
    assert [len(p) for p in prompts] == [48, 43, 38, 33]
    whole = OrtEngine(folder)
    try:
        figures = check_parity(None, whole, _tolerances(recorded), prompts, trace=trace)
    finally:
        whole.close()
    assert figures["greedy_raw_run"] == "free-running batch" and "layer_at_a_time" not in figures["candidate"]
    for key in ("max_logits_diff", "prefill_max_diff", "decode_max_diff", "batch_max_diff", "nll_candidate",
                "logit_noise"):
        assert figures[key] == pytest.approx(recorded[key], rel=1e-5, abs=1e-7), key
    for key in ("top1_agreement", "greedy_match", "greedy_raw_match", "greedy_matched_tokens"):
        assert figures[key] == recorded[key], key
    assert recorded["max_logits_diff"] > 0  # a real comparison: the ONNX side differs from PyTorch by rounding


def _tolerances(recorded: dict):
    from llmship.sections import ParityConfig

    return ParityConfig.model_validate(recorded["tolerances"])


def test_a_variant_is_cut_into_one_segment_per_layer(tmp_path):
    """Each segment of a streamed graph holds one decoder layer's weights (the first also the embedding, the last
    also the final norm and lm_head), reads only what earlier segments made, and makes its layer's KV cache."""
    import onnx

    from llmship.pipeline import run_stage
    from llmship.runtime.segmented import cut_graph, layer_mark

    cfg = Config.model_validate({"output": {"dir": str(tmp_path)}, "export": {"streaming": True},
                                 "quantize": {"scheme": "none", "variants": [{"scheme": "w8a8-dynamic"}]}})
    run_stage("compile", cfg, quiet=True)
    graph = onnx.load(str(tmp_path / "w8a8-dynamic" / "model.onnx"), load_external_data=False).graph
    segments = cut_graph(graph)
    assert len(segments) == 4
    for layer, segment in enumerate(segments):
        marked = {layer_mark(name) for name in segment.initializers} - {-1}
        assert marked <= {layer}, (layer, marked)
        assert f"present.{layer}.key" in segment.outputs and f"past_key_values.{layer}.value" in segment.inputs
    assert "model.model.embed_tokens.weight_Q8B128" in segments[0].initializers
    assert "logits" in segments[-1].outputs and "model.model.norm.weight" in segments[-1].initializers
    assert sum(len(s.nodes) for s in segments) == len(graph.node)


def test_layer_at_a_time_runs_a_right_padded_gqa_graph(tmp_path):
    """A GroupQueryAttention graph takes right-padded prompts: the layer-at-a-time runs pad as the engine does, and
    give the whole graph's logits for prompts of different lengths, alone, fed tokens, and batched."""
    from llmship.pipeline import run_stage
    from llmship.runtime.ort_engine import OrtEngine
    from llmship.runtime.segmented import SegmentedOrtEngine

    cfg = Config.model_validate({"output": {"dir": str(tmp_path)},
                                 "export": {"streaming": True, "attention": "gqa", "parity": {"layer_at_a_time": "always"}},
                                 "quantize": {"scheme": "none", "variants": [{"scheme": "w4a16", "method": "rtn"}]}})
    run_stage("compile", cfg, quiet=True)
    folder = tmp_path / "w4a16-rtn"
    assert json.loads((folder / "manifest.json").read_text())["parity"]["passed"]
    prompts, fed = [[1, 5, 9, 33, 200, 17, 8], [1, 44, 90], [1, 7, 120, 300, 11]], [[10, 11, 12], [5, 6, 7], [3, 4, 2]]
    whole, layered = OrtEngine(folder, threads=1), SegmentedOrtEngine(folder, threads=1)
    assert whole.padding == layered.padding == "right"
    (solo_a, batch_a), (solo_b, batch_b) = whole.forced_runs(prompts, fed), layered.forced_runs(prompts, fed)
    for (prefill_a, steps_a), (prefill_b, steps_b) in zip(solo_a, solo_b, strict=True):
        assert prefill_a.shape == prefill_b.shape and steps_a.shape == steps_b.shape == (3, prefill_a.shape[-1])
        assert np.abs(prefill_a - prefill_b).max() <= 1e-5 and np.abs(steps_a - steps_b).max() <= 1e-5
    for a, b in zip(batch_a, batch_b, strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5
    with pytest.raises(NotImplementedError):
        layered.generate(prompts, 2)


def test_a_graph_that_cannot_be_cut_is_one_line_naming_it(tmp_path):
    """Layer 0's present made in the last layer's segment, after its past is read (no order of the forwards works):
    a UserError naming the graph and the setting that avoids the cut, not a traceback."""
    import onnx
    from onnx import helper

    from llmship.runtime.segmented import SegmentedOrtEngine

    cfg = Config.model_validate({"output": {"dir": str(tmp_path)}, "export": {"streaming": True},
                                 "quantize": {"scheme": "none", "variants": []}})
    from llmship.pipeline import run_stage

    run_stage("compile", cfg, quiet=True)
    folder = tmp_path / "fp32"
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    maker = next(n for n in model.graph.node if "present.0.key" in n.output)
    maker.output[list(maker.output).index("present.0.key")] = "present_0_key_inner"
    model.graph.node.append(helper.make_node("Identity", ["present_0_key_inner"], ["present.0.key"], name="late__L3"))
    onnx.save(model, str(folder / "model.onnx"))
    with pytest.raises(UserError, match="layer_at_a_time: never") as caught:
        SegmentedOrtEngine(folder)
    assert caught.value.where == str(folder / "model.onnx")


@pytest.mark.slow
def test_streamed_variants_are_cached_and_the_eval_side_reads_them(both):
    from llmship.pipeline import compiled_variants, run_stage

    cfg = _config(both[True], True)
    before = (both[True] / "w8a16" / "model.onnx").stat().st_mtime_ns
    run_stage("compile", cfg, quiet=True)
    assert (both[True] / "w8a16" / "model.onnx").stat().st_mtime_ns == before
    assert set(compiled_variants(cfg, both[True])) == set(NAMES)


# gptq, static W8A8 and fp16's scan stream, one decoder layer at a time (tests/export/test_streaming_calibrated.py);
# fp16 without its scan has no run to type and scan its segments
@pytest.mark.parametrize("variant", [{"scheme": "w4a16", "method": "awq"}, {"scheme": "w4a16", "auto": {}},
                                     {"scheme": "fp16", "options": {"overflow_scan": False}},
                                     {"scheme": "fp16", "options": {"keep_io_types": False}}])
def test_calibrated_scheme_is_refused_before_any_work(tmp_path, variant):
    from llmship.pipeline import run_stage

    cfg = Config.model_validate({"output": {"dir": str(tmp_path)}, "export": {"streaming": True}, "quantize": variant})
    with pytest.raises(UserError, match="cannot stream") as info:
        run_stage("compile", cfg, quiet=True)
    assert info.value.where == "quantize.scheme"
    assert not any(p.name.startswith("w4a16") for p in tmp_path.iterdir())


DEPTH_CHILD = """
import json, sys
from pathlib import Path
from llmship.config import Config
from llmship.export.streaming import compile_streaming
model, out = sys.argv[1], Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
cfg = Config.model_validate({"model": {"path": model}, "export": {"streaming": True}, "output": {"dir": str(out)},
                             "quantize": {"scheme": "w8a16"}})
folder = next(iter(compile_streaming(cfg, out, parity=False).values()))
print(json.dumps(json.loads((folder / "manifest.json").read_text())["timings"]))
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_depth(tmp_path):
    """Peak RSS (process tree) at 10 layers minus at 2 layers < 0.3 bytes per added fp32 weight byte (the
    whole-model path costs about 2.5)."""
    from test_streaming_inputs import CONFIG, random_state, write_sharded

    peaks, weights = {}, {}
    for layers in (2, 10):
        config = dict(CONFIG, hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8,
                      num_hidden_layers=layers)
        state = random_state(config)
        weights[layers] = 4 * sum(v.numel() for v in state.values())
        folder = write_sharded(tmp_path / f"l{layers}", state, config)
        del state
        run = subprocess.run([sys.executable, "-c", DEPTH_CHILD, str(folder), str(tmp_path / f"out{layers}")],
                             capture_output=True, text=True, cwd=ROOT, timeout=900)
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[layers] = json.loads(run.stdout.strip().splitlines()[-1])["peak_rss_mb"] * 2**20
    added = weights[10] - weights[2]
    assert added > 90e6
    assert (peaks[10] - peaks[2]) / added < 0.3, (peaks, weights)


@pytest.mark.slow
def test_skeleton_replicates_the_fused_layer():
    """The one-layer skeleton replicated to four layers has the whole export's fused ops, four times over."""
    import collections
    import tempfile

    from llmship.export.skeleton import build_skeleton, build_skeleton_isolated

    config = json.loads((EMBEDDED_MODEL_DIR / "config.json").read_text())
    with tempfile.TemporaryDirectory() as scratch:
        skeleton = build_skeleton(config, Path(scratch), opset=18, attention="mha")
    with tempfile.TemporaryDirectory() as scratch:  # what a 7B's takes: the same skeleton, built in a child process
        isolated = build_skeleton_isolated(config, Path(scratch), opset=18, attention="mha", child=True)
    assert isolated.model.SerializeToString() == skeleton.model.SerializeToString()
    assert isolated.specs == skeleton.specs and isolated.fusion == skeleton.fusion
    ops = collections.Counter(n.op_type for n in skeleton.model.graph.node)
    layers = config["num_hidden_layers"]
    assert ops["MultiHeadAttention"] == layers and ops["RotaryEmbedding"] == 2 * layers
    assert ops["SimplifiedLayerNormalization"] == 1 and ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    assert ops["MatMul"] == 5 * layers + 1  # packed qkv, o, gate, up, down per layer; lm_head
    sources = {s for spec in skeleton.specs.values() for s in spec.sources}
    assert len(sources) == 9 * layers + 3  # every checkpoint tensor is read by exactly the graph's placeholders


def test_layerwise_reference_agrees_with_the_whole_model():
    """The reference streamed variants are checked against (one decoder layer in memory at a time) computes what the
    whole PyTorch model computes: prefill, decode on its own cache, greedy tokens."""
    from llmship.config import ModelConfig, ParityConfig
    from llmship.export.checkpoint import open_checkpoint
    from llmship.export.layerwise import layerwise_engine
    from llmship.export.parity import batched_reference_trace, default_prompts, reference_trace
    from llmship.runtime import load_engine
    from llmship.runtime.base import left_pad
    from llmship.source import load_tokenizer

    config = json.loads((EMBEDDED_MODEL_DIR / "config.json").read_text())
    tokenizer = load_tokenizer(EMBEDDED_MODEL_DIR)
    layerwise = layerwise_engine(open_checkpoint(EMBEDDED_MODEL_DIR, config), config, tokenizer, model_dir=EMBEDDED_MODEL_DIR)
    head = layerwise.model.lm_head
    assert head.chunk_rows >= config["vocab_size"]  # 64 MB chunks: one here; make them 256 rows to run the chunked path
    head.chunk_rows = 256
    whole = load_engine(ModelConfig())
    prompts = default_prompts(tokenizer, whole.max_positions)
    ids, mask = left_pad(prompts, whole.pad_token_id)
    (a, cache_a), (b, cache_b) = whole.prefill(ids, mask), layerwise.prefill(ids, mask)
    assert np.abs(a - b).max() <= 1e-5
    token = a[:, -1].argmax(-1)
    assert np.abs(whole.decode(token, cache_a)[0] - layerwise.decode(token, cache_b)[0]).max() <= 1e-5
    assert whole.generate(prompts, 8, ignore_eos=True) == layerwise.generate(prompts, 8, ignore_eos=True)
    assert (layerwise.pad_token_id, layerwise.eos_token_id) == (whole.pad_token_id, whole.eos_token_id)
    assert all(p.device.type == "meta" for p in layerwise.model.model.layers.parameters())  # nothing kept between runs
    assert head.weight.is_meta and layerwise.model.model.embed_tokens.weight.is_meta  # the tables are read, not held

    # The parity check's reference side from one padded batch (33 passes over the checkpoint) against each prompt run
    # alone through the whole model: same greedy paths, logits within float rounding of padding, same NLL.
    parity = ParityConfig()
    alone, batched = reference_trace(whole, parity, prompts), batched_reference_trace(layerwise, parity, prompts)
    for field in ("prefill", "decode_logits", "path_logits"):
        for a, b in zip(getattr(alone, field), getattr(batched, field), strict=True):
            assert a.shape == b.shape and np.abs(a - b).max() <= 1e-4, field
    for field in ("decode_tokens", "path_tokens"):
        assert all(np.array_equal(a, b) for a, b in zip(getattr(alone, field), getattr(batched, field), strict=True))
    assert alone.greedy == batched.greedy and abs(alone.nll - batched.nll) <= 1e-6
