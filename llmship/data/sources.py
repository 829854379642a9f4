"""Readers of the datasets llmship calibrates, evaluates and benchmarks on, in each dataset's official format.

Every reader takes a local file or folder, a Hugging Face hub dataset id (loaded with `datasets`), or "@embedded"
(the bundled sample of that kind under llmship/assets/samples/). Bad data raises UserError naming the file and
what was expected, never a bare KeyError/JSONDecodeError.

- C4: gzip (or plain) JSON lines `{"text","timestamp","url"}` (allenai/c4 shards, e.g. en/c4-validation.00000-of-00008.json.gz).
- alpaca-cleaned: one JSON list of `{"instruction","input","output"}` (yahma/alpaca-cleaned).
- C-Eval: `{dir}/{split}/{subject}_{split}.csv` + optional `subject_mapping.json` (else C-Eval's table, ceval_subjects.py) (ceval/ceval-exam layout), read as
  OpenCompass's `opencompass/datasets/ceval.py` does: csv.reader, header row = keys, missing explanation/answer = ''.
- ShareGPT V3: one JSON list of `{"id","conversations":[{"from","value"}]}`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmship.config import EMBEDDED, SAMPLES_DIR
from llmship.errors import UserError

CEVAL_HUB_ID = "ceval/ceval-exam"
CEVAL_COLUMNS = ("id", "question", "A", "B", "C", "D")  # must be present; answer/explanation may be missing (test split)
CEVAL_CATEGORIES = ("STEM", "Social Science", "Humanities", "Other")
CEVAL_LABELS = ("A", "B", "C", "D")
ALPACA_FIELDS = ("instruction", "input", "output")
C4_SUFFIXES = (".json.gz", ".jsonl.gz", ".json", ".jsonl")


def resolve(path: str | Path, kind: str) -> Path | str:
    """'@embedded' -> bundled sample folder of `kind`; an existing local path -> Path; anything else stays a hub id."""
    text = str(path)
    if text == EMBEDDED:
        return SAMPLES_DIR / kind
    local = Path(text).expanduser()
    if local.exists() or text.startswith((".", "/", "~")) or looks_like_file(text):
        return local
    return text


def data_fingerprint(path: str, kind: str) -> str:
    """Fingerprint of a dataset's local files ('@embedded' = the bundled sample; a hub id hashes as its name)."""
    from llmship.cache import folder_fingerprint

    source = resolve(path, kind)
    return folder_fingerprint(source) if isinstance(source, Path) and source.exists() else f"hub:{path}"


def looks_like_file(text: str) -> bool:
    return text.endswith((*C4_SUFFIXES, ".csv"))


def is_hub_id(path: Path | str) -> bool:
    return isinstance(path, str)


# Libraries that give their logger a stderr handler of its own and still pass every record on to the root logger.
HUB_LOGGERS = ("huggingface_hub", "datasets")


def hub_logs_once() -> None:
    """Each hub retry warning printed once: with a root handler in place (the CLI's), the handler that
    huggingface_hub and datasets add to their own loggers on import is dropped, since the root one prints the
    record too. Call after the libraries are imported."""
    if not logging.getLogger().handlers:
        return
    for name in HUB_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)


def hub_dataset(name: str, where: str, **kwargs: Any) -> Any:
    """datasets.load_dataset with the failure turned into one UserError line."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise UserError("reading a hub dataset needs the `datasets` package", where=where) from err
    hub_logs_once()
    try:
        return datasets.load_dataset(name, **kwargs)
    except Exception as err:  # noqa: BLE001 - the hub raises many types; the user needs one line
        raise UserError(f"cannot load hub dataset {name!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
                        where=where) from err


def files_in(folder: Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffixes))
    if not found:
        raise UserError(f"no {what} file ({', '.join(suffixes)}) in this folder", where=str(folder))
    return found


def require_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise UserError(f"not found (expected {what})", where=str(path))


def read_json(path: Path, what: str) -> Any:
    """A JSON document (optionally gzip-compressed), UserError on anything else."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return json.loads(raw.decode("utf-8"))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"not valid JSON (expected {what}): {err}", where=str(path)) from err


# --------------------------------------------------------------------------- C4
# allenai/c4 shards GPTQ reads (IST-DASLab/gptq datautils.get_c4): calibration windows from the first train shard,
# perplexity windows from the first validation shard, so a variant is never scored on text it was calibrated on.
C4_HUB_SHARDS = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}


