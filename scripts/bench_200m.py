"""Benchmark llmship on a ~200M-parameter LLaMA-shaped model (a benchmark, not a test).

Builds the model from a config in a scratch folder (random weights: speed does not depend on them), compiles the
fp32 export plus w8a8-dynamic and w4a16 (rtn, MatMulNBits) variants with llmship's own compile stage, then runs
`llmship.bench.run_bench` at each batch size (default 1 and 4) with 2 threads, and prints each bench.md.

    python scripts/bench_200m.py [--dir /tmp/llmship-200m] [--threads 2] [--batch-sizes 1 4] [--genai] [--builder]
                                 [--attention gqa|mha] [--prefill-tokens 256] [--block-size 128]

It also times one 256-token prefill at batch 1 for PyTorch and every variant (issue 8's prefill bar).

--genai also drives the compiled variants through onnxruntime-genai; --builder also builds onnxruntime-genai's own
int4 model (its model builder) from the same checkpoint and runs it in onnxruntime-genai, side by side.

The tokenizer is the LLaMA 32k SentencePiece model in ../shared/data when present (vocab 32000, the shape the issue's
figures were measured on); otherwise a small SentencePiece vocabulary is trained and the layer count grows to keep
about 200M parameters. Parity tolerances of the variants are relaxed: random weights give near-uniform logits, whose
argmax flips under any quantization; accuracy is the eval stage's job, this script measures speed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizers" / "llama-32k" / "tokenizer.model"
SHAREGPT_SAMPLE = ROOT.parent / "shared" / "data" / "sharegpt" / "ShareGPT_V3_unfiltered_cleaned_split.sample300.json"
TARGET_PARAMS = 205e6  # the model size issue #6/#8's figures were measured on
HIDDEN, INTERMEDIATE, HEADS = 1024, 2816, 16


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build_model(folder: Path, max_positions: int, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE, heads: int = HEADS,
                target_params: float = TARGET_PARAMS) -> Path:
    """A LlamaForCausalLM of ~200M parameters with HF's initialization, saved with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmship.export.tiny import make_tokenizer
    from llmship.source import load_tokenizer

    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if LLAMA_TOKENIZER.is_file():
        shutil.copy2(LLAMA_TOKENIZER, tmp / "tokenizer.model")
    else:
        make_tokenizer(tmp, 400)
    tokenizer = load_tokenizer(tmp)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "tokenizer.json").unlink(missing_ok=True)
    vocab = len(tokenizer)
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    layers = max(1, round((target_params - 2 * vocab * hidden) / per_layer))
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # std 0.02 (HF init) gives flat logits; a wider spread gives decisive argmaxes for parity
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 1.5 / hidden**0.5)
    model.save_pretrained(str(tmp))
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {layers} layers, vocab {vocab}")
    tmp.rename(folder)
    return folder


def make_config(model: Path, out: Path, args: argparse.Namespace):
    from llmship.config import CalibSource, Config, ParityConfig, VariantConfig

    speed_only = ParityConfig(max_logits_diff=1e9, min_top1_agreement=0.0, min_greedy_match=0.0, max_nll_increase=1e9,
                              greedy_tokens=4, decode_steps=2)
    cfg = Config()
    cfg.model.path = str(model)
    cfg.export.parity.min_greedy_match = 0.9  # random weights: near-ties may flip between PyTorch and ORT fp32 sums
    cfg.export.parity.min_top1_agreement = 0.99
    cfg.export.parity.greedy_tokens = 8  # PyTorch fp32 on 2 threads makes ~20 tokens/s: keep the checks short
    cfg.export.parity.decode_steps = 4
    cfg.quantize.variants = [
        VariantConfig(scheme="w8a8-dynamic", parity=speed_only),
        VariantConfig(scheme="w4a16", method="rtn", options={"block_size": args.block_size, "accuracy_level": 4},
                      parity=speed_only),
    ]
    cfg.calibration.sources = [CalibSource(kind="c4", samples=4)]  # rtn and dynamic int8 use no calibration data
    cfg.calibration.seq_len = 64
    cfg.runtime.threads = args.threads
    cfg.bench.dataset = str(SHAREGPT_SAMPLE) if SHAREGPT_SAMPLE.is_file() else "@embedded"
    cfg.bench.num_prompts = args.num_prompts
    cfg.bench.output_len = args.output_len
    cfg.bench.max_prompt_len = args.max_prompt_len
    cfg.output.dir = str(out)
    return cfg


