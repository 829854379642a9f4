"""The readers every stage uses: bundled samples, bad files, and the real data samples when present."""

from __future__ import annotations

import gzip
import json

import pytest
from testkit import SHARED_DATA

from llmship.config import EMBEDDED, SAMPLES_DIR
from llmship.data import sources, templates
from llmship.errors import UserError

SHARED = SHARED_DATA


def test_embedded_c4_has_long_documents():
    texts = sources.read_c4(EMBEDDED)
    assert len(texts) >= 40
    assert sum(len(t) > 1500 for t in texts) >= 32  # long enough for 256-token windows
    assert any("省会" in t for t in texts) and any("capital" in t for t in texts)  # Chinese and English


def test_embedded_c4_records_have_real_fields():
    file = SAMPLES_DIR / "c4" / "c4-validation.sample.json.gz"
    first = json.loads(gzip.decompress(file.read_bytes()).decode().splitlines()[0])
    assert set(first) == {"text", "timestamp", "url"}


def test_embedded_alpaca_with_and_without_input():
    records = sources.read_alpaca(EMBEDDED)
    assert len(records) >= 64
    with_input = [r for r in records if r["input"]]
    assert 0 < len(with_input) < len(records)
    assert templates.alpaca_prompt(with_input[0]).endswith("### Input:\n" + with_input[0]["input"] + "\n\n### Response:")


def test_embedded_ceval_subjects_and_rows():
    data = sources.read_ceval(EMBEDDED)
    assert data.categories == ["Humanities", "Other", "STEM", "Social Science"]
    assert len(data.subjects) >= 8
    for subject in data.subjects.values():
        assert len(subject.dev) == 5 and len(subject.val) >= 10
        assert subject.name_zh and all(r["answer"] in "ABCD" for r in subject.dev + subject.val)
        assert all(r["explanation"] == "" for r in subject.val)  # val has no explanation column
        assert all(r["explanation"] for r in subject.dev)
    letters = [r["answer"] for s in data.subjects.values() for r in s.val]
    assert max(letters.count(x) for x in "ABCD") <= len(letters) / 4 + 8  # gold letters balanced


def test_embedded_sharegpt_shapes():
    entries = sources.read_sharegpt(EMBEDDED)
    first = [e["conversations"][0]["from"] for e in entries]
    usable = [e for e in entries if len(e["conversations"]) >= 2 and first[entries.index(e)] == "human"]
    assert len(usable) >= 40
    assert "gpt" in first and "system" in first
    assert any(len(e["conversations"]) == 1 for e in entries)
    assert any(len(e["conversations"]) >= 6 for e in entries)
    assert all("_" in e["id"] for e in entries)


def test_ceval_template_matches_opencompass():
    row = {"id": "0", "question": "1+1=____", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"}
    prompt = templates.ceval_ppl_prompt("高中数学", [row, row], row, "C")
    h = "以下是中国关于高中数学考试的单项选择题，请选出其中的正确答案。\n1+1=____\nA. 1\nB. 2\nC. 3\nD. 4\n答案: "
    assert prompt == h + "\nB" + "\n\n\n" + h + "\nB" + "\n\n\n\n\n" + h + "\nC"
    assert templates.ceval_ppl_prompt("高中数学", [], row, "A") == "\n\n" + h + "\nA"
    assert templates.ceval_gen_prompt("高中数学", [row], row) == h + "\nB" + "\n" + h
    # safe_format quirk: a literal {C} in the question takes option C's text, as in OpenCompass.
    quirky = dict(row, question=r"\oint_{C} f")
    assert r"\oint_3 f" in templates.ceval_ppl_prompt("高中数学", [], quirky, "A")


@pytest.mark.parametrize(
    ("name", "content", "reader", "needle"),
    [
        ("c4.json.gz", b"not gzip at all", sources.read_c4, "JSON"),
        ("c4.json", b'{"url": "x"}\n', sources.read_c4, '"text"'),
        ("c4.jsonl", b"", sources.read_c4, "no documents"),
        ("alpaca.json", b'{"instruction": "x"}', sources.read_alpaca, "JSON list"),
        ("alpaca.json", b"[]", sources.read_alpaca, "empty"),
        ("alpaca.json", b'[{"input": ""}]', sources.read_alpaca, "instruction"),
        ("alpaca.json", b"[{", sources.read_alpaca, "not valid JSON"),
        ("share.json", b'[{"id": "a"}]', sources.read_sharegpt, "conversations"),
    ],
)
def test_bad_files_name_the_file(tmp_path, name, content, reader, needle):
    file = tmp_path / name
    file.write_bytes(content)
    with pytest.raises(UserError) as err:
        reader(str(file))
    assert str(file) in str(err.value) and needle in str(err.value)


def test_ceval_without_answer_column(tmp_path):
    (tmp_path / "val").mkdir()
    bad = tmp_path / "val" / "college_physics_val.csv"
    bad.write_text("id,question,A,B,C,D\n0,q,a,b,c,d\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        sources.read_ceval(str(tmp_path))
    assert str(bad) in str(err.value) and "answer" in str(err.value)


def test_ceval_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(UserError, match="not found"):
        sources.read_ceval(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no dev"):
        sources.read_ceval(str(tmp_path))


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError) as err:
        sources.read_c4(str(tmp_path / "missing.json.gz"))
    assert "missing.json.gz" in str(err.value)


def test_readers_on_real_samples(shared_data):
    data = sources.read_ceval(str(shared_data / "ceval"))
    assert len(data.subjects) == 52 and data.categories == ["Humanities", "Other", "STEM", "Social Science"]
    assert sum(1 for s in data.subjects.values() if s.val) == 26
    physics = data.subjects["high_school_physics"]
    assert physics.name_zh == "高中物理" and len(physics.dev) == 5 and physics.dev[0]["explanation"]
    assert len(sources.read_c4(str(shared_data / "c4" / "c4-sample.300docs.json.gz"))) == 300
    alpaca = sources.read_alpaca(str(shared_data / "alpaca-cleaned" / "alpaca_data_cleaned_sample1000.json"))
    assert len(alpaca) == 1000 and any(r["input"] for r in alpaca)
    share = sources.read_sharegpt(str(shared_data / "sharegpt" / "ShareGPT_V3_unfiltered_cleaned_split.sample300.json"))
    assert 250 <= len(share) <= 300 and any(e["conversations"][0]["from"] == "gpt" for e in share)


def test_ceval_subject_names_answers_and_mapping(tmp_path):
    """Without subject_mapping.json, C-Eval's own table names a known subject; an unknown subject or a gold answer
    outside A-D is an error naming the file."""
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "college_physics_val.csv").write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,B\n", encoding="utf-8")
    data = sources.read_ceval(str(tmp_path))
    subject = data.subjects["college_physics"]
    assert (subject.name_zh, subject.category) == ("大学物理", "STEM")
    (tmp_path / "val" / "knitting_val.csv").write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,B\n", encoding="utf-8")
    with pytest.raises(UserError, match="'knitting' is not a C-Eval subject"):
        sources.read_ceval(str(tmp_path))
    (tmp_path / "val" / "knitting_val.csv").unlink()
    bad = tmp_path / "val" / "college_physics_val.csv"
    bad.write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        sources.read_ceval(str(tmp_path))
    assert str(bad) in str(err.value) and "'E'" in str(err.value)
