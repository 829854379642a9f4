"""w8a8-dynamic: int8 weights quantized offline, int8 activations quantized at run time from their own range, so no
calibration set is needed.

Activation granularity (`activations`):
- `per_token` (default): one scale per token row, shared by the linears that read the same tensor (q/k/v, gate/up),
  through MatMulIntegerToFloat (see per_token.py); SmoothQuant, vLLM and TensorRT-LLM call this per-token dynamic W8A8.
- `per_tensor`: ONNX Runtime's `quantize_dynamic` (DynamicQuantizeLinear + MatMulInteger): one range per call.

The layers matched by `fine_layers` get finer activations: the SiLU * up product that feeds down_proj has the widest
per-token ranges, and lm_head decides the top-1 token (llama.cpp's mixes likewise give ffn_down and the output tensor
more precision). `fine_method`:
- `two_level` (default): a second int8 row per token carries the first one's rounding error, and both go through the
  same int8 GEMM (per_token.py), so the weights stay per-channel int8 and are read once per step;
- `blocks`: one scale per `group_size` values (MatMulNBits, 8-bit weights, accuracy_level 4, whose kernel quantizes
  its input block by block): the most accurate, but MatMulNBits is slow at prefill next to MatMulInteger's GEMM.
"""

from __future__ import annotations

from typing import Any, Literal

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from pydantic import Field

from llmship.files import MODEL_DATA_FILE, MODEL_FILE
from llmship.quantize.embedding import quantize_embeddings
from llmship.quantize.graph import (
    describe_node,
    ensure_node_names,
    excluded,
    initializers,
    linear_nodes,
    load_model,
    save_model,
)
from llmship.quantize.ort_quiet import without_preprocess_hint
from llmship.quantize.per_token import rewrite_per_token
from llmship.quantize.registry import QUANTIZED_GREEDY_MATCH, QuantizeJob, Scheme, SchemeOptions, register
from llmship.quantize.weight_only import quantize_matmuls
from llmship.sections import ParityConfig

# On the embedded model (held-out C4, PyTorch fp32 reference: prefill-scored top-1 agreement, perplexity ratio) and on
# the 206.9M benchmark model (2 threads: decode, 256-token prefill tokens/s):
#   per_tensor, no fine layers                    97.85%  1.0010    118  2,957
#   per_token, no fine layers                     98.44%  0.9999    125  2,423
#   per_token, down_proj + lm_head two_level      99.15%  1.0001    119  1,859   (the default)
#   per_token, down_proj + lm_head blocks of 32   99.41%  0.9998    110  1,318
DEFAULT_FINE_LAYERS = ["*down_proj*", "lm_head"]


class W8A8DynamicOptions(SchemeOptions):
    activations: Literal["per_token", "per_tensor"] = Field(
        "per_token", description="Activation scales: one per token row, or ONNX Runtime's one per call.")
    fine_layers: list[str] = Field(default_factory=lambda: list(DEFAULT_FINE_LAYERS),
                                   description="Layers (fnmatch, as quantize.exclude) whose activations are quantized finer.")
    fine_method: Literal["two_level", "blocks"] = Field(
        "two_level", description="fine_layers: a second int8 level per token, or MatMulNBits blocks of group_size.")
    group_size: int = Field(32, description="fine_method blocks: values per scale (power of two >= 16).")
    per_channel: bool = Field(True, description="One weight scale per output channel (else one per tensor).")
    reduce_range: bool = Field(False, description="7-bit weights, for CPUs without VNNI where u8s8 products can saturate.")
    quantize_embeddings: bool = Field(True, description="Also store the token embedding table as int8 (GatherBlockQuantized).")
    embedding_block: int = Field(128, description="Embedding values per scale (power of two >= 16).")


