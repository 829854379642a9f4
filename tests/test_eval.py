"""Eval: OpenCompass C-Eval prompts and scoring, perplexity, consistency, summary files, gate and JUnit."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import numpy as np
import pytest

from llmship.calib_data import templates
from llmship.config import CevalTask, Goal
from llmship.errors import UserError
from llmship.eval import ceval, consistency, perplexity
from llmship.eval.gate import check_metrics_known, evaluate_goals, failure_table, junit_xml
from llmship.eval.summary import to_csv, to_md, to_txt
from llmship.runtime.base import Cache, Engine

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
    assert len(cset.questions) == 3 and all(len(q.ppl_ids["A"]) <= 60 and len(q.gen_ids) <= 56 for q in cset.questions)
    assert all(q.truncated and q.ppl_ids["A"][0] == 1 for q in cset.questions)  # BOS kept by the left truncation
    assert set(cset.versions) == {"ppl", "gen"} and cset.versions["ppl"] != cset.versions["gen"]
    with pytest.raises(UserError, match="eval.ceval.subjects"):
        ceval.prepare(CevalTask(subjects=["nope"]), data, _Tok(), max_positions=60)
