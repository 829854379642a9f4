"""Preflight: every input a verb reads is checked before anything is built; calibration is read only by the schemes
that declare it; stage records hold paths relative to output.dir, so a copied output folder is reused."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testkit import CONFIGS, ROOT
from typer.testing import CliRunner

from llmship.cli import app
from llmship.config import VariantConfig, load_config


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def message(result) -> str:
    """The error message with rich's wrapping undone."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    first = next(i for i, line in enumerate(lines) if line.startswith("error:"))
    return " ".join(lines[first:])


# --------------------------------------------------------------------------- the scheme registry
@pytest.mark.parametrize(("variant", "reads"), [
    ({"scheme": "none"}, False),
    ({"scheme": "fp16"}, True),  # the overflow scan runs the calibration samples
    ({"scheme": "fp16", "options": {"overflow_scan": False}}, False),
    ({"scheme": "w8a8-dynamic"}, False),
    ({"scheme": "w8a8-static"}, True),
    ({"scheme": "w8a16"}, False),
    ({"scheme": "w4a16", "method": "rtn"}, False),
    ({"scheme": "w4a16", "method": "hqq"}, False),
    ({"scheme": "w4a16", "method": "gptq"}, True),
    ({"scheme": "w4a16"}, False),  # rtn is the default method
])
def test_each_scheme_declares_whether_it_reads_calibration(variant, reads):
    from llmship.quantize import resolve_variant

    assert resolve_variant(VariantConfig(**variant)).reads_calibration is reads


def test_config_schemes_are_the_registry(tmp_path):
    from llmship.errors import UserError
    from llmship.quantize import SCHEMES

    for name in SCHEMES:  # every registered scheme is a valid `scheme:`, fp32's spelled `none` as before
        assert load_config(None, [f"quantize.scheme={name}"]).quantize.scheme == name
    assert SCHEMES["none"].builds_export and load_config(None, []).quantize.variant_name == "fp32"
    config = tmp_path / "cfg.yaml"
    config.write_text("quantize:\n  variants:\n    - {scheme: w3a7}\n")
    with pytest.raises(UserError) as err:
        load_config(config)
    text = str(err.value)
    assert f"{config}:3" in text and "quantize.variants.0.scheme" in text and "unknown scheme 'w3a7'" in text
    assert all(name in text for name in SCHEMES)
    result = invoke("check", config)
    assert result.exit_code == 2 and "Traceback" not in result.stderr and "w3a7" in message(result)


def _compile_keys(cfg, out: Path) -> dict[str, str]:
    from llmship.pipeline import compile_stages
    from llmship.quantize import resolve_variants

    return {name: stage.key(out) for name, stage in compile_stages(cfg, out, resolve_variants(cfg.quantize)).items()}


def test_calibration_is_in_the_key_of_the_variants_that_read_it_only(tmp_path):
    variants = ["quantize.variants=[{scheme: w8a8-dynamic}, {scheme: w4a16, method: gptq}]"]
    base = _compile_keys(load_config(None, variants), tmp_path)
    more = _compile_keys(load_config(None, [*variants, "calibration.seq_len=128"]), tmp_path)
    assert set(base) == {"fp32", "w8a8-dynamic", "w4a16-gptq"}
    assert base["fp32"] == more["fp32"] and base["w8a8-dynamic"] == more["w8a8-dynamic"]
    assert base["w4a16-gptq"] != more["w4a16-gptq"]


def test_a_variant_key_follows_the_export_it_is_built_from(tmp_path):
    """A variant consumes the export: its key changes with the export's record and with the fp32 folder's files."""
    from llmship.cache import record

    cfg = load_config(None, ["quantize.scheme=w8a16"])
    before = _compile_keys(cfg, tmp_path)
    assert _compile_keys(cfg, tmp_path) == before
    (tmp_path / "fp32").mkdir()
    (tmp_path / "fp32" / "model.onnx").write_bytes(b"one")
    record(tmp_path, "export", "k1", tmp_path / "fp32")
    exported = _compile_keys(cfg, tmp_path)
    assert exported["w8a16"] != before["w8a16"]
    (tmp_path / "fp32" / "model.onnx").write_bytes(b"two")
    assert _compile_keys(cfg, tmp_path)["w8a16"] != exported["w8a16"]


# --------------------------------------------------------------------------- llmship check
def test_check_lists_what_each_verb_reads():
    result = invoke("check", CONFIGS / "demo.yaml")
    assert result.exit_code == 0, result.stderr[-2000:]
    out = result.stdout
    for field in ("runtime.provider", "model.path", "eval.ceval.path", "eval.perplexity.c4_path",
                  "eval.perplexity.alpaca_path", "bench.dataset"):
        assert field in out, field
    assert "8 val + 8 dev CSV headers" in out  # the bundled C-Eval sample: 8 subjects
    assert "calibration: not read (no variant reads it: fp32, w8a8-dynamic, w4a16-rtn)" in out
    assert "ok: 9 input(s) checked for `llmship run`" in out  # the 9th: model.baseline, its memory plan
    assert "model.baseline" in out and "whole model" in out

    compile_only = invoke("check", CONFIGS / "demo.yaml", "quantize.variants.1.method=gptq", "--verb", "compile")
    assert compile_only.exit_code == 0, compile_only.stderr[-2000:]
    out = compile_only.stdout
    assert "calibration.sources.0.path" in out and "calibration (w4a16-gptq)" in out
    assert "eval.ceval.path" not in out and "bench.dataset" not in out


