"""Report: what the variants table shows, read from the compiled variants' manifests."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, embedded_fp32):
    """fp32 (the session's default export of the embedded model) and w8a16 quantized from it (no calibration set)."""
    import shutil

    from llmship.config import Config, VariantConfig
    from llmship.quantize.variant import quantize_variant

    root = tmp_path_factory.mktemp("report")
    cfg = Config()  # model.path: @embedded
    cfg.runtime.threads = 1
    fp32 = embedded_fp32
    shutil.copytree(fp32.path, root / "fp32", symlinks=True)  # the report reads the variants from one folder
    w8a16 = quantize_variant(fp32, VariantConfig(scheme="w8a16"), None, root / "w8a16", cfg)
    return cfg, root, fp32, w8a16


def _variants_table(markdown: str) -> dict[str, list[str]]:
    """The first table under "## Variants" as {variant: {column: cell}}."""
    lines = markdown.split("## Variants", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| variant |"))
    table = lines[start : next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))]
    columns = [c.strip() for c in table[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    return {row[0]: dict(zip(columns, row, strict=True)) for row in rows}


@pytest.mark.parametrize("listed", [("w8a16",), ("fp32", "w8a16")])
def test_size_ratio_comes_from_each_manifest(compiled, tmp_path, listed):
    from llmship.report import write_report

    cfg, root, fp32, w8a16 = compiled
    size = w8a16.manifest["size"]
    assert 0.2 < size["ratio"] < 0.9 and size["model_bytes"] == w8a16.manifest["model_bytes"]
    write_report(cfg, {name: root / name for name in listed}, None, None, tmp_path / "report")
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    rows = {v["variant"]: v for v in summary["variants"]}
    assert rows["w8a16"]["size_ratio"] == size["ratio"] and rows["w8a16"]["model_bytes"] == size["model_bytes"]
    table = _variants_table((tmp_path / "report" / "report.md").read_text())
    assert table["w8a16"]["size / fp32"] == f"{size['ratio']:.4f}"  # not "-" when fp32 is not listed
    assert table["w8a16"]["model MB"] == f"{size['model_bytes'] / 1e6:.2f}"
    if "fp32" in listed:
        assert rows["fp32"]["size_ratio"] == 1.0 and table["fp32"]["size / fp32"] == "1.00"
        assert rows["w8a16"]["size_ratio"] == pytest.approx(rows["w8a16"]["model_bytes"] / rows["fp32"]["model_bytes"], abs=1e-4)


def test_size_ratio_is_unknown_without_a_size_record(compiled, tmp_path):
    """A folder whose manifest has no size section (a non-fp32 scheme from an older llmship) shows '-'."""
    import shutil

    from llmship.report import variant_rows

    _, root, _, _ = compiled
    old = tmp_path / "old"
    shutil.copytree(root / "w8a16", old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["size"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    (row,) = variant_rows({"old": old})
    assert row["size_ratio"] is None and row["model_bytes"] == manifest["model_bytes"]
