"""Streaming compile: checkpoint tensors -> each variant's external-data file, one tensor at a time.

The graph comes from `llmship.export.skeleton` (the fused graph with empty weight placeholders). Each placeholder
is filled from the checkpoint (`llmship.export.checkpoint`) in graph order and written straight to
`model.onnx.data`. A weight read by a MatMul or Gather goes, for a quantized variant, through the scheme's own
`quantize` on a graph of that one node (same node name, module path and weight name, so exclusions and fine layers
match as in the whole graph): the replacement nodes and quantized tensors are exactly what the whole-graph rewrite
writes for that node, and nodes the rewrite shares between MatMuls (one activation quantization for gate and up)
are kept once. Peak memory is one tensor and its quantized form, whatever the depth of the model.

Streaming-capable schemes: `none` (fp32), `w8a16`, `w4a16` (rtn, hqq), `w8a8-dynamic` (every layout), and the
calibrated `w4a16` gptq, `w8a8-static` (any calibrator, with or without SmoothQuant) and `fp16` (its overflow scan),
which are calibrated and rewritten one decoder layer at a time (`write_calibrated_variant`, llmship.quantize.layerwise).
awq and `quantize.auto` need the whole model and are refused, and so is fp16 without its scan or with fp16 graph
inputs and outputs (its conversion is typed by the scan's run, and the segments join through the fp32 interface).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from llmship.errors import CheckFailed, UserError
from llmship.files import MODEL_DATA_FILE, MODEL_FILE
from llmship.memory import PeakRss, release_freed_memory

log = logging.getLogger("llmship")

# Tensors at least this large go to the external-data file (the whole-graph path uses the same threshold).
INLINE_LIMIT = 1024
# Offsets of external tensors are aligned (ORT maps the file; aligned starts avoid unaligned copies).
ALIGN = 64
# The skeleton's scratch folder in output.dir (named as atomic folders are, so a killed run's is cleaned up).
SKELETON_SCRATCH = ".skeleton"
# Output bytes per checkpoint parameter of each scheme, with headroom for scales and the graph; the disk check
# compares their sum with the free space before anything is written.
DISK_MARGIN = 1.05
# Weights larger than this many fp32 bytes go through the scheme in chunks of checkpoint rows, which are the output
# columns of a MatMul and the rows of an embedding table (see `_quantize_chunked`): at 7B the lm_head's whole-tensor
# arithmetic alone took the peak past 3 GB.
CHUNK_BYTES = 64 << 20


# --------------------------------------------------------------------------- writing
class DataWriter:
    """Appends tensors to `model.onnx.data` and points their TensorProto at the bytes written."""

    def __init__(self, folder: Path):
        self.path = folder / MODEL_DATA_FILE
        self.handle = self.path.open("wb")
        self.offset = 0

    def put(self, init: onnx.TensorProto, array: np.ndarray | None = None) -> int:
        """Write `array` (or `init`'s own raw data) and make `init` external; returns the bytes written."""
        data = memoryview(np.ascontiguousarray(array)).cast("B") if array is not None else memoryview(init.raw_data)
        pad = -self.offset % ALIGN
        if pad:
            self.handle.write(b"\0" * pad)
            self.offset += pad
        self.handle.write(data)
        init.ClearField("raw_data")
        del init.float_data[:]
        del init.external_data[:]
        init.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", MODEL_DATA_FILE), ("offset", str(self.offset)), ("length", str(len(data)))):
            init.external_data.add(key=key, value=value)
        self.offset += len(data)
        return len(data)

    def close(self) -> None:
        self.handle.close()


class Throughput:
    """Per-tensor progress: done/total tensors, MB/s read from the checkpoint, ETA."""

    def __init__(self, steps: Any, title: str, total_tensors: int, total_bytes: int):
        self.steps, self.title = steps, title
        self.total_tensors, self.total_bytes = total_tensors, total_bytes
        self.done_tensors = self.done_bytes = 0
        self.started = time.perf_counter()

    def __call__(self, name: str, nbytes: int) -> None:
        self.done_tensors += 1
        self.done_bytes += nbytes
        elapsed = max(time.perf_counter() - self.started, 1e-6)
        rate = self.done_bytes / elapsed
        eta = (self.total_bytes - self.done_bytes) / rate if rate else 0.0
        self.steps(f"{self.title}: tensor {self.done_tensors}/{self.total_tensors} {name} "
                   f"({rate / 2**20:.0f} MB/s fp32, ETA {eta:.0f} s)")

    @property
    def mb_per_s(self) -> float:
        return round(self.done_bytes / 2**20 / max(time.perf_counter() - self.started, 1e-6), 1)


def _write_single_node_model(node: onnx.NodeProto, weight_name: str, weight: np.ndarray, template: onnx.ModelProto,
                             folder: Path) -> None:
    """`folder/model.onnx`: a graph of `node` alone, its weight an initializer (what the scheme's rewrite needs to
    see), written straight to the external-data file (no serialized copy of the weight in memory)."""
    if node.op_type == "MatMul":
        data_in = helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, ["batch", "sequence", weight.shape[0]])
    else:  # Gather over the embedding table
        data_in = helper.make_tensor_value_info(node.input[1], onnx.TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    weight.tofile(folder / MODEL_DATA_FILE)
    init = onnx.TensorProto(name=weight_name, data_type=onnx.TensorProto.FLOAT, dims=weight.shape,
                            data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", MODEL_DATA_FILE), ("offset", "0"), ("length", str(weight.nbytes))):
        init.external_data.add(key=key, value=value)
    graph = helper.make_graph([node], "one_node", [data_in], [out], [init])
    model = helper.make_model(graph, opset_imports=list(template.opset_import), ir_version=template.ir_version)
    onnx.save(model, str(folder / MODEL_FILE))


def quantizable(node: onnx.NodeProto, weight: str) -> bool:
    return (node.op_type == "MatMul" and node.input[1] == weight) or (node.op_type == "Gather" and node.input[0] == weight)


def write_variant(skeleton: Any, checkpoint: Any, folder: Path, scheme: Any, exclude: list[str], steps: Any,
                  title: str) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Fill the skeleton's placeholders from the checkpoint into `folder/model.onnx(.data)`, quantizing each weight
    node with `scheme` (None = fp32). Returns (graph written, report)."""
    from llmship.quantize.registry import QuantizeJob

    source = skeleton.model
    specs = skeleton.specs
    writer = DataWriter(folder)
    progress = Throughput(steps, title, len(specs), sum(4 * int(np.prod(s.shape(checkpoint.shape))) for s in specs.values()))
    read = lambda name: checkpoint.tensor(name).numpy()  # noqa: E731
    inits = {i.name: i for i in source.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    produced: set[str] = set()
    extra_inits: dict[str, onnx.TensorProto] = {}
    opsets = {o.domain: o.version for o in source.opset_import}
    quantized_rows: list[dict] = []
    kept_rows: list[dict] = []
    written: set[str] = set()
    chunking: dict[str, int] = {}  # weight -> chunks it went through the scheme in (1: whole, the scheme's layout
    # is not column-wise)
    scratch = Path(tempfile.mkdtemp(prefix=".stream-", dir=folder))
    try:
        for node in source.graph.node:
            weights = [i for i in node.input if i in specs and i not in written]
            target = next((w for w in weights if quantizable(node, w)), None) if scheme is not None else None
            for name in weights:
                if name == target:
                    continue
                value = specs[name].build(read)
                placeholder = onnx.TensorProto()  # a copy: the skeleton serves every variant of the run
                placeholder.CopyFrom(inits[name])
                placeholder.dims[:] = value.shape  # the skeleton's vocabulary- and MLP-sized tensors are placeholders
                writer.put(placeholder, value.astype(np.float32, copy=False))
                extra_inits[name] = placeholder
                written.add(name)
                progress(name, value.nbytes)
                del value
                release_freed_memory()
            if target is None:
                nodes.append(node)
                produced.update(node.output)
                continue
            spec = specs[target]
            rows = checkpoint.shape(spec.sources[0])
            # embedding tables: every scheme's are blocks along each row, so rows are always independent
            columnwise = node.op_type == "Gather" or scheme.columnwise()
            if spec.chunk_axis is not None and columnwise and 4 * int(np.prod(rows)) > CHUNK_BYTES:
                result, report, nbytes = _quantize_chunked(scheme, node, target, spec, checkpoint, read, source,
                                                           scratch, exclude, QuantizeJob)
                chunking[target] = report.pop("chunks")
            else:
                result, report, nbytes = _quantize_one(scheme, node, target, lambda s=spec: s.build(read),
                                                       source, scratch, exclude, QuantizeJob)
            written.add(target)
            progress(target, nbytes)
            quantized_rows += report.get("quantized", [])
            kept_rows += report.get("kept_float", [])
            # Copies, not references: a kept sub-message keeps the whole one-node model's protobuf arena (its
            # quantized tensors included) alive, and memory would grow with every layer.
            for new in result.graph.node:
                if new.output and all(o in produced for o in new.output if o):
                    continue  # shared with an earlier node (e.g. the activation quantization of gate and up)
                nodes.append(_standalone(new, onnx.NodeProto))
                produced.update(new.output)
            for init in result.graph.initializer:
                if init.name in extra_inits or (init.name in inits and init.name not in specs):
                    continue  # written already, or one of the skeleton's constants
                _keep(init, writer, extra_inits)
            _merge_opsets(opsets, result)
            del result
            release_freed_memory()
    finally:
        writer.close()
        shutil.rmtree(scratch, ignore_errors=True)
    missing = set(specs) - written
    if missing:
        raise CheckFailed(f"streaming: weight {sorted(missing)[0]} was never written")
    model = _final_graph(source, specs, nodes, extra_inits, opsets, folder)
    report = {"streamed": True, "tensors": len(specs), "read_mb_s": progress.mb_per_s,
              "data_bytes": writer.offset}
    if scheme is not None:
        report.update({"quantized": quantized_rows, "kept_float": kept_rows, "chunked": chunking,
                       "summary": f"{len(quantized_rows)} weight(s) quantized while streaming, {len(kept_rows)} kept float"})
    return model, report


def _final_graph(source: onnx.ModelProto, specs: dict[str, Any], nodes: list[onnx.NodeProto],
                 written: dict[str, onnx.TensorProto], opsets: dict[str, int], folder: Path) -> onnx.ModelProto:
    """`folder/model.onnx`: the source's inputs and outputs, the rewritten nodes, the skeleton's constants and the
    written tensors they read (weights already in the data file)."""
    from llmship.quantize.graph import strip_metadata

    model = onnx.ModelProto()
    model.ir_version = source.ir_version
    model.producer_name = "llmship-streaming"
    model.graph.name = source.graph.name
    model.graph.input.extend(source.graph.input)
    model.graph.output.extend(source.graph.output)
    model.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    model.graph.initializer.extend([i for i in source.graph.initializer if i.name in used and i.name not in specs
                                    and i.name not in written])
    model.graph.initializer.extend([i for i in written.values() if i.name in used])
    for domain, version in opsets.items():
        model.opset_import.append(helper.make_opsetid(domain, version))
    strip_metadata(model)
    onnx.save(model, str(folder / MODEL_FILE))
    return model


def write_calibrated_variant(skeleton: Any, checkpoint: Any, folder: Path, scheme: Any, exclude: list[str], steps: Any,
                             title: str, *, samples: list[list[int]], store: Path, source_name: str,
                             device: str | None = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A calibrated variant (gptq, static W8A8) calibrated and rewritten one decoder layer at a time
    (llmship.quantize.layerwise), each rewritten layer kept in `store` until every layer is done, then copied into
    `folder/model.onnx(.data)` tensor by tensor."""
    from llmship.quantize.feeds import decoder_inputs
    from llmship.quantize.layerwise import LayerStore, LayerwiseCalibration

    specs = skeleton.specs
    read = lambda name: checkpoint.tensor(name).numpy()  # noqa: E731

    def read_weight(name: str) -> np.ndarray | None:
        return specs[name].build(read).astype(np.float32, copy=False) if name in specs else None

    feeds = scheme.layer_feeds(samples, decoder_inputs(skeleton.model, folder))
    scratch = Path(tempfile.mkdtemp(prefix=".stream-", dir=folder))
    started = time.perf_counter()
    try:
        run = LayerwiseCalibration(skeleton.model, read_weight, scheme, feeds, LayerStore(store), exclude=exclude,
                                   scratch=scratch, checkpoint_name=source_name, device=device,
                                   release_memory=release_freed_memory,
                                   progress=lambda message: steps(f"{title}: {message}"))
        run.run()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    calibrate_s = time.perf_counter() - started
    steps(f"{title}: writing the {len(run.segments)} calibrated segments into the variant")
    model, data_bytes = assemble_layers(skeleton.model, specs, run.store, len(run.segments), folder)
    report = scheme.finish_layers([run.store.report(k) for k in range(len(run.segments))], samples)
    report.update({"streamed": True, "tensors": len(specs), "data_bytes": data_bytes,
                   "layerwise": {"segments": len(run.segments), "batches": len(feeds), "resumed_at": run.resumed_at,
                                 "calibrate_s": round(calibrate_s, 2), "segment_s": run.seconds,
                                 "segment_peak_rss_mb": run.peaks_mb, "carried": scheme.layer_feeds_forward,
                                 "device": device or "cpu"}})
    return model, report


def assemble_layers(source: onnx.ModelProto, specs: dict[str, Any], store: Any, count: int,
                    folder: Path) -> tuple[onnx.ModelProto, int]:
    """The variant from the store's rewritten segments, one segment in memory at a time; returns (graph, data bytes).
    A tensor name two segments both hold must be one of the source's constants (the same tensor)."""
    writer = DataWriter(folder)
    nodes: list[onnx.NodeProto] = []
    written: dict[str, onnx.TensorProto] = {}
    constant_types = {t.name: t.data_type for t in source.graph.initializer if t.name not in specs}
    retyped: set[str] = set()
    opsets = {o.domain: o.version for o in source.opset_import}
    try:
        for position in range(count):
            part = store.model(position)
            retyped |= retype_constants(part, constant_types)
            nodes.extend(_standalone(node, onnx.NodeProto) for node in part.graph.node)
            for init in part.graph.initializer:
                if init.name in written or init.name in constant_types:
                    if init.name not in constant_types and init.name not in retyped:
                        raise CheckFailed(f"layer-wise calibration: segments {position} and an earlier one both "
                                          f"write tensor {init.name}")
                    continue
                _keep(init, writer, written)
            _merge_opsets(opsets, part)
            del part
            release_freed_memory()
    finally:
        writer.close()
    return _final_graph(source, specs, nodes, written, opsets, folder), writer.offset


def retype_constants(part: onnx.ModelProto, constant_types: dict[str, int]) -> set[str]:
    """Rename, in a rewritten segment, each of the source's constants it holds in another type (fp16 converts the
    rotary caches that every layer reads) to a name of that type, so segments that kept the source's type still read
    the source's tensor. Returns the new names (segments converting the same constant the same way share one)."""
    renames = {}
    for init in part.graph.initializer:
        if init.name in constant_types and init.data_type != constant_types[init.name]:
            renames[init.name] = f"{init.name}_{onnx.TensorProto.DataType.Name(init.data_type).lower()}"
            init.name = renames[init.name]
    if renames:
        for node in part.graph.node:
            node.input[:] = [renames.get(name, name) for name in node.input]
    return set(renames.values())


def _keep(init: onnx.TensorProto, writer: DataWriter, kept: dict[str, onnx.TensorProto]) -> None:
    """Keep a rewritten tensor for the final graph: its bytes in the data file unless it is small."""
    if len(init.raw_data) >= INLINE_LIMIT:
        writer.put(init)
    kept[init.name] = _standalone(init, onnx.TensorProto)


def _merge_opsets(opsets: dict[str, int], model: onnx.ModelProto) -> None:
    for opset in model.opset_import:
        opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)


def _quantize_one(scheme: Any, node: onnx.NodeProto, weight_name: str, make_weight: Any, template: onnx.ModelProto,
                  scratch: Path, exclude: list[str], job_class: Any) -> tuple[onnx.ModelProto, dict[str, Any], int]:
    """The scheme's own rewrite of one node (see the module doc); returns (the rewritten one-node graph, the scheme's
    report, fp32 bytes read). Only one copy of the weight is alive when the scheme starts."""
    work = scratch / "one"
    shutil.rmtree(work, ignore_errors=True)
    (work / "out").mkdir(parents=True)
    weight = make_weight()
    nbytes = weight.nbytes
    _write_single_node_model(node, weight_name, weight, template, work)
    del weight
    job = job_class(source=work / MODEL_FILE, folder=work, target=work / "out", samples=None, exclude=list(exclude),
                    external_data="auto")
    report = scheme.quantize(job)
    result = onnx.load(str(work / "out" / MODEL_FILE), load_external_data=True)
    shutil.rmtree(work, ignore_errors=True)
    return result, report, nbytes


def _standalone(message: Any, kind: Any) -> Any:
    copy = kind()
    copy.CopyFrom(message)
    return copy


def chunk_bounds(total: int, step: int) -> list[tuple[int, int]]:
    """[start, stop) of each chunk of `total` rows, `step` wide but the first, which is half as wide: chunks of two
    widths show which axis of each quantized tensor runs along them (`merge_chunks`)."""
    if total <= step:
        return [(0, total)]
    edges = [0, *range(max(1, step // 2), total, step), total]
    return list(zip(edges[:-1], edges[1:], strict=False))


def _quantize_chunked(scheme: Any, node: onnx.NodeProto, weight_name: str, spec: Any, checkpoint: Any, read: Any,
                      template: onnx.ModelProto, scratch: Path, exclude: list[str],
                      job_class: Any) -> tuple[onnx.ModelProto, dict[str, Any], int]:
    """A large weight through the scheme's rewrite in chunks of checkpoint rows (output columns of a MatMul, rows of
    an embedding table), each read from the checkpoint on its own: without the whole-tensor temporaries of the
    scheme's arithmetic (several copies of a 0.5 GB lm_head at 7B). The scheme's tensors of the chunks, concatenated,
    are the whole weight's when its layout is column-wise (blocks along K, one scale per output channel); where they
    are not (one scale per tensor), `merge_chunks` says so after two chunks and the weight goes through whole."""
    shape = checkpoint.shape(spec.sources[0])
    step = max(2, CHUNK_BYTES // max(1, 4 * int(np.prod(shape[1:]))))
    bounds = chunk_bounds(shape[0], step)
    read_rows = lambda name, rows: checkpoint.tensor(name, rows).numpy()  # noqa: E731
    parts: list[tuple[onnx.ModelProto, dict[str, Any]]] = []
    merged = None
    for start, stop in bounds:
        build = lambda a=start, b=stop: spec.build_part(read_rows, a, b)  # noqa: E731
        parts.append(_quantize_one(scheme, node, weight_name, build, template, scratch, exclude, job_class)[:2])
        release_freed_memory()
        if len(parts) == 2 and merge_chunks(parts, bounds[:2]) is None:
            break
    else:
        merged = merge_chunks(parts, bounds)
    if merged is None:
        log.info("streaming: %s is not quantized column-wise by %s; it goes through whole", weight_name, scheme.name)
        del parts
        result, report, nbytes = _quantize_one(scheme, node, weight_name, lambda: spec.build(read), template,
                                               scratch, exclude, job_class)
        return result, {**report, "chunks": 1}, nbytes
    report = dict(parts[0][1])
    for key in ("quantized", "kept_float"):
        report[key] = _merge_rows([r for _, rep in parts for r in rep.get(key, [])], spec.chunk_axis, shape[0])
    report["chunks"] = len(parts)
    return merged, report, 4 * int(np.prod(shape))


def merge_chunks(parts: list[tuple[onnx.ModelProto, dict[str, Any]]],
                 bounds: list[tuple[int, int]]) -> onnx.ModelProto | None:
    """One rewritten graph from the rewrites of row chunks (`bounds`), or None when they are not pieces of one:
    the nodes must be the same but for an integer attribute equal to each chunk's width (MatMulNBits' N), and each
    tensor either the same in every chunk or growing with the chunk width along exactly one axis (concatenated
    there)."""
    models = [model for model, _ in parts]
    widths = [stop - start for start, stop in bounds]
    total = sum(widths)
    if len({len(m.graph.node) for m in models}) != 1 or len({len(m.graph.initializer) for m in models}) != 1:
        return None
    merged = onnx.ModelProto()
    merged.CopyFrom(models[0])
    for index, node in enumerate(merged.graph.node):
        others = [m.graph.node[index] for m in models]
        if any((o.op_type, o.domain, list(o.input), list(o.output), [a.name for a in o.attribute])
               != (node.op_type, node.domain, list(node.input), list(node.output), [a.name for a in node.attribute])
               for o in others):
            return None
        for position, attribute in enumerate(node.attribute):
            values = [helper.get_attribute_value(o.attribute[position]) for o in others]
            if all(v == values[0] for v in values):
                continue
            if attribute.type != onnx.AttributeProto.INT or values != widths:
                return None
            attribute.i = total
    del merged.graph.initializer[:]
    for init in models[0].graph.initializer:
        found = [next((i for i in m.graph.initializer if i.name == init.name), None) for m in models]
        if any(f is None for f in found):
            return None
        arrays = [numpy_helper.to_array(f) for f in found]
        if len({a.shape for a in arrays}) == 1:
            if any(not np.array_equal(a, arrays[0], equal_nan=a.dtype.kind == "f") for a in arrays[1:]):
                return None
            merged.graph.initializer.append(_standalone(init, onnx.TensorProto))
            continue
        axes = [axis for axis in range(arrays[0].ndim) if len({a.shape[axis] for a in arrays}) > 1]
        if len({a.ndim for a in arrays}) != 1 or len(axes) != 1:
            return None
        axis = axes[0]
        if any(a.shape[axis] * widths[0] != arrays[0].shape[axis] * w for a, w in zip(arrays, widths, strict=True)):
            return None
        merged.graph.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=axis), init.name))
    return merged


def _merge_rows(rows_of: list[dict], axis: int, total: int) -> list[dict]:
    """One report row per node from its chunks' rows: the whole weight's shape, the largest error."""
    merged: dict[str, dict] = {}
    for row in rows_of:
        kept = merged.setdefault(row.get("node", ""), dict(row))
        if "shape" in kept:
            kept["shape"] = [total if index == axis else size for index, size in enumerate(kept["shape"])]
        if "max_abs_error" in row:
            kept["max_abs_error"] = max(kept["max_abs_error"], row["max_abs_error"])
    return list(merged.values())


# --------------------------------------------------------------------------- inputs
def check_disk(out: Path, params: int, schemes: list[Any]) -> dict[str, float]:
    """UserError when the output folder's disk cannot hold the variants (estimated per scheme from its
    `stream_bytes_per_param`)."""
    # a layer-wise calibrated variant is on disk twice for a moment: its finished layers (kept so that a killed run
    # resumes) and the variant they are copied into
    need = int(sum(params * s.stream_bytes_per_param * (2 if s.uses_calibration() else 1) for s in schemes) * DISK_MARGIN)
    free = shutil.disk_usage(out).free
    if need > free:
        raise UserError(f"too little disk space: the variants need about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free",
                        where=f"output.dir ({out})")
    return {"estimated_gb": round(need / 1e9, 2), "free_gb": round(free / 1e9, 2)}


def write_side_files(folder: Path, config: dict[str, Any], model_dir: Path, tok_dir: Path, tokenizer: Any) -> list[str]:
    """config.json (fp32, final vocab), generation_config.json with the pad id the engines use, tokenizer files."""
    from llmship.runtime.base import special_ids
    from llmship.source import TOKENIZER_FILES

    graph_config = dict(config, dtype="float32")
    graph_config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(graph_config, indent=2), encoding="utf-8")
    generation: dict[str, Any] = {}
    if (model_dir / "generation_config.json").is_file():
        generation = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
    for key in ("bos_token_id", "eos_token_id"):
        if generation.get(key) is None and config.get(key) is not None:
            generation[key] = config[key]
    eos, pad = special_ids(tokenizer, SimpleNamespace(**generation), SimpleNamespace(**config))
    generation["pad_token_id"] = pad
    if generation.get("eos_token_id") is None and eos is not None:
        generation["eos_token_id"] = eos
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    copied = []
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, folder / name)
            copied.append(name)
    return copied


