"""The chain compile -> eval -> gate -> bench -> report, with each stage's result cached by a key.

A stage's key is a fingerprint of its inputs: the source model's files, the config sections the stage
reads, the keys of the stages it consumes, and the library versions. The key is recorded in
`<output.dir>/.llmship/stages/<stage>.json` only after the stage's artifact has been moved into place
(atomically), so a run killed at any moment is either redone or trusted, never half-trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmship.config import EMBEDDED, EMBEDDED_MODEL_DIR, Config
from llmship.errors import CheckFailed, StageNotBuilt, UserError

log = logging.getLogger("llmship")

DEMO_CONFIG = Path(__file__).parent / "demo.yaml"
STAGES = ("compile", "eval", "bench", "run")
# Bump when llmship's own code changes what a stage builds from the same inputs (the package version stays 0.1.0
# between such changes); 2: tokenizers get SentencePiece's dummy prefix back, which changes calibration token ids;
# 3: fused graphs carry rotary tables of twice max positions (C-Eval GEN generates past max positions).
STAGE_VERSION = 3
LIBRARIES = ("llmship", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "sentencepiece", "numpy")


# --------------------------------------------------------------------------- fingerprints
def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def _hash_file(path: Path, digest: Any) -> None:
    # Large weight files: size + mtime + head/tail bytes; a full hash of a 13 GB checkpoint costs a minute per run.
    stat = path.stat()
    digest.update(f"{path.name}:{stat.st_size}".encode())
    with path.open("rb") as fh:
        if stat.st_size <= 64 << 20:
            digest.update(fh.read())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
            digest.update(fh.read(1 << 20))
            fh.seek(-(1 << 20), 2)
            digest.update(fh.read())


def folder_fingerprint(path: str | Path) -> str:
    """Hash of a local model/adapter folder's files (a hub id hashes as its name)."""
    folder = Path(path)
    digest = hashlib.sha256()
    if not folder.exists():
        digest.update(str(path).encode())
        return digest.hexdigest()[:16]
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else [folder]
    for file in files:
        digest.update(str(file.relative_to(folder) if folder.is_dir() else file.name).encode())
        _hash_file(file, digest)
    return digest.hexdigest()[:16]


def data_fingerprint(path: str, kind: str) -> str:
    """Fingerprint of a dataset's local files ('@embedded' = the bundled sample; a hub id hashes as its name)."""
    from llmship.calib_data.sources import resolve

    source = resolve(path, kind)
    return folder_fingerprint(source) if isinstance(source, Path) and source.exists() else f"hub:{path}"


def model_path(cfg: Config) -> str:
    return str(EMBEDDED_MODEL_DIR) if cfg.model.path == EMBEDDED else cfg.model.path


