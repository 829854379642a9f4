"""quantize stage: fp32 artifact -> fp16 / int8 / int4 variants, one scheme per module, found via the registry.

Importing the package registers every scheme (the imports below are the registration list); it imports nothing that
imports llmship.config, which validates `quantize.scheme` against `SCHEMES`. The build entry point,
`llmship.quantize.variant.quantize_variant(fp32, variant, calib, target, cfg, progress=None) -> Artifact`, is imported
from its module by the stages that build.
"""

from llmship.quantize import fp16, fp32, w4a16, w8a8_dynamic, w8a8_static, w8a16  # noqa: F401 - registers the schemes
from llmship.quantize.registry import SCHEMES, Variant, build_scheme, resolve_variant, resolve_variants

__all__ = ["SCHEMES", "Variant", "build_scheme", "resolve_variant", "resolve_variants"]