# --------------------------------------------------------------------------- compile
def _resolve_inputs(cfg: Any) -> dict[str, Any]:
    """Every input the streaming compile reads, validated before the first expensive step (module doc of checkpoint)."""
    from llmship.export import check_exportable
    from llmship.source import _read_config, check_architecture, resolve_model_path

    path = resolve_model_path(cfg.model.path)
    model_dir = Path(path).expanduser()
    if not model_dir.is_dir():
        raise UserError("streaming compiles a local model folder; this one is not found", where=f"model.path ({path})")
    adapter_dir = Path(cfg.model.adapter).expanduser() if cfg.model.adapter else None
    if adapter_dir is not None and not adapter_dir.is_dir():
        raise UserError("adapter folder not found", where=f"model.adapter ({cfg.model.adapter})")
    if not cfg.export.optimize:
        raise UserError("streaming builds the fused graph; set export.optimize: true", where="export.streaming")
    config = _read_config(model_dir, str(model_dir))
    check_architecture(config, str(model_dir / "config.json"), cfg.model.trust_remote_code)
    check_exportable(SimpleNamespace(**config), f"model.path ({model_dir})")
    from llmship.quantize import SCHEMES, resolve_variants

    streaming = ", ".join(sorted(name for name, cls in SCHEMES.items() if cls.stream_bytes_per_param is not None))
    for variant in resolve_variants(cfg.quantize):
        if not variant.scheme.streams():
            raise UserError(f"scheme {variant.scheme.name} ({variant.scheme.method or 'default'}"
                            f"{', with quantize.auto' if variant.scheme.auto else ''}) needs the whole model and cannot "
                            f"stream; streaming builds {streaming} (calibrated: w4a16 gptq, w8a8-static and fp16 "
                            "with its overflow scan and fp32 inputs and outputs, one decoder layer at a time)",
                            where=f"{variant.where}.scheme")
    checkpoint, config, tok_dir, tokenizer = open_source(model_dir, config, adapter_dir)
    return {"model_dir": model_dir, "adapter_dir": adapter_dir, "config": config, "checkpoint": checkpoint,
            "tok_dir": tok_dir, "tokenizer": tokenizer}


