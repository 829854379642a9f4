"""The fused decoder graph of a LLaMA config, built without its weights.

A copy of the model with the same config but one decoder layer and a tiny vocabulary, filled with distinct random
values, is exported and fused exactly as the whole-model export is (llmship.export.onnx_export, .fusion). Each
float initializer of that graph is then identified by value as a checkpoint tensor, its transpose, or the packed
q/k/v transposes (`WeightSpec`), and the layer's nodes are replicated for every layer of the real config with
renamed values. Between layers the fusion writes the residual add of layer i and the input norm of layer i+1 as one
SkipSimplifiedLayerNormalization (layer 0 reads the embedding through a plain SimplifiedLayerNormalization); the
replication writes the same. The result is a graph whose weight initializers are empty placeholders, to be filled
by the streaming writer: memory is one layer of the model, whatever its depth.
"""

from __future__ import annotations

import ast
import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from llmship.errors import CheckFailed, UserError
from llmship.files import MODEL_FILE

# Rows of the skeleton's vocabulary: a prime no LLaMA width equals, so the one output axis that carries it is found
# unambiguously and replaced by the real vocabulary size.
SKELETON_VOCAB = 61
# MLP width of the skeleton: no node of the fused graph but the three MLP MatMuls depends on it (their weights are
# placeholders sized from the checkpoint), so the one-layer export costs the attention weights only.
SKELETON_MLP = 67
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
PACKED_FROM_KEY = "llmship.packed_from"
LAYER0 = re.compile(r"layers\.0(?=[._'\"]|$)")


@dataclass
class WeightSpec:
    """How an initializer is made from checkpoint tensors: `transform` 'same', 'transpose' or 'concat_t'."""

    sources: list[str]
    transform: str

    def for_layer(self, layer: int) -> WeightSpec:
        return WeightSpec([LAYER0.sub(f"layers.{layer}", s) for s in self.sources], self.transform)

    def build(self, read) -> np.ndarray:
        tensors = [read(s) for s in self.sources]
        if self.transform == "same":
            return tensors[0]
        if self.transform == "transpose":
            return np.ascontiguousarray(tensors[0].T)
        return np.concatenate([t.T for t in tensors], axis=1)

    @property
    def chunk_axis(self) -> int | None:
        """The axis of the built tensor that runs along the checkpoint tensor's rows (None: packed, not chunkable)."""
        return {"same": 0, "transpose": 1}.get(self.transform)

    def build_part(self, read_rows, start: int, stop: int) -> np.ndarray:
        """`build` restricted to [start, stop) along `chunk_axis`: only those checkpoint rows are read."""
        part = read_rows(self.sources[0], slice(start, stop))
        return part if self.transform == "same" else np.ascontiguousarray(part.T)

    def shape(self, shape_of) -> list[int]:
        shapes = [shape_of(s) for s in self.sources]
        if self.transform == "same":
            return list(shapes[0])
        if self.transform == "transpose":
            return list(reversed(shapes[0]))
        return [shapes[0][1], sum(s[0] for s in shapes)]


@dataclass
class Skeleton:
    """An N-layer fused graph (weights as empty placeholders) and the recipe of each placeholder."""

    model: onnx.ModelProto
    specs: dict[str, WeightSpec] = field(default_factory=dict)
    fusion: dict[str, Any] = field(default_factory=dict)


def _scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                value = ast.literal_eval(prop.value)
                return [str(v) for v in value] if isinstance(value, list) else []
            except (ValueError, SyntaxError):
                return []
    return []


def _meta(node: onnx.NodeProto, key: str) -> str | None:
    return next((p.value for p in node.metadata_props if p.key == key), None)


def _hf_name(scope: str) -> str:
    from llmship.quantize.graph import hf_module_path

    return hf_module_path(scope)


