"""How the PyTorch baseline runs: the whole model in `model.dtype`, or one decoder layer at a time, chosen before any
weight is loaded.

`plan_baseline(model_cfg)` estimates the whole model's memory from config.json and the checkpoint's headers (no
tensor is read): parameters x bytes of `model.dtype`, plus the adapter's file, plus a margin (MARGIN_FRACTION of the
weights + MARGIN_BYTES for activations, logits and the runtime), and compares it with the RAM psutil reports
available. `model.baseline`: 'whole' loads the whole model (a warning when the estimate exceeds the RAM), 'layerwise'
runs `llmship.export.layerwise` (one fp32 decoder layer resident, every layer and the vocabulary tables read from
the checkpoint per forward: eval only, slow), 'auto' picks whole when it fits, else layerwise. A layer-at-a-time baseline that does
not fit either is a UserError before loading.

`build_baseline(model_cfg, runtime_cfg)` builds the engine the plan names; its `info()` says which baseline ran.
Bench refuses the layer-at-a-time baseline (`bench_problem`): its timings would measure the disk, not the model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmship.config import ModelConfig, RuntimeConfig
from llmship.errors import UserError

log = logging.getLogger("llmship")

BYTES_PER_DTYPE = {"float32": 4, "float16": 2, "bfloat16": 2}
# The layer-at-a-time reference computes in fp32 whatever model.dtype says (llmship.export.layerwise).
LAYERWISE_DTYPE = "float32"
# Beyond the weights: activations, a batch's fp32 logits, the DynamicCache and the loader's transient copies.
MARGIN_FRACTION = 0.10
MARGIN_BYTES = 1 << 30
LAYER_PREFIX = "model.layers."
SLOW_NOTE = "slow: every forward reads the checkpoint's decoder layers again, one pass per forward"


@dataclass(frozen=True)
class BaselinePlan:
    """Which baseline runs and why: `mode` whole | layerwise, in `dtype`, from the estimate against the RAM."""

    requested: str            # model.baseline
    model_dtype: str          # model.dtype
    mode: str                 # whole | layerwise
    dtype: str                # the dtype the baseline computes in
    parameters: int | None    # None: a hub id, not estimated
    whole_bytes: int | None   # estimated whole-model memory in model.dtype, margin included
    layerwise_bytes: int | None
    available_bytes: int

    @property
    def label(self) -> str:
        return "whole model" if self.mode == "whole" else "one decoder layer at a time"

    @property
    def fell_back(self) -> bool:
        """auto chose the layer-at-a-time baseline because the whole model did not fit."""
        return self.requested == "auto" and self.mode == "layerwise"

    def describe(self) -> dict[str, Any]:
        """Machine-readable: what the report's JSON carries. The available RAM only when it decided the fallback: a
        record of a whole-model run is the same from run to run (a Ray run's equals the local one's)."""
        fields = asdict(self)
        if not self.fell_back:
            del fields["available_bytes"]
        return {"engine": "torch", **fields, "label": self.label, "summary": self.sentence()}

    def sentence(self) -> str:
        """One line for the reports: engine, dtype, whole or layer at a time, and why."""
        text = f"PyTorch baseline: {self.label}, {self.dtype}"
        if self.whole_bytes is None:
            text += f" (memory not estimated: a hub id; model.baseline {self.requested})"
        elif self.fell_back:
            text += (f" (model.baseline auto: the whole model, estimated at {gib(self.whole_bytes)} in "
                     f"{self.model_dtype}, did not fit in the {gib(self.available_bytes)} available)")
        else:
            text += f" (whole model estimated at {gib(self.whole_bytes)} in {self.model_dtype}; model.baseline {self.requested})"
        if self.mode == "layerwise":
            text += f"; {SLOW_NOTE}"
        return text


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def available_memory() -> int:
    """Bytes of RAM available to a new allocation now (psutil: free + reclaimable cache)."""
    import psutil

    return int(psutil.virtual_memory().available)


def with_margin(weight_bytes: int) -> int:
    return int(weight_bytes * (1 + MARGIN_FRACTION)) + MARGIN_BYTES


def checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the checkpoint's headers (safetensors) or mapped state (.bin); nothing is read."""
    from llmship.export.checkpoint import IGNORED, _entries_of, _shard_files

    shapes: dict[str, tuple[int, ...]] = {}
    for file in _shard_files(model_dir)[0]:
        shapes.update({name: entry.shape for name, entry in _entries_of(file).items() if not IGNORED.match(name)})
    return shapes


