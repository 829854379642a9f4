"""Tie-aware greedy parity (issue 19) on the embedded model: a correct candidate whose greedy run forks at a built-in
near-tie passes with the tie recorded; a candidate with one damaged weight matrix still fails."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from llmship.config import EMBEDDED_MODEL_DIR, Config, ParityConfig
from llmship.export import export_fp32
from llmship.export.parity import check_parity, parity_failures, parity_prompts
from llmship.quantize.fp16 import Fp16
from llmship.quantize.w4a16 import W4A16
from llmship.runtime import OrtEngine
from llmship.runtime.torch_engine import TorchEngine
from llmship.source import load_tokenizer

pytestmark = [pytest.mark.skipif(not (EMBEDDED_MODEL_DIR / "config.json").is_file(), reason="embedded model not built"),
              pytest.mark.slow]

GREEDY = 16
FIRST_TIE = 2  # the reference's first greedy token from here on that is not special gets a near-twin lm_head row
EPS = 1e-6  # relative offset of the twin: a logit gap of ~1e-5, far below fp32's tie floor (1e-4)


def _parity() -> ParityConfig:
    return ParityConfig(greedy_tokens=GREEDY, decode_steps=4)  # fp32 defaults otherwise


def _load():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(EMBEDDED_MODEL_DIR), dtype=torch.float32).eval()


def _export(model, tokenizer_dir, root, name) -> OrtEngine:
    """Save `model` as a HF folder and export it with llmship (its own fp32 parity, vs itself, must pass)."""
    folder = root / name
    model.save_pretrained(str(folder))
    for item in tokenizer_dir.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(item, folder / item.name)
    cfg = Config()
    cfg.model.path = str(folder)
    cfg.export.optimize = False
    cfg.export.parity.greedy_tokens = GREEDY
    artifact = export_fp32(cfg, root / f"{name}-onnx")
    return OrtEngine(artifact.path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ties")
    tokenizer = load_tokenizer(EMBEDDED_MODEL_DIR)
    model = _load()
    probe = TorchEngine(model, tokenizer, dtype="float32")
    prompts, _ = parity_prompts(probe, tokenizer, _parity())
    path = probe.generate(prompts[:1], GREEDY, ignore_eos=True)[0]
    seen = {t for p in prompts for t in p} | set(path)
    twin_of = next(t for t in path[FIRST_TIE:] if t > 2)
    twin = next(t for t in range(model.config.vocab_size - 1, 2, -1) if t not in seen)
    head = model.lm_head.weight
    with torch.no_grad():
        # The reference prefers the original token by EPS of its logit, the candidate the twin by as much: wherever
        # the original is the argmax, the two engines tie up to fp32 noise and pick different tokens.
        candidate_model = _load()
        candidate_model.lm_head.weight[twin] = head[twin_of] * (1 + EPS)
        head[twin] = head[twin_of] * (1 - EPS)
        damaged = _load()
        damaged.lm_head.weight[twin] = head[twin]
        damaged.model.layers[1].mlp.down_proj.weight.mul_(-1.0)  # one weight matrix damaged
    reference = TorchEngine(model, tokenizer, dtype="float32")
    tie_candidate = _export(candidate_model, EMBEDDED_MODEL_DIR, root, "twin")
    faulty = _export(damaged, EMBEDDED_MODEL_DIR, root, "damaged")
    yield {"reference": reference, "tie": tie_candidate, "faulty": faulty, "prompts": prompts, "twin": twin,
           "twin_of": twin_of, "at": path.index(twin_of)}
    tie_candidate.close()
    faulty.close()


def test_near_tie_is_recorded_and_passes(setup):
    parity = _parity()
    figures = check_parity(setup["reference"], setup["tie"], parity, setup["prompts"])
    # The raw common prefix breaks at the tie: the old check refused this correct candidate.
    at = setup["at"]
    assert figures["greedy_matched_tokens"][0] == at
    assert figures["greedy_raw_match"] < 1.0
    # Tie-aware: every prompt matches in full, and the fork is recorded with both tokens and both gaps.
    assert figures["greedy_match"] == 1.0 and parity_failures(figures, parity) == []
    first = figures["greedy_prompts"][0]
    assert first["verdict"] == "match with ties" and first["matched"] == GREEDY and first["raw_common_prefix"] == at
    tie = first["ties"][0]
    assert (tie["position"], tie["reference_token"], tie["candidate_token"]) == (at, setup["twin_of"], setup["twin"])
    assert 0 < tie["reference_gap"] <= figures["tie_tolerance"] and 0 < tie["candidate_gap"] <= figures["tie_tolerance"]
    assert figures["tie_tolerance"] == parity.tie_gap_floor  # fp32: the floor (measured noise is ~1e-6)
    assert figures["logit_noise"] < 1e-5 and figures["max_logits_diff"] <= parity.max_logits_diff


def test_near_tie_beyond_a_fixed_tolerance_fails(setup):
    """The same fork with the tie tolerance fixed below its gap is a divergence: the verdict comes from the gaps."""
    parity = _parity().model_copy(update={"tie_gap": 1e-9})
    figures = check_parity(setup["reference"], setup["tie"], parity, setup["prompts"])
    first = figures["greedy_prompts"][0]
    assert first["verdict"] == "diverged" and first["matched"] == setup["at"]
    assert figures["greedy_match"] <= setup["at"] / GREEDY
    assert any(f"(tie-aware); diverged at token {setup['at']}" in f for f in parity_failures(figures, parity))


@pytest.mark.parametrize("tolerances", ["fp32", "fp16"])
def test_damaged_weight_matrix_still_fails_greedy(setup, tolerances):
    base = _parity() if tolerances == "fp32" else Fp16.parity.model_copy(update={"greedy_tokens": GREEDY,
                                                                                        "decode_steps": 4})
    figures = check_parity(setup["reference"], setup["faulty"], base, setup["prompts"])
    assert figures["tie_tolerance"] < 1.0  # the floor or 4 sigma, capped by the scheme's max_logits_diff
    diverged = [p for p in figures["greedy_prompts"] if p["verdict"] == "diverged"]
    assert diverged, figures["greedy_prompts"]
    gap = diverged[0]["divergence"]["reference_gap"]
    assert gap > figures["tie_tolerance"] and figures["tie_tolerance"] <= base.max_logits_diff
    failures = parity_failures(figures, base)
    assert any("(tie-aware); diverged at token" in f for f in failures), failures
    assert np.isfinite(figures["max_logits_diff"]) and figures["max_logits_diff"] > base.max_logits_diff


def test_damaged_weight_matrix_fails_int4_tolerances(setup):
    """Under w4a16's loose tolerances (its tie tolerance grows with the candidate's noise, up to max_logits_diff) the
    teacher-forced gates still refuse the damaged candidate."""
    base = W4A16.parity.model_copy(update={"greedy_tokens": GREEDY, "decode_steps": 4})
    figures = check_parity(setup["reference"], setup["faulty"], base, setup["prompts"])
    failures = parity_failures(figures, base)
    assert any(f.startswith(("top-1 agreement", "NLL increase")) for f in failures), failures