def export_one_layer(config: dict[str, Any], folder: Path, *, opset: int, attention: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict]:
    """Export + fuse the one-layer copy of `config` with a tiny vocabulary and MLP; returns (fused graph, its weights,
    fusion report)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmship.export.fusion import fuse_decoder
    from llmship.export.onnx_export import cache_shape, export_decoder

    small = dict(config)
    small.update(num_hidden_layers=1, vocab_size=SKELETON_VOCAB, intermediate_size=SKELETON_MLP, tie_word_embeddings=False, dtype="float32",
                 torch_dtype="float32", pad_token_id=None, bos_token_id=1, eos_token_id=2)
    small.pop("auto_map", None)
    llama_config = LlamaConfig(**small)
    generator = torch.Generator().manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(llama_config).eval()
    with torch.no_grad():
        for param in model.parameters():
            # distinct values everywhere (norm weights too: equal ones would be merged by the fusion's CSE)
            param.copy_(torch.rand(param.shape, generator=generator) * 0.2 - 0.1 if param.ndim > 1
                        else 1.0 + 0.1 * torch.rand(param.shape, generator=generator))
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}  # views: the model is dropped below
    folder.mkdir(parents=True, exist_ok=True)
    export_decoder(model, folder, opset=opset, external_data="auto")
    kv_heads, _ = cache_shape(llama_config)
    del model
    report = fuse_decoder(folder / MODEL_FILE, folder / "fused.onnx", llama_config.num_attention_heads, kv_heads,
                          llama_config.hidden_size, max_positions=llama_config.max_position_embeddings, attention=attention)
    fused = onnx.load(str(folder / "fused.onnx"), load_external_data=True)
    return fused, weights, report


def identify_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> dict[str, WeightSpec]:
    """Which checkpoint tensor(s) each float initializer of the one-layer graph is (by value)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    by_shape: dict[tuple, list[str]] = {}
    for name, value in weights.items():
        by_shape.setdefault(value.shape, []).append(name)
    specs: dict[str, WeightSpec] = {}
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) == 0 or init.name.startswith("rotary_"):
            continue
        value = numpy_helper.to_array(init)
        spec = _match(value, weights, by_shape, consumers.get(init.name, []))
        if spec is None:
            if value.size > 16:
                raise CheckFailed(f"streaming skeleton: initializer {init.name} {list(value.shape)} matches no weight")
            continue
        specs[init.name] = spec
    unused = set(weights) - {s for spec in specs.values() for s in spec.sources}
    if unused:
        raise CheckFailed(f"streaming skeleton: weight {sorted(unused)[0]} is read by no initializer of the graph")
    return specs


def _match(value: np.ndarray, weights, by_shape, consumers) -> WeightSpec | None:
    for name in by_shape.get(value.shape, []):
        if np.array_equal(weights[name], value):
            return WeightSpec([name], "same")
    if value.ndim == 2:
        for name in by_shape.get(value.shape[::-1], []):
            if np.array_equal(weights[name].T, value):
                return WeightSpec([name], "transpose")
    for node in consumers:
        packed = _meta(node, PACKED_FROM_KEY)
        if packed:
            sources = [f"{_hf_name(m)}.weight" for m in ast.literal_eval(packed)]
            if all(s in weights for s in sources) and np.array_equal(np.concatenate([weights[s].T for s in sources], 1), value):
                return WeightSpec(sources, "concat_t")
    return None


def _in_layer0(node: onnx.NodeProto) -> bool:
    return any(LAYER0.search(s) for s in _scopes(node)) or bool(LAYER0.search(node.name))


