"""onnxruntime-genai as a full engine: its teacher-forced logits, decode steps, perplexity and C-Eval predictions match
ONNX Runtime's on the same compiled folder, and what it cannot do is a UserError, not a wrong number."""

from __future__ import annotations

import numpy as np
import pytest

from llmship.config import EMBEDDED_MODEL_DIR, CevalTask, Config, RuntimeConfig
from llmship.errors import UserError
from llmship.runtime import GenaiEngine, OrtEngine, left_pad, load_engine

pytest.importorskip("onnxruntime_genai")
pytestmark = [pytest.mark.skipif(not (EMBEDDED_MODEL_DIR / "config.json").is_file(), reason="embedded model not built"),
              pytest.mark.slow]  # every test needs the embedded export (module fixture, ~1 min) or its own

GENAI = RuntimeConfig(engine="genai", threads=1)
SEQUENCES = [[1, 40, 41, 42, 43, 50, 60, 70, 80], [1, 77, 78], [1, 90, 2, 91, 92], [1, 30, 31]]  # id 2: pad = EOS


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from llmship.export import export_fp32

    cfg = Config()
    cfg.export.parity.greedy_tokens = 4
    return export_fp32(cfg, tmp_path_factory.mktemp("genai") / "fp32").path


@pytest.fixture(scope="module")
def engines(folder):
    ort, genai = load_engine(folder, RuntimeConfig(threads=1)), load_engine(folder, GENAI)
    assert isinstance(ort, OrtEngine) and isinstance(genai, GenaiEngine)
    yield ort, genai
    genai.close()


def test_teacher_forced_logits_match_ort_on_a_padded_batch(engines):
    ort, genai = engines
    ids, mask = left_pad(SEQUENCES, genai.pad_token_id)
    ours, cache = genai.prefill(ids, mask)
    theirs, ort_cache = ort.prefill(ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - theirs[real]).max() <= 1e-4
    assert (ours[~real] == 0).all()  # pads stay empty, as in OrtEngine's right-padded graphs
    # decode steps on the grown cache: each group of rows (same length) went to its own Generator
    tokens = theirs[:, -1].argmax(-1)
    for _ in range(3):
        ours_step, cache = genai.decode(tokens, cache)
        theirs_step, ort_cache = ort.decode(tokens, ort_cache)
        assert np.abs(ours_step - theirs_step).max() <= 1e-4
        tokens = theirs_step.argmax(-1)
    for a, b in zip(genai.score(SEQUENCES, batch_size=3), ort.score(SEQUENCES, batch_size=3), strict=True):
        assert a.shape == (len(a),) and np.abs(a - b).max() <= 1e-4


def test_perplexity_and_ceval_predictions_match_ort(engines):
    from llmship.data.sources import read_ceval
    from llmship.eval import ceval, perplexity
    from llmship.source import load_tokenizer

    ort, genai = engines
    tokenizer = load_tokenizer(EMBEDDED_MODEL_DIR)
    windows = perplexity.c4_windows(perplexity.eval_texts("@embedded"), tokenizer, 64, 3)
    ppl = {name: perplexity.c4_perplexity(engine, windows, 2)["ppl"] for name, engine in (("ort", ort), ("genai", genai))}
    assert ppl["genai"] == pytest.approx(ppl["ort"], rel=1e-5) and ppl["ort"] > 1.0
    task = CevalTask(max_questions=2, subjects=["high_school_geography", "civil_servant"], max_out_len=4)
    cset = ceval.prepare(task, read_ceval("@embedded"), tokenizer, ort.max_positions)
    assert len(cset.questions) == 4
    scored = {name: ceval.score_engine(engine, cset, tokenizer, 3) for name, engine in (("ort", ort), ("genai", genai))}
    for mode in ("ppl", "gen"):
        assert [r["pred"] for r in scored["genai"]["predictions"][mode]] == [r["pred"] for r in scored["ort"]["predictions"][mode]]
    for a, b in zip(scored["genai"]["predictions"]["ppl"], scored["ort"]["predictions"]["ppl"], strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    assert [r["output"] for r in scored["genai"]["predictions"]["gen"]] == [r["output"] for r in scored["ort"]["predictions"]["gen"]]


def test_generation_stops_each_row_at_eos_as_ort_does(engines):
    ort, genai = engines
    prompts = [[1, 40, 41, 42, 43, 50, 60], [1, 77, 78]]
    first = ort.generate(prompts, 1)
    ort.eos_token_id, eos_ids = first[1][0], genai.eos_ids
    genai.eos_ids = {first[1][0]}
    try:
        got = genai.generate(prompts, 6)
        assert got == ort.generate(prompts, 6) and got[1] == first[1]  # row 1 stops at its first token
    finally:
        ort.eos_token_id, genai.eos_ids = genai.eos_token_id, eos_ids


def test_what_genai_cannot_do_is_a_user_error(engines):
    ort, genai = engines
    limit = genai.position_limit
    assert limit == genai.max_positions == ort.max_positions
    with pytest.raises(UserError, match="context_length"):
        genai.prefill(*left_pad([[1] * (limit + 1)], genai.pad_token_id))
    with pytest.raises(UserError, match="context_length"):
        genai.generate([[1, 40, 41]], limit)
    with pytest.raises(UserError, match="pad id"):  # genai would mask the real token 2 of the shorter row
        genai.generate([[1, 40, 41, 42], [1, 2, 50]], 2)
    assert genai.generate([[1, 2, 50]], 2) == ort.generate([[1, 2, 50]], 2)  # alone, nothing is masked


def test_in_place_cache_graph(tmp_path):
    """A GroupQueryAttention graph runs with onnxruntime-genai's max-length cache buffers: a prefill sizes them for the
    prompt, so decoding past it is a UserError; prefill_for_generation sizes them for the tokens to come."""
    from llmship.export import export_fp32
    from llmship.export.tiny import make_llama

    cfg = Config()
    cfg.model.path = str(make_llama(tmp_path / "model", num_key_value_heads=2))
    cfg.export.attention = "gqa"
    cfg.export.parity.greedy_tokens = 4
    folder = export_fp32(cfg, tmp_path / "gqa").path
    ort, genai = load_engine(folder, RuntimeConfig(threads=1)), load_engine(folder, GENAI)
    try:
        assert genai.shared_cache and ort.padding == "right"
        prompts = [[1, 30, 31, 32, 33, 34], [1, 60, 61]]
        ids, mask = left_pad(prompts, genai.pad_token_id)
        ours, cache = genai.prefill(ids, mask)
        theirs, _ = ort.prefill(ids, mask)
        assert np.abs(ours[mask > 0] - theirs[mask > 0]).max() <= 1e-4
        with pytest.raises(UserError, match="sized at prefill"):
            genai.decode(theirs[:, -1].argmax(-1), cache)
        _, cache = genai.prefill_for_generation(ids, mask, 2)
        step, _ = genai.decode(theirs[:, -1].argmax(-1), cache)
        assert step.shape == (2, genai.vocab_size)
        assert genai.generate(prompts, [5, 3], ignore_eos=True) == ort.generate(prompts, [5, 3], ignore_eos=True)
    finally:
        genai.close()
