"""The eval's data through llmship.data.sources (one reader per format for the whole project), plus the
fingerprints of the data files that key the baseline cache."""

from __future__ import annotations

from typing import Any


def read_ceval(path: str) -> Any:
    from llmship.data.sources import read_ceval as reader

    return reader(path)


def read_c4_texts(path: str) -> list[str]:
    from llmship.data.sources import read_c4

    return read_c4(path, split="validation")


def read_alpaca(path: str) -> list[dict[str, Any]]:
    """The held-out part of alpaca-cleaned (the records calibration never draws)."""
    from llmship.data.sources import alpaca_part
    from llmship.data.sources import read_alpaca as reader

    return alpaca_part(reader(path), "eval")


def fingerprint(path: str, kind: str) -> str:
    """Hash of the local data files (a hub dataset id hashes as its name)."""
    from llmship.data.sources import data_fingerprint

    return data_fingerprint(path, kind)
