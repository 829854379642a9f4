"""A compiled variant run one decoder layer at a time, for teacher-forced checks of models too large to hold whole.

ONNX Runtime holds a whole variant in memory to run it (7-10 GB for a 7B int8 one). A parity check does not need
the variant's own choices, only its logits along the reference's tokens (teacher forcing), so every forward of the
check is known before the first one runs. The graph is cut into segments of about one decoder layer (the prologue:
embedding, mask and rotary, goes with the first layer; the final norm and lm_head with the last), and each segment
gets one session that runs every forward of the check before the next segment loads. Memory is one segment's
weights plus the small activations between segments; each weight is read from disk once. The kernels are the whole
graph's, so the logits agree with the whole-graph run to float rounding (ONNX Runtime fuses within a segment only).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmship.errors import UserError
from llmship.runtime.base import Cache
from llmship.runtime.ort_engine import OrtEngine, open_session, owned
from llmship.runtime.padding import left_pad

log = logging.getLogger(__name__)

# The marks of a decoder layer in llmship's graphs: weight and node names of the exporter (`layers.3.`, `/layers.3/`),
# the streaming builder's per-layer suffix (`__L3`), and the KV cache's inputs and outputs.
LAYER_MARK = re.compile(r"layers\.(\d+)[./]|__L(\d+)(?!\d)|^(?:past_key_values|present)\.(\d+)\.")
ONNX_TYPES = {1: "tensor(float)", 10: "tensor(float16)", 11: "tensor(double)", 7: "tensor(int64)", 6: "tensor(int32)"}


def layer_mark(name: str) -> int:
    """The decoder layer a tensor or node name belongs to, -1 when it names none."""
    marks = [int(next(g for g in m.groups() if g is not None)) for m in LAYER_MARK.finditer(name)]
    return max(marks, default=-1)


@dataclass
class Segment:
    """Consecutive nodes of the graph (topological order kept) with what they read from outside."""

    nodes: list[Any] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)        # graph inputs and tensors of earlier segments
    outputs: list[str] = field(default_factory=list)       # graph outputs and tensors later segments read
    initializers: list[str] = field(default_factory=list)


def cut_graph(graph: Any) -> list[Segment]:
    """The graph's segments. A node's segment is the largest of its own layer mark and its producers' segments, so
    every tensor flows forward; the nodes before the first layer join it and the nodes after the last join that."""
    if any(a.type in (5, 10) for n in graph.node for a in n.attribute):  # GRAPH / GRAPHS: subgraphs read implicitly
        raise ValueError("the graph has control-flow subgraphs; it cannot be cut into layers")
    produced_in: dict[str, int] = {}
    marks = []
    for node in graph.node:
        names = [node.name, *node.input, *node.output]
        mark = max([layer_mark(n) for n in names] + [produced_in.get(n, -1) for n in node.input])
        marks.append(mark)
        for out in node.output:
            produced_in[out] = mark
    first = max(0, min((m for m in marks if m >= 0), default=0))
    order = sorted({max(m, first) for m in marks})
    segments = {m: [] for m in order}
    for node, mark in zip(graph.node, marks, strict=True):
        segments[max(mark, first)].append(node)
    return segments_of(graph, [segments[m] for m in order])


def segments_of(graph: Any, groups: list[list[Any]]) -> list[Segment]:
    """Segments of consecutive node groups (graph order kept): what each reads from outside and makes for later ones.
    ValueError when a group reads a tensor a later group makes, or a layer's past before its present is made."""
    initializers = {t.name for t in graph.initializer}
    home = {out: position for position, nodes in enumerate(groups) for node in nodes for out in node.output}
    graph_outputs = {o.name for o in graph.output}
    result = [Segment(nodes=list(nodes)) for nodes in groups]
    for position, segment in enumerate(result):
        own = {out for node in segment.nodes for out in node.output}
        reads = dict.fromkeys(i for node in segment.nodes for i in node.input if i)
        segment.initializers = [n for n in reads if n in initializers]
        segment.inputs = [n for n in reads if n not in own and n not in initializers]
        later = {i for seg in result[position + 1:] for node in seg.nodes for i in node.input}
        segment.outputs = [o for o in dict.fromkeys(own) if o in graph_outputs or o in later]
        for name in segment.inputs:
            if home.get(name, -1) > position:
                raise ValueError(f"segment {position} reads {name} from a later segment")
    _check_cache_order(result)
    return result


