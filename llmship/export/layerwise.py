"""A PyTorch reference that holds one decoder layer at a time, for parity checks of streamed variants.

The Hugging Face LlamaForCausalLM is built on the meta device; the final norm is loaded from the checkpoint, and
each decoder layer loads its weights from the checkpoint (through the same reader, LoRA merge included) just before
it runs, into buffers that every layer reuses, and drops them right after. The vocabulary tables are not held either
(1.6 GB in fp32 at Chinese-LLaMA's 49953 x 4096): the embedding reads the rows of each forward's ids, lm_head its rows
in chunks of 64 MB. The model computes what the whole model computes (same modules, same fp32 weights) with the
memory of one layer; every forward reads the checkpoint again, which is what it costs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _load(module: torch.nn.Module, prefix: str, checkpoint: Any) -> None:
    state = {name: checkpoint.tensor(f"{prefix}{name}") for name, _ in module.named_parameters()}
    module.load_state_dict(state, assign=True, strict=True)


class LayerBuffers:
    """One decoder layer's fp32 parameters, allocated once and refilled from the checkpoint for every layer: a fresh
    0.8 GB per layer (LLaMA-7B) costs more in page faults than the copy itself (measured 0.26 s against 0.04 s)."""

    def __init__(self, checkpoint: Any):
        self.checkpoint = checkpoint
        self.buffers: dict[str, torch.Tensor] = {}

    def load(self, module: torch.nn.Module, prefix: str) -> None:
        state = {}
        for name, param in module.named_parameters():
            buffer = self.buffers.get(name)
            if buffer is None or buffer.shape != param.shape:
                buffer = self.buffers[name] = torch.empty(param.shape, dtype=torch.float32)
            state[name] = self.checkpoint.read_into(f"{prefix}{name}", buffer)
        module.load_state_dict(state, assign=True, strict=True)


# lm_head is read and applied in chunks of this many fp32 bytes of its rows (the streaming writer's chunk size).
HEAD_CHUNK_BYTES = 64 << 20


class CheckpointEmbedding(torch.nn.Module):
    """The input table, read from the checkpoint row by row for the ids of each forward."""

    def __init__(self, checkpoint: Any, name: str):
        super().__init__()
        self.checkpoint, self.name = checkpoint, name
        self.weight = torch.empty(checkpoint.shape(name), device="meta")  # the shape, for callers that read it

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids, return_inverse=True)
        return self.checkpoint.rows(self.name, unique.tolist())[inverse]


class CheckpointHead(torch.nn.Module):
    """lm_head, read from the checkpoint and applied in chunks of rows (output columns) on each forward."""

    def __init__(self, checkpoint: Any, name: str):
        super().__init__()
        self.checkpoint, self.name = checkpoint, name
        self.weight = torch.empty(checkpoint.shape(name), device="meta")
        self.chunk_rows = max(1, HEAD_CHUNK_BYTES // (4 * self.weight.shape[1]))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        vocab = self.weight.shape[0]
        out = hidden.new_empty((*hidden.shape[:-1], vocab))
        for start in range(0, vocab, self.chunk_rows):
            rows = slice(start, min(start + self.chunk_rows, vocab))
            out[..., rows] = torch.nn.functional.linear(hidden, self.checkpoint.tensor(self.name, rows))
        return out


def layerwise_model(checkpoint: Any, config: dict[str, Any], model_dir: Path | None = None) -> torch.nn.Module:
    """LlamaForCausalLM whose decoder layers are loaded from `checkpoint` one at a time (see the module doc)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    settings = {k: v for k, v in config.items() if k not in ("torch_dtype", "dtype", "auto_map")}
    llama_config = LlamaConfig(**settings, dtype="float32")
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config)
    model.model.rotary_emb = LlamaRotaryEmbedding(llama_config)  # buffers computed, not loaded
    model.model.embed_tokens = CheckpointEmbedding(checkpoint, "model.embed_tokens.weight")
    _load(model.model.norm, "model.norm.", checkpoint)
    model.lm_head = CheckpointHead(checkpoint, "lm_head.weight")
    buffers = LayerBuffers(checkpoint)
    for index, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{index}."
        layer.register_forward_pre_hook(lambda module, args, prefix=prefix: buffers.load(module, prefix))
        layer.register_forward_hook(lambda module, args, output: module.to("meta") and None)
    if model_dir is not None and (Path(model_dir) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    return model.eval()


def layerwise_engine(checkpoint: Any, config: dict[str, Any], tokenizer: Any, *, threads: int = 0,
                     model_dir: Path | None = None) -> Any:
    """A TorchEngine over `layerwise_model`: what parity compares a streamed variant with."""
    from llmship.runtime.torch_engine import TorchEngine

    model = layerwise_model(checkpoint, config, model_dir)
    return TorchEngine(model, tokenizer, threads=threads, path=str(model_dir or ""), dtype="float32")
