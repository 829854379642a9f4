"""Calibrated schemes in the streaming compile: GPTQ, static W8A8 and SmoothQuant one decoder layer at a time
(llmship.quantize.layerwise).

The key property: on the embedded model, the layer-wise run gives the same variant weights and scales as today's
whole-model path (GPTQ bit for bit; static ranges and SmoothQuant scales to float rounding). Then: a killed run resumes
at its last finished layer, bad inputs are one line each, and memory does not grow with depth.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from testkit import ROOT, run_cli

from llmship.config import EMBEDDED_MODEL_DIR, Config

pytestmark = pytest.mark.skipif(not (EMBEDDED_MODEL_DIR / "config.json").is_file(), reason="embedded model not built")

VARIANTS = [
    {"scheme": "w4a16", "method": "gptq"},
    # GPTQ's options that change its steps inside a layer: one step per input tensor, columns by Hessian diagonal
    {"scheme": "w4a16", "method": "gptq", "name": "gptq-ts", "options": {"true_sequential": True, "actorder": True}},
    {"scheme": "w8a8-static", "method": "minmax", "name": "static-sq", "options": {"smoothquant": True}},
    # a histogram calibrator, and the head's own rewrite in the last segment
    {"scheme": "w8a8-static", "method": "percentile", "name": "static-pct", "options": {"head": "weight_only"}},
]
NAMES = ["w4a16-gptq", "gptq-ts", "static-sq", "static-pct"]
CALIBRATION = {"seq_len": 256, "sources": [{"kind": "c4", "path": "@embedded", "samples": 16},
                                           {"kind": "ceval", "path": "@embedded", "samples": 8}]}


def _config(out: Path, streaming: bool, variants=VARIANTS, model: str | None = None) -> Config:
    settings = {"output": {"dir": str(out)}, "export": {"streaming": streaming}, "calibration": CALIBRATION,
                "quantize": {"scheme": "none", "variants": variants}}
    if model:
        settings["model"] = {"path": model}
    return Config.model_validate(settings)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    from llmship.pipeline import run_stage

    folders = {}
    for streaming in (False, True):
        out = tmp_path_factory.mktemp("layerwise" if streaming else "whole")
        run_stage("compile", _config(out, streaming), quiet=True)
        folders[streaming] = out
    return folders


def _weights(folder: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, dict]]:
    """The graph, its tensors, and its quantized linears by module path (node and weight names differ between the
    whole export and the streamed graph)."""
    model = onnx.load(str(folder / "model.onnx"), load_external_data=True)
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    rows = json.loads((folder / "manifest.json").read_text())["quantization"]["quantized"]
    return model, tensors, {r["name"].split(" (")[0]: r for r in rows if r.get("op") == "MatMul"}


def _dequantize_input(model: onnx.ModelProto, tensors: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, integer values) of the DequantizeLinear that makes `name`."""
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == name)
    return tensors[node.input[1]], tensors.get(node.input[0])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["w4a16-gptq", "gptq-ts"])
def test_layerwise_gptq_equals_the_whole_model_path(both, name):
    (_, whole, whole_rows), (_, layered, layered_rows) = _weights(both[False] / name), _weights(both[True] / name)
    assert set(whole_rows) == set(layered_rows) and len(whole_rows) == 21
    for module, row in whole_rows.items():
        mine = layered_rows[module]["weight"]
        for suffix in ("_Q4G128", "_Q4G128_scales", "_Q4G128_zero_points"):
            assert np.array_equal(whole[row["weight"] + suffix], layered[mine + suffix]), (module, suffix)
    manifest = json.loads((both[True] / name / "manifest.json").read_text())
    layerwise = manifest["quantization"]["layerwise"]
    # the embedding, four decoder layers, lm_head
    assert layerwise["segments"] == 6 and layerwise["carried"] == "quantized" and layerwise["resumed_at"] == 0
    assert manifest["parity"]["passed"] and manifest["calibration"]["samples"] == 24
    assert not (both[True] / ".llmship" / "layerwise").exists() or not any((both[True] / ".llmship" / "layerwise").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["static-sq", "static-pct"])