def build_with_genai_builder(model: Path, target: Path, threads: int, block_size: int) -> Path | None:
    """onnxruntime-genai's model builder, int4 CPU graph (accuracy level 4, as the issue's comparison) with the int4 block
    size llmship's w4a16 uses, so both read the same bytes per token; None on failure."""
    if (target / "genai_config.json").is_file():
        return target
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(target), "-p", "int4",
           "-e", "cpu", "-c", str(target.parent / "builder-cache"), "--extra_options", "int4_accuracy_level=4",
           f"block_size={block_size}"]
    log("building the onnxruntime-genai int4 model: " + " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (target / "genai_config.json").is_file():
        log(f"model builder failed ({done.returncode}): {(done.stderr or done.stdout)[-1500:]}")
        return None
    return target


def prefill_speed(cfg, folders: dict[str, Path], tokens: int, repeats: int) -> dict[str, float]:
    """Prompt tokens/s of one `tokens`-long prefill at batch 1 (median of `repeats` after a warm-up), PyTorch first."""
    import numpy as np

    from llmship.runtime import load_engine

    prompt = np.random.default_rng(0).integers(3, 30000, size=(1, tokens)).astype(np.int64)
    mask = np.ones_like(prompt)
    speeds = {}
    for name, spec in {"pytorch": cfg.model, **folders}.items():
        engine = load_engine(spec, cfg.runtime)
        prompt = np.minimum(prompt, engine.vocab_size - 1)
        engine.prefill(prompt, mask)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            engine.prefill(prompt, mask)
            times.append(time.perf_counter() - start)
        engine.close()
        speeds[name] = tokens / float(np.median(times))
        log(f"prefill {tokens}: {name} {speeds[name]:.0f} tokens/s")
    return speeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llmship-200m"), help="scratch folder (model, variants, results)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--output-len", type=int, default=64, help="fixed output length (keeps the PyTorch baseline's run short)")
    parser.add_argument("--max-prompt-len", type=int, default=256, help="bounds the prefill cost of the PyTorch baseline")
    parser.add_argument("--max-positions", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="model shape (defaults: the issue's ~205M model)")
    parser.add_argument("--intermediate", type=int, default=INTERMEDIATE)
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--params", type=float, default=TARGET_PARAMS, help="parameter count the layer count aims at")
    parser.add_argument("--genai", action="store_true", help="also run the llmship variants in onnxruntime-genai")
    parser.add_argument("--builder", action="store_true", help="also build and run onnxruntime-genai's own int4 model")
    parser.add_argument("--attention", choices=("mha", "gqa"), default="gqa", help="export.attention of llmship's graphs")
    parser.add_argument("--block-size", type=int, default=128,
                        help="int4 block size of llmship's w4a16 and of the builder's graph (the builder's default is 32)")
    parser.add_argument("--prefill-tokens", type=int, default=256, help="prompt length of the prefill measurement")
    args = parser.parse_args()

    from llmship.bench import run_bench
    from llmship.pipeline import compile_variants, folders_of
    from llmship.quantize import resolve_variants

    args.dir.mkdir(parents=True, exist_ok=True)
    model = build_model(args.dir / "model", args.max_positions, args.hidden, args.intermediate, args.heads, args.params)
    out = args.dir / "out"
    cfg = make_config(model, out, args)
    cfg.export.attention = args.attention
    started = time.perf_counter()
    folders = folders_of(compile_variants(cfg, out, resolve_variants(cfg.quantize), lambda line: log(line)))
    log(f"compiled {', '.join(folders)} in {time.perf_counter() - started:.0f}s")
    builder = (build_with_genai_builder(model, args.dir / f"genai-builder-int4-b{args.block_size}", args.threads,
                                        args.block_size) if args.builder else None)

    summary = {"prefill_tokens_per_s": prefill_speed(cfg, folders, args.prefill_tokens, repeats=5)}
    for batch in args.batch_sizes:
        cfg.bench.batch_size = batch
        cfg.runtime.engine = "ort"
        cfg.bench.baseline = True
        result = run_bench(cfg, folders, out / f"bench-b{batch}", progress=lambda line: log(line))
        print((out / f"bench-b{batch}" / "bench.md").read_text(encoding="utf-8"))
        summary[f"ort-b{batch}"] = {e["name"]: {"output": e["metrics"]["output_throughput"], "decode": e["decode_tokens_per_s"],
                                              "of_limit": e["roofline_fraction"]} for e in result["engines"]}
        genai_folders = dict(folders) if args.genai else {}
        if builder is not None:
            genai_folders["genai-builder-int4"] = builder
        if genai_folders:
            cfg.runtime.engine = "genai"
            cfg.bench.baseline = False
            result = run_bench(cfg, genai_folders, out / f"bench-genai-b{batch}", progress=lambda line: log(line))
            print((out / f"bench-genai-b{batch}" / "bench.md").read_text(encoding="utf-8"))
            summary[f"genai-b{batch}"] = {e["name"]: {"output": e["metrics"]["output_throughput"], "decode": e["decode_tokens_per_s"],
                                                    "of_limit": e["roofline_fraction"]} for e in result["engines"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print("tokens/s (output = all generated tokens / run time; decode = tokens after the first / their time): "
          + json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
