"""Every engine llmship runs, behind one registry (`ENGINES`), built in one place (`build_engine`).

| name  | built from              | engine                                                               |
|-------|-------------------------|----------------------------------------------------------------------|
| torch | a ModelConfig           | TorchEngine: the source model in PyTorch, in its dtype, whole or a   |
|       |                         | layer at a time as model.baseline and the RAM decide (the baseline)  |
| ort   | a compiled folder       | OrtEngine: the folder's graph under ONNX Runtime                      |
| genai | a compiled folder       | GenaiEngine: the folder under onnxruntime-genai                       |

`load_engine(spec, runtime_cfg)`: a ModelConfig gets the PyTorch baseline; a compiled folder (str/Path/Artifact) the
engine `runtime.engine` names. Providers, threads and padding: runtime/providers.py, runtime/threads.py,
runtime/padding.py.

torch is imported only when the PyTorch engine is asked for, so a process that runs ONNX Runtime alone (a bench
worker) does not carry torch in its memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmship.config import ModelConfig, RuntimeConfig
from llmship.errors import UserError
from llmship.runtime.base import Cache, Engine, log_softmax
from llmship.runtime.genai_engine import GenaiEngine
from llmship.runtime.ort_engine import OrtEngine
from llmship.runtime.padding import left_pad, positions_from_mask

__all__ = ["ENGINES", "FOLDER_ENGINES", "Cache", "Engine", "EngineKind", "GenaiEngine", "OrtEngine", "TorchEngine",
           "build_engine", "left_pad", "load_engine", "log_softmax", "positions_from_mask"]


def __getattr__(name: str) -> Any:
    if name == "TorchEngine":
        from llmship.runtime.torch_engine import TorchEngine

        return TorchEngine
    raise AttributeError(f"module 'llmship.runtime' has no attribute {name!r}")


@dataclass(frozen=True)
class EngineKind:
    """One registered engine: what it is built from and how."""

    runs: Literal["source", "folder"]  # the source model (a ModelConfig) or a compiled folder
    build: Callable[[Any, RuntimeConfig], Engine]
    description: str


def _torch(model: ModelConfig, runtime_cfg: RuntimeConfig) -> Engine:
    from llmship.runtime.torch_baseline import build_baseline

    return build_baseline(model, runtime_cfg)


def _ort(folder: Path, runtime_cfg: RuntimeConfig) -> Engine:
    return OrtEngine(folder, provider=runtime_cfg.provider, threads=runtime_cfg.threads)


def _genai(folder: Path, runtime_cfg: RuntimeConfig) -> Engine:
    return GenaiEngine(folder, runtime_cfg.provider, runtime_cfg.threads)


ENGINES: dict[str, EngineKind] = {
    "torch": EngineKind("source", _torch, "PyTorch, the source model in its dtype (the baseline)"),
    "ort": EngineKind("folder", _ort, "ONNX Runtime over the compiled graph"),
    "genai": EngineKind("folder", _genai, "onnxruntime-genai over the compiled folder"),
}
# The values of `runtime.engine` (config.FolderEngine spells the same names; tests/runtime checks they agree).
FOLDER_ENGINES = tuple(name for name, kind in ENGINES.items() if kind.runs == "folder")


def build_engine(name: str, target: Any, runtime_cfg: RuntimeConfig | None = None) -> Engine:
    """Engine `name` of the registry over `target`: a ModelConfig for a source engine, a folder for the others."""
    runtime_cfg = runtime_cfg or RuntimeConfig()
    if name not in ENGINES:
        raise UserError(f"unknown engine {name!r}; use one of {', '.join(ENGINES)}", where="runtime.engine")
    kind = ENGINES[name]
    if kind.runs == "source":
        if not isinstance(target, ModelConfig):
            raise TypeError(f"engine {name!r} runs a ModelConfig, not {type(target).__name__}")
        return kind.build(target, runtime_cfg)
    folder = getattr(target, "path", target)  # an Artifact carries its folder in .path
    if isinstance(target, ModelConfig) or not isinstance(folder, str | Path):
        raise TypeError(f"engine {name!r} runs a compiled folder, not {type(target).__name__}")
    return kind.build(Path(folder), runtime_cfg)


def load_engine(spec: Any, runtime_cfg: RuntimeConfig | None = None) -> Engine:
    """The PyTorch baseline for a ModelConfig; for a compiled folder (str/Path/Artifact), the engine runtime.engine names."""
    runtime_cfg = runtime_cfg or RuntimeConfig()
    if isinstance(spec, ModelConfig):
        return build_engine("torch", spec, runtime_cfg)
    if isinstance(getattr(spec, "path", spec), str | Path):
        return build_engine(runtime_cfg.engine, spec, runtime_cfg)
    raise TypeError(f"load_engine takes a compiled folder or a ModelConfig, not {type(spec).__name__}")