def open_source(model_dir: Path, config: dict[str, Any], adapter_dir: Path | None) -> tuple[Any, dict[str, Any], Path, Any]:
    """(checkpoint, config, tokenizer folder, tokenizer) of a local model folder, the adapter merged per tensor; the
    tokenizer must not have more tokens than the embedding has rows."""
    from llmship.export.checkpoint import LoraMerged, open_checkpoint
    from llmship.source import _tokenizer_source, load_tokenizer

    checkpoint: Any = open_checkpoint(model_dir, config)
    if adapter_dir is not None:
        checkpoint = LoraMerged(checkpoint, adapter_dir)
        config = checkpoint.config
    tok_dir = _tokenizer_source(model_dir, adapter_dir)
    if tok_dir is None:
        raise UserError("no tokenizer files (tokenizer.model or tokenizer.json) in the model folder", where=str(model_dir))
    tokenizer = load_tokenizer(tok_dir)
    if len(tokenizer) > config["vocab_size"]:  # fewer tokens than rows is harmless: the extra rows are never read
        raise UserError(f"tokenizer has {len(tokenizer)} tokens but config.json's vocab_size is {config['vocab_size']}",
                        where=str(tok_dir))
    return checkpoint, config, tok_dir, tokenizer


def _check_excludes(skeleton: Any, patterns: list[str]) -> None:
    import fnmatch

    from llmship.quantize.graph import initializers, node_names

    inits = initializers(skeleton.model)
    names = {n for node in skeleton.model.graph.node for n in node_names(node, inits)}
    missing = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if missing:
        raise UserError(f"exclude pattern(s) {', '.join(repr(p) for p in missing)} match no node, weight or module "
                        "of the model", where="quantize.exclude")


