"""`scheme: none`: the fp32 export itself as a variant (folder `fp32`). Its build is the export (llmship.export), checked
against PyTorch with `export.parity`; no graph rewrite, no calibration, no method or options."""

from __future__ import annotations

from llmship.quantize.registry import EXPORT_FOLDER, Scheme, register


@register
class Fp32(Scheme):
    name = "none"  # the YAML spelling: no quantization
    stream_bytes_per_param = 4.0
    builds_export = True

    @classmethod
    def variant_name(cls, method: str | None) -> str:
        return EXPORT_FOLDER
