"""llmship's C-Eval against OpenCompass itself: prompts, token ids, PPL scores and predictions, question by question.

OpenCompass 0.5.4 needs transformers 4.x, llmship 5.x, so OpenCompass runs in its own virtual environment (never the
project's), driven through its own components (CEvalDataset, FixKRetriever, the templates of ceval_ppl_578f8d.py and
ceval_gen_5f30c7.py, PPLInferencer / GenInferencer, HuggingFaceBaseModel); llmship scores the same questions with the
PyTorch baseline and any compiled variant folders. Set-up, once:

    python -m venv /tmp/oc && /tmp/oc/bin/pip install torch==2.13.0 opencompass==0.5.4 transformers==4.57.6 pyarrow==19.0.1

    python scripts/ceval_vs_opencompass.py --opencompass-python /tmp/oc/bin/python --data ../shared/data/ceval \
        --subjects logic,marxism --questions 4 [--max-seq-len 1024] [--model DIR] [--variants OUT/fp32 ...]

Prints, per engine, how many questions have identical token ids, equal predictions and GEN outputs, and the largest
PPL score difference; exits 1 on any difference in ids or predictions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GEN_OUT_LEN = 8  # llmship's default eval.ceval.max_out_len, given to GenInferencer too

# Runs under the OpenCompass interpreter: argv = model, data, subjects, questions, max_seq_len|none, output JSON.
OPENCOMPASS_SIDE = r"""
import importlib, json, sys, tempfile
import torch
from opencompass.datasets import CEvalDataset
from opencompass.models import HuggingFaceBaseModel
from opencompass.openicl.icl_inferencer import GenInferencer, PPLInferencer
from opencompass.openicl.icl_prompt_template import PromptTemplate
from opencompass.openicl.icl_retriever import FixKRetriever

model_path, data, subjects, questions, max_seq_len, out, out_len = sys.argv[1:8]
max_seq_len = None if max_seq_len == "none" else int(max_seq_len)
model = HuggingFaceBaseModel(path=model_path, max_seq_len=max_seq_len, model_kwargs=dict(torch_dtype=torch.float32))
work = tempfile.mkdtemp()
result = {}
for mode, config in (("gen", "ceval_gen_5f30c7"), ("ppl", "ceval_ppl_578f8d")):
    datasets = importlib.import_module(f"opencompass.configs.datasets.ceval.{config}").ceval_datasets
    for subject in subjects.split(","):
        cfg = next(d for d in datasets if d["abbr"] == f"ceval-{subject}")
        dataset = CEvalDataset(reader_cfg={**cfg["reader_cfg"], "test_range": f"[0:{questions}]"}, path=data,
                               name=subject, local_mode=True)
        template = PromptTemplate(**{k: v for k, v in cfg["infer_cfg"]["ice_template"].items() if k != "type"})
        retriever = FixKRetriever(dataset, fix_id_list=[0, 1, 2, 3, 4])
        kind = GenInferencer if mode == "gen" else PPLInferencer
        extra = {"max_out_len": int(out_len)} if mode == "gen" else {}
        inferencer = kind(model=model, max_seq_len=max_seq_len, batch_size=1, output_json_filepath=work, **extra)
        name = f"{mode}-{subject}"
        inferencer.inference(retriever, ice_template=template, output_json_filepath=work, output_json_filename=name)
        stored = json.load(open(f"{work}/{name}"))

        def ids(text):
            return model.tokenizer(text, add_special_tokens=True, truncation=True, max_length=model.max_seq_len)["input_ids"]

        rows = []
        for key in sorted(stored, key=int):
            row = stored[key]
            if mode == "gen":
                rows.append({"ids": ids(row["origin_prompt"]), "prediction": row["prediction"]})
            else:
                labels = {lab: row[f"label: {lab}"] for lab in "ABCD"}
                rows.append({"ids": {lab: ids(v["prompt"]) for lab, v in labels.items()},
                             "scores": {lab: v["PPL"] for lab, v in labels.items()}, "prediction": row["prediction"]})
        result[name] = rows
