"""C-Eval scored as OpenCompass scores a Hugging Face base model (METHODS.md (a)).

PPL mode: one prompt per candidate letter, score = sum of token cross-entropies / number of tokens
(BOS included in the count, `get_ppl`), prediction = the letter with the lowest score (first of A-D on
ties). GEN mode: greedy generation of `max_out_len` tokens, prediction = first upper-case character
(`first_capital_postprocess`). Accuracy x100 per subject; categories, the hard set and the average are
unweighted means of the subjects present.

Deviations from OpenCompass, all without effect on predictions in exact arithmetic:
- Shared prefix: the four PPL prompts of a question differ only in the last token (the letter), so the
  common prefix is run once and each letter's last-token loss is read from the prefix's last logits
  (`SHARED_PREFIX`). Prompts whose candidates differ in more than the last token are scored in full.
- Padding: batches are left-padded but pad positions never enter a loss. OpenCompass adds the loss of
  predicting BOS after the pads of a padded row (a quirk that depends on the batch's pad count, <= 0.04
  nats, same predictions per METHODS.md); scores here equal OpenCompass with batch size 1.
- Over-long prompts, as OpenCompass: with `eval.ceval.max_seq_len` unset (OpenCompass's base configs) every
  example is kept and BOS + the last max_positions - 1 tokens are scored or generated from (the tokenizer's
  left truncation at the model's max length); with it set, in-context examples are dropped from the end while
  the prompt (BOS included) has more than max_seq_len tokens (PPL: labels A-D in turn, a question's reduced
  count carries over to the later labels), then prompts are left-truncated at max_seq_len. GEN mode generates
  `max_out_len` tokens past that length, beyond max_position_embeddings when the prompt fills it: LLaMA's
  rotary embedding is a function of the position, PyTorch computes it, fused ONNX graphs carry cos/sin tables
  of twice max positions (llmship.export.fusion.ROTARY_TABLE_FACTOR).
- Groups over a subset: OpenCompass marks a group with a missing subject as an error; here a group is the
  mean of its subjects that are present, and `results.json` records how many that was.

Deviations that can change a GEN prediction:
- Generated length: `eval.ceval.max_out_len` defaults to 8 new tokens (OpenCompass: 256 from its CLI, 1024 in
  hf_llama2_7b.py); both stop at EOS. A prediction differs only when the first capital letter comes after the 8th
  token; raise max_out_len to reproduce OpenCompass exactly.
- "First capital letter" is OpenCompass's `first_capital_postprocess`: the first character for which str.isupper()
  holds, in any script, not only A-D (an answer "Answer: B" is predicted as "A" there too).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from llmship.config import CevalTask, Config
from llmship.data import templates
from llmship.data.sources import read_ceval
from llmship.errors import UserError
from llmship.eval.intervals import ceval_intervals
from llmship.eval.lm import sequence_logprobs
from llmship.eval.tasks import DataInput, EvalTask, Progress, counter, cumulative
from llmship.runtime.base import Engine

LABELS = templates.CEVAL_LABELS
# opencompass/configs/summarizers/groups/ceval.py: the 8-subject hard set.
HARD_SUBJECTS = ("advanced_mathematics", "discrete_mathematics", "probability_and_statistics", "college_chemistry",
                 "college_physics", "high_school_mathematics", "high_school_chemistry", "high_school_physics")
# Summary row order of the groups (OpenCompass summarizer order), keyed by our metric suffix.
GROUP_ROWS = (("stem", "ceval-stem"), ("social-science", "ceval-social-science"), ("humanities", "ceval-humanities"),
              ("other", "ceval-other"), ("hard", "ceval-hard"), ("average", "ceval"))
SHARED_PREFIX = True


def category_slug(category: str) -> str:
    """'Social Science' -> 'social-science' (OpenCompass group abbreviations)."""
    return re.sub(r"[^a-z0-9]+", "-", category.strip().lower()).strip("-")


def first_capital_postprocess(text: str) -> str | None:
    """opencompass/utils/text_postprocessors.py: the first character with str.isupper(), else None."""
    for char in text:
        if char.isupper():
            return char
    return None


def truncate_left(ids: list[int], max_len: int) -> list[int]:
    """BOS + the last max_len - 1 tokens (left truncation keeps the special first token)."""
    if len(ids) <= max_len:
        return ids
    return [ids[0], *ids[len(ids) - max_len + 1:]]


@dataclass
class Question:
    subject: str
    idx: int
    gold: str
    ppl_ids: dict[str, list[int]] = field(default_factory=dict)
    gen_ids: list[int] = field(default_factory=list)
    truncated: bool = False
    ppl_shots: dict[str, int] = field(default_factory=dict)  # in-context examples kept in each label's prompt
    gen_shots: int = 0


@dataclass
class CevalSet:
    """Tokenized prompts of every scored question, shared by all engines of a run."""

    subjects: list[dict[str, Any]]  # name, name_zh, category, slug, questions (count)
    questions: list[Question]
    versions: dict[str, str]
    modes: list[str]
    max_out_len: int
    shots: int = 0  # in-context examples asked (a question's prompts keep fewer when max_seq_len drops some)

    @property
    def positions_needed(self) -> int:
        """Positions an engine must run: the longest PPL prompt, the longest GEN prompt plus the tokens fed back."""
        needed = [len(ids) for q in self.questions for ids in q.ppl_ids.values()]
        needed += [len(q.gen_ids) + self.max_out_len - 1 for q in self.questions if q.gen_ids]
        return max(needed, default=0)

    @property
    def subject_names(self) -> list[str]:
        return [s["name"] for s in self.subjects]


def prompt_version(mode: str, task: CevalTask) -> str:
    """First 6 hex of a SHA-256 over the prompt template and its inference settings (as OpenCompass's
    `get_prompt_hash`, but of llmship's own description of the template, so the digits differ)."""
    placeholder = {"question": "{question}", "A": "{A}", "B": "{B}", "C": "{C}", "D": "{D}", "answer": "{answer}"}
    examples = [dict(placeholder, answer=label) for label in LABELS[: task.shots]] if task.shots else []
    if mode == "ppl":
        template: Any = {label: templates.ceval_ppl_prompt("{subject_zh}", examples, placeholder, label) for label in LABELS}
        infer: dict[str, Any] = {"inferencer": "PPLInferencer", "score": "sum_ce_over_tokens_incl_bos"}
    else:
        template = templates.ceval_gen_prompt("{subject_zh}", examples, placeholder)
        infer = {"inferencer": "GenInferencer", "max_out_len": task.max_out_len, "postprocess": "first_capital"}
    if task.max_seq_len is not None:  # absent by default, so versions of earlier runs stay as they were
        infer["max_seq_len"] = task.max_seq_len
    blob = json.dumps({"template": template, "shots": task.shots, "retriever": "FixKRetriever", **infer}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:6]


def prepare(task: CevalTask, data: Any, tokenizer: Any, max_positions: int) -> CevalSet:
    """Pick subjects and questions, build and tokenize every prompt once."""
    subjects_in = data.subjects.values() if isinstance(data.subjects, dict) else data.subjects
    available = {s.name: s for s in subjects_in if s.val}
    if task.subjects is not None:
        unknown = [s for s in task.subjects if s not in available]
        if unknown:
            raise UserError(f"subject(s) {', '.join(unknown)} not in the C-Eval data (val split); present: "
                            f"{', '.join(sorted(available)) or 'none'}", where="eval.ceval.subjects")
        chosen = [available[s] for s in task.subjects]
    else:
        chosen = sorted(available.values(), key=lambda s: s.name)
    if not chosen:
        raise UserError("the C-Eval data has no subject with val questions", where="eval.ceval.path")
    # OpenCompass truncates at the model's max_seq_len: the configured one, else max_position_embeddings.
    length = task.max_seq_len or max_positions
    subjects, questions = [], []
    for subject in chosen:
        examples = list(subject.dev[: task.shots])
        if len(examples) < task.shots:
            raise UserError(f"subject {subject.name} has {len(examples)} dev rows, {task.shots} shots asked",
                            where="eval.ceval.shots")
        rows = list(subject.val[: task.max_questions] if task.max_questions else subject.val)
        for idx, row in enumerate(rows):
            q = Question(subject=subject.name, idx=idx, gold=str(row.get("answer", "")).strip())
            tokenize_question(q, subject.name_zh, examples, row, task, tokenizer, length)
            questions.append(q)
        subjects.append({"name": subject.name, "name_zh": subject.name_zh, "category": subject.category,
                         "slug": category_slug(subject.category), "questions": len(rows)})
    versions = {mode: prompt_version(mode, task) for mode in task.modes}
    return CevalSet(subjects=subjects, questions=questions, versions=versions, modes=list(task.modes),
                    max_out_len=task.max_out_len, shots=task.shots)


def tokenize_question(q: Question, name_zh: str, examples: Sequence[Any], row: Any, task: Any, tokenizer: Any,
                      length: int, ppl_template: Callable[..., str] = templates.ceval_ppl_prompt,
                      gen_template: Callable[..., str] = templates.ceval_gen_prompt) -> None:
    """Fill q's prompts of every mode: examples dropped to fit max_seq_len (when set), then left-truncated at `length`.
    `task`: a multiple-choice section (modes, shots, max_seq_len); the templates render (name_zh, examples, row[, label])."""
    if "ppl" in task.modes:
        shots = task.shots
        for label in LABELS:  # in turn: a count reduced for one label carries over to the next

            def ppl_prompt(k: int, label: str = label) -> list[int]:
                return encode(tokenizer, ppl_template(name_zh, examples[:k], row, label))

            ids, shots = fit_examples(ppl_prompt, shots, task.max_seq_len)
            q.truncated |= len(ids) > length
            q.ppl_ids[label], q.ppl_shots[label] = truncate_left(ids, length), shots
    if "gen" in task.modes:

        def gen_prompt(k: int) -> list[int]:
            return encode(tokenizer, gen_template(name_zh, examples[:k], row))

        ids, q.gen_shots = fit_examples(gen_prompt, task.shots, task.max_seq_len)
        q.truncated |= len(ids) > length
        q.gen_ids = truncate_left(ids, length)


def fit_examples(build: Callable[[int], list[int]], shots: int, max_seq_len: int | None) -> tuple[list[int], int]:
    """(token ids, examples kept) of the prompt `build(k)` builds with k examples: OpenCompass's PPL and GEN
    inferencers with max_seq_len set drop the last example while k > 0 and the prompt, BOS included, has more than
    max_seq_len tokens (opencompass/openicl/icl_inferencer/icl_{ppl,gen}_inferencer.py)."""
    ids = build(shots)
    while max_seq_len is not None and shots > 0 and len(ids) > max_seq_len:
        shots -= 1
        ids = build(shots)
    return ids, shots


def encode(tokenizer: Any, text: str) -> list[int]:
    """add_special_tokens=True as OpenCompass's HuggingFaceBaseModel: the BOS is fed, scored and counted."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


# --------------------------------------------------------------------------- PPL mode
def ppl_scores(engine: Engine, questions: Sequence[Question], batch_size: int,
               on_batch: Callable[[int], None] | None = None) -> list[dict[str, float]]:
    """Per question, letter -> mean cross-entropy over the prompt's tokens (BOS counted in the divisor)."""
    sequences: list[list[int]] = []
    tails: list[list[int]] = []
    plans: list[tuple[str, Any]] = []
    for q in questions:
        cands = [q.ppl_ids[label] for label in LABELS]
        prefix = _common_prefix(cands)
        if SHARED_PREFIX and prefix >= 1 and all(len(c) == prefix + 1 for c in cands):
            plans.append(("shared", len(sequences)))
            sequences.append(cands[0][:prefix])
            tails.append([c[-1] for c in cands])
        else:
            plans.append(("full", len(sequences)))
            for c in cands:
                sequences.append(c)
                tails.append([])
    own, tail = sequence_logprobs(engine, sequences, batch_size, tails, on_batch=on_batch)
    scores = []
    for q, (kind, first) in zip(questions, plans, strict=True):
        if kind == "shared":
            prefix_sum = float(own[first].sum())
            n = len(sequences[first]) + 1
            scores.append({label: -(prefix_sum + float(tail[first][k])) / n for k, label in enumerate(LABELS)})
        else:
            scores.append({label: -float(own[first + k].sum()) / len(q.ppl_ids[label]) for k, label in enumerate(LABELS)})
    return scores


def ppl_units(questions: Sequence[Question]) -> int:
    """Sequences `ppl_scores` runs (for progress bars)."""
    total = 0
    for q in questions:
        cands = [q.ppl_ids[label] for label in LABELS]
        prefix = _common_prefix(cands)
        total += 1 if SHARED_PREFIX and prefix >= 1 and all(len(c) == prefix + 1 for c in cands) else len(cands)
    return total


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        tok = seqs[0][i]
        if any(s[i] != tok for s in seqs[1:]):
            return i
    return n


def argmin_label(scores: dict[str, float]) -> str:
    """Lowest score; ties go to the first of A-D (np.argmin / list.index order in OpenCompass)."""
    values = [scores[label] for label in LABELS]
    return LABELS[int(np.argmin(values))]


# --------------------------------------------------------------------------- GEN mode
def gen_outputs(engine: Engine, questions: Sequence[Question], max_out_len: int, batch_size: int, tokenizer: Any,
                on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy continuation of each GEN prompt, decoded with skip_special_tokens=True."""
    from llmship.eval.lm import batches

    texts = [""] * len(questions)
    for group in batches([len(q.gen_ids) for q in questions], batch_size):
        outs = engine.generate([questions[i].gen_ids for i in group], max_out_len)
        for i, out in zip(group, outs, strict=True):
            texts[i] = tokenizer.decode(out, skip_special_tokens=True)
        if on_batch is not None:
            on_batch(len(group))
    return texts


# --------------------------------------------------------------------------- scoring
def score_engine(engine: Engine, cset: CevalSet, tokenizer: Any, batch_size: int,
                 progress: Progress | None = None, subjects: Sequence[str] | None = None,
                 modes: Sequence[str] | None = None) -> dict[str, Any]:
    """Predictions and accuracies of one engine in every configured mode (or the given subjects and modes)."""
    out: dict[str, Any] = {"metrics": {}, "predictions": {}}
    questions = [q for q in cset.questions if subjects is None or q.subject in subjects]
    for mode in modes or cset.modes:
        records = score_mode(engine, cset, questions, mode, tokenizer, batch_size, progress)
        out["predictions"][mode] = records
        out["metrics"].update(accuracy_metrics(mode, cset.subjects, records))
    return out


def score_mode(engine: Engine, cset: CevalSet, questions: Sequence[Question], mode: str, tokenizer: Any,
               batch_size: int, progress: Progress | None) -> list[dict[str, Any]]:
    """One engine's prediction record of every question in one mode."""
    total = ppl_units(questions) if mode == "ppl" else len(questions)
    step = counter(progress, f"ceval {mode}", total)
    if mode == "ppl":
        scores = ppl_scores(engine, questions, batch_size, on_batch=step)
        preds: list[dict[str, Any]] = [{"pred": argmin_label(s), "scores": {k: round(v, 6) for k, v in s.items()}}
                                       for s in scores]
    else:
        texts = gen_outputs(engine, questions, cset.max_out_len, batch_size, tokenizer, on_batch=step)
        preds = [{"pred": first_capital_postprocess(t), "output": t} for t in texts]
    records = []
    for q, p in zip(questions, preds, strict=True):
        shots = q.ppl_shots if mode == "ppl" else q.gen_shots
        dropped = min(shots.values()) < cset.shots if mode == "ppl" else shots < cset.shots
        records.append({"subject": q.subject, "idx": q.idx, "gold": q.gold, **p,
                        "correct": str(p["pred"]) == q.gold, **({"truncated": True} if q.truncated else {}),
                        **({"shots": shots} if dropped else {})})
    return records


def accuracy_metrics(mode: str, subjects: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]],
                     prefix: str = "ceval", groups: dict[str, list[str]] | None = None) -> dict[str, float]:
    """<prefix>/<mode>/<subject> (x100) and the groups as unweighted means of the subjects present."""
    per_subject: dict[str, list[bool]] = {s["name"]: [] for s in subjects}
    for r in records:
        per_subject[r["subject"]].append(bool(r["correct"]))
    acc = {name: 100.0 * float(np.mean(hits)) for name, hits in per_subject.items() if hits}
    metrics = {f"{prefix}/{mode}/{name}": value for name, value in acc.items()}
    for slug, members in (group_members(subjects) if groups is None else groups).items():
        present = [acc[m] for m in members if m in acc]
        if present:
            metrics[f"{prefix}/{mode}/{slug}"] = float(np.mean(present))
    return metrics


