"""w8a16: weight-only int8 (MatMulNBits bits=8, blockwise round-to-nearest); activations stay float."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from llmship.quantize.graph import load_model, save_model
from llmship.quantize.registry import QUANTIZED_GREEDY_MATCH, QuantizeJob, Scheme, SchemeOptions, register
from llmship.quantize.weight_only import quantize_weight_only
from llmship.sections import ParityConfig


class W8A16Options(SchemeOptions):
    # 32: on the embedded model block 64 flipped 1.1% of top-1 tokens, block 32 0.6%, at 0.29x of fp32 (one fp32
    # scale + zero point per 32 int8 weights); LLaMA widths (4096, 11008, 5120, 13824) divide by 32, so nothing pads.
    block_size: int = Field(32, description="Weights per scale along K (power of two >= 16).")
    accuracy_level: int = Field(4, ge=0, le=4, description="MatMulNBits compute type: 4 = int8 (level 0 measured several times slower on CPU).")
    symmetric: bool = Field(False, description="Symmetric blocks (no zero points).")
    embedding_block: int = Field(128, description="Embedding values per scale (power of two >= 16).")
    quantize_embeddings: bool = Field(True, description="Also store the token embedding table as int8 (GatherBlockQuantized).")


@register
class W8A16(Scheme):
    name = "w8a16"
    stream_bytes_per_param = 1.3
    Options = W8A16Options
    needs_calibration = False  # round-to-nearest weights, activations stay float
    # Greedy: tie-aware (llmship.export.parity); QUANTIZED_GREEDY_MATCH says why half. The NLL bound catches collapse.
    parity = ParityConfig(max_logits_diff=4.0, min_top1_agreement=0.9, min_greedy_match=QUANTIZED_GREEDY_MATCH,
                          max_nll_increase=0.02)

    def check(self, where: str) -> None:
        super().check(where)

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        opts: W8A16Options = self.options
        job.progress(f"{self.name}: quantizing weights")
        model, report = quantize_weight_only(
            load_model(job.source), bits=8, block_size=opts.block_size, symmetric=opts.symmetric,
            accuracy_level=opts.accuracy_level, method="rtn", exclude=job.exclude,
            embeddings=opts.quantize_embeddings, embedding_bits=8, embedding_block=opts.embedding_block)
        save_model(model, job.target, job.external_data)
        return report
