"""Preflight: before any expensive step, every input the requested verb will read is resolved and checked.

Local files must exist and parse their header (the model folder's config.json, weights index and safetensors
headers, the tokenizer, the adapter, each data file of the schemes and tasks that will run); hub ids must be
reachable, or the one error lists every field to point at local files; the execution provider must be present;
lengths must fit the model's positions. Every problem found is reported in one line, so a user fixes them in one
go instead of meeting them one per run. `check(cfg, verb)` returns the plan (what is read from where) that
`llmship check` prints.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from llmship.config import ASSETS_DIR, EMBEDDED, Config
from llmship.errors import UserError
from llmship.files import MANIFEST_FILE
from llmship.quantize.registry import Variant

log = logging.getLogger("llmship")

VERBS = ("compile", "eval", "bench", "run")
# Seconds one hub metadata request may take; the libraries' own downloads retry five times with backoff (31 s when
# the hub is unreachable), a preflight asks once.
HUB_TIMEOUT_S = 10.0
# Bytes read from the head of a JSON list file (alpaca, ShareGPT) to parse its first record: the full files are
# large (ShareGPT V3: 640 MB) and are read whole only by the stage that uses them.
HEAD_BYTES = 1 << 20
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass
class Source:
    """One input a verb reads: the config field naming it, what it is, where it resolves, what was checked."""

    field: str
    kind: str
    location: str
    checked: str
    reader: str


@dataclass
class HubRef:
    field: str
    repo_id: str
    repo_type: str  # "model" or "dataset"
    reader: str
    revision: str | None = None


@dataclass
class Plan:
    """What `verb` will read, and the inputs it will not read (with why)."""

    verb: str
    sources: list[Source] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    hub: list[HubRef] = field(default_factory=list)
    max_positions: int | None = None

    def add(self, field_name: str, kind: str, location: str, checked: str, reader: str) -> None:
        self.sources.append(Source(field_name, kind, location, checked, reader))


# --------------------------------------------------------------------------- entry point
def check(cfg: Config, verb: str, variants: list[Variant]) -> Plan:
    """Resolve and check every input of `verb` (`variants`: the config's, resolved); UserError listing every problem
    found (exit 2)."""
    plan = Plan(verb)
    reads_compile = verb in ("compile", "run")
    reads_eval = verb in ("eval", "run")
    reads_bench = verb in ("bench", "run")
    _check_provider(cfg, plan)
    _check_cluster(cfg, plan)
    if reads_compile or reads_eval or (reads_bench and cfg.bench.baseline):
        _guard(plan, _check_model, cfg, plan)
    if verb in ("eval", "bench"):
        _guard(plan, _check_compiled, cfg, variants, plan)
    if reads_compile:
        _guard(plan, _check_calibration, cfg, variants, plan)
    if reads_eval:
        _guard(plan, _check_eval, cfg, plan)
    if reads_bench:
        _guard(plan, _check_bench, cfg, plan)
    eval_baseline, bench_baseline = reads_eval and not cfg.gate.baseline_json, reads_bench and cfg.bench.baseline
    if eval_baseline or bench_baseline:
        _guard(plan, _check_baseline, cfg, plan, eval_baseline, bench_baseline)
    _check_hub(plan)
    if plan.problems:
        problems = list(dict.fromkeys(plan.problems))
        if len(problems) == 1:
            raise UserError(problems[0])
        raise UserError(f"{len(problems)} problems: " + "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1)))
    return plan


def _guard(plan: Plan, step: Any, *args: Any) -> None:
    """Run one group of checks; a UserError is recorded so that the other groups still run."""
    try:
        step(*args)
    except UserError as exc:
        plan.problems.append(str(exc))


def _local(value: str) -> Path | None:
    """A local path, or None for a hub id (same rule as the readers: existing, or written as a path)."""
    from llmship.data.sources import looks_like_file

    path = Path(value).expanduser()
    if path.exists() or value.startswith((".", "/", "~")) or value.count("/") > 1 or looks_like_file(value):
        return path
    return None


# --------------------------------------------------------------------------- runtime
def _check_cluster(cfg: Config, plan: Plan) -> None:
    """cluster.backend: ray needs Ray installed (checked without importing it); the nodes are probed at the start of
    the fan-out (llmship.cluster.probe_nodes), when the cluster is reached."""
    from llmship.cluster import MISSING, ray_version

    if cfg.cluster.backend != "ray":
        return
    version = ray_version()
    if version is None:
        plan.problems.append(f"cluster.backend: {MISSING}")
    else:
        plan.add("cluster.backend", "Ray cluster", cfg.cluster.address or "started on this machine", f"ray {version}",
                 "compile variants, eval units" + (", bench runs" if cfg.cluster.bench_resource else ""))


def _check_provider(cfg: Config, plan: Plan) -> None:
    import onnxruntime as ort

    from llmship.runtime.providers import missing_provider, provider

    problem = missing_provider(cfg.runtime.provider)
    if problem is not None:
        plan.problems.append(f"runtime.provider: {problem}")
    else:
        plan.add("runtime.provider", "execution provider", provider(cfg.runtime.provider).ort_name,
                 f"present in onnxruntime {ort.__version__}", "parity checks, eval, bench")
    if cfg.runtime.engine == "genai" and plan.verb in ("eval", "bench", "run") and find_spec("onnxruntime_genai") is None:
        plan.problems.append("runtime.engine: genai needs onnxruntime-genai (pip install -e \".[genai]\"), or set runtime.engine=ort")


# --------------------------------------------------------------------------- model
def _check_model(cfg: Config, plan: Plan) -> None:
    from llmship import source as src

    path = src.resolve_model_path(cfg.model.path)
    model_dir = _local(path)
    if model_dir is None:
        plan.hub.append(HubRef("model.path", path, "model", "model weights, tokenizer", cfg.model.revision))
    else:
        if not model_dir.is_dir():
            raise UserError("model folder not found", where=f"model.path ({path})")
        config = src._read_config(model_dir, str(model_dir))
        src.check_architecture(config, str(model_dir / "config.json"), cfg.model.trust_remote_code)
        src.check_weights(model_dir)
        weights = [n for n in src.WEIGHT_FILES if (model_dir / n).is_file()]
        plan.add("model.path", "model", _shown(cfg.model.path, model_dir), f"config.json, {', '.join(weights)}",
                 "export, PyTorch baseline")
        if positions := config.get("max_position_embeddings"):
            plan.max_positions = int(positions)
    adapter_dir = None
    if cfg.model.adapter:
        adapter_dir = Path(cfg.model.adapter).expanduser()
        _check_adapter(adapter_dir)
        plan.add("model.adapter", "LoRA adapter", str(adapter_dir), "adapter_config.json, weights header", "merged before export")
    tok_dir = src._tokenizer_source(model_dir if model_dir is not None and model_dir.is_dir() else None, adapter_dir)
    if tok_dir is None and model_dir is not None:
        raise UserError("no tokenizer files (tokenizer.model or tokenizer.json) in the model or adapter folder", where=str(model_dir))
    if tok_dir is not None:
        tokenizer = src.load_tokenizer(tok_dir)
        field_name = "model.adapter" if tok_dir == adapter_dir else "model.path"
        files = [f for f in src.TOKENIZER_FILES if (tok_dir / f).is_file()]
        plan.add(field_name, "tokenizer", _shown(cfg.model.path if field_name == "model.path" else str(tok_dir), tok_dir), f"{', '.join(files)} ({len(tokenizer)} tokens)", "every stage")


def _check_adapter(folder: Path) -> None:
    from llmship import source as src

    if not folder.is_dir():
        raise UserError("adapter folder not found", where=f"model.adapter ({folder})")
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise UserError("no adapter_config.json in the adapter folder (expected a PEFT LoRA adapter)", where=str(folder))
    try:
        json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"adapter_config.json is not valid JSON: {src._one_line(exc)}", where=str(config_file)) from None
    weights = [folder / n for n in src.ADAPTER_WEIGHTS if (folder / n).is_file()]
    if not weights:
        raise UserError(f"no adapter weights ({' or '.join(src.ADAPTER_WEIGHTS)})", where=str(folder))
    if weights[0].suffix == ".safetensors" and (why := src._safetensors_ok(weights[0])):
        raise UserError(f"adapter weights unreadable: {why}", where=str(weights[0]))


def compiled_folders(variants: list[Variant], out: Path) -> dict[str, Path]:
    """Variant folders of an earlier compile (for `llmship eval`/`bench` on their own)."""
    folders = {}
    for variant in variants:
        folder = out / variant.folder_name
        if not (folder / MANIFEST_FILE).is_file():
            raise UserError(f"variant '{variant.name}' is not compiled in {out}; run `llmship compile` first",
                            where=variant.where)
        folders[variant.name] = folder
    return folders


def _check_compiled(cfg: Config, variants: list[Variant], plan: Plan) -> None:
    """eval and bench on their own read the variants an earlier compile wrote."""
    from llmship.artifact import read_config_json

    for name, folder in compiled_folders(variants, Path(cfg.output.dir).expanduser()).items():
        plan.add("quantize", "compiled variant", str(folder), MANIFEST_FILE, f"variant {name}")
        if positions := read_config_json(folder).get("max_position_embeddings"):
            plan.max_positions = min(int(positions), plan.max_positions or int(positions))


# --------------------------------------------------------------------------- calibration
def _check_calibration(cfg: Config, variants: list[Variant], plan: Plan) -> None:
    readers = [v.name for v in variants if v.reads_calibration]  # as their schemes declare, for their resolved options
    if not readers:
        names = ", ".join(v.name for v in variants)
        plan.skipped.append(f"calibration: not read (no variant reads it: {names})")
        return
    calib = cfg.calibration
    if plan.max_positions is not None and calib.seq_len > plan.max_positions:
        plan.problems.append(f"calibration.seq_len: seq_len {calib.seq_len} exceeds the model's max positions "
                             f"({plan.max_positions})")
    reader = f"calibration ({', '.join(readers)})"
    for i, source in enumerate(calib.sources):
        split = {"c4": "train", "ceval": "dev", "alpaca": None}[source.kind]
        _guard(plan, _check_data, plan, f"calibration.sources.{i}.path", source.kind, source.path, reader, split)


# --------------------------------------------------------------------------- eval and bench
def _check_eval(cfg: Config, plan: Plan) -> None:
    """Every enabled eval task's data inputs (one check per file, naming every task that reads it) and lengths."""
    from llmship.eval.registry import TASKS

    readers: dict[tuple[str, str, str], list[str]] = {}
    inputs = {}
    for task_class in TASKS:
        if not task_class.enabled(cfg):
            plan.skipped.append(f"{task_class.section}: not read ({task_class.title} is off)")
            continue
        task = task_class(cfg)
        if plan.max_positions is not None:
            plan.problems.extend(task.length_problems(plan.max_positions))
        for data in task.data_inputs():
            key = (data.field, data.kind, data.path)
            readers.setdefault(key, []).append(task.title)
            inputs.setdefault(key, data)
    for key, data in inputs.items():
        _guard(plan, _check_data, plan, data.field, data.kind, data.path, f"eval: {', '.join(readers[key])}",
               data.splits, data.subjects)
    if cfg.gate.baseline_json:
        file = Path(cfg.gate.baseline_json).expanduser()
        _guard(plan, _check_json_file, file, "gate.baseline_json")
        plan.add("gate.baseline_json", "stored baseline", str(file), "JSON", "gate")


def _check_bench(cfg: Config, plan: Plan) -> None:
    _guard(plan, _check_data, plan, "bench.dataset", "sharegpt", cfg.bench.dataset, "bench", None)


def _check_baseline(cfg: Config, plan: Plan, eval_baseline: bool, bench_baseline: bool) -> None:
    """The PyTorch baseline's memory plan, before any model is loaded: a layer-at-a-time baseline that would not fit
    either, a layerwise one for a hub id, and a bench whose baseline would not fit whole fail here."""
    from llmship.runtime.torch_baseline import bench_problem, plan_baseline

    if not any(s.kind == "model" for s in plan.sources) and not any(h.field == "model.path" for h in plan.hub):
        return  # the model folder itself is missing or broken: that is the problem reported
    if bench_baseline and (problem := bench_problem(cfg.model)):
        raise UserError(problem, where="bench.baseline")
    baseline = plan_baseline(cfg.model, for_bench=not eval_baseline)
    readers = [stage for stage, reads in (("eval", eval_baseline), ("bench", bench_baseline)) if reads]
    plan.add("model.baseline", "PyTorch baseline", baseline.label, f"{baseline.dtype}; {_memory_checked(baseline)}",
             ", ".join(readers))


def _memory_checked(baseline: Any) -> str:
    from llmship.runtime.torch_baseline import gib

    if baseline.whole_bytes is None:
        return "memory not estimated (hub id)"
    return f"whole model ~{gib(baseline.whole_bytes)} in {baseline.model_dtype}, {gib(baseline.available_bytes)} available"


def _check_json_file(file: Path, field_name: str) -> None:
    if not file.is_file():
        raise UserError("file not found", where=f"{field_name} ({file})")
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"not valid JSON ({exc})", where=str(file)) from None


