"""bench.md (tables) and PNG plots from the bench result dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MIB = 1 << 20


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _ratio(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}x"


def baseline_line(info: dict[str, Any]) -> str:
    """Which PyTorch baseline was timed: engine, dtype, whole model (the only one bench runs)."""
    plan = info.get("baseline")
    text = plan["summary"] if isinstance(plan, dict) else f"PyTorch baseline: whole model, {info.get('dtype')}"
    return f"Baseline (engine {info.get('engine')}, {info.get('dtype')}): {text}."


def markdown(result: dict[str, Any]) -> str:
    engines = result["engines"]
    baseline = result.get("baseline")
    s = result["sampling"]
    threads = result["threads"]
    repeats = result["repeats"]
    lines = [
        "# llmship bench",
        "",
        *(f"- **Warning**: {w}." for w in result["warnings"]),
        *([""] if result["warnings"] else []),
        f"{s['used']} ShareGPT requests ({s['read']} conversations read, {s['examined']} examined, {s['kept']} kept, "
        f"{s['oversampled']} oversampled); batch size {result['config']['bench']['batch_size']}, "
        f"{_count(threads['intra_op'], 'intra-op thread')} ({threads['source']}) and "
        f"{_count(threads['inter_op'], 'inter-op thread')} set "
        f"for every engine, provider {result['config']['runtime']['provider']}; "
        "generation ignores EOS, every request produced exactly its output length."
        + (f" Every engine ran {repeats} times (interleaved); figures are medians over the runs." if repeats > 1 else ""),
        "",
        "Dropped: " + (", ".join(f"{k.replace('_', ' ')} {v}" for k, v in s["dropped"].items() if v) or "none") + ".",
        f"Padding overhead: prompt {result['padding']['prompt_padding']:.1%}, decode slots {result['padding']['decode_padding']:.1%}.",
        *([baseline_line(engines[baseline]["info"])] if baseline else []),
        *(["Nodes (Ray, one engine per bench node at a time): "
           + "; ".join(f"{name} on {', '.join(dict.fromkeys(e['nodes']))}" for name, e in engines.items()) + "."]
          if all("nodes" in e for e in engines.values()) else []),
        "",
        "## Throughput and latency (median, ms)",
        "",
        "| engine | output tok/s | vs baseline | req/s | total tok/s | TTFT | TPOT | ITL | E2EL | TTFT p99 | TPOT p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in engines.items():
        m, lat = e["metrics"], e["metrics"]["latency"]
        label = f"{name} (baseline)" if name == baseline else name
        lines.append(
            f"| {label} | {_f(m['output_throughput'], 1)} | {_ratio(e.get('ratios', {}).get('output_throughput'))} "
            f"| {_f(m['request_throughput'], 3)} | {_f(m['total_token_throughput'], 1)} | {_f(lat['ttft']['median_ms'], 1)} "
            f"| {_f(lat['tpot']['median_ms'], 1)} | {_f(lat['itl']['median_ms'], 1)} | {_f(lat['e2el']['median_ms'], 1)} "
            f"| {_f(lat['ttft']['p99_ms'], 1)} | {_f(lat['tpot']['p99_ms'], 1)} |")
    lines += ["", "## Latency statistics (ms)", "", "| engine | metric | mean | median | p90 | p99 | vs baseline (median) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, e in engines.items():
        for metric, stats in e["metrics"]["latency"].items():
            ratio = e.get("ratios", {}).get(f"{metric}_median")
            lines.append(f"| {name} | {metric.upper()} | {_f(stats.get('mean_ms'), 1)} | {_f(stats.get('median_ms'), 1)} "
                         f"| {_f(stats.get('p90_ms'), 1)} | {_f(stats.get('p99_ms'), 1)} | {_ratio(ratio)} |")
    bw = result["bandwidth"]
    lines += [
        "",
        f"## Resources and roofline (read bandwidth {bw['gb_per_s']:.1f} GB/s, {bw['threads']} threads)",
        "",
        "| engine | threads | load s | peak RSS MiB | size MiB | size vs baseline | prefill tok/s | decode tok/s "
        "| weights read/step MB | KV cache read/step MB | limit steps/s | decode steps/s | % of limit | % of limit, weights only |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in engines.items():
        r = e["roofline"]
        lines.append(
            f"| {name} | {_threads(e['info'])} | {_f(e['load_s'])} | {_f(e['memory']['peak_rss_bytes'] / MIB, 0)} | {_f(e['size_bytes'] / MIB, 1)} "
            f"| {_ratio(e.get('ratios', {}).get('size_bytes'))} | {_f(e['prefill']['tokens_per_s'], 1)} "
            f"| {_f(e['decode']['tokens_per_s'], 1)} | {_f(r['weight_bytes_per_step'] / 1e6, 1)} | {_f(r['cache_bytes_per_step'] / 1e6, 1)} "
            f"| {_f(r['limit_steps_per_s'], 1)} | {_f(r['decode_steps_per_s'], 1)} | {r['fraction_of_limit']:.0%} "
            f"| {r['weights_fraction_of_limit']:.0%} |")
    lines += [
        "",
        "TTFT/TPOT/ITL/E2EL as vLLM's benchmark defines them (a request starts when its batch starts). Ratios divide the "
        "engine's figure by the baseline's. Weights read per step: every weight once, one row of gathered tables "
        "(embedding); KV cache read per step: the keys and values of every live sequence's context, mean over the run's "
        "steps. % of limit = (weights + KV cache) bytes streamed per second / measured read bandwidth. "
        "Prefill tok/s = prompt tokens / time to the first token of each batch; decode tok/s = tokens after the first / "
        "time after the first token. Threads: intra-op (inter-op) as the engine reports them.",
        "",
    ]
    if repeats > 1:
        lines += spread_table(result)
    lines += load_table(result)
    return "\n".join(lines)


SPREAD_ROWS = (("output_throughput", "output tok/s", 1), ("ratio_output_throughput", "output tok/s vs baseline", 2),
               ("ttft_median", "TTFT median ms", 1), ("tpot_median", "TPOT median ms", 1),
               ("prefill_tokens_per_s", "prefill tok/s", 1), ("decode_tokens_per_s", "decode tok/s", 1))


def spread_table(result: dict[str, Any]) -> list[str]:
    lines = ["", f"## Spread over {result['repeats']} runs", "", "| engine | figure | median | min | max | runs |",
             "|---|---|---:|---:|---:|---|"]
    for name, e in result["engines"].items():
        for key, label, digits in SPREAD_ROWS:
            figure = e["spread"].get(key)
            if figure is not None:
                runs = ", ".join(_f(float(v), digits) for v in figure["runs"])
                lines.append(f"| {name} | {label} | {_f(float(figure['median']), digits)} | {_f(float(figure['min']), digits)} "
                             f"| {_f(float(figure['max']), digits)} | {runs} |")
    lines += ["", "Ratios are paired: each run of an engine against the baseline's run of the same round.", ""]
    return lines


def load_table(result: dict[str, Any]) -> list[str]:
    lines = ["## Machine load before each run", "",
             "| engine | run | other processes' CPUs | share of all CPUs | 1-minute load average |", "|---|---:|---:|---:|---:|"]
    for name, e in result["engines"].items():
        for number, sample in enumerate(e["load"], start=1):
            lines.append(f"| {name} | {number} | {sample['others_cpus']:.2f} of {sample['cpus']} | {sample['others_fraction']:.0%} "
                         f"| {_f(sample['load_average_1m'])} |")
    lines += ["", "CPU time that other processes took during a probe just before the run (this process idle), and the "
              "kernel's 1-minute load average; a warning above when either says other work was running.", ""]
    return lines


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _threads(info: dict[str, Any]) -> str:
    inter = info.get("interop_threads")
    return f"{info.get('threads')}" + (f" ({inter})" if inter is not None else "")


def plots(result: dict[str, Any], folder: Path) -> list[str]:
    """throughput.png (output tok/s per engine) and latency.png (TTFT and TPOT distributions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = result["engines"]
    names = list(engines)
    baseline = result.get("baseline")
    written = []

    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(names) + 2), 3.6))
    values = [engines[n]["metrics"]["output_throughput"] for n in names]
    colors = ["#888888" if n == baseline else "#3b75af" for n in names]
    bars = ax.bar(names, values, color=colors)
    for bar, n in zip(bars, names, strict=True):
        ratio = engines[n].get("ratios", {}).get("output_throughput")
        label = f"{bar.get_height():.1f}" + (f"\n{ratio:.2f}x" if ratio is not None and n != baseline else "")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Output throughput, batch {result['config']['bench']['batch_size']} (grey: PyTorch baseline)")
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(folder / "throughput.png", dpi=110)
    plt.close(fig)
    written.append("throughput.png")

    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.6 * len(names) + 4), 3.6))
    for ax, metric, title in ((axes[0], "ttft", "TTFT (ms)"), (axes[1], "tpot", "TPOT (ms)")):
        data = [[r[metric] * 1000 for r in engines[n]["records"] if r[metric] is not None] or [0.0] for n in names]
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20, fontsize=8)
        ax.set_title(title)
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(folder / "latency.png", dpi=110)
    plt.close(fig)
    written.append("latency.png")
    return written