def compile_streaming(cfg: Any, out: Path, progress: Any = None, force: bool = False, *, parity: bool = True) -> dict[str, Path]:
    """`export.streaming: true` on its own (scripts): every variant built straight from the checkpoint, or reused when
    up to date; returns variant name -> folder. `llmship compile` builds the same stages (`streaming_stages`)."""
    from llmship.cache import build
    from llmship.quantize.registry import resolve_variants

    stages = streaming_stages(cfg, out, resolve_variants(cfg.quantize), progress, force=force, parity=parity)
    for stage in stages.values():
        build(stage, out, force)
    return {name: stage.artifact for name, stage in stages.items()}


def streaming_stages(cfg: Any, out: Path, variants: list[Any], progress: Any = None, *, force: bool = False,
                     parity: bool = True) -> dict[str, Any]:
    """Variant name -> its stage (llmship.cache.Stage; the fp32 variant's is the export), built straight from the
    checkpoint: each reads the source model, the model and export config and its resolved variant, not the export."""
    from llmship.cache import Stage

    shared = StreamingRun(cfg, out, progress, force=force, parity=parity)
    for variant in variants:
        target = out / variant.folder_name
        exporting = variant.scheme.builds_export
        shared.stages[variant.name] = Stage(
            "export" if exporting else f"variant-{variant.name}", target,
            reads=lambda variant=variant: {**shared.source, **variant.describe(), "provider": cfg.runtime.provider,
                                           **shared.calibration_reads(variant)},
            run=lambda variant=variant, target=target: shared.build(variant, target),
            fresh_log="fp32 export is up to date" if exporting else f"variant {variant.name} is up to date")
        shared.variants[variant.name] = variant
    return dict(shared.stages)


