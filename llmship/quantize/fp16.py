"""fp16: onnxruntime.transformers' float16 converter, overflow-aware.

1. Run the fp32 graph on calibration samples with every intermediate tensor exposed; a node whose output or
   (activation) input leaves the fp16 range (|x| > 65504, finite) is kept in fp32, so the converter puts Casts
   around it instead of turning the value into inf.
2. Convert, run the fp16 graph on the same samples, and keep in fp32 any node whose fp16 result is inf/nan where
   the fp32 one was finite; repeat (a kept node changes what its neighbours see) up to `max_rounds`.
3. The rotary-angle math (the nodes feeding Cos/Sin: position * inv_freq) stays fp32: fp16 represents integers
   exactly only up to 2048, so positions beyond would get wrong angles.
The report lists every kept node with the reason and the value seen.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
from pydantic import Field

from llmship.files import INLINE_WEIGHTS_LIMIT
from llmship.quantize.feeds import calibration_feeds, decoder_inputs, probe_session
from llmship.quantize.graph import ensure_node_names, load_model, module_name, save_model, topological_order
from llmship.quantize.registry import QuantizeJob, Scheme, SchemeOptions, register
from llmship.sections import ParityConfig

FP16_MAX = 65504.0
# Masks use float32's extreme (torch.finfo(float32).min) as a stand-in for -inf; the converter clips that constant to
# fp16's extreme, where it masks just as well, so such values are not overflows.
MASK_SENTINEL = 3.0e38
# Ops whose math on positions produces the rotary angles.
ROTARY_OPS = ("Cos", "Sin")

log = logging.getLogger("llmship")


class Fp16Options(SchemeOptions):
    keep_io_types: bool = Field(True, description="Graph inputs/outputs (logits, KV cache) stay float32.")
    overflow_scan: bool = Field(True, description="Find fp16 overflows on the calibration set and keep those nodes fp32.")
    scan_samples: int = Field(16, ge=1, description="Calibration samples run for the overflow scan.")
    max_rounds: int = Field(3, ge=0, description="Rounds of 'run fp16, keep nodes that went inf/nan'.")
    keep_rotary_fp32: bool = Field(True, description="Keep the rotary-angle math (inputs of Cos/Sin) in fp32.")
    block_ops: list[str] = Field(default_factory=list, description="Extra op types kept in fp32.")
    outputs_per_run: int = Field(1024, ge=1, description="Intermediate tensors exposed per scan run (memory bound).")


@register
class Fp16(Scheme):
    name = "fp16"
    Options = Fp16Options
    # Logits of a fp16 graph differ from fp32 by rounding only: top-1 and NLL must be all but identical, and the
    # tie-aware greedy run (near-ties forgiven, llmship.export.parity) must match in full.
    parity = ParityConfig(max_logits_diff=0.25, min_top1_agreement=0.99, min_greedy_match=1.0, max_nll_increase=0.005)
    stream_bytes_per_param = 2.1  # fp16 weights, the few kept fp32, and the graph

    def uses_calibration(self) -> bool:
        return self.options.overflow_scan  # the scan runs the calibration samples; the conversion alone reads none

    def streams(self) -> bool:
        """The streaming compile converts one decoder layer at a time, on the segment its calibration run typed and
        scanned: without the scan there is no such run, and its graph inputs and outputs are the fp32 model's."""
        return self.options.overflow_scan and self.options.keep_io_types and self.auto is None

    def calibrates_by_layer(self) -> bool:
        return self.streams()

    def packs_calibration(self) -> bool:
        return False  # the scan runs each sample alone, whatever its length

    def layer_feeds(self, samples: list[list[int]], spec: Any) -> list[dict[str, Any]]:
        """Each sample alone, the first `scan_samples`, as the whole-model scan runs them."""
        return calibration_feeds(samples, spec, limit=self.options.scan_samples)

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        opts: Fp16Options = self.options
        model = load_model(job.source)
        ensure_node_names(model)
        feeds = []
        if opts.overflow_scan and not job.samples:
            log.warning("fp16: no calibration samples (calibration.sources is empty): the overflow scan is skipped, "
                        "only excluded and rotary nodes stay fp32")
        if opts.overflow_scan and job.samples:
            feeds = calibration_feeds(job.samples, decoder_inputs(model, job.folder), limit=opts.scan_samples)
        converted, blocked, rounds = self._scan_and_convert(model, feeds, job.exclude, job.target, job.progress)
        save_model(converted, job.target, job.external_data)
        return self._report(model, converted, blocked, len(feeds), rounds)

    def quantize_layer(self, job: Any) -> tuple[onnx.ModelProto, dict[str, Any]]:
        """One segment (llmship.quantize.layerwise): scanned on its inputs from the float layers before it (as the
        whole-model scan reads the float model), converted with fp32 inputs and outputs, so segments join as the
        whole model's fp32 interface does (a boundary costs a Cast pair, exact both ways)."""
        job.carry(job.model)
        floats = float_tensors(job.model)
        model = with_typed_outputs(job.model, floats)
        converted, blocked, rounds = self._scan_and_convert(model, job.feeds, job.exclude, job.scratch, job.progress,
                                                            floats)
        prefix_new_names(converted, model, f"segment{job.position}_")
        return converted, self._report(model, converted, blocked, len(job.feeds), rounds)

    def finish_layers(self, reports: list[dict[str, Any]], samples: list[list[int]]) -> dict[str, Any]:
        kept = [row for report in reports for row in report["kept_fp32"]]
        nodes = sum(r["fp32_nodes"] for r in reports)
        scanned = reports[0]["scan_samples"] if reports else 0
        rounds = max((r["inf_nan_rounds"] for r in reports), default=0)
        return {
            "summary": f"{nodes - len(kept)} nodes fp16, {len(kept)} kept fp32 (scan on {scanned} samples, one decoder "
                       f"layer at a time, at most {rounds} inf/nan round(s) in a layer)",
            "kept_fp32": kept,
            "scan_samples": scanned,
            "inf_nan_rounds": rounds,
            "nodes": sum(r["nodes"] for r in reports),
            "casts_added": sum(r["casts_added"] for r in reports),
        }

    def _scan_and_convert(self, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], exclude: list[str],
                          scratch: Path, progress: Any, floats: set[str] | None = None
                          ) -> tuple[onnx.ModelProto, dict[str, dict[str, Any]], int]:
        """The module doc's steps 1-3 on `model` (`floats`: its float32 tensors, `float_tensors`): (converted graph,
        kept nodes with why, inf/nan rounds run)."""
        opts: Fp16Options = self.options
        blocked: dict[str, dict[str, Any]] = {}
        for node in model.graph.node:
            if any(_matches(node, pat) for pat in exclude):
                blocked[node.name] = {"reason": "excluded"}
        if opts.keep_rotary_fp32:
            for name in rotary_nodes(model):
                blocked.setdefault(name, {"reason": "rotary angles (positions > 2048 are not exact in fp16)"})
        fp32_stats: dict[str, tuple[float, bool]] = {}
        if feeds:
            progress(f"fp16: scanning fp32 activations on {len(feeds)} samples")
            fp32_stats = {**input_stats(feeds), **tensor_stats(model, feeds, opts.outputs_per_run, scratch)}
            for name, why in overflow_nodes(model, fp32_stats).items():
                blocked.setdefault(name, why)
        op_block = list(DEFAULT_OP_BLOCK_LIST) + list(opts.block_ops)
        floats = float_tensors(model) if floats is None else floats
        converted = self._convert(model, blocked, op_block, floats)
        rounds = 0
        while feeds and rounds < opts.max_rounds:
            progress(f"fp16: checking the fp16 graph for inf/nan (round {rounds + 1})")
            fp16_stats = tensor_stats(converted, feeds, opts.outputs_per_run, scratch)
            new = {}
            for node in model.graph.node:
                if node.name in blocked:
                    continue
                for out in node.output:
                    if out in fp16_stats and fp16_stats[out][1] and not fp32_stats.get(out, (0.0, True))[1]:
                        new[node.name] = {"reason": "fp16 result is inf/nan", "tensor": out}
                        break
            if not new:
                break
            blocked.update(new)
            converted = self._convert(model, blocked, op_block, floats)
            rounds += 1
        return converted, blocked, rounds

    def _report(self, model: onnx.ModelProto, converted: onnx.ModelProto, blocked: dict[str, dict[str, Any]],
                scanned: int, rounds: int) -> dict[str, Any]:
        kept = [{"node": name, "module": _module_of(model, name), **why} for name, why in blocked.items()]
        casts = sum(1 for n in converted.graph.node if n.op_type == "Cast")
        return {
            "summary": f"{len(model.graph.node) - len(blocked)} nodes fp16, {len(blocked)} kept fp32 "
                       f"(scan on {scanned} samples, {rounds} inf/nan round(s))",
            "kept_fp32": kept,
            "scan_samples": scanned,
            "inf_nan_rounds": rounds,
            "fp32_nodes": len(model.graph.node),
            "nodes": len(converted.graph.node) - casts,
            "casts_added": casts - sum(1 for n in model.graph.node if n.op_type == "Cast"),
        }

    def _convert(self, model: onnx.ModelProto, blocked: dict[str, Any], op_block: list[str],
                 floats: set[str]) -> onnx.ModelProto:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        big = model.ByteSize() > INLINE_WEIGHTS_LIMIT
        converted = convert_float_to_float16(copy, keep_io_types=self.options.keep_io_types, node_block_list=sorted(blocked),
                                             op_block_list=op_block, disable_shape_infer=big)
        cast_kept_inputs(converted, set(blocked), floats)
        remove_cast_roundtrips(converted, fp32_sources(converted, blocked))
        ordered = topological_order(list(converted.graph.node), converted.graph)  # the converter appends its Casts
        converted.graph.ClearField("node")
        converted.graph.node.extend(ordered)
        return converted


