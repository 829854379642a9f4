"""Memory-bandwidth roofline of decoding: how close each engine gets to the limit of streaming what a step reads.

Decoding one token (one step of a batch) reads every weight of the decoder once, plus the KV cache of every sequence
in the batch, so a step cannot be faster than (weight bytes + cache bytes) / read bandwidth. The figures here are:
- `measure_read_bandwidth`: best of a few timed ONNX Runtime float32 GEMVs over a weight far larger than the CPU
  caches, with the engines' thread count: the access pattern of a decode step, so the bandwidth an engine can use.
- `onnx_weight_bytes` / `torch_weight_bytes`: bytes of weights read per decode step. Approximation: every initializer
  (and Constant tensor >= 1 KiB) counts in full, except tables used only through Gather/GatherBlockQuantized
  (the token embedding) or as RotaryEmbedding/GroupQueryAttention cos/sin caches, of which one row per
  step is counted. ORT's pre-packed copies are not counted (same size as the originals).
- `decode_cache_bytes`: bytes of KV cache the run's decode steps read: each live sequence reads the keys and values
  of its whole context (prompt and tokens so far) once per step. Padding and finished rows are not counted (the
  least any engine must read), nor are activations. On a 200M model with an fp32 cache a 500-token context reads
  45 MB per step, as much as a third of its int8 weights; on a 7B fp16 model it is under a tenth.
- limit decode steps/s = bandwidth / (weight bytes + mean cache bytes per step); fraction achieved = bytes read per
  step x measured decode steps per second / bandwidth, which holds for any batch size. The weights-only fraction is
  kept beside it (`weights_fraction_of_limit`).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmship.files import GENAI_CONFIG_FILE
from llmship.runtime.providers import CPU_ONLY

BANDWIDTH_ARRAY_BYTES = 256 << 20  # far above any CPU's last-level cache
BANDWIDTH_REPEATS = 8
BANDWIDTH_ROW = 16384  # K of the probe's matrix (N follows from the size)
# Inputs read one row per looked-up index (token id or position): embedding tables, rotary cos/sin caches.
ROW_READ_OPS = {"Gather": (0,), "GatherBlockQuantized": (0, 2, 3), "RotaryEmbedding": (2, 3), "GroupQueryAttention": (7, 8)}
SUB_BYTE_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2}
CONSTANT_MIN_BYTES = 1024


def measure_read_bandwidth(threads: int = 0, array_bytes: int = BANDWIDTH_ARRAY_BYTES,
                           repeats: int = BANDWIDTH_REPEATS) -> dict[str, Any]:
    """Best read bandwidth (bytes/s): ONNX Runtime running a float32 matrix-vector product (MatMul [1, K] x [K, N])
    over a weight far larger than the CPU caches, with the engines' thread count.

    Decoding is exactly this (every weight read once per token), so the probe streams memory the way the engines do,
    with the same library and threads. (A numpy sum, the earlier probe, is compute-bound on one core per thread:
    15 GB/s on the machine where this GEMV reads 38 GB/s and BLAS sgemv 44 GB/s.)"""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    threads = threads if threads > 0 else (os.cpu_count() or 1)
    rows = BANDWIDTH_ROW
    cols = max(1, array_bytes // 4 // rows)
    weight = numpy_helper.from_array(np.ones((rows, cols), dtype=np.float32), "weight")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "weight"], ["y"])], "bandwidth_probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=CPU_ONLY)
    del model, graph, weight
    x = np.ones((1, rows), dtype=np.float32)
    session.run(None, {"x": x})  # first run: pages touched, any pre-packing done
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        (y,) = session.run(None, {"x": x})
        best = max(best, rows * cols * 4 / (time.perf_counter() - start))
    if not math.isclose(float(y[0, 0]), rows):  # the product was really computed
        raise RuntimeError("bandwidth probe computed wrongly")
    return {"bytes_per_s": best, "gb_per_s": best / 1e9, "threads": threads, "array_bytes": rows * cols * 4,
            "repeats": repeats, "method": "ONNX Runtime float32 GEMV (MatMul [1,K] x [K,N]), best of repeats"}


def tensor_bytes(tensor: Any) -> int:
    """Stored bytes of an onnx TensorProto from its dims and type (external data need not be loaded)."""
    from onnx import TensorProto, helper

    count = math.prod(tensor.dims) if len(tensor.dims) else 1
    name = TensorProto.DataType.Name(tensor.data_type)
    if name in SUB_BYTE_BITS:
        return (count * SUB_BYTE_BITS[name] + 7) // 8
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def onnx_weight_bytes(onnx_path: str | Path) -> dict[str, Any]:
    """Bytes of weights read per decode step of an ONNX decoder (see the module docstring for the approximation)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    consumers: dict[str, list[tuple[str, int]]] = {}
    for node in _all_nodes(graph):
        for slot, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node.op_type, slot))
    total = full = rows = 0
    for init in graph.initializer:
        size = tensor_bytes(init)
        total += size
        uses = consumers.get(init.name, [])
        if uses and len(init.dims) >= 1 and init.dims[0] > 0 and all(slot in ROW_READ_OPS.get(op, ()) for op, slot in uses):
            rows += size // init.dims[0]
        else:
            full += size
    for node in _all_nodes(graph):
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t is not None:
                    size = tensor_bytes(attr.t)
                    if size >= CONSTANT_MIN_BYTES:
                        total += size
                        full += size
    return {"bytes_per_step": full + rows, "weight_bytes": total, "row_read_bytes": rows, "source": "onnx initializers"}


