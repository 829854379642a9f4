"""Calibration set: GPTQ's C4 windows, determinism, the mixture's fingerprint and its errors."""

from __future__ import annotations

import gzip
import json
import random

import pytest
from testkit import SHARED_DATA

from llmship.config import SAMPLES_DIR, CalibrationConfig
from llmship.data.mixture import build_calibration_set, c4_windows, shuffled_texts, token_hash
from llmship.errors import UserError

SHARED = SHARED_DATA
TOKENIZER_DIR = SHARED / "tokenizers" / "llama-32k"
C4_FILE = SHARED / "c4" / "c4-sample.300docs.json.gz"
needs_shared = pytest.mark.skipif(not (TOKENIZER_DIR / "tokenizer.model").is_file() or not C4_FILE.is_file(),
                                  reason="../shared/data not present")


class WordTokenizer:
    """Whitespace tokenizer with a BOS, for the logic that does not depend on SentencePiece."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [1] + [self.vocab.setdefault(w, len(self.vocab) + 3) for w in text.split()]}


@pytest.fixture(scope="module")
def llama_tokenizer():
    from llmship.source import load_tokenizer

    return load_tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def embedded_tokenizer():
    from llmship.config import EMBEDDED_MODEL_DIR
    from llmship.source import load_tokenizer

    return load_tokenizer(EMBEDDED_MODEL_DIR)


def gptq_get_c4(texts: list[str], tokenizer, nsamples: int, seed: int, seqlen: int) -> list[list[int]]:
    """IST-DASLab/gptq datautils.get_c4's sampling loop, transcribed (module-level `random`, inclusive randint)."""
    random.seed(seed)
    loader = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(texts) - 1)
            ids = tokenizer(texts[i])["input_ids"]
            if len(ids) > seqlen:  # GPTQ: >= and then randint raises when equal; llmship draws again
                break
        i = random.randint(0, len(ids) - seqlen - 1)
        loader.append(ids[i:i + seqlen])
    return loader


@needs_shared
def test_c4_windows_are_gptqs_on_real_c4(llama_tokenizer):
    with gzip.open(C4_FILE, "rt", encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh]
    ours = c4_windows(texts, llama_tokenizer, 12, 256, seed=0, where="test")
    assert ours == gptq_get_c4(texts, llama_tokenizer, 12, 0, 256)
    assert all(len(w) == 256 for w in ours)
    assert c4_windows(texts, llama_tokenizer, 12, 256, seed=1, where="test") != ours


def test_c4_windows_need_a_long_enough_document():
    tok = WordTokenizer()
    texts = ["a b c", "d e f g"]
    with pytest.raises(UserError, match="longer than seq_len=8"):
        c4_windows(texts, tok, 2, 8, seed=0, where="calibration.sources.0")
    windows = c4_windows(texts + [" ".join(f"w{i}" for i in range(40))], tok, 5, 8, seed=0, where="x")
    assert len(windows) == 5 and all(len(w) == 8 for w in windows)


def test_shuffled_texts_are_seeded_and_cut_to_seq_len():
    tok = WordTokenizer()
    texts = [f"text {i} " + "x " * i for i in range(30)]
    a = shuffled_texts(texts, tok, 10, 6, seed=0)
    assert a == shuffled_texts(texts, tok, 10, 6, seed=0)
    assert a != shuffled_texts(texts, tok, 10, 6, seed=1)
    assert all(len(s) <= 6 for s in a) and len(a) == 10


def test_token_hash_changes_with_any_token():
    assert token_hash([[1, 2, 3]]) != token_hash([[1, 2, 4]]) != token_hash([[1, 2], [3]])


def test_seq_len_above_max_positions_is_a_user_error():
    with pytest.raises(UserError) as err:
        build_calibration_set(CalibrationConfig(seq_len=512), WordTokenizer(), max_positions=256)
    assert err.value.where == "calibration.seq_len"


needs_samples = pytest.mark.skipif(not SAMPLES_DIR.is_dir(), reason="bundled samples not built")


@needs_samples
def test_embedded_mixture_is_deterministic_with_fingerprint(embedded_tokenizer):
    llama_tokenizer = embedded_tokenizer
    cfg = CalibrationConfig(seq_len=64, sources=[{"kind": "c4", "samples": 8}, {"kind": "ceval", "samples": 4},
                                                 {"kind": "alpaca", "samples": 4}])
    first = build_calibration_set(cfg, llama_tokenizer, 2048)
    again = build_calibration_set(cfg, llama_tokenizer, 2048)
    assert first.samples == again.samples and first.fingerprint == again.fingerprint
    assert len(first.samples) == 16 and all(2 <= len(s) <= 64 for s in first.samples)
    assert [s["taken"] for s in first.fingerprint["sources"]] == [8, 4, 4]
    other = build_calibration_set(cfg.model_copy(update={"seed": 1}), llama_tokenizer, 2048)
    assert other.fingerprint["sha256"] != first.fingerprint["sha256"]


