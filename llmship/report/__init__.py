"""The run report: one folder with `report.html` (self-contained, plots inlined), `report.md` and
`summary.json`, written from the compiled variants' manifests and the eval and bench results.

The report stage reads results, it never recomputes them: everything it shows is in the stage
outputs, so a cached eval or bench gives the same report as a fresh one.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path
from typing import Any

from llmship.config import Config, resolved_tree
from llmship.files import MANIFEST_FILE
from llmship.report.auto_search import auto_search_section
from llmship.report.environment import environment
from llmship.report.render import Document, to_html, to_markdown

# Keys of the manifest's parity figures (llmship.export.parity.check_parity).
PARITY_COLUMNS = ("max_logits_diff", "prefill_top1", "decode_top1", "batch_top1", "greedy_match", "nll_increase")


def write_report(cfg: Config, folders: dict[str, Path], eval_result: dict | None, bench_result: dict | None,
                 report_dir: Path) -> Path:
    """Write the report folder atomically (a sibling temp folder swapped in) and return its path."""
    from llmship.artifact import atomic_folder

    report_dir = Path(report_dir)
    summary = build_summary(cfg, folders, eval_result or {}, bench_result or {})
    with atomic_folder(report_dir) as tmp:
        images = _copy_plots(bench_result or {}, tmp)
        doc = build_document(summary, images, tmp / "plots")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        (tmp / "report.md").write_text(to_markdown(doc, tmp), encoding="utf-8")
        (tmp / "report.html").write_text(to_html(doc), encoding="utf-8")
    return report_dir


def _manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def variant_rows(folders: dict[str, Path]) -> list[dict[str, Any]]:
    """Scheme, options, size and parity of every compiled variant, from its manifest."""
    rows = []
    for name, folder in folders.items():
        manifest = _manifest(folder)
        size, ratio = variant_size(manifest)
        rows.append({
            "variant": name,
            "scheme": manifest.get("scheme", "none"),
            "method": manifest.get("method"),
            "options": manifest.get("options") or {},
            "model_bytes": size,
            "size_ratio": ratio,
            "parity": manifest.get("parity") or {},
            "quantized": (manifest.get("quantization") or {}).get("summary"),
            "auto": (manifest.get("quantization") or {}).get("auto"),
            "folder": str(folder),
        })
    return rows


def variant_size(manifest: dict[str, Any]) -> tuple[int | None, float | None]:
    """(graph + weight bytes, size / fp32) as the variant's manifest records them.

    A variant's manifest carries `size` (its bytes and its fp32 source's, measured at compile time), so the ratio holds
    whether or not fp32 is among the listed variants; the fp32 folder is the reference itself (ratio 1)."""
    size = manifest.get("size") or {}
    model_bytes = size.get("model_bytes", manifest.get("model_bytes"))  # tokenizer files excluded
    if size.get("ratio") is not None:
        return model_bytes, float(size["ratio"])
    if manifest.get("scheme", "none") == "none" and model_bytes:
        return model_bytes, 1.0
    return model_bytes, None


def build_summary(cfg: Config, folders: dict[str, Path], eval_result: dict, bench_result: dict) -> dict[str, Any]:
    """The machine-readable report (summary.json)."""
    return {
        "generated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": cfg.model.path,
        "adapter": cfg.model.adapter,
        "variants": variant_rows(folders),
        "accuracy": eval_result.get("summary", []),
        "baseline": eval_result.get("baseline"),
        "baseline_run": eval_result.get("baseline_run"),
        "gate": eval_result.get("gate", []),
        "bench": {k: v for k, v in bench_result.items() if k not in ("requests", "records")},
        "environment": environment(cfg.runtime.threads),
        "config": resolved_tree(cfg, mode="json"),
    }


def _copy_plots(bench_result: dict, dest: Path) -> list[tuple[Path, str]]:
    images = []
    for plot in bench_result.get("plots", []):
        path = Path(plot["path"] if isinstance(plot, dict) else plot)
        if path.is_file():
            target = dest / "plots" / path.name
            target.parent.mkdir(exist_ok=True)
            shutil.copy2(path, target)
            caption = plot.get("caption", path.stem) if isinstance(plot, dict) else path.stem.replace("_", " ")
            images.append((target, caption))
    return images


def build_document(summary: dict[str, Any], images: list[tuple[Path, str]], plot_dir: Path | None = None) -> Document:
    doc = Document(f"llmship report: {summary['model']}")
    doc.text(f"Generated {summary['generated']}." + (f" LoRA adapter: {summary['adapter']}." if summary["adapter"] else ""))
    _variants_section(doc, summary["variants"])
    if plot_dir is not None:
        auto_search_section(doc, summary["variants"], plot_dir)
    _accuracy_section(doc, summary)
    _speed_section(doc, summary["bench"], images)
    _environment_section(doc, summary["environment"])
    return doc


def _variants_section(doc: Document, variants: list[dict]) -> None:
    doc.heading("Variants")
    rows = []
    for v in variants:
        options = ", ".join(f"{k}={val}" for k, val in v["options"].items()) or "-"
        size_mb = v["model_bytes"] / 1e6 if v["model_bytes"] else None
        rows.append([v["variant"], v["scheme"], v["method"], options, size_mb, v["size_ratio"], v["parity"].get("passed"),
                     *(v["parity"].get(c) for c in PARITY_COLUMNS)])
    doc.table(["variant", "scheme", "method", "options", "model MB", "size / fp32", "parity", *PARITY_COLUMNS], rows,
              "Parity against PyTorch fp32, measured at compile time; sizes count the graph and its weights")
    doc.table(["variant", "what was quantized"], [[v["variant"], v["quantized"]] for v in variants if v["quantized"]])


def _accuracy_section(doc: Document, summary: dict) -> None:
    accuracy = summary["accuracy"]
    if not accuracy:
        return
    doc.heading("Accuracy")
    baseline = summary.get("baseline")
    names = [n for n in accuracy[0].get("values", {})]
    columns = ["dataset", "version", "metric", "mode", "n", *names]
    rows = []
    for row in accuracy:
        values = row.get("values", {})
        base = values.get(baseline) if baseline else None
        cells = []
        for n in names:
            val = values.get(n)
            if base is not None and val is not None and n != baseline and isinstance(val, int | float):
                ci = (row.get("intervals") or {}).get(n)
                ends = f" [{ci['low']:+.2f}, {ci['high']:+.2f}]" if ci else ""
                cells.append(f"{val:.2f} ({val - base:+.2f}{ends})")
            else:
                cells.append(val)
        rows.append([row.get("dataset"), row.get("version"), row.get("metric"), row.get("mode"), row.get("n"), *cells])
    ran = summary.get("baseline_run") or {}
    doc.table(columns, rows, f"In brackets: the difference from the baseline ({baseline}) and, for accuracies, its 95% "
              "interval paired over the same n questions (prompts for consistency)"
              + (f". {ran['summary']}" if ran.get("summary") else ""))
    gate = summary["gate"]
    if gate:
        doc.heading("Gate")
        doc.table(["goal", "variant", "value", "baseline", "diff 95% CI", "n", "judged", "limit", "verdict"],
                  [[g.get("goal") or g.get("metric"), g.get("variant"), g.get("value"), g.get("baseline"), _ci_text(g),
                    g.get("n"), _judged_text(g), g.get("limit"), "PASS" if g.get("passed") else "FAIL"] for g in gate],
                  "judged: what the goal compares with its limit: the measured value (point) or the worse end of the "
                  "95% interval (interval)")


def _ci_text(row: dict) -> str | None:
    return None if row.get("diff_low") is None else f"[{row['diff_low']:+.2f}, {row['diff_high']:+.2f}]"


def _judged_text(row: dict) -> str | None:
    judged = row.get("judged", row.get("value"))
    return None if judged is None else f"{judged:.2f} ({row.get('judge', 'point')})"


def _speed_section(doc: Document, bench: dict, images: list[tuple[Path, str]]) -> None:
    engines = bench.get("engines") or []
    if not engines:
        return
    doc.heading("Speed")
    for warning in bench.get("warnings") or []:
        doc.text(f"Warning: {warning}.")
    rows = []
    for e in engines:
        m = e.get("metrics", {})
        rows.append([e.get("name"), e.get("threads"), m.get("output_throughput"), e.get("ratio_output_throughput"), m.get("request_throughput"),
                     m.get("mean_ttft_ms"), m.get("p90_ttft_ms"), m.get("mean_tpot_ms"), m.get("p90_tpot_ms"),
                     m.get("mean_e2el_ms"), e.get("load_time_s"), e.get("peak_rss_mb"), _percent(e.get("roofline_fraction"))])
    doc.table(["engine", "threads", "output tok/s", "x baseline", "req/s", "TTFT mean ms", "TTFT p90 ms", "TPOT mean ms",
               "TPOT p90 ms", "E2EL mean ms", "load s", "peak RSS MB", "of bandwidth limit"], rows,
              bench.get("caption", ""))
    latency = []
    for e in engines:
        r, roof = e.get("ratios") or {}, e.get("roofline") or {}
        per_token = roof.get("bytes_per_step")
        latency.append([e.get("name"), r.get("ttft_median"), r.get("tpot_median"), r.get("e2el_median"), r.get("peak_rss_bytes"),
                        r.get("size_bytes"), e.get("prefill_tokens_per_s"), e.get("decode_tokens_per_s"),
                        per_token / 1e6 if per_token else None, roof.get("limit_steps_per_s"), _percent(roof.get("fraction_of_limit"))])
    doc.table(["engine", "TTFT median / baseline", "TPOT median / baseline", "E2EL median / baseline", "peak RSS / baseline",
               "size / baseline", "prefill tok/s", "decode tok/s", "MB read per step (weights + KV)", "bandwidth limit steps/s",
               "of bandwidth limit"], latency,
              "Latency and memory ratios to the PyTorch baseline (below 1 is better); roofline: decode steps/s if every "
              "step read its weights and KV cache at the measured bandwidth")
    if (bench.get("repeats") or 1) > 1:
        doc.table(["engine", "figure", "median", "min", "max"],
                  [[e.get("name"), label, figure["median"], figure["min"], figure["max"]]
                   for e in engines for key, label in SPREAD_FIGURES if (figure := (e.get("spread") or {}).get(key))],
                  f"Spread over {bench['repeats']} runs of every engine (ratios paired run by run)")
    for path, caption in images:
        doc.image(path, caption)


SPREAD_FIGURES = (("output_throughput", "output tok/s"), ("ratio_output_throughput", "output tok/s / baseline"),
                  ("tpot_median", "TPOT median ms"), ("ttft_median", "TTFT median ms"))


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{value:.0%}"


def _environment_section(doc: Document, env: dict) -> None:
    doc.heading("Environment")
    libs = env.get("libraries", {})
    facts = [[k, v] for k, v in env.items() if k != "libraries"] + [[k, v] for k, v in libs.items()]
    doc.table(["", "value"], facts)
