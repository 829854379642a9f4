"""Source model loading: tokenizer ids against SentencePiece itself, and every bad model folder as one UserError line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from testkit import SHARED_DATA

from llmship.config import EMBEDDED_MODEL_DIR, ModelConfig
from llmship.errors import UserError
from llmship.export.tiny import make_tokenizer
from llmship.source import load_source, load_tokenizer

SHARED_LLAMA_TOKENIZER = SHARED_DATA / "tokenizers" / "llama-32k"
TEXTS = ["今天天气很好，我们去公园散步。", "The capital of France is Paris.", "问题：TCP协议工作在哪一层？\nA. 应用层 B. 传输层\n答案：",
         # whitespace runs (code indentation): where a converted `tokenizers` BPE drifts from SentencePiece
         "def f(n):\n    if n:\n        return  n\n", " leading space and  double  spaces"]


@pytest.fixture(scope="module")
def good(tiny_model):
    return tiny_model  # shared: every test that breaks it breaks a copy (_copy)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_matches_sentencepiece(folder: Path) -> None:
    tok = load_tokenizer(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    for text in TEXTS:
        assert tok(text)["input_ids"] == [sp.bos_id(), *sp.encode(text)]
    assert tok.padding_side == "left"


def test_tokenizer_json_ids_match_sentencepiece():
    assert (EMBEDDED_MODEL_DIR / "tokenizer.json").is_file()  # the `tokenizers` path, leading space included
    _assert_matches_sentencepiece(EMBEDDED_MODEL_DIR)


def test_normalized_added_tokens_still_match(tmp_path):
    # `add_tokens` marks tokens `normalized`; the dummy-prefix normalizer must not stop them matching mid-word
    folder = _copy(EMBEDDED_MODEL_DIR, tmp_path / "tok")
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    new_id = len(spec["model"]["vocab"])
    spec["added_tokens"].append({"id": new_id, "content": "<tool>", "single_word": False, "lstrip": False, "rstrip": False,
                                 "normalized": True, "special": False})
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    tok = load_tokenizer(folder)
    assert tok("x<tool>(")["input_ids"].count(new_id) == 1
    tok.save_pretrained(str(tmp_path / "saved"))
    shutil.copy2(folder / "tokenizer.model", tmp_path / "saved")  # SentencePiece's reference
    assert load_tokenizer(tmp_path / "saved")("(<tool>)")["input_ids"].count(new_id) == 1
    _assert_matches_sentencepiece(tmp_path / "saved")


def test_tokenizer_ids_match_sentencepiece(tmp_path):
    make_tokenizer(tmp_path, 400)
    _assert_matches_sentencepiece(tmp_path)


@pytest.mark.skipif(not (SHARED_LLAMA_TOKENIZER / "tokenizer.model").is_file(), reason="shared LLaMA tokenizer absent")
def test_llama_tokenizer_ids_match_sentencepiece():
    _assert_matches_sentencepiece(SHARED_LLAMA_TOKENIZER)


def test_good_folder_loads_in_its_dtype(good):
    source = load_source(ModelConfig(path=str(good), dtype="bfloat16"))
    assert next(source.model.parameters()).dtype.__str__() == "torch.bfloat16"
    assert not source.model.training and len(source.tokenizer) == 400
    assert source.fingerprint["model"] and source.fingerprint["adapter"] is None


def _error(path: Path, **kw) -> str:
    with pytest.raises(UserError) as info:
        load_source(ModelConfig(path=str(path), **kw))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_config(good, tmp_path):
    bad = _copy(good, tmp_path / "m")
    (bad / "config.json").unlink()
    assert "no config.json" in _error(bad)


def test_missing_folder(tmp_path):
    assert "model folder not found" in _error(tmp_path / "nope")


def test_missing_weights(good, tmp_path):
    bad = _copy(good, tmp_path / "m")
    (bad / "model.safetensors").unlink()
    assert "no weights" in _error(bad)


def test_truncated_safetensors(good, tmp_path):
    bad = _copy(good, tmp_path / "m")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(bad)


def test_corrupt_safetensors_header(good, tmp_path):
    bad = _copy(good, tmp_path / "m")
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert "corrupt" in _error(bad)


def test_weights_of_another_shape(good, tmp_path):
    bad = _copy(good, tmp_path / "m")
    config = json.loads((bad / "config.json").read_text())
    config["num_hidden_layers"] = 3  # layer 2 has no weights
    (bad / "config.json").write_text(json.dumps(config))
    assert "weights do not match config.json" in _error(bad)


@pytest.mark.parametrize("change", [
    {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
    {"model_type": "mistral", "architectures": ["MistralForCausalLM"]},
    {"auto_map": {"AutoModelForCausalLM": "modeling_custom.CustomLlama"}},
])
def test_other_architectures_are_refused(good, tmp_path, change):
    bad = _copy(good, tmp_path / "m")
    config = json.loads((bad / "config.json").read_text())
    config.update(change)
    (bad / "config.json").write_text(json.dumps(config))
    assert "LlamaForCausalLM" in _error(bad)


def test_vocab_mismatch_is_an_error_unless_resize(good, tmp_path):
    bad = _copy(good, tmp_path / "m")
    make_tokenizer(bad, 360)  # tokenizer now smaller than the 400-row embedding
    message = _error(bad)
    assert "360 tokens" in message and "400 rows" in message and "resize_embeddings" in message
    source = load_source(ModelConfig(path=str(bad), resize_embeddings=True))
    assert source.model.get_input_embeddings().weight.shape[0] == 360
    assert source.model.get_output_embeddings().weight.shape[0] == 360 and source.model.config.vocab_size == 360


def test_pickled_weights_load_only_as_plain_tensors(good, tmp_path):
    import torch
    from safetensors.torch import load_file

    state = load_file(str(good / "model.safetensors"))
    ok = _copy(good, tmp_path / "bin")
    (ok / "model.safetensors").unlink()
    torch.save(state, ok / "pytorch_model.bin")
    source = load_source(ModelConfig(path=str(ok)))
    assert torch.equal(source.model.model.embed_tokens.weight, state["model.embed_tokens.weight"])
    bad = _copy(good, tmp_path / "pickle")
    (bad / "model.safetensors").unlink()
    torch.save({"payload": shutil.copytree}, bad / "pytorch_model.bin")  # arbitrary objects: refused by weights_only
    assert "cannot load the model weights" in _error(bad)


def test_dynamic_rope_is_refused_by_the_export(good, tmp_path):
    from llmship.config import Config
    from llmship.export import export_fp32

    bad = _copy(good, tmp_path / "m")
    config = json.loads((bad / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (bad / "config.json").write_text(json.dumps(config))
    cfg = Config()
    cfg.model.path = str(bad)
    with pytest.raises(UserError, match="rope type 'dynamic'"):
        export_fp32(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
