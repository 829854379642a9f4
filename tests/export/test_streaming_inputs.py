"""Checkpoint readers of the streaming compile and its fail-fast checks (bad input: exit 2, one line, nothing left)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from testkit import run_cli

from llmship.config import EMBEDDED_MODEL_DIR
from llmship.errors import UserError
from llmship.export.checkpoint import expected_shapes, open_checkpoint
from llmship.export.streaming import check_disk

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
          "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 3000,
          "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1,
          "eos_token_id": 2}


def random_state(config: dict, dtype=torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(shape, generator=generator) * 0.05 + (1.0 if len(shape) == 1 else 0.0)).to(dtype)
            for name, shape in expected_shapes(config).items()}


def write_sharded(folder: Path, state: dict[str, torch.Tensor], config: dict, shards: int = 3, tokenizer: bool = True) -> Path:
    """A checkpoint as save_pretrained writes it: model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[i::shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    if tokenizer:
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (EMBEDDED_MODEL_DIR / name).is_file():
                shutil.copy2(EMBEDDED_MODEL_DIR / name, folder / name)
    return folder


@pytest.fixture
def sharded(tmp_path):
    state = random_state(CONFIG)
    return write_sharded(tmp_path / "ckpt", state, CONFIG), state


def test_sharded_safetensors_read_one_tensor_at_a_time(sharded):
    folder, state = sharded
    checkpoint = open_checkpoint(folder, CONFIG)
    assert set(checkpoint.entries) == set(state)
    for name in ("model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        value = checkpoint.tensor(name)
        assert value.dtype == torch.float32
        assert torch.equal(value, state[name].float())
    _check_partial_reads(checkpoint, state)
    assert checkpoint.weight_bytes == 4 * sum(v.numel() for v in state.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_single_safetensors_and_bin_shards(tmp_path, dtype):
    state = random_state(CONFIG, dtype)
    single = tmp_path / "single"
    single.mkdir()
    save_file(state, str(single / "model.safetensors"))
    binary = tmp_path / "bin"
    binary.mkdir()
    names = list(state)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: state[n] for n in part}, binary / file)
        weight_map.update({n: file for n in part})
    (binary / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for folder in (single, binary):
        checkpoint = open_checkpoint(folder, CONFIG)
        name = "model.layers.0.self_attn.k_proj.weight"
        assert torch.equal(checkpoint.tensor(name), state[name].float())
        _check_partial_reads(checkpoint, state)


def _check_partial_reads(checkpoint, state) -> None:
    """Row chunks (what the chunked quantization reads) and in-place reads into reused buffers (the layer-at-a-time
    reference) give exactly the whole tensor's values."""
    for name in ("lm_head.weight", "model.layers.1.mlp.up_proj.weight"):
        whole = state[name].float()
        assert torch.equal(checkpoint.tensor(name, slice(7, 300)), whole[7:300])
        buffer = torch.full(whole.shape, float("nan"))
        assert checkpoint.read_into(name, buffer) is buffer and torch.equal(buffer, whole)


def test_tied_embeddings_read_the_input_table(tmp_path):
    config = dict(CONFIG, tie_word_embeddings=True)
    state = random_state(config)
    folder = write_sharded(tmp_path / "tied", state, config, tokenizer=False)
    checkpoint = open_checkpoint(folder, config)
    assert torch.equal(checkpoint.tensor("lm_head.weight"), state["model.embed_tokens.weight"].float())


def _error(folder: Path, config: dict = CONFIG) -> str:
    with pytest.raises(UserError) as info:
        open_checkpoint(folder, config)
    return str(info.value)


def test_missing_shard(sharded):
    folder, _ = sharded
    (folder / "model-00002-of-00003.safetensors").unlink()
    message = _error(folder)
    assert "model-00002-of-00003.safetensors" in message and "missing" in message


def test_truncated_shard(sharded):
    folder, _ = sharded
    file = folder / "model-00003-of-00003.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    message = _error(folder)
    assert "truncated" in message and "model-00003-of-00003.safetensors" in message and "tensor model." in message


def test_shape_disagreeing_with_config(sharded):
    folder, _ = sharded
    message = _error(folder, dict(CONFIG, intermediate_size=128))
    assert "mlp" in message and "[96, 64]" in message and "[128, 64]" in message and ".safetensors" in message


def test_index_naming_a_tensor_in_no_shard(sharded):
    folder, _ = sharded
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.extra_proj.weight"] = "model-00001-of-00003.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    message = _error(folder)
    assert "model.layers.0.mlp.extra_proj.weight" in message and "does not hold it" in message


def test_non_float_tensor(tmp_path):
    state = random_state(CONFIG)
    state["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    folder = write_sharded(tmp_path / "int", state, CONFIG)
    message = _error(folder)
    assert "model.norm.weight" in message and "I32" in message and "not a float tensor" in message


def test_too_little_disk(tmp_path):
    from llmship.config import VariantConfig
    from llmship.quantize.registry import build_scheme

    w4a16, gptq, fp32, w8a16 = (build_scheme(VariantConfig(**v)) for v in (
        {"scheme": "w4a16"}, {"scheme": "w4a16", "method": "gptq"}, {"scheme": "none"}, {"scheme": "w8a16"}))
    assert check_disk(tmp_path, 10**9, [w4a16])["estimated_gb"] == round(10**9 * 0.75 * 1.05 / 1e9, 2)
    # a layer-wise calibrated variant is on disk twice for a moment (its finished layers, then the variant)
    assert check_disk(tmp_path, 10**9, [gptq])["estimated_gb"] == round(2 * 10**9 * 0.75 * 1.05 / 1e9, 2)
    with pytest.raises(UserError, match="too little disk space"):
        check_disk(tmp_path, 10**15, [fp32, w8a16])


def test_cli_bad_shard_exits_2_with_one_line_and_leaves_nothing(sharded, tmp_path):
    folder, _ = sharded
    file = folder / "model-00001-of-00003.safetensors"
    file.write_bytes(file.read_bytes()[:-10])
    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{path: {folder}}}\nexport: {{streaming: true}}\noutput: {{dir: {out}}}\n"
                      "quantize: {scheme: w4a16}\n")
    run = run_cli("compile", config, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "model-00001-of-00003.safetensors" in lines[0] and "truncated" in lines[0]
    assert "Traceback" not in run.stderr
    assert not (out / "w4a16-rtn").exists() and not list(out.glob("w4a16-rtn*"))


def test_lora_merged_while_streaming_equals_the_peft_merge(tmp_path):
    """Chinese-LLaMA-Alpaca shape: LoRA on every projection, embed_tokens/lm_head of a larger vocabulary saved."""
    from test_export_vocab import _make_adapter

    from llmship.config import ModelConfig
    from llmship.export.checkpoint import LoraMerged
    from llmship.export.tiny import make_llama
    from llmship.source import load_source

    base_dir = make_llama(tmp_path / "base", num_key_value_heads=2)
    adapter_dir, _ = _make_adapter(base_dir, tmp_path / "adapter", vocab=1001)
    merged = load_source(ModelConfig(path=str(base_dir), adapter=str(adapter_dir))).model.state_dict()
    config = json.loads((base_dir / "config.json").read_text())
    base = open_checkpoint(base_dir, config)
    streamed = LoraMerged(base, adapter_dir)
    assert streamed.config["vocab_size"] == 1001 and streamed.shape("lm_head.weight") == (1001, config["hidden_size"])
    for name in expected_shapes(streamed.config):
        assert (streamed.tensor(name) - merged[name]).abs().max() <= 1e-6, name
        rows = slice(3, 40)
        assert (streamed.tensor(name, rows) - merged[name][rows]).abs().max() <= 1e-6, name
        assert torch.equal(streamed.read_into(name, torch.empty(streamed.shape(name))), streamed.tensor(name)), name
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (streamed.tensor(q) - base.tensor(q)).abs().max() > 1e-3  # the LoRA delta is really there
