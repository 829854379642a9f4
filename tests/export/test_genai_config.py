"""genai_config.json: content follows onnxruntime-genai's builder; the folder generates in onnxruntime-genai."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_fusion import HEADS, HIDDEN, KV_HEADS, LAYERS, VOCAB, shared_export

from llmship.errors import UserError
from llmship.export.fusion import fuse_decoder
from llmship.export.genai_config import write_genai_config

HF_CONFIG = {
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "num_hidden_layers": LAYERS,
    "vocab_size": VOCAB,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
PROMPT = [5, 9, 17, 33, 61, 8]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_export(tmp_path_factory).parent


def ort_greedy(path: Path, prompt: list[int], steps: int) -> list[int]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    past = {i.name: np.zeros((1, KV_HEADS, 0, HIDDEN // HEADS), np.float32) for i in sess.get_inputs() if "past" in i.name}
    ids = np.array([prompt], dtype=np.int64)
    out: list[int] = []
    for _ in range(steps):
        total = len(prompt) + len(out)
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.arange(total - ids.shape[1], total, dtype=np.int64)[None],
            **past,
        }
        logits, *present = sess.run(None, feeds)
        past = {name.replace("present", "past_key_values"): value for name, value in zip([o.name for o in sess.get_outputs()[1:]], present, strict=True)}
        out.append(int(logits[0, -1].argmax()))
        ids = np.array([[out[-1]]], dtype=np.int64)
    return out


def test_genai_config_content(folder: Path) -> None:
    path = write_genai_config(folder, HF_CONFIG, {"eos_token_id": [2, 3], "do_sample": False, "top_k": 20})
    config = json.loads(path.read_text())
    model, search = config["model"], config["search"]
    decoder = model["decoder"]
    assert decoder["filename"] == "model.onnx"
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"]) == (HEADS, KV_HEADS, HIDDEN // HEADS)
    assert decoder["num_hidden_layers"] == LAYERS and decoder["hidden_size"] == HIDDEN
    assert decoder["inputs"] == {
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "position_ids": "position_ids",
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    assert decoder["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    assert model["eos_token_id"] == [2, 3]  # generation_config wins over config.json
    assert model["pad_token_id"] == 2  # LLaMA has no pad token: the first EOS, as the builder does
    assert model["context_length"] == 256 and search["max_length"] == 256
    assert search["top_k"] == 20 and search["past_present_share_buffer"] is False
    assert not list(folder.glob("*.tmp"))


def test_genai_config_rejects_bad_input(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(UserError, match="hidden_size"):
        write_genai_config(folder, {k: v for k, v in HF_CONFIG.items() if k != "hidden_size"}, None)
    with pytest.raises(UserError, match="not found"):
        write_genai_config(tmp_path, HF_CONFIG, None)


@pytest.mark.parametrize("attention", [None, "mha", "gqa"], ids=["plain", "fused-mha", "fused-gqa"])
def test_folder_generates_in_onnxruntime_genai(folder: Path, tmp_path: Path, attention: str | None) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    target = tmp_path / "variant"
    target.mkdir()
    if attention:
        fuse_decoder(folder / "model.onnx", target / "model.onnx", HEADS, KV_HEADS, HIDDEN, max_positions=256, attention=attention)
    else:
        shutil.copy(folder / "model.onnx", target / "model.onnx")
    steps = 12
    expected = ort_greedy(folder / "model.onnx", PROMPT, steps)
    eos = min(set(range(VOCAB)) - set(expected))  # an EOS the greedy path never hits: generation runs to max_length
    # by default a GQA graph runs with onnxruntime-genai's in-place (max-length) cache buffers
    path = write_genai_config(target, {**HF_CONFIG, "eos_token_id": eos}, {"pad_token_id": None})
    assert json.loads(path.read_text())["search"]["past_present_share_buffer"] is (attention == "gqa")
    model = og.Model(str(target))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([PROMPT], dtype=np.int32))
    tokens: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens == expected
