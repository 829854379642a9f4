"""Weight-only quantization shared by w8a16 and w4a16: MatMul -> com.microsoft MatMulNBits (blockwise along K),
token embeddings -> GatherBlockQuantized. Activations stay float."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from llmship.errors import UserError
from llmship.quantize.awq import awq_model
from llmship.quantize.embedding import MS_DOMAIN, quantize_embeddings
from llmship.quantize.feeds import CALIBRATION_BATCH, decoder_inputs, packed_feeds, probe_session
from llmship.quantize.gptq import PERCDAMP, gptq_weight, matmul_nbits_node
from llmship.quantize.graph import describe_node, ensure_node_names, excluded, initializers, linear_nodes, module_name


def _import_quietly():
    """onnxruntime's weight-only quantizer calls logging.basicConfig(level=INFO) on import (a root handler that would
    print every library's INFO logs) and then logs each node it skips: undo the first, silence the second."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)
    return matmul_nbits_quantizer


mnb = _import_quietly()

LAYER_PATTERN = re.compile(r"layers\.\d+(?=\.|_|$)")


@contextmanager
def torch_threads(count: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# MatMulNBits' block size must be a power of two >= 16 (contrib op spec).
MIN_BLOCK = 16


def quantize_matmuls(model: onnx.ModelProto, *, bits: int, block_size: int, symmetric: bool, accuracy_level: int,
                     method: str, exclude: list[str], samples: list[list[int]] | None = None,
                     folder=None, gptq: dict[str, Any] | None = None, awq: dict[str, Any] | None = None,
                     scratch: Path | None = None, method_report: dict[str, Any] | None = None,
                     feeds: list[dict[str, np.ndarray]] | None = None, device: str | None = None,
                     ) -> tuple[onnx.ModelProto, list[dict], list[dict]]:
    """Quantize the linear layers; returns (model, quantized rows, kept-float rows). `method_report`, when given,
    receives what the method searched (AWQ's scales and clips). gptq and awq calibrate on `feeds` (the graph's inputs
    per batch; by default the samples packed) and GPTQ's arithmetic runs on the torch `device` (None: numpy)."""
    ensure_node_names(model)
    inits = initializers(model)
    linears = linear_nodes(model)
    skipped = [n for n in linears if excluded(n, exclude, inits)]
    skip_names = {n.name for n in skipped}
    # MatMulNBits needs K >= 16 rows; tiny matrices would only lose accuracy for nothing.
    for node in linears:
        if inits[node.input[1]].dims[0] < MIN_BLOCK and node.name not in skip_names:
            skipped.append(node)
            skip_names.add(node.name)
    todo = [n for n in linears if n.name not in skip_names]
    rows = [{"node": n.name, "name": describe_node(n, inits), "weight": n.input[1], "shape": list(inits[n.input[1]].dims),
             "op": "MatMul", "as": f"MatMulNBits(bits={bits}, block={block_size}, {method})"} for n in todo]
    kept = [{"node": n.name, "name": describe_node(n, inits), "reason": "excluded" if excluded(n, exclude, inits) else "K < 16"}
            for n in skipped]
    if method == "gptq":
        opts = gptq or {}
        if feeds is None:
            feeds = packed_feeds(samples or [], decoder_inputs(model, folder), batch=CALIBRATION_BATCH)
        result = gptq_model(model, todo, feeds, bits=bits, device=device,
                            block_size=block_size, symmetric=symmetric, percdamp=opts.get("percdamp", PERCDAMP),
                            actorder=opts.get("actorder", False), true_sequential=opts.get("true_sequential", False),
                            accuracy_level=accuracy_level, scratch=scratch)
    else:
        if method == "awq":
            # AWQ only rewrites the float weights (scales folded, ranges clipped); the rounding is plain RTN.
            opts = awq or {}
            if feeds is None:
                feeds = packed_feeds(samples or [], decoder_inputs(model, folder), batch=CALIBRATION_BATCH)
            clip = [n for n in todo if layer_of(n) != "lm_head"] if opts.get("clip", True) else []
            searched = awq_model(model, feeds, bits=bits, block_size=block_size, symmetric=symmetric, skip=skip_names,
                                 clip=clip, scratch=scratch)
            if method_report is not None:
                method_report["awq"] = searched
        if method == "hqq":
            algo = mnb.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=("MatMul",))
        else:
            algo = mnb.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                                    op_types_to_quantize=("MatMul",), bits=bits)
        quantizer = mnb.MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                             accuracy_level=accuracy_level, nodes_to_exclude=sorted(skip_names),
                                             algo_config=algo)
        with torch_threads(1):  # HQQ runs many small torch ops: extra threads only contend (50x slower measured)
            quantizer.process()
        result = quantizer.model.model
    set_accuracy_level(result, accuracy_level)
    if not any(op.domain == MS_DOMAIN for op in result.opset_import):
        result.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return result, rows, kept


