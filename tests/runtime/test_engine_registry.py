"""The engine registry, runtime.engine (and the moved bench.engine), the provider table and the padding layouts."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import numpy as np
import onnxruntime as ort
import pytest

from llmship.config import Config, FolderEngine, ModelConfig, RuntimeConfig, load_config
from llmship.errors import UserError
from llmship.runtime import ENGINES, FOLDER_ENGINES, build_engine, load_engine
from llmship.runtime.padding import left_pad, left_padded_to_right, padded_batch, right_padded_mask, right_padded_to_left
from llmship.runtime.providers import PROVIDERS, genai_provider_options, missing_provider, ort_providers


def test_registry_names_are_the_config_values():
    assert set(ENGINES) == {"torch", "ort", "genai"}
    assert FOLDER_ENGINES == get_args(FolderEngine) == ("ort", "genai")
    assert RuntimeConfig().engine == "ort"  # as the bench's default engine was
    with pytest.raises(UserError, match="unknown engine 'trt'"):
        build_engine("trt", "/nowhere")
    with pytest.raises(TypeError, match="runs a ModelConfig"):
        build_engine("torch", "/nowhere")
    with pytest.raises(TypeError, match="compiled folder"):
        build_engine("ort", ModelConfig())


def test_load_engine_follows_runtime_engine(tmp_path):
    """A folder goes to the engine runtime.engine names: the errors show which engine tried to load it."""
    with pytest.raises(UserError, match="no model.onnx"):
        load_engine(tmp_path, RuntimeConfig())
    pytest.importorskip("onnxruntime_genai")
    with pytest.raises(UserError, match="no config.json or genai_config.json"):
        load_engine(tmp_path, RuntimeConfig(engine="genai"))


def test_bench_engine_names_its_new_home(tmp_path):
    config = tmp_path / "old.yaml"
    config.write_text("bench:\n  num_prompts: 2\n  engine: genai\n")
    with pytest.raises(UserError, match=r"old.yaml:3: 'bench.engine' moved to 'runtime.engine'"):
        load_config(config)
    with pytest.raises(UserError, match="'bench.engine' moved to 'runtime.engine'"):
        load_config(None, ["bench.engine=ort"])
    assert load_config(None, ["runtime.engine=genai"]).runtime.engine == "genai"
    run = subprocess.run([sys.executable, "-m", "llmship.cli", "check", str(config)], capture_output=True, text=True)
    assert run.returncode == 2 and "runtime.engine" in run.stderr and "Traceback" not in run.stderr


def test_bench_specs_take_the_runtime_engine(tmp_path):
    from llmship.bench import engine_specs

    (tmp_path / "v").mkdir()
    cfg = Config()
    cfg.runtime.engine = "genai"
    specs = engine_specs(cfg, {"v": tmp_path / "v"})
    assert specs["pytorch"]["kind"] == "torch" and specs["v"]["kind"] == "genai"
    assert all(spec["kind"] in ENGINES for spec in specs.values())


def test_provider_table():
    assert ort_providers("cpu") == ["CPUExecutionProvider"]
    assert genai_provider_options("cpu") == [] and genai_provider_options("cuda") == [{"cuda": {}}]
    assert PROVIDERS["cuda"].ort_name == "CUDAExecutionProvider" and PROVIDERS["cuda"].package == "onnxruntime-gpu"
    assert missing_provider("cpu") is None
    with pytest.raises(UserError, match="unknown provider 'rocm'"):
        ort_providers("rocm")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "install onnxruntime-gpu for cuda" in missing_provider("cuda")
        with pytest.raises(UserError, match="CUDAExecutionProvider"):
            ort_providers("cuda")
    else:
        assert ort_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_padding_layouts_round_trip():
    prompts = [[5, 6, 7, 8], [9], [3, 4]]
    ids, mask = left_pad(prompts, 0)
    assert ids.tolist() == [[5, 6, 7, 8], [0, 0, 0, 9], [0, 0, 3, 4]] and mask.sum(1).tolist() == [4, 1, 2]
    right_ids, positions, lengths = left_padded_to_right(ids, mask)
    assert right_ids.tolist() == [[5, 6, 7, 8], [9, 0, 0, 0], [3, 4, 0, 0]]
    assert positions.tolist() == [[0, 1, 2, 3], [0, 0, 0, 0], [0, 1, 0, 0]] and lengths.tolist() == [4, 1, 2]
    assert right_padded_mask(lengths).tolist() == [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert right_padded_mask(lengths, 5).shape == (3, 5)
    per_token = right_ids[..., None].astype(np.float32)  # a stand-in for logits: each position's own token id
    assert right_padded_to_left(per_token, mask)[..., 0].tolist() == ids.tolist()
    genai_batch, genai_mask = padded_batch(prompts, 2, "right", dtype=np.int32)
    assert genai_batch.dtype == np.int32 and genai_batch.tolist() == [[5, 6, 7, 8], [9, 2, 2, 2], [3, 4, 2, 2]]
    assert genai_mask.tolist() == right_padded_mask(lengths).tolist()
