"""The data layer (llmship/data): below every stage, free of import cycles, one reader per dataset kind."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import llmship
from llmship.config import SAMPLES_DIR
from llmship.data.sources import data_fingerprint, resolve

DATA = Path(llmship.__file__).parent / "data"
# What the data layer may import from llmship: the config tree, the errors, the cache layer and itself.
ALLOWED = ("llmship.config", "llmship.errors", "llmship.cache", "llmship.data")


def _llmship_imports(file: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmship"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("llmship"))
    return found


def test_the_data_layer_imports_nothing_above_it():
    for file in sorted(DATA.glob("*.py")):
        above = sorted(m for m in _llmship_imports(file) if not m.startswith(ALLOWED))
        assert not above, f"{file.name} imports {above}"


def test_the_package_imports_no_submodule_so_the_mixture_has_no_cycle():
    assert _llmship_imports(DATA / "__init__.py") == set()
    code = "import sys, llmship.data; print(sorted(m for m in sys.modules if m.startswith('llmship.data.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert "llmship.data.mixture" not in _llmship_imports(DATA / "sources.py")


def test_every_dataset_kind_has_its_bundled_sample():
    for kind in ("c4", "ceval", "alpaca", "sharegpt", "cmmlu"):
        folder = resolve("@embedded", kind)
        assert folder == SAMPLES_DIR / kind and any(folder.rglob("*.*"))
        assert len(data_fingerprint("@embedded", kind)) == 16
    assert data_fingerprint("haonan-li/cmmlu", "cmmlu") == "hub:haonan-li/cmmlu"