# --------------------------------------------------------------------------- data files
def _check_data(plan: Plan, field_name: str, kind: str, value: str, reader: str, split: Any, subjects: Any = None) -> None:
    """One dataset field: a hub id is queued for the hub check; a local file or folder has its header parsed."""
    from llmship.data.sources import resolve

    resolved = resolve(value, kind)
    if isinstance(resolved, str):
        plan.hub.append(HubRef(field_name, resolved, "dataset", reader))
        return
    if not resolved.exists():
        raise UserError(f"not found (expected {_EXPECTED[kind]})", where=f"{field_name} ({resolved})")
    checked = _DATA_CHECKS[kind](resolved, split, subjects)
    plan.add(field_name, kind, _shown(value, resolved), checked, reader)


_EXPECTED = {
    "c4": "a C4 .json/.json.gz file of JSON lines, or a folder of them",
    "ceval": "a C-Eval folder with dev/ and val/ CSVs",
    "cmmlu": "a CMMLU folder with dev/ and test/ CSVs",
    "alpaca": "an alpaca JSON list file, or a folder holding one",
    "sharegpt": "a ShareGPT V3 JSON list file, or a folder holding one",
}


def _check_c4(path: Path, splits: str | tuple[str, ...], _subjects: Any) -> str:
    from llmship.data.sources import C4_SUFFIXES, c4_split_files, files_in

    split = splits if isinstance(splits, str) else splits[0]  # C4 tasks read one split

    files = c4_split_files(files_in(path, C4_SUFFIXES, "C4 JSON lines"), split) if path.is_dir() else [path]
    for file in files:
        line = _first_line(file)
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"line 1 is not JSON ({err.msg}); expected JSON lines with a \"text\" field", where=str(file)) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise UserError('line 1 has no string "text" field; expected C4 JSON lines', where=str(file))
    return f"{len(files)} {split} file(s), first line of each"