json.dump(result, open(out, "w"), ensure_ascii=False)
"""


def with_test_split(data: Path, subjects: list[str], folder: Path) -> Path:
    """A copy of the subjects' dev and val CSVs plus val as the test split (OpenCompass's loader reads all three)."""
    for split in ("dev", "val", "test"):
        (folder / split).mkdir(parents=True)
    for subject in subjects:
        for split, source in (("dev", "dev"), ("val", "val"), ("test", "val")):
            shutil.copy(data / source / f"{subject}_{source}.csv", folder / split / f"{subject}_{split}.csv")
    return folder


def opencompass_results(python: str, model: Path, data: Path, subjects: list[str], questions: int,
                        max_seq_len: int | None, work: Path) -> dict:
    out = work / "opencompass.json"
    args = [str(model), str(with_test_split(data, subjects, work / "ceval")), ",".join(subjects), str(questions),
            str(max_seq_len or "none"), str(out), str(GEN_OUT_LEN)]
    subprocess.run([python, "-c", OPENCOMPASS_SIDE, *args], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.read_text(encoding="utf-8"))


def llmship_results(model: Path, data: Path, subjects: list[str], questions: int, max_seq_len: int | None,
                    variants: list[Path]) -> tuple[object, dict]:
    from llmship.artifact import max_positions
    from llmship.config import CevalTask, ModelConfig
    from llmship.data.sources import read_ceval
    from llmship.eval import ceval
    from llmship.runtime import load_engine
    from llmship.source import load_tokenizer

    source = ModelConfig(path=str(model))
    tokenizer = load_tokenizer(model)
    task = CevalTask(path=str(data), subjects=subjects, max_questions=questions, max_seq_len=max_seq_len,
                     max_out_len=GEN_OUT_LEN)
    cset = ceval.prepare(task, read_ceval(str(data)), tokenizer, max_positions(source, variants))
    engines = {}
    for name, spec in (("pytorch", source), *((str(v), v) for v in variants)):
        engine = load_engine(spec)
        engines[name] = ceval.score_engine(engine, cset, tokenizer, batch_size=1)["predictions"]
        engine.close()
    return cset, engines


def compare(reference: dict, cset: object, engines: dict, subjects: list[str]) -> bool:
    """Print the agreement figures; True when ids and predictions all agree."""
    index = {(q.subject, q.idx): q for q in cset.questions}
    ids_equal = {"gen": 0, "ppl": 0}
    agree = {name: {"gen_output": 0, "gen_pred": 0, "ppl_pred": 0, "ppl_max_score_diff": 0.0} for name in engines}
    total = 0
    for subject in subjects:
        for idx, (gen, ppl) in enumerate(zip(reference[f"gen-{subject}"], reference[f"ppl-{subject}"], strict=True)):
            q = index[(subject, idx)]
            total += 1
            ids_equal["gen"] += gen["ids"] == q.gen_ids
            ids_equal["ppl"] += all(ppl["ids"][lab] == q.ppl_ids[lab] for lab in "ABCD")
            for name, records in engines.items():
                g = next(r for r in records["gen"] if (r["subject"], r["idx"]) == (subject, idx))
                p = next(r for r in records["ppl"] if (r["subject"], r["idx"]) == (subject, idx))
                figures = agree[name]
                figures["gen_output"] += g["output"] == gen["prediction"]
                figures["ppl_pred"] += p["pred"] == ppl["prediction"]
                diff = max(abs(p["scores"][lab] - ppl["scores"][lab]) for lab in "ABCD")
                figures["ppl_max_score_diff"] = max(figures["ppl_max_score_diff"], diff)
    shots = sorted({q.gen_shots for q in cset.questions} | {k for q in cset.questions for k in q.ppl_shots.values()})
    print(f"{total} questions; identical token ids: GEN {ids_equal['gen']}, PPL (all four labels) {ids_equal['ppl']}; "
          f"examples kept: {shots}; truncated: {sum(q.truncated for q in cset.questions)}")
    for name, figures in agree.items():
        print(f"  {name}: GEN outputs equal {figures['gen_output']}/{total}, PPL predictions equal "
              f"{figures['ppl_pred']}/{total}, largest PPL score difference {figures['ppl_max_score_diff']:.2e}")
    return ids_equal["gen"] == ids_equal["ppl"] == total and all(
        f["gen_output"] == f["ppl_pred"] == total for f in agree.values())


def main() -> int:
    from llmship.config import EMBEDDED_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--opencompass-python", required=True, help="python of a venv with opencompass 0.5.4")
    parser.add_argument("--data", type=Path, required=True, help="C-Eval folder (dev/, val/)")
    parser.add_argument("--subjects", required=True, help="comma-separated subjects")
    parser.add_argument("--questions", type=int, default=4, help="val questions per subject")
    parser.add_argument("--max-seq-len", type=int, default=None, help="OpenCompass's max_seq_len (default: none)")
    parser.add_argument("--model", type=Path, default=EMBEDDED_MODEL_DIR, help="Hugging Face folder (default: bundled)")
    parser.add_argument("--variants", type=Path, nargs="*", default=[], help="compiled llmship folders to score too")
    args = parser.parse_args()
    subjects = args.subjects.split(",")
    with tempfile.TemporaryDirectory() as work:
        reference = opencompass_results(args.opencompass_python, args.model.resolve(), args.data.resolve(), subjects,
                                        args.questions, args.max_seq_len, Path(work))
    cset, engines = llmship_results(args.model, args.data, subjects, args.questions, args.max_seq_len, args.variants)
    return 0 if compare(reference, cset, engines, subjects) else 1


if __name__ == "__main__":
    sys.exit(main())