def replicate_layers(model: onnx.ModelProto, specs: dict[str, WeightSpec], num_layers: int, vocab: int) -> Skeleton:
    """The one-layer graph with its layer repeated `num_layers` times (see the module doc); placeholders empty."""
    graph = model.graph
    for init in graph.initializer:
        if init.name in specs:  # placeholder: the writer fills it (and copies per layer stay small)
            init.ClearField("raw_data")
            del init.float_data[:]
    layer = [n for n in graph.node if _in_layer0(n)]
    layer_ids = {id(n) for n in layer}
    first_norm = next((n for n in layer if n.op_type == "SimplifiedLayerNormalization"), None)
    final_norm = next((n for n in graph.node if id(n) not in layer_ids and n.op_type == "SkipSimplifiedLayerNormalization"
                       and any(s.endswith("model.norm") for s in _scopes(n))), None)
    if first_norm is None or final_norm is None:
        raise UserError("streaming needs the fused graph (RMSNorm fused to SimplifiedLayerNormalization); "
                        "set export.optimize: true", where="export.streaming")
    stream_in = first_norm.input[0]
    produced = {o for n in layer for o in n.output}
    for node in graph.node:
        # a node outside the layer that reads inside it would be shared by every copy: only the final norm may
        if id(node) not in layer_ids and node is not final_norm and any(i in produced for i in node.input):
            raise CheckFailed(f"streaming skeleton: node {node.name} ({node.op_type}) reads layer 0 but carries no layer "
                              "scope; this graph cannot be replicated")
    layer_inits = {i.name for i in graph.initializer if i.name in specs and any(LAYER0.search(s) for s in specs[i.name].sources)}
    layer_inits |= {i.name for i in graph.initializer if LAYER0.search(i.name)}
    inits = {i.name: i for i in graph.initializer}
    down_out, residual = final_norm.input[0], final_norm.input[1]

    nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    new_specs: dict[str, WeightSpec] = {k: v for k, v in specs.items() if k not in layer_inits}
    prev: tuple[str, str] | None = None
    for k in range(num_layers):
        def rename(name: str, k=k) -> str:
            if not name:
                return name
            if name in layer_inits:
                return LAYER0.sub(f"layers.{k}", name) if LAYER0.search(name) else f"{name}__L{k}"
            if name.startswith(("present.0.", "past_key_values.0.")):
                return name.replace(".0.", f".{k}.", 1)
            if name in produced:
                return name if k == 0 else f"{name}__L{k}"
            return name
        resid_in = stream_in if k == 0 else f"{stream_in}__resid__L{k}"
        for node in layer:
            new = copy.deepcopy(node)
            if k > 0:
                new.name = LAYER0.sub(f"layers.{k}", node.name) if LAYER0.search(node.name) else f"{node.name}__L{k}"
                for prop in new.metadata_props:
                    prop.value = LAYER0.sub(f"layers.{k}", prop.value)
            new.input[:] = [resid_in if i == stream_in else rename(i) for i in node.input]
            new.output[:] = [rename(o) for o in node.output]
            if node is first_norm and prev is not None:
                # layer k's input norm also adds layer k-1's residual (as the fusion writes it between layers)
                attrs = [a for a in final_norm.attribute]
                new = helper.make_node("SkipSimplifiedLayerNormalization", [prev[0], prev[1], rename(node.input[1])],
                                       [rename(node.output[0]), f"{new.name}_mean", f"{new.name}_inv_std", resid_in],
                                       name=new.name, domain=final_norm.domain)
                new.attribute.extend(attrs)
                new.metadata_props.extend(copy.deepcopy(list(first_norm.metadata_props)))
                for prop in new.metadata_props:
                    prop.value = LAYER0.sub(f"layers.{k}", prop.value)
            nodes.append(new)
        for name in sorted(layer_inits):  # a fixed order: the same graph, byte for byte, in every process
            init = copy.deepcopy(inits[name])
            init.name = rename(name)
            if name in specs:
                new_specs[init.name] = specs[name].for_layer(k)
            new_inits.append(init)
        prev = (rename(down_out), rename(residual))

    from llmship.quantize.graph import topological_order

    final = copy.deepcopy(final_norm)
    final.input[0], final.input[1] = prev
    body = [n for n in graph.node if id(n) not in layer_ids]
    ordered = topological_order([n if n is not final_norm else final for n in body[:]] + nodes, graph)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(ordered)
    kept = [i for i in graph.initializer if i.name not in layer_inits]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + new_inits)
    del out.graph.value_info[:]
    _replicate_io(out.graph, num_layers, vocab)
    return Skeleton(out, new_specs)