def read_c4(path: str | Path, split: str = "validation") -> list[str]:
    """The `text` of every document of a C4 JSON-lines file (.json/.jsonl, optionally .gz) or of every such file in a folder.

    A folder whose file names carry a split (`c4-train*` / `c4-validation*`, as allenai/c4's `en/` and the bundled
    sample do) gives the files of `split` only, and is an error when it holds none of them; a folder of unnamed
    files, or a single file, is read whole whatever the split."""
    source = resolve(path, "c4")
    if is_hub_id(source):
        data = hub_dataset(str(source), str(path), data_files={split: C4_HUB_SHARDS[split]}, split=split)
        return [str(t) for t in data["text"]]
    require_exists(source, "a C4 .json/.json.gz file of JSON lines, or a folder of them")
    files = c4_split_files(files_in(source, C4_SUFFIXES, "C4 JSON lines"), split) if source.is_dir() else [source]
    texts: list[str] = []
    for file in files:
        texts.extend(c4_file_texts(file))
    return texts


def c4_split_files(files: list[Path], split: str) -> list[Path]:
    named = {name: [f for f in files if f"c4-{name}" in f.name] for name in C4_HUB_SHARDS}
    if not any(named.values()):
        return files
    if not named[split]:
        raise UserError(f"no c4-{split}* file in this folder (it holds another split only)", where=str(files[0].parent))
    return named[split]


def c4_file_texts(file: Path) -> list[str]:
    expected = 'gzip/plain JSON lines with a "text" field'
    try:
        raw = file.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        lines = raw.decode("utf-8").splitlines()
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as err:
        raise UserError(f"cannot read ({err}); expected {expected}", where=str(file)) from err
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"line {number} is not JSON ({err.msg}); expected {expected}", where=str(file)) from err
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise UserError(f'line {number} has no string "text" field; expected {expected}', where=str(file))
        texts.append(doc["text"])
    if not texts:
        raise UserError(f"no documents; expected {expected}", where=str(file))
    return texts


# --------------------------------------------------------------------------- alpaca
def read_alpaca(path: str | Path) -> list[dict[str, str]]:
    """alpaca-cleaned records as dicts with instruction/input/output (input may be '')."""
    source = resolve(path, "alpaca")
    if is_hub_id(source):
        data = hub_dataset(str(source), str(path), split="train")
        return [alpaca_record(dict(rec), i, str(path)) for i, rec in enumerate(data)]
    require_exists(source, "an alpaca JSON list file, or a folder holding one")
    file = files_in(source, (".json",), "alpaca JSON")[0] if source.is_dir() else source
    data = read_json(file, "a JSON list of {instruction, input, output}")
    if not isinstance(data, list):
        raise UserError(f"top level is {type(data).__name__}; expected a JSON list of {{instruction, input, output}}", where=str(file))
    if not data:
        raise UserError("empty list; expected alpaca records {instruction, input, output}", where=str(file))
    return [alpaca_record(rec, i, str(file)) for i, rec in enumerate(data)]


# alpaca-cleaned has one split. llmship holds every ALPACA_EVAL_EVERY-th record out (chosen by a hash of its text, so
# the choice survives reordering and duplicates land together): eval scores those, calibration draws from the rest.
ALPACA_EVAL_EVERY = 5


def alpaca_part(records: list[dict[str, str]], part: str) -> list[dict[str, str]]:
    """The records of `part` ('eval' or 'calibration'), in file order."""
    def held_out(rec: dict[str, str]) -> bool:
        text = "\x00".join((rec["instruction"], rec["input"], rec["output"]))
        return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % ALPACA_EVAL_EVERY == 0

    return [rec for rec in records if held_out(rec) == (part == "eval")]


def alpaca_record(rec: Any, index: int, where: str) -> dict[str, str]:
    if not isinstance(rec, dict):
        raise UserError(f"record {index} is {type(rec).__name__}; expected an object {{instruction, input, output}}", where=where)
    missing = [k for k in ("instruction", "output") if not isinstance(rec.get(k), str)]
    if missing:
        raise UserError(f"record {index} lacks string field(s) {', '.join(missing)}; expected {{instruction, input, output}}",
                        where=where)
    return {"instruction": rec["instruction"], "input": str(rec.get("input") or ""), "output": rec["output"]}


