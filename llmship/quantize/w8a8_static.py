"""w8a8-static: QDQ int8 with activation ranges calibrated on the calibration set (minmax, entropy or
percentile), per-channel int8 weights, optional SmoothQuant folded in first. Only the linear layers (MatMuls with
constant weights) get Q/DQ pairs; the attention products over the KV cache stay float."""

from __future__ import annotations

import shutil
from typing import Any, Literal

from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from pydantic import Field

from llmship.errors import UserError
from llmship.files import MODEL_DATA_FILE, MODEL_FILE
from llmship.quantize.embedding import quantize_embeddings
from llmship.quantize.feeds import CALIBRATION_BATCH, FeedReader, calibration_feeds, decoder_inputs, packed_feeds
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
from llmship.quantize.registry import QUANTIZED_GREEDY_MATCH, QuantizeJob, Scheme, SchemeOptions, register
from llmship.quantize.smoothquant import DEFAULT_ALPHA, smooth_model
from llmship.quantize.weight_only import layer_of, quantize_matmuls
from llmship.sections import ParityConfig

# lm_head's block with `head: weight_only`: w8a16's (one fp32 scale + zero point per 32 int8 weights).
HEAD_BLOCK = 32
CALIBRATORS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}


class W8A8StaticOptions(SchemeOptions):
    per_channel: bool = Field(True, description="One weight scale per output channel.")
    activation_type: Literal["int8", "uint8"] = Field("int8", description="Activation type (ORT QDQ default: int8).")
    symmetric_activations: bool = Field(False, description="Zero point 0 for activations.")
    smoothquant: bool = Field(False, description="Fold SmoothQuant scales into the RMSNorm weights and q/k/v, gate/up first.")
    alpha: float | Literal["auto"] = Field(DEFAULT_ALPHA, description="SmoothQuant migration strength in [0, 1] "
                                           "(library default 0.5), or auto: searched per layer group.")
    percentile: float = Field(99.999, gt=0, le=100, description="percentile: the kept percentile of |activation| (ORT default).")
    num_bins: int | None = Field(None, ge=16, description="entropy/percentile: histogram bins (ORT default per method).")
    calib_samples: int | None = Field(None, ge=1, description="Calibration samples used (default: all of the set).")
    quantize_embeddings: bool = Field(True, description="Also store the token embedding table as int8 (GatherBlockQuantized).")
    embedding_block: int = Field(128, description="Embedding values per scale (power of two >= 16).")
    head: Literal["static", "weight_only", "float"] = Field(
        "static", description="lm_head: static QDQ as the other linears, int8 weights only (MatMulNBits, float "
        "activations), or float.")


