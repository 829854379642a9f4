"""Bench stage: ShareGPT throughput and latency of every variant against the PyTorch baseline, in one run.

`run_bench(cfg, variants, out_dir, progress=None) -> dict` samples requests as vLLM's serving benchmark does
(bench/sharegpt.py), runs the baseline and every variant over the same batches (bench/runner.py, each engine in a
fresh process by default) with one explicit intra-op thread count for all (llmship.runtime.threads), samples the
machine's load before each run (bench/load.py), repeats the whole round `bench.repeats` times (engines interleaved,
so slow drift of the machine hits them alike; figures are medians, with min-max per figure in `spread`), computes
vLLM's metrics (bench/metrics.py), the bandwidth roofline (bench/roofline.py)
and writes bench.json, bench.md and PNG plots to `out_dir` atomically. The returned dict is bench.json's summary:
no per-request records; `engines` is a list of rows (name, flat metrics such as mean_ttft_ms / p90_tpot_ms,
ratio_output_throughput, load_time_s, peak_rss_mb, roofline_fraction); `plots` holds absolute paths and captions.
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llmship.bench import metrics, roofline, runner
from llmship.bench.load import busy_warning, describe, sample_load
from llmship.bench.sharegpt import Limits, load_conversations, sample_requests
from llmship.config import Config
from llmship.errors import CheckFailed, UserError
from llmship.progress import Counter

log = logging.getLogger("llmship")

__all__ = ["BASELINE_NAME", "run_bench"]

BASELINE_NAME = "pytorch"
# Figures divided by the baseline's in `ratios` (higher is better for throughputs, lower for the rest).
RATIO_FIGURES = ("output_throughput", "request_throughput", "total_token_throughput", "ttft_median", "tpot_median",
                 "e2el_median", "load_s", "peak_rss_bytes", "size_bytes")
# Figures whose per-run ratio to the baseline's run of the same round also goes into `spread`, as ratio_<figure>.
SPREAD_RATIOS = ("output_throughput",)


# --------------------------------------------------------------------------- model facts
def _source_folder(cfg: Config) -> Path | None:
    from llmship.source import resolve_model_path

    folder = Path(resolve_model_path(cfg.model.path)).expanduser()
    return folder if folder.is_dir() else None


def bench_tokenizer(cfg: Config, variants: dict[str, Path]) -> Any:
    """The model's own tokenizer: the adapter's or source folder's, else a compiled variant's copy, else the hub's."""
    from llmship.source import load_tokenizer

    adapter = Path(cfg.model.adapter).expanduser() if cfg.model.adapter else None
    for folder in (adapter, _source_folder(cfg), *variants.values()):
        if folder is not None and any((Path(folder) / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
            return load_tokenizer(Path(folder))
    return load_tokenizer(cfg.model.path, cfg.model.revision)


def max_positions(cfg: Config, variants: dict[str, Path]) -> int:
    """Smallest max_position_embeddings among the source and the variants."""
    from llmship.artifact import max_positions as smallest

    return smallest(cfg.model, variants.values())


# --------------------------------------------------------------------------- engines
def check_baseline_fits(cfg: Config) -> None:
    """Before any work: the PyTorch baseline is benchmarked as a whole model in memory, or not at all."""
    from llmship.runtime.torch_baseline import bench_problem

    if cfg.bench.baseline and (problem := bench_problem(cfg.model)):
        raise UserError(problem, where="bench.baseline")


def engine_specs(cfg: Config, variants: dict[str, Path]) -> dict[str, dict[str, Any]]:
    specs: dict[str, dict[str, Any]] = {}
    if cfg.bench.baseline:  # model_dump leaves model.baseline out (it is no part of the stage keys): the worker needs it
        specs[BASELINE_NAME] = {"kind": "torch", "model": {**cfg.model.model_dump(), "baseline": cfg.model.baseline}}
    for name, folder in variants.items():
        if name in specs:
            raise UserError(f"variant name '{name}' is reserved for the PyTorch baseline", where="quantize")
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError("compiled variant folder not found", where=f"{name} ({folder})")
        specs[name] = {"kind": cfg.runtime.engine, "folder": str(folder.absolute())}
    if not specs:
        raise UserError("nothing to benchmark: no variants and bench.baseline is off", where="bench.baseline")
    return specs


def _measure_isolated(job: dict[str, Any], bar: Counter, label: str) -> dict[str, Any]:
    """runner.measure in a fresh Python process (clean load time and peak RSS)."""
    with tempfile.TemporaryDirectory(prefix="llmship-bench-") as tmp:
        job_file, result_file, err_file = Path(tmp) / "job.json", Path(tmp) / "result.json", Path(tmp) / "stderr.txt"
        job_file.write_text(json.dumps(job), encoding="utf-8")
        with err_file.open("w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "llmship.bench.runner", str(job_file), str(result_file)],
                                    stdout=subprocess.PIPE, stderr=err, text=True, env=_worker_env())
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(runner.PROGRESS_TAG):
                    done, total = (int(x) for x in line.split()[1:3])
                    bar(label, done, total)
            code = proc.wait()
        if not result_file.is_file():
            tail = err_file.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"bench worker for {label} exited with code {code} without a result:\n{tail}")
        result = json.loads(result_file.read_text(encoding="utf-8"))
    if "error" in result:
        kind = {"UserError": UserError, "CheckFailed": CheckFailed}.get(result["error"]["type"], RuntimeError)
        raise kind(f"{label}: {result['error']['message']}")
    return result


def _worker_env() -> dict[str, str]:
    """This process's environment, with llmship's own location first on PYTHONPATH (a source checkout works too)."""
    import os

    import llmship

    env = dict(os.environ)
    root = str(Path(llmship.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def measure_engine(job: dict[str, Any], isolate: bool, bar: Counter, label: str) -> dict[str, Any]:
    if isolate:
        return _measure_isolated(job, bar, label)
    return runner.measure(job, lambda done, total: bar(label, done, total), isolated=False)


def measure_here(job: dict[str, Any], isolate: bool, bar: Counter, label: str, bandwidth: dict[str, Any],
                 ) -> dict[str, Any]:
    """One timed run on this machine: the machine's load just before it, the worker's raw figures."""
    load = sample_load()
    log.info("%s: %s", label, describe(load))
    return {"raw": measure_engine(job, isolate, bar, label), "load": load, "bandwidth": bandwidth}


def measure_on_node(job: dict[str, Any], label: str) -> dict[str, Any]:
    """In a Ray task on a bench node: `measure_here` in a fresh process (as `bench.isolate`), with that node's read
    bandwidth (the roofline's limit) and its name."""
    from llmship.cluster import this_node

    bandwidth = roofline.measure_read_bandwidth(job["runtime"]["threads"])
    return {**measure_here(job, True, Counter(None), label, bandwidth), "node": this_node()}


def measure_on_cluster(cfg: Config, jobs: list[tuple[str, dict[str, Any]]], bar: Counter) -> list[dict[str, Any]]:
    """Every timed run as a Ray task holding one unit of `cluster.bench_resource` (bench nodes carry one: one engine
    per node at a time, and only on nodes of that label, so the ratios compare runs on like hardware) and
    `cluster.num_cpus` (set it, and runtime.threads, to the bench nodes' cores); in the order of `jobs`."""
    from llmship.cluster import Unit, connected, probe_nodes, require_resource, run_units

    resource = cfg.cluster.bench_resource or ""
    cluster = cfg.cluster
    found: dict[str, dict[str, Any]] = {}
    read = {f"variant {job['spec']['folder']}": Path(job["spec"]["folder"]) for _, job in jobs if "folder" in job["spec"]}
    source = _source_folder(cfg)
    if source is not None and any(job["spec"]["kind"] == "torch" for _, job in jobs):
        read["model.path"] = source
    with connected(cluster) as ray:
        require_resource(ray, resource, "cluster.bench_resource")
        probe_nodes(ray, Path(cfg.output.dir).expanduser(), read)

        def finished(unit: Unit, result: dict[str, Any]) -> None:
            found[unit.label] = result
            log.info("%s: ran on node %s; %s", unit.label, result["node"], describe(result["load"]))
            bar("bench (cluster)", len(found), len(jobs))

        run_units(ray, cluster, measure_on_node, [Unit(label, (job, label), {resource: 1}) for label, job in jobs],
                  finished)
    return [found[label] for label, _ in jobs]


# --------------------------------------------------------------------------- figures
def _headline(engine: dict[str, Any]) -> dict[str, float]:
    m = engine["metrics"]
    return {
        "output_throughput": m["output_throughput"], "request_throughput": m["request_throughput"],
        "total_token_throughput": m["total_token_throughput"], "ttft_median": m["latency"]["ttft"]["median_ms"],
        "tpot_median": m["latency"]["tpot"]["median_ms"], "e2el_median": m["latency"]["e2el"]["median_ms"],
        "load_s": engine["load_s"], "peak_rss_bytes": engine["memory"]["peak_rss_bytes"], "size_bytes": engine["size_bytes"],
    }


def ratios(engine: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float | None]:
    mine, base = _headline(engine), _headline(baseline)
    return {k: (mine[k] / base[k] if mine[k] is not None and base[k] else None) for k in RATIO_FIGURES}


def run_figures(engine: dict[str, Any]) -> dict[str, float | None]:
    """The headline figures of one run plus prefill and decode tokens/s: what `spread` summarizes over repeats."""
    return {**_headline(engine), "prefill_tokens_per_s": engine["prefill"]["tokens_per_s"],
            "decode_tokens_per_s": engine["decode"]["tokens_per_s"]}


def spread(runs: list[dict[str, Any]], baseline_runs: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Median, min and max of every run figure over the repeats; with a baseline, also of the per-repeat ratio of each
    SPREAD_RATIOS figure (paired: repeat k of the engine against repeat k of the baseline, run back to back)."""
    per_run = [run_figures(r) for r in runs]
    if baseline_runs is not None and baseline_runs is not runs:
        for figures, base in zip(per_run, baseline_runs, strict=True):
            base_figures = run_figures(base)
            for key in SPREAD_RATIOS:
                figures[f"ratio_{key}"] = figures[key] / base_figures[key] if base_figures[key] else None
    out = {}
    for key in per_run[0]:
        values = [f[key] for f in per_run if f[key] is not None]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}
    return out


def median_tree(trees: list[Any]) -> Any:
    """Element-wise median of same-shaped dicts of numbers; other values (text, None, lists) from the first."""
    first = trees[0]
    if isinstance(first, dict):
        return {key: median_tree([t[key] for t in trees]) for key in first}
    numbers = [t for t in trees if isinstance(t, int | float) and not isinstance(t, bool)]
    return statistics.median(numbers) if len(numbers) == len(trees) else first


def combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine entry from its repeats: every measured figure is the median over the runs; records of all runs,
    each tagged with its repeat; the load sample of each run."""
    first = runs[0]
    engine = {key: first[key] for key in ("spec", "info", "size_bytes", "weights")}
    if "node" in first:  # a cluster run: the node of each run (bench nodes carry the same hardware label)
        engine["nodes"] = [r["node"] for r in runs]
    for key in ("load_s", "memory", "metrics", "roofline", "decode", "prefill"):
        engine[key] = median_tree([r[key] for r in runs])
    engine["repeats"] = len(runs)
    engine["load"] = [r["load"] for r in runs]
    engine["records"] = [{**record, "repeat": number} for number, r in enumerate(runs) for record in r["records"]]
    return engine


def environment(cfg: Config) -> dict[str, Any]:
    import os

    import psutil

    from llmship.cache import library_versions

    return {"python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "libraries": library_versions(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def thread_setting(cfg: Config) -> dict[str, Any]:
    """The intra-op thread count every engine gets, and where it came from."""
    from llmship.runtime.threads import resolve_threads

    source = "runtime.threads" if cfg.runtime.threads > 0 else "physical cores"
    return {"intra_op": resolve_threads(cfg.runtime.threads), "inter_op": 1, "source": source}


def engine_run(spec: dict[str, Any], raw: dict[str, Any], lengths: list[tuple[int, int]], batches: list[list[int]],
               bandwidth: dict[str, Any], load: dict[str, Any]) -> dict[str, Any]:
    """One engine's figures from one timed run of the worker."""
    output_after_first = sum(out - 1 for _, out in lengths)
    return {
        "spec": spec, "info": raw["info"], "load_s": raw["load_s"], "memory": raw["memory"],
        "size_bytes": raw["size_bytes"], "weights": raw["weights"],
        "metrics": metrics.aggregate(raw["records"], raw["duration_s"]),
        "roofline": roofline.roofline(raw["weights"]["bytes_per_step"], bandwidth["bytes_per_s"],
                                      raw["decode_steps"], raw["decode_s"], _cache_bytes_per_step(lengths, batches, raw)),
        "decode": {"steps": raw["decode_steps"], "seconds": raw["decode_s"],
                   "tokens_per_s": output_after_first / raw["decode_s"] if raw["decode_s"] else None},
        "prefill": {"seconds": raw["prefill_s"], "tokens_per_s": sum(prompt for prompt, _ in lengths) / raw["prefill_s"]},
        "records": raw["records"], "load": load,
    }


def thread_mismatches(engines: dict[str, dict[str, Any]], threads: int) -> list[str]:
    """Engines that report another intra-op thread count than the one the bench set (a library ignoring it)."""
    return [f"{name} ran {e['info'].get('threads')} intra-op threads, not the {threads} set for every engine"
            for name, e in engines.items() if e["info"].get("threads") != threads]


# --------------------------------------------------------------------------- entry point
def run_bench(cfg: Config, variants: dict[str, Path], out_dir: Path, progress: Any = None) -> dict[str, Any]:
    """Benchmark the PyTorch baseline and every variant on the same ShareGPT requests; write out_dir; return the summary."""
    from llmship.artifact import atomic_folder

    bc = cfg.bench
    variants = {name: Path(folder) for name, folder in variants.items()}
    specs = engine_specs(cfg, variants)
    check_baseline_fits(cfg)
    tokenizer = bench_tokenizer(cfg, variants)
    positions = max_positions(cfg, variants)
    threads = thread_setting(cfg)
    limits = Limits.clipped(bc.min_len, bc.max_prompt_len, bc.max_total_len, positions)
    requests, sampling = sample_requests(load_conversations(bc.dataset), tokenizer, bc.num_prompts, seed=bc.seed,
                                         output_len=bc.output_len, limits=limits, oversample=bc.oversample)
    lengths = [(r.prompt_len, r.output_len) for r in requests]
    batches = runner.plan_batches(lengths, bc.batch_size)
    warm = list(range(min(bc.warmup, len(requests))))
    job_base = {
        "requests": [{"prompt_ids": r.prompt_ids, "output_len": r.output_len} for r in requests],
        "batches": batches,
        "warmup_batches": [warm[i : i + bc.batch_size] for i in range(0, len(warm), bc.batch_size)],
        "runtime": {**cfg.runtime.model_dump(), "threads": threads["intra_op"]},
    }
    bar = Counter(progress)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in specs}
    samples: list[tuple[str, dict[str, Any]]] = []
    jobs = [(f"bench {name}" + (f" (run {repeat + 1}/{bc.repeats})" if bc.repeats > 1 else ""), name, spec)
            for repeat in range(bc.repeats) for name, spec in specs.items()]
    try:
        if cfg.cluster.backend == "ray" and cfg.cluster.bench_resource:
            measured = measure_on_cluster(cfg, [(label, {**job_base, "spec": spec}) for label, _, spec in jobs], bar)
        else:
            bandwidth = roofline.measure_read_bandwidth(threads["intra_op"])
            measured = [measure_here({**job_base, "spec": spec}, bc.isolate, bar, label, bandwidth)
                        for label, _, spec in jobs]
    finally:
        bar.finish()
    for (label, name, spec), found in zip(jobs, measured, strict=True):
        raw, load = found["raw"], found["load"]
        samples.append((label.removeprefix("bench "), load))
        produced = [r["produced_len"] for r in raw["records"]]
        if produced != [r.output_len for r in requests]:
            raise CheckFailed(f"{name}: produced output lengths differ from the requested ones")
        runs[name].append(engine_run(spec, raw, lengths, batches, found["bandwidth"], load))
        if "node" in found:
            runs[name][-1]["node"] = found["node"]
    bandwidth = measured[0]["bandwidth"]
    engines = {name: combine_runs(engine_runs) for name, engine_runs in runs.items()}
    warnings = [w for w in (busy_warning(samples), *thread_mismatches(engines, threads["intra_op"])) if w]
    for warning in warnings:
        log.warning("bench: %s", warning)
    baseline = BASELINE_NAME if BASELINE_NAME in engines else None
    for name, engine in engines.items():
        engine["ratios"] = ratios(engine, engines[baseline]) if baseline else {}
        engine["spread"] = spread(runs[name], runs[baseline] if baseline else None)
    result = {
        "config": {"bench": bc.model_dump(), "runtime": cfg.runtime.model_dump(),
                   "model": {**cfg.model.model_dump(), "baseline": cfg.model.baseline}},
        "environment": environment(cfg),
        "sampling": sampling.as_dict(),
        "max_positions": positions,
        "requests": [{"index": r.index, "conversation_id": r.conversation_id, "prompt_len": r.prompt_len,
                      "output_len": r.output_len, "oversampled": r.oversampled} for r in requests],
        "batches": batches,
        "padding": runner.padding_overhead(lengths, batches),
        "bandwidth": bandwidth,
        "threads": threads,
        "repeats": bc.repeats,
        "warnings": warnings,
        "baseline": baseline,
        "baseline_run": engines[baseline]["info"].get("baseline") if baseline else None,
        "engines": engines,
    }
    from llmship.bench import report

    with atomic_folder(out_dir) as tmp:
        (tmp / "bench.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
        (tmp / "bench.md").write_text(report.markdown(result), encoding="utf-8")
        result["plots"] = report.plots(result, tmp)
    return summary(result, out_dir)


def _cache_bytes_per_step(lengths: list[tuple[int, int]], batches: list[list[int]], raw: dict[str, Any]) -> float:
    total = roofline.decode_cache_bytes(lengths, batches, raw["weights"]["cache_bytes_per_token"])
    return total / raw["decode_steps"] if raw["decode_steps"] else 0.0


def flat_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """Run figures with the latency statistics flattened: mean_ttft_ms, median_ttft_ms, p90_ttft_ms, p99_ttft_ms, ..."""
    flat = {k: v for k, v in m.items() if k != "latency"}
    for metric, stats in m["latency"].items():
        for stat, value in stats.items():
            flat[f"{stat.removesuffix('_ms')}_{metric}_ms" if stat.endswith("_ms") else f"{metric}_{stat}"] = value
    return flat


def engine_row(name: str, engine: dict[str, Any]) -> dict[str, Any]:
    """One engine of the summary (what the pipeline caches and the report tabulates)."""
    ratios_ = engine.get("ratios", {})
    return {
        "name": name, "info": engine["info"], "metrics": flat_metrics(engine["metrics"]),
        "ratio_output_throughput": ratios_.get("output_throughput"), "ratios": ratios_,
        "load_time_s": engine["load_s"], "peak_rss_mb": engine["memory"]["peak_rss_bytes"] / (1 << 20),
        "size_mb": engine["size_bytes"] / (1 << 20), "roofline_fraction": engine["roofline"]["fraction_of_limit"],
        "prefill_tokens_per_s": engine["prefill"]["tokens_per_s"], "decode_tokens_per_s": engine["decode"]["tokens_per_s"],
        "roofline": engine["roofline"], "memory": engine["memory"], "weights": engine["weights"],
        "threads": engine["info"].get("threads"), "spread": engine["spread"], "load": engine["load"],
        **({"nodes": engine["nodes"]} if "nodes" in engine else {}),
    }


PLOT_CAPTIONS = {"throughput.png": "Output tokens/s per engine (grey: PyTorch baseline)",
                 "latency.png": "TTFT and TPOT distributions per engine (log scale)"}


def summary(result: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The result without per-request data: engines as a list of flat rows, plots with absolute paths and captions."""
    bc = result["config"]["bench"]
    keep = {k: v for k, v in result.items() if k not in ("engines", "requests", "batches", "plots")}
    threads = result["threads"]
    repeats = f", median of {result['repeats']} runs" if result["repeats"] > 1 else ""
    caption = (f"{result['sampling']['used']} ShareGPT requests, batch size {bc['batch_size']}, "
               f"{threads['intra_op']} intra-op thread(s) for every engine ({threads['source']}){repeats}; bandwidth limit "
               f"from a measured {result['bandwidth']['gb_per_s']:.1f} GB/s read bandwidth.")
    return {**keep, "engines": [engine_row(n, e) for n, e in result["engines"].items()], "caption": caption,
            "dir": str(out_dir), "files": ["bench.json", "bench.md", *result.get("plots", [])],
            "plots": [{"path": str(Path(out_dir).absolute() / p), "caption": PLOT_CAPTIONS.get(p, p)} for p in result.get("plots", [])]}


def stage_inputs(cfg: Config) -> dict[str, Any]:
    """What the bench stage reads besides the variant folders: the stage's cache key is derived from this."""
    from llmship.cache import folder_fingerprint
    from llmship.data.sources import data_fingerprint
    from llmship.source import resolve_model_path

    return {"model": folder_fingerprint(resolve_model_path(cfg.model.path)), "model_config": cfg.model.model_dump(),
            "bench": cfg.bench.model_dump(), "runtime": cfg.runtime.model_dump(),
            "data": data_fingerprint(cfg.bench.dataset, "sharegpt")}
