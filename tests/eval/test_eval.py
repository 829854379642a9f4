"""Eval: OpenCompass C-Eval prompts and scoring, perplexity, consistency, summary files, gate and JUnit."""

from __future__ import annotations

import csv
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from testkit import SHARED_DATA

from llmship.config import EMBEDDED_MODEL_DIR, SAMPLES_DIR, CevalTask, Goal
from llmship.data import templates
from llmship.errors import UserError
from llmship.eval import ceval, consistency, perplexity
from llmship.eval.gate import check_metrics_known, evaluate_goals, failure_table, junit_xml
from llmship.eval.summary import to_csv, to_md, to_txt
from llmship.runtime.base import Cache, Engine
from llmship.source import load_tokenizer

H = "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n"


def _row(q: str, a: str, b: str, c: str, d: str, answer: str, **extra) -> dict:
    return {"id": "0", "question": q, "A": a, "B": b, "C": c, "D": d, "answer": answer, **extra}


DEV = [_row("一加一等于几？", "1", "2", "3", "4", "B", explanation="因为"),
       _row("首都是？", "北京", "上海", "广州", "深圳", "A", explanation="")]
TEST = _row("网络层的协议是____。", "IP", "TCP", "HTTP", "FTP", "A")


# --------------------------------------------------------------------------- prompt strings
def test_ppl_prompt_equals_methods_example():
    e1 = H + "一加一等于几？\nA. 1\nB. 2\nC. 3\nD. 4\n答案: \nB"
    e2 = H + "首都是？\nA. 北京\nB. 上海\nC. 广州\nD. 深圳\n答案: \nA"
    h_test = H + "网络层的协议是____。\nA. IP\nB. TCP\nC. HTTP\nD. FTP\n答案: "
    assert templates.ceval_ppl_prompt("计算机网络", DEV, TEST, "C") == e1 + "\n\n\n" + e2 + "\n\n\n\n\n" + h_test + "\nC"
    assert templates.ceval_ppl_prompt("计算机网络", [], TEST, "A") == "\n\n" + h_test + "\nA"


def test_gen_prompt_equals_methods_example():
    e1 = H + "一加一等于几？\nA. 1\nB. 2\nC. 3\nD. 4\n答案: \nB"
    e2 = H + "首都是？\nA. 北京\nB. 上海\nC. 广州\nD. 深圳\n答案: \nA"
    h_test = H + "网络层的协议是____。\nA. IP\nB. TCP\nC. HTTP\nD. FTP\n答案: "
    assert templates.ceval_gen_prompt("计算机网络", DEV, TEST) == e1 + "\n" + e2 + "\n" + h_test
    assert templates.ceval_gen_prompt("计算机网络", [], TEST) == "\n" + h_test


def test_safe_format_quirk_fills_option_placeholders_in_questions():
    # OpenCompass replaces '{C}' inside the question by option C's text (str.replace, key by key).
    row = _row(r"计算 \oint_{C} f 与 \mathrm{D}", "x", "y", "圆", "z", "C")
    text = templates.ceval_gen_prompt("高等数学", [], row)
    assert r"\oint_圆 f 与 \mathrmz" in text
    assert text[-4:] == "答案: "


# --------------------------------------------------------------------------- GEN postprocess, groups
@pytest.mark.parametrize(("text", "expected"), [(" B. 因为", "B"), ("答案是C", "C"), ("abc", None), ("", None),
                                                 ("éΣx", "Σ"), ("\nD", "D")])
def test_first_capital_postprocess(text, expected):
    assert ceval.first_capital_postprocess(text) == expected


def test_group_means_are_unweighted_over_present_subjects():
    subjects = [{"name": "college_physics", "slug": "stem"}, {"name": "computer_network", "slug": "stem"},
                {"name": "law", "slug": "humanities"}]
    records = ([{"subject": "college_physics", "correct": c} for c in (True, False)]  # 50
               + [{"subject": "computer_network", "correct": c} for c in (True, True, True, False)]  # 75
               + [{"subject": "law", "correct": c} for c in (False, False, False, False, True)])  # 20
    m = ceval.accuracy_metrics("ppl", subjects, records)
    assert m["ceval/ppl/college_physics"] == 50.0 and m["ceval/ppl/computer_network"] == 75.0
    assert m["ceval/ppl/stem"] == pytest.approx(62.5)
    assert m["ceval/ppl/hard"] == 50.0  # only college_physics of the hard set is present
    assert m["ceval/ppl/average"] == pytest.approx((50 + 75 + 20) / 3)  # mean of subjects, not of questions
    assert "ceval/ppl/other" not in m
    assert ceval.category_slug("Social Science") == "social-science"