def with_typed_outputs(model: onnx.ModelProto, floats: set[str]) -> onnx.ModelProto:
    """`model` with its untyped float outputs (a segment's carried tensors; `floats`: its float32 tensors) typed
    float32, so the converter keeps them fp32 (`keep_io_types`), as the whole model's interface is; the model is
    changed in place and returned."""
    for output in model.graph.output:
        if not output.type.HasField("tensor_type") and output.name in floats:
            output.CopyFrom(onnx.helper.make_tensor_value_info(output.name, onnx.TensorProto.FLOAT, None))
    return model


def prefix_new_names(converted: onnx.ModelProto, source: onnx.ModelProto, prefix: str) -> None:
    """Give every node and tensor the conversion of `source` made a segment's own prefix. The converter names its Casts
    after the graph inputs and outputs (numbered per graph: `graph_input_cast0`) and after the tensors they cast (a
    constant every layer reads: `rotary_cos_cache_cast_to_fp32`), so two converted segments would both hold them."""
    old_nodes = {node.name for node in source.graph.node}
    old_tensors = ({out for node in source.graph.node for out in node.output} | {v.name for v in source.graph.input}
                   | {v.name for v in source.graph.output} | {t.name for t in source.graph.initializer})
    made = {out for node in converted.graph.node for out in node.output if out and out not in old_tensors}

    def renamed(name: str) -> str:
        return prefix + name if name in made else name

    for node in converted.graph.node:
        if node.name not in old_nodes:
            node.name = prefix + node.name
        node.input[:] = [renamed(i) for i in node.input]
        node.output[:] = [renamed(o) for o in node.output]
    for info in converted.graph.value_info:
        info.name = renamed(info.name)


