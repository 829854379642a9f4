"""Layer-wise calibration for the streaming compile: the calibration samples run through the model one decoder layer
at a time, as GPTQ's reference (`llama_sequential`) does, so a calibrated scheme never holds more than one layer.

The streamed graph (llmship.export.skeleton) is cut into segments of one decoder layer
(llmship.runtime.segmented.cut_graph: the mask and rotary go with the first layer, the final norm with the last), and
the two vocabulary tables into segments of their own (`calibration_segments`). For each segment in turn:
1. its float weights are read from the checkpoint into a graph of that segment alone;
2. the scheme calibrates and rewrites that graph (`Scheme.quantize_layer`) on the segment's inputs for every
   calibration batch: GPTQ Hessians, SmoothQuant maxima, static activation ranges, each computed by the same code
   as the whole-model path, on the same tensors;
3. the segment's outputs become the next segment's inputs (`LayerJob.carry`). GPTQ feeds the already-quantized
   outputs forward, as GPTQ's reference and llmship's whole-model path do (each layer's Hessians see, and
   compensate, the earlier layers' error); static W8A8 and SmoothQuant feed the float outputs, as ONNX Runtime's
   quantize_static and SmoothQuant's reference calibrate the float model;
4. the rewritten segment and the next segment's inputs are saved under output.dir/.llmship/layerwise/<key>/, so a
   killed run resumes at the first unfinished layer (the key covers the checkpoint, the variant and the samples).
Finally the saved segments are copied tensor by tensor into the variant's data file.

Memory: one segment's float weights and the scheme's working copies of them, one segment's inputs for every
calibration batch (16 x 256 tokens x 4096 x 4 B = 64 MB at 7B width; 1 GB for GPTQ's 128 x 512) and one Hessian.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from llmship.errors import UserError
from llmship.memory import PeakRss
from llmship.runtime.ort_engine import owned

log = logging.getLogger("llmship")

# Outputs of a segment that no later segment of a calibration run reads: each forward starts with an empty cache.
NOT_CARRIED = ("present.", "logits")
LAYER_FOLDER = "layer-{:04d}"
CARRY_FILE = "carry.npz"


@dataclass
class LayerJob:
    """One segment for `Scheme.quantize_layer`: its float graph, its inputs per calibration batch, and `carry`, which
    the scheme calls with the graph whose outputs feed the next segment (float or already quantized)."""

    model: onnx.ModelProto
    feeds: list[dict[str, np.ndarray]]
    position: int
    layers: int
    scratch: Path
    exclude: list[str]
    carry: Callable[[onnx.ModelProto], None]
    progress: Callable[[str], None] = field(default=lambda message: None)
    device: str | None = None  # torch device of GPTQ's arithmetic (None: numpy on the CPU)


def segment_graph(source: onnx.ModelProto, segment: Any, read_weight: Callable[[str], np.ndarray | None],
                  carried: dict[str, np.ndarray], where: str) -> onnx.ModelProto:
    """A model of one segment: its nodes, the source's constants and its float weights (`read_weight`, None for a
    constant) as initializers, the source's graph inputs it reads and the carried tensors (typed from a sample) as its
    inputs. The weights go into the model one at a time (helper.make_graph and make_model copy what they are given:
    three copies of a 1.3 GB 7B segment at once)."""
    graph_inputs = {v.name: v for v in source.graph.input}
    declared = []
    for name in segment.inputs:
        if name in graph_inputs:
            declared.append(graph_inputs[name])
        else:
            sample = carried[name]
            declared.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(sample.dtype),
                                                          [f"{name}_{axis}" for axis in range(sample.ndim)]))
    graph_outputs = {v.name: v for v in source.graph.output}
    outputs = [graph_outputs.get(name) or onnx.ValueInfoProto(name=name) for name in segment.outputs]
    graph = helper.make_graph(list(segment.nodes), "layer", declared, outputs)
    model = helper.make_model(graph, opset_imports=list(source.opset_import), ir_version=source.ir_version)
    del graph
    constants = {t.name: t for t in source.graph.initializer}
    for name in segment.initializers:
        value = read_weight(name)
        if value is None:
            model.graph.initializer.append(constants[name])
            continue
        check_finite({name: value}, "weights", where)
        model.graph.initializer.append(numpy_helper.from_array(value, name))
        del value
    model.graph.value_info.extend(_linear_types(segment.nodes, list(model.graph.initializer), {v.name for v in declared}))
    return model


def _linear_types(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], typed: set[str]) -> list[onnx.ValueInfoProto]:
    """The type of each linear layer's activation and output: ONNX Runtime's static quantizer skips a tensor whose
    type shape inference cannot find (it cannot see through the fused graph's contrib ops), and a MatMul's inputs and
    output all have its weight's type."""
    weight_types = {t.name: t.data_type for t in inits}
    found: dict[str, int] = {}
    for node in nodes:
        if node.op_type == "MatMul" and node.input[1] in weight_types:
            for name in (node.input[0], node.output[0]):
                if name not in typed:
                    found.setdefault(name, weight_types[node.input[1]])
    return [helper.make_tensor_value_info(name, elem, None) for name, elem in found.items()]


class LayerStore:
    """The finished segments of one layer-wise run: each segment's rewritten graph and the next segment's inputs,
    written atomically (a folder renamed into place), so a killed run resumes after the last complete one."""

    def __init__(self, root: Path):
        self.root = root

    def folder(self, position: int) -> Path:
        return self.root / LAYER_FOLDER.format(position)

    def finished(self, count: int) -> int:
        """How many leading segments are saved."""
        done = 0
        while done < count and (self.folder(done) / "report.json").is_file():
            done += 1
        return done

    def save(self, position: int, model: onnx.ModelProto, report: dict[str, Any],
             carried: list[dict[str, np.ndarray]]) -> None:
        from llmship.quantize.graph import save_model

        final = self.folder(position)
        staging = final.with_name(final.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_model(model, staging, external_data="always")
        names = [[batch, name] for batch, values in enumerate(carried) for name in values]
        np.savez(staging / CARRY_FILE, *[carried[b][n] for b, n in names])
        (staging / "carry.json").write_text(json.dumps(names), encoding="utf-8")
        (staging / "report.json").write_text(json.dumps(report), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        if position:  # only the last segment's outputs are read again
            (self.folder(position - 1) / CARRY_FILE).unlink(missing_ok=True)

    def carried(self, position: int, batches: int) -> list[dict[str, np.ndarray]]:
        folder = self.folder(position)
        names = json.loads((folder / "carry.json").read_text(encoding="utf-8"))
        values: list[dict[str, np.ndarray]] = [{} for _ in range(batches)]
        with np.load(folder / CARRY_FILE) as stored:
            for index, (batch, name) in enumerate(names):
                values[batch][name] = stored[f"arr_{index}"]
        return values

    def report(self, position: int) -> dict[str, Any]:
        return json.loads((self.folder(position) / "report.json").read_text(encoding="utf-8"))

    def model(self, position: int) -> onnx.ModelProto:
        from llmship.files import MODEL_FILE

        return onnx.load(str(self.folder(position) / MODEL_FILE), load_external_data=True)


def check_finite(arrays: dict[str, np.ndarray], what: str, where: str) -> None:
    for name, value in arrays.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise UserError(f"{what}: {name} holds NaN or inf values (a broken checkpoint?)", where=where)


def calibration_segments(graph: onnx.GraphProto) -> tuple[list[Any], list[str]]:
    """The graph's decoder-layer segments (llmship.runtime.segmented.cut_graph) with the vocabulary tables in segments
    of their own: the embedding's Gather before the first layer, lm_head and what follows it after the last. A table
    is as large as a layer at 7B (0.5 GB; 0.8 GB at vocab 49953), and calibration holds a segment's weights twice (the
    graph and its session). Returns the segments and a label for each ("embedding", "decoder layer 3", "lm_head")."""
    from llmship.quantize.weight_only import layer_of
    from llmship.runtime.segmented import cut_graph, layer_mark, segments_of

    groups = [list(s.nodes) for s in cut_graph(graph)]
    inits = {t.name: t for t in graph.initializer}
    tables = [n for n in groups[0] if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]
    head = next((n for n in groups[-1] if n.op_type == "MatMul" and layer_of(n) == "lm_head"), None)
    after: list[Any] = []
    if head is not None:
        made = set(head.output)
        for node in groups[-1][groups[-1].index(head):]:
            if node is head or made & set(node.input):
                after.append(node)
                made.update(node.output)
    ids = {id(n) for n in tables + after}
    middle = [[n for n in nodes if id(n) not in ids] for nodes in groups]
    grouped = ([tables] if tables else []) + [nodes for nodes in middle if nodes] + ([after] if after else [])
    labels = (["embedding"] if tables else []) + [
        f"decoder layer {max(layer_mark(name) for n in nodes for name in (n.name, *n.input, *n.output))}"
        for nodes in middle if nodes] + (["lm_head"] if after else [])
    return segments_of(graph, grouped), labels


class LayerwiseCalibration:
    """The segment loop (module doc) of one variant: `run` leaves every segment rewritten in `store`."""

    def __init__(self, source: onnx.ModelProto, read_weight: Callable[[str], np.ndarray | None], scheme: Any,
                 feeds: list[dict[str, np.ndarray]], store: LayerStore, *, exclude: list[str], scratch: Path,
                 checkpoint_name: str, progress: Callable[[str], None], device: str | None = None,
                 release_memory: Callable[[], None] = lambda: None):
        self.source, self.read_weight, self.scheme, self.feeds = source, read_weight, scheme, feeds
        self.store, self.exclude, self.scratch = store, exclude, scratch
        self.checkpoint_name, self.progress, self.device = checkpoint_name, progress, device
        self.release_memory = release_memory  # called after each segment (the streaming writer's malloc_trim)
        self.segments, self.labels = calibration_segments(source.graph)
        self.resumed_at = 0
        self.seconds: list[float] = []
        self.peaks_mb: list[float] = []  # resident memory (process tree) at its peak in each segment that ran

    def run(self) -> None:
        count = len(self.segments)
        start = self.store.finished(count)
        carried: list[dict[str, np.ndarray]] = [{} for _ in self.feeds]
        if start:
            log.info("layer-wise calibration: resuming at segment %d of %d (%s)", start, count, self.store.root)
            self.resumed_at = start
            if start < count:
                carried = self.store.carried(start - 1, len(self.feeds))
        for position in range(start, count):
            began = time.perf_counter()
            self.progress(f"segment {position + 1}/{count} ({self.labels[position]}): calibrating on "
                          f"{len(self.feeds)} batch(es)")
            with PeakRss() as rss:
                carried = self._one(position, carried)
            self.seconds.append(round(time.perf_counter() - began, 2))
            self.peaks_mb.append(rss.peak_mb)

    def _one(self, position: int, carried: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        segment = self.segments[position]
        label = self.labels[position]
        where = f"{self.checkpoint_name} ({label})"
        model = segment_graph(self.source, segment, self.read_weight, carried[0] if carried else {}, where)
        feeds = [{name: (batch[name] if name in batch else carry[name]) for name in segment.inputs}
                 for batch, carry in zip(self.feeds, carried, strict=True)]
        outputs: list[dict[str, np.ndarray]] = []
        wanted = [o for o in segment.outputs if not o.startswith(NOT_CARRIED)]
        # the last segment carries nothing: its outputs (the logits) are computed only to be checked
        checked = wanted or [o for o in segment.outputs if not o.startswith("present.")]

        def carry(graph: onnx.ModelProto) -> None:
            outputs.clear()
            session = _session(graph, self.scratch, self.device)
            for feed in feeds:
                values = dict(zip(checked, session.run(checked, feed), strict=True))
                check_finite(values, f"activations after {label}", where)
                outputs.append({name: owned(values[name]) for name in wanted})  # the session's arena goes with it
                del values

        job = LayerJob(model=model, feeds=feeds, position=position, layers=len(self.segments), scratch=self.scratch,
                       exclude=self.exclude, carry=carry, progress=self.progress, device=self.device)
        rewritten, report = self.scheme.quantize_layer(job)
        if len(outputs) != len(feeds):
            raise RuntimeError(f"{self.scheme.name}.quantize_layer did not carry segment {position}'s outputs")
        # what later segments read: this one's outputs, and earlier ones' they read too (the rotary tables, the mask)
        later = {name for seg in self.segments[position + 1:] for name in seg.inputs}
        kept = [{**{n: v for n, v in before.items() if n in later}, **after}
                for before, after in zip(carried, outputs, strict=True)]
        self.store.save(position, rewritten, report, kept)
        del model, rewritten
        self.release_memory()
        return kept


def _session(model: onnx.ModelProto, scratch: Path, device: str | None) -> Any:
    from llmship.quantize.feeds import probe_session

    return probe_session(model, [], scratch, exact=False, provider="cuda" if device == "cuda" else "cpu")