def stage_key(*parts: Any) -> str:
    blob = json.dumps([*parts, library_versions(), STAGE_VERSION], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- stage index
# Stage records hold paths relative to output.dir, so a moved or copied output folder is still trusted: the
# artifact as a relative path, and every path under output.dir inside a stored result with this token in front.
OUTPUT_DIR_TOKEN = "${output.dir}"


def _index_path(out: Path, stage: str) -> Path:
    return out / ".llmship" / "stages" / f"{stage}.json"


def _relative(path: Path, out: Path) -> str:
    """`path` relative to output.dir when it lies inside it (else absolute)."""
    try:
        return Path(path).resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def _recorded_artifact(record: dict, out: Path) -> Path | None:
    """The artifact a record names, under this output.dir (records of older versions hold absolute paths)."""
    artifact = record.get("artifact")
    return out / artifact if isinstance(artifact, str) else None


def _portable(value: Any, out: Path) -> Any:
    """A stored result with every absolute path under output.dir written as OUTPUT_DIR_TOKEN/<relative path>."""
    if isinstance(value, dict):
        return {k: _portable(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v, out) for v in value]
    if isinstance(value, str):
        # the stages write output.dir as given, made absolute, or resolved
        for root in dict.fromkeys((str(out.resolve()), str(out.absolute()), str(out))):
            if value.startswith(root) and value[len(root):len(root) + 1] in ("", "/"):
                return OUTPUT_DIR_TOKEN + value[len(root):]
    return value


def _located(value: Any, out: Path) -> Any:
    """The inverse of `_portable`: the token replaced by this run's output.dir."""
    if isinstance(value, dict):
        return {k: _located(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [_located(v, out) for v in value]
    if isinstance(value, str) and value.startswith(OUTPUT_DIR_TOKEN):
        return str(out.resolve()) + value[len(OUTPUT_DIR_TOKEN):]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    tmp.replace(path)


def cached(out: Path, stage: str, key: str, artifact: Path) -> bool:
    """True when `stage` finished before with the same key and its artifact is still there."""
    index = _index_path(out, stage)
    if not index.is_file() or not artifact.exists():
        return False
    try:
        record = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    recorded = _recorded_artifact(record, out)
    return record.get("key") == key and recorded is not None and recorded.resolve() == artifact.resolve()


def _identity(path: Path) -> tuple[int, int] | None:
    """Inode and change time: an atomic swap puts a different folder in place; a failed build touches neither."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_ctime_ns


@contextmanager
def rebuilding(out: Path, stage: str):
    """Drop a stage's record while its output is rebuilt: a run killed between the swap of the new folder and the
    new record must not leave the old key pointing at the new folder. A build that fails with an exception before
    its swap leaves the earlier folder in place (atomic writes; same inode), so its record is put back."""
    index = _index_path(out, stage)
    try:
        saved = index.read_bytes()
        artifact = _recorded_artifact(json.loads(saved), out)
        before = _identity(artifact)
    except (OSError, ValueError, KeyError, TypeError):
        saved, artifact, before = None, None, None
    with contextlib.suppress(FileNotFoundError):
        index.unlink()
    try:
        yield
    except BaseException:
        untouched = artifact is not None and before is not None and _identity(artifact) == before
        if saved is not None and untouched and not index.exists():
            index.parent.mkdir(parents=True, exist_ok=True)
            tmp = index.with_name(f".{index.name}.tmp")
            tmp.write_bytes(saved)
            tmp.replace(index)
        raise


def record(out: Path, stage: str, key: str, artifact: Path, result: Any = None) -> None:
    write_json_atomic(_index_path(out, stage), {"key": key, "artifact": _relative(artifact, out),
                                                 "result": _portable(result, out)})


def load_record(out: Path, stage: str) -> dict:
    """A stage's record, its result's paths under this output.dir."""
    stored = json.loads(_index_path(out, stage).read_text(encoding="utf-8"))
    return {**stored, "result": _located(stored.get("result"), out)}


# --------------------------------------------------------------------------- stages
def variant_key(fp32_key: str, variant: Any, cfg: Config, calibration_data: list | None) -> str:
    """A variant's compile key. It holds the scheme's resolved options (defaults filled in), so a default that changes
    between releases rebuilds the variant instead of reusing one built with the old default. The calibration config and
    `calibration_data` (the sources' fingerprints) count only for a scheme that reads them, so changing the
    calibration rebuilds those variants and no other."""
    from llmship.quantize import build_scheme

    scheme = build_scheme(variant)
    calibration = (cfg.calibration.model_dump(), calibration_data) if scheme.uses_calibration() else None
    return stage_key("quantize", fp32_key, variant.model_dump(), scheme.describe(), calibration, cfg.runtime.provider)


def _entry(module: str, name: str, stage: str) -> Callable:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise StageNotBuilt(f"the {stage} stage is not built in this version of llmship ({module}.{name} missing)") from None


@contextmanager
def _progress(quiet: bool):
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from llmship.cli import stderr

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=stderr, transient=True) as bar:
        yield bar


def output_dir(cfg: Config) -> Path:
    out = Path(cfg.output.dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".llmship-write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output directory is not writable: {exc.strerror or exc}", where=f"output.dir ({out})") from None
    from llmship.artifact import recover_interrupted

    recover_interrupted(out)  # a run killed earlier may have left temp folders or a parked output
    return out


def compile_stage(cfg: Config, out: Path, progress: Any, force: bool) -> dict[str, Path]:
    """Export fp32 once, then build every listed variant from it; returns variant name -> folder."""
    if cfg.export.streaming:  # every variant from the checkpoint, no fp32 model in memory (llmship.export.streaming)
        return _entry("llmship.export.streaming", "compile_streaming", "streaming compile")(cfg, out, progress, force)
    from llmship.quantize import reads_calibration as scheme_reads_calibration

    export_fp32 = _entry("llmship.export", "export_fp32", "export")
    source_fp = {"model": folder_fingerprint(model_path(cfg)), "adapter": cfg.model.adapter and folder_fingerprint(cfg.model.adapter)}
    fp32_dir = out / "fp32"
    # the provider too: parity runs on it, and genai_config.json names it
    fp32_key = stage_key("export", source_fp, cfg.model.model_dump(), cfg.export.model_dump(), cfg.runtime.provider)
    if force or not cached(out, "export", fp32_key, fp32_dir):
        log.info("exporting %s to %s", model_path(cfg), fp32_dir)
        with rebuilding(out, "export"):
            export_fp32(cfg, fp32_dir, progress=progress)
        record(out, "export", fp32_key, fp32_dir)
    else:
        log.info("fp32 export is up to date: %s", fp32_dir)
    folders: dict[str, Path] = {}
    calib = None
    calibration_data = None
    for variant in cfg.quantize.all_variants():
        name = variant.variant_name
        if variant.scheme == "none":
            folders[name] = fp32_dir
            continue
        target = out / name
        reads_calibration = scheme_reads_calibration(variant)
        if reads_calibration and calibration_data is None:
            calibration_data = [data_fingerprint(s.path, s.kind) for s in cfg.calibration.sources]
        key = variant_key(fp32_key, variant, cfg, calibration_data if reads_calibration else None)
        if not force and cached(out, f"variant-{name}", key, target):
            log.info("variant %s is up to date: %s", name, target)
            folders[name] = target
            continue
        quantize_variant = _entry("llmship.quantize", "quantize_variant", "quantize")
        from llmship.artifact import Artifact

        if reads_calibration and calib is None:
            calib = _calibration_set(cfg, fp32_dir)
        log.info("building variant %s (%s)", name, variant.scheme)
        with rebuilding(out, f"variant-{name}"):
            quantize_variant(Artifact.load(fp32_dir), variant, calib if reads_calibration else None, target, cfg,
                             progress=progress)
        record(out, f"variant-{name}", key, target)
        folders[name] = target
    return folders


def _calibration_set(cfg: Config, fp32_dir: Path) -> Any:
    build = _entry("llmship.calib_data", "build_calibration_set", "calibration")
    from llmship.export.source import load_tokenizer

    tokenizer = load_tokenizer(fp32_dir)
    max_positions = json.loads((fp32_dir / "config.json").read_text())["max_position_embeddings"]
    return build(cfg.calibration, tokenizer, max_positions)


def _variant_keys(out: Path, folders: dict[str, Path]) -> dict[str, str]:
    """Per variant: its compile record's key and a fingerprint of the folder's files, so a folder changed on disk
    after its compile (replaced, edited, corrupted) is scored again rather than served from the cache."""
    keys = {}
    for name, folder in folders.items():
        stage = "export" if folder.name == "fp32" else f"variant-{name}"
        try:
            compiled = load_record(out, stage)["key"]
        except (OSError, json.JSONDecodeError, KeyError):
            compiled = None
        keys[name] = f"{compiled}:{folder_fingerprint(folder)}"
    return keys


def compiled_variants(cfg: Config, out: Path) -> dict[str, Path]:
    """Variant folders of an earlier compile with this config (for `llmship eval`/`bench` on their own)."""
    from llmship.preflight import compiled_folders

    return compiled_folders(cfg, out)


def eval_stage(cfg: Config, out: Path, folders: dict[str, Path], progress: Any, force: bool) -> dict:
    run_eval = _entry("llmship.eval", "run_eval", "eval")
    eval_dir = out / "eval"
    ev, gate = cfg.eval, cfg.gate
    # The goals are left out of the key: a changed gate re-gates the stored scores instead of re-scoring.
    key = stage_key("eval", _variant_keys(out, folders), folder_fingerprint(model_path(cfg)), cfg.model.model_dump(),
                    ev.model_dump(), gate.baseline_json, gate.baseline_json and folder_fingerprint(gate.baseline_json),
                    cfg.runtime.model_dump(), data_fingerprint(ev.ceval.path, "ceval"),
                    data_fingerprint(ev.perplexity.c4_path, "c4"), data_fingerprint(ev.perplexity.alpaca_path, "alpaca"))
    if not force and cached(out, "eval", key, eval_dir):
        log.info("eval scores are up to date: %s", eval_dir)
        from llmship.eval import regate

        stored = load_record(out, "eval")["result"]
        result = regate(cfg, stored, eval_dir)
        if result is not stored:  # the goals changed: the record keeps the new verdicts
            record(out, "eval", key, eval_dir, result)
    else:
        with rebuilding(out, "eval"):
            result = run_eval(cfg, folders, eval_dir, progress=progress)
        record(out, "eval", key, eval_dir, result)
    failures = [row for row in result.get("gate", []) if not row.get("passed", True)]
    if failures:
        raise CheckFailed(f"{len(failures)} gate goal(s) failed; see {eval_dir}")
    return result


def bench_stage(cfg: Config, out: Path, folders: dict[str, Path], progress: Any, force: bool) -> dict:
    run_bench = _entry("llmship.bench", "run_bench", "bench")
    bench_dir = out / "bench"
    key = stage_key("bench", _variant_keys(out, folders), folder_fingerprint(model_path(cfg)), cfg.model.model_dump(),
                    cfg.bench.model_dump(), cfg.runtime.model_dump(), data_fingerprint(cfg.bench.dataset, "sharegpt"))
    if not force and cached(out, "bench", key, bench_dir):
        log.info("bench results are up to date: %s", bench_dir)
        return load_record(out, "bench")["result"]
    with rebuilding(out, "bench"):
        result = run_bench(cfg, folders, bench_dir, progress=progress)
    record(out, "bench", key, bench_dir, result)
    return result


def run_stage(stage: str, cfg: Config, *, quiet: bool = False, force: bool = False) -> None:
    """Entry of every CLI verb: the preflight first (every input checked before anything is built or written)."""
    from llmship import preflight

    _validate_variants(cfg)
    preflight.check(cfg, stage)
    out = output_dir(cfg)
    with _progress(quiet) as progress:
        if stage == "compile":
            folders = compile_stage(cfg, out, progress, force)
            _say_done("compiled", folders)
            return
        folders = compile_stage(cfg, out, progress, force) if stage == "run" else compiled_variants(cfg, out)
        if stage == "eval":
            eval_stage(cfg, out, folders, progress, force)
            _say_done("evaluated", {"eval": out / "eval"})
        elif stage == "bench":
            bench_stage(cfg, out, folders, progress, force)
            _say_done("benchmarked", {"bench": out / "bench"})
        elif stage == "run":
            _run_chain(cfg, out, folders, progress, force)


def _run_chain(cfg: Config, out: Path, folders: dict[str, Path], progress: Any, force: bool) -> None:
    gate_error: CheckFailed | None = None
    try:
        eval_result = eval_stage(cfg, out, folders, progress, force)
    except CheckFailed as exc:  # still bench and report, then exit 1
        gate_error = exc
        eval_result = load_record(out, "eval")["result"]
    bench_result = bench_stage(cfg, out, folders, progress, force)
    write_report = _entry("llmship.report", "write_report", "report")
    report_dir = write_report(cfg, folders, eval_result, bench_result, out / "report")
    log.info("report: %s", report_dir / "report.html")
    print(f"report: {report_dir / 'report.html'}")
    if gate_error is not None:
        raise gate_error


def _validate_variants(cfg: Config) -> None:
    try:
        validate = importlib.import_module("llmship.quantize").validate_variant
    except (ImportError, AttributeError):
        return
    for i, variant in enumerate(cfg.quantize.all_variants()):
        validate(variant, where="quantize" if i == 0 else f"quantize.variants.{i - 1}")


def _say_done(what: str, folders: dict[str, Path]) -> None:
    for name, folder in folders.items():
        print(f"{what}: {name} -> {folder}")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