def _check_cache_order(segments: list[Segment]) -> None:
    """A layer's present must be made no later than the segments reading its past: the next forward reads it."""
    made = {o: i for i, s in enumerate(segments) for o in s.outputs if o.startswith("present.")}
    for position, segment in enumerate(segments):
        for name in segment.inputs:
            if name.startswith("past_key_values.") and made.get(_present(name), position) > position:
                raise ValueError(f"{name} is read before the segment that makes its present")


def _present(past_name: str) -> str:
    return past_name.replace("past_key_values.", "present.", 1)


class _GraphOnly:
    """The parts of an InferenceSession OrtEngine reads to describe a graph, from the graph without its weights."""

    def __init__(self, graph: Any, options: Any, providers: list[Any]):
        self._inputs = [_Arg(v) for v in graph.input]
        self._outputs = [_Arg(v) for v in graph.output]
        self._options = options
        first = providers[0]
        self._provider = first[0] if isinstance(first, tuple) else first

    def get_inputs(self) -> list[Any]:
        return self._inputs

    def get_outputs(self) -> list[Any]:
        return self._outputs

    def get_providers(self) -> list[str]:
        return [self._provider]

    def get_session_options(self) -> Any:
        return self._options


class _Arg:
    def __init__(self, value: Any):
        tensor = value.type.tensor_type
        self.name = value.name
        self.type = ONNX_TYPES.get(tensor.elem_type, "tensor(float)")
        self.shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]