def _replicate_io(graph: onnx.GraphProto, num_layers: int, vocab: int) -> None:
    def copies(values, prefix: str):
        plain = [v for v in values if not v.name.startswith(prefix)]
        template = {v.name.split(".")[-1]: v for v in values if v.name.startswith(prefix)}
        cache = []
        for k in range(num_layers):
            for kind in ("key", "value"):
                v = copy.deepcopy(template[kind])
                v.name = f"{prefix}{k}.{kind}"
                cache.append(v)
        return plain, cache

    plain_in, past = copies(list(graph.input), "past_key_values.")
    del graph.input[:]
    graph.input.extend(plain_in + past)
    plain_out, present = copies(list(graph.output), "present.")
    for out in plain_out:
        if out.name == "logits":
            dims = out.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value == SKELETON_VOCAB:
                dims[-1].dim_value = vocab
    del graph.output[:]
    graph.output.extend(plain_out + present)


def build_skeleton(config: dict[str, Any], scratch: Path, *, opset: int, attention: str) -> Skeleton:
    """The N-layer fused graph of `config` with placeholders for every weight (see the module doc)."""
    one_layer, weights, report = export_one_layer(config, scratch, opset=opset, attention=attention)
    specs = identify_weights(one_layer, weights)
    del weights
    skeleton = replicate_layers(one_layer, specs, config["num_hidden_layers"], config["vocab_size"])
    skeleton.fusion = report
    return skeleton


# A one-layer export whose attention weights reach this many fp32 bytes runs in a child process: the export's
# temporaries (about 1.9 GB peak at LLaMA-7B width, for 0.27 GB of weights) leave with the child instead of staying on
# this process's heap through the rest of the compile. Smaller models skip the child's start-up (a few seconds).
CHILD_PROCESS_BYTES = 64 << 20


def attention_bytes(config: dict[str, Any]) -> int:
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return 4 * hidden * head_dim * (2 * heads + 2 * kv_heads)


def build_skeleton_isolated(config: dict[str, Any], scratch: Path, *, opset: int, attention: str,
                            child: bool | None = None) -> Skeleton:
    """`build_skeleton`, in a child process when the attention weights reach CHILD_PROCESS_BYTES or `child` says so;
    its errors are raised here. A fresh interpreter (not multiprocessing): it never re-imports the caller's script,
    which a user's unguarded script would not survive, and never inherits torch's thread pools."""
    if child is None:
        child = attention_bytes(config) >= CHILD_PROCESS_BYTES
    if not child:
        return build_skeleton(config, scratch, opset=opset, attention=attention)
    import os
    import pickle
    import subprocess
    import sys

    import llmship

    request, result = scratch / "skeleton-request.pkl", scratch / "skeleton-result.pkl"
    request.write_bytes(pickle.dumps((config, str(scratch), opset, attention)))
    package_root = str(Path(llmship.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    code = "import sys; from llmship.export.skeleton import build_in_child; build_in_child(sys.argv[1])"
    run = subprocess.run([sys.executable, "-c", code, str(scratch)], capture_output=True, text=True, env=env)
    if not result.is_file():
        last = (run.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise CheckFailed(f"streaming skeleton: the child process building it exited {run.returncode}: {last}")
    outcome = pickle.loads(result.read_bytes())
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def build_in_child(scratch: str) -> None:
    """The child's side of `build_skeleton_isolated`: the skeleton, or the user-facing error, pickled to a file."""
    import pickle

    folder = Path(scratch)
    config, work, opset, attention = pickle.loads((folder / "skeleton-request.pkl").read_bytes())
    try:
        outcome: Any = build_skeleton(config, Path(work), opset=opset, attention=attention)
    except (UserError, CheckFailed) as exc:
        outcome = exc
    (folder / "skeleton-result.pkl").write_bytes(pickle.dumps(outcome))
