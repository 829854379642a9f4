"""w4a16: weight-only int4 (MatMulNBits), methods rtn (blockwise round-to-nearest), hqq (half-quadratic
optimization of scales/zeros, no data), gptq (second-order error compensation fed by the calibration set) and awq
(activation-aware per-channel scales and clip ranges searched on the calibration set, then round-to-nearest)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from llmship.errors import UserError
from llmship.quantize.embedding import quantize_embeddings
from llmship.quantize.gptq import gptq_device
from llmship.quantize.graph import load_model, save_model
from llmship.quantize.registry import QUANTIZED_GREEDY_MATCH, QuantizeJob, Scheme, SchemeOptions, register
from llmship.quantize.weight_only import quantize_matmuls, quantize_weight_only
from llmship.sections import ParityConfig


class W4A16Options(SchemeOptions):
    block_size: int | None = Field(None, description="Weights per scale along K (power of two >= 16); default 128 (GPTQ/AWQ group size).")
    accuracy_level: int = Field(4, ge=0, le=4, description="MatMulNBits compute type: 4 = int8 (fast on CPU), 0 = unset.")
    symmetric: bool = Field(False, description="Symmetric blocks (no zero points); rtn and gptq only.")
    embedding_block: int = Field(32, description="Embedding values per scale (power of two >= 16).")
    quantize_embeddings: bool = Field(True, description="Also store the token embedding table blockwise (GatherBlockQuantized).")
    # 4 by default, as the linears (llama.cpp's Q4 formats do the same); 8 costs +0.5 byte per embedding weight, which
    # on the embedded model (half its weights are the two vocabulary tables) puts the file over 0.2x of fp32.
    embedding_bits: Literal[4, 8] = Field(4, description="Bits of the quantized embedding table.")
    percdamp: float = Field(0.01, gt=0, description="gptq: dampening, fraction of the mean Hessian diagonal (GPTQ default).")
    actorder: bool = Field(False, description="gptq: quantize columns in order of decreasing Hessian diagonal (static groups).")
    # Off by default as GPTQ's own llama.py (`--true-sequential` is a flag); AutoGPTQ turns it on.
    true_sequential: bool = Field(False, description="gptq: quantize q/k/v, o, gate/up, down one after another within a layer.")
    # On by default as llm-awq's run_awq (mse_range=True) and AutoAWQ (apply_clip=True).
    awq_clip: bool = Field(True, description="awq: also search each linear's clip range per block (llm-awq auto_clip).")


# Options that only one method reads: setting one for another method is a mistake worth naming.
METHOD_OPTIONS = {"percdamp": "gptq", "actorder": "gptq", "true_sequential": "gptq", "awq_clip": "awq"}


@register
class W4A16(Scheme):
    name = "w4a16"
    stream_bytes_per_param = 0.75
    Options = W4A16Options
    methods = ("rtn", "hqq", "gptq", "awq")
    needs_calibration = ("gptq", "awq")
    layer_feeds_forward = "quantized"  # GPTQ's reference: each layer calibrates on the quantized layers before it
    # int4 weights move logits visibly; a collapse shows as a large NLL increase.
    parity = ParityConfig(max_logits_diff=8.0, min_top1_agreement=0.75, min_greedy_match=QUANTIZED_GREEDY_MATCH,
                          max_nll_increase=0.08)
    bits = 4
    # 128 for every method: GPTQ's and AWQ's group size for LLaMA, and on CPU what MatMulNBits decodes fastest (a
    # 206.9M model on 2 threads: 217 tokens/s at block 128, 174 at 64, 153 at 32; the kernel does per-block work, so
    # it is not bandwidth-bound at small blocks). On the embedded model the perplexity ratio is 1.0029 (gptq), 1.0134
    # (rtn), 1.0154 (hqq) at 128 against 1.0015 / 1.0038 / 1.0081 at 32 (hqq at 64); `block_size: 32` buys that back.
    default_block = {"rtn": 128, "gptq": 128, "hqq": 128, "awq": 128}

    @property
    def block_size(self) -> int:
        return self.options.block_size or self.default_block[self.method]

    def check(self, where: str) -> None:
        opts: W4A16Options = self.options
        super().check(where)
        if opts.symmetric and self.method == "hqq":
            raise UserError("hqq is asymmetric by construction; remove `symmetric`", where=f"{where}.options.symmetric")
        for name in sorted(opts.model_fields_set):
            owner = METHOD_OPTIONS.get(name)
            if owner and owner != self.method:
                raise UserError(f"`{name}` is an option of method {owner}, not {self.method}; remove it or set "
                                f"method: {owner}", where=f"{where}.options.{name}")

    def columnwise(self) -> bool:
        # HQQ's proximal search stops early on the error of the whole tensor: chunks of it stop elsewhere
        return self.method != "hqq"

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        opts: W4A16Options = self.options
        if self.method in self.needs_calibration and not job.samples:
            raise UserError(f"{self.method} needs a calibration set (calibration.sources is empty)", where="calibration.sources")
        job.progress(f"{self.name}: quantizing weights ({self.method})")
        model, report = quantize_weight_only(
            load_model(job.source), bits=self.bits, block_size=self.block_size, symmetric=opts.symmetric,
            accuracy_level=opts.accuracy_level, method=self.method, exclude=job.exclude,
            embeddings=opts.quantize_embeddings, embedding_bits=opts.embedding_bits, embedding_block=opts.embedding_block,
            samples=job.samples, folder=job.folder,
            gptq={"percdamp": opts.percdamp, "actorder": opts.actorder, "true_sequential": opts.true_sequential},
            awq={"clip": opts.awq_clip}, scratch=job.target, device=gptq_device(job.provider))
        save_model(model, job.target, job.external_data)
        return {**report, "block_size": self.block_size}

    def calibrates_by_layer(self) -> bool:
        return self.method == "gptq" and self.auto is None

    def quantize_layer(self, job) -> tuple[Any, dict[str, Any]]:
        opts: W4A16Options = self.options
        model, rows, kept = quantize_matmuls(
            job.model, bits=self.bits, block_size=self.block_size, symmetric=opts.symmetric,
            accuracy_level=opts.accuracy_level, method="gptq", exclude=job.exclude, feeds=job.feeds, scratch=job.scratch,
            gptq={"percdamp": opts.percdamp, "actorder": opts.actorder, "true_sequential": opts.true_sequential},
            device=job.device)
        # GPTQ feeds the quantized layer's outputs forward, as its reference and the whole-model path do; the
        # embedding table is quantized after the calibration has read it, as quantize_weight_only does.
        job.carry(model)
        tables = quantize_embeddings(model, opts.embedding_bits, opts.embedding_block, job.exclude) if opts.quantize_embeddings else []
        return model, {"quantized": rows, "embeddings": tables, "kept_float": kept}

    def finish_layers(self, reports: list[dict[str, Any]], samples: list[list[int]]) -> dict[str, Any]:
        opts: W4A16Options = self.options
        rows = [r for rep in reports for r in rep["quantized"]]
        tables = [r for rep in reports for r in rep["embeddings"]]
        kept = [r for rep in reports for r in rep["kept_float"]]
        quantized = sum(int(np.prod(r["shape"])) for r in rows)
        embeddings = f"{len(tables)} embedding table(s) -> {opts.embedding_bits} bits" if tables else "embeddings float"
        return {"summary": f"{len(rows)} MatMul -> MatMulNBits({self.bits} bits, gptq, one decoder layer at a time), "
                           f"{len(kept)} kept float, {embeddings}",
                "quantized": rows + tables, "kept_float": kept, "linear_params_quantized": quantized,
                "embeddings_quantized": bool(tables), "block_size": self.block_size,
                "calibration_samples": len([s for s in samples if s])}