@needs_samples
def test_too_few_samples_fails_unless_partial_is_allowed(embedded_tokenizer, caplog):
    llama_tokenizer = embedded_tokenizer
    cfg = CalibrationConfig(seq_len=64, sources=[{"kind": "ceval", "samples": 100000}])
    with pytest.raises(UserError, match="fewer calibration samples than asked"):
        build_calibration_set(cfg, llama_tokenizer, 2048)
    partial = build_calibration_set(cfg.model_copy(update={"allow_partial": True}), llama_tokenizer, 2048)
    assert 0 < len(partial.samples) < 100000
    assert "fewer calibration samples than asked" in caplog.text


@needs_samples
def test_ceval_and_alpaca_samples_are_rendered_with_their_templates():
    from llmship.data.mixture import alpaca_texts, ceval_texts
    from llmship.data.sources import read_ceval

    texts = ceval_texts("@embedded")
    data = read_ceval("@embedded")
    first_subject = data.subjects[sorted(data.subjects)[0]]
    row = first_subject.dev[0]
    assert texts[0].startswith(f"以下是中国关于{first_subject.name_zh}考试的单项选择题，请选出其中的正确答案。\n{row['question']}\nA. ")
    assert texts[0].endswith(f"\n答案: \n{row['answer']}")  # OpenCompass example: H(dev) + "\n" + answer
    assert len(texts) == sum(len(s.dev) for s in data.subjects.values())
    alpaca = alpaca_texts("@embedded")
    assert all(t.startswith("Below is an instruction that describes a task") for t in alpaca)
    assert any("### Input:" in t for t in alpaca) and any("### Input:" not in t for t in alpaca)


@needs_samples
def test_calibration_and_eval_draw_disjoint_data():
    """C4: calibration reads the train split, eval the validation split; alpaca: eval scores the held-out part only."""
    from llmship.data import sources
    from llmship.data.mixture import alpaca_texts
    from llmship.eval.perplexity import eval_records, eval_texts

    train, validation = sources.read_c4("@embedded", split="train"), eval_texts("@embedded")
    assert train and validation and not set(train) & set(validation)
    records = sources.read_alpaca("@embedded")
    held_out, calibration = eval_records("@embedded"), sources.alpaca_part(records, "calibration")
    assert held_out and calibration and len(held_out) + len(calibration) == len(records)
    assert not {json.dumps(r) for r in held_out} & {json.dumps(r) for r in calibration}
    assert len(alpaca_texts("@embedded")) == len(calibration)


def test_c4_folder_with_one_split_refuses_the_other(tmp_path):
    folder = tmp_path / "en"
    folder.mkdir()
    (folder / "c4-validation.00000-of-00008.json").write_text('{"text": "a b c"}\n', encoding="utf-8")
    from llmship.data import sources

    assert sources.read_c4(str(folder), split="validation") == ["a b c"]
    with pytest.raises(UserError, match="no c4-train") as err:
        sources.read_c4(str(folder), split="train")
    assert err.value.where == str(folder)


@needs_shared
def test_mixture_from_real_shared_data(llama_tokenizer):
    """The three sources from ../shared/data (real C4, C-Eval, alpaca-cleaned), tokenized with the LLaMA 32k tokenizer."""
    cfg = CalibrationConfig(seq_len=256, sources=[
        {"kind": "c4", "path": str(C4_FILE), "samples": 16},
        {"kind": "ceval", "path": str(SHARED / "ceval"), "samples": 16},
        {"kind": "alpaca", "path": str(SHARED / "alpaca-cleaned" / "alpaca_data_cleaned_sample1000.json"), "samples": 16}])
    calib = build_calibration_set(cfg, llama_tokenizer, 2048)
    assert [s["taken"] for s in calib.fingerprint["sources"]] == [16, 16, 16]
    assert all(len(s) == 256 for s in calib.samples[:16])  # GPTQ windows are exactly seq_len long
    assert all(s[0] == llama_tokenizer.bos_token_id for s in calib.samples[16:])  # C-Eval/alpaca: whole texts, BOS first
    assert calib.fingerprint == build_calibration_set(cfg, llama_tokenizer, 2048).fingerprint
