"""quantize stage: fp32 artifact -> fp16 / int8 / int4 variants, one scheme per module, found via the registry.

Entry points: `quantize_variant(fp32, variant, calib, target, cfg, progress=None) -> Artifact` and
`validate_variant(variant, where)` (UserError for an unknown method or option, named by field).
"""

from llmship.quantize import fp16, w4a16, w8a8_dynamic, w8a8_static, w8a16  # noqa: F401 - registers the schemes
from llmship.quantize.registry import SCHEMES, build_scheme, default_parity, reads_calibration, validate_variant
from llmship.quantize.variant import quantize_variant

__all__ = ["SCHEMES", "build_scheme", "default_parity", "quantize_variant", "reads_calibration", "validate_variant"]