def _first_line(file: Path) -> str:
    try:
        with file.open("rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if compressed else open
        with opener(file, "rt", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    return line
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read ({err}); expected gzip/plain JSON lines", where=str(file)) from None
    raise UserError("no documents; expected JSON lines with a \"text\" field", where=str(file))


def _check_ceval(path: Path, splits: tuple[str, ...], subjects: list[str] | None) -> str:
    from llmship.data.sources import CEVAL_COLUMNS, ceval_split_files, read_subject_mapping

    if not path.is_dir():
        raise UserError("is a file; expected a C-Eval folder with dev/<subject>_dev.csv and val/<subject>_val.csv", where=str(path))
    read_subject_mapping(path / "subject_mapping.json")
    counts = []
    for split in (splits,) if isinstance(splits, str) else splits:
        files = ceval_split_files(path, split)
        if not files:
            raise UserError(f"no {split}/<subject>_{split}.csv files; expected the C-Eval layout", where=str(path))
        missing = [s for s in subjects or [] if s not in files]
        if missing:
            raise UserError(f"subject(s) {', '.join(missing)} have no {split} file (present: {', '.join(sorted(files))})",
                            where="eval.ceval.subjects")
        for file in files.values():
            header = _csv_header(file)
            absent = [c for c in (*CEVAL_COLUMNS, "answer") if c not in header]
            if absent:
                raise UserError(f"header lacks column(s) {', '.join(absent)}; expected id,question,A,B,C,D,answer[,explanation]",
                                where=str(file))
        counts.append(f"{len(files)} {split}")
    return f"{' + '.join(counts)} CSV headers"


def _csv_header(file: Path) -> list[str]:
    import csv

    try:
        with open(file, encoding="utf-8", newline="") as fh:
            return next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read as UTF-8 CSV ({err})", where=str(file)) from None


def _first_record(path: Path, suffix: str, what: str) -> tuple[Path, Any]:
    """The file (a folder's first `suffix` file) and the first record of its JSON list (None when it is longer
    than HEAD_BYTES)."""
    from llmship.data.sources import files_in

    file = files_in(path, (suffix,), what)[0] if path.is_dir() else path
    try:
        with file.open("rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if compressed else open
        with opener(file, "rb") as fh:
            head = fh.read(HEAD_BYTES).decode("utf-8", errors="ignore").lstrip()
    except (OSError, EOFError) as err:
        raise UserError(f"cannot read ({err}); expected {what}", where=str(file)) from None
    if not head.startswith("["):
        raise UserError(f"does not start with a JSON list; expected {what}", where=str(file))
    try:
        record, _ = json.JSONDecoder().raw_decode(head[1:].lstrip())
    except json.JSONDecodeError:
        return file, None
    return file, record


def _check_alpaca(path: Path, _split: Any, _subjects: Any) -> str:
    what = "a JSON list of {instruction, input, output}"
    file, record = _first_record(path, ".json", what)
    if record is not None and not (isinstance(record, dict) and isinstance(record.get("instruction"), str)
                                   and isinstance(record.get("output"), str)):
        raise UserError(f"record 0 lacks string instruction/output fields; expected {what}", where=str(file))
    return "JSON list, first record"


def _check_sharegpt(path: Path, _split: Any, _subjects: Any) -> str:
    what = 'a JSON list of {"id", "conversations": [{"from", "value"}]}'
    file, record = _first_record(path, ".json", what)
    if record is not None and not (isinstance(record, dict) and isinstance(record.get("conversations"), list)):
        raise UserError(f'entry 0 has no "conversations" list; expected {what}', where=str(file))
    return "JSON list, first entry"


def _check_cmmlu(path: Path, splits: tuple[str, ...], subjects: tuple[str, ...] | None) -> str:
    from llmship.data.cmmlu import read_cmmlu

    read = read_cmmlu(path, list(subjects) if subjects else None)  # small CSVs: read whole, as the task will
    return f"{len(read)} subjects, {' + '.join(splits)} CSVs"


_DATA_CHECKS = {"c4": _check_c4, "ceval": _check_ceval, "cmmlu": _check_cmmlu, "alpaca": _check_alpaca, "sharegpt": _check_sharegpt}


def _shown(value: str, resolved: Path) -> str:
    return f"{EMBEDDED} ({resolved.relative_to(ASSETS_DIR)})" if value == EMBEDDED else str(resolved)


# --------------------------------------------------------------------------- hub
def hub_offline() -> bool:
    """True when the user turned the hub off (the libraries then read their local caches only)."""
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE") for name in OFFLINE_VARIABLES)


def _check_hub(plan: Plan) -> None:
    """Each hub id is asked for once (metadata only, no retries). An unreachable hub stops at the first failure with
    one message that lists every field to point at local files."""
    if not plan.hub:
        return
    if hub_offline():
        log.warning("hub offline mode: %s will be read from the local cache", ", ".join(r.repo_id for r in plan.hub))
        for ref in plan.hub:
            plan.add(ref.field, ref.repo_type, f"hub cache: {ref.repo_id}", "not checked (offline mode)", ref.reader)
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()
    for ref in plan.hub:
        info = api.dataset_info if ref.repo_type == "dataset" else api.model_info
        try:
            info(ref.repo_id, revision=ref.revision, timeout=HUB_TIMEOUT_S)
        except GatedRepoError:
            plan.problems.append(f"{ref.field}: hub {ref.repo_type} {ref.repo_id!r} is gated: accept its terms on the hub "
                                 "and log in (hf auth login), or point the field at a local copy")
        except RevisionNotFoundError:
            plan.problems.append(f"{ref.field}: hub {ref.repo_type} {ref.repo_id!r} has no revision {ref.revision!r}")
        except RepositoryNotFoundError:
            plan.problems.append(f"{ref.field}: no hub {ref.repo_type} {ref.repo_id!r} (nor a local path of that name)")
        except HfHubHTTPError as exc:
            plan.problems.append(f"{ref.field}: hub {ref.repo_type} {ref.repo_id!r}: {str(exc).splitlines()[0]}")
        except Exception as exc:  # noqa: BLE001 - DNS, refused, timeout, proxy: the hub is out of reach
            plan.problems.append(_unreachable(plan.hub, exc))
            return
        else:
            plan.add(ref.field, ref.repo_type, f"hub: {ref.repo_id}", "reachable", ref.reader)


def _unreachable(refs: list[HubRef], exc: Exception) -> str:
    fields = ", ".join(f"{r.field} ({r.repo_id})" for r in refs)
    return (f"the Hugging Face hub is unreachable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"point these fields at local files: {fields} (or set HF_HUB_OFFLINE=1 to use the local cache)")


# --------------------------------------------------------------------------- table
def table_rows(plan: Plan) -> list[tuple[str, str, str, str, str]]:
    return [(s.field, s.kind, s.location, s.checked, s.reader) for s in plan.sources]
