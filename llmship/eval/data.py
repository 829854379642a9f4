"""The eval's data through llmship.calib_data.sources (one reader per format for the whole project), plus the
fingerprints of the data files that key the baseline cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def read_ceval(path: str) -> Any:
    from llmship.calib_data.sources import read_ceval as reader

    return reader(path)


def read_c4_texts(path: str) -> list[str]:
    from llmship.calib_data.sources import read_c4

    return read_c4(path)


def read_alpaca(path: str) -> list[dict[str, Any]]:
    from llmship.calib_data.sources import read_alpaca as reader

    return reader(path)


def fingerprint(path: str, kind: str) -> str:
    """Hash of the local data files (a hub dataset id hashes as its name)."""
    from llmship.calib_data.sources import resolve
    from llmship.pipeline import folder_fingerprint

    source = resolve(path, kind)
    return folder_fingerprint(source) if isinstance(source, Path) and source.exists() else f"hub:{path}"