def gptq_model(model: onnx.ModelProto, nodes: list[onnx.NodeProto], feeds: list[dict[str, np.ndarray]], *, bits: int,
               block_size: int, symmetric: bool, percdamp: float, actorder: bool, accuracy_level: int,
               scratch: Path | None, true_sequential: bool = False, device: str | None = None) -> onnx.ModelProto:
    """GPTQ every node of `nodes` into MatMulNBits, layer by layer as GPTQ's `llama_sequential` (default mode).

    Per decoder layer, the Hessian H = 2/n * sum(x x^T) of each linear's input (GPTQ `add_batch`) is collected in one
    pass with every earlier layer already quantized, so later layers see, and compensate, the earlier errors; the
    lm_head comes last. Linears whose layer cannot be told from their names form one step per input tensor.
    `true_sequential` (GPTQ's `--true-sequential`, AutoGPTQ's default) splits each layer into one step per input
    tensor in graph order (q/k/v, o, gate/up, down), so o_proj's Hessian already sees the quantized q/k/v, etc.
    """
    inits = initializers(model)
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    steps: dict[str, list[onnx.NodeProto]] = {}
    for node in sorted(nodes, key=lambda n: order[n.name]):
        layer = layer_of(node)
        key = f"{layer}:{node.input[0]}" if layer and true_sequential else layer or f"input:{node.input[0]}"
        steps.setdefault(key, []).append(node)
    for members in steps.values():
        tensors = sorted({n.input[0] for n in members})
        hessians = {t: np.zeros((inits[next(n for n in members if n.input[0] == t).input[1]].dims[0],) * 2) for t in tensors}
        count = 0
        session = probe_session(model, tensors, scratch, exact=False, provider="cuda" if device == "cuda" else "cpu")
        for feed in feeds:
            values = session.run(tensors, feed)
            rows = values[0].reshape(-1, values[0].shape[-1]).shape[0]
            total = count + rows
            for tensor, value in zip(tensors, values, strict=True):
                x = value.reshape(-1, value.shape[-1]).astype(np.float64)
                accumulate_hessian(hessians[tensor], x, count, total)
                del x
            del values
            count = total
        del session
        replaced = {}
        readers = {t: sum(n.input[0] == t for n in members) for t in tensors}
        for node in members:
            weight = numpy_helper.to_array(inits[node.input[1]])
            readers[node.input[0]] -= 1
            last = readers[node.input[0]] == 0  # the last linear reading this input: GPTQ may work in its Hessian
            try:
                levels, scales, zeros = gptq_weight(weight, hessians.pop(node.input[0]) if last else hessians[node.input[0]],
                                                    bits=bits, group_size=block_size,
                                                    symmetric=symmetric, percdamp=percdamp, actorder=actorder,
                                                    device=device, consume_hessian=last)
            except ValueError as exc:  # float32 Cholesky of a Hessian that is not positive definite
                raise UserError(f"GPTQ of {module_name(node) or node.name}: {exc}", where="quantize.options.percdamp") from None
            new, new_inits = matmul_nbits_node(node, levels, scales, zeros, bits=bits, block_size=block_size,
                                               accuracy_level=accuracy_level)
            model.graph.initializer.extend(new_inits)
            replaced[node.name] = new
        kept = [replaced.get(n.name, n) for n in model.graph.node]
        model.graph.ClearField("node")
        model.graph.node.extend(kept)
        used = {i for n in model.graph.node for i in n.input}
        alive = [t for t in model.graph.initializer if t.name in used]
        model.graph.ClearField("initializer")
        model.graph.initializer.extend(alive)
        inits = initializers(model)
    return model


