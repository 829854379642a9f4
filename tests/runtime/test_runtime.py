"""Both engines on a tiny exported GQA model: padded batches equal unpadded rows, decode with cache equals a
full prefill, generation budgets and EOS, scoring, load_engine dispatch, fp16 graphs, bad folders."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from llmship.artifact import Artifact
from llmship.config import Config, ModelConfig, RuntimeConfig
from llmship.errors import UserError
from llmship.export import export_fp32
from llmship.export.tiny import make_llama
from llmship.runtime import OrtEngine, TorchEngine, left_pad, load_engine, log_softmax

PROMPTS = [[1, 30, 31, 32, 33, 34, 35, 36, 37], [1, 60, 61], [1, 90, 91, 92, 93, 94]]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    model_dir = make_llama(root / "model", num_key_value_heads=2, pad_token="<pad>")
    cfg = Config()
    cfg.model.path = str(model_dir)
    cfg.export.parity.greedy_tokens = 4
    artifact = export_fp32(cfg, root / "fp32")
    return model_dir, artifact


@pytest.fixture(scope="module")
def engines(built):
    model_dir, artifact = built
    return {"torch": load_engine(ModelConfig(path=str(model_dir)), RuntimeConfig(threads=1)),
            "ort": load_engine(artifact.path, RuntimeConfig(threads=1))}


@pytest.mark.parametrize("name", ["torch", "ort"])
def test_left_padded_batch_equals_unpadded_rows(engines, name):
    engine = engines[name]
    ids, mask = left_pad(PROMPTS, engine.pad_token_id)
    assert (mask == 0).any()
    batch_logits, batch_cache = engine.prefill(ids, mask)
    width = ids.shape[1]
    tokens = np.array([5, 6, 7], dtype=np.int64)
    batch_step, batch_cache = engine.decode(tokens, batch_cache)
    for row, prompt in enumerate(PROMPTS):
        single, cache = engine.prefill(*left_pad([prompt], engine.pad_token_id))
        assert np.abs(batch_logits[row, width - len(prompt):] - single[0]).max() < 1e-4
        step, _ = engine.decode(tokens[row:row + 1], cache)
        assert np.abs(batch_step[row] - step[0]).max() < 1e-4


@pytest.mark.parametrize("name", ["torch", "ort"])
def test_decode_with_cache_equals_full_prefill(engines, name):
    engine = engines[name]
    prompt, extra = PROMPTS[0], [11, 12, 13]
    _, cache = engine.prefill(*left_pad([prompt], engine.pad_token_id))
    steps = []
    for token in extra:
        logits, cache = engine.decode(np.array([token]), cache)
        steps.append(logits[0])
    full, _ = engine.prefill(*left_pad([prompt + extra], engine.pad_token_id))
    assert np.abs(np.stack(steps) - full[0, len(prompt):]).max() < 1e-4
    assert cache.attention_mask.shape == (1, len(prompt) + len(extra))


def test_engines_agree_and_report_info(engines, built):
    _, artifact = built
    torch_engine, ort_engine = engines["torch"], engines["ort"]
    assert isinstance(torch_engine, TorchEngine) and isinstance(ort_engine, OrtEngine)
    a = torch_engine.logits(PROMPTS)
    b = ort_engine.logits(PROMPTS)
    assert all(np.abs(x - y).max() < 1e-4 for x, y in zip(a, b, strict=True))
    assert ort_engine.vocab_size == torch_engine.vocab_size == 401
    assert ort_engine.pad_token_id == torch_engine.pad_token_id == 400  # the added <pad> token, via generation_config
    assert ort_engine.eos_token_id == torch_engine.eos_token_id == 2
    info = ort_engine.info()
    assert info["engine"] == "ort" and info["provider"] == "CPUExecutionProvider" and info["threads"] == 1
    assert info["dtype"] == "float32" and info["path"] == str(artifact.path)
    assert torch_engine.info()["dtype"] == "float32" and torch_engine.info()["threads"] == 1
    assert isinstance(load_engine(artifact), OrtEngine)  # an Artifact works as a spec too


def test_generate_budgets_and_eos(engines):
    engine = engines["ort"]
    out = engine.generate(PROMPTS, [3, 5, 0], ignore_eos=True)
    assert [len(o) for o in out] == [3, 5, 0]
    first = out[0][0]
    saved = engine.eos_token_id
    try:
        engine.eos_token_id = first
        stopped = engine.generate(PROMPTS[:1], 5)
    finally:
        engine.eos_token_id = saved
    assert stopped == [[first]]
    again = engines["torch"].generate(PROMPTS, [3, 5, 0], ignore_eos=True)
    assert again == out


def test_score_is_log_softmax_of_next_token(engines):
    engine = engines["ort"]
    scores = engine.score(PROMPTS[:2])
    logits = engine.logits(PROMPTS[:2])
    for seq, score, logit in zip(PROMPTS[:2], scores, logits, strict=True):
        expected = log_softmax(logit[:-1].astype(np.float64))[np.arange(len(seq) - 1), seq[1:]]
        assert score.shape == (len(seq) - 1,) and np.allclose(score, expected)
        assert (score < 0).all()


def test_fp16_graph_runs_with_cast_io(built, tmp_path):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _, artifact = built
    fp16 = tmp_path / "fp16"
    shutil.copytree(artifact.path, fp16)
    model = convert_float_to_float16(onnx.load(str(artifact.onnx_path)), keep_io_types=False)
    onnx.save(model, str(fp16 / "model.onnx"))
    engine = OrtEngine(fp16)
    assert engine.dtype == "float16"
    ids, mask = left_pad(PROMPTS, engine.pad_token_id)
    half, cache = engine.prefill(ids, mask)
    step, _ = engine.decode(np.array([5, 6, 7]), cache)
    full, full_cache = OrtEngine(artifact.path).prefill(ids, mask)
    assert half.dtype == np.float32 and step.dtype == np.float32 and cache.past[0].dtype == np.float16
    rows = mask.astype(bool)
    assert 0 < np.abs(half[rows] - full[rows]).max() < 0.05 * np.abs(full[rows]).max()


def test_cuda_provider_missing_is_a_user_error(built):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA EP present")
    with pytest.raises(UserError, match="CUDAExecutionProvider"):
        load_engine(built[1].path, RuntimeConfig(provider="cuda"))


def test_foreign_onnx_folder_is_rejected(built, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(built[1].onnx_path, foreign / "model.onnx")
    with pytest.raises(UserError, match="not an llmship artifact"):
        Artifact.load(foreign)
    with pytest.raises(UserError, match="no model.onnx"):
        OrtEngine(tmp_path)


def test_parity_catches_a_broken_decode_and_reuses_the_reference(engines, built):
    from llmship.config import ParityConfig
    from llmship.export.parity import check_parity, parity_failures

    reference, good = engines["torch"], engines["ort"]

    class StaleCache(OrtEngine):
        """Decodes against the prefill cache only (a cache that never grows): right prefill, wrong decode."""

        def decode(self, tokens, cache):
            logits, grown = super().decode(tokens, cache)
            return logits, cache if cache.extra.get("frozen") else type(cache)(cache.past, cache.attention_mask, {"frozen": True})

    parity = ParityConfig(greedy_tokens=6, decode_steps=4)
    prompts = PROMPTS
    calls = {"prefill": 0}
    original = reference.prefill

    def counting(*args):
        calls["prefill"] += 1
        return original(*args)

    reference.prefill = counting
    try:
        ok = check_parity(reference, good, parity, prompts)
        first_calls = calls["prefill"]
        bad = check_parity(reference, StaleCache(built[1].path), parity, prompts)
    finally:
        del reference.prefill
    assert first_calls > 0 and calls["prefill"] == first_calls  # the second candidate reused the reference trace
    assert parity_failures(ok, parity) == [] and ok["decode_max_diff"] < 1e-4
    assert bad["prefill_max_diff"] < 1e-4 and bad["batch_max_diff"] < 1e-4 and bad["decode_max_diff"] > 1e-2
    failures = parity_failures(bad, parity)
    assert failures and "decode" in failures[0]


def test_owned_copies_an_output_out_of_the_session_arena():
    """ONNX Runtime's outputs are views of its arena (the layer-wise carry and the segmented parity engine keep them
    past their session with `owned`, or each session's whole arena stays resident)."""
    from onnx import TensorProto, helper

    from llmship.runtime.ort_engine import owned

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    (value,) = session.run(None, {"x": np.array([-1, 2, -3, 4], dtype=np.float32)})
    kept = owned(value)
    assert kept.flags.owndata and kept.base is None
    del session, value
    assert kept.tolist() == [0, 2, 0, 4]
    mine = np.ones(3)
    assert owned(mine) is mine  # an array that owns its data is not copied
