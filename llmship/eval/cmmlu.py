"""CMMLU scored as OpenCompass 0.5.4 scores a Hugging Face base model (eval.cmmlu).

Configs reproduced: `cmmlu_ppl_8b9c76.py` (what cmmlu_ppl.py imports) and the 5-shot `cmmlu_gen_c13365.py` (what
cmmlu_gen.py imported from 2023-08 to 2025-03, the analogue of C-Eval's ceval_gen_5f30c7.py). Test split scored,
the first 5 dev rows as in-context examples (FixKRetriever [0..4]); prompts in llmship.data.templates. Everything
else is C-Eval's machinery (llmship.eval.ceval), with the same deviations and none more: PPL = mean cross-entropy over
the whole prompt, BOS counted, lowest of A-D wins (first on ties; shared-prefix scoring when the four prompts differ
only in the last token); GEN = greedy `max_out_len` tokens, first upper-case character (`first_capital_postprocess`;
OpenCompass returns '' where llmship returns None: both are wrong); over-long prompts handled as C-Eval's.

Groups (opencompass/configs/summarizers/groups/cmmlu.py): naive averages of subject accuracies per category; the 15
China-specific subjects count in their primary category AND in 'china-specific', so the categories overlap; `average`
(OpenCompass's `cmmlu`) is the mean of all subjects present. A group over a subset of subjects is the mean of those
present (OpenCompass marks it an error). Not reproduced: cmmlu_gen.py's 0.5.4 default, the 0-shot chain-of-thought
prompt (cmmlu_0shot_cot_gen_305931.py), which needs hundreds of generated tokens per question.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from llmship.config import CmmluTask
from llmship.data import templates
from llmship.data.cmmlu import CMMLU_GROUPS, CmmluSubject, categories_of, read_cmmlu
from llmship.errors import UserError
from llmship.eval.ceval import (
    LABELS,
    CevalSet,
    MultipleChoiceTask,
    Question,
    accuracy_metrics,
    agreement,
    category_slug,
    mode_intervals,
    score_mode,
    tokenize_question,
)
from llmship.eval.tasks import Progress
from llmship.runtime.base import Engine

PREFIX = "cmmlu"
PREDICTIONS = "cmmlu_predictions"  # the engine record's field: {mode: per-question records}


def prompt_version(mode: str, task: CmmluTask) -> str:
    """First 6 hex of a SHA-256 over llmship's description of the prompt template and its inference settings."""
    placeholder = {"question": "{question}", "A": "{A}", "B": "{B}", "C": "{C}", "D": "{D}", "answer": "{answer}"}
    examples = [dict(placeholder, answer=label) for label in LABELS[: task.shots]]
    if mode == "ppl":
        template: Any = {label: templates.cmmlu_ppl_prompt("{subject_zh}", examples, placeholder, label) for label in LABELS}
        infer: dict[str, Any] = {"inferencer": "PPLInferencer", "score": "sum_ce_over_tokens_incl_bos"}
    else:
        template = templates.cmmlu_gen_prompt("{subject_zh}", examples, placeholder)
        infer = {"inferencer": "GenInferencer", "max_out_len": task.max_out_len, "postprocess": "first_capital"}
    blob = json.dumps({"template": template, "shots": task.shots, "max_seq_len": task.max_seq_len,
                       "retriever": "FixKRetriever", **infer}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:6]


def prepare(task: CmmluTask, data: dict[str, CmmluSubject], tokenizer: Any, max_positions: int) -> CevalSet:
    """Pick subjects and test questions, build and tokenize every prompt once."""
    if task.subjects is not None:
        unknown = [s for s in task.subjects if s not in data]
        if unknown:
            raise UserError(f"subject(s) {', '.join(unknown)} not in the CMMLU data; present: "
                            f"{', '.join(sorted(data)) or 'none'}", where="eval.cmmlu.subjects")
        chosen = [data[s] for s in task.subjects]
    else:
        chosen = sorted(data.values(), key=lambda s: s.name)
    length = task.max_seq_len or max_positions
    subjects, questions = [], []
    for subject in chosen:
        examples = subject.dev[: task.shots]
        if len(examples) < task.shots:
            raise UserError(f"subject {subject.name} has {len(examples)} dev rows, {task.shots} shots asked",
                            where="eval.cmmlu.shots")
        rows = subject.test[: task.max_questions] if task.max_questions else subject.test
        for idx, row in enumerate(rows):
            q = Question(subject=subject.name, idx=idx, gold=str(row["answer"]))
            tokenize_question(q, subject.name_zh, examples, row, task, tokenizer, length,
                              templates.cmmlu_ppl_prompt, templates.cmmlu_gen_prompt)
            questions.append(q)
        category = categories_of(subject.name)[0]
        subjects.append({"name": subject.name, "name_zh": subject.name_zh, "category": category,
                         "slug": category_slug(category), "categories": list(categories_of(subject.name)),
                         "questions": len(rows)})
    return CevalSet(subjects=subjects, questions=questions, versions={m: prompt_version(m, task) for m in task.modes},
                    modes=list(task.modes), max_out_len=task.max_out_len, shots=task.shots)


