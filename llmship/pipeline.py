"""The chain compile -> eval -> gate -> bench -> report as a short loop over stages.

Each stage (`llmship.cache.Stage`) declares what it reads and the stages whose artifacts it consumes; its key is
derived from that declaration, and `llmship.cache.build` reuses its stored result or rebuilds it (the record is written
only after the artifact is in place, so a run killed at any moment is either redone or trusted, never half-trusted).
The compile's stages are the fp32 export and one per variant (declared here for the whole-model path, in
llmship.export.streaming for `export.streaming`); eval and bench consume the variants' stages; the report is written
anew on every run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

from llmship import preflight
from llmship.artifact import Artifact, recover_interrupted
from llmship.bench import run_bench
from llmship.bench import stage_inputs as bench_inputs
from llmship.cache import Stage, build, folder_fingerprint
from llmship.config import Config
from llmship.data import mixture
from llmship.data.sources import data_fingerprint
from llmship.errors import CheckFailed, UserError
from llmship.eval import regate, run_eval
from llmship.eval import stage_inputs as eval_inputs
from llmship.export import export_fp32
from llmship.export.streaming import streaming_stages
from llmship.quantize import Variant, resolve_variants
from llmship.quantize.registry import EXPORT_FOLDER
from llmship.quantize.variant import quantize_variant
from llmship.report import write_report
from llmship.source import load_tokenizer, resolve_model_path

log = logging.getLogger("llmship")

DEMO_CONFIG = Path(__file__).parent / "demo.yaml"


# --------------------------------------------------------------------------- verbs
def run_stage(verb: str, cfg: Config, *, quiet: bool = False, force: bool = False) -> None:
    """Entry of every CLI verb: the variants resolved once, the preflight (every input checked before anything is
    built or written), then the verb's stages."""
    variants, _ = check_inputs(cfg, verb)
    out = output_dir(cfg)
    with _progress(quiet) as progress:
        if verb in ("compile", "run"):
            compiled = compile_variants(cfg, out, variants, progress, force)
        else:  # eval and bench on their own read what an earlier compile built (the preflight checked it is there)
            compiled = compile_stages(cfg, out, variants, progress, force)
        if verb == "compile":
            _say_done("compiled", folders_of(compiled))
        elif verb == "eval":
            _gate(build(eval_stage(cfg, out, compiled, progress), out, force), out)
            _say_done("evaluated", {"eval": out / "eval"})
        elif verb == "bench":
            build(bench_stage(cfg, out, compiled, progress), out, force)
            _say_done("benchmarked", {"bench": out / "bench"})
        else:
            _run_chain(cfg, out, compiled, progress, force)


def check_inputs(cfg: Config, verb: str) -> tuple[list[Variant], preflight.Plan]:
    """The variants, each resolved once (UserError for an unknown method or option), and the preflight's plan of
    `verb` (UserError listing every problem with its inputs; `llmship check` prints the plan)."""
    variants = resolve_variants(cfg.quantize)
    return variants, preflight.check(cfg, verb, variants)


def _run_chain(cfg: Config, out: Path, compiled: dict[str, Stage], progress: Any, force: bool) -> None:
    eval_result = build(eval_stage(cfg, out, compiled, progress), out, force)
    bench_result = build(bench_stage(cfg, out, compiled, progress), out, force)
    report_dir = write_report(cfg, folders_of(compiled), eval_result, bench_result, out / "report")
    log.info("report: %s", report_dir / "report.html")
    print(f"report: {report_dir / 'report.html'}")
    _gate(eval_result, out)  # after the bench and the report: a failed gate still gets both


def _gate(eval_result: dict, out: Path) -> None:
    failures = [row for row in eval_result.get("gate", []) if not row.get("passed", True)]
    if failures:
        raise CheckFailed(f"{len(failures)} gate goal(s) failed; see {out / 'eval'}")


