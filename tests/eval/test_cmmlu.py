"""CMMLU as OpenCompass 0.5.4 scores it (cmmlu_ppl_8b9c76, the 5-shot cmmlu_gen_c13365) on the bundled sample.

cmmlu_opencompass_reference*.json hold what OpenCompass's own components produced on llmship/assets/samples/cmmlu with
tiny-llama-zh (fp32, batch 1, max_out_len 8), with max_seq_len unset (5 examples everywhere), 512 (examples dropped from
the end: 2-5 kept) and 60 (no example left, ids left-truncated to BOS + the last 59): every prompt string, the token
ids the model saw, the examples kept, the PPL scores, the generated text and the predictions. llmship must render the
same strings, feed the same ids and predict the same letters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmship.config import EMBEDDED_MODEL_DIR, Config
from llmship.data import templates
from llmship.data.cmmlu import CMMLU_SUBJECTS, categories_of, read_cmmlu
from llmship.errors import UserError
from llmship.eval.cmmlu import Cmmlu, group_members

HERE = Path(__file__).parent
REFERENCES = {None: "cmmlu_opencompass_reference.json", 512: "cmmlu_opencompass_reference_msl512.json",
              60: "cmmlu_opencompass_reference_msl60.json"}
REFERENCE = json.loads((HERE / REFERENCES[None]).read_text(encoding="utf-8"))
H_ECONOMICS = "以下是关于经济学的单项选择题，请直接给出正确答案的选项。\n题目："


def _reference(max_seq_len: int | None) -> dict:
    return json.loads((HERE / REFERENCES[max_seq_len]).read_text(encoding="utf-8"))


def _questions(mode: str, reference: dict = REFERENCE):
    for subject, found in reference["modes"][mode]["subjects"].items():
        for q in found["questions"]:
            yield subject, q


def test_prompt_strings_follow_the_spec_by_hand():
    """SPEC: H(e) + '\\n答案是: ' + letter per example, 3 newlines between examples, 5 before the test (PPL), 1 (GEN);
    k = 0: '\\n\\n' (PPL) and '\\n' (GEN) in front; the GEN prompt ends with '答案是: ' (ASCII colon and space)."""
    dev = {"question": "Q1", "A": "a1", "B": "b1", "C": "c1", "D": "d1", "answer": "C", "subdivision": "s", "idx": 0}
    test = {"question": "Q2", "A": "a2", "B": "b2", "C": "c2", "D": "d2", "answer": "B", "subdivision": "s", "idx": 1}
    example = H_ECONOMICS + "Q1\nA. a1\nB. b1\nC. c1\nD. d1\n答案是: C"
    body = H_ECONOMICS + "Q2\nA. a2\nB. b2\nC. c2\nD. d2\n答案是: "
    assert templates.cmmlu_ppl_prompt("经济学", [dev, dev], test, "D") == example + "\n\n\n" + example + "\n\n\n\n\n" + body + "D"
    assert templates.cmmlu_ppl_prompt("经济学", [], test, "A") == "\n\n" + body + "A"
    assert templates.cmmlu_gen_prompt("经济学", [dev, dev], test) == example + "\n" + example + "\n" + body
    assert templates.cmmlu_gen_prompt("经济学", [], test) == "\n" + body


def test_safe_format_fills_cmmlu_keys_in_order():
    """A '{C}' in a question becomes option C's text (C comes after question); '{idx}' the row number."""
    row = {"question": "见{C}与{idx}", "A": "a", "B": "b", "C": "丙", "D": "d", "answer": "A", "subdivision": "x", "idx": 3}
    assert "题目：见丙与3\n" in templates.cmmlu_gen_prompt("经济学", [], row)


@pytest.mark.parametrize("max_seq_len", list(REFERENCES))
def test_prompts_equal_opencompass_on_the_samples(max_seq_len):
    data, reference = read_cmmlu("@embedded"), _reference(max_seq_len)
    compared, shots = 0, set()
    for subject, q in _questions("ppl", reference):
        s = data[subject]
        assert templates.cmmlu_ppl_prompt(s.name_zh, s.dev[: q["shots"]], s.test[q["idx"]], "A") == q["prompt_A"]
        compared, shots = compared + 1, shots | {q["shots"]}
    for subject, q in _questions("gen", reference):
        s = data[subject]
        assert templates.cmmlu_gen_prompt(s.name_zh, s.dev[: q["shots"]], s.test[q["idx"]]) == q["prompt"]
        compared += 1
    assert compared == 32 and shots == {None: {5}, 512: {2, 3, 4, 5}, 60: {0}}[max_seq_len]


def _prepared(max_seq_len: int | None):
    from llmship.source import load_tokenizer

    task = Cmmlu(Config.model_validate({"eval": {"cmmlu": {"max_seq_len": max_seq_len}}}))
    return task, task.prepare(load_tokenizer(EMBEDDED_MODEL_DIR), 1024)