def group_members(subjects: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Group slug -> its subjects present, in groups/cmmlu.py order, then 'average' (all of them)."""
    groups = {slug: [s["name"] for s in subjects if category in s["categories"]]
              for category, (slug, _) in CMMLU_GROUPS.items()}
    groups["average"] = [s["name"] for s in subjects]
    return {slug: members for slug, members in groups.items() if members}


class Cmmlu(MultipleChoiceTask):
    """CMMLU test questions in OpenCompass's PPL and 5-shot GEN modes (eval.cmmlu)."""

    name = "cmmlu"
    title = "CMMLU"
    section = "eval.cmmlu"
    scored_split = "test"
    metric_prefixes = ("cmmlu/",)
    predictions_field = PREDICTIONS
    length_hint = "eval.cmmlu.max_out_len / max_seq_len"

    def prepare(self, tokenizer: Any, positions: int) -> CevalSet:
        return prepare(self.task, read_cmmlu(self.task.path, self.task.subjects), tokenizer, positions)

    def metric_names(self, prepared: CevalSet) -> set[str]:
        groups = group_members(prepared.subjects)
        return {f"{PREFIX}/{mode}/{name}" for mode in prepared.modes
                for name in (*prepared.subject_names, *groups, "agreement")}

    def score_unit(self, engine: Engine, prepared: CevalSet, unit: str, tokenizer: Any,
                   progress: Progress | None = None) -> tuple[dict[str, Any], dict[str, float], Any]:
        mode, _, subject = unit.partition("/")
        if mode not in prepared.modes or subject not in prepared.subject_names:
            raise KeyError(unit)
        questions = [q for q in prepared.questions if q.subject == subject]
        fields, metrics, _ = self._score(engine, prepared, questions, [mode], tokenizer, progress)
        return fields, {f"{PREFIX}/{mode}/{subject}": metrics[f"{PREFIX}/{mode}/{subject}"]}, None

    def accuracies(self, prepared: CevalSet, mode: str, records: list[dict[str, Any]]) -> dict[str, float]:
        return accuracy_metrics(mode, prepared.subjects, records, PREFIX, group_members(prepared.subjects))

    def _score(self, engine: Engine, prepared: CevalSet, questions: list[Question], modes: list[str], tokenizer: Any,
               progress: Progress | None) -> tuple[dict[str, Any], dict[str, float], Any]:
        predictions, metrics = {}, {}
        for mode in modes:
            records = score_mode(engine, prepared, questions, mode, tokenizer, self.cfg.eval.batch_size, progress)
            predictions[mode] = records
            metrics.update(self.accuracies(prepared, mode, records))
        return {PREDICTIONS: predictions}, metrics, None

    def compare(self, prepared: CevalSet, base: dict[str, Any], base_ref: Any, rec: dict[str, Any], ref: Any) -> None:
        """cmmlu/<mode>/agreement against the baseline's per-question predictions."""
        base_preds = base.get(PREDICTIONS) or {}
        for mode, records in (rec.get(PREDICTIONS) or {}).items():
            base_records = base_preds.get(mode)
            if base_records is not None and [(r["subject"], r["idx"]) for r in base_records] == \
                    [(r["subject"], r["idx"]) for r in records]:
                rec["metrics"][f"{PREFIX}/{mode}/agreement"] = agreement(base_records, records)

    def summary_rows(self, prepared: CevalSet) -> list[dict[str, Any]]:
        """Each subject, then the groups (groups/cmmlu.py order, OpenCompass names; version '-'), then agreement."""
        per_subject = {s["name"]: s["questions"] for s in prepared.subjects}
        groups = group_members(prepared.subjects)
        datasets = {slug: dataset for slug, dataset in CMMLU_GROUPS.values()} | {"average": "cmmlu"}
        rows = []
        for mode in prepared.modes:
            rows += [{"dataset": f"cmmlu-{name}", "version": prepared.versions[mode], "metric": "accuracy", "mode": mode,
                      "name": f"{PREFIX}/{mode}/{name}", "n": count} for name, count in per_subject.items()]
            rows += [{"dataset": datasets[slug], "version": "-", "metric": "naive_average", "mode": mode,
                      "name": f"{PREFIX}/{mode}/{slug}", "n": sum(per_subject[m] for m in members)}
                     for slug, members in groups.items()]
            rows.append({"dataset": "cmmlu-agreement", "version": "-", "metric": "same_prediction_as_baseline",
                         "mode": mode, "name": f"{PREFIX}/{mode}/agreement", "n": len(prepared.questions)})
        return rows

    def intervals(self, prepared: CevalSet, engines: Any, baseline: str) -> dict[str, dict[str, dict]]:
        return mode_intervals(engines, baseline, PREDICTIONS, group_members(prepared.subjects), PREFIX)

    def notes(self, prepared: CevalSet) -> list[str]:
        truncated = sum(q.truncated for q in prepared.questions)
        return [f"{truncated} CMMLU question(s) had prompts longer than the limit (left-truncated)"] if truncated else []

    def results_fields(self, prepared: CevalSet) -> dict[str, Any]:
        return {"cmmlu": {"subjects": prepared.subjects, "groups": group_members(prepared.subjects),
                          "versions": prepared.versions}}