# --------------------------------------------------------------------------- compile
def compile_variants(cfg: Config, out: Path, variants: list[Variant], progress: Any = None,
                     force: bool = False) -> dict[str, Stage]:
    """The export and every variant built, or reused when up to date; variant name -> its stage."""
    if cfg.cluster.backend == "ray" and not cfg.export.streaming:
        return compile_on_cluster(cfg, out, variants, force)
    compiled = compile_stages(cfg, out, variants, progress, force)
    for stage in in_build_order(compiled.values()):
        build(stage, out, force)
    return compiled


def compile_on_cluster(cfg: Config, out: Path, variants: list[Variant], force: bool = False) -> dict[str, Stage]:
    """`compile_variants` with the variants as Ray tasks, once the fp32 export (built here) exists: they are
    independent. The calibration set is tokenized here once and travels with the stages; each task builds and records
    its stage in output.dir, which every node shares (the probe checks it and the export)."""
    from llmship.cluster import Unit, connected, probe_nodes, run_units

    calibration = Calibration(cfg, out / EXPORT_FOLDER)
    compiled = compile_stages(cfg, out, variants, None, force, calibration)  # no progress bar: it cannot travel
    stages = in_build_order(compiled.values())
    for stage in stages:
        if not stage.consumes:
            build(stage, out, force)
    todo = [stage for stage in stages if stage.consumes and (force or not stage.up_to_date(out))]
    for stage in stages:
        if stage.consumes and stage not in todo:
            log.info("%s: %s", stage.fresh_log, stage.artifact)
    if not todo:
        return compiled
    if any(v.reads_calibration for v in variants):
        calibration.samples  # noqa: B018 - tokenized here, once, not on every node
    with connected(cfg.cluster) as ray:
        probe_nodes(ray, out, {"fp32 export": out / EXPORT_FOLDER})
        units = [Unit(f"compile {stage.name}", (stage, out, force)) for stage in todo]
        run_units(ray, cfg.cluster, build_stage, units,
                  lambda unit, node: log.info("%s built on node %s", unit.label.removeprefix("compile "), node))
    return compiled


def build_stage(stage: Stage, out: Path, force: bool) -> str:
    """On a Ray worker: build one stage (recorded in output.dir as a local build is); the node's id."""
    import ray

    build(stage, out, force)
    return ray.get_runtime_context().get_node_id()


def compile_stages(cfg: Config, out: Path, variants: list[Variant], progress: Any = None,
                   force: bool = False, calibration: Calibration | None = None) -> dict[str, Stage]:
    """Variant name -> the stage that builds its folder: the fp32 export for the fp32 variant, else the variant's own
    stage, which consumes the export (with `export.streaming`, reads the checkpoint instead)."""
    if cfg.export.streaming:
        return streaming_stages(cfg, out, variants, progress, force=force)
    fp32_dir = out / EXPORT_FOLDER
    export = Stage("export", fp32_dir, reads=lambda: export_reads(cfg), run=lambda: _export(cfg, fp32_dir, progress),
                   fresh_log="fp32 export is up to date")
    calibration = calibration or Calibration(cfg, fp32_dir)
    return {v.name: export if v.scheme.builds_export else variant_stage(cfg, out, v, export, calibration, progress)
            for v in variants}


def export_reads(cfg: Config) -> dict[str, Any]:
    source = {"model": folder_fingerprint(resolve_model_path(cfg.model.path)),
              "adapter": cfg.model.adapter and folder_fingerprint(cfg.model.adapter)}
    # the provider too: parity runs on it, and genai_config.json names it
    return {"source": source, "model": cfg.model.model_dump(), "export": cfg.export.model_dump(),
            "provider": cfg.runtime.provider}


def _export(cfg: Config, target: Path, progress: Any) -> None:
    log.info("exporting %s to %s", resolve_model_path(cfg.model.path), target)
    export_fp32(cfg, target, progress=progress)


