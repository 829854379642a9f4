"""Atomic outputs: a compile that fails (parity) or dies (crash while writing weights) leaves the earlier output
folder exactly as it was and no half-written file behind; a writer killed between its two renames is repaired."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmship.artifact import Artifact, atomic_folder, write_manifest
from llmship.config import Config
from llmship.errors import CheckFailed
from llmship.export import export_fp32
from llmship.export.parity import parity_failures


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}


@pytest.fixture
def earlier(tmp_path) -> Path:
    """An earlier output folder (as a previous compile left it)."""
    folder = tmp_path / "out" / "fp32"
    with atomic_folder(folder) as tmp:
        (tmp / "model.onnx").write_bytes(b"earlier graph")
        (tmp / "model.onnx.data").write_bytes(b"earlier weights")
        write_manifest(tmp, {"llmship": {"format": 1}, "onnx": {"file": "model.onnx"}})
    return folder


def _config(model_dir: Path) -> Config:
    cfg = Config()
    cfg.model.path = str(model_dir)
    cfg.export.optimize = False
    cfg.export.parity.greedy_tokens = 0
    return cfg


def test_failed_parity_keeps_the_earlier_folder(earlier, tiny_model):
    before = _snapshot(earlier)
    cfg = _config(tiny_model)
    cfg.export.parity.max_logits_diff = 0.0  # no real export reaches 0: parity fails inside the atomic write
    with pytest.raises(CheckFailed, match=r"max \|logits diff\| [0-9.e-]+ > 0"):
        export_fp32(cfg, earlier)
    assert _snapshot(earlier) == before
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["fp32"]  # no tmp-/old- leftovers
    assert Artifact.load(earlier).manifest["size_bytes"] == len(b"earlier graph") + len(b"earlier weights")


def test_crash_while_writing_weights_keeps_the_earlier_folder(earlier, tiny_model, monkeypatch):
    import llmship.export.onnx_export as onnx_export

    before = _snapshot(earlier)
    seen = {}

    def crash(model, folder, **_):
        seen["folder"] = folder
        (folder / "model.onnx.data").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "export_decoder", crash)
    with pytest.raises(KeyboardInterrupt):
        export_fp32(_config(tiny_model), earlier)
    assert seen["folder"] == earlier.with_name(f"fp32.tmp-{os.getpid()}")  # a fresh sibling, never the target
    assert not seen["folder"].exists() and _snapshot(earlier) == before


def test_writer_killed_between_renames_is_repaired(earlier):
    # A writer (dead pid) parked the earlier folder and died before renaming its new one in.
    before = _snapshot(earlier)
    dead_pid = 2**22 + 12345
    os.replace(earlier, earlier.with_name(f"fp32.old-{dead_pid}"))
    stale = earlier.with_name(f"fp32.tmp-{dead_pid}")
    stale.mkdir()
    (stale / "model.onnx.data").write_bytes(b"half")
    with pytest.raises(RuntimeError), atomic_folder(earlier) as tmp:
        (tmp / "model.onnx").write_bytes(b"never lands")
        raise RuntimeError("fail this write too")
    assert _snapshot(earlier) == before and sorted(p.name for p in earlier.parent.iterdir()) == ["fp32"]


def test_successful_write_replaces_the_folder(earlier):
    with atomic_folder(earlier) as tmp:
        (tmp / "model.onnx").write_bytes(b"new graph")
    assert sorted(p.name for p in earlier.iterdir()) == ["model.onnx"]  # nothing of the old folder is appended
    assert (earlier / "model.onnx").read_bytes() == b"new graph"
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["fp32"]


def test_parity_failures_name_each_exceeded_tolerance():
    from llmship.config import ParityConfig

    figures = {"max_logits_diff": 3e-3, "prefill_max_diff": 3e-3, "decode_max_diff": 1e-5, "batch_max_diff": 2e-5,
               "top1_agreement": 0.9, "prefill_top1": 0.9, "decode_top1": 1.0, "batch_top1": 1.0,
               "greedy_match": 0.5, "greedy_tokens": 32, "nll_reference": 2.0, "nll_candidate": 2.2, "nll_increase": 0.1}
    failures = parity_failures(figures, ParityConfig())
    assert len(failures) == 4
    assert failures[0].startswith("max |logits diff| 0.003 > 0.0001") and "top-1 agreement 0.9000" in failures[1]
    assert "greedy tokens match 0.500 of 32" in failures[2] and "NLL increase 10.00%" in failures[3]
    loose = ParityConfig(max_logits_diff=1e-2, min_top1_agreement=0.8, min_greedy_match=0.5, max_nll_increase=0.2)
    assert parity_failures(figures, loose) == []
    assert parity_failures({**figures, "max_logits_diff": float("nan")}, loose)  # NaN never passes


def test_slim_without_onnxslim_is_a_user_error(tmp_path, monkeypatch):
    import importlib.util

    from llmship.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxslim" else real(name, *a))
    cfg = _config(tmp_path)
    cfg.export.slim = True
    with pytest.raises(UserError, match="onnxslim"):
        export_fp32(cfg, tmp_path / "out")


def test_slim_keeps_a_graph_that_passes_parity(tmp_path, tiny_model):
    pytest.importorskip("onnxslim")
    cfg = _config(tiny_model)
    cfg.export.slim = True
    artifact = export_fp32(cfg, tmp_path / "fp32")
    slim = artifact.manifest["slim"]
    assert slim["applied"], slim
    assert slim["nodes_after"] <= slim["nodes_before"] and artifact.manifest["parity"]["max_logits_diff"] <= 1e-4
    assert not (artifact.path / ".slim").exists()
