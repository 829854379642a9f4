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
    return Config.model_validate({"output": {"dir": str(out)}, "export": {"streaming": streaming},
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
    timings = json.loads((both[True] / "w8a16" / "manifest.json").read_text())["timings"]
    assert timings["skeleton_peak_rss_mb"] > 100 and timings["parity_peak_rss_mb"] > 100 and timings["parity_s"] > 0


@pytest.mark.slow
def test_streamed_variants_are_cached_and_the_eval_side_reads_them(both):
    from llmship.pipeline import compiled_variants, run_stage

    cfg = _config(both[True], True)
    before = (both[True] / "w8a16" / "model.onnx").stat().st_mtime_ns
    run_stage("compile", cfg, quiet=True)
    assert (both[True] / "w8a16" / "model.onnx").stat().st_mtime_ns == before
    assert set(compiled_variants(cfg, both[True])) == set(NAMES)


@pytest.mark.parametrize("variant", [{"scheme": "w4a16", "method": "gptq"}, {"scheme": "w4a16", "method": "awq"},
                                     {"scheme": "w4a16", "auto": {}}, {"scheme": "w8a8-static"}])
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