class Calibration:
    """The calibration set of one compile: its data files' fingerprints (for the keys of the variants that read it)
    and the tokenized set, each computed at most once and only when a variant that reads it asks."""

    def __init__(self, cfg: Config, fp32_dir: Path):
        self.cfg, self.fp32_dir = cfg, fp32_dir

    @cached_property
    def fingerprints(self) -> list[Any]:
        return [data_fingerprint(s.path, s.kind) for s in self.cfg.calibration.sources]

    @cached_property
    def samples(self) -> Any:
        tokenizer = load_tokenizer(self.fp32_dir)
        max_positions = json.loads((self.fp32_dir / "config.json").read_text())["max_position_embeddings"]
        return mixture.build_calibration_set(self.cfg.calibration, tokenizer, max_positions)


def variant_stage(cfg: Config, out: Path, variant: Variant, export: Stage, calibration: Calibration,
                  progress: Any = None) -> Stage:
    """A variant built from the fp32 export. Its key holds the scheme's resolved options and, only for a scheme that
    reads it, the calibration config and data, so changing the calibration rebuilds those variants and no other."""
    target = out / variant.folder_name

    def reads() -> dict[str, Any]:
        inputs = {**variant.describe(), "provider": cfg.runtime.provider}
        if variant.reads_calibration:
            inputs["calibration"] = {"config": cfg.calibration.model_dump(), "data": calibration.fingerprints}
        return inputs

    def run() -> None:
        log.info("building variant %s (%s)", variant.name, variant.scheme.name)
        samples = calibration.samples if variant.reads_calibration else None
        if samples is not None and variant.scheme.packs_calibration():
            mixture.require_a_full_sample(samples, cfg.calibration)
        quantize_variant(Artifact.load(export.artifact), variant, samples, target, cfg, progress=progress)

    return Stage(f"variant-{variant.name}", target, reads, run, consumes={"fp32": export},
                 fresh_log=f"variant {variant.name} is up to date")


def in_build_order(stages: Iterable[Stage]) -> list[Stage]:
    """Each stage once, after the stages it consumes (the export before the variants built from it)."""
    order: list[Stage] = []

    def visit(stage: Stage) -> None:
        if any(stage is seen for seen in order):
            return
        for consumed in stage.consumes.values():
            visit(consumed)
        order.append(stage)

    for stage in stages:
        visit(stage)
    return order


def folders_of(compiled: dict[str, Stage]) -> dict[str, Path]:
    return {name: stage.artifact for name, stage in compiled.items()}


def compiled_variants(cfg: Config, out: Path) -> dict[str, Path]:
    """Variant folders of an earlier compile with this config (UserError naming the first one missing)."""
    return preflight.compiled_folders(resolve_variants(cfg.quantize), out)


# --------------------------------------------------------------------------- eval and bench
def eval_stage(cfg: Config, out: Path, compiled: dict[str, Stage], progress: Any = None) -> Stage:
    """Scores of the baseline and every variant. The goals are not inputs: when only they change, the stored scores
    are re-gated instead of scored again."""
    eval_dir = out / "eval"
    return Stage("eval", eval_dir, reads=lambda: eval_inputs(cfg), consumes=compiled,
                 run=lambda: run_eval(cfg, folders_of(compiled), eval_dir, progress=progress),
                 fresh_log="eval scores are up to date", reuse=lambda stored: regate(cfg, stored, eval_dir))


def bench_stage(cfg: Config, out: Path, compiled: dict[str, Stage], progress: Any = None) -> Stage:
    bench_dir = out / "bench"
    return Stage("bench", bench_dir, reads=lambda: bench_inputs(cfg), consumes=compiled,
                 run=lambda: run_bench(cfg, folders_of(compiled), bench_dir, progress=progress),
                 fresh_log="bench results are up to date")


# --------------------------------------------------------------------------- output
def output_dir(cfg: Config) -> Path:
    out = Path(cfg.output.dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".llmship-write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output directory is not writable: {exc.strerror or exc}", where=f"output.dir ({out})") from None
    recover_interrupted(out)  # a run killed earlier may have left temp folders or a parked output
    return out


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


def _say_done(what: str, folders: dict[str, Path]) -> None:
    for name, folder in folders.items():
        print(f"{what}: {name} -> {folder}")