def test_layerwise_static_ranges_and_smoothquant_equal_the_whole_model_path(both, name):
    (wm, whole, whole_rows), (lm, layered, layered_rows) = _weights(both[False] / name), _weights(both[True] / name)
    assert set(whole_rows) == set(layered_rows) and len(whole_rows) == 21
    nodes = {id(m): {n.name: n for n in m.graph.node} for m in (wm, lm)}
    static = 0
    for module, row in whole_rows.items():
        if row["as"].startswith("MatMulNBits"):  # the head, int8 weights only
            assert layered_rows[module]["as"] == row["as"]
            continue
        a, b = nodes[id(wm)][row["node"]], nodes[id(lm)][layered_rows[module]["node"]]
        static += 1
        (wa, qa), (wb, qb) = _dequantize_input(wm, whole, a.input[1]), _dequantize_input(lm, layered, b.input[1])
        assert np.allclose(wa, wb, rtol=1e-5, atol=0) and (qa != qb).mean() < 1e-4, module  # weights (smoothed)
        (aa, _), (ab, _) = _dequantize_input(wm, whole, a.input[0]), _dequantize_input(lm, layered, b.input[0])
        assert abs(float(aa) - float(ab)) <= 1e-5 * abs(float(aa)), module  # the activation's calibrated range
    assert static == (21 if name == "static-sq" else 20)
    manifest = json.loads((both[True] / name / "manifest.json").read_text())
    assert manifest["quantization"]["layerwise"]["carried"] == "float" and manifest["parity"]["passed"]
    if name == "static-sq":
        whole_sq = json.loads((both[False] / name / "manifest.json").read_text())["quantization"]["smoothquant"]
        layered_sq = manifest["quantization"]["smoothquant"]
        assert layered_sq["groups"] == whole_sq["groups"] == 8
        for x, y in zip(whole_sq["smoothed"], layered_sq["smoothed"], strict=True):
            assert x["act_max"] == pytest.approx(y["act_max"], rel=1e-5)
            assert x["scale_max"] == pytest.approx(y["scale_max"], rel=1e-5)


KILLED_CHILD = """
import os, sys
from pathlib import Path
sys.path[:0] = [sys.argv[3], str(Path(sys.argv[3]).parent)]  # this folder, and tests/ (testkit)
import test_streaming_calibrated as t
from llmship.quantize.layerwise import LayerStore
from llmship.pipeline import run_stage
save = LayerStore.save
def save_then_die(self, position, *args):
    save(self, position, *args)
    if position == 1:
        os._exit(9)  # killed after two finished segments (the embedding, the first layer)
LayerStore.save = save_then_die
run_stage("compile", t._config(Path(sys.argv[1]), True, [t.VARIANTS[int(sys.argv[2])]]), quiet=True)
"""


@pytest.mark.slow
def test_a_killed_run_resumes_at_its_last_finished_layer(both, tmp_path):
    from llmship.pipeline import run_stage

    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(out), "0", str(Path(__file__).parent)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert killed.returncode == 9, killed.stderr[-2000:]
    stores = list((out / ".llmship" / "layerwise").iterdir())
    assert len(stores) == 1 and sorted(p.name for p in stores[0].iterdir()) == ["layer-0000", "layer-0001"]
    assert not (out / "w4a16-gptq").exists()
    run_stage("compile", _config(out, True, [VARIANTS[0]]), quiet=True)
    manifest = json.loads((out / "w4a16-gptq" / "manifest.json").read_text())
    assert manifest["quantization"]["layerwise"]["resumed_at"] == 2
    assert len(manifest["quantization"]["layerwise"]["segment_s"]) == 4  # only the four unfinished segments ran
    assert len(manifest["quantization"]["layerwise"]["segment_peak_rss_mb"]) == 4
    assert min(manifest["quantization"]["layerwise"]["segment_peak_rss_mb"]) > 100
    assert not stores[0].exists()
    _, resumed, rows = _weights(out / "w4a16-gptq")
    _, straight, straight_rows = _weights(both[True] / "w4a16-gptq")
    for module, row in rows.items():
        assert np.array_equal(resumed[row["weight"] + "_Q4G128"], straight[straight_rows[module]["weight"] + "_Q4G128"])