@pytest.fixture(scope="module")
def prepared():
    return _prepared(None)


@pytest.mark.parametrize("max_seq_len", list(REFERENCES))
def test_token_ids_and_shots_equal_opencompass(max_seq_len):
    _, cset = _prepared(max_seq_len)
    reference = _reference(max_seq_len)
    by_key = {(q.subject, q.idx): q for q in cset.questions}
    for subject, ref in _questions("ppl", reference):
        q = by_key[(subject, ref["idx"])]
        for label in "ABCD":
            assert q.ppl_ids[label][:-1] == ref["ids_A"][:-1] and q.ppl_ids[label][-1] == ref["last_token"][label]
        assert set(q.ppl_shots.values()) == {ref["shots"]} and q.gold == ref["gold"]
    for subject, ref in _questions("gen", reference):
        q = by_key[(subject, ref["idx"])]
        assert q.gen_ids == ref["ids"] and q.gen_shots == ref["shots"]


@pytest.mark.parametrize("max_seq_len", list(REFERENCES))
def test_embedded_model_predicts_what_opencompass_predicts(max_seq_len):
    from llmship.runtime import load_engine

    task, cset = _prepared(max_seq_len)
    reference = _reference(max_seq_len)
    engine = load_engine(task.cfg.model, task.cfg.runtime)
    try:
        fields, metrics, _ = task.score(engine, cset, _tokenizer(), None)
    finally:
        engine.close()
    for mode in ("ppl", "gen"):
        mine = {(r["subject"], r["idx"]): r for r in fields["cmmlu_predictions"][mode]}
        for subject, ref in _questions(mode, reference):
            record = mine[(subject, ref["idx"])]
            assert (record["pred"] or "") == ref["prediction"]  # OpenCompass's first_capital gives '' where llmship None
            if mode == "ppl":
                assert record["scores"] == pytest.approx(ref["ppl"], abs=1e-4)
            else:
                assert record["output"] == ref["output"]
        for subject, found in reference["modes"][mode]["subjects"].items():
            assert metrics[f"cmmlu/{mode}/{subject}"] == pytest.approx(found["accuracy"])
        assert metrics[f"cmmlu/{mode}/average"] == pytest.approx(reference["modes"][mode]["naive_average"])


def _tokenizer():
    from llmship.source import load_tokenizer

    return load_tokenizer(EMBEDDED_MODEL_DIR)


def test_groups_overlap_as_opencompass_groups_them(prepared):
    """groups/cmmlu.py: 17 STEM, 13 humanities, 22 social science, 15 other, 15 China-specific (overlapping) of 67."""
    assert len(CMMLU_SUBJECTS) == 67
    counts: dict[str, int] = {}
    for subject in CMMLU_SUBJECTS:
        for category in categories_of(subject):
            counts[category] = counts.get(category, 0) + 1
    assert counts == {"STEM": 17, "Humanities": 13, "Social Science": 22, "Other": 15, "China specific": 15}
    task, cset = prepared
    groups = group_members(cset.subjects)
    assert groups["china-specific"] == ["chinese_driving_rule"] and "chinese_driving_rule" in groups["other"]
    assert list(groups) == ["humanities", "stem", "social-science", "other", "china-specific", "average"]
    rows = task.summary_rows(cset)
    names = [row["dataset"] for row in rows if row["mode"] == "ppl"]
    assert names[:4] == ["cmmlu-chinese_driving_rule", "cmmlu-economics", "cmmlu-elementary_mathematics",
                         "cmmlu-world_history"]
    assert names[4:] == ["cmmlu-humanities", "cmmlu-stem", "cmmlu-social-science", "cmmlu-other",
                         "cmmlu-china-specific", "cmmlu", "cmmlu-agreement"]
    assert {row["name"]: row["n"] for row in rows}["cmmlu/gen/average"] == 16
    assert task.units(cset)[:2] == ["ppl/chinese_driving_rule", "ppl/economics"] and len(task.units(cset)) == 8


def test_a_row_without_seven_fields_is_refused_with_its_line(tmp_path):
    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "economics.csv").write_text(",Question,A,B,C,D,Answer\n0,q,a,b,c,d,A\n", encoding="utf-8")
    (tmp_path / "test" / "economics.csv").write_text(",Question,A,B,C,D,Answer\n0,q,a,b,c,d,A\n1,q,a,b,c,A\n",
                                                     encoding="utf-8")
    with pytest.raises(UserError, match="line 3 has 6 fields") as err:
        read_cmmlu(str(tmp_path))
    assert "economics.csv" in str(err.value)


def test_the_quoted_newline_of_a_question_survives_reading():
    rows = read_cmmlu("@embedded")["elementary_mathematics"].test
    assert rows[3]["question"] == "计算：\n(2 + 3) × 4 = ?" and rows[3]["subdivision"] == "cmmlu-elementary_mathematics_test"
