"""Facts about the machine a run happened on, recorded in every report."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def physical_cores() -> int | None:
    try:
        import psutil
    except ImportError:  # psutil is a dependency; keep the report working without it
        return None
    return psutil.cpu_count(logical=False)


def environment(threads: int) -> dict[str, Any]:
    from llmship.cache import library_versions

    try:
        import psutil

        memory_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # psutil is a dependency; keep the report working without it
        memory_gib = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "physical_cores": physical_cores(),
        "threads": threads or "0 (eval: each library's default; bench: the physical cores, for every engine)",
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": library_versions(),
    }