@pytest.mark.parametrize("streaming", [True, False])
def test_a_calibration_set_shorter_than_seq_len_is_one_line(tmp_path, streaming):
    """GPTQ packs its samples into rows of the longest one's length: with no sample of seq_len tokens it would
    calibrate on short contexts only. fp16's scan runs each sample alone, so the same set serves it."""
    config = tmp_path / "c.yaml"
    settings = {"export": {"streaming": streaming}, "output": {"dir": str(tmp_path / "out")},
                "calibration": {"seq_len": 256, "sources": [{"kind": "ceval", "samples": 8}]},
                "quantize": {"scheme": "w4a16", "method": "gptq"}}
    config.write_text(json.dumps(settings))
    result = run_cli("compile", config)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "calibration.sources" in lines[0] and "shorter than calibration.seq_len=256" in lines[0]
    assert not (tmp_path / "out" / "w4a16-gptq").exists()
    if streaming:
        config.write_text(json.dumps({**settings, "quantize": {"scheme": "fp16"}}))
        result = run_cli("compile", config)
        assert result.returncode == 0, result.stderr[-2000:]
        manifest = json.loads((tmp_path / "out" / "fp16" / "manifest.json").read_text())
        assert manifest["quantization"]["scan_samples"] == 8 and manifest["parity"]["passed"]


def _overflowing_model(folder: Path) -> Path:
    """The embedded model with layer 1's down_proj x 1e4: the residual stream from layer 1 on holds values near 2.6e5,
    past fp16's 65504 (finite in fp32), as the outlier features of large models can."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(EMBEDDED_MODEL_DIR, folder)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    state["model.layers.1.mlp.down_proj.weight"] *= 1e4
    save_file(state, str(weights), metadata={"format": "pt"})
    return folder


@pytest.mark.slow
def test_layerwise_fp16_scan_keeps_what_the_whole_model_scan_keeps(tmp_path):
    """fp16's overflow scan, one decoder layer at a time, keeps the same nodes fp32, for the same reasons, as the scan
    of the whole model: the overflowing down_proj, and in every later layer the norms that read the residual stream
    (segment inputs: the scan reads their range from the carried activations). Both variants pass parity with the same
    figures, and the streamed one's weights are fp16."""
    from llmship.pipeline import run_stage

    model = _overflowing_model(tmp_path / "model")
    calibration = {"seq_len": 256, "sources": [{"kind": "c4", "path": "@embedded", "samples": 16}]}
    manifests = {}
    for streaming in (False, True):
        out = tmp_path / ("layerwise" if streaming else "whole")
        # the streamed variant's parity runs it a layer at a time, as for a 7B one: the converted graph must cut
        # into layers (the whole export's graph has no such cut; its check runs the whole graph)
        export = {"streaming": streaming, "parity": {"layer_at_a_time": "always" if streaming else "auto"}}
        cfg = Config.model_validate({"model": {"path": str(model)}, "output": {"dir": str(out)}, "calibration": calibration,
                                     "export": export, "quantize": {"scheme": "fp16"}})
        run_stage("compile", cfg, quiet=True)
        manifests[streaming] = json.loads((out / "fp16" / "manifest.json").read_text())
    kept = {streaming: {(row["module"], row["reason"]): row.get("max_abs") for row in m["quantization"]["kept_fp32"]}
            for streaming, m in manifests.items()}
    assert set(kept[True]) == set(kept[False]) and len(kept[True]) == 6
    assert ("model.layers.2.input_layernorm", "activation leaves the fp16 range") in kept[True]
    for key, peak in kept[False].items():
        assert kept[True][key] == pytest.approx(peak, rel=1e-4) and peak > 65504
    whole, layered = manifests[False]["parity"], manifests[True]["parity"]
    assert whole["passed"] and layered["passed"]
    assert layered["candidate"]["layer_at_a_time"] == 4 and "layer_at_a_time" not in whole["candidate"]
    for figure in ("max_logits_diff", "nll_increase", "top1_agreement", "greedy_match"):
        assert layered[figure] == pytest.approx(whole[figure], rel=1e-4, abs=1e-6), figure
    assert manifests[True]["quantization"]["layerwise"]["segments"] == 6
    graph = onnx.load(str(tmp_path / "layerwise" / "fp16" / "model.onnx"), load_external_data=False).graph
    weights = [t for t in graph.initializer if len(t.dims) == 2 and min(t.dims) >= 64]
    kept_fp32 = [t.name for t in weights if t.data_type == onnx.TensorProto.FLOAT]
    assert len(weights) > 20 and len(kept_fp32) == 1  # the kept down_proj's own weight
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights if t.name not in kept_fp32)


