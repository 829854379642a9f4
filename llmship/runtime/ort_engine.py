"""An exported llmship folder under ONNX Runtime.

The graph has optimum's I/O names (input_ids, attention_mask, position_ids, past_key_values.N.key/value ->
logits, present.N.key/value) and serves prefill (past of length 0) and decode alike. Inputs and outputs
are cast to whatever float type the graph declares, so fp32, fp16 and quantized variants all run here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmship.artifact import read_config_json
from llmship.errors import UserError
from llmship.files import MANIFEST_FILE, MODEL_FILE, read_json_object
from llmship.runtime.base import Cache, Engine, special_ids
from llmship.runtime.layout import runtime_layout
from llmship.runtime.padding import left_padded_to_right, positions_from_mask, right_padded_mask, right_padded_to_left
from llmship.runtime.providers import CPU_ONLY, ort_providers

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class OrtEngine(Engine):
    """prefill/decode over one decoder graph with KV cache; the cache is a list of numpy arrays per input."""

    name = "ort"

    def __init__(self, folder: str | Path, provider: str = "cpu", threads: int = 0, onnx_file: str | None = None):
        self.path = Path(folder)
        manifest = read_json_object(self.path / MANIFEST_FILE)
        onnx_path = self.path / (onnx_file or manifest.get("onnx", {}).get("file", MODEL_FILE))
        if not onnx_path.is_file():
            raise UserError("no model.onnx in the folder (not a compiled llmship variant?)", where=str(self.path))
        self.session = self._open(onnx_path, session_options(threads), ort_providers(provider))
        # A GroupQueryAttention graph reads row lengths from position_ids and needs right-padded prompts
        # (llmship.export.fusion.GQA_CONTRACT); the Engine interface stays left-padded for callers. A fused graph
        # runs as many positions as its rotary cos/sin table has rows (past max_position_embeddings).
        self.padding, self.position_limit = runtime_layout(onnx_path)
        self.provider = self.session.get_providers()[0]
        self.threads = threads
        self.onnx_path = onnx_path
        self.manifest = manifest
        self._describe_io()
        config = read_config_json(self.path)
        generation = read_json_object(self.path / "generation_config.json")
        self.max_positions = int(config.get("max_position_embeddings", 2048))
        self.vocab_size = int(self._vocab or config.get("vocab_size", 0))
        # The export writes the tokenizer's pad id into generation_config.json, so no tokenizer load is needed here.
        self.eos_token_id, self.pad_token_id = special_ids(None, _Obj(generation), _Obj(config))

    def _describe_io(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        for required in ("input_ids", "attention_mask"):
            if required not in inputs:
                raise UserError(f"the graph has no '{required}' input (not an llmship/optimum decoder)", where=str(self.onnx_path))
        self.past_names = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_layer_order)
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.has_positions = "position_ids" in inputs
        self.input_types = {n: ORT_TYPES.get(i.type, np.float32) for n, i in inputs.items()}
        self.past_shapes = {}
        for n in self.past_names:
            shape = inputs[n].shape  # [batch, kv_heads, past, head_dim]
            if not (isinstance(shape[1], int) and isinstance(shape[3], int)):
                raise UserError(f"past input {n} has no static head count/size: {shape}", where=str(self.onnx_path))
            self.past_shapes[n] = (shape[1], shape[3])
        outputs = [o.name for o in self.session.get_outputs()]
        if "logits" not in outputs or any(p not in outputs for p in self.present_names):
            raise UserError("the graph lacks logits/present.N outputs matching its past inputs", where=str(self.onnx_path))
        self.output_names = ["logits", *self.present_names]
        logits_info = self.session.get_outputs()[outputs.index("logits")]
        self._vocab = logits_info.shape[-1] if isinstance(logits_info.shape[-1], int) else None
        self.logits_type = ORT_TYPES.get(logits_info.type, np.float32)
        self.dtype = {np.float32: "float32", np.float16: "float16"}.get(self.input_types.get(self.past_names[0]) if self.past_names
                                                                        else np.float32, "float32")

    def _open(self, onnx_path: Path, options: Any, providers: list[Any]) -> Any:
        return open_session(onnx_path, options, providers)

    def _feeds(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's token inputs (not the past), in the types it declares."""
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.ascontiguousarray(ids, dtype=self.input_types["input_ids"]),
            "attention_mask": np.ascontiguousarray(mask, dtype=self.input_types["attention_mask"]),
        }
        if self.has_positions:
            feeds["position_ids"] = np.ascontiguousarray(positions, dtype=self.input_types["position_ids"])
        return feeds

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list]:
        feeds = self._feeds(ids, mask, positions)
        for name, value in zip(self.past_names, past, strict=True):
            feeds[name] = value
        logits, *present = self.session.run(self.output_names, feeds)
        return logits.astype(np.float32, copy=False), present

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, heads, 0, size), dtype=self.input_types[n]) for n, (heads, size) in self.past_shapes.items()]

    def _prefill_inputs(self, input_ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, positions) of a left-padded prompt batch as the graph takes them (right-padded for GQA)."""
        if self.padding == "right":
            ids, positions, _ = left_padded_to_right(np.asarray(input_ids, dtype=np.int64), mask)
            return ids, positions
        return np.asarray(input_ids), positions_from_mask(mask)

    def _to_left(self, logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return right_padded_to_left(logits, mask) if self.padding == "right" else logits

    @staticmethod
    def _decode_inputs(tokens: np.ndarray, seen_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, grown mask, positions) of one decode step after the positions of `seen_mask`."""
        mask = np.concatenate([seen_mask, np.ones((len(tokens), 1), dtype=np.int64)], axis=1)
        positions = (mask.sum(axis=1, keepdims=True) - 1).astype(np.int64)
        return np.asarray(tokens, dtype=np.int64).reshape(-1, 1), mask, positions

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, Cache]:
        mask = np.asarray(attention_mask, dtype=np.int64)
        ids, positions = self._prefill_inputs(input_ids, mask)
        logits, present = self._run(ids, mask, positions, self._empty_past(len(input_ids)))
        return self._to_left(logits, mask), Cache(past=present, attention_mask=mask)

    def decode(self, tokens: np.ndarray, cache: Cache) -> tuple[np.ndarray, Cache]:
        ids, mask, positions = self._decode_inputs(tokens, cache.attention_mask)
        if cache.extra.get("inplace"):
            return self._decode_inplace(tokens, positions, cache.extra), Cache(past=cache.past, attention_mask=mask,
                                                                              extra=cache.extra)
        logits, present = self._run(ids, mask, positions, cache.past)
        return logits[:, -1, :], Cache(past=present, attention_mask=mask)

    # ------------------------------------------------------------------ in-place KV cache (GroupQueryAttention)
    def prefill_for_generation(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int
                               ) -> tuple[np.ndarray, Cache]:
        """For a GroupQueryAttention graph: one cache buffer per past input, sized for the prompt and every token to
        come, bound as both the past input and the present output (I/O binding), so GQA writes each new key/value
        into it in place instead of concatenating a grown copy of the whole cache on every step. The decode steps
        share one binding with a preallocated logits buffer (binding afresh every step measured 18% slower on a
        200M model). Other graphs: prefill."""
        # CPU only: the buffers are host OrtValues; on CUDA they would be copied to the device each step.
        if self.padding != "right" or not self.past_names or self.provider not in CPU_ONLY:
            return self.prefill(input_ids, attention_mask)
        import onnxruntime as ort

        mask = np.asarray(attention_mask, dtype=np.int64)
        batch = len(mask)
        capacity = mask.shape[1] + max(max_new_tokens, 1)  # one more than the run feeds (its last token is not)
        if self.position_limit is not None:  # `generate` checked that the run itself fits
            capacity = min(capacity, self.position_limit)
        buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, heads, capacity, size), dtype=self.input_types[n]))
                   for n, (heads, size) in self.past_shapes.items()]
        ids, positions, lengths = left_padded_to_right(np.asarray(input_ids, dtype=np.int64), mask)
        logits = self._run_inplace(self._bind_cache(buffers), ids, right_padded_mask(lengths, mask.shape[1]), positions)
        return right_padded_to_left(logits, mask), Cache(past=buffers, attention_mask=mask,
                                               extra=self._decode_binding(buffers, batch, capacity))

    def _decode_binding(self, buffers: list, batch: int, capacity: int) -> dict[str, Any]:
        """The binding every decode step reuses. Token ids, positions and logits live in numpy arrays bound once
        (OrtValues over their memory): a step writes the new tokens into them and reads the logits out, with no
        per-step OrtValue for them; only the attention mask, whose width grows, is bound afresh. On the 200M
        benchmark model this per-step overhead was a tenth of an int4 decode step."""
        import onnxruntime as ort

        arrays = {"input_ids": np.zeros((batch, 1), dtype=self.input_types["input_ids"]),
                  "logits": np.zeros((batch, 1, self.vocab_size), dtype=self.logits_type)}
        if self.has_positions:
            arrays["position_ids"] = np.zeros((batch, 1), dtype=self.input_types["position_ids"])
        binding = self._bind_cache(buffers, ort.OrtValue.ortvalue_from_numpy(arrays["logits"]))
        for name in ("input_ids", "position_ids"):
            if name in arrays:
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arrays[name]))
        return {"inplace": True, "capacity": capacity, "binding": binding, "arrays": arrays}

    def _decode_inplace(self, tokens: np.ndarray, positions: np.ndarray, extra: dict[str, Any]) -> np.ndarray:
        arrays, binding = extra["arrays"], extra["binding"]
        arrays["input_ids"][:, 0] = tokens
        if "position_ids" in arrays:
            arrays["position_ids"][:] = positions
        mask = right_padded_mask(positions[:, 0] + 1)
        binding.bind_cpu_input("attention_mask", mask.astype(self.input_types["attention_mask"], copy=False))
        self.session.run_with_iobinding(binding)
        # a copy: the next step writes into the same logits buffer
        return arrays["logits"][:, -1, :].astype(np.float32, copy=True)

    def _bind_cache(self, buffers: list, logits: Any = None) -> Any:
        """An I/O binding with every cache buffer bound as past input and present output (and logits, when given)."""
        binding = self.session.io_binding()
        if logits is None:  # bound first: get_outputs() lists outputs in binding order
            binding.bind_output("logits")
        else:
            binding.bind_ortvalue_output("logits", logits)
        for past, present, buffer in zip(self.past_names, self.present_names, buffers, strict=True):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        return binding

    def _run_inplace(self, binding: Any, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=self.input_types["input_ids"]))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=self.input_types["attention_mask"]))
        if self.has_positions:
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=self.input_types["position_ids"]))
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy().astype(np.float32, copy=False)

    def info(self) -> dict[str, Any]:
        in_place = self.padding == "right" and self.provider in CPU_ONLY
        kv_cache = "in-place (GroupQueryAttention, I/O binding)" if in_place else "concatenated per step"
        options = self.session.get_session_options()  # what the session was built with, 0 = ONNX Runtime's default
        return {"engine": self.name, "provider": self.provider, "threads": options.intra_op_num_threads,
                "interop_threads": options.inter_op_num_threads, "dtype": self.dtype,
                "padding": self.padding, "kv_cache": kv_cache,
                "path": str(self.path), "scheme": self.manifest.get("scheme", "none")}

    def close(self) -> None:
        self.session = None


def owned(value: np.ndarray) -> np.ndarray:
    """`value` (an ONNX Runtime output) as an array of its own. ORT's outputs are views of the session's memory arena
    (onnxruntime 1.2x and later): one kept past the session keeps the whole arena, as big as the largest run's
    activations, alive with it."""
    return value if value.flags.owndata else np.array(value, copy=True)


def session_options(threads: int) -> Any:
    """The session options every llmship ORT session uses: `threads` intra-op (0: ONNX Runtime's default), one
    inter-op, every graph optimization."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def open_session(onnx_path: Path, options: Any, providers: list[Any]) -> Any:
    """An InferenceSession, or one line naming the graph that ONNX Runtime cannot load."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - invalid graph, missing .data, unsupported op
        raise UserError(f"ONNX Runtime cannot load the graph: {str(exc).splitlines()[0][:300]}", where=str(onnx_path)) from None


def _layer_order(name: str) -> tuple[int, int]:
    _, layer, kind = name.split(".")
    return int(layer), 0 if kind == "key" else 1


class _Obj:
    """Attribute view of a JSON dict (generation_config.json / config.json)."""

    def __init__(self, data: dict):
        self.__dict__.update(data)
