"""LlamaForCausalLM -> one ONNX decoder graph with KV cache (torch.onnx.export, dynamo exporter).

The graph takes a past of any length, 0 included, so one graph serves prefill and decode. Names follow
optimum's convention: input_ids, attention_mask, position_ids, past_key_values.N.key/value -> logits,
present.N.key/value; cache tensors are (batch, kv_heads, length, head_dim).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from llmship.files import INLINE_WEIGHTS_LIMIT, MODEL_FILE
from llmship.runtime.torch_engine import cache_kwarg, output_cache

log = logging.getLogger("llmship")

# Example sizes used only for tracing; every one of these axes is exported as dynamic. Distinct values
# (and none equal to 1) keep torch.export from specialising an axis or merging two of them.
TRACE_BATCH, TRACE_SEQ, TRACE_PAST = 2, 3, 5


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def cache_shape(config: Any) -> tuple[int, int]:
    """(kv_heads, head_dim) of a LLaMA config (GQA when kv_heads < heads)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


class DecoderWithCache(torch.nn.Module):
    """Flat tensors in and out around the HF model, which wants a Cache object."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        self.cache_kwarg = cache_kwarg(model)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_kwarg: cache})
        present = []
        for layer in output_cache(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def wants_external_data(model: torch.nn.Module, mode: str) -> bool:
    if mode == "always":
        return True
    if mode == "never":
        return False
    return parameter_bytes(model) > INLINE_WEIGHTS_LIMIT


def export_decoder(model: torch.nn.Module, folder: Path, *, opset: int = 18, external_data: str = "auto") -> dict[str, Any]:
    """Write `folder/model.onnx` (+ model.onnx.data) from an fp32 model; returns what the manifest records."""
    config = model.config
    layers = config.num_hidden_layers
    kv_heads, head_dim = cache_shape(config)
    dtype = next(model.parameters()).dtype
    inputs, outputs = io_names(layers)
    ids = torch.randint(0, config.vocab_size, (TRACE_BATCH, TRACE_SEQ), dtype=torch.int64)
    mask = torch.ones(TRACE_BATCH, TRACE_PAST + TRACE_SEQ, dtype=torch.int64)
    positions = torch.arange(TRACE_PAST, TRACE_PAST + TRACE_SEQ, dtype=torch.int64).expand(TRACE_BATCH, -1)
    past = tuple(torch.zeros(TRACE_BATCH, kv_heads, TRACE_PAST, head_dim, dtype=dtype) for _ in range(2 * layers))
    token_axes = {0: "batch", 1: "sequence_length"}
    dynamic = (token_axes, {0: "batch", 1: "total_sequence_length"}, token_axes,
               tuple({0: "batch", 2: "past_sequence_length"} for _ in range(2 * layers)))
    external = wants_external_data(model, external_data)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / MODEL_FILE
    wrapper = DecoderWithCache(model).eval()
    # The exporter prints its progress to stdout (llmship keeps stdout for results) and warns about optional
    # torchvision ops a decoder never uses.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, (ids, mask, positions, *past), dynamo=True, opset_version=opset,
                                    input_names=inputs, output_names=outputs, dynamic_shapes=dynamic, verbose=False)
        program.save(str(target), external_data=external)
    return {"file": MODEL_FILE, "external_data": external, "opset": opset, "inputs": inputs, "outputs": outputs,
            "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "exporter": "torch.onnx.export(dynamo=True)"}
