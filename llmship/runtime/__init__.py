"""One interface over the PyTorch baseline and exported ONNX folders (see base.Engine).

`load_engine(spec, runtime_cfg)`: spec is a compiled folder (str/Path/Artifact -> OrtEngine) or a
ModelConfig (-> TorchEngine over the source model in its dtype).

torch is imported only when the PyTorch engine is asked for, so a process that runs ONNX Runtime alone (a bench
worker) does not carry torch in its memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmship.config import ModelConfig, RuntimeConfig
from llmship.runtime.base import Cache, Engine, left_pad, log_softmax, positions_from_mask
from llmship.runtime.ort_engine import OrtEngine

__all__ = ["Cache", "Engine", "OrtEngine", "TorchEngine", "left_pad", "load_engine", "log_softmax", "positions_from_mask"]


def __getattr__(name: str) -> Any:
    if name == "TorchEngine":
        from llmship.runtime.torch_engine import TorchEngine

        return TorchEngine
    raise AttributeError(f"module 'llmship.runtime' has no attribute {name!r}")


def load_engine(spec: Any, runtime_cfg: RuntimeConfig | None = None) -> Engine:
    """An Engine for a compiled folder (ONNX Runtime) or a ModelConfig (PyTorch baseline)."""
    runtime_cfg = runtime_cfg or RuntimeConfig()
    if isinstance(spec, ModelConfig):
        from llmship.runtime.torch_engine import TorchEngine
        from llmship.source import load_source

        return TorchEngine.from_source(load_source(spec), threads=runtime_cfg.threads)
    folder = getattr(spec, "path", spec)  # an Artifact carries its folder in .path
    if isinstance(folder, str | Path):
        return OrtEngine(Path(folder), provider=runtime_cfg.provider, threads=runtime_cfg.threads)
    raise TypeError(f"load_engine takes a compiled folder or a ModelConfig, not {type(spec).__name__}")