# --------------------------------------------------------------------------- exact PPL arithmetic
class BigramEngine(Engine):
    """logits(position t) = W[token_t]: a tiny model whose losses can be computed by hand."""

    name = "bigram"

    def __init__(self, table: np.ndarray):
        self.table = table.astype(np.float32)
        self.vocab_size = table.shape[0]
        self.eos_token_id = None
        self.pad_token_id = 0
        self.max_positions = 512
        self.batch_widths: list[int] = []

    def prefill(self, input_ids, attention_mask):
        self.batch_widths.append(input_ids.shape[1])
        logits = self.table[input_ids].copy()
        logits[attention_mask == 0] = np.nan  # pads must never reach a loss
        return logits, Cache(past=None, attention_mask=attention_mask)

    def decode(self, tokens, cache):
        return self.table[tokens], cache


def _hand_score(table: np.ndarray, seq: list[int]) -> float:
    total = 0.0
    for prev, nxt in zip(seq[:-1], seq[1:], strict=False):
        row = table[prev].astype(np.float64)
        total += math.log(sum(math.exp(v) for v in row)) - row[nxt]
    return total / len(seq)  # BOS counted in the divisor (OpenCompass get_ppl)


def test_ppl_scores_match_hand_computation_with_padding():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(12, 12)).astype(np.float32)
    engine = BigramEngine(table)
    q1 = ceval.Question("s", 0, "A", ppl_ids={lab: [1, 5, 6, 7, 8 + k] for k, lab in enumerate("ABCD")})  # shared prefix
    q2 = ceval.Question("s", 1, "B", ppl_ids={lab: [1, 3, 8 + k] for k, lab in enumerate("ABCD")})  # shorter: padded
    q3 = ceval.Question("s", 2, "C", ppl_ids={"A": [1, 4, 9], "B": [1, 4, 9, 10], "C": [1, 2], "D": [1, 4, 11]})  # full
    scores = ceval.ppl_scores(engine, [q1, q2, q3], batch_size=8)
    for q, s in zip([q1, q2, q3], scores, strict=True):
        for label in "ABCD":
            assert s[label] == pytest.approx(_hand_score(table, q.ppl_ids[label]), abs=1e-6)
    assert engine.batch_widths == [4]  # one left-padded batch; q1 runs its 4-token shared prefix only
    assert ceval.ppl_units([q1, q2, q3]) == 6


def test_argmin_takes_first_label_on_ties():
    assert ceval.argmin_label({"A": 1.0, "B": 0.5, "C": 0.5, "D": 2.0}) == "B"
    assert ceval.argmin_label({"A": 0.5, "B": 0.5, "C": 0.5, "D": 0.5}) == "A"


def test_ppl_scores_on_tiny_llama_equal_torch_cross_entropy():
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    from llmship.export.tiny import tiny_config
    from llmship.runtime.torch_engine import TorchEngine

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(300)).eval()
    with torch.no_grad():  # decisive logits, so a wrong position or target shows in the loss
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.25)
    engine = TorchEngine(model)
    rng = np.random.default_rng(1)
    questions = []
    for i, n in enumerate((9, 4, 14)):
        prefix = [1, *rng.integers(3, 290, size=n).tolist()]
        questions.append(ceval.Question("s", i, "A", ppl_ids={lab: [*prefix, 40 + k] for k, lab in enumerate("ABCD")}))
    scores = ceval.ppl_scores(engine, questions, batch_size=3)
    for q, s in zip(questions, scores, strict=True):
        for label in "ABCD":
            ids = torch.tensor([q.ppl_ids[label]])
            with torch.no_grad():
                logits = model(ids).logits[0].double()
            ce = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
            assert s[label] == pytest.approx(ce / ids.shape[1], abs=2e-5)


