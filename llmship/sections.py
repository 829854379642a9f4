"""The config sections that modules below `llmship.config` declare defaults with: the strict `Section` base and
`ParityConfig`, the tolerances each scheme module sets for its variants, and `AutoConfig`, which the mixed precision
search (llmship.quantize.auto) reads.

They live here, not in llmship.config, because config validates `quantize.scheme` against the scheme registry, which
imports the scheme modules: were those to import llmship.config, the two would import each other. llmship.config
re-exports both, so a config reader still finds every section there. Imports nothing from llmship.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ParityConfig(Section):
    max_logits_diff: float = Field(1e-4, ge=0, description="Largest allowed |ORT - PyTorch| over all compared logits.")
    min_top1_agreement: float = Field(1.0, ge=0, le=1, description="Smallest allowed fraction of positions whose argmax agrees.")
    greedy_tokens: int = Field(32, ge=0, description="Tokens generated greedily by both engines and compared.")
    min_greedy_match: float = Field(
        1.0, ge=0, le=1, description="Smallest allowed fraction of greedy tokens matched before a divergence that is not a tie."
    )
    tie_gap_floor: float = Field(
        1e-4, ge=0, description="Logit gap within which two argmaxes tie: top-1 agreement forgives these; greedy's tolerance starts here."
    )
    tie_gap: float | None = Field(
        None, ge=0, description="Fixed tie tolerance (logits); default: max(tie_gap_floor, 4 x measured logit noise), at most max_logits_diff."
    )
    prompts: Literal["model", "samples"] = Field(
        "model", description="Parity prompts: sampled from the reference model (seeded), or the bundled sample texts."
    )
    decode_steps: int = Field(8, ge=0, description="Decode steps fed with ORT's own cache whose logits are compared.")
    max_nll_increase: float = Field(
        0.05, ge=0, description="Largest allowed relative increase of the variant's NLL on the parity prompts (catches collapse)."
    )
    layer_at_a_time: Literal["auto", "always", "never"] = Field(
        "auto", description="Run the ONNX side one decoder layer at a time, on the reference's tokens (memory: one layer, "
        "not the model); 'auto': for a model over 1 GiB (a variant's auto: the export's setting)."
    )


class AutoConfig(Section):
    """`quantize.auto`: mixed precision searched against quality goals within a size budget (llmship.quantize.auto)."""

    # 1.02: the issue-21 bar for w4a16 at 0.25x fp32; a gate goal `ppl/c4 percent-max-degradation p` is 1 + p/100.
    max_ppl_ratio: float | None = Field(1.02, gt=1, description="Goal: largest perplexity ratio to fp32 on held-out calibration text.")
    min_top1: float | None = Field(None, ge=0, le=1, description="Goal: smallest top-1 agreement with fp32 on held-out calibration text.")
    budget: float = Field(0.25, gt=0, description="Largest model size (graph + weights) as a fraction of the fp32 model's.")
    holdout: float = Field(0.25, gt=0, lt=1, description="Fraction of the calibration samples held out to judge the goals.")