def group_members(subjects: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Category slug -> subjects, plus 'hard' and 'average' (all subjects), from the data's own categories."""
    groups: dict[str, list[str]] = {}
    for s in subjects:
        groups.setdefault(s["slug"], []).append(s["name"])
    groups["hard"] = [s["name"] for s in subjects if s["name"] in HARD_SUBJECTS]
    groups["average"] = [s["name"] for s in subjects]
    return {k: v for k, v in groups.items() if v}


def agreement(base_records: Sequence[dict], records: Sequence[dict]) -> float:
    """% of questions where the variant predicts what the baseline predicts."""
    same = [a["pred"] == b["pred"] for a, b in zip(base_records, records, strict=True)]
    return 100.0 * float(np.mean(same)) if same else float("nan")


def metric_names(cset: CevalSet) -> list[str]:
    names = []
    for mode in cset.modes:
        names += [f"ceval/{mode}/{s}" for s in cset.subject_names]
        names += [f"ceval/{mode}/{g}" for g in group_members(cset.subjects)]
        names.append(f"ceval/{mode}/agreement")
    return names


def summary_rows(cset: CevalSet) -> list[dict[str, Any]]:
    """OpenCompass summary rows: each subject (accuracy), then the groups (naive_average, version '-')."""
    rows = []
    groups = group_members(cset.subjects)
    for mode in cset.modes:
        for name in cset.subject_names:
            rows.append({"dataset": f"ceval-{name}", "version": cset.versions[mode], "metric": "accuracy", "mode": mode,
                         "name": f"ceval/{mode}/{name}"})
        known = {slug for slug, _ in GROUP_ROWS}
        extra = [(slug, f"ceval-{slug}") for slug in groups if slug not in known]
        for slug, dataset in (*GROUP_ROWS[:4], *extra, *GROUP_ROWS[4:]):
            if slug in groups:
                rows.append({"dataset": dataset, "version": "-", "metric": "naive_average", "mode": mode,
                             "name": f"ceval/{mode}/{slug}"})
        rows.append({"dataset": "ceval-agreement", "version": "-", "metric": "same_prediction_as_baseline", "mode": mode,
                     "name": f"ceval/{mode}/agreement"})
    return rows


# --------------------------------------------------------------------------- the tasks
class MultipleChoiceTask(EvalTask):
    """What C-Eval and CMMLU share: the section `eval.<name>` (path, modes, shots, subjects, max_out_len), a folder of
    per-subject CSVs whose `scored_split` is asked with dev examples, and units of one mode and subject."""

    scored_split: ClassVar[str]

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.task = getattr(cfg.eval, self.name)

    @classmethod
    def enabled(cls, cfg: Config) -> bool:
        return getattr(cfg.eval, cls.name).enabled

    def settings(self) -> Any:
        return self.task.model_dump()

    def data_inputs(self) -> list[DataInput]:
        splits = (self.scored_split, "dev") if self.task.shots > 0 else (self.scored_split,)
        subjects = tuple(self.task.subjects) if self.task.subjects else None
        return [DataInput(f"{self.section}.path", self.name, self.task.path, splits, subjects)]

    def length_problems(self, positions: int) -> list[str]:
        if "gen" in self.task.modes and self.task.max_out_len >= positions:
            return [f"{self.section}.max_out_len: max_out_len {self.task.max_out_len} leaves no room for a prompt "
                    f"in {positions} positions"]
        return []

    def positions_needed(self, prepared: CevalSet) -> int:
        return prepared.positions_needed

    def units(self, prepared: CevalSet) -> list[str]:
        """One per mode and subject: '<mode>/<subject>'."""
        return [f"{mode}/{name}" for mode in prepared.modes for name in prepared.subject_names]

    predictions_field: ClassVar[str] = "predictions"  # the engine record's field: {mode: per-question records}

    def score(self, engine: Engine, prepared: CevalSet, tokenizer: Any, progress: Progress | None,
              ) -> tuple[dict[str, Any], dict[str, float], Any]:
        """Unit by unit, then merged: batches never span two subjects, so a cluster run, which scores the units
        apart, forms the same batches and gets the same answers bit for bit."""
        step = cumulative(progress)
        parts = [self.score_unit(engine, prepared, unit, tokenizer, step) for unit in self.units(prepared)]
        return self.merge_units(prepared, parts)

    def merge_units(self, prepared: CevalSet, parts: list[tuple[dict[str, Any], dict[str, float], Any]],
                    ) -> tuple[dict[str, Any], dict[str, float], Any]:
        """Each mode's records in question order and its accuracies (subjects, groups) recomputed from them."""
        order = {(q.subject, q.idx): i for i, q in enumerate(prepared.questions)}
        by_mode: dict[str, list[dict[str, Any]]] = {mode: [] for mode in prepared.modes}
        for fields, _, _ in parts:
            for mode, records in fields[self.predictions_field].items():
                by_mode[mode].extend(records)
        predictions, metrics = {}, {}
        for mode, records in by_mode.items():
            predictions[mode] = sorted(records, key=lambda r: order[(r["subject"], r["idx"])])
            metrics.update(self.accuracies(prepared, mode, predictions[mode]))
        return {self.predictions_field: predictions}, metrics, None

    def accuracies(self, prepared: CevalSet, mode: str, records: list[dict[str, Any]]) -> dict[str, float]:
        """One mode's subject and group accuracies, as `score` computes them."""
        return accuracy_metrics(mode, prepared.subjects, records)


class Ceval(MultipleChoiceTask):
    """C-Eval val questions in OpenCompass's PPL and GEN modes (eval.ceval)."""

    name = "ceval"
    title = "C-Eval"
    section = "eval.ceval"
    scored_split = "val"
    metric_prefixes = ("ceval/",)
    length_hint = "eval.ceval.max_out_len / max_seq_len"

    def prepare(self, tokenizer: Any, positions: int) -> CevalSet:
        return prepare(self.task, read_ceval(self.task.path), tokenizer, positions)

    def metric_names(self, prepared: CevalSet) -> set[str]:
        return set(metric_names(prepared))

    def score_unit(self, engine: Engine, prepared: CevalSet, unit: str, tokenizer: Any,
                   progress: Progress | None = None) -> tuple[dict[str, Any], dict[str, float], Any]:
        mode, _, subject = unit.partition("/")
        if mode not in prepared.modes or subject not in prepared.subject_names:
            raise KeyError(unit)
        scored = score_engine(engine, prepared, tokenizer, self.cfg.eval.batch_size, progress, [subject], [mode])
        own = {f"ceval/{mode}/{subject}": scored["metrics"][f"ceval/{mode}/{subject}"]}
        return {"predictions": scored["predictions"]}, own, None

    def compare(self, prepared: CevalSet, base: dict[str, Any], base_ref: Any, rec: dict[str, Any], ref: Any) -> None:
        """ceval/<mode>/agreement against the baseline's per-question predictions."""
        base_preds = base.get("predictions") or {}
        for mode, records in (rec.get("predictions") or {}).items():
            base_records = base_preds.get(mode)
            if base_records is not None and _keys(base_records) == _keys(records):
                rec["metrics"][f"ceval/{mode}/agreement"] = agreement(base_records, records)

    def summary_rows(self, prepared: CevalSet) -> list[dict[str, Any]]:
        per_subject = {s["name"]: s["questions"] for s in prepared.subjects}
        groups = group_members(prepared.subjects)
        rows = summary_rows(prepared)
        for row in rows:
            _, _, which = row["name"].split("/", 2)
            row["n"] = (len(prepared.questions) if which == "agreement" else per_subject[which]
                        if which in per_subject else sum(per_subject[m] for m in groups[which]))
        return rows

    def intervals(self, prepared: CevalSet, engines: Any, baseline: str) -> dict[str, dict[str, dict]]:
        return mode_intervals(engines, baseline, "predictions", group_members(prepared.subjects))

    def notes(self, prepared: CevalSet) -> list[str]:
        notes = []
        truncated = sum(q.truncated for q in prepared.questions)
        if truncated:
            limit = f"max_seq_len {self.task.max_seq_len}" if self.task.max_seq_len else "the model's positions"
            notes.append(f"{truncated} C-Eval question(s) had prompts longer than {limit} (left-truncated)")
        dropped = sum(min(q.ppl_shots.values(), default=prepared.shots) < prepared.shots or
                      (bool(q.gen_ids) and q.gen_shots < prepared.shots) for q in prepared.questions)
        if dropped:
            notes.append(f"{dropped} C-Eval question(s) kept fewer than {prepared.shots} examples to fit max_seq_len "
                         f"{self.task.max_seq_len}")
        return notes

    def results_fields(self, prepared: CevalSet) -> dict[str, Any]:
        return {"subjects": prepared.subjects, "groups": group_members(prepared.subjects),
                "versions": prepared.versions}


def _keys(records: Sequence[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(r["subject"], r["idx"]) for r in records]


def mode_intervals(engines: Any, baseline: str, field_name: str, groups: dict[str, list[str]],
                   prefix: str = "ceval") -> dict[str, dict[str, dict]]:
    """Paired intervals of every mode's subject, group and agreement metrics, from the per-question records each
    engine holds under `field_name` ({mode: records})."""
    variants = {name: rec for name, rec in engines.items() if name != baseline}
    out: dict[str, dict[str, dict]] = {name: {} for name in variants}
    for mode, base_records in ((engines.get(baseline) or {}).get(field_name) or {}).items():
        per_mode = {name: (rec.get(field_name) or {}).get(mode) for name, rec in variants.items()}
        found = ceval_intervals(mode, groups, base_records, {n: r for n, r in per_mode.items() if r is not None},
                                prefix=prefix)
        for name, metrics in found.items():
            out[name].update(metrics)
    return out
