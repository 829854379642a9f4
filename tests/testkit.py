"""Paths and helpers the test modules share, importable as `testkit` from any test folder (tests/conftest.py puts
tests/ on sys.path: pytest's default "prepend" import mode, test folders without __init__.py, unique module names).
The session fixtures built on them are in tests/conftest.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ASSETS = ROOT / "tests" / "assets"
NATURAL_MODEL_DIR = ASSETS / "natural-llama"
# The real-data samples beside the checkout (C4, C-Eval, alpaca-cleaned, ShareGPT, the LLaMA 32k tokenizer); never
# copied into the repository, so every test that reads them skips when they are absent.
SHARED_DATA = ROOT.parent / "shared" / "data"


def run_cli(*args: str, timeout: int = 900, cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    """`python -m llmship.cli ARGS` in a fresh interpreter (exit codes, stderr and signals as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "llmship.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, **kwargs)
