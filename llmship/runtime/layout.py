"""What a compiled decoder graph asks of its runtime, read from the graph without its weights' data: the batch layout
(GroupQueryAttention needs right padding) and how many positions its fused rotary tables hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmship.files import MANIFEST_FILE, MODEL_FILE, read_json_object
from llmship.runtime.padding import Padding

# Input index of the cos table: RotaryEmbedding(input, position_ids, cos_cache, sin_cache) and
# GroupQueryAttention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, ...).
COS_CACHE_INPUT = {"RotaryEmbedding": 2, "GroupQueryAttention": 7}


def runtime_layout(model_path: Path) -> tuple[Padding, int | None]:
    """(batch layout, position limit) of a decoder graph, from one read of the graph without its weights' data."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    padding: Padding = "right" if any(n.op_type == "GroupQueryAttention" for n in graph.node) else "left"
    return padding, graph_position_limit(graph)


def runtime_padding(model_path: Path) -> Padding:
    """The batch layout a decoder graph needs: "right" when its attention is GroupQueryAttention (any variant made
    from a GQA-fused graph: fp16, int8, int4 keep the op), else "left"."""
    return runtime_layout(model_path)[0]


def graph_position_limit(graph: Any) -> int | None:
    """Positions a decoder graph (onnx GraphProto) can run: the rows of the smallest cos table its fused rotary
    ops read (0 .. rows-1), or None when rotary is computed from the positions in the graph (no limit). Graphs fused
    before llmship.export.fusion.ROTARY_TABLE_FACTOR have max_position_embeddings rows, so they report exactly that."""
    rows = {init.name: int(init.dims[0]) for init in graph.initializer if init.dims}
    for node in graph.node:  # tables kept as Constant nodes by a rewrite
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.dims:
            rows[node.output[0]] = int(node.attribute[0].t.dims[0])
    limits = []
    for node in graph.node:
        index = COS_CACHE_INPUT.get(node.op_type) if node.domain == "com.microsoft" else None
        # a table computed by other nodes has no size to read here: ORT itself reports a position past it
        if index is not None and len(node.input) > index and node.input[index] in rows:
            limits.append(rows[node.input[index]])
    return min(limits) if limits else None


def folder_graph(folder: str | Path) -> Path:
    """The decoder graph of a compiled folder: the file its manifest names, model.onnx by default."""
    path = Path(folder)
    return path / read_json_object(path / MANIFEST_FILE).get("onnx", {}).get("file", MODEL_FILE)


def folder_position_limit(folder: str | Path) -> int | None:
    """`OrtEngine.position_limit` of a compiled folder without starting a session (None: no limit, or no graph
    to read: loading the engine then reports what is wrong with the folder)."""
    graph = folder_graph(folder)
    if not graph.is_file():
        return None
    try:
        return runtime_layout(graph)[1]
    except Exception:  # noqa: BLE001 - an unreadable graph: OrtEngine's load gives the one-line error
        return None
