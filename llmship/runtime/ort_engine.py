"""An exported llmship folder under ONNX Runtime.

The graph has optimum's I/O names (input_ids, attention_mask, position_ids, past_key_values.N.key/value ->
logits, present.N.key/value) and serves prefill (past of length 0) and decode alike. Inputs and outputs
are cast to whatever float type the graph declares, so fp32, fp16 and quantized variants all run here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llmship.errors import UserError
from llmship.runtime.base import Cache, Engine, positions_from_mask

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


class OrtEngine(Engine):
    """prefill/decode over one decoder graph with KV cache; the cache is a list of numpy arrays per input."""

    name = "ort"

    def __init__(self, folder: str | Path, provider: str = "cpu", threads: int = 0, onnx_file: str | None = None):
        import onnxruntime as ort

        self.path = Path(folder)
        manifest = _read_json(self.path / "manifest.json")
        onnx_path = self.path / (onnx_file or manifest.get("onnx", {}).get("file", "model.onnx"))
        if not onnx_path.is_file():
            raise UserError("no model.onnx in the folder (not a compiled llmship variant?)", where=str(self.path))
        if provider not in PROVIDERS:
            raise UserError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}", where="runtime.provider")
        ep = PROVIDERS[provider]
        if ep not in ort.get_available_providers():
            raise UserError(f"ONNX Runtime has no {ep} here (install onnxruntime-gpu for cuda)", where="runtime.provider")
        opts = ort.SessionOptions()
        if threads > 0:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = [ep] if ep == "CPUExecutionProvider" else [ep, "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - invalid graph, missing .data, unsupported op
            raise UserError(f"ONNX Runtime cannot load the graph: {str(exc).splitlines()[0][:300]}", where=str(onnx_path)) from None
        self.provider = self.session.get_providers()[0]
        self.threads = threads
        self.onnx_path = onnx_path
        self.manifest = manifest
        self._describe_io()
        config = _read_json(self.path / "config.json")
        generation = _read_json(self.path / "generation_config.json")
        self.max_positions = int(config.get("max_position_embeddings", 2048))
        self.vocab_size = int(self._vocab or config.get("vocab_size", 0))
        self._tokenizer = None
        # The export writes the tokenizer's pad id into generation_config.json, so no tokenizer load is needed here.
        from llmship.runtime.torch_engine import special_ids

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
        logits_shape = self.session.get_outputs()[outputs.index("logits")].shape
        self._vocab = logits_shape[-1] if isinstance(logits_shape[-1], int) else None
        self.dtype = {np.float32: "float32", np.float16: "float16"}.get(self.input_types.get(self.past_names[0]) if self.past_names
                                                                        else np.float32, "float32")

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from llmship.export.source import load_tokenizer

            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list]:
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.ascontiguousarray(ids, dtype=self.input_types["input_ids"]),
            "attention_mask": np.ascontiguousarray(mask, dtype=self.input_types["attention_mask"]),
        }
        if self.has_positions:
            feeds["position_ids"] = np.ascontiguousarray(positions, dtype=self.input_types["position_ids"])
        for name, value in zip(self.past_names, past, strict=True):
            feeds[name] = value
        logits, *present = self.session.run(self.output_names, feeds)
        return logits.astype(np.float32, copy=False), present

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, heads, 0, size), dtype=self.input_types[n]) for n, (heads, size) in self.past_shapes.items()]

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, Cache]:
        mask = np.asarray(attention_mask, dtype=np.int64)
        logits, present = self._run(input_ids, mask, positions_from_mask(mask), self._empty_past(len(input_ids)))
        return logits, Cache(past=present, attention_mask=mask)

    def decode(self, tokens: np.ndarray, cache: Cache) -> tuple[np.ndarray, Cache]:
        mask = np.concatenate([cache.attention_mask, np.ones((len(tokens), 1), dtype=np.int64)], axis=1)
        positions = (mask.sum(axis=1, keepdims=True) - 1).astype(np.int64)
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        logits, present = self._run(ids, mask, positions, cache.past)
        return logits[:, -1, :], Cache(past=present, attention_mask=mask)

    def info(self) -> dict[str, Any]:
        return {"engine": self.name, "provider": self.provider, "threads": self.threads, "dtype": self.dtype,
                "path": str(self.path), "scheme": self.manifest.get("scheme", "none")}

    def close(self) -> None:
        self.session = None


def _layer_order(name: str) -> tuple[int, int]:
    _, layer, kind = name.split(".")
    return int(layer), 0 if kind == "key" else 1


class _Obj:
    """Attribute view of a JSON dict (generation_config.json / config.json)."""

    def __init__(self, data: dict):
        self.__dict__.update(data)