# A Hessian larger than this is updated in blocks of its columns: the product of a whole 7B down_proj input would be a
# second 1 GB K x K array.
HESSIAN_BLOCK_BYTES = 256 << 20


def accumulate_hessian(hessian: np.ndarray, x: np.ndarray, count: int, total: int) -> None:
    """GPTQ's add_batch in place: H = H * count / total + 2 / total * x^T x, for x's rows [rows, K]."""
    hessian *= count / total
    k = hessian.shape[0]
    step = k if k * k * 8 <= HESSIAN_BLOCK_BYTES else max(1, HESSIAN_BLOCK_BYTES // (8 * k))
    for start in range(0, k, step):
        update = x.T @ x[:, start:start + step]
        update *= 2.0 / total
        hessian[:, start:start + step] += update
        del update


def layer_of(node: onnx.NodeProto) -> str | None:
    """'layers.N' from the node's module path, weight name or node name; 'lm_head' for the output projection."""
    for name in (module_name(node) or "", node.input[1], node.name):
        if name == "lm_head" or name.startswith("lm_head"):
            return "lm_head"
        match = LAYER_PATTERN.search(name)
        if match:
            return match.group(0)
    return None


def set_accuracy_level(model: onnx.ModelProto, level: int) -> None:
    """Set MatMulNBits' accuracy_level on every node (HQQ and GPTQ paths do not all pass it through)."""
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        for attr in list(node.attribute):
            if attr.name == "accuracy_level":
                node.attribute.remove(attr)
        if level:
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))


def quantize_weight_only(model: onnx.ModelProto, *, bits: int, block_size: int, symmetric: bool, accuracy_level: int,
                         method: str, exclude: list[str], embeddings: bool, embedding_bits: int, embedding_block: int,
                         samples=None, folder=None, gptq=None, awq=None, scratch=None,
                         device: str | None = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    inits = initializers(model)
    method_report: dict[str, Any] = {}
    total_float = sum(int(np.prod(inits[n.input[1]].dims)) for n in linear_nodes(model))
    model, rows, kept = quantize_matmuls(model, bits=bits, block_size=block_size, symmetric=symmetric,
                                         accuracy_level=accuracy_level, method=method, exclude=exclude,
                                         samples=samples, folder=folder, gptq=gptq, awq=awq, scratch=scratch,
                                         method_report=method_report, device=device)
    emb_rows = quantize_embeddings(model, embedding_bits, embedding_block, exclude) if embeddings else []
    quantized_params = sum(int(np.prod(r["shape"])) for r in rows)
    report = {
        "summary": f"{len(rows)} MatMul -> MatMulNBits({bits} bits, {method}), {len(kept)} kept float, "
                   f"{len(emb_rows)} embedding table(s) -> {embedding_bits} bits" if embeddings else
                   f"{len(rows)} MatMul -> MatMulNBits({bits} bits, {method}), {len(kept)} kept float, embeddings float",
        "quantized": rows + emb_rows,
        "kept_float": kept,
        "linear_params_quantized": quantized_params,
        "linear_params_total": total_float,
        "embeddings_quantized": bool(emb_rows),
        **method_report,
    }
    return model, report
