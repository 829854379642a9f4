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
from testkit import run_cli as cli

from llmship.config import EMBEDDED_MODEL_DIR

pytestmark = pytest.mark.skipif(not (EMBEDDED_MODEL_DIR / "config.json").is_file(), reason="embedded model not built")

# Smaller than the demo so the suite stays quick; the demo itself runs the full YAML.
QUICK = ["bench.num_prompts=4", "eval.ceval.max_questions=24", "eval.perplexity.windows=8",
         "eval.consistency_prompts=8", "eval.cmmlu.enabled=false"]  # CMMLU: tests/eval/test_cmmlu.py


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("chain") / "out"
    start = time.perf_counter()
    proc = cli("run", "llmship/demo.yaml", f"output.dir={out}", "--quiet", *QUICK)
    first_wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, first_wall


@pytest.mark.slow
def test_run_writes_report_with_every_section(demo_run):
    out, proc, _ = demo_run
    report = out / "report"
    assert f"report: {report / 'report.html'}" in proc.stdout
    summary = json.loads((report / "summary.json").read_text())
    names = [v["variant"] for v in summary["variants"]]
    assert names == ["fp32", "w8a8-dynamic", "w4a16-rtn"]
    sizes = {v["variant"]: v["size_ratio"] for v in summary["variants"]}
    assert sizes["fp32"] == pytest.approx(1.0) and sizes["w8a8-dynamic"] < 0.5 and sizes["w4a16-rtn"] < 0.4
    assert all(v["parity"]["passed"] for v in summary["variants"])
    assert summary["accuracy"] and summary["gate"] and all(g["passed"] for g in summary["gate"])
    # issue 5: the exported fp32 graph predicts what PyTorch predicts on >= 99.5% of the C-Eval questions, both modes
    results = json.loads((out / "eval" / "results.json").read_text())
    fp32 = results["engines"]["fp32"]["metrics"]
    assert fp32["ceval/ppl/agreement"] >= 99.5 and fp32["ceval/gen/agreement"] >= 99.5
    assert len(results["engines"]["pytorch"]["predictions"]["ppl"]) == 96  # every val question of the sample
    engines = summary["bench"]["engines"]
    assert len(engines) == 4  # PyTorch baseline + three variants
    assert all(e["metrics"]["output_throughput"] > 0 for e in engines)
    md = (report / "report.md").read_text()
    for heading in ("## Variants", "## Accuracy", "## Gate", "## Speed", "## Environment"):
        assert heading in md
    assert summary["environment"]["libraries"]["onnxruntime"] != "absent"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert changed == {"eval.json", "eval-baseline.json"}  # the baseline cache is a stage of its own, rescored too

    # only the gate's goals change: the stored scores are re-gated, nothing is scored again
    scored = json.loads((out / "eval" / "results.json").read_text())["wall_s"]
    eval_args = [*QUICK[:1], "eval.ceval.max_questions=16", *QUICK[2:]]
    proc = cli("run", "llmship/demo.yaml", f"output.dir={out}", *eval_args, "gate.goals.1.value=50.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval scores are up to date" in proc.stderr
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["wall_s"] == scored  # the scores are the stored ones
    ppl_rows = [row for row in results["gate"] if row["metric"] == "ppl/c4"]
    assert ppl_rows and all(row["limit"] == pytest.approx(row["baseline"] * 1.5) for row in ppl_rows)  # 50% allowed


def _kill_when(args: list[str], ready, timeout: float = 900) -> None:
    """Start the CLI in its own process group and SIGKILL the whole group once `ready(pid)` is true."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready(proc.pid):
        time.sleep(0.02)
    finished = proc.poll() is not None
    if not finished:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not finished, "the run ended before the kill point; the test did not kill anything"


def _trusted_records_are_complete(stages: Path) -> dict[str, str]:
    """Every stage the index trusts points at a complete artifact; returns stage -> key."""
    keys = {}
    for file in stages.glob("*.json") if stages.is_dir() else []:
        record = json.loads(file.read_text())
        artifact = stages.parent.parent / record["artifact"]  # relative to output.dir
        assert artifact.is_dir() and not artifact.name.count(".tmp-")
        assert (artifact / "manifest.json").is_file() or any(artifact.glob("*.json"))
        keys[file.stem] = record["key"]
    return keys


@pytest.mark.slow
def test_sigkill_then_rerun_loses_nothing(tmp_path):
    """SIGKILL a real `llmship run` at four moments (mid fp32 export, mid variant build, mid eval, mid bench); after
    each kill the index trusts only complete artifacts, finished stages are not redone, and the last rerun finishes."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "llmship.cli", "run", "llmship/demo.yaml", f"output.dir={out}", "--quiet", *QUICK]
    stages = out / ".llmship" / "stages"

    def building(prefix: str):
        return lambda _pid: any(out.glob(f"{prefix}.tmp-*"))

    def eval_scoring_variants(_pid: int) -> bool:  # the baseline is scored and cached, the variants are next
        return any((out / ".llmship" / "eval-baseline").glob("*/baseline.json"))

    def bench_worker_running(pid: int) -> bool:
        import psutil

        try:
            children = psutil.Process(pid).children(recursive=True)
            return any("llmship.bench.runner" in " ".join(c.cmdline()) for c in children if c.is_running())
        except psutil.Error:  # a child that exited between the listing and the look
            return False

    kill_points = [building("fp32"), building("w4a16-rtn"), eval_scoring_variants, bench_worker_running]
    finished: dict[str, str] = {}
    for ready in kill_points:
        _kill_when(args, ready)
        keys = _trusted_records_are_complete(stages)
        assert all(keys.get(stage) == key for stage, key in finished.items())  # nothing finished was lost
        finished = keys
    assert {"export", "variant-w8a8-dynamic", "variant-w4a16-rtn", "eval"} <= set(finished)
    fp32_manifest = (out / "fp32" / "manifest.json").stat().st_mtime_ns
    proc = cli("run", "llmship/demo.yaml", f"output.dir={out}", *QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fp32 export is up to date" in proc.stderr and "eval scores are up to date" in proc.stderr
    assert (out / "fp32" / "manifest.json").stat().st_mtime_ns == fp32_manifest
    assert (out / "report" / "report.html").is_file() and (out / "bench" / "bench.json").is_file()
    assert not list(out.glob("*.tmp-*")) and not list(out.glob("*.old-*"))


def test_rebuild_forgets_the_old_record(tmp_path, monkeypatch):
    """A run stopped after a rebuilt folder was swapped in but before its new record was written must not leave the
    old record trusting the new folder; a build that fails before its swap keeps the old record (and folder)."""
    from llmship import pipeline
    from llmship.cache import record
    from llmship.config import load_config
    from llmship.quantize import resolve_variants

    cfg = load_config("llmship/demo.yaml", [f"output.dir={tmp_path}"])
    index = tmp_path / ".llmship" / "stages" / "export.json"

    def stopped_after_swap(cfg, target, progress=None):
        from llmship.artifact import swap_in

        built = target.with_name("fp32.tmp-built")
        built.mkdir()
        swap_in(built, target)  # a new folder in place of the old one, as the atomic write leaves it
        raise KeyboardInterrupt  # stands for a stop between the swap and the record

    def failed_before_swap(cfg, target, progress=None):
        from llmship.errors import UserError

        raise UserError("bad model folder", where="model.path")

    for build, kept in ((failed_before_swap, True), (stopped_after_swap, False)):
        (tmp_path / "fp32").mkdir(exist_ok=True)
        record(tmp_path, "export", "key-of-another-config", tmp_path / "fp32")
        monkeypatch.setattr(pipeline, "export_fp32", build)
        with pytest.raises((KeyboardInterrupt, Exception)):
            pipeline.compile_variants(cfg, tmp_path, resolve_variants(cfg.quantize))
        assert index.exists() == kept, build.__name__


@pytest.mark.slow
def test_corrupted_variant_fails_the_demo_gate_with_exit_1(demo_run, tmp_path):
    """`llmship eval` on a compiled folder whose weights were damaged after compile: the eval is not served from the
    cache, the demo's gate fails, the CLI exits 1 with the failure table, and junit.xml reports the failure."""
    import xml.etree.ElementTree as ET

    import numpy as np
    import onnx
    from onnx import numpy_helper

    out, _, _ = demo_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)  # the stage records hold paths relative to output.dir: the copy's are its own
    graph = copy / "w8a8-dynamic" / "model.onnx"
    model = onnx.load(str(graph))
    matmul_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    for init in matmul_weights[:4]:
        arr = numpy_helper.to_array(init)
        noisy = np.random.default_rng(0).integers(-127, 128, size=arr.shape, dtype=np.int8)
        init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    onnx.save(model, str(graph))
    proc = cli("eval", "llmship/demo.yaml", f"output.dir={copy}", "--quiet", *QUICK)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "gate goal(s) failed" in proc.stderr and "w8a8-dynamic" in proc.stderr
    failures = [tc for tc in ET.parse(copy / "eval" / "junit.xml").getroot().iter("testcase") if tc.find("failure") is not None]
    assert failures and all("w8a8-dynamic" in (tc.get("name", "") + tc.get("classname", "")) for tc in failures)


def test_variant_key_follows_the_schemes_resolved_defaults(monkeypatch, tmp_path):
    """A variant written as `{scheme: w8a8-dynamic}` must be rebuilt when a release changes that scheme's defaults:
    the key holds the scheme's resolved options, not only what the YAML wrote."""
    from llmship.config import Config
    from llmship.pipeline import compile_stages
    from llmship.quantize import resolve_variants
    from llmship.quantize.w8a8_dynamic import W8A8Dynamic

    cfg = Config.model_validate({"quantize": {"scheme": "w8a8-dynamic"}})

    def variant_key() -> str:  # resolved anew, as every run resolves its variants
        return compile_stages(cfg, tmp_path, resolve_variants(cfg.quantize))["w8a8-dynamic"].key(tmp_path)

    before = variant_key()
    assert variant_key() == before
    resolved = W8A8Dynamic.describe

    def other_default(self):
        described = resolved(self)
        return {**described, "options": {**described["options"], "fine_method": "blocks"}}

    monkeypatch.setattr(W8A8Dynamic, "describe", other_default)
    assert variant_key() != before