def input_stats(feeds: list[dict[str, np.ndarray]]) -> dict[str, tuple[float, bool]]:
    """`tensor_stats` of the float graph inputs: a segment's inputs are the activations earlier layers made, and their
    consumers must be kept fp32 when they leave the fp16 range, as in the whole graph."""
    stats: dict[str, tuple[float, bool]] = {}
    for feed in feeds:
        for name, value in feed.items():
            if value.dtype.kind == "f" and value.size:
                _merge_stats(stats, name, value)
    return stats


def float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the float32 tensors of the fp32 graph, as ONNX Runtime types them (contrib ops included)."""
    names = [out for node in model.graph.node for out in node.output if out]
    session = probe_session(model, names, None)
    floats = {o.name for o in session.get_outputs() if o.type == "tensor(float)"}
    floats |= {i.name for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    return floats


def cast_kept_inputs(model: onnx.ModelProto, kept: set[str], floats: set[str]) -> int:
    """Cast to fp32 every fp16 activation that reaches a kept node uncast (the converter misses some inputs of
    contrib ops, e.g. MultiHeadAttention's query, and ONNX Runtime then refuses the mixed types)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    added = 0
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.name in kept:
            for index, name in enumerate(node.input):
                source = producer.get(name)
                if not name or name not in floats or source is None or source.name in kept:
                    continue
                if source.op_type == "Cast" and _cast_to(source) == onnx.TensorProto.FLOAT:
                    continue
                cast_name = f"{name}_kept_fp32"
                nodes.append(onnx.helper.make_node("Cast", [name], [cast_name], name=f"{cast_name}_cast", to=onnx.TensorProto.FLOAT))
                node.input[index] = cast_name
                added += 1
        nodes.append(node)
    if added:
        model.graph.ClearField("node")
        model.graph.node.extend(nodes)
    return added


def fp32_sources(model: onnx.ModelProto, blocked: dict[str, Any]) -> set[str]:
    """Tensors that are float32 in a converted graph: outputs of kept nodes and float32 graph inputs."""
    outs = {o for node in model.graph.node if node.name in blocked for o in node.output}
    outs |= {i.name for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    return outs


def remove_cast_roundtrips(model: onnx.ModelProto, fp32: set[str]) -> int:
    """Drop fp32 -> fp16 -> fp32 Cast pairs the converter puts between two kept nodes, and before a graph output.

    The converter casts every kept node's output to fp16 and back for the next kept node (and for a float32 graph
    output: a segment's carried activation), so a value that only fits fp32 would still overflow on the way; the
    consumers are rewired to the fp32 tensor itself, and a graph output is made from it by an Identity.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    graph_outputs = {o.name for o in model.graph.output}
    rewire: dict[str, str] = {}
    dropped = set()
    for node in model.graph.node:
        if node.op_type != "Cast" or _cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        first = producer.get(node.input[0])
        if first is None or first.op_type != "Cast" or _cast_to(first) != onnx.TensorProto.FLOAT16:
            continue
        if first.input[0] not in fp32:
            continue
        if node.output[0] in graph_outputs:
            node.op_type = "Identity"
            node.input[0] = first.input[0]
            node.ClearField("attribute")
            continue
        rewire[node.output[0]] = first.input[0]
        dropped.add(node.name)
    for node in model.graph.node:
        node.input[:] = [rewire.get(i, i) for i in node.input]
    used = {i for node in model.graph.node if node.name not in dropped for i in node.input} | graph_outputs
    keep = [n for n in model.graph.node if n.name not in dropped
            and not (n.op_type == "Cast" and all(o not in used for o in n.output))]
    removed = len(model.graph.node) - len(keep)
    if removed:
        model.graph.ClearField("node")
        model.graph.node.extend(keep)
    return len(rewire)


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _matches(node: onnx.NodeProto, pattern: str) -> bool:
    import fnmatch

    names = [node.name, module_name(node) or ""]
    return any(fnmatch.fnmatchcase(n, pattern) for n in names if n)


def _module_of(model: onnx.ModelProto, name: str) -> str | None:
    for node in model.graph.node:
        if node.name == name:
            return module_name(node)
    return None


def rotary_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes computing the inputs of Cos/Sin (back to graph inputs and constants), and Cos/Sin themselves."""
    producer = {out: node for node in model.graph.node for out in node.output}
    found: list[str] = []
    seen: set[str] = set()
    stack = [n for n in model.graph.node if n.op_type in ROTARY_OPS]
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        found.append(node.name)
        stack.extend(producer[i] for i in node.input if i in producer)
    return found


def tensor_stats(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], per_run: int,
                 scratch: Path) -> dict[str, tuple[float, bool]]:
    """Largest finite |value| (mask sentinels aside) and 'has inf/nan' of every float node output over the feeds."""
    names = [out for node in model.graph.node for out in node.output if out]
    stats: dict[str, tuple[float, bool]] = {}
    for start in range(0, len(names), per_run):
        chunk = names[start:start + per_run]
        session = probe_session(model, chunk, scratch)
        wanted = [o.name for o in session.get_outputs() if o.name in set(chunk)]
        for feed in feeds:
            for name, value in zip(wanted, session.run(wanted, feed), strict=True):
                if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.size == 0:
                    continue
                _merge_stats(stats, name, value)
        del session
    return stats


def _merge_stats(stats: dict[str, tuple[float, bool]], name: str, value: np.ndarray) -> None:
    finite = np.isfinite(value)
    magnitude = np.abs(value[finite]).astype(np.float32, copy=False)
    magnitude = magnitude[magnitude < MASK_SENTINEL]
    peak = float(magnitude.max()) if magnitude.size else 0.0
    old = stats.get(name, (0.0, False))
    stats[name] = (max(old[0], peak), old[1] or not bool(finite.all()))


def overflow_nodes(model: onnx.ModelProto, stats: dict[str, tuple[float, bool]]) -> dict[str, dict[str, Any]]:
    """Nodes that produce or consume an activation whose finite values leave the fp16 range."""
    init_names = {t.name for t in model.graph.initializer}
    out_of_range = {name: peak for name, (peak, _) in stats.items() if math.isfinite(peak) and peak > FP16_MAX}
    found: dict[str, dict[str, Any]] = {}
    for node in model.graph.node:
        for tensor in [*node.output, *(i for i in node.input if i not in init_names)]:
            if tensor in out_of_range:
                found[node.name] = {"reason": "activation leaves the fp16 range", "tensor": tensor,
                                    "max_abs": out_of_range[tensor]}
                break
    return found
