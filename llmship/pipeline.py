"""The chain compile -> eval -> gate -> bench -> report, with each stage's result cached by a key.

A stage's key is a fingerprint of its inputs: the source model's files, the config sections the stage
reads, the keys of the stages it consumes, and the library versions. The key is recorded in
`<output.dir>/.llmship/stages/<stage>.json` only after the stage's artifact has been moved into place
(atomically), so a run killed at any moment is either redone or trusted, never half-trusted.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmship.cache import cached, folder_fingerprint, load_record, rebuilding, record, stage_key
from llmship.config import EMBEDDED, EMBEDDED_MODEL_DIR, Config
from llmship.data.sources import data_fingerprint
from llmship.errors import CheckFailed, StageNotBuilt, UserError

log = logging.getLogger("llmship")

DEMO_CONFIG = Path(__file__).parent / "demo.yaml"
STAGES = ("compile", "eval", "bench", "run")


def model_path(cfg: Config) -> str:
    return str(EMBEDDED_MODEL_DIR) if cfg.model.path == EMBEDDED else cfg.model.path


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

    from llmship.progress import stderr

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
    build = _entry("llmship.data.mixture", "build_calibration_set", "calibration")
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
    from llmship.eval import stage_inputs

    # The goals are not inputs: a changed gate re-gates the stored scores instead of re-scoring.
    key = stage_key("eval", _variant_keys(out, folders), stage_inputs(cfg))
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
    from llmship.bench import stage_inputs

    key = stage_key("bench", _variant_keys(out, folders), stage_inputs(cfg))
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