# --------------------------------------------------------------------------- C-Eval
@dataclass
class Subject:
    """One C-Eval subject: names, category, and its rows (dicts keyed by the CSV header, as OpenCompass reads them)."""

    name: str
    name_zh: str
    category: str
    dev: list[dict[str, str]] = field(default_factory=list)
    val: list[dict[str, str]] = field(default_factory=list)


@dataclass
class CevalData:
    source: str
    subjects: dict[str, Subject]

    @property
    def categories(self) -> list[str]:
        return sorted({s.category for s in self.subjects.values()})


def read_ceval(path: str | Path) -> CevalData:
    """A C-Eval folder (dev/ and val/ CSVs, optional subject_mapping.json), the hub id ceval/ceval-exam, or '@embedded'."""
    source = resolve(path, "ceval")
    if is_hub_id(source):
        return read_ceval_hub(str(source))
    require_exists(source, "a C-Eval folder with dev/ and val/ CSVs")
    if not source.is_dir():
        raise UserError("is a file; expected a C-Eval folder with dev/<subject>_dev.csv and val/<subject>_val.csv", where=str(source))
    mapping = read_subject_mapping(source / "subject_mapping.json")
    splits = {split: ceval_split_files(source, split) for split in ("dev", "val")}
    names = sorted(set(splits["dev"]) | set(splits["val"]))
    if not names:
        raise UserError("no dev/<subject>_dev.csv or val/<subject>_val.csv files; expected the C-Eval layout", where=str(source))
    subjects = {}
    for name in names:
        english, name_zh, category = subject_names(mapping, name, source / "subject_mapping.json")
        subjects[name] = Subject(name=name, name_zh=name_zh, category=category,
                                 dev=read_ceval_csv(splits["dev"][name]) if name in splits["dev"] else [],
                                 val=read_ceval_csv(splits["val"][name]) if name in splits["val"] else [])
    return CevalData(source=str(source), subjects=subjects)


def ceval_split_files(root: Path, split: str) -> dict[str, Path]:
    folder = root / split
    if not folder.is_dir():
        return {}
    suffix = f"_{split}.csv"
    return {p.name[: -len(suffix)]: p for p in sorted(folder.glob(f"*{suffix}"))}


def subject_names(mapping: dict[str, tuple[str, str, str]], subject: str, where: Path | str) -> tuple[str, str, str]:
    """(English name, Chinese name, category) of a subject: from subject_mapping.json, else C-Eval's own table (as
    OpenCompass has it). The prompt needs the Chinese name and the summary the category, so a guess would change
    the scores: a subject in neither is an error."""
    from llmship.data.ceval_subjects import CEVAL_SUBJECTS

    names = mapping.get(subject) or CEVAL_SUBJECTS.get(subject)
    if names is None:
        raise UserError(f"subject {subject!r} is not a C-Eval subject; add it to subject_mapping.json as "
                        "[English name, Chinese name, category]", where=str(where))
    return names


def read_subject_mapping(file: Path) -> dict[str, tuple[str, str, str]]:
    """subject -> (English name, Chinese name, category); {} when the file is absent (C-Eval's table applies)."""
    if not file.exists():
        return {}
    data = read_json(file, "subject_mapping.json: {subject: [English name, Chinese name, category]}")
    if not isinstance(data, dict):
        raise UserError("expected an object {subject: [English name, Chinese name, category]}", where=str(file))
    mapping = {}
    for name, value in data.items():
        if not (isinstance(value, list) and len(value) >= 3 and all(isinstance(v, str) for v in value[:3])):
            raise UserError(f"entry {name!r} is {value!r}; expected [English name, Chinese name, category]", where=str(file))
        if value[2] not in CEVAL_CATEGORIES:
            raise UserError(f"entry {name!r} has category {value[2]!r}; expected one of {', '.join(CEVAL_CATEGORIES)}",
                            where=str(file))
        mapping[name] = (value[0], value[1], value[2])
    return mapping


