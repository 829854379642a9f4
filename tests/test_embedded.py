"""The bundled tiny model: loads with the Auto classes, tokenizes as SentencePiece does, fits the size budget, and is
clearly better than chance on its C-Eval-format sample and on held-out text."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmship.config import EMBEDDED, EMBEDDED_MODEL_DIR
from llmship.data import sources, templates
from llmship.source import load_tokenizer

MAX_BYTES = 15 * 1024 * 1024
# Held-out perplexity bound: far below uniform (vocab size); the trained model is recorded in its README.
PPL_BOUND = 40.0
TEXTS = ["Hello world", "广东省的省会是广州。", "one space\n\nand newlines\n", "答案: \nA", "H2O 与 CO2 ×÷ ☃ 𝔘", ""]
# Text that starts with spaces: transformers 5 drops SentencePiece's dummy prefix there unless load_tokenizer restores it.
WHITESPACE_RUNS = "  two  spaces"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(EMBEDDED_MODEL_DIR))
    model = AutoModelForCausalLM.from_pretrained(str(EMBEDDED_MODEL_DIR), dtype=torch.float32).eval()
    return model, tok


def test_architecture_and_files():
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(EMBEDDED_MODEL_DIR))
    assert cfg.model_type == "llama" and cfg.architectures == ["LlamaForCausalLM"]
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.hidden_act == "silu" and cfg.max_position_embeddings >= 1024
    names = {p.name for p in EMBEDDED_MODEL_DIR.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json"} <= names
    size = sum(p.stat().st_size for p in EMBEDDED_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= MAX_BYTES


def test_tokenizers_match_sentencepiece():
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(EMBEDDED_MODEL_DIR / "tokenizer.model"))
    assert sp.get_piece_size() > 1000 and sp.piece_to_id("<0xE4>") != sp.unk_id()  # byte fallback
    auto = AutoTokenizer.from_pretrained(str(EMBEDDED_MODEL_DIR))
    llama = LlamaTokenizer.from_pretrained(str(EMBEDDED_MODEL_DIR))
    for text in TEXTS:
        expected = [sp.bos_id(), *sp.encode(text)]
        assert auto(text).input_ids == expected, text
        assert llama(text).input_ids == expected, text
        assert sp.unk_id() not in expected
        assert auto.decode(expected, skip_special_tokens=True) == text


def test_leading_spaces_match_sentencepiece():
    """transformers 5 drops SentencePiece's dummy prefix on text that starts with a space; load_tokenizer puts it back."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(EMBEDDED_MODEL_DIR / "tokenizer.model"))
    expected = [sp.bos_id(), *sp.encode(WHITESPACE_RUNS)]
    tok = load_tokenizer(EMBEDDED_MODEL_DIR)
    assert tok(WHITESPACE_RUNS).input_ids == expected
    assert tok.decode(expected, skip_special_tokens=True) == WHITESPACE_RUNS


def ceval_choice(model, tok, name_zh, dev, row) -> str:
    """OpenCompass PPL mode: per label, sum of CE over the prompt / number of prompt tokens (BOS included); argmin."""
    prompts = [tok(templates.ceval_ppl_prompt(name_zh, dev[: templates.CEVAL_SHOTS], row, label)).input_ids
               for label in templates.CEVAL_LABELS]
    assert len({len(p) for p in prompts}) == 1  # the labels are one token each: no padding needed
    ids = torch.tensor(prompts)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    ce = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum(dim=1) / ids.shape[1]
    return templates.CEVAL_LABELS[int(torch.argmin(ce))]


def test_ceval_format_accuracy_beats_chance(model_and_tokenizer):
    model, tok = model_and_tokenizer
    data = sources.read_ceval(EMBEDDED)
    results = [ceval_choice(model, tok, s.name_zh, s.dev, row) == row["answer"] for s in data.subjects.values() for row in s.val]
    accuracy = 100 * sum(results) / len(results)
    assert len(results) >= 80
    assert accuracy >= 50.0, f"C-Eval-format accuracy {accuracy:.1f}%"


def test_heldout_perplexity(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = tok("\n\n".join(sources.read_c4(EMBEDDED)), return_tensors="pt").input_ids[0]
    seq_len = 256
    windows = ids[: len(ids) // seq_len * seq_len].reshape(-1, seq_len)[:16]
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    ppl = math.exp(sum(losses) / len(losses))
    assert len(windows) == 16
    assert ppl < PPL_BOUND < tok.vocab_size / 10
