"""Tiny LLaMA checkpoints built from a config, for tests and measurements (random weights, seeded).

`make_tokenizer(folder, vocab_size)` trains a small SentencePiece BPE model (LLaMA's tokenizer settings:
byte fallback, dummy prefix) on generated zh/en text; `make_llama(folder, ...)` writes a LlamaForCausalLM
checkpoint (safetensors) plus that tokenizer.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import torch

WORDS_EN = ("the", "model", "runs", "fast", "on", "small", "data", "and", "we", "measure", "every", "token", "of", "answer",
            "question", "about", "weather", "city", "river", "school", "music", "history", "science", "computer",
            "network", "energy", "water", "light")
WORDS_ZH = list("我们今天天气很好去公园散步中国的首都是北京计算机网络考试单项选择题请选出正确答案学习知识")


def _corpus(lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        if i % 2:
            out.append(" ".join(rng.choice(WORDS_EN) for _ in range(rng.randint(4, 14))) + ".")
        else:
            out.append("".join(rng.choice(WORDS_ZH) for _ in range(rng.randint(6, 20))) + "。")
    return out


def make_tokenizer(folder: str | Path, vocab_size: int = 400) -> Path:
    """Train a SentencePiece model like LLaMA's (unk=0, bos=1, eos=2, byte fallback) into folder/tokenizer.model."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(2000)), model_writer=buffer, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, minloglevel=2, num_threads=1,
    )
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())
    return folder / "tokenizer.model"


def tiny_config(vocab_size: int, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    base = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
            "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    base.update(overrides)
    return LlamaConfig(**base)


def make_llama(folder: str | Path, *, tokenizer_from: str | Path | None = None, tokenizer_vocab: int = 400,
               pad_token: str | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
               weight_std: float | None = None, **config: Any) -> Path:
    """Write a random LlamaForCausalLM + LLaMA tokenizer folder; the vocab follows the tokenizer unless given."""
    from transformers import LlamaForCausalLM

    from llmship.source import load_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        (folder / "tokenizer.model").write_bytes(Path(tokenizer_from).read_bytes())
    else:
        make_tokenizer(folder, tokenizer_vocab)
    tokenizer = load_tokenizer(folder)
    if pad_token is not None:
        tokenizer.add_special_tokens({"pad_token": pad_token})
    tokenizer.save_pretrained(str(folder))
    if (folder / "tokenizer.json").exists():
        (folder / "tokenizer.json").unlink()  # keep the SentencePiece-only layout LLaMA checkpoints ship
    config.setdefault("vocab_size", len(tokenizer))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**config)).to(dtype).eval()
    # HF's init (std 0.02) gives near-uniform logits; 2/sqrt(hidden) (0.25 at hidden 64) gives decisive, testable
    # argmaxes while keeping activations bounded as the width grows.
    std = weight_std if weight_std is not None else 2.0 / model.config.hidden_size**0.5
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, std)
    model.save_pretrained(str(folder))
    return folder


def extend_tokenizer(folder: str | Path, size: int) -> Path:
    """Append Chinese pieces to folder/tokenizer.model until it has `size` pieces, the way Chinese-LLaMA
    merged its Chinese SentencePiece vocabulary into LLaMA's (new NORMAL pieces, score 0)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    file = Path(folder) / "tokenizer.model"
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(file.read_bytes())
    have = {p.piece for p in proto.pieces}
    cjk = [chr(c) for c in range(0x4E00, 0x9FA6)]
    candidates = (s for s in [*cjk, *(a + b for a in cjk[:300] for b in cjk[:300])] if s not in have)
    while len(proto.pieces) < size:
        piece = proto.pieces.add()
        piece.piece = next(candidates)
        piece.score = 0.0
    file.write_bytes(proto.SerializeToString())
    return file