@register
class W8A8Static(Scheme):
    name = "w8a8-static"
    Options = W8A8StaticOptions
    methods = ("minmax", "entropy", "percentile")
    needs_calibration = True
    # int8 weights, per-channel scales, QDQ activation scales, the int8 embedding table (the streaming disk check)
    stream_bytes_per_param = 1.2
    # Static activation ranges cost more than dynamic ones; the NLL bound is what catches a calibration collapse.
    parity = ParityConfig(max_logits_diff=8.0, min_top1_agreement=0.75, min_greedy_match=QUANTIZED_GREEDY_MATCH,
                          max_nll_increase=0.05)

    def check(self, where: str) -> None:
        super().check(where)
        opts: W8A8StaticOptions = self.options
        if isinstance(opts.alpha, float) and not 0 <= opts.alpha <= 1:
            raise UserError(f"alpha must be in [0, 1] or auto (got {opts.alpha})", where=f"{where}.options.alpha")
        if not opts.smoothquant and "alpha" in opts.model_fields_set:
            raise UserError("alpha is only used with smoothquant: true", where=f"{where}.options.alpha")
        if self.method != "percentile" and "percentile" in opts.model_fields_set:
            raise UserError(f"percentile is only used by method percentile (method is {self.method})",
                            where=f"{where}.options.percentile")

    def calibrates_by_layer(self) -> bool:
        return self.auto is None

    def layer_feeds(self, samples: list[list[int]], spec: Any) -> list[dict[str, Any]]:
        return packed_feeds(samples, spec, limit=self.options.calib_samples, batch=CALIBRATION_BATCH)

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        opts: W8A8StaticOptions = self.options
        if not job.samples:
            raise UserError("w8a8-static needs a calibration set (calibration.sources is empty)", where="calibration.sources")
        model = load_model(job.source)
        ensure_node_names(model)
        spec = decoder_inputs(model, job.folder)
        samples = len(calibration_feeds(job.samples, spec, limit=opts.calib_samples))
        # One shape for every run (the histogram calibrators stack them): the samples packed into equal rows.
        packed = self.layer_feeds(job.samples, spec)
        report: dict[str, Any] = {"calibration_samples": samples, "calibration_rows": len(packed)}
        if opts.smoothquant:
            job.progress(f"{self.name}: SmoothQuant (alpha {opts.alpha}) on {samples} samples")
            report["smoothquant"] = smooth_model(model, packed, opts.alpha, job.target)
        job.progress(f"{self.name}: calibrating the linear layers ({self.method}, {samples} samples)")
        quantized, rows, kept, tables = self._calibrate(model, packed, job.target, job.exclude, job.external_data)
        save_model(quantized, job.target, job.external_data)
        report.update({
            "summary": f"{len(rows)} MatMul -> QDQ int8 ({self.method}{', SmoothQuant' if opts.smoothquant else ''}), "
                       f"{len(kept)} kept float, {len(tables)} embedding table(s) int8",
            "kept_float": kept,
            "quantized": rows + tables,
            "embeddings_quantized": bool(tables),
        })
        return report

    def quantize_layer(self, job) -> tuple[Any, dict[str, Any]]:
        opts: W8A8StaticOptions = self.options
        report: dict[str, Any] = {}
        if opts.smoothquant:
            report["smoothquant"] = smooth_model(job.model, job.feeds, opts.alpha, job.scratch)
        # The float (smoothed) layer's outputs feed the next one: quantize_static calibrates the float model too.
        job.carry(job.model)
        quantized, rows, kept, tables = self._calibrate(job.model, job.feeds, job.scratch / "static", job.exclude, "auto")
        return quantized, {**report, "quantized": rows, "embeddings": tables, "kept_float": kept}

    def finish_layers(self, reports: list[dict[str, Any]], samples: list[list[int]]) -> dict[str, Any]:
        opts: W8A8StaticOptions = self.options
        rows = [r for rep in reports for r in rep["quantized"]]
        tables = [r for rep in reports for r in rep["embeddings"]]
        kept = [r for rep in reports for r in rep["kept_float"]]
        chosen = [s for s in (samples if opts.calib_samples is None else samples[:opts.calib_samples]) if s]
        report: dict[str, Any] = {
            "summary": f"{len(rows)} MatMul -> QDQ int8 ({self.method}{', SmoothQuant' if opts.smoothquant else ''}, "
                       f"one decoder layer at a time), {len(kept)} kept float, {len(tables)} embedding table(s) int8",
            "calibration_samples": len(chosen), "kept_float": kept, "quantized": rows + tables,
            "embeddings_quantized": bool(tables)}
        if opts.smoothquant:
            smoothed = [r for rep in reports for r in rep["smoothquant"].get("smoothed", [])]
            first = reports[0]["smoothquant"]
            report["smoothquant"] = {"groups": len(smoothed), "alpha": opts.alpha, "samples": first.get("samples"),
                                     "smoothed": smoothed}
        return report

    def _calibrate(self, model: Any, packed: list[dict[str, Any]], target: Any, exclude: list[str],
                   external_data: str) -> tuple[Any, list[dict], list[dict], list[dict]]:
        """ONNX Runtime's quantize_static of `model`'s linears on the packed batches, then the head's and the
        embedding table's own rewrites; returns (quantized model, quantized rows, kept-float rows, table rows).
        `model` gives up its weights to the file the quantizer reads (one float copy in memory, not two)."""
        opts: W8A8StaticOptions = self.options
        inits = initializers(model)
        linears = linear_nodes(model)
        head = [n for n in linears if layer_of(n) == "lm_head" and not excluded(n, exclude, inits)]
        todo = [n for n in linears if not excluded(n, exclude, inits) and (opts.head == "static" or n not in head)]
        kept = [{"node": n.name, "name": describe_node(n, inits), "reason": "excluded" if n not in head else "head: float"}
                for n in linears if n not in todo and (n not in head or opts.head == "float")]
        rows = [{"node": n.name, "name": describe_node(n, inits), "weight": n.input[1], "shape": list(inits[n.input[1]].dims),
                 "op": "MatMul", "as": f"QDQ int8 ({self.method})"} for n in todo]
        # a segment of a layer-wise run may hold no linear to calibrate (the embedding's): nothing for the quantizer
        quantized = self._quantize_static(model, packed, target, todo, external_data) if todo else model
        if opts.head == "weight_only" and head:
            # The QDQ linears no longer read a float initializer, so only the head (and excluded ones) are left.
            keep = [n.name for n in linear_nodes(quantized) if n.name not in {h.name for h in head}]
            quantized, head_rows, _ = quantize_matmuls(quantized, bits=8, block_size=HEAD_BLOCK, symmetric=False,
                                                       accuracy_level=4, method="rtn", exclude=exclude + keep)
            rows += [{**r, "as": f"MatMulNBits(bits=8, block={HEAD_BLOCK}) (head: weight_only)"} for r in head_rows]
        tables = quantize_embeddings(quantized, 8, opts.embedding_block, exclude) if opts.quantize_embeddings else []
        return quantized, rows, kept, tables

    def _quantize_static(self, model: Any, packed: list[dict[str, Any]], target: Any, todo: list[Any],
                         external_data: str) -> Any:
        """ONNX Runtime's quantize_static of the `todo` linears through a staged file (which takes `model`'s weights)."""
        opts: W8A8StaticOptions = self.options
        staged = target / "_float"
        save_model(model, staged, external_data)
        del model.graph.initializer[:]  # the staged file holds the weights: the quantizer loads its own copy
        big = (staged / MODEL_DATA_FILE).exists()
        extra: dict[str, Any] = {"MatMulConstBOnly": True, "ActivationSymmetric": opts.symmetric_activations}
        if self.method == "percentile":
            extra["CalibPercentile"] = opts.percentile
        if opts.num_bins is not None:
            extra["CalibNumBins"] = opts.num_bins
        with without_preprocess_hint():
            quantize_static(staged / MODEL_FILE, target / MODEL_FILE, FeedReader(packed), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul"], per_channel=opts.per_channel,
                            activation_type=QuantType.QInt8 if opts.activation_type == "int8" else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_quantize=[n.name for n in todo],
                            use_external_data_format=big, calibrate_method=CALIBRATORS[self.method], extra_options=extra)
        quantized = load_model(target / MODEL_FILE)
        shutil.rmtree(staged)
        for leftover in [*target.glob("augmented_model*"), target / MODEL_FILE, target / MODEL_DATA_FILE]:
            leftover.unlink(missing_ok=True)
        return quantized
