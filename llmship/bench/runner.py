"""Runs one engine over the sampled requests and records per-request timings.

`measure(job)` loads the engine, runs the warm-up, then every batch of the plan with `Engine.generate(...,
ignore_eos=True, on_step=...)`, taking a timestamp per greedy step. `python -m llmship.bench.runner JOB RESULT`
does the same in a fresh process, so that load time and peak RSS belong to that engine alone (run_bench uses it
unless bench.isolate is off); progress goes to stdout as `@@progress done total` lines read by the parent.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import llmship.bench.roofline as roofline
from llmship.bench.metrics import request_latencies
from llmship.errors import CheckFailed
from llmship.files import write_json_atomic
from llmship.memory import high_water_mark
from llmship.runtime.layout import folder_graph

PROGRESS_TAG = "@@progress"
WARMUP_OUTPUT_CAP = 8  # warm-up only needs every kernel and allocation exercised once; its figures are discarded


# --------------------------------------------------------------------------- batch plan
def plan_batches(lengths: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Request indices grouped into batches of `batch_size` after sorting by (output length, prompt length).

    A batch decodes until its longest output is done, so sorting by output length first limits wasted decode steps
    (the dominant cost); prompt length second limits prefill padding.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i][1], lengths[i][0], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padding_overhead(lengths: Sequence[tuple[int, int]], batches: list[list[int]]) -> dict[str, Any]:
    """Extra prompt tokens (left padding) and decode slots (rows already done) the batching costs."""
    prompt = sum(lengths[i][0] for b in batches for i in b)
    output = sum(lengths[i][1] for b in batches for i in b)
    padded_prompt = sum(len(b) * max(lengths[i][0] for i in b) for b in batches)
    decode_slots = sum(len(b) * max(lengths[i][1] for i in b) for b in batches)
    return {
        "prompt_tokens": prompt, "padded_prompt_tokens": padded_prompt, "prompt_padding": padded_prompt / prompt - 1.0,
        "output_tokens": output, "decode_slots": decode_slots, "decode_padding": decode_slots / output - 1.0,
    }


# --------------------------------------------------------------------------- memory
class PeakRss:
    """Peak resident memory of this process while the engine lives.

    In a fresh process: the kernel's high-water mark (VmHWM in /proc/self/status, exact; ru_maxrss is not used because
    Linux carries the parent's peak over fork + exec). In-process, or where /proc is missing: a 10 ms psutil sampler
    (in-process, memory kept by the allocator after an earlier engine may still be counted).
    """

    def __init__(self, isolated: bool):
        import psutil

        self.process = psutil.Process()
        self.start_rss = self.process.memory_info().rss
        self.peak = self.start_rss
        self.use_hwm = isolated and high_water_mark() is not None
        self._stop = threading.Event()
        self._thread = None if self.use_hwm else threading.Thread(target=self._sample, daemon=True)
        if self._thread is not None:
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        peak = max(self.peak, self.process.memory_info().rss)
        method = "psutil sampling every 10 ms" + ("" if self.use_hwm else " (in-process)")
        if self.use_hwm:
            peak = max(peak, high_water_mark() or 0)
            method = "VmHWM of a fresh process"
        return {"peak_rss_bytes": int(peak), "rss_before_load_bytes": int(self.start_rss), "method": method}


# --------------------------------------------------------------------------- engine
def load(spec: dict[str, Any], runtime: dict[str, Any]) -> Any:
    """The engine of a job spec: {"kind": a registry name, "model": ModelConfig fields | "folder": path}."""
    from llmship.config import ModelConfig, RuntimeConfig
    from llmship.runtime import build_engine

    target = ModelConfig(**spec["model"]) if "model" in spec else Path(spec["folder"])
    return build_engine(spec["kind"], target, RuntimeConfig(**runtime))


def check_baseline(spec: dict[str, Any]) -> None:
    """The PyTorch baseline is timed as a whole model in this process's memory, never a layer at a time (that would
    time the disk): checked here too, where the bench runs (a Ray bench node has its own RAM)."""
    if spec["kind"] != "torch":
        return
    from llmship.config import ModelConfig
    from llmship.errors import UserError
    from llmship.runtime.torch_baseline import bench_problem

    if problem := bench_problem(ModelConfig(**spec["model"])):
        raise UserError(problem, where="bench.baseline")


def preload_libraries(spec: dict[str, Any]) -> None:
    """Import the engine's libraries before the load timer starts: load time is the model's, not Python's imports."""
    import llmship.runtime  # noqa: F401 - onnxruntime (torch only for the PyTorch engine, so RSS is the engine's own)

    if spec["kind"] == "torch":
        import transformers.models.llama.modeling_llama  # noqa: F401

        import llmship.runtime.torch_engine  # noqa: F401
        import llmship.source  # noqa: F401


def weight_bytes(engine: Any, spec: dict[str, Any]) -> dict[str, Any]:
    if spec["kind"] == "torch":
        return roofline.torch_weight_bytes(engine.model)
    return roofline.onnx_weight_bytes(folder_graph(spec["folder"]))