@register
class W8A8Dynamic(Scheme):
    name = "w8a8-dynamic"
    stream_bytes_per_param = 1.2
    Options = W8A8DynamicOptions
    needs_calibration = False  # weights: their own min/max; activations: their own range at run time
    # Run-time activation ranges add noise at every layer: top-1 on a few short prompts moves, the NLL bound is the guard.
    parity = ParityConfig(max_logits_diff=6.0, min_top1_agreement=0.8, min_greedy_match=QUANTIZED_GREEDY_MATCH,
                          max_nll_increase=0.02)

    def columnwise(self) -> bool:
        return self.options.per_channel  # a per-tensor weight scale spans every column

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        opts: W8A8DynamicOptions = self.options
        model = load_model(job.source)
        ensure_node_names(model)
        inits = initializers(model)
        linears = linear_nodes(model)
        todo = [n for n in linears if not excluded(n, job.exclude, inits)]
        fine = {n.name for n in todo if excluded(n, opts.fine_layers, inits)}
        kept = [{"node": n.name, "name": describe_node(n, inits), "reason": "excluded"} for n in linears if n not in todo]
        rows = [{"node": n.name, "name": describe_node(n, inits), "weight": n.input[1], "shape": list(inits[n.input[1]].dims),
                 "op": "MatMul", "as": self._describe(n.name in fine)} for n in todo]
        job.progress(f"{self.name}: quantizing {len(todo)} linear layers")
        two_level = fine if opts.fine_method == "two_level" else set()
        if opts.activations == "per_token":
            rewrite_per_token(model, [n for n in todo if n.name not in fine or n.name in two_level],
                              opts.per_channel, opts.reduce_range, two_level=two_level)
        else:
            rest = [n for n in todo if n.name not in fine]
            # quantize_dynamic reads an empty node list as "every node"
            model = self._ort_dynamic(job, model, rest) if rest else model
            if two_level:
                rewrite_per_token(model, [n for n in model.graph.node if n.name in two_level], opts.per_channel,
                                  opts.reduce_range, two_level=two_level)
        if fine and opts.fine_method == "blocks":
            model, _, block_kept = quantize_matmuls(model, bits=8, block_size=opts.group_size, symmetric=False,
                                                    accuracy_level=4, method="rtn", exclude=job.exclude)
            # the excluded MatMuls are float here too and already listed; only fine layers the blocks could not take
            left_float = [k for k in block_kept if k["node"] in fine]
            kept += left_float
            rows = [r for r in rows if r["node"] not in {k["node"] for k in left_float}]
        emb_rows = quantize_embeddings(model, 8, opts.embedding_block, job.exclude) if opts.quantize_embeddings else []
        save_model(model, job.target, job.external_data)
        fine_rows = sum(r["node"] in fine for r in rows)
        return {
            "summary": f"{len(rows) - fine_rows} MatMul -> int8 dynamic {opts.activations.replace('_', '-')} "
                       f"({'per-channel' if opts.per_channel else 'per-tensor'} weights), {fine_rows} -> "
                       f"{self._describe(True)}, {len(kept)} kept float, {len(emb_rows)} embedding table(s) int8",
            "activations": opts.activations,
            "fine_method": opts.fine_method if fine else None,
            "quantized": rows + emb_rows,
            "kept_float": kept,
            "embeddings_quantized": bool(emb_rows),
        }

    def _describe(self, fine: bool) -> str:
        opts: W8A8DynamicOptions = self.options
        if fine and opts.fine_method == "blocks":
            return f"MatMulNBits(bits=8, block={opts.group_size}, accuracy_level=4): activations per group"
        if fine:
            return "two-level per-token activations + MatMulIntegerToFloat"
        return ("per-token QuantizeLinear + MatMulIntegerToFloat" if opts.activations == "per_token"
                else "DynamicQuantizeLinear + MatMulInteger")

    def _ort_dynamic(self, job: QuantizeJob, model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
        """ONNX Runtime's quantize_dynamic on `nodes`, through a staged float copy (it reads and writes files)."""
        opts: W8A8DynamicOptions = self.options
        staged = job.target / "_float"
        save_model(model, staged, job.external_data)
        big = (staged / MODEL_DATA_FILE).exists()
        with without_preprocess_hint():
            quantize_dynamic(staged / MODEL_FILE, job.target / MODEL_FILE, op_types_to_quantize=["MatMul"],
                             per_channel=opts.per_channel, reduce_range=opts.reduce_range, weight_type=QuantType.QInt8,
                             nodes_to_quantize=[n.name for n in nodes], use_external_data_format=big,
                             extra_options={"MatMulConstBOnly": True})
        quantized = load_model(job.target / MODEL_FILE)
        for path in staged.iterdir():
            path.unlink()
        staged.rmdir()
        return quantized
