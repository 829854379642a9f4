"""`quantize.auto`: mixed precision chosen against quality goals within a size budget (issue 21, item 4).

For a w4a16 variant with `auto` set, the quantize step

1. builds the scheme's all-int4 model (its method: rtn, hqq or gptq) and an all-int8 model (MatMulNBits 8 bits,
   round-to-nearest, block 32 as w8a16), both from the fp32 export;
2. measures each linear layer's sensitivity on the calibration samples: the mean output KL(fp32 || candidate) per
   token when that layer alone takes its int4 weights and every other layer stays fp32;
3. starts from all-int4 and keeps the most sensitive layers at the next precision up, int4 -> int8 blocks, then
   int8 -> float, in sensitivity order, skipping a promotion the size budget cannot pay for, until every goal passes
   on held-out calibration samples (the last `holdout` fraction, which neither the method nor the sensitivity sees)
   or no promotion fits: then CheckFailed (exit 1) names the best mix found and the goals it missed.

This is Intel Neural Compressor's accuracy-aware tuning (per-op fallback ordered by sensitivity) for weight-only int4.
The goals are the ones the eval gate judges, measured at compile time: the perplexity ratio to fp32 on held-out text
(a `ppl/c4` goal of `percent-max-degradation: p` is a ratio of 1 + p/100) and top-1 agreement with fp32 (what
`consistency/top1` counts). The reference is the fp32 ONNX export, which the compile stage has already held to
PyTorch within 1e-4. Layers are swapped node by node between the two quantized models, so GPTQ's weights are the
ones it computed with every earlier layer int4 (its compensation stays valid, it is just not redone for the mix).
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import numpy_helper

from llmship.errors import CheckFailed, UserError
from llmship.files import MODEL_FILE, model_size
from llmship.quantize.feeds import decoder_inputs, packed_feeds, probe_session
from llmship.quantize.graph import describe_node, ensure_node_names, excluded, initializers, linear_nodes, load_model, save_model
from llmship.quantize.weight_only import quantize_weight_only
from llmship.sections import AutoConfig

if TYPE_CHECKING:
    from llmship.quantize.registry import QuantizeJob, Scheme

log = logging.getLogger("llmship")

# Schemes and methods whose layers can be swapped one by one between precisions. AWQ folds its scales into the
# RMSNorm weights, so its float graph differs from the fp32 export and an fp32 layer would not fit beside them.
AUTO_SCHEMES = {"w4a16": ("rtn", "hqq", "gptq")}
PRECISIONS = ("int4", "int8", "float")
# The int8 step up: w8a16's block (32, one fp32 scale + zero point per 32 weights), round-to-nearest.
INT8_BLOCK = 32
# Packed calibration rows per ONNX Runtime run.
BATCH = 8


def check_auto(scheme: Scheme, auto: AutoConfig, where: str) -> None:
    """UserError, naming the field, for a scheme or method `auto` cannot search."""
    methods = AUTO_SCHEMES.get(scheme.name)
    if methods is None:
        raise UserError(f"auto searches {', '.join(AUTO_SCHEMES)} variants, not {scheme.name}", where=f"{where}.auto")
    if auto.max_ppl_ratio is None and auto.min_top1 is None:
        raise UserError("auto needs a goal: set max_ppl_ratio or min_top1", where=f"{where}.auto")
    if scheme.method not in methods:
        raise UserError(f"auto works with methods {', '.join(methods)}, not {scheme.method} (AWQ folds its scales into "
                        "the norms, so its layers cannot be swapped back to fp32 one by one)", where=f"{where}.auto")


@dataclass
class Layer:
    """One searchable linear layer: its fp32 node name, report name, and its node + weights at each precision."""

    node: str
    name: str
    nodes: dict[str, onnx.NodeProto]
    weights: dict[str, list[onnx.TensorProto]]

    def bytes(self, precision: str) -> int:
        return sum(tensor_bytes(t) for t in self.weights[precision])


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.raw_data:
        return len(tensor.raw_data)
    return int(numpy_helper.to_array(tensor).nbytes)


def split_samples(samples: list[list[int]], holdout: float) -> tuple[list[list[int]], list[list[int]]]:
    """(samples the method and the sensitivity read, held-out samples the goals are judged on); at least one each."""
    if len(samples) < 2:
        raise UserError(f"auto needs at least 2 calibration samples (got {len(samples)}): some fit, some are held out",
                        where="calibration.sources")
    held = min(len(samples) - 1, max(1, round(len(samples) * holdout)))
    return samples[:-held], samples[-held:]


def auto_quantize(scheme: Scheme, auto: AutoConfig, job: QuantizeJob) -> dict[str, Any]:
    """Write the chosen mix to `job.target/model.onnx`; return the quantization report with its `auto` search."""
    if not job.samples:
        raise UserError("auto needs a calibration set (calibration.sources is empty)", where="calibration.sources")
    fit, held = split_samples(job.samples, auto.holdout)
    scratch = job.target / "_auto"
    try:
        int4_report = scheme.quantize(_job_into(job, scratch / "int4", fit))
        int4 = load_model(scratch / "int4" / MODEL_FILE)
        int4_bytes = model_size(scratch / "int4")
        fp32 = load_model(job.source)
        ensure_node_names(fp32)
        job.progress(f"auto: int8 blocks (block {INT8_BLOCK}) for the step up")
        int8, _ = quantize_weight_only(load_model(job.source), bits=8, block_size=INT8_BLOCK, symmetric=False,
                                       accuracy_level=getattr(scheme.options, "accuracy_level", 4), method="rtn",
                                       exclude=job.exclude, embeddings=False, embedding_bits=8, embedding_block=128)
        layers = searchable_layers(fp32, int4, int8, job.exclude)
        spec = decoder_inputs(fp32, job.folder)
        judge = Judge(fp32, packed_feeds(fit, spec, batch=BATCH), packed_feeds(held, spec, batch=BATCH), scratch)
        job.progress(f"auto: sensitivity of {len(layers)} linear layers (output KL, one layer int4 at a time)")
        sensitivity = {layer.node: judge.fit_kl(assemble(fp32, [(layer, "int4")])) for layer in layers}
        fp32_bytes = model_size(job.folder)
        search = Search(auto, layers, sensitivity, judge, int4, int4_bytes, fp32_bytes)
        job.progress(f"auto: searching a mix within {auto.budget:g}x fp32 ({len(layers)} layers)")
        chosen = search.run()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    record = search.record(chosen, len(fit), len(held))
    if not chosen["passed"]:
        best = chosen  # the search returns its best step when none passed
        raise CheckFailed(f"quantize.auto: no mix within {auto.budget:g}x of fp32 meets the goals; best found (step "
                          f"{best['step']}, {best['size_ratio']:.4f}x fp32, ppl ratio {best['ppl_ratio']:.4f}, top-1 "
                          f"{best['top1']:.4f}, {describe_choice(best['precisions'])}) missed: "
                          + "; ".join(best["missed"]))
    model = assemble(int4, [(layer, chosen["precisions"][layer.node]) for layer in layers
                            if chosen["precisions"][layer.node] != "int4"])
    save_model(model, job.target, job.external_data)
    return mixed_report(int4_report, layers, chosen["precisions"], record)


def _job_into(job: QuantizeJob, target: Path, samples: list[list[int]]) -> QuantizeJob:
    target.mkdir(parents=True, exist_ok=True)
    return replace(job, target=target, samples=samples)


def searchable_layers(fp32: onnx.ModelProto, int4: onnx.ModelProto, int8: onnx.ModelProto,
                      exclude: list[str]) -> list[Layer]:
    """The fp32 linears that both quantized models replaced (not excluded, K >= 16), matched by output tensor."""
    fp32_inits = initializers(fp32)
    producers = {name: _producers(model) for name, model in (("int4", int4), ("int8", int8))}
    inits = {"int4": initializers(int4), "int8": initializers(int8)}
    layers = []
    for node in linear_nodes(fp32):
        if excluded(node, exclude, fp32_inits):
            continue
        found = {p: producers[p].get(node.output[0]) for p in ("int4", "int8")}
        if any(n is None or n.op_type != "MatMulNBits" for n in found.values()):
            continue
        nodes, weights = {}, {}
        for precision, (member, tensors) in {"float": (node, fp32_inits), "int4": (found["int4"], inits["int4"]),
                                             "int8": (found["int8"], inits["int8"])}.items():
            nodes[precision], weights[precision] = _own_copy(member, tensors, precision)
        layers.append(Layer(node.name, describe_node(node, fp32_inits), nodes, weights))
    return layers


def _own_copy(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
              precision: str) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """The node and its weights under names of their own: the int4 and int8 models name their scales and zero points
    alike, so a mix of them needs the names apart."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    tensors = []
    for position, name in enumerate(node.input):
        if name in inits:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(inits[name])
            tensor.name = f"{name}.auto_{precision}"
            copy.input[position] = tensor.name
            tensors.append(tensor)
    return copy, tensors


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def assemble(base: onnx.ModelProto, swaps: list[tuple[Layer, str]]) -> onnx.ModelProto:
    """A copy of `base` with each listed layer's node (found by its output) replaced by its node at that precision."""
    model = onnx.ModelProto()
    model.CopyFrom(base)
    by_output = {layer.nodes["float"].output[0]: (layer, precision) for layer, precision in swaps}
    present = {t.name for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        swap = by_output.get(node.output[0]) if node.output else None
        if swap is None:
            nodes.append(node)
            continue
        layer, precision = swap
        nodes.append(layer.nodes[precision])
        for tensor in layer.weights[precision]:
            if tensor.name not in present:
                model.graph.initializer.append(tensor)
                present.add(tensor.name)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    alive = [t for t in model.graph.initializer if t.name in used]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(alive)
    if any(n.domain == "com.microsoft" for n in model.graph.node) and not any(
            o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model


class Judge:
    """Measures a candidate graph against the fp32 export's logits on the fit and the held-out feeds."""

    def __init__(self, fp32: onnx.ModelProto, fit: list[dict[str, np.ndarray]], held: list[dict[str, np.ndarray]],
                 scratch: Path):
        self.fit, self.held, self.scratch = fit, held, scratch
        session = self._session(fp32)
        self.fit_ref = [log_softmax(session.run(["logits"], f)[0]) for f in fit]
        self.held_ref = [log_softmax(session.run(["logits"], f)[0]) for f in held]

    def _session(self, model: onnx.ModelProto):
        return probe_session(model, [], self.scratch, exact=False)

    def fit_kl(self, model: onnx.ModelProto) -> float:
        """Mean per-token KL(fp32 || candidate) over the fit feeds: the sensitivity measure."""
        session = self._session(model)
        total = count = 0.0
        for feed, ref in zip(self.fit, self.fit_ref, strict=True):
            cand = log_softmax(session.run(["logits"], feed)[0])
            total += float((np.exp(ref) * (ref - cand)).sum())
            count += ref.shape[0] * ref.shape[1]
        return total / count

    def held_figures(self, model: onnx.ModelProto) -> dict[str, float]:
        """Perplexity ratio candidate / fp32 over every next-token prediction, top-1 agreement and mean KL, on the
        held-out feeds."""
        session = self._session(model)
        nll_diff = kl = 0.0
        agree = predictions = positions = 0
        for feed, ref in zip(self.held, self.held_ref, strict=True):
            cand = log_softmax(session.run(["logits"], feed)[0])
            targets = feed["input_ids"][:, 1:]
            pick = np.take_along_axis
            nll_diff += float((pick(ref[:, :-1], targets[..., None], -1) - pick(cand[:, :-1], targets[..., None], -1)).sum())
            predictions += targets.size
            agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
            kl += float((np.exp(ref) * (ref - cand)).sum())
            positions += ref.shape[0] * ref.shape[1]
        return {"ppl_ratio": math.exp(nll_diff / predictions), "top1": agree / positions, "kl": kl / positions}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


class Search:
    """The greedy walk: all-int4 first, then one promotion per step in sensitivity order, within the budget."""

    def __init__(self, auto: AutoConfig, layers: list[Layer], sensitivity: dict[str, float], judge: Judge,
                 int4: onnx.ModelProto, int4_bytes: int, fp32_bytes: int):
        self.auto, self.layers, self.sensitivity, self.judge = auto, layers, sensitivity, judge
        self.int4, self.int4_bytes, self.fp32_bytes = int4, int4_bytes, fp32_bytes
        self.order = sorted(layers, key=lambda layer: -sensitivity[layer.node])
        self.steps: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []

    def size(self, precisions: dict[str, str]) -> int:
        """Bytes of a mix: the all-int4 file plus, per promoted layer, its weights' bytes minus its int4 weights'."""
        return self.int4_bytes + sum(layer.bytes(precisions[layer.node]) - layer.bytes("int4") for layer in self.layers)

    def missed(self, figures: dict[str, float]) -> list[str]:
        out = []
        if self.auto.max_ppl_ratio is not None and figures["ppl_ratio"] > self.auto.max_ppl_ratio:
            out.append(f"ppl ratio {figures['ppl_ratio']:.4f} > {self.auto.max_ppl_ratio:g}")
        if self.auto.min_top1 is not None and figures["top1"] < self.auto.min_top1:
            out.append(f"top-1 {figures['top1']:.4f} < {self.auto.min_top1:g}")
        return out

    def evaluate(self, precisions: dict[str, str], promoted: Layer | None, to: str | None) -> dict[str, Any]:
        model = assemble(self.int4, [(layer, precisions[layer.node]) for layer in self.layers
                                     if precisions[layer.node] != "int4"])
        figures = self.judge.held_figures(model)
        size = self.size(precisions)
        missed = self.missed(figures)
        step = {"step": len(self.steps), "layer": promoted.name if promoted else None, "to": to, "size_bytes": size,
                "size_ratio": round(size / self.fp32_bytes, 4), **{k: round(v, 6) for k, v in figures.items()},
                "passed": not missed, "missed": missed, "precisions": dict(precisions)}
        self.steps.append(step)
        log.info("auto step %d: %s -> %s, %.4fx fp32, ppl ratio %.4f, top-1 %.4f", step["step"], step["layer"], to,
                 step["size_ratio"], figures["ppl_ratio"], figures["top1"])
        return step

    def run(self) -> dict[str, Any]:
        budget = self.auto.budget * self.fp32_bytes
        precisions = {layer.node: "int4" for layer in self.layers}
        step = self.evaluate(precisions, None, None)
        if step["passed"]:
            return step
        if self.size(precisions) > budget:
            step["missed"].append(f"all-int4 size {step['size_ratio']:.4f}x > budget {self.auto.budget:g}x")
            return step
        for to in ("int8", "float"):
            for layer in self.order:
                before = precisions[layer.node]
                if PRECISIONS.index(before) >= PRECISIONS.index(to):
                    continue
                trial = {**precisions, layer.node: to}
                if self.size(trial) > budget:
                    self.skipped.append({"layer": layer.name, "to": to, "size_ratio": round(self.size(trial) / self.fp32_bytes, 4)})
                    continue
                precisions = trial
                step = self.evaluate(precisions, layer, to)
                if step["passed"]:
                    return step
        best = min(self.steps, key=lambda s: (s["ppl_ratio"], -s["top1"]))
        if not any("budget" in m for m in best["missed"]):
            best["missed"].append(f"no further promotion fits the budget of {self.auto.budget:g}x fp32")
        return best

    def record(self, chosen: dict[str, Any], fit: int, held: int) -> dict[str, Any]:
        """The search as the manifest keeps it (the report's table and plot read it)."""
        return {
            "goals": {"max_ppl_ratio": self.auto.max_ppl_ratio, "min_top1": self.auto.min_top1},
            "budget": self.auto.budget,
            "measured_on": f"{held} held-out calibration samples (fp32 ONNX as reference); sensitivity on {fit}",
            "sensitivity": "mean per-token output KL(fp32 || candidate), that layer alone int4",
            "sensitivity_ranking": [{"layer": layer.name, "kl": round(self.sensitivity[layer.node], 8),
                                     "int4_bytes": layer.bytes("int4"), "int8_bytes": layer.bytes("int8"),
                                     "float_bytes": layer.bytes("float")} for layer in self.order],
            "steps": [{k: v for k, v in s.items() if k != "precisions"} for s in self.steps],
            "skipped_over_budget": self.skipped,
            "pareto": pareto_front(self.steps),
            "chosen_step": chosen["step"],
            "chosen": {layer.name: chosen["precisions"][layer.node] for layer in self.order
                       if chosen["precisions"][layer.node] != "int4"},
            "passed": chosen["passed"],
        }


def pareto_front(steps: list[dict[str, Any]]) -> list[int]:
    """Steps no other step beats on both size and perplexity ratio (smaller is better on each)."""
    return [s["step"] for s in steps
            if not any(o["size_bytes"] <= s["size_bytes"] and o["ppl_ratio"] <= s["ppl_ratio"]
                       and (o["size_bytes"], o["ppl_ratio"]) != (s["size_bytes"], s["ppl_ratio"]) for o in steps)]


def describe_choice(precisions: dict[str, str]) -> str:
    promoted = sum(1 for p in precisions.values() if p != "int4")
    return f"{promoted} of {len(precisions)} layers above int4"


def mixed_report(int4_report: dict[str, Any], layers: list[Layer], precisions: dict[str, str],
                 search: dict[str, Any]) -> dict[str, Any]:
    """The scheme's report with the promoted layers' rows rewritten (int8 rows, float layers under kept_float)."""
    by_node = {layer.node: layer for layer in layers}
    rows, kept = [], list(int4_report.get("kept_float", []))
    for row in int4_report.get("quantized", []):
        precision = precisions.get(row.get("node"), "int4")
        if precision == "float":
            kept.append({"node": row["node"], "name": by_node[row["node"]].name, "reason": "auto: kept float"})
            continue
        if precision == "int8":
            row = {**row, "as": f"MatMulNBits(bits=8, block={INT8_BLOCK}, rtn) (auto)"}
        rows.append(row)
    counts = {p: sum(1 for v in precisions.values() if v == p) for p in PRECISIONS}
    summary = (f"auto: {counts['int4']} linear(s) int4, {counts['int8']} int8, {counts['float']} float (step "
               f"{search['chosen_step']} of the search); " + int4_report.get("summary", ""))
    return {**int4_report, "summary": summary, "quantized": rows, "kept_float": kept, "auto": search}