@pytest.mark.parametrize("broken", ["nan", "overflow"])
def test_a_broken_checkpoint_names_the_layer_and_the_source(tmp_path, broken):
    import torch
    from test_streaming_inputs import CONFIG, random_state, write_sharded

    config = dict(CONFIG, max_position_embeddings=512)
    state = random_state(config)
    weight = "model.layers.1.mlp.down_proj.weight"
    if broken == "nan":
        state[weight][0, 0] = float("nan")
    else:  # finite weights whose products overflow fp32: the activations after the layer are inf
        state[weight] = torch.full_like(state[weight], 3e38)
    model = write_sharded(tmp_path / "broken", state, config)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"model": {"path": str(model)}, "export": {"streaming": True},
                                  "output": {"dir": str(tmp_path / "out")}, "calibration": CALIBRATION,
                                  "quantize": {"scheme": "w8a8-static"}}))
    result = run_cli("compile", config)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "decoder layer 1" in lines[0] and str(model) in lines[0], result.stderr[-2000:]
    assert ("weights" if broken == "nan" else "activations") in lines[0]


DEPTH_CHILD = """
import json, sys
from pathlib import Path
sys.path[:0] = [sys.argv[3], str(Path(sys.argv[3]).parent)]  # this folder, and tests/ (testkit)
import test_streaming_calibrated as t
from llmship.export.streaming import compile_streaming
model, out, variant = sys.argv[1], Path(sys.argv[2]), t.VARIANTS[int(sys.argv[4])]
out.mkdir(parents=True, exist_ok=True)
folders = compile_streaming(t._config(out, True, [variant], model=model), out, parity=False)
print(json.dumps({name: json.loads((f / "manifest.json").read_text())["timings"]["peak_rss_mb"]
                  for name, f in folders.items() if name != "fp32"}))
"""


DEEP = 12  # layers of the deep model of the depth test (against 2)


@pytest.mark.slow
def test_layerwise_peak_memory_does_not_grow_with_depth(tmp_path):
    """Peak RSS (process tree) of GPTQ and of static W8A8 with SmoothQuant, at 12 layers minus at 2 layers, < 0.3 bytes
    per added fp32 weight byte. (The per-segment peaks of static W8A8 scatter by about +-35 MB around a flat line
    with depth; the whole run's peak is their maximum, which at 8 layers against 2 crossed 0.3 once on 170 MB of
    added weights: 10 added layers, 283 MB, keep that scatter well under the bar.)"""
    from test_streaming_inputs import CONFIG, random_state, write_sharded

    peaks, weights = {}, {}
    for layers in (2, DEEP):
        config = dict(CONFIG, hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=12,
                      num_hidden_layers=layers, max_position_embeddings=512)
        state = random_state(config)
        weights[layers] = 4 * sum(v.numel() for v in state.values())
        folder = write_sharded(tmp_path / f"l{layers}", state, config)
        del state
        peaks[layers] = {}
        for variant in (0, 2):  # a fresh process each: the peak of one variant is not the heap another left behind
            run = subprocess.run([sys.executable, "-c", DEPTH_CHILD, str(folder), str(tmp_path / f"out{layers}"),
                                  str(Path(__file__).parent), str(variant)],
                                 capture_output=True, text=True, cwd=ROOT, timeout=900)
            assert run.returncode == 0, run.stderr[-2000:]
            peaks[layers].update(json.loads(run.stdout.strip().splitlines()[-1]))
    added = weights[DEEP] - weights[2]
    assert added > 250e6
    per_byte = {name: (peaks[DEEP][name] - peaks[2][name]) * 2**20 / added for name in ("w4a16-gptq", "static-sq")}
    print("peak RSS MB", peaks, "per added fp32 byte", per_byte)
    assert all(v < 0.3 for v in per_byte.values()), (per_byte, peaks, weights)