# --------------------------------------------------------------------------- perplexity, consistency
class _Tok:
    """Character tokenizer with a BOS, enough for the window arithmetic."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1] + [3 + (ord(c) % 9) for c in text]}


def test_c4_windows_follow_gptq_sampling():
    import random

    texts = ["abcdefghij" * 3, "short", "klmnopqrstuvwxyz" * 2]
    win = perplexity.c4_windows(texts, _Tok(), seq_len=12, windows=5)
    rng = random.Random(0)
    expected = []
    for _ in range(5):
        while True:
            d = rng.randint(0, len(texts) - 1)
            ids = _Tok()(texts[d])["input_ids"]
            if len(ids) > 12:
                break
        i = rng.randint(0, len(ids) - 12 - 1)
        expected.append(ids[i:i + 12])
    assert win == expected and all(len(w) == 12 for w in win)
    with pytest.raises(UserError, match="more than 40 tokens"):
        perplexity.c4_windows(["short"], _Tok(), seq_len=40, windows=1)


def test_c4_and_alpaca_perplexity_by_hand():
    rng = np.random.default_rng(2)
    table = rng.normal(size=(12, 12)).astype(np.float32)
    engine = BigramEngine(table)
    windows = [[1, 4, 5, 6], [7, 8, 3, 4]]
    nll = [_hand_score(table, w) * 4 / 3 for w in windows]  # mean over the seq_len - 1 targets
    assert perplexity.c4_perplexity(engine, windows, 2)["ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-6)
    examples = [{"ids": [1, 4, 5, 6, 2], "start": 3}, {"ids": [1, 7, 8, 2], "start": 2}]
    # response tokens: 6, 2 of the first (after 5, 6) and 8, 2 of the second
    lp = lambda a, b: float(table[a].astype(np.float64)[b] - np.log(np.exp(table[a].astype(np.float64)).sum()))  # noqa: E731
    total = -(lp(5, 6) + lp(6, 2) + lp(7, 8) + lp(8, 2))
    got = perplexity.alpaca_perplexity(engine, examples, 2)
    assert got["tokens"] == 4 and got["ppl"] == pytest.approx(math.exp(total / 4), rel=1e-6)


def test_consistency_of_identical_and_different_engines():
    rng = np.random.default_rng(3)
    table = rng.normal(size=(12, 12)).astype(np.float32) * 3
    examples = [{"ids": [1, 4, 5, 6, 2], "start": 2, "prompt_ids": [1, 4]}, {"ids": [1, 7, 8, 9], "start": 2, "prompt_ids": [1, 7]}]
    base = consistency.reference(BigramEngine(table), examples, 2)
    same = consistency.compare(base, consistency.reference(BigramEngine(table.copy()), examples, 2))
    assert same["consistency/top1"] == 100.0 and same["consistency/kl"] == pytest.approx(0.0, abs=1e-9)
    assert same["consistency/greedy_prefix"] == consistency.GREEDY_TOKENS
    other = table.copy()
    other[:, [0, 1]] = other[:, [1, 0]]
    other[[4, 7]] = other[[7, 4]]
    diff = consistency.compare(base, consistency.reference(BigramEngine(other), examples, 2))
    assert diff["consistency/kl"] > 0.01 and diff["consistency/greedy_prefix"] < consistency.GREEDY_TOKENS


# --------------------------------------------------------------------------- gate, JUnit, tables
RESULTS = {"pytorch": {"ceval/ppl/average": 40.0, "ppl/c4": 10.0},
           "good": {"ceval/ppl/average": 38.0, "ppl/c4": 10.4},
           "bad": {"ceval/ppl/average": 30.0, "ppl/c4": 12.0}}


def _goal(metric, kind, value, **kw):
    return Goal(metric=metric, type=kind, value=value, **kw)


def test_gate_kinds_pass_and_fail():
    goals = [_goal("ceval/ppl/average", "max-degradation", 5.0), _goal("ppl/c4", "percent-max-degradation", 5.0),
             _goal("ceval/ppl/average", "threshold", 35.0), _goal("ppl/c4", "threshold", 11.0)]
    rows = evaluate_goals(goals, RESULTS, "pytorch")
    verdict = {(r["goal"], r["variant"]): r["passed"] for r in rows}
    assert len(rows) == 8
    assert verdict[("ceval/ppl/average max-degradation 5", "good")] and not verdict[("ceval/ppl/average max-degradation 5", "bad")]
    assert verdict[("ppl/c4 percent-max-degradation 5%", "good")] and not verdict[("ppl/c4 percent-max-degradation 5%", "bad")]
    assert verdict[("ceval/ppl/average threshold 35", "good")] and not verdict[("ceval/ppl/average threshold 35", "bad")]
    assert verdict[("ppl/c4 threshold 11", "good")] and not verdict[("ppl/c4 threshold 11", "bad")]
    limits = {(r["goal"], r["variant"]): r["limit"] for r in rows}
    assert limits[("ppl/c4 percent-max-degradation 5%", "good")] == pytest.approx(10.5)
    assert limits[("ceval/ppl/average max-degradation 5", "bad")] == pytest.approx(35.0)


def test_gate_direction_variants_filter_and_missing_metric():
    rows = evaluate_goals([_goal("ppl/c4", "max-degradation", 3.0, higher_is_better=True, variants=["bad"])], RESULTS, "pytorch")
    assert [(r["variant"], r["passed"]) for r in rows] == [("bad", True)]  # 12 >= 10 - 3 when forced higher-is-better
    rows = evaluate_goals([_goal("consistency/top1", "threshold", 90.0)], RESULTS, "pytorch")
    assert not any(r["passed"] for r in rows) and "not measured" in rows[0]["message"]
    with pytest.raises(UserError, match="gate.goals.0.metric"):
        check_metrics_known([_goal("ceval/ppl/avg", "threshold", 1.0)], {"ceval/ppl/average", "ppl/c4"})
    assert "bad" in failure_table(rows) and failure_table([]) == ""


def test_junit_xml_is_well_formed_with_one_case_per_goal_and_variant():
    goals = [_goal("ceval/ppl/average", "max-degradation", 5.0), _goal("ppl/c4", "percent-max-degradation", 5.0)]
    rows = evaluate_goals(goals, RESULTS, "pytorch")
    root = ET.fromstring(junit_xml(rows))
    cases = root.findall("./testsuite/testcase")
    assert len(cases) == 4 and root.get("failures") == "2"
    failed = sorted(c.get("classname") for c in cases if c.find("failure") is not None)
    assert failed == ["llmship.gate.bad", "llmship.gate.bad"]


def test_summary_tables_have_opencompass_columns_and_two_decimals():
    rows = [{"dataset": "ceval-law", "version": "abc123", "metric": "accuracy", "mode": "ppl", "values": {"pytorch": 41.666, "int8": None}},
            {"dataset": "ceval", "version": "-", "metric": "naive_average", "mode": "ppl", "values": {"pytorch": 40.0, "int8": 39.123}}]
    txt = to_txt(rows, ["pytorch", "int8"])
    assert txt.splitlines()[0].split() == ["dataset", "version", "metric", "mode", "pytorch", "int8"]
    assert "41.67" in txt and "39.12" in txt
    assert to_csv(rows, ["pytorch", "int8"]).splitlines()[1] == "ceval-law,abc123,accuracy,ppl,41.67,-"
    assert to_md(rows, ["pytorch", "int8"]).splitlines()[3] == "| ceval | - | naive_average | ppl | 40.00 | 39.12 |"


# --------------------------------------------------------------------------- prepare
def _subject(name, zh, category, dev, val):
    return SimpleNamespace(name=name, name_zh=zh, category=category, dev=dev, val=val)


def test_prepare_tokenizes_every_mode_and_checks_subjects():
    data = SimpleNamespace(subjects=[_subject("computer_network", "计算机网络", "STEM", DEV * 3, [TEST] * 4),
                                     _subject("law", "法学", "Humanities", DEV * 3, [])])
    task = CevalTask(shots=2, max_questions=3, max_out_len=4)
    cset = ceval.prepare(task, data, _Tok(), max_positions=60)
    assert cset.subject_names == ["computer_network"]  # no val rows: not present
    assert len(cset.questions) == 3 and all(len(q.ppl_ids["A"]) == 60 == len(q.gen_ids) for q in cset.questions)
    assert all(q.truncated and q.ppl_ids["A"][0] == 1 for q in cset.questions)  # BOS kept by the left truncation
    assert set(cset.versions) == {"ppl", "gen"} and cset.versions["ppl"] != cset.versions["gen"]
    with pytest.raises(UserError, match="eval.ceval.subjects"):
        ceval.prepare(CevalTask(subjects=["nope"]), data, _Tok(), max_positions=60)


# --------------------------------------------------------------------------- over-long prompts, OpenCompass rules
# An independent transcription of /work/shared/METHODS.md (a): rows read with csv.reader, prompt strings built from
# the table of that section, examples dropped while k > 0 and tokens(prompt, BOS included) > max_seq_len (PPL: labels
# A-D in turn, k carried over), then BOS + the last L - 1 tokens with L = max_seq_len, else max positions.
_QUESTION = "以下是中国关于{zh}考试的单项选择题，请选出其中的正确答案。\n{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n答案: "
_SHARED_CEVAL = SHARED_DATA / "ceval"


def _csv_rows(file: Path) -> list[dict[str, str]]:
    with file.open(encoding="utf-8", newline="") as fh:
        header, *rows = list(csv.reader(fh))
    return [{**{"explanation": "", "answer": ""}, **dict(zip(header, values, strict=True))} for values in rows]


def _fill(text: str, row: dict) -> str:
    for key in ("id", "question", "A", "B", "C", "D", "answer", "explanation"):  # safe_format's order
        if key in row:
            text = text.replace("{" + key + "}", str(row[key]))
    return text


def _reference_ppl_text(zh: str, dev: list[dict], row: dict, label: str, k: int) -> str:
    h = _QUESTION.replace("{zh}", zh)
    if k == 0:
        return _fill("\n\n" + h + "\n" + label, row)
    examples = [_fill(h + "\n" + ex["answer"], ex) for ex in dev[:k]]
    return _fill("\n\n\n".join(examples) + "\n\n\n\n\n" + h + "\n" + label, row)


def _reference_gen_text(zh: str, dev: list[dict], row: dict, k: int) -> str:
    h = _QUESTION.replace("{zh}", zh)
    examples = [_fill(h + "\n{answer}", ex) for ex in dev[:k]]
    return _fill("\n".join(examples) + "\n" + h, {**row, "answer": ""})  # k = 0: "\n" H(test)


def _reference_question(tok, zh, dev, row, shots, max_seq_len, max_positions):
    """{'ppl': {label: (ids, k)}, 'gen': (ids, k)} by the rules above."""
    length = max_seq_len or max_positions

    def enc(text):
        ids = list(tok(text, add_special_tokens=True)["input_ids"])
        return ids if len(ids) <= length else [ids[0], *ids[len(ids) - (length - 1):]]

    def fits(text):
        return max_seq_len is None or len(tok(text, add_special_tokens=True)["input_ids"]) <= max_seq_len

    out, k = {"ppl": {}}, shots
    for label in "ABCD":
        while k > 0 and not fits(_reference_ppl_text(zh, dev, row, label, k)):
            k -= 1
        out["ppl"][label] = (enc(_reference_ppl_text(zh, dev, row, label, k)), k)
    k = shots
    while k > 0 and not fits(_reference_gen_text(zh, dev, row, k)):
        k -= 1
    out["gen"] = (enc(_reference_gen_text(zh, dev, row, k)), k)
    return out


CEVAL_SOURCES = [pytest.param(SAMPLES_DIR / "ceval", 230, 1024, None, id="bundled-max_seq_len-230"),
                 pytest.param(SAMPLES_DIR / "ceval", 30, 1024, None, id="bundled-max_seq_len-30"),
                 pytest.param(SAMPLES_DIR / "ceval", None, 240, None, id="bundled-no-max_seq_len"),
                 pytest.param(_SHARED_CEVAL, 1024, 1024, 3, id="shared-max_seq_len-1024",
                              marks=pytest.mark.skipif(not _SHARED_CEVAL.is_dir(), reason="../shared/data is absent")),
                 pytest.param(_SHARED_CEVAL, None, 1024, 3, id="shared-no-max_seq_len",
                              marks=pytest.mark.skipif(not _SHARED_CEVAL.is_dir(), reason="../shared/data is absent"))]


@pytest.mark.parametrize(("folder", "max_seq_len", "max_positions", "per_subject"), CEVAL_SOURCES)
def test_prompts_and_kept_examples_follow_opencompass_rules(folder, max_seq_len, max_positions, per_subject):
    from llmship.data import sources

    tok = load_tokenizer(EMBEDDED_MODEL_DIR)
    task = CevalTask(path=str(folder), max_seq_len=max_seq_len, max_questions=per_subject)
    cset = ceval.prepare(task, sources.read_ceval(str(folder)), tok, max_positions=max_positions)
    mapping = json.loads((folder / "subject_mapping.json").read_text(encoding="utf-8"))
    expected = []
    for subject in sorted(p.name.removesuffix("_val.csv") for p in (folder / "val").glob("*_val.csv")):
        dev = _csv_rows(folder / "dev" / f"{subject}_dev.csv")
        for row in _csv_rows(folder / "val" / f"{subject}_val.csv")[:per_subject]:
            expected.append(_reference_question(tok, mapping[subject][1], dev, row, 5, max_seq_len, max_positions))
    assert len(cset.questions) == len(expected)
    for q, ref in zip(cset.questions, expected, strict=True):
        assert {label: (q.ppl_ids[label], q.ppl_shots[label]) for label in "ABCD"} == ref["ppl"], (q.subject, q.idx)
        assert (q.gen_ids, q.gen_shots) == ref["gen"], (q.subject, q.idx)
    # the case is not trivial: what the rules produce varies over the questions
    kept = [q.gen_shots for q in cset.questions] + [k for q in cset.questions for k in q.ppl_shots.values()]
    length = max_seq_len or max_positions
    if max_seq_len is None:
        assert set(kept) == {5} and any(q.truncated for q in cset.questions)
    elif max_seq_len >= 200:
        assert len(set(kept)) > 1 and max(kept) == 5
    else:
        assert set(kept) == {0} and any(q.truncated for q in cset.questions)
    assert all(len(ids) <= length for q in cset.questions for ids in (q.gen_ids, *q.ppl_ids.values()))


class _LongA(_Tok):
    """_Tok with a candidate letter 'A' worth 21 tokens, so label A's prompt is 20 tokens longer than B's."""

    def __call__(self, text, add_special_tokens=True):
        ids = super().__call__(text)["input_ids"]
        return {"input_ids": ids + [4] * 20 if text.endswith("\nA") else ids}


def test_a_label_reduced_count_carries_over_to_later_labels():
    data = SimpleNamespace(subjects=[_subject("computer_network", "计算机网络", "STEM", DEV, [TEST])])
    tok = _LongA()
    fits_b_with_two = len(tok(templates.ceval_ppl_prompt("计算机网络", DEV, TEST, "B"))["input_ids"])
    cset = ceval.prepare(CevalTask(shots=2, max_seq_len=fits_b_with_two, modes=["ppl"]), data, tok, max_positions=4096)
    (q,) = cset.questions
    # A does not fit with 2 examples, so it drops one; B-D would fit with 2 but start from A's 1 (OpenCompass mutates
    # the question's example list while it walks the labels)
    assert q.ppl_shots == {"A": 1, "B": 1, "C": 1, "D": 1}
    assert q.ppl_ids["B"] == tok(templates.ceval_ppl_prompt("计算机网络", DEV[:1], TEST, "B"))["input_ids"]
    assert not q.truncated
    # the predictions record says how many examples each label kept
    engine = BigramEngine(np.random.default_rng(0).normal(size=(64, 64)))
    scored = ceval.score_engine(engine, cset, tok, batch_size=4)
    assert scored["predictions"]["ppl"][0]["shots"] == {"A": 1, "B": 1, "C": 1, "D": 1}


def test_gen_prompt_is_truncated_at_max_positions_with_no_room_kept():
    # OpenCompass truncates the GEN prompt at max positions and generates past them (no room kept for new tokens)
    data = SimpleNamespace(subjects=[_subject("computer_network", "计算机网络", "STEM", DEV * 3, [TEST])])
    cset = ceval.prepare(CevalTask(shots=5, max_out_len=16), data, _Tok(), max_positions=40)
    (q,) = cset.questions
    full = _Tok()(templates.ceval_gen_prompt("计算机网络", (DEV * 3)[:5], TEST))["input_ids"]
    assert q.gen_ids == [full[0], *full[-39:]] and q.gen_shots == 5 and q.truncated
    assert cset.positions_needed == 40 + 16 - 1
