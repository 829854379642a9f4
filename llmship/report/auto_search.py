"""Report section of `quantize.auto` (llmship.quantize.auto): per searched variant, the sensitivity ranking, the steps
(size and held-out figures after each promotion) and a size-vs-perplexity-ratio plot with the Pareto front, all read
from the variant manifest's `quantization.auto`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmship.report.render import Document

# Rows of the sensitivity table: the layers a reader acts on; the manifest keeps them all.
TOP_LAYERS = 10


def auto_search_section(doc: Document, variants: list[dict[str, Any]], plot_dir: Path) -> None:
    searched = [v for v in variants if v.get("auto")]
    if not searched:
        return
    doc.heading("Mixed precision search (quantize.auto)")
    for variant in searched:
        search = variant["auto"]
        goals = ", ".join(f"{k} {v:g}" for k, v in search["goals"].items() if v is not None) or "none"
        doc.text(f"{variant['variant']}: goals {goals} within {search['budget']:g}x fp32, measured on "
                 f"{search['measured_on']}. Sensitivity: {search['sensitivity']}. Chosen: step {search['chosen_step']} "
                 f"({_chosen_text(search['chosen'])}); goals {'met' if search['passed'] else 'missed'}.")
        pareto = set(search["pareto"])
        doc.table(["step", "promoted layer", "to", "size / fp32", "ppl ratio", "top-1", "KL", "goals", "Pareto"],
                  [[s["step"], s["layer"] or "(all int4)", s["to"], f"{s['size_ratio']:.4f}", f"{s['ppl_ratio']:.4f}", f"{s['top1']:.4f}", s["kl"],
                    "PASS" if s["passed"] else "FAIL", s["step"] in pareto] for s in search["steps"]],
                  "Each step keeps one more layer at the next precision up, most sensitive first; a step over the "
                  "budget is skipped")
        doc.table(["layer", "KL (alone int4)", "int4 KB", "int8 KB", "float KB"],
                  [[r["layer"], r["kl"], r["int4_bytes"] / 1e3, r["int8_bytes"] / 1e3, r["float_bytes"] / 1e3]
                   for r in search["sensitivity_ranking"][:TOP_LAYERS]],
                  f"The {TOP_LAYERS} most sensitive linear layers")
        path = plot_search(search, plot_dir / f"auto_{_safe(variant['variant'])}.png")
        doc.image(path, f"{variant['variant']}: size vs perplexity ratio of every step (Pareto front joined)")


def _chosen_text(chosen: dict[str, str]) -> str:
    return ", ".join(f"{layer} {precision}" for layer, precision in chosen.items()) or "all int4"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def plot_search(search: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = search["steps"]
    front = sorted((s for s in steps if s["step"] in set(search["pareto"])), key=lambda s: s["size_ratio"])
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.scatter([s["size_ratio"] for s in steps], [s["ppl_ratio"] for s in steps], s=18, color="#8c959f", label="steps")
    ax.plot([s["size_ratio"] for s in front], [s["ppl_ratio"] for s in front], "o-", color="#0969da", label="Pareto front")
    chosen = next(s for s in steps if s["step"] == search["chosen_step"])
    ax.scatter([chosen["size_ratio"]], [chosen["ppl_ratio"]], s=80, facecolors="none", edgecolors="#cf222e", label="chosen")
    ax.axvline(search["budget"], color="#cf222e", linestyle=":", label="budget")
    if search["goals"].get("max_ppl_ratio") is not None:
        ax.axhline(search["goals"]["max_ppl_ratio"], color="#1a7f37", linestyle="--", label="goal")
    ax.set_xlabel("size / fp32")
    ax.set_ylabel("perplexity ratio to fp32 (held out)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