def adapter_bytes(adapter: str | None) -> int:
    if not adapter:
        return 0
    folder = Path(adapter).expanduser()
    return sum(file.stat().st_size for file in folder.glob("adapter_model.*") if file.is_file())


def memory_estimate(model_dir: Path, dtype: str, adapter: str | None) -> tuple[int, int, int]:
    """(parameters, whole-model bytes in `dtype`, layer-at-a-time bytes in fp32), both with the margin."""
    from llmship.source import _read_config

    if not model_dir.is_dir():
        raise UserError("model folder not found", where=f"model.path ({model_dir})")
    config = _read_config(model_dir, str(model_dir))
    shapes = checkpoint_shapes(model_dir)
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    parameters = sum(sizes.values())
    if "lm_head.weight" not in sizes and not config.get("tie_word_embeddings", False):
        parameters += sizes.get("model.embed_tokens.weight", 0)  # an untied head saved nowhere is still allocated
    layers: dict[str, int] = {}
    for name, size in sizes.items():
        if name.startswith(LAYER_PREFIX):
            index = name[len(LAYER_PREFIX):].split(".", 1)[0]
            layers[index] = layers.get(index, 0) + size
    # layerwise holds one decoder layer and the small tensors; it reads the vocabulary tables from the checkpoint
    # (embedding rows per forward, lm_head in HEAD_CHUNK_BYTES chunks)
    from llmship.export.layerwise import HEAD_CHUNK_BYTES

    tables = sum(sizes.get(n, 0) for n in ("model.embed_tokens.weight", "lm_head.weight"))
    head = sizes.get("lm_head.weight", sizes.get("model.embed_tokens.weight", 0))
    resident = (parameters - sum(layers.values()) - tables + max(layers.values(), default=0)
                + min(head, HEAD_CHUNK_BYTES // BYTES_PER_DTYPE[LAYERWISE_DTYPE]))
    extra = adapter_bytes(adapter)
    whole = with_margin(parameters * BYTES_PER_DTYPE[dtype] + extra)
    layerwise = with_margin(resident * BYTES_PER_DTYPE[LAYERWISE_DTYPE] + extra)
    return parameters, whole, layerwise


def local_model_dir(model_cfg: ModelConfig) -> Path | None:
    from llmship.source import _looks_local, resolve_model_path

    path = resolve_model_path(model_cfg.path)
    return Path(path).expanduser() if _looks_local(path) else None


def plan_baseline(model_cfg: ModelConfig, for_bench: bool = False) -> BaselinePlan:
    """The baseline `model.baseline` asks for, decided from the memory estimate (see the module doc); UserError when
    it would run a layer at a time and even that does not fit (not `for_bench`: bench never runs that one)."""
    requested, dtype = model_cfg.baseline, model_cfg.dtype
    available = available_memory()
    model_dir = local_model_dir(model_cfg)
    if model_dir is None:
        if requested == "layerwise":
            raise UserError("the layer-at-a-time baseline reads a local checkpoint folder; download the model and "
                            "point model.path at it, or set model.baseline to auto or whole", where="model.baseline")
        return BaselinePlan(requested, dtype, "whole", dtype, None, None, None, available)
    parameters, whole, layerwise = memory_estimate(model_dir, dtype, model_cfg.adapter)
    mode = requested if requested != "auto" else ("whole" if whole <= available else "layerwise")
    plan = BaselinePlan(requested, dtype, mode, dtype if mode == "whole" else LAYERWISE_DTYPE, parameters, whole,
                        layerwise, available)
    if mode == "layerwise" and layerwise > available and not for_bench:
        raise UserError(f"the PyTorch baseline does not fit in memory even one decoder layer at a time: "
                        f"{gib(layerwise)} needed (one fp32 decoder layer and a chunk of lm_head), {gib(available)} available "
                        f"(the whole model in {dtype}: {gib(whole)}); free memory or set gate.baseline_json to a "
                        "stored baseline", where="model.baseline")
    return plan


def log_plan(plan: BaselinePlan) -> None:
    """What the user should know before a long baseline run: a fallback, or a forced whole model over the estimate."""
    if plan.whole_bytes is None:
        return
    if plan.mode == "whole" and plan.whole_bytes > plan.available_bytes:
        log.warning("model.baseline is whole: the whole model is estimated at %s in %s, %s of RAM is available; "
                    "loading it anyway", gib(plan.whole_bytes), plan.model_dtype, gib(plan.available_bytes))
    elif plan.mode == "layerwise":
        log.warning("%s", plan.sentence())


def bench_problem(model_cfg: ModelConfig) -> str | None:
    """Why bench cannot run the PyTorch baseline (None when it can): bench times the whole model in memory only."""
    plan = plan_baseline(model_cfg, for_bench=True)
    if plan.mode == "whole":
        return None
    assert plan.whole_bytes is not None
    streamed = "one streamed a layer at a time would time the disk, not the model"
    if plan.requested == "layerwise":
        return (f"the PyTorch bench baseline needs the whole model in memory and model.baseline is layerwise ({streamed}): "
                "set model.baseline to auto or whole, or bench.baseline=false to bench the variants only")
    smaller = " or model.dtype=bfloat16 (about half the memory)," if plan.model_dtype == "float32" else ""
    return (f"the PyTorch bench baseline needs the whole model in memory: about {gib(plan.whole_bytes)} in "
            f"{plan.model_dtype}, {gib(plan.available_bytes)} available ({streamed}); set bench.baseline=false to bench "
            f"the variants only,{smaller} or run the bench on a machine with more RAM")


def build_baseline(model_cfg: ModelConfig, runtime_cfg: RuntimeConfig) -> Any:
    """The TorchEngine of `plan_baseline(model_cfg)`, its info() naming the plan (key `baseline`)."""
    plan = plan_baseline(model_cfg)
    log_plan(plan)
    if plan.mode == "whole":
        from llmship.runtime.torch_engine import TorchEngine
        from llmship.source import load_source

        engine = TorchEngine.from_source(load_source(model_cfg), threads=runtime_cfg.threads)
    else:
        engine = layerwise_baseline(model_cfg, runtime_cfg)
    engine.plan = plan
    return engine


def layerwise_baseline(model_cfg: ModelConfig, runtime_cfg: RuntimeConfig) -> Any:
    """The layer-at-a-time reference of the streaming compile over the model folder (+ adapter, merged per tensor)."""
    from llmship.export.layerwise import layerwise_engine
    from llmship.export.streaming import open_source
    from llmship.source import _read_config, check_architecture

    model_dir = local_model_dir(model_cfg)
    assert model_dir is not None  # plan_baseline refuses layerwise for a hub id
    if not model_dir.is_dir():
        raise UserError("model folder not found", where=f"model.path ({model_dir})")
    config = _read_config(model_dir, str(model_dir))
    check_architecture(config, str(model_dir / "config.json"), model_cfg.trust_remote_code)
    adapter_dir = Path(model_cfg.adapter).expanduser() if model_cfg.adapter else None
    checkpoint, config, _, tokenizer = open_source(model_dir, config, adapter_dir)
    return layerwise_engine(checkpoint, config, tokenizer, threads=runtime_cfg.threads, model_dir=model_dir)