def _all_nodes(graph: Any) -> list[Any]:
    nodes = list(graph.node)
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                nodes.extend(_all_nodes(attr.g))
    return nodes


def torch_weight_bytes(model: Any) -> dict[str, Any]:
    """Bytes of weights read per decode step of a PyTorch causal LM: all parameters, one row of an untied embedding."""
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embedding.data_ptr()
    rows = 0
    full = total
    if not tied:
        table = embedding.numel() * embedding.element_size()
        rows = table // embedding.shape[0]
        full = total - table
    return {"bytes_per_step": full + rows, "weight_bytes": total, "row_read_bytes": rows, "source": "torch parameters"}


def cache_bytes_per_token(layers: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """KV-cache bytes one context token adds: a key and a value vector per layer."""
    return 2 * layers * kv_heads * head_dim * itemsize


def onnx_cache_bytes_per_token(onnx_path: str | Path) -> int:
    """KV-cache bytes per context token of an ONNX decoder: its past_key_values.* inputs, [batch, heads, past, size].
    A symbolic head count or size (the onnxruntime-genai builder's `kv_cache_dim`) is read from genai_config.json."""
    import onnx
    from onnx import helper

    path = Path(onnx_path)
    total = 0
    for value in onnx.load(str(path), load_external_data=False).graph.input:
        if value.name.startswith("past_key_values."):
            tensor = value.type.tensor_type
            heads, size = (tensor.shape.dim[i].dim_value for i in (1, 3))
            if not (heads and size):
                heads, size = _genai_cache_shape(path.parent / GENAI_CONFIG_FILE)
            total += heads * size * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize
    return total


def _genai_cache_shape(config_file: Path) -> tuple[int, int]:
    import json

    from llmship.errors import UserError

    try:
        decoder = json.loads(config_file.read_text(encoding="utf-8"))["model"]["decoder"]
        return int(decoder["num_key_value_heads"]), int(decoder["head_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"the graph's KV cache shape is symbolic and genai_config.json cannot give it ({exc!r})",
                        where=str(config_file)) from None


def decode_cache_bytes(lengths: list[tuple[int, int]], batches: list[list[int]], bytes_per_token: int) -> int:
    """Cache bytes read by every decode step of the run: step j (1 .. output_len - 1) of a sequence with a P-token
    prompt attends over P + j cached positions (the new token's own key and value included)."""
    total = 0
    for batch in batches:
        for i in batch:
            prompt, output = lengths[i]
            steps = max(output - 1, 0)
            total += steps * prompt + steps * (steps + 1) // 2
    return total * bytes_per_token


def roofline(bytes_per_step: int, bandwidth: float, decode_steps: int, decode_seconds: float,
             cache_bytes_per_step: float = 0.0) -> dict[str, Any]:
    """Limit and achieved figures for one engine (bandwidth in bytes/s; bytes_per_step: weights)."""
    steps_per_s = decode_steps / decode_seconds if decode_seconds > 0 else 0.0
    read_per_step = bytes_per_step + cache_bytes_per_step
    return {
        "bytes_per_step": read_per_step,
        "weight_bytes_per_step": bytes_per_step,
        "cache_bytes_per_step": cache_bytes_per_step,
        "limit_steps_per_s": bandwidth / read_per_step,  # = decode tokens/s at batch 1
        "decode_steps_per_s": steps_per_s,
        "achieved_bytes_per_s": read_per_step * steps_per_s,
        "fraction_of_limit": read_per_step * steps_per_s / bandwidth,
        "weights_fraction_of_limit": bytes_per_step * steps_per_s / bandwidth,
    }
