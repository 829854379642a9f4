"""Calibration feeds for an exported decoder: the calibration set's token lists as ONNX Runtime inputs.

Each sample is fed as one prefill (batch 1, the whole sample, an empty KV cache). The hidden states at a position
are the same whether the position is computed in a prefill or in a decode step with the cache, so the inputs of
the linear layers (what static quantization calibrates) see the same values either way; only the attention
products over the cache differ, and llmship never quantizes those. Prefill-only feeds keep calibration from being
dominated by single-token steps (a mixed prefill/decode set with percentile calibration collapsed a small model).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader

from llmship.runtime.providers import CPU_ONLY, ort_providers

# Packed calibration rows per ONNX Runtime run (GPTQ Hessians, AWQ, static ranges): batched runs cost far less than
# one run per row.
CALIBRATION_BATCH = 8
_NUMPY_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
                onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}


@dataclass
class DecoderInputs:
    names: list[str]
    dtypes: dict[str, type]
    past_shape: dict[str, tuple[int, int]]  # past input -> (kv heads, head dim)


def decoder_inputs(model: onnx.ModelProto, folder: Path | None = None) -> DecoderInputs:
    """The graph's inputs, with the static dims of its KV-cache inputs (from the graph, else config.json)."""
    config = {}
    if folder is not None and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    init_names = {t.name for t in model.graph.initializer}
    names, dtypes, past = [], {}, {}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        names.append(inp.name)
        ttype = inp.type.tensor_type
        dtypes[inp.name] = _NUMPY_TYPES.get(ttype.elem_type, np.float32)
        if inp.name.startswith("past_key_values"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
            heads = dims[1] if len(dims) == 4 and dims[1] else config.get("num_key_value_heads") or config.get(
                "num_attention_heads")
            head_dim = dims[3] if len(dims) == 4 and dims[3] else config.get("head_dim") or (
                config["hidden_size"] // config["num_attention_heads"])
            past[inp.name] = (int(heads), int(head_dim))
    return DecoderInputs(names, dtypes, past)


def prefill_feed(tokens: list[int], spec: DecoderInputs) -> dict[str, np.ndarray]:
    n = len(tokens)
    feed: dict[str, np.ndarray] = {}
    for name in spec.names:
        if name == "input_ids":
            feed[name] = np.asarray([tokens], dtype=spec.dtypes[name])
        elif name == "attention_mask":
            feed[name] = np.ones((1, n), dtype=spec.dtypes[name])
        elif name == "position_ids":
            feed[name] = np.arange(n, dtype=spec.dtypes[name])[None, :]
        elif name in spec.past_shape:
            heads, head_dim = spec.past_shape[name]
            feed[name] = np.zeros((1, heads, 0, head_dim), dtype=spec.dtypes[name])
        else:
            raise ValueError(f"decoder input '{name}' is not one llmship feeds (input_ids, attention_mask, position_ids, past)")
    return feed


def calibration_feeds(samples: list[list[int]], spec: DecoderInputs, limit: int | None = None) -> list[dict[str, np.ndarray]]:
    chosen = samples if limit is None else samples[:limit]
    return [prefill_feed(s, spec) for s in chosen if len(s) > 0]


def packed_feeds(samples: list[list[int]], spec: DecoderInputs, length: int | None = None, limit: int | None = None,
                 batch: int = 1) -> list[dict[str, np.ndarray]]:
    """The samples concatenated and cut into rows of one length (the longest sample's, by default), `batch` rows per
    prefill: ONNX Runtime's histogram calibrators (entropy, percentile) stack every run's tensors, so all runs must
    have one shape, and batched runs cost far less than one run per sample. Every token is used once; a short tail is
    dropped once there is a full row, and the last batch drops rows that would not fill it."""
    chosen = [s for s in (samples if limit is None else samples[:limit]) if s]
    length = length or max(len(s) for s in chosen)
    stream = [token for sample in chosen for token in sample]
    rows = [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)] or [stream]
    batch = max(1, min(batch, len(rows)))
    feeds = []
    for start in range(0, len(rows) - batch + 1, batch):
        group = [prefill_feed(row, spec) for row in rows[start:start + batch]]
        feeds.append({name: np.concatenate([f[name] for f in group], axis=0) for name in group[0]})
    return feeds


class FeedReader(CalibrationDataReader):
    """ORT CalibrationDataReader over a list of feeds (deep-copyable, rewindable: GPTQ copies it)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def rewind(self) -> None:
        self.position = 0

    def __len__(self) -> int:
        return len(self.feeds)


# A model larger than this is handed to ONNX Runtime through a scratch file, its weights copied there tensor by
# tensor: from serialized bytes ORT would hold the bytes, its parsed copy and its own tensors at once (three copies
# of a 1.3 GB 7B layer besides the caller's).
PROBE_FILE_BYTES = 256 << 20


def probe_session(model: onnx.ModelProto, names: list[str], scratch: Path | None, exact: bool = True,
                  provider: str = "cpu") -> ort.InferenceSession:
    """A session of `model` (CPU unless `provider` says otherwise) that also returns the intermediate tensors `names`;
    `exact` turns graph optimizations off, so every node computes in its declared type (the fp16 scan needs that;
    statistics of float tensors do not). `model` is left as it was."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings about initializers left unused by the rewrites
    if exact:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = CPU_ONLY if provider == "cpu" else ort_providers(provider)
    existing = {o.name for o in model.graph.output}
    added = [onnx.ValueInfoProto(name=name) for name in dict.fromkeys(names) if name not in existing]
    if model.ByteSize() > PROBE_FILE_BYTES:
        # probes run a few batches: the prepacked copy of every MatMul weight would cost more memory than it saves time
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False  # the arena would keep the largest batch's activations
        base = scratch if scratch is not None and scratch.is_dir() else None
        with tempfile.TemporaryDirectory(prefix=".llmship-probe-", dir=base) as tmp:
            path = write_by_reference(model, Path(tmp), added)
            return ort.InferenceSession(str(path), options, providers=providers)
    model.graph.output.extend(added)  # for the serialization only
    try:
        serialized = model.SerializeToString()
    finally:
        del model.graph.output[len(model.graph.output) - len(added):]
    return ort.InferenceSession(serialized, options, providers=providers)


def write_by_reference(model: onnx.ModelProto, folder: Path, extra_outputs: list[onnx.ValueInfoProto]) -> Path:
    """`folder/model.onnx` with every initializer of `model` in `folder/model.onnx.data` (written tensor by tensor,
    `model` untouched) and `extra_outputs` added."""
    from llmship.files import MODEL_DATA_FILE, MODEL_FILE

    graph = onnx.GraphProto()
    for field in ("name", "node", "input", "output", "value_info", "sparse_initializer"):
        if field == "name":
            graph.name = model.graph.name
        else:
            getattr(graph, field).extend(getattr(model.graph, field))
    graph.output.extend(extra_outputs)
    offset = 0
    with (folder / MODEL_DATA_FILE).open("wb") as data:
        for init in model.graph.initializer:
            if len(init.raw_data) < 1024:  # small constants stay inline: shape inference reads them (split sizes)
                graph.initializer.append(init)
                continue
            pad = -offset % 4096  # page-aligned: ONNX Runtime can map the file instead of copying it
            data.write(b"\0" * pad)
            offset += pad
            data.write(init.raw_data)
            ref = graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims,
                                        data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", MODEL_DATA_FILE), ("offset", str(offset)), ("length", str(len(init.raw_data)))):
                ref.external_data.add(key=key, value=value)
            offset += len(init.raw_data)
    copy = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, graph=graph)
    path = folder / MODEL_FILE
    path.write_bytes(copy.SerializeToString())
    return path
