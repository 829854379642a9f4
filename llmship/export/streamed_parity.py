"""Parity of a streamed variant against the layer-at-a-time PyTorch reference (llmship.export.layerwise).

The reference reads the whole checkpoint on every forward, so its side of the check is computed once per checkpoint,
prompts and parity settings and kept in output.dir's .llmship/parity, where every variant (in this process or a later
one) reads it back:
- the prompts (`parity.prompts`): sampled from the reference (`model`, the default, as in the whole-model compile:
  longest - 1 passes over the checkpoint, 47 at the defaults) or the bundled sample texts (`samples`, no pass);
- the trace (`batched_reference_trace`: the prompts as one batch, max(decode_steps, greedy_tokens) + 1 passes).
The reference model is freed before ONNX Runtime loads the variant, so the check holds one of the two at a time.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

from llmship.memory import release_freed_memory


class _Reference:
    """The layer-at-a-time reference, built on first use and freed by `close`."""

    def __init__(self, cfg: Any, inputs: dict[str, Any]):
        self.cfg, self.inputs, self.engine = cfg, inputs, None

    def get(self) -> Any:
        if self.engine is None:
            from llmship.export.layerwise import layerwise_engine

            inputs = self.inputs
            self.engine = layerwise_engine(inputs["checkpoint"], inputs["config"], inputs["tokenizer"],
                                           threads=self.cfg.runtime.threads, model_dir=inputs["model_dir"])
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            gc.collect()
            release_freed_memory()


def _prompts(reference: _Reference, inputs: dict[str, Any], tolerances: Any, folder: Path, steps: Any, name: str
             ) -> tuple[list[list[int]], dict[str, Any]]:
    """The parity prompts and what the manifest says of them; model-sampled ones are kept in `folder`."""
    from llmship.cache import stage_key
    from llmship.export.parity import (
        MAX_PROMPT_TOKENS,
        PROMPT_SEED,
        PROMPT_TEMPERATURE,
        SAMPLES_SOURCE,
        default_prompts,
        parity_prompts,
    )
    from llmship.files import write_json_atomic

    if tolerances.prompts == "samples":
        max_positions = int(inputs["config"].get("max_position_embeddings", 2048))
        return default_prompts(inputs["tokenizer"], max_positions), dict(SAMPLES_SOURCE)
    key = stage_key(inputs["source"], tolerances.prompts, PROMPT_SEED, PROMPT_TEMPERATURE, MAX_PROMPT_TOKENS)
    stored = folder / f"prompts-{key}.json"
    if stored.is_file():
        kept = json.loads(stored.read_text())
        return kept["prompts"], kept["source"]
    steps(f"{name}: sampling the parity prompts from PyTorch, one decoder layer at a time")
    prompts, source = parity_prompts(reference.get(), inputs["tokenizer"], tolerances)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stored, {"prompts": prompts, "source": source})
    return prompts, source


def _trace(reference: _Reference, inputs: dict[str, Any], tolerances: Any, prompts: list[list[int]], folder: Path,
           steps: Any, name: str) -> Any:
    from llmship.cache import stage_key
    from llmship.export.parity import batched_reference_trace, load_trace, save_trace

    key = stage_key(inputs["source"], prompts, tolerances.decode_steps, tolerances.greedy_tokens)
    stored = folder / f"reference-{key}.npz"
    if stored.is_file():
        return load_trace(stored)
    passes = 1 + max(tolerances.decode_steps, tolerances.greedy_tokens)
    steps(f"{name}: PyTorch reference, one decoder layer at a time ({passes} passes over the checkpoint)")
    trace = batched_reference_trace(reference.get(), tolerances, prompts)
    folder.mkdir(parents=True, exist_ok=True)
    save_trace(stored, trace)
    return trace


def streamed_parity(cfg: Any, folder: Path, inputs: dict[str, Any], tolerances: Any, steps: Any, name: str
                    ) -> tuple[dict[str, Any], float]:
    """Parity figures of the variant in `folder` (with `prompt_source`), and the seconds spent on the reference's
    side (0 when all of it was read back)."""
    from llmship.export.parity import check_parity
    from llmship.runtime.segmented import parity_engine

    kept = inputs["out"] / ".llmship" / "parity"
    started = time.perf_counter()
    reference = _Reference(cfg, inputs)
    try:
        prompts, prompt_source = _prompts(reference, inputs, tolerances, kept, steps, name)
        trace = _trace(reference, inputs, tolerances, prompts, kept, steps, name)
    finally:
        computed = reference.engine is not None
        reference.close()
    reference_s = time.perf_counter() - started if computed else 0.0
    steps(f"{name}: checking parity against PyTorch")
    candidate = parity_engine(folder, tolerances.layer_at_a_time, cfg.runtime.provider, cfg.runtime.threads,
                              export_mode=cfg.export.parity.layer_at_a_time)
    try:
        figures = check_parity(None, candidate, tolerances, prompts, trace=trace)
    finally:
        candidate.close()
    return {**figures, "prompt_source": prompt_source}, reference_s
