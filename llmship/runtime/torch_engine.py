"""The PyTorch baseline: the Hugging Face model in its source dtype, with a DynamicCache."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from llmship.runtime.base import Cache, Engine, special_ids
from llmship.runtime.padding import positions_from_mask


def cache_kwarg(model: Any) -> str:
    """Name of the cache argument: transformers >= 5.2x calls it `cache`, earlier 5.x `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class TorchEngine(Engine):
    """Runs a loaded `SourceModel` (or any LlamaForCausalLM) through the Engine interface.

    The cache is a transformers DynamicCache grown in place: a Cache passed to `decode` must not be reused.
    """

    name = "torch"
    plan: Any = None  # the BaselinePlan that built this engine as the baseline (llmship.runtime.torch_baseline)

    def __init__(self, model: Any, tokenizer: Any = None, *, threads: int = 0, path: str | None = None, dtype: str | None = None):
        if threads > 0:
            from llmship.runtime.threads import set_torch_threads

            set_torch_threads(threads)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.threads = torch.get_num_threads()
        self.path = path
        self.dtype = dtype or str(next(model.parameters()).dtype).removeprefix("torch.")
        config = model.config
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.eos_token_id, self.pad_token_id = special_ids(tokenizer, getattr(model, "generation_config", None), config)
        self.max_positions = int(getattr(config, "max_position_embeddings", 2048))
        self._cache_kwarg = cache_kwarg(model)

    @classmethod
    def from_source(cls, source: Any, threads: int = 0) -> TorchEngine:
        return cls(source.model, source.tokenizer, threads=threads, path=source.path, dtype=source.dtype)

    def _forward(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: Any) -> tuple[np.ndarray, Any]:
        from transformers import DynamicCache

        if past is None:
            past = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)),
                attention_mask=torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64)),
                position_ids=torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)),
                use_cache=True,
                **{self._cache_kwarg: past},
            )
        return out.logits.float().numpy(), output_cache(out)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, Cache]:
        logits, past = self._forward(input_ids, attention_mask, positions_from_mask(attention_mask), None)
        return logits, Cache(past=past, attention_mask=np.asarray(attention_mask, dtype=np.int64))

    def decode(self, tokens: np.ndarray, cache: Cache) -> tuple[np.ndarray, Cache]:
        mask = np.concatenate([cache.attention_mask, np.ones((len(tokens), 1), dtype=np.int64)], axis=1)
        positions = (mask.sum(axis=1, keepdims=True) - 1).astype(np.int64)
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        logits, past = self._forward(ids, mask, positions, cache.past)
        return logits[:, -1, :], Cache(past=past, attention_mask=mask)

    def info(self) -> dict[str, Any]:
        device = str(next(self.model.parameters()).device)
        return {"engine": self.name, "provider": f"torch-{device}", "threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads(), "dtype": self.dtype, "path": self.path,
                **({"baseline": self.plan.describe()} if self.plan is not None else {})}

    def close(self) -> None:
        self.model = None