class SegmentedOrtEngine(OrtEngine):
    """An OrtEngine for teacher-forced runs only (`forced_runs`): it never holds more than one segment's weights. It
    cannot choose tokens step by step, so `prefill`, `decode` and `generate` are not served."""

    name = "ort"
    steps_freely = False

    def _open(self, onnx_path: Path, options: Any, providers: list[Any]) -> Any:
        import onnx

        self.model = onnx.load(str(onnx_path), load_external_data=False)
        try:
            self.segments = cut_graph(self.model.graph)
        except ValueError as exc:  # a graph llmship did not build: no layer structure to cut along
            raise UserError(f"the parity check cannot run this graph a layer at a time ({exc}); set "
                            "export.parity.layer_at_a_time: never", where=str(onnx_path)) from None
        self._options, self._providers = options, providers
        return _GraphOnly(self.model.graph, options, providers)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, Cache]:
        raise NotImplementedError("a layer-at-a-time engine serves teacher-forced runs only (forced_runs)")

    def decode(self, tokens: np.ndarray, cache: Cache) -> tuple[np.ndarray, Cache]:
        raise NotImplementedError("a layer-at-a-time engine serves teacher-forced runs only (forced_runs)")

    def prefill_for_generation(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int
                               ) -> tuple[np.ndarray, Cache]:
        raise NotImplementedError("a layer-at-a-time engine serves teacher-forced runs only (forced_runs)")

    def info(self) -> dict[str, Any]:
        return {**super().info(), "kv_cache": "concatenated per step", "layer_at_a_time": len(self.segments)}

    def forced_runs(self, prompts: Sequence[Sequence[int]], fed: Sequence[Sequence[int]]
                    ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]]:
        """As Engine.forced_runs, every forward at once, one segment at a time."""
        programs = [self._program(prompt, tokens) for prompt, tokens in zip(prompts, fed, strict=True)]
        ids, mask = left_pad([list(p) for p in prompts], self.pad_token_id)
        batch_ids, positions = self._prefill_inputs(ids, mask)
        programs.append([self._feeds(batch_ids, mask, positions)])
        logits = self._run_programs(programs)
        solo = []
        for prompt, forwards in zip(prompts, logits, strict=False):
            one_mask = np.ones((1, len(prompt)), dtype=np.int64)
            prefill = self._to_left(forwards[0], one_mask)[0]
            steps = np.stack([f[0, -1] for f in forwards[1:]]) if len(forwards) > 1 else np.zeros((0, prefill.shape[-1]), np.float32)
            solo.append((prefill, steps))
        batch = self._to_left(logits[-1][0], mask)
        width = ids.shape[1]
        return solo, [batch[row, width - len(p):] for row, p in enumerate(prompts)]

    def _program(self, prompt: Sequence[int], tokens: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """The token inputs of each forward of one prompt run alone: its prefill, then one fed token per step."""
        mask = np.ones((1, len(prompt)), dtype=np.int64)
        ids, positions = self._prefill_inputs(np.array([list(prompt)], dtype=np.int64), mask)
        forwards = [self._feeds(ids, mask, positions)]
        for token in tokens:
            step_ids, mask, positions = self._decode_inputs(np.array([token], dtype=np.int64), mask)
            forwards.append(self._feeds(step_ids, mask, positions))
        return forwards

    def _run_programs(self, programs: list[list[dict[str, np.ndarray]]]) -> list[list[np.ndarray]]:
        """Logits of every forward of every program. A program's forwards share a KV cache: each one's past is the
        present of the forward before it (empty for the first)."""
        store: dict[tuple[int, int, str], np.ndarray] = {}
        logits: list[list[np.ndarray | None]] = [[None] * len(p) for p in programs]
        last_use = self._last_uses()
        for position, segment in enumerate(self.segments):
            session = self._session(position, segment, programs, store)
            wanted = segment.outputs
            for p, forwards in enumerate(programs):
                for c, feeds in enumerate(forwards):
                    values = dict(zip(wanted, session.run(wanted, self._inputs(segment, p, c, feeds, store)),
                                      strict=True))
                    for name, value in values.items():
                        if name == "logits":
                            logits[p][c] = owned(value.astype(np.float32, copy=False))
                        elif last_use.get(name, -1) >= position:
                            store[(p, c, name)] = owned(value)  # or every segment's arena lives to the last reader
            del session
            for key in [k for k in store if last_use.get(k[2], -1) <= position]:
                del store[key]
        return logits  # type: ignore[return-value]

    def _last_uses(self) -> dict[str, int]:
        """The last segment that reads each tensor (a present: the last that reads its layer's past)."""
        last: dict[str, int] = {}
        for position, segment in enumerate(self.segments):
            for name in segment.inputs:
                key = _present(name) if name.startswith("past_key_values.") else name
                last[key] = position
        return last

    def _inputs(self, segment: Segment, program: int, forward: int, feeds: dict[str, np.ndarray],
                store: dict[tuple[int, int, str], np.ndarray]) -> dict[str, np.ndarray]:
        values = {}
        for name in segment.inputs:
            if name in feeds:
                values[name] = feeds[name]
            elif name.startswith("past_key_values."):
                values[name] = (store[(program, forward - 1, _present(name))] if forward
                                else self._empty_cache(name, len(feeds["input_ids"])))
            else:
                values[name] = store[(program, forward, name)]
        return values

    def _empty_cache(self, name: str, batch: int) -> np.ndarray:
        heads, size = self.past_shapes[name]
        return np.zeros((batch, heads, 0, size), dtype=self.input_types[name])

    def _session(self, position: int, segment: Segment, programs: list[list[dict[str, np.ndarray]]],
                 store: dict[tuple[int, int, str], np.ndarray]) -> Any:
        """One segment's session: a graph of its nodes written beside the variant (its weights stay in the variant's
        data file, referenced by offset) and removed once ONNX Runtime has loaded it."""
        import onnx
        from onnx import helper

        graph_inputs = {v.name: v for v in self.model.graph.input}
        declared = []
        for name in segment.inputs:
            if name in graph_inputs:
                declared.append(graph_inputs[name])
            else:
                sample = store[(0, 0, name)]
                declared.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(sample.dtype),
                                                              [f"{name}_{axis}" for axis in range(sample.ndim)]))
        outputs = [onnx.ValueInfoProto(name=name) for name in segment.outputs]
        initializers = {t.name: t for t in self.model.graph.initializer}
        graph = helper.make_graph(segment.nodes, f"segment_{position}", declared, outputs,
                                  initializer=[initializers[n] for n in segment.initializers])
        model = helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        path = self.onnx_path.with_name(f".segment-{os.getpid()}-{position}.onnx")
        try:
            path.write_bytes(model.SerializeToString())
            return open_session(path, self._options, self._providers)
        finally:
            path.unlink(missing_ok=True)


# A model over this runs its parity check a layer at a time (`parity.layer_at_a_time: auto`): a whole ONNX Runtime
# session holds all its weights plus prepacked copies (9.8 GiB for a 7.8 GB 7B w8a16 variant), against about one
# layer's here. Small models keep the whole-graph run, which also checks that the graph loads and steps as a whole.
LAYER_AT_A_TIME_BYTES = 1 << 30


def parity_engine(folder: str | Path, mode: str, provider: str = "cpu", threads: int = 0,
                  onnx_file: str | None = None, export_mode: str = "auto") -> OrtEngine:
    """The engine a parity check runs the variant in `folder` with. `mode`: the check's parity.layer_at_a_time; a
    variant's `auto` defers to the export's (`export_mode`), so that one switch serves a whole compile."""
    from llmship.files import model_size

    mode = export_mode if mode == "auto" else mode
    layered = mode == "always" or (mode == "auto" and model_size(Path(folder)) > LAYER_AT_A_TIME_BYTES)
    engine = SegmentedOrtEngine if layered else OrtEngine
    return engine(folder, provider=provider, threads=threads, onnx_file=onnx_file)
