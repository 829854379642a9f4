"""`quantize_variant`: fp32 artifact + resolved variant (+ calibration set) -> a new variant folder, checked against
PyTorch, with a manifest (scheme, options, calibration fingerprint, quantization report, size, parity). Atomic."""

from __future__ import annotations

import fnmatch
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from llmship.artifact import Artifact, atomic_folder, model_size, new_manifest, write_manifest
from llmship.config import Config, ParityConfig, VariantConfig
from llmship.errors import CheckFailed, UserError
from llmship.files import GENAI_CONFIG_FILE, MANIFEST_FILE, MODEL_DATA_FILE, MODEL_FILE
from llmship.progress import Steps
from llmship.quantize.auto import auto_quantize
from llmship.quantize.graph import initializers, load_model, node_names
from llmship.quantize.registry import QuantizeJob, Variant, resolve_variant

log = logging.getLogger("llmship")

# Files of the fp32 folder that a variant carries over unchanged (the graph is rewritten, the manifest new).
# genai_config.json is written anew: it describes the variant's own graph.
SKIP_FILES = (MODEL_FILE, MODEL_DATA_FILE, MANIFEST_FILE, GENAI_CONFIG_FILE)

_reference_cache: dict[str, Any] = {}


def reference_engine(cfg: Config) -> Any:
    """The PyTorch baseline, loaded once per model config and reused by every variant of a run."""
    from llmship.runtime import load_engine

    key = cfg.model.model_dump_json() + cfg.runtime.model_dump_json()
    if key not in _reference_cache:
        _reference_cache.clear()  # one baseline at a time: a 7B in fp32 is 28 GB
        _reference_cache[key] = load_engine(cfg.model, cfg.runtime)
    return _reference_cache[key]


def unmatched_patterns(fp32_onnx: Path, patterns: list[str]) -> list[str]:
    """Exclusion patterns that name no node, weight or module of the graph (almost always a typo)."""
    if not patterns:
        return []
    model = load_model(fp32_onnx)
    inits = initializers(model)
    names = {n for node in model.graph.node for n in node_names(node, inits)}
    return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]


def quantize_variant(fp32: Artifact, variant: Variant | VariantConfig, calib: Any, target: Path, cfg: Config,
                     progress: Any = None) -> Artifact:
    """Build `variant` (resolved by the caller, or a config section resolved here) from the fp32 artifact into `target`
    (atomic); CheckFailed when parity fails."""
    resolved = variant if isinstance(variant, Variant) else resolve_variant(variant)
    scheme = resolved.scheme
    if resolved.reads_calibration and calib is None:
        raise UserError(f"{scheme.name} ({scheme.method}) needs a calibration set", where="calibration")
    variant = resolved.config
    missing = unmatched_patterns(fp32.onnx_path, variant.exclude)
    if missing:
        raise UserError(f"exclude pattern(s) {', '.join(repr(p) for p in missing)} match no node, weight or module "
                        "of the model", where=f"{resolved.where}.exclude")
    parity = resolved.parity
    steps = Steps(progress, variant.variant_name)
    started = time.perf_counter()
    target = Path(target)
    with atomic_folder(target) as folder:
        for item in fp32.path.iterdir():
            if item.is_file() and item.name not in SKIP_FILES:
                shutil.copy2(item, folder / item.name)
        job = QuantizeJob(source=fp32.onnx_path, folder=fp32.path, target=folder,
                          samples=list(calib.samples) if calib is not None else None, exclude=list(variant.exclude),
                          external_data=cfg.export.external_data, progress=steps, provider=cfg.runtime.provider)
        report = auto_quantize(scheme, scheme.auto, job) if scheme.auto is not None else scheme.quantize(job)
        quantize_seconds = time.perf_counter() - started
        steps(f"{variant.variant_name}: checking parity against PyTorch")
        figures = check_against_reference(cfg, fp32, folder, parity)
        figures["candidate"]["path"] = str(target)
        from llmship.export.parity import parity_failures

        failures = parity_failures(figures, parity)
        manifest = variant_manifest(fp32, resolved, calib, report, folder, parity, figures, failures,
                                    {"quantize_s": round(quantize_seconds, 2), "total_s": round(time.perf_counter() - started, 2)})
        if failures:
            raise CheckFailed(f"variant {variant.variant_name} failed parity against PyTorch: " + "; ".join(failures))
        from llmship.export.genai_config import write_folder_genai_config

        write_folder_genai_config(folder, cfg.runtime.provider)
        write_manifest(folder, manifest)
    steps.done()
    return Artifact.load(target)


def check_against_reference(cfg: Config, fp32: Artifact, folder: Path, parity: ParityConfig) -> dict[str, Any]:
    from llmship.export.parity import check_parity, parity_prompts
    from llmship.runtime.segmented import parity_engine
    from llmship.source import load_tokenizer

    reference = reference_engine(cfg)
    candidate = parity_engine(folder, parity.layer_at_a_time, cfg.runtime.provider, cfg.runtime.threads,
                              export_mode=cfg.export.parity.layer_at_a_time)
    try:
        prompts, prompt_source = parity_prompts(reference, load_tokenizer(fp32.path), parity)
        return {**check_parity(reference, candidate, parity, prompts), "prompt_source": prompt_source}
    finally:
        candidate.close()


def variant_manifest(fp32: Artifact, resolved: Variant, calib: Any, report: dict[str, Any], folder: Path,
                     parity: ParityConfig, figures: dict[str, Any], failures: list[str],
                     timings: dict[str, float]) -> dict[str, Any]:
    variant, scheme = resolved.config, resolved.scheme
    size = model_size(folder)
    fp32_size = model_size(fp32.path)
    onnx_info = dict(fp32.manifest.get("onnx", {}))
    onnx_info.update({"file": MODEL_FILE, "external_data": (folder / MODEL_DATA_FILE).exists()})
    return new_manifest(
        "variant",
        scheme=variant.scheme,
        variant=variant.variant_name,
        method=scheme.method,
        options=scheme.options.model_dump(),
        exclude=list(variant.exclude),
        source=fp32.manifest.get("source", {}),
        fp32={"path": str(fp32.path), "model_bytes": fp32_size},
        model=fp32.manifest.get("model", {}),
        onnx=onnx_info,
        tokenizer_files=fp32.manifest.get("tokenizer_files", []),
        calibration=getattr(calib, "fingerprint", None) if resolved.reads_calibration else None,
        quantization=report,
        size={"model_bytes": size, "fp32_model_bytes": fp32_size, "ratio": round(size / fp32_size, 4) if fp32_size else None},
        parity={"passed": not failures, "failures": failures, "tolerances": parity.model_dump(), **figures},
        timings=timings,
    )
