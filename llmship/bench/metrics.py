"""Latency and throughput figures, defined as vLLM's serving benchmark defines them.

`vllm/benchmarks/serve.py` calculate_metrics, timing from `lib/endpoint_request_func.py`:
- TTFT = first token time - request start; E2EL = last token time - request start;
- ITL = gaps between consecutive tokens of a request, pooled over all requests;
- TPOT = (E2EL - TTFT) / (output tokens - 1), only for requests with more than one output token;
- request / output / total (input + output) throughput = counts / wall time of the measured run.
A request "starts" when its batch starts (vLLM with max concurrency starts the timer when the request gets a slot);
here a token "arrives" when the engine's greedy step that produced it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# vLLM reports mean, median, std and p99 (--metric-percentiles 99); p90 is added for CPU runs' long tails.
PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


def request_latencies(token_times: Sequence[float], start: float) -> dict[str, Any]:
    """TTFT, TPOT, E2EL (seconds) and the ITL gaps of one request from its token arrival times."""
    times = [t - start for t in token_times]
    ttft, e2el = times[0], times[-1]
    itl = [b - a for a, b in zip(times, times[1:], strict=False)]
    tpot = (e2el - ttft) / (len(times) - 1) if len(times) > 1 else None
    return {"ttft": ttft, "tpot": tpot, "e2el": e2el, "itl": itl}


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """mean, median, std, p90, p99 in milliseconds (values in seconds), plus the count."""
    if not len(values):
        return {"count": 0, "mean_ms": None, "median_ms": None, "std_ms": None, "p90_ms": None, "p99_ms": None}
    ms = np.asarray(values, dtype=np.float64) * 1000.0
    out: dict[str, float | int | None] = {"count": int(ms.size), "mean_ms": float(ms.mean()), "std_ms": float(ms.std())}
    for p in PERCENTILES:
        out["median_ms" if p == 50 else f"p{p}_ms"] = float(np.percentile(ms, p))
    return out


def aggregate(records: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    """Run-level figures from per-request records (each with prompt_len, output_len, ttft, tpot, e2el, itl)."""
    input_tokens = sum(r["prompt_len"] for r in records)
    output_tokens = sum(r["produced_len"] for r in records)
    latency = {
        "ttft": summarize([r["ttft"] for r in records]),
        "tpot": summarize([r["tpot"] for r in records if r["tpot"] is not None]),
        "itl": summarize([gap for r in records for gap in r["itl"]]),
        "e2el": summarize([r["e2el"] for r in records]),
    }
    return {
        "completed": len(records),
        "duration_s": duration,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(records) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "latency": latency,
    }