def read_ceval_csv(file: Path) -> list[dict[str, str]]:
    """Rows as OpenCompass's CEvalDataset reads them: csv.reader, first row = header, missing explanation/answer = ''."""
    try:
        with open(file, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read as UTF-8 CSV ({err})", where=str(file)) from err
    if not rows:
        raise UserError("empty file; expected a header id,question,A,B,C,D,answer[,explanation]", where=str(file))
    header = rows[0]
    missing = [c for c in CEVAL_COLUMNS if c not in header]
    if file.name.endswith(("_dev.csv", "_val.csv")) and "answer" not in header:
        missing.append("answer")  # dev and val carry the gold letter; only the test split leaves it out
    if missing:
        raise UserError(f"header lacks column(s) {', '.join(missing)}; expected id,question,A,B,C,D,answer[,explanation]",
                        where=str(file))
    out = []
    for number, values in enumerate(rows[1:], start=2):
        if not values:
            continue
        if len(values) != len(header):
            raise UserError(f"row at line {number} has {len(values)} fields; the header has {len(header)}", where=str(file))
        row = dict(zip(header, values, strict=True))
        row.setdefault("explanation", "")
        row.setdefault("answer", "")
        if row["answer"] and row["answer"].strip() not in CEVAL_LABELS:
            raise UserError(f"row at line {number} has answer {row['answer']!r}; expected one of A, B, C, D", where=str(file))
        out.append(row)
    if not out:
        raise UserError("no rows after the header", where=str(file))
    return out


def read_ceval_hub(name: str) -> CevalData:
    """ceval/ceval-exam on the hub: one config per subject with dev/val/test splits (same columns as the CSVs)."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover
        raise UserError("reading a hub dataset needs the `datasets` package", where=name) from err
    hub_logs_once()
    try:
        configs = datasets.get_dataset_config_names(name)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"cannot list the subjects of hub dataset {name!r} ({type(err).__name__})", where=name) from err
    mapping: dict[str, tuple[str, str, str]] = {}
    try:
        from huggingface_hub import hf_hub_download

        mapping = read_subject_mapping(Path(hf_hub_download(name, "subject_mapping.json", repo_type="dataset")))
    except Exception:  # noqa: BLE001 - optional: C-Eval's own table (ceval_subjects) names the 52 subjects
        mapping = {}
    subjects = {}
    for config in sorted(configs):
        data = hub_dataset(name, f"{name}:{config}", name=config)
        english, name_zh, category = subject_names(mapping, config, f"{name}: subject_mapping.json")
        split_rows = {}
        for split in ("dev", "val"):
            rows = [dict(r) for r in data[split]] if split in data else []
            for r in rows:
                r.setdefault("explanation", "")
                r.setdefault("answer", "")
                for key in list(r):
                    r[key] = "" if r[key] is None else str(r[key])
            split_rows[split] = rows
        subjects[config] = Subject(config, name_zh, category, dev=split_rows["dev"], val=split_rows["val"])
    if not subjects:
        raise UserError("no subject configs found", where=name)
    return CevalData(source=name, subjects=subjects)


# --------------------------------------------------------------------------- ShareGPT
def read_sharegpt(path: str | Path) -> list[dict[str, Any]]:
    """ShareGPT V3 entries {"id", "conversations": [{"from", "value"}]} (entries without conversations are dropped)."""
    source = resolve(path, "sharegpt")
    if is_hub_id(source):
        # anon8231489123/ShareGPT_Vicuna_unfiltered: the file vLLM's benchmark downloads.
        from huggingface_hub import hf_hub_download

        hub_logs_once()
        try:
            file = Path(hf_hub_download(str(source), "ShareGPT_V3_unfiltered_cleaned_split.json", repo_type="dataset"))
        except Exception as err:  # noqa: BLE001
            raise UserError(f"cannot download ShareGPT_V3_unfiltered_cleaned_split.json ({type(err).__name__})",
                            where=str(source)) from err
    else:
        require_exists(source, "a ShareGPT V3 JSON list file, or a folder holding one")
        file = files_in(source, (".json",), "ShareGPT JSON")[0] if source.is_dir() else source
    data = read_json(file, 'a JSON list of {"id", "conversations": [{"from", "value"}]}')
    if not isinstance(data, list):
        raise UserError(f'top level is {type(data).__name__}; expected a JSON list of {{"id", "conversations"}}', where=str(file))
    entries = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
            raise UserError(f'entry {index} has no "conversations" list', where=str(file))
        turns = entry["conversations"]
        if any(not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str) for t in turns):
            raise UserError(f'entry {index} has a turn without string "from"/"value"', where=str(file))
        if turns:
            entries.append({"id": str(entry.get("id", index)), "conversations": turns})
    if not entries:
        raise UserError("no conversations", where=str(file))
    return entries
