"""Prompt strings of the upstream methods llmship reproduces, each with the file it comes from.

C-Eval (OpenCompass @a5acc4bb, /work/shared/METHODS.md (a)), with H(e) = CEVAL_QUESTION filled with row e and
E_i = H(dev_i) + "\\n" + answer_i:
- PPL, candidate L: E_1 "\\n\\n\\n" E_2 ... E_k "\\n\\n\\n\\n\\n" H(test) "\\n" L    (k = 0: "\\n\\n" H(test) "\\n" L)
- GEN:              E_1 "\\n" E_2 ... E_k "\\n" H(test)                      (k = 0: "\\n" H(test))

Filling quirk, reproduced on purpose: OpenCompass's `safe_format` (opencompass/utils/prompt.py) fills `{key}` by
plain str.replace, key by key in entry order (id, question, A, B, C, D, answer, explanation, subdivision, idx).
The examples are filled with their dev row first; then the WHOLE prompt, examples included, is filled with the test
row (GEN: the test answer is '' first). So a literal `{C}` / `{D}` inside a question (e.g. `\\oint_{C}`) is replaced
by an option's text, and a `{question}` left in an example's text would take the test question. Doing the same keeps
llmship's scores comparable with published OpenCompass numbers.

CMMLU (OpenCompass 0.5.4 = @a5acc4bb, cmmlu_ppl_8b9c76.py and the 5-shot cmmlu_gen_c13365.py), with H(e) = CMMLU_QUESTION
filled with row e and E_i = H(dev_i) + "\n答案是: " + answer_i (the answer cue is the BOT piece, so the parser puts
a "\n" before it):
- PPL, candidate L: E_1 "\n\n\n" E_2 ... E_k "\n\n\n\n\n" H(test) "\n答案是: " L    (k = 0: "\n\n" H(test) "\n答案是: " L)
- GEN:              E_1 "\n" E_2 ... E_k "\n" H(test) "\n答案是: "                  (k = 0: "\n" H(test) "\n答案是: ")
filled by the same safe_format, over CMMLU's keys (question, A-D, answer, subdivision, idx).

Stanford Alpaca: the two prompts of tatsu-lab/stanford_alpaca `train.py` (PROMPT_DICT), used verbatim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# opencompass/configs/datasets/ceval/ceval_ppl_578f8d.py and ceval_gen_5f30c7.py: the question template; the Chinese
# subject name is put in by an f-string when the config is built, the rest by safe_format.
CEVAL_QUESTION = "以下是中国关于{subject_zh}考试的单项选择题，请选出其中的正确答案。\n{{question}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案: "
CEVAL_LABELS = ("A", "B", "C", "D")
# opencompass/datasets/ceval.py columns, then what opencompass/datasets/base.py appends: safe_format's key order.
CEVAL_ENTRY_KEYS = ("id", "question", "A", "B", "C", "D", "answer", "explanation", "subdivision", "idx")
# PPL template type "origin" (opencompass/openicl/icl_retriever/icl_base_retriever.py generate_ice): ice_separator '\n'
# and ice_eos_token '\n', joined by LMTemplateParser with sep '\n' -> 3 newlines between examples, 5 before the test.
CEVAL_PPL_EXAMPLE_SEPARATOR = "\n\n\n"
CEVAL_PPL_TEST_SEPARATOR = "\n\n\n\n\n"
CEVAL_PPL_ZERO_SHOT_PREFIX = "\n\n"
# GEN template type "meta": separator and eos are '', the parser's '\n' joins the pieces.
CEVAL_GEN_SEPARATOR = "\n"
# FixKRetriever fix_id_list=[0, 1, 2, 3, 4]: the first 5 dev rows in file order.
CEVAL_SHOTS = 5

# tatsu-lab/stanford_alpaca train.py PROMPT_DICT["prompt_input"] and ["prompt_no_input"].
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


# opencompass/configs/datasets/cmmlu/cmmlu_ppl_8b9c76.py and cmmlu_gen_c13365.py: the HUMAN piece (Chinese name by
# f-string), then the BOT piece '答案是: <answer>' after the parser's '\n'.
CMMLU_QUESTION = "以下是关于{subject_zh}的单项选择题，请直接给出正确答案的选项。\n题目：{{question}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}"
CMMLU_ANSWER_CUE = "\n答案是: "
# opencompass/datasets/cmmlu.py columns, then base.py's subdivision and idx: safe_format's key order.
CMMLU_ENTRY_KEYS = ("question", "A", "B", "C", "D", "answer", "subdivision", "idx")


def safe_format(text: str, row: Mapping[str, Any], keys: Sequence[str] = CEVAL_ENTRY_KEYS) -> str:
    """opencompass/utils/prompt.py safe_format: replace '{key}' by str(value), key by key in entry order."""
    for key in keys:
        if key in row:
            text = text.replace("{" + key + "}", str(row[key]))
    return text


def ceval_question(subject_zh: str) -> str:
    """H with the subject put in and the row placeholders still open."""
    return CEVAL_QUESTION.format(subject_zh=subject_zh)


def ceval_example(row: Mapping[str, Any], subject_zh: str) -> str:
    """E = H(row) + '\\n' + answer: one filled example, as it appears among the in-context examples."""
    return safe_format(ceval_question(subject_zh) + "\n" + str(row.get("answer", "")).strip(), row)


def ceval_ppl_prompt(subject_zh: str, examples: Sequence[Mapping[str, Any]], row: Mapping[str, Any], label: str) -> str:
    """The PPL-mode prompt scored for candidate `label` (ceval_ppl_578f8d.py through PPLInferencer)."""
    h = ceval_question(subject_zh)
    shots = [safe_format(h + "\n" + str(ex["answer"]).strip(), ex) for ex in examples]
    head = CEVAL_PPL_EXAMPLE_SEPARATOR.join(shots) + CEVAL_PPL_TEST_SEPARATOR if shots else CEVAL_PPL_ZERO_SHOT_PREFIX
    return safe_format(head + h + "\n" + label, row)


def ceval_gen_prompt(subject_zh: str, examples: Sequence[Mapping[str, Any]], row: Mapping[str, Any]) -> str:
    """The GEN-mode prompt (ceval_gen_5f30c7.py through GenInferencer); the test answer is blanked first."""
    h = ceval_question(subject_zh)
    shots = [safe_format(h + "\n{answer}", ex) for ex in examples]
    head = CEVAL_GEN_SEPARATOR.join(shots) + CEVAL_GEN_SEPARATOR if shots else CEVAL_GEN_SEPARATOR
    return safe_format(head + h, {**row, "answer": ""})


def cmmlu_ppl_prompt(subject_zh: str, examples: Sequence[Mapping[str, Any]], row: Mapping[str, Any], label: str) -> str:
    """The PPL-mode prompt scored for candidate `label` (cmmlu_ppl_8b9c76.py through PPLInferencer)."""
    h = CMMLU_QUESTION.format(subject_zh=subject_zh)
    shots = [safe_format(h + CMMLU_ANSWER_CUE + str(ex["answer"]), ex, CMMLU_ENTRY_KEYS) for ex in examples]
    head = CEVAL_PPL_EXAMPLE_SEPARATOR.join(shots) + CEVAL_PPL_TEST_SEPARATOR if shots else CEVAL_PPL_ZERO_SHOT_PREFIX
    return safe_format(head + h + CMMLU_ANSWER_CUE + label, row, CMMLU_ENTRY_KEYS)


def cmmlu_gen_prompt(subject_zh: str, examples: Sequence[Mapping[str, Any]], row: Mapping[str, Any]) -> str:
    """The 5-shot GEN-mode prompt (cmmlu_gen_c13365.py through GenInferencer): ends with '答案是: ' (its BOT piece,
    the test answer blanked)."""
    h = CMMLU_QUESTION.format(subject_zh=subject_zh)
    shots = [safe_format(h + CMMLU_ANSWER_CUE + "{answer}", ex, CMMLU_ENTRY_KEYS) for ex in examples]
    head = CEVAL_GEN_SEPARATOR.join(shots) + CEVAL_GEN_SEPARATOR if shots else CEVAL_GEN_SEPARATOR
    return safe_format(head + h + CMMLU_ANSWER_CUE + "{answer}", {**row, "answer": ""}, CMMLU_ENTRY_KEYS)


def alpaca_prompt(record: Mapping[str, Any]) -> str:
    """The Stanford Alpaca prompt of a record (with or without input); the response follows it directly."""
    if record.get("input"):
        return ALPACA_PROMPT_INPUT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_PROMPT_NO_INPUT.format(instruction=record["instruction"])
