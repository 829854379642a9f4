"""ONNX graph helpers shared by the schemes: loading/saving, naming, exclusions, the quantized-node report.

Exclusion patterns (`variant.exclude`) are fnmatch patterns matched against three names of a node: its ONNX
node name, the name of its weight initializer, and the PyTorch module it came from (the last name scope the
torch exporter records in the node's metadata, e.g. `model.layers.0.mlp.down_proj`, `lm_head`).
"""

from __future__ import annotations

import ast
import fnmatch
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from llmship.errors import CheckFailed
from llmship.files import INLINE_WEIGHTS_LIMIT, MODEL_DATA_FILE, MODEL_FILE

# Metadata key under which torch.onnx (dynamo) records the module path of every node.
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def load_model(path: Path) -> onnx.ModelProto:
    """Load a model with its external data."""
    return onnx.load(str(path), load_external_data=True)


def strip_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug metadata (stack traces, FX nodes) but keep the module path that exclusion
    patterns and reports use; on a small model the traces are several percent of the file."""
    for node in model.graph.node:
        keep = [(p.key, p.value) for p in node.metadata_props if p.key == NAME_SCOPES_KEY]
        if len(keep) != len(node.metadata_props):
            node.ClearField("metadata_props")
            for key, value in keep:
                node.metadata_props.add(key=key, value=value)


def save_model(model: onnx.ModelProto, folder: Path, external_data: str = "auto") -> Path:
    """Write `folder/model.onnx` (+ `model.onnx.data` when large or asked); returns the model path."""
    strip_metadata(model)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MODEL_FILE
    for stale in (path, folder / MODEL_DATA_FILE):
        if stale.exists():
            stale.unlink()
    external = external_data == "always" or (external_data == "auto" and model.ByteSize() > INLINE_WEIGHTS_LIMIT)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=MODEL_DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def model_size_on_disk(folder: Path) -> int:
    """Bytes of the ONNX model files in `folder` (graph + external data)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.startswith(MODEL_FILE))


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def module_name(node: onnx.NodeProto) -> str | None:
    """The Hugging Face module a node was exported from (`model.layers.0.self_attn.q_proj`, `lm_head`), if recorded."""
    for prop in node.metadata_props:
        if prop.key != NAME_SCOPES_KEY:
            continue
        try:
            scopes = [s for s in ast.literal_eval(prop.value) if s]
        except (ValueError, SyntaxError):
            return None
        # The last scope is the aten op itself (`linear_3`); the one before it is the module.
        return hf_module_path(scopes[-2]) if len(scopes) >= 2 else None
    return None


def hf_module_path(scope: str) -> str:
    """Strip export wrappers: `model.model.layers.0.mlp` -> `model.layers.0.mlp`, `model.lm_head` -> `lm_head`."""
    parts = scope.split(".")
    if parts[-1] == "lm_head":
        return "lm_head"
    for anchor in ("model.layers.", "model.norm", "model.embed_tokens"):
        at = scope.rfind(anchor)
        if at >= 0:
            return scope[at:]
    return scope


def weight_input(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str | None:
    """Name of the constant weight of a MatMul (input B) or Gather (data), when it is an initializer."""
    if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
        return node.input[1]
    if node.op_type == "Gather" and node.input and node.input[0] in inits:
        return node.input[0]
    return None


def linear_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul nodes whose B is a 2-D float initializer: the model's linear layers (lm_head included)."""
    inits = initializers(model)
    found = []
    for node in model.graph.node:
        name = weight_input(node, inits) if node.op_type == "MatMul" else None
        if name and len(inits[name].dims) == 2 and inits[name].data_type == onnx.TensorProto.FLOAT:
            found.append(node)
    return found


def embedding_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Gather nodes reading a 2-D float initializer table (token embeddings)."""
    inits = initializers(model)
    found = []
    for node in model.graph.node:
        name = weight_input(node, inits) if node.op_type == "Gather" else None
        if name and len(inits[name].dims) == 2 and inits[name].data_type == onnx.TensorProto.FLOAT:
            found.append(node)
    return found


def node_names(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> list[str]:
    """Every name an exclusion pattern may match: node name, weight name, module path."""
    names = [node.name]
    weight = weight_input(node, inits)
    if weight:
        names.append(weight)
    module = module_name(node)
    if module:
        names.append(module)
    return [n for n in names if n]


def excluded(node: onnx.NodeProto, patterns: Iterable[str], inits: dict[str, onnx.TensorProto]) -> bool:
    names = node_names(node, inits)
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns for name in names)


def ensure_node_names(model: onnx.ModelProto) -> None:
    """Give unnamed nodes unique names: node lists (exclusions, fp16 block lists) are keyed by name."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(_tensor_nbytes(t) for t in model.graph.initializer)


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    for loc in t.external_data:
        if loc.key == "length":
            return int(loc.value)
    try:
        return numpy_helper.to_array(t).nbytes
    except Exception:  # noqa: BLE001 - a tensor we cannot size counts as 0
        return 0


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def describe_node(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str:
    """`module (node)` when the module is known, else the node name: what reports show."""
    module = module_name(node)
    return f"{module} ({node.name})" if module else node.name


def to_array(t: onnx.TensorProto, base_dir: str | os.PathLike | None = None) -> np.ndarray:
    return numpy_helper.to_array(t, base_dir=str(base_dir) if base_dir else "")


def topological_order(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes in an order where every input is produced before it is read (stable: keeps the given order when it can).
    Rewrites that append nodes at the end (the fp16 converter's Casts) leave graphs ONNX Runtime accepts but that
    cutting a graph into layers (llmship.runtime.segmented) cannot read in order."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    producers = {o for n in nodes for o in n.output}
    pending = list(nodes)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available or i not in producers for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise CheckFailed(f"graph: cycle or missing input at node {rest[0].name}")
        pending = rest
    return ordered
