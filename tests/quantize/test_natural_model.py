"""The natural-statistics test model (tests/assets/natural-llama, scripts/make_natural_model.py; issue 21): its
shape and uncertainty, and every shipped config compiling it with default parity tolerances from local data, each
variant measured against PyTorch fp32 on text it never saw."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from testkit import NATURAL_MODEL_DIR, ROOT, run_cli

from llmship.config import SAMPLES_DIR

NATURAL = NATURAL_MODEL_DIR
CONFIGS = {"fp16": "hf_llama_fp16.yaml", "int8": "hf_llama_int8.yaml", "w8a8_smoothquant": "hf_llama_w8a8_smoothquant.yaml",
           "int4": "hf_llama_int4.yaml"}
# Bars for the quality check below, from the figures measured when the model was added (README "Natural model"):
# a broken variant (wrong scales, a dropped layer) lands far outside them. Per scheme: (max ppl ratio, min top-1).
QUALITY_BARS = {"fp16": (1.001, 0.995), "w8a16": (1.01, 0.97), "w8a8-dynamic": (1.01, 0.97),
                "w8a8-static": (1.08, 0.85), "w4a16": (1.25, 0.75)}

pytestmark = pytest.mark.skipif(not (NATURAL / "config.json").is_file(), reason="natural test model absent")


def test_model_is_small_llama_with_gqa_and_byte_fallback_and_uncertain():
    config = json.loads((NATURAL / "config.json").read_text())
    figures = json.loads((NATURAL / "training_figures.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert figures["params"] < 2_000_000 and figures["size_bytes"] < 4_000_000
    assert figures["train_seconds"] <= 480
    # Uncertain, as real models are: far from the embedded model's 2.56 on its own text.
    assert figures["heldout_ppl_shared_c4"] > 20 and figures["heldout_ppl_samples_c4"] > 10

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(NATURAL / "tokenizer.model"))
    pieces = sp.encode("量子纠缠", out_type=str)  # rare characters: byte pieces, never <unk>
    assert any(p.startswith("<0x") for p in pieces) and sp.unk_id() not in sp.encode("量子纠缠")


def _compile(config: str, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`llmship compile` of a shipped config on the natural model; calibration reads the bundled samples."""
    sources = yaml.safe_load((ROOT / "configs" / config).read_text())["calibration"]["sources"]
    local = [f"calibration.sources.{i}.{key}" for i in range(len(sources)) for key in ("path=@embedded", "samples=16")]
    return run_cli("compile", f"configs/{config}", f"model.path={NATURAL}", "runtime.provider=cpu",
                   "calibration.seq_len=256", *local, *overrides, f"output.dir={out}", "--quiet", timeout=1500)


def _held_out(tokenizer, count: int = 24, length: int = 128) -> list[list[int]]:
    """The bundled C4 validation split: never in the natural model's training text, never drawn for calibration."""
    from llmship.data.sources import read_c4

    ids = [list(tokenizer(t)["input_ids"])[:length] for t in read_c4(str(SAMPLES_DIR / "c4"), split="validation")]
    return [s for s in ids if len(s) >= 16][:count]


def _quality(reference, candidate, seqs) -> tuple[float, float]:
    """(perplexity ratio candidate / reference over all next-token predictions, top-1 agreement)."""
    nll = {"ref": 0.0, "cand": 0.0}
    agree = total = 0
    for seq, ref, cand in zip(seqs, reference.logits(seqs), candidate.logits(seqs), strict=True):
        targets = np.asarray(seq[1:])
        for name, logits in (("ref", ref), ("cand", cand)):
            z = logits[:-1].astype(np.float64)
            logp = z - z.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            nll[name] -= logp[np.arange(len(targets)), targets].sum()
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        total += len(seq)
    return math.exp((nll["cand"] - nll["ref"]) / sum(len(s) - 1 for s in seqs)), agree / total


# The streaming compile (one tensor, or for calibrated schemes one decoder layer, at a time) of the configs whose
# schemes it builds: the same bars, parity checked on the same model-sampled prompts against the layer-at-a-time
# reference. (It checked on the bundled sample texts once, where this uncertain model's near-ties failed GPTQ.)
STREAMED = ["fp16", "int4", "w8a8_smoothquant"]


@pytest.mark.slow
@pytest.mark.parametrize("name,streaming", [(name, False) for name in CONFIGS] + [(name, True) for name in STREAMED])
def test_shipped_config_compiles_natural_model_with_default_tolerances(name, streaming, tmp_path):
    from llmship.artifact import Artifact
    from llmship.config import ModelConfig
    from llmship.runtime import OrtEngine, load_engine
    from llmship.source import load_tokenizer

    proc = _compile(CONFIGS[name], tmp_path, f"export.streaming={str(streaming).lower()}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference = load_engine(ModelConfig(path=str(NATURAL)))
    seqs = _held_out(load_tokenizer(NATURAL))
    variants = [d for d in tmp_path.iterdir() if (d / "manifest.json").is_file() and d.name != "fp32"]
    assert variants
    for folder in variants:
        manifest = Artifact.load(folder).manifest
        assert ("streaming" in manifest) == streaming
        parity = manifest["parity"]
        assert parity["passed"] and parity["tolerances"]["max_logits_diff"] > 0
        assert parity["prompt_source"]["source"] == "model" and parity["prompt_source"]["why"]
        assert {p["verdict"] for p in parity["greedy_prompts"]} <= {"match", "match with ties"}
        candidate = OrtEngine(folder)
        ratio, top1 = _quality(reference, candidate, seqs)
        candidate.close()
        max_ratio, min_top1 = QUALITY_BARS[manifest["scheme"]]
        assert ratio <= max_ratio and top1 >= min_top1, (folder.name, ratio, top1)
