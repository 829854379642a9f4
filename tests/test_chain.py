"""The whole chain through the real CLI on the embedded model: report contents (also rendered in headless
chromium), stage caching, eval-only reruns, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmship.config import EMBEDDED_MODEL_DIR

pytestmark = pytest.mark.skipif(not (EMBEDDED_MODEL_DIR / "config.json").is_file(), reason="embedded model not built")

# Smaller than the demo so the suite stays quick; the demo itself runs the full YAML.
QUICK = ["bench.num_prompts=4", "eval.ceval.max_questions=24", "eval.perplexity.windows=8",
         "eval.consistency_prompts=8"]


def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmship.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("chain") / "out"
    start = time.perf_counter()
    proc = cli("run", "llmship/demo.yaml", f"output.dir={out}", "--quiet", *QUICK)
    first_wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, first_wall


def test_run_writes_report_with_every_section(demo_run):
    out, proc, _ = demo_run
    report = out / "report"
    assert f"report: {report / 'report.html'}" in proc.stdout
    summary = json.loads((report / "summary.json").read_text())
    names = [v["variant"] for v in summary["variants"]]
    assert names == ["fp32", "w8a8-dynamic", "w4a16-rtn"]
    sizes = {v["variant"]: v["size_ratio"] for v in summary["variants"]}
    assert sizes["fp32"] == pytest.approx(1.0) and sizes["w8a8-dynamic"] < 0.5 and sizes["w4a16-rtn"] < 0.4
    assert all(v["parity"] for v in summary["variants"])
    assert summary["accuracy"] and summary["gate"] and all(g["passed"] for g in summary["gate"])
    engines = summary["bench"]["engines"]
    assert len(engines) == 4  # PyTorch baseline + three variants
    assert all(e["metrics"]["output_throughput"] > 0 for e in engines)
    md = (report / "report.md").read_text()
    for heading in ("## Variants", "## Accuracy", "## Gate", "## Speed", "## Environment"):
        assert heading in md
    assert summary["environment"]["libraries"]["onnxruntime"] != "absent"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no headless chromium installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(demo_run, tmp_path):
    out, _, _ = demo_run
    html_path = out / "report" / "report.html"
    probe = tmp_path / "probe.html"
    # The probe loads the report in an iframe-free way: chromium dumps the DOM after layout, and a script
    # appended to a copy of the page records how many tables rendered and whether every image decoded.
    script = ("<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
              "document.body.setAttribute('data-probe',JSON.stringify({tables:document.querySelectorAll('table').length,"
              "rows:document.querySelectorAll('tbody tr').length,images:imgs.length,"
              "decoded:imgs.filter(i=>i.complete&&i.naturalWidth>0).length}));});</script>")
    probe.write_text(html_path.read_text().replace("</body>", script + "</body>"))
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                           "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    match = re.search(r"data-probe=\"([^\"]+)\"", proc.stdout)
    assert match, proc.stderr[-2000:]
    facts = json.loads(match.group(1).replace("&quot;", '"'))
    assert facts["tables"] >= 5 and facts["rows"] >= 10
    assert facts["images"] >= 2 and facts["decoded"] == facts["images"]


def test_rerun_redoes_nothing_and_eval_change_reruns_only_eval(demo_run):
    out, _, first_wall = demo_run
    stages = out / ".llmship" / "stages"
    before = {p.name: p.stat().st_mtime_ns for p in stages.iterdir()}
    start = time.perf_counter()
    proc = cli("run", "llmship/demo.yaml", f"output.dir={out}", *QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.perf_counter() - start < first_wall / 2
    assert {p.name: p.stat().st_mtime_ns for p in stages.iterdir()} == before
    assert "up to date" in proc.stderr

    proc = cli("run", "llmship/demo.yaml", f"output.dir={out}", *QUICK[:1], "eval.ceval.max_questions=16", *QUICK[2:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in stages.iterdir()}
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {"eval.json"}


def test_sigkill_then_rerun_loses_nothing(tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "llmship.cli", "compile", "llmship/demo.yaml", f"output.dir={out}", "--quiet"]
    stages = out / ".llmship" / "stages"
    # Kill once while the fp32 export is being written, once while a variant is being built.
    for wait_for in (None, "export.json"):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if wait_for is None and any(out.glob("fp32.tmp-*")):
                break
            if wait_for and (stages / wait_for).is_file() and any(out.glob("*.tmp-*")):
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        trusted = {p.stem for p in stages.glob("*.json")} if stages.is_dir() else set()
        for stage in trusted:  # anything the index trusts is complete
            record = json.loads((stages / f"{stage}.json").read_text())
            assert (Path(record["artifact"]) / "manifest.json").is_file()
    proc = cli("compile", "llmship/demo.yaml", f"output.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fp32 export is up to date" in proc.stderr
    for name in ("fp32", "w8a8-dynamic", "w4a16-rtn"):
        assert (out / name / "manifest.json").is_file()
    assert not list(out.glob("*.tmp-*"))
