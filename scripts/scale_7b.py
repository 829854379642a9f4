"""Scale benchmark of the streaming compile: a random LLaMA-7B-shaped bf16 checkpoint, compiled variant by variant.

    python scripts/scale_7b.py --scratch /work/scratch-7b [--layers 32] [--vocab 32000 --vocab 49953] \
        [--variants w4a16 w8a8-dynamic w8a16] [--out scale_7b.json]

Per vocabulary: writes a sharded bf16 safetensors checkpoint with an index as Hugging Face does (hidden 4096, 32 heads,
MLP 11008; vocab 49953 gets untied embeddings as Chinese-LLaMA), then for each variant runs one compile in a child
process (`export.streaming`, parity against the layer-at-a-time PyTorch reference, whose side is computed by the first
variant and reused by the others) and samples the peak RSS of the child's whole process tree; then another child
loads the output whole in ONNX Runtime and generates 8 tokens (its peak reported apart: that is deployment's memory). Writes JSON and Markdown (the table of README's "Large models"). Targets: peak RSS
<= 3 GB per compile, wall <= 20 min per variant, parity included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# LLaMA-7B (Touvron et al. 2023, Hugging Face config of huggyllama/llama-7b)
LLAMA_7B = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008,
            "num_hidden_layers": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}
# Hugging Face's default shard size of save_pretrained in transformers 4.x
SHARD_BYTES = 5 * 10**9
VARIANTS = {"w4a16": {"scheme": "w4a16", "method": "rtn", "options": {"block_size": 128}},
            "w8a8-dynamic": {"scheme": "w8a8-dynamic"}, "w8a16": {"scheme": "w8a16"}, "none": {"scheme": "none"},
            # calibrated one decoder layer at a time (llmship.quantize.layerwise)
            "w4a16-gptq": {"scheme": "w4a16", "method": "gptq"},
            "w8a8-static-sq": {"scheme": "w8a8-static", "method": "minmax", "name": "w8a8-static-sq",
                               "options": {"smoothquant": True}},
            "fp16": {"scheme": "fp16"}}  # its overflow scan, one decoder layer at a time
CALIBRATED = ("w4a16-gptq", "w8a8-static-sq", "fp16")
# Calibration of the calibrated variants on this CPU: 16 C4 windows of 256 tokens (GPTQ's 128 x 2048, or 128 x 512,
# is for a GPU); `--calibration 128x512` changes it.
CALIBRATION = "16x256"


def make_checkpoint(folder: Path, layers: int, vocab: int, tied: bool) -> dict:
    """Random bf16 LLaMA checkpoint, sharded like save_pretrained; returns what the report records."""
    import torch
    from safetensors.torch import save_file

    from llmship.config import EMBEDDED_MODEL_DIR
    from llmship.export.checkpoint import expected_shapes

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "bos_token_id": 1,
              "eos_token_id": 2, "hidden_act": "silu", "tie_word_embeddings": tied, "torch_dtype": "bfloat16",
              "rope_theta": 10000.0, **LLAMA_7B, "num_hidden_layers": layers}
    done = folder / "config.json"
    if done.is_file() and json.loads(done.read_text()) == config:
        return {"reused": True}
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    shapes = expected_shapes(config)
    shards: list[dict] = [{}]
    size = 0
    for name, shape in shapes.items():
        value = (torch.randn(shape, generator=generator) * (0.02 if len(shape) == 2 else 1.0)).to(torch.bfloat16)
        if len(shape) == 1:
            value = (1.0 + 0.05 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
        if size + value.nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    count = len(shards)
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{count:05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        for name, value in shard.items():
            weight_map[name] = file
            total += value.nbytes
    del shards
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}, indent=2))
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (EMBEDDED_MODEL_DIR / name).is_file():
            shutil.copy2(EMBEDDED_MODEL_DIR / name, folder / name)
    done.write_text(json.dumps(config))
    return {"reused": False, "write_s": round(time.perf_counter() - started, 1), "bytes": total, "shards": count}


def compile_child(model_dir: str, out: str, variant: str, parity: str, calibration: str) -> None:
    """Child process: one streaming compile (parity against the layer-at-a-time PyTorch reference unless off), then 8
    greedy tokens from ONNX Runtime."""
    from llmship.config import Config
    from llmship.export.streaming import compile_streaming
    from llmship.quantize.registry import resolve_variants

    settings = {"model": {"path": model_dir}, "export": {"streaming": True}, "output": {"dir": out},
                "quantize": VARIANTS[variant]}
    if variant in CALIBRATED:
        samples, seq_len = (int(x) for x in calibration.split("x"))
        settings["calibration"] = {"seq_len": seq_len, "sources": [{"kind": "c4", "path": "@embedded", "samples": samples}]}
    cfg = Config.model_validate(settings)
    if variant != "none":
        # Random weights put every position at a near-tie, so top-1 and greedy agreement are reported, not gated;
        # the logits bound and the NLL bound of the scheme stay gated.
        scheme_parity = resolve_variants(cfg.quantize)[0].scheme.parity
        relaxed = scheme_parity.model_dump() | {"min_top1_agreement": 0.0, "min_greedy_match": 0.0}
        cfg = Config.model_validate({**settings, "quantize": {**VARIANTS[variant], "parity": relaxed}})
    Path(out).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    folders = compile_streaming(cfg, Path(out), force=True, parity=parity == "on")
    compiled = time.perf_counter() - started
    folder = next(iter(folders.values()))
    manifest = json.loads((folder / "manifest.json").read_text())
    figures = manifest["parity"]
    print(json.dumps({"compile_s": round(compiled, 1), "timings": manifest["timings"],
                      "model_bytes": manifest["size"]["model_bytes"],
                      "parity": {k: figures.get(k) for k in ("passed", "max_logits_diff", "top1_agreement",
                                                              "greedy_match", "nll_increase", "skipped")},
                      "chunked": len([v for v in manifest["quantization"].get("chunked", {}).values() if v > 1]),
                      "layerwise": manifest["quantization"].get("layerwise"),
                      "folder": str(folder)}))


def generate_child(folder: str) -> None:
    """Child process: the compiled variant loaded whole in ONNX Runtime, 8 greedy tokens (what deploying it needs)."""
    from llmship.runtime.ort_engine import OrtEngine

    engine = OrtEngine(folder, threads=0)
    tokens = engine.generate([[1, 450, 7483, 310]], 8, ignore_eos=True)
    engine.close()
    print(json.dumps({"tokens": tokens[0]}))


def run_variant(model_dir: Path, out: Path, variant: str, parity: bool, calibration: str) -> dict:
    """One compile in a child process, then 8 tokens from the output in another; each child's whole process tree's
    RSS sampled every 0.5 s (the compile's peak is the compile's alone)."""
    row = {"variant": variant, **run_child(["--child", str(model_dir), str(out), variant, "on" if parity else "off",
                                            calibration])}
    if variant in CALIBRATED:
        row["calibration"] = calibration
    if row["returncode"] == 0:
        generated = run_child(["--generate", row["folder"]])
        row["generate"] = {k: generated.get(k) for k in ("wall_s", "peak_rss_mb", "returncode", "error")}
        row["tokens"] = generated.get("tokens")
    return row


def run_child(arguments: list[str]) -> dict:
    import psutil

    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, *arguments],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    proc = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]))
        time.sleep(0.5)
    stdout, stderr = child.communicate()
    row = {"wall_s": round(time.perf_counter() - started, 1), "peak_rss_mb": round(peak / 2**20),
           "returncode": child.returncode}
    if child.returncode == 0:
        row.update(json.loads(stdout.strip().splitlines()[-1]))
    else:
        row["error"] = stderr.strip().splitlines()[-1] if stderr.strip() else "failed"
    return row


def markdown(report: dict) -> str:
    lines = ["| checkpoint | variant | peak RSS: compile child (skeleton / writing / parity) | build | parity (PyTorch "
             "side, when computed) | wall | "
             "output | parity figures | 8 tokens from ORT (its peak RSS) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        made = row.get("tokens") and len(row["tokens"]) == 8
        ok = f"yes ({row['generate']['peak_rss_mb'] / 1024:.2f} GiB)" if made else f"no ({row.get('error', '')})"
        size = f"{row['model_bytes'] / 1e9:.2f} GB" if row.get("model_bytes") else "-"
        t = row.get("timings", {})
        par = row.get("parity", {})
        reference = f" (reference {t['parity_reference_s'] / 60:.1f})" if t.get("parity_reference_s") else ""
        if par.get("skipped") or not par:
            parity_cells, figures = "-", "off"
        else:
            parity_cells = f"{t.get('parity_peak_rss_mb', 0) / 1024:.2f}"
            figures = (f"{'passed' if par['passed'] else 'FAILED'}: max diff {par['max_logits_diff']:.3g}, top-1 "
                       f"{par['top1_agreement']:.3f}, greedy {par['greedy_match']:.2f}, NLL {par['nll_increase']:+.2%}")
        lines.append(
            f"| {row['checkpoint']} | {row['variant']} | {row.get('peak_rss_mb', 0) / 1024:.2f} GiB "
            f"({t.get('skeleton_peak_rss_mb', 0) / 1024:.2f} / {t.get('peak_rss_mb', 0) / 1024:.2f} / {parity_cells}) | "
            f"{t.get('build_s', 0) / 60:.1f} min | {t.get('parity_s', 0) / 60:.1f} min{reference} | {row.get('wall_s', 0) / 60:.1f} min | "
            f"{size} | {figures} | {ok} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=Path("/work/scratch-7b"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--vocab", type=int, action="append")
    parser.add_argument("--variants", nargs="+", default=["w4a16", "w8a8-dynamic", "w8a16"])
    parser.add_argument("--out", type=Path, default=Path("scale_7b.json"))
    parser.add_argument("--no-parity", action="store_true", help="skip the parity check against PyTorch")
    parser.add_argument("--calibration", default=CALIBRATION, help="samples x tokens of the calibrated variants")
    parser.add_argument("--child", nargs=5)
    parser.add_argument("--generate")
    args = parser.parse_args()
    if args.child:
        compile_child(*args.child)
        return
    if args.generate:
        generate_child(args.generate)
        return
    report = {"layers": args.layers, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": [],
              "checkpoints": {}}
    for vocab in args.vocab or [32000]:
        name = f"llama7b-v{vocab}-l{args.layers}"
        model_dir = args.scratch / name
        report["checkpoints"][name] = make_checkpoint(model_dir, args.layers, vocab, tied=False)
        for variant in args.variants:
            row = {"checkpoint": name, **run_variant(model_dir, args.scratch / f"out-{name}", variant, not args.no_parity,
                                                         args.calibration)}
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            args.out.write_text(json.dumps(report, indent=2))
            args.out.with_suffix(".md").write_text(markdown(report))
            shutil.rmtree(args.scratch / f"out-{name}" / VARIANTS[variant].get("name", _folder(variant)), ignore_errors=True)


def _folder(variant: str) -> str:
    return {"w4a16": "w4a16-rtn", "none": "fp32"}.get(variant, variant)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