def test_every_eval_task_declares_its_data_to_the_preflight(tmp_path):
    """CMMLU's folder is checked before the export like every task's: the preflight loops over the task registry."""
    bad = tmp_path / "cmmlu"
    (bad / "test").mkdir(parents=True)
    result = invoke("run", CONFIGS / "demo.yaml", f"eval.cmmlu.path={bad}", f"output.dir={tmp_path / 'out'}")
    assert result.exit_code == 2, result.stderr[-2000:]
    assert len(error_lines(result)) == 1 and "no test/<subject>.csv files" in message(result)
    assert not (tmp_path / "out" / "fp32").exists()
    ok = invoke("check", CONFIGS / "demo.yaml")
    assert "eval.cmmlu.path" in ok.stdout and "eval: CMMLU" in ok.stdout
    off = invoke("check", CONFIGS / "demo.yaml", "eval.cmmlu.enabled=false")
    assert "eval.cmmlu: not read (CMMLU is off)" in off.stdout and "ok: 8 input(s)" in off.stdout


def test_missing_data_file_of_a_task_that_runs_is_named_in_one_line(tmp_path):
    missing = tmp_path / "no-c4.json.gz"
    out = tmp_path / "out"
    result = invoke("run", CONFIGS / "demo.yaml", f"eval.perplexity.c4_path={missing}", f"output.dir={out}")
    assert result.exit_code == 2, result.stderr[-2000:]
    assert len(error_lines(result)) == 1 and "Traceback" not in result.stderr
    text = message(result)
    assert "eval.perplexity.c4_path" in text and "no-c4.json.gz" in text
    assert not out.exists()  # stopped before the export
    # the same file is not read when its task is off
    off = invoke("check", CONFIGS / "demo.yaml", f"eval.perplexity.c4_path={missing}", "eval.perplexity.enabled=false",
                 "gate.goals=[]")  # the demo gates ppl/c4, and a goal on a task that is off is a config error
    assert off.exit_code == 0, off.stderr[-2000:]
    assert "eval.perplexity: not read" in off.stdout


def test_seq_len_above_max_positions_fails_at_preflight(tmp_path):
    out = tmp_path / "out"
    result = invoke("run", CONFIGS / "demo.yaml", "eval.perplexity.seq_len=2048", f"output.dir={out}")
    assert result.exit_code == 2, result.stderr[-2000:]
    assert "eval.perplexity.seq_len: seq_len 2048 exceeds the model's 1024 positions" in message(result)
    assert not out.exists()


def test_every_problem_in_one_line(tmp_path):
    result = invoke("check", CONFIGS / "demo.yaml", "eval.perplexity.seq_len=4096", f"bench.dataset={tmp_path / 'sg.json'}")
    assert result.exit_code == 2
    text = message(result)
    assert len(error_lines(result)) == 1 and text.startswith("error: 2 problems:")
    assert "seq_len 4096" in text and "sg.json" in text