class StreamingRun:
    """What the streamed variants of one compile share, set up when the first of them is built: the checked inputs,
    the disk check over every variant left to build, and the graph skeleton."""

    def __init__(self, cfg: Any, out: Path, progress: Any, *, force: bool, parity: bool):
        self.cfg, self.out, self.progress, self.force, self.parity = cfg, out, progress, force, parity
        self.stages: dict[str, Any] = {}
        self.variants: dict[str, Any] = {}
        self.left: set[str] = set()

    @cached_property
    def source(self) -> dict[str, Any]:
        from llmship.cache import folder_fingerprint
        from llmship.source import resolve_model_path

        adapter = self.cfg.model.adapter
        fingerprints = [folder_fingerprint(Path(resolve_model_path(self.cfg.model.path)).expanduser()),
                        adapter and folder_fingerprint(Path(adapter).expanduser())]
        return {"source": fingerprints, "model": self.cfg.model.model_dump(), "export": self.cfg.export.model_dump()}

    def calibration_reads(self, variant: Any) -> dict[str, Any]:
        """What a calibrated variant's key adds: the calibration config and its data files' fingerprints."""
        if not variant.reads_calibration:
            return {}
        from llmship.data.sources import data_fingerprint

        return {"calibration": {"config": self.cfg.calibration.model_dump(),
                                "data": [data_fingerprint(s.path, s.kind) for s in self.cfg.calibration.sources]}}

    @cached_property
    def calibration(self) -> Any:
        """The calibration set, tokenized with the source's tokenizer; refused when empty (a layer-wise run types and
        calibrates each segment on it)."""
        from llmship.data import mixture

        inputs = self.setup["inputs"]
        max_positions = int(inputs["config"].get("max_position_embeddings", 2048))
        calibration = mixture.build_calibration_set(self.cfg.calibration, inputs["tokenizer"], max_positions)
        if not calibration.samples:
            raise UserError("no calibration samples (calibration.sources is empty): the streaming compile calibrates "
                            "each calibrated variant one decoder layer at a time on them", where="calibration.sources")
        return calibration

    @cached_property
    def setup(self) -> dict[str, Any]:
        """Inputs checked (every variant streamable), disk room for the variants left to build, the skeleton."""
        from llmship.progress import Steps

        inputs = {**_resolve_inputs(self.cfg), "source": self.source, "out": self.out}
        self.left = {name for name, stage in self.stages.items() if self.force or not stage.up_to_date(self.out)}
        schemes = [self.variants[name].scheme for name in self.left]
        disk = check_disk(self.out, inputs["checkpoint"].weight_bytes // 4, schemes)
        steps = Steps(self.progress, "streaming compile")
        steps("building the graph skeleton (one layer, exported and fused)")
        from llmship.artifact import recover_interrupted
        from llmship.export.skeleton import build_skeleton_isolated

        recover_interrupted(self.out)  # a killed compile's scratch (SKELETON_SCRATCH.tmp-<pid>) goes
        scratch = self.out / f"{SKELETON_SCRATCH}.tmp-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        started = time.perf_counter()
        try:
            with PeakRss() as rss:
                skeleton = build_skeleton_isolated(inputs["config"], scratch, opset=self.cfg.export.opset,
                                                   attention=self.cfg.export.attention)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        inputs["skeleton_timings"] = {"skeleton_s": round(time.perf_counter() - started, 2),
                                      "skeleton_peak_rss_mb": rss.peak_mb}
        return {"inputs": inputs, "disk": disk, "steps": steps, "skeleton": skeleton}

    def build(self, variant: Any, target: Path) -> None:
        shared = self.setup
        if variant.config.exclude:
            _check_excludes(shared["skeleton"], variant.config.exclude)
        calibration = self.calibration if variant.reads_calibration else None
        if calibration is not None and variant.scheme.packs_calibration():
            from llmship.data.mixture import require_a_full_sample

            require_a_full_sample(calibration, self.cfg.calibration)
        build_variant(self.cfg, variant, target, shared["skeleton"], shared["inputs"], shared["steps"],
                      disk=shared["disk"], parity=self.parity, calibration=calibration)
        self.left.discard(variant.name)
        if not self.left:
            shared["steps"].done()


def build_variant(cfg: Any, resolved: Any, target: Path, skeleton: Any, inputs: dict[str, Any], steps: Any, *,
                  disk: dict[str, float] | None = None, parity: bool = True, calibration: Any = None) -> Path:
    """One variant folder (`resolved`: a llmship.quantize.Variant) from the skeleton and the checkpoint (atomic; parity
    against PyTorch unless `parity` is off). A calibrated variant reads `calibration` (llmship.data.mixture's set)
    one decoder layer at a time; its finished layers are kept in output.dir's .llmship/layerwise until the variant is
    written, so a killed run resumes there."""
    from llmship.artifact import atomic_folder, model_size, new_manifest, write_manifest
    from llmship.export.genai_config import write_folder_genai_config
    from llmship.quantize.gptq import gptq_device

    variant = resolved.config
    scheme = None if resolved.scheme.builds_export else resolved.scheme  # None: fp32, nothing to rewrite
    name = resolved.folder_name if scheme is None else resolved.name
    config = inputs["config"]
    started = time.perf_counter()
    with atomic_folder(target) as folder:
        with PeakRss() as rss:
            tokenizer_files = write_side_files(folder, config, inputs["model_dir"], inputs["tok_dir"], inputs["tokenizer"])
            if calibration is not None:
                store = layer_store(inputs, resolved, calibration)
                _, report = write_calibrated_variant(
                    skeleton, inputs["checkpoint"], folder, scheme, list(variant.exclude), steps, name,
                    samples=list(calibration.samples), store=store, source_name=str(inputs["model_dir"]),
                    device=gptq_device(cfg.runtime.provider))
            else:
                _, report = write_variant(skeleton, inputs["checkpoint"], folder, scheme, list(variant.exclude), steps, name)
        build_s = time.perf_counter() - started
        tolerances = cfg.export.parity if scheme is None else resolved.parity
        figures: dict[str, Any] = {"skipped": True}
        failures: list[str] = []
        parity_timings: dict[str, float] = {}
        if parity:
            from llmship.export.streamed_parity import streamed_parity

            parity_started = time.perf_counter()
            with PeakRss() as parity_rss:
                figures, reference_s = streamed_parity(cfg, folder, inputs, tolerances, steps, name)
            # parity_reference_s: the PyTorch side's share, when this variant computed it (0: read back)
            parity_timings = {"parity_s": round(time.perf_counter() - parity_started, 2),
                              "parity_reference_s": round(reference_s, 2), "parity_peak_rss_mb": parity_rss.peak_mb}
            figures["candidate"]["path"] = str(target)
            from llmship.export.parity import parity_failures

            failures = parity_failures(figures, tolerances)
            if failures:
                raise CheckFailed(f"streamed {name} failed parity against PyTorch: " + "; ".join(failures))
        write_folder_genai_config(folder, cfg.runtime.provider)
        from llmship.export.onnx_export import cache_shape

        kv_heads, head_dim = cache_shape(SimpleNamespace(**config))
        manifest = new_manifest(
            "fp32" if scheme is None else "variant",
            scheme=variant.scheme, variant=name, method=scheme.method if scheme else None,
            options=scheme.options.model_dump() if scheme else {}, exclude=list(variant.exclude),
            source={"path": str(inputs["model_dir"]), "adapter": inputs["adapter_dir"] and str(inputs["adapter_dir"]),
                    "dtype": cfg.model.dtype,
                    "checkpoint_dtypes": sorted({e.dtype for e in inputs["checkpoint"].entries.values()})},
            model={"parameters": inputs["checkpoint"].weight_bytes // 4, "fp32_bytes": inputs["checkpoint"].weight_bytes,
                   "vocab_size": config["vocab_size"], "max_positions": config.get("max_position_embeddings"),
                   "hidden_size": config["hidden_size"], "heads": config["num_attention_heads"],
                   "layers": config["num_hidden_layers"]},
            onnx={"file": MODEL_FILE, "external_data": True, "opset": cfg.export.opset, "layers": config["num_hidden_layers"],
                  "kv_heads": kv_heads, "head_dim": head_dim, "exporter": "llmship.export.skeleton (streaming)"},
            optimize={"applied": True, "fusions": skeleton.fusion.get("fusions"), "attention": skeleton.fusion.get("attention")},
            tokenizer_files=tokenizer_files,
            config=cfg.model_dump(mode="json"),
            quantization=report,
            size={"model_bytes": model_size(folder), "fp32_model_bytes": inputs["checkpoint"].weight_bytes},
            parity={"passed": parity and not failures, "failures": failures, "tolerances": tolerances.model_dump(), **figures},
            streaming={"disk": disk, "read_mb_s": report.get("read_mb_s")},
            calibration=calibration.fingerprint if calibration is not None else None,
            timings={"build_s": round(build_s, 2), "total_s": round(time.perf_counter() - started, 2),
                     "peak_rss_mb": rss.peak_mb, **inputs.get("skeleton_timings", {}), **parity_timings},
        )
        write_manifest(folder, manifest)
    if calibration is not None:
        shutil.rmtree(store, ignore_errors=True)  # the variant holds every layer now
    log.info("streamed %s: %.0f s, peak RSS %.0f MB (process tree) while writing%s", name,
             time.perf_counter() - started, rss.peak_mb,
             f", {parity_timings['parity_peak_rss_mb']:.0f} MB in the parity check" if parity_timings else "")
    return target


def layer_store(inputs: dict[str, Any], resolved: Any, calibration: Any) -> Path:
    """Where a calibrated variant's finished layers are kept: keyed by the checkpoint, the export settings, the
    variant as resolved and the calibration tokens, so a resumed run only reuses layers of the same computation."""
    from llmship.cache import stage_key

    key = stage_key(inputs["source"], resolved.describe(), calibration.fingerprint)
    return inputs["out"] / ".llmship" / "layerwise" / f"{resolved.name}-{key}"