def cache_bytes_per_token(engine: Any, spec: dict[str, Any]) -> int:
    """KV-cache bytes per context token: the PyTorch model's config and dtype, or the ONNX graph's past inputs."""
    if spec["kind"] == "torch":
        from llmship.export.onnx_export import cache_shape

        config = engine.model.config
        kv_heads, head_dim = cache_shape(config)
        itemsize = next(engine.model.parameters()).element_size()
        return roofline.cache_bytes_per_token(config.num_hidden_layers, kv_heads, head_dim, itemsize)
    return roofline.onnx_cache_bytes_per_token(folder_graph(spec["folder"]))


def size_on_disk(engine: Any, spec: dict[str, Any]) -> int:
    """Bytes of the weights as stored: the graph + external data, or the source checkpoint's weight files."""
    if spec["kind"] != "torch":
        from llmship.files import model_size

        return model_size(spec["folder"])
    folder = Path(getattr(engine, "path", "") or "")
    if folder.is_dir():
        files = [p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
        if files:
            return sum(p.stat().st_size for p in files)
    return sum(p.numel() * p.element_size() for p in engine.model.parameters())  # hub model: its in-memory weights


# --------------------------------------------------------------------------- run
def run_batch(engine: Any, prompts: list[list[int]], budgets: list[int]) -> tuple[list[list[int]], float, list[float]]:
    """Generate one batch ignoring EOS; (outputs, start time, step times)."""
    steps: list[float] = []

    def on_step(_step: int, _tokens: Any) -> None:
        steps.append(time.perf_counter())

    start = time.perf_counter()
    outputs = engine.generate(prompts, budgets, ignore_eos=True, on_step=on_step)
    return outputs, start, steps


def measure(job: dict[str, Any], progress: Callable[[int, int], None] | None = None, isolated: bool = False) -> dict[str, Any]:
    """Load, warm up and time one engine over the job's batches; per-request records and engine figures."""
    requests: list[dict[str, Any]] = job["requests"]
    batches: list[list[int]] = job["batches"]
    preload_libraries(job["spec"])
    check_baseline(job["spec"])
    memory = PeakRss(isolated)
    t0 = time.perf_counter()
    engine = load(job["spec"], job["runtime"])
    load_s = time.perf_counter() - t0
    try:
        info = engine.info()
        weights = weight_bytes(engine, job["spec"])
        weights["cache_bytes_per_token"] = cache_bytes_per_token(engine, job["spec"])
        size = size_on_disk(engine, job["spec"])
        for batch in job["warmup_batches"]:
            engine.generate([requests[i]["prompt_ids"] for i in batch],
                            [min(requests[i]["output_len"], WARMUP_OUTPUT_CAP) for i in batch], ignore_eos=True)
        records: list[dict[str, Any]] = []
        decode_steps = 0
        decode_s = 0.0
        prefill_s = 0.0
        done = 0
        run_start = time.perf_counter()
        for number, batch in enumerate(batches):
            prompts = [requests[i]["prompt_ids"] for i in batch]
            budgets = [requests[i]["output_len"] for i in batch]
            outputs, start, steps = run_batch(engine, prompts, budgets)
            prefill_s += steps[0] - start  # prompt pass + first greedy pick, the whole batch at once
            decode_steps += len(steps) - 1
            decode_s += steps[-1] - steps[0]
            for i, out, budget in zip(batch, outputs, budgets, strict=True):
                if len(out) != budget:
                    raise CheckFailed(f"{info.get('engine')}: request {i} produced {len(out)} tokens, {budget} requested "
                                      "(generation must ignore EOS)")
                rec = {"index": i, "batch": number, "batch_size": len(batch), "prompt_len": len(requests[i]["prompt_ids"]),
                       "output_len": budget, "produced_len": len(out)}
                rec.update(request_latencies(steps[:budget], start))
                records.append(rec)
            done += len(batch)
            if progress is not None:
                progress(done, len(requests))
        duration = time.perf_counter() - run_start
    finally:
        engine.close()
    return {"info": info, "load_s": load_s, "memory": memory.stop(), "weights": weights, "size_bytes": size,
            "records": sorted(records, key=lambda r: r["index"]), "duration_s": duration,
            "decode_steps": decode_steps, "decode_s": decode_s, "prefill_s": prefill_s, "pid": os.getpid()}


def main(argv: list[str]) -> int:
    job_file, result_file = Path(argv[0]), Path(argv[1])
    job = json.loads(job_file.read_text(encoding="utf-8"))

    def report(done: int, total: int) -> None:
        print(f"{PROGRESS_TAG} {done} {total}", flush=True)

    try:
        result = measure(job, report, isolated=True)
    except Exception as exc:  # noqa: BLE001 - handed to the parent, which re-raises it with its type
        result = {"error": {"type": type(exc).__name__, "message": str(exc)}}
    write_json_atomic(result_file, result, indent=None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
