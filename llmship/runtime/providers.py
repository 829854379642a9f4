"""The one table of execution providers: what `runtime.provider` names in ONNX Runtime and in onnxruntime-genai.

Every ORT session llmship opens and every genai_config.json it writes takes its provider from here. Sessions that
must run on the CPU whatever the config says (calibration probes, the bandwidth probe, fusion checks) use
`CPU_ONLY`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmship.errors import UserError


@dataclass(frozen=True)
class Provider:
    """One `runtime.provider` value."""

    ort_name: str  # ONNX Runtime's execution provider
    genai_name: str | None  # key in genai_config.json's provider_options (None: the CPU needs no entry)
    package: str  # the pip package whose onnxruntime has this provider
    fp16: str  # what an fp16 variant needs from it
    ort_options: dict[str, Any] = field(default_factory=dict)  # provider options of every ORT session


PROVIDERS: dict[str, Provider] = {
    "cpu": Provider("CPUExecutionProvider", None, "onnxruntime",
                    "runs, with ORT inserting casts around ops that have no fp16 CPU kernel (slower than fp32)"),
    "cuda": Provider("CUDAExecutionProvider", "cuda", "onnxruntime-gpu", "native fp16 kernels"),
}
CPU_ONLY = [PROVIDERS["cpu"].ort_name]


def provider(name: str) -> Provider:
    if name not in PROVIDERS:
        raise UserError(f"unknown provider {name!r}; use one of {', '.join(PROVIDERS)}", where="runtime.provider")
    return PROVIDERS[name]


def missing_provider(name: str) -> str | None:
    """Why ONNX Runtime cannot run `name` here, or None when it can."""
    import onnxruntime as ort

    wanted = provider(name)
    available = ort.get_available_providers()
    if wanted.ort_name in available:
        return None
    return (f"ONNX Runtime has no {wanted.ort_name} here (available: {', '.join(available)}); "
            f"install {wanted.package} for {name}, or set runtime.provider=cpu")


def ort_providers(name: str) -> list[Any]:
    """The `providers` argument of an InferenceSession: the provider (with its options), then the CPU as fallback for
    ops it lacks; a clear error when this onnxruntime lacks it."""
    problem = missing_provider(name)
    if problem is not None:
        raise UserError(problem, where="runtime.provider")
    wanted = provider(name)
    entry = (wanted.ort_name, wanted.ort_options) if wanted.ort_options else wanted.ort_name
    return [entry] if wanted.ort_name in CPU_ONLY else [entry, *CPU_ONLY]


def genai_provider_options(name: str) -> list[dict[str, Any]]:
    """genai_config.json's `session_options.provider_options` for `name` (empty for the CPU, as the builder writes)."""
    wanted = provider(name)
    return [] if wanted.genai_name is None else [{wanted.genai_name: dict(wanted.ort_options)}]
