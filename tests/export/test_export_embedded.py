"""The bundled model (llmship/assets/tiny-llama-zh) exports with the default config and passes the default fp32
parity (logits diff <= 1e-4, identical greedy tokens, top-1 agreement 1.0), and runs through load_engine."""

from __future__ import annotations

import numpy as np
import pytest

from llmship.config import EMBEDDED_MODEL_DIR, ModelConfig
from llmship.runtime import left_pad, load_engine
from llmship.source import load_tokenizer

pytestmark = pytest.mark.skipif(not (EMBEDDED_MODEL_DIR / "config.json").is_file(), reason="embedded model not built")


def test_embedded_model_passes_default_fp32_parity(embedded_fp32):
    artifact = embedded_fp32  # export_fp32 with the default config, once per session
    parity = artifact.manifest["parity"]
    assert parity["passed"], parity["failures"]
    assert parity["max_logits_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0
    assert parity["greedy_match"] == 1.0 and parity["greedy_matched_tokens"] == [32] * parity["prompts"]
    assert parity["prompts"] == 4 and len(set(parity["prompt_tokens"])) > 1

    # The artifact tokenizes like the source and its engine agrees with the PyTorch baseline on a padded batch.
    source_tok, artifact_tok = load_tokenizer(EMBEDDED_MODEL_DIR), load_tokenizer(artifact.path)
    texts = ["今天天气很好，我们去公园散步。", "The capital of France is"]
    ids = [source_tok(t)["input_ids"] for t in texts]
    assert ids == [artifact_tok(t)["input_ids"] for t in texts]
    ort_engine, torch_engine = load_engine(artifact.path), load_engine(ModelConfig())
    batch = left_pad(ids, ort_engine.pad_token_id)
    a, _ = ort_engine.prefill(*batch)
    b, _ = torch_engine.prefill(*batch)
    mask = batch[1].astype(bool)
    assert np.abs(a[mask] - b[mask]).max() <= 1e-4
