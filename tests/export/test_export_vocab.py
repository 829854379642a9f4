"""Chinese-LLaMA-style checkpoints: an extended SentencePiece vocabulary (49952 pieces + <pad> = 49953 rows) and a
PEFT LoRA adapter (r=8 on q,k,v,o,gate,down,up; modules_to_save embed_tokens,lm_head; resized vocab) merged before export."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from llmship.config import Config, ModelConfig
from llmship.errors import UserError
from llmship.export import export_fp32
from llmship.export.tiny import extend_tokenizer, make_llama, make_tokenizer
from llmship.runtime import OrtEngine, left_pad
from llmship.source import load_source, load_tokenizer

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]


def _export(model_dir: Path, out: Path, adapter: Path | None = None, optimize: bool = True):
    cfg = Config()
    cfg.model.path = str(model_dir)
    cfg.export.optimize = optimize
    cfg.model.adapter = str(adapter) if adapter else None
    cfg.export.parity.greedy_tokens = 16
    return export_fp32(cfg, out)


def test_extended_vocab_with_pad_exports_and_passes_parity(tmp_path):
    tok_dir = tmp_path / "tok"
    make_tokenizer(tok_dir, 400)
    extend_tokenizer(tok_dir, 49952)
    model_dir = make_llama(tmp_path / "model", tokenizer_from=tok_dir / "tokenizer.model", pad_token="<pad>")
    tokenizer = load_tokenizer(model_dir)
    assert len(tokenizer) == 49953 and tokenizer.pad_token_id == 49952
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    text = "丁七万丈三"  # pieces appended by the extension
    ids = tokenizer(text)["input_ids"]
    assert ids == [1, *sp.encode(text)] and max(ids) >= 400

    artifact = _export(model_dir, tmp_path / "fp32", optimize=False)  # fusion is covered elsewhere; keep this quick
    parity = artifact.manifest["parity"]
    assert parity["passed"] and parity["max_logits_diff"] <= 1e-4 and parity["greedy_match"] == 1.0
    engine = OrtEngine(artifact.path)
    assert engine.vocab_size == 49953 and engine.pad_token_id == 49952
    assert load_tokenizer(artifact.path)(text)["input_ids"] == ids  # the artifact tokenizes like the source


def _make_adapter(base_dir: Path, adapter_dir: Path, vocab: int) -> tuple[Path, np.ndarray]:
    """A Chinese-LLaMA-Alpaca-shaped adapter with random (non-zero) LoRA weights; returns the PEFT model's
    own logits on a probe, computed without merging."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    tok_dir = adapter_dir
    make_tokenizer(tok_dir, 400)
    extend_tokenizer(tok_dir, vocab - 1)
    tokenizer = load_tokenizer(tok_dir)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.save_pretrained(str(tok_dir))
    (tok_dir / "tokenizer.json").unlink(missing_ok=True)
    base = LlamaForCausalLM.from_pretrained(str(base_dir)).eval()
    base.resize_token_embeddings(vocab)
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS,
                      modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(0.0, 0.2)
    model.save_pretrained(str(adapter_dir))
    model.eval()
    with torch.no_grad():
        probe = model(input_ids=torch.tensor([PROBE])).logits[0].numpy()
    return adapter_dir, probe


PROBE = [1, 30, 450, 700, 40, 999]


def test_lora_adapter_is_merged_and_exported(tmp_path):
    base_dir = make_llama(tmp_path / "base", num_key_value_heads=2)
    adapter_dir, peft_logits = _make_adapter(base_dir, tmp_path / "adapter", vocab=1001)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(LORA_TARGETS) and saved["r"] == 8

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        artifact = _export(base_dir, tmp_path / "fp32", adapter=adapter_dir)
    # peft wrapping the model used to raise transformers' `is_gradient_checkpointing` FutureWarning on every LoRA run
    assert not [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    parity = artifact.manifest["parity"]
    assert parity["passed"] and parity["max_logits_diff"] <= 1e-4
    assert artifact.manifest["source"]["adapter"] == str(adapter_dir)
    assert artifact.manifest["source"]["fingerprint"]["adapter"]
    engine = OrtEngine(artifact.path)
    assert engine.vocab_size == 1001
    logits, _ = engine.prefill(*left_pad([PROBE], engine.pad_token_id))
    # The graph computes what the unmerged PEFT model computes (the merge kept the LoRA and the new rows)...
    assert np.abs(logits[0] - peft_logits).max() < 1e-3
    # ...which is far from the base alone.
    base = load_source(ModelConfig(path=str(base_dir)))
    with torch.no_grad():
        base_logits = base.model(input_ids=torch.tensor([[t for t in PROBE if t < 400]])).logits[0].numpy()
    assert np.abs(logits[0, :1, :400] - base_logits[:1]).max() > 0.1


def test_adapter_for_another_base_is_refused(tmp_path):
    base_dir = make_llama(tmp_path / "base", hidden_size=64)
    adapter_dir, _ = _make_adapter(base_dir, tmp_path / "adapter", vocab=1001)
    other = make_llama(tmp_path / "other", hidden_size=32, intermediate_size=64)
    with pytest.raises(UserError, match="another base model"):
        load_source(ModelConfig(path=str(other), adapter=str(adapter_dir)))
    shallow = make_llama(tmp_path / "shallow", num_hidden_layers=1)
    with pytest.raises(UserError, match="another base model"):
        load_source(ModelConfig(path=str(shallow), adapter=str(adapter_dir)))
