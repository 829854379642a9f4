"""Session fixtures: each model the suite needs is built or compiled once per session and shared.

Every shared folder is read-only: a test that changes files copies the folder first (shutil.copytree into tmp_path).
Paths and helpers that test modules import at module level (for skip marks) are in tests/testkit.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from testkit import SHARED_DATA

from llmship.config import EMBEDDED_MODEL_DIR


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (the real-data samples beside the checkout); the test skips when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """make_llama's default tiny LLaMA (random weights, seeded; 400-piece SentencePiece tokenizer), built once."""
    from llmship.export.tiny import make_llama

    return make_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def tiny_fp32(tiny_model, tmp_path_factory) -> Path:
    """tiny_model exported to fp32 ONNX without the fusions and with a short parity check (4 greedy tokens, 2 decode
    steps, 1 thread): the variant folder the eval and bench runs score."""
    from llmship.config import Config
    from llmship.export import export_fp32

    cfg = Config.model_validate({"model": {"path": str(tiny_model)}, "runtime": {"threads": 1},
                                 "export": {"optimize": False, "parity": {"greedy_tokens": 4, "decode_steps": 2}}})
    return export_fp32(cfg, tmp_path_factory.mktemp("tiny-llama-onnx") / "fp32").path


@pytest.fixture(scope="session")
def embedded_fp32(tmp_path_factory):
    """The embedded model (llmship/assets/tiny-llama-zh) exported with the default config (fusions, default parity):
    the Artifact every scheme on the embedded model is quantized from."""
    if not (EMBEDDED_MODEL_DIR / "config.json").is_file():
        pytest.skip("embedded model not built")
    from llmship.config import Config
    from llmship.export import export_fp32

    out = tmp_path_factory.mktemp("embedded")
    return export_fp32(Config.model_validate({"output": {"dir": str(out)}}), out / "fp32")