def test_cuda_asked_on_a_cpu_only_runtime_fails_before_the_export(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    out = tmp_path / "out"
    started = time.perf_counter()
    result = invoke("compile", CONFIGS / "hf_llama_fp16.yaml", "model.path=@embedded", f"output.dir={out}")
    wall = time.perf_counter() - started
    assert result.exit_code == 2, result.stderr[-2000:]
    assert "runtime.provider" in message(result) and "CUDAExecutionProvider" in message(result)
    assert not out.exists()  # nothing exported, not even the folder
    assert wall < 30, wall  # the export alone took 31 s before the preflight


def test_unreachable_hub_lists_every_hub_field_once():
    """A real unreachable endpoint (a closed local port): one message naming every hub field the run would read;
    the int8 config's calibration ids are not among them (its schemes read no calibration)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llmship.cli", "check", str(CONFIGS / "hf_llama_int8.yaml"),
                           "model.path=@embedded"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    wall = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr[-2000:]
    text = " ".join(line for line in proc.stderr.splitlines() if line.strip())
    assert text.count("error:") == 1 and "Retrying" not in text
    assert "hub is unreachable" in text
    for field, repo in (("eval.ceval.path", "ceval/ceval-exam"), ("eval.perplexity.c4_path", "allenai/c4"),
                        ("eval.perplexity.alpaca_path", "yahma/alpaca-cleaned"),
                        ("bench.dataset", "anon8231489123/ShareGPT_Vicuna_unfiltered")):
        assert f"{field} ({repo})" in text, field
    assert "calibration.sources" not in text
    assert "seq_len 2048 exceeds the model's 1024 positions" in text  # the int8 eval's length, found in the same pass
    assert wall < 120, wall


def test_hub_warnings_are_printed_once(capsys):
    """huggingface_hub adds its own stderr handler and also propagates to the root logger."""
    import huggingface_hub  # noqa: F401 - adds the library's handler

    from llmship.data.sources import hub_logs_once

    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    root_handlers = list(root.handlers)  # the CLI of an earlier test leaves its own root handler
    for h in root_handlers:
        root.removeHandler(h)
    root.addHandler(handler)
    library = logging.getLogger("huggingface_hub")
    saved, level = list(library.handlers), library.level
    library.setLevel(logging.WARNING)  # the library's default (the CLI of an earlier test may have raised it)
    try:
        library.addHandler(logging.StreamHandler(sys.stderr))  # as the library does on import
        hub_logs_once()
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
    finally:
        root.removeHandler(handler)
        for h in root_handlers:
            root.addHandler(h)
        for h in list(library.handlers):
            library.removeHandler(h)
        for h in saved:
            library.addHandler(h)
        library.setLevel(level)
    assert capsys.readouterr().err.count("Retrying in 1s") == 1


# --------------------------------------------------------------------------- compile without calibration, moved output
@pytest.mark.slow
def test_int8_config_compiles_without_calibration_and_a_copied_output_is_reused(tmp_path, monkeypatch):
    import llmship.data.mixture
    from llmship.data import sources

    def untouchable(*args, **kwargs):
        raise AssertionError("calibration data was read")

    monkeypatch.setattr(llmship.data.mixture, "build_calibration_set", untouchable)
    monkeypatch.setattr(sources, "hub_dataset", untouchable)
    first = tmp_path / "first"
    result = invoke("compile", CONFIGS / "hf_llama_int8.yaml", "model.path=@embedded", f"output.dir={first}")
    assert result.exit_code == 0, result.stderr[-3000:]
    for name in ("w8a8-dynamic", "w8a16"):
        manifest = json.loads((first / name / "manifest.json").read_text())
        assert manifest["calibration"] is None and manifest["parity"]["passed"], name
        record = json.loads((first / ".llmship" / "stages" / f"variant-{name}.json").read_text())
        assert record["artifact"] == name  # relative to output.dir

    second = tmp_path / "elsewhere" / "copy"
    shutil.copytree(first, second)
    mtimes = {p: p.stat().st_mtime_ns for p in second.rglob("*.onnx")}
    again = invoke("compile", CONFIGS / "hf_llama_int8.yaml", "model.path=@embedded", f"output.dir={second}")
    assert again.exit_code == 0, again.stderr[-3000:]
    assert "fp32 export is up to date" in again.stderr
    assert "variant w8a8-dynamic is up to date" in again.stderr and "variant w8a16 is up to date" in again.stderr
    assert "exporting" not in again.stderr and "building variant" not in again.stderr
    assert {p: p.stat().st_mtime_ns for p in second.rglob("*.onnx")} == mtimes


def test_stored_results_follow_a_moved_output_folder(tmp_path):
    from llmship.cache import load_record, record

    first = tmp_path / "first"
    (first / "bench").mkdir(parents=True)
    plot = first / "bench" / "throughput.png"
    result = {"plots": [{"path": str(plot), "caption": "x"}], "dir": str(first / "bench"), "model": "/models/llama"}
    record(first, "bench", "key", first / "bench", result)
    stored = json.loads((first / ".llmship" / "stages" / "bench.json").read_text())
    assert stored["artifact"] == "bench" and str(first) not in json.dumps(stored)
    moved = tmp_path / "moved"
    first.rename(moved)
    loaded = load_record(moved, "bench")["result"]
    assert loaded["plots"][0]["path"] == str(moved.resolve() / "bench" / "throughput.png")
    assert loaded["dir"] == str(moved.resolve() / "bench") and loaded["model"] == "/models/llama"


def test_real_data_files_pass_the_header_checks(shared_data):
    """The real formats (C-Eval with 26 val / 52 dev subjects, C4 gzip lines, alpaca-cleaned, ShareGPT V3)."""
    c4 = shared_data / "c4" / "c4-sample.300docs.json.gz"
    sharegpt = shared_data / "sharegpt" / "ShareGPT_V3_unfiltered_cleaned_split.sample300.json"
    result = invoke("check", CONFIGS / "demo.yaml", f"eval.ceval.path={shared_data / 'ceval'}", f"eval.perplexity.c4_path={c4}",
                    f"eval.perplexity.alpaca_path={shared_data / 'alpaca-cleaned'}", f"bench.dataset={sharegpt}",
                    f"calibration.sources.0.path={c4}", "quantize.variants.1.method=gptq")
    assert result.exit_code == 0, result.stderr[-2000:]
    assert "26 val + 52 dev CSV headers" in result.stdout
    assert "ok: 12 input(s) checked" in result.stdout  # CMMLU: the bundled sample; model.baseline: its memory plan
