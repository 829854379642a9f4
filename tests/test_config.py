"""Config loading, dotted overrides, and bad configs that must name the field (and the line)."""

from __future__ import annotations

from pathlib import Path

import pytest
from testkit import ROOT, run_cli

from llmship.config import Config, load_config, schema_text
from llmship.errors import UserError

REPO = ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_and_shipped_configs_load():
    assert load_config(None).model.path == "@embedded"
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, Config), path
    int8 = load_config(REPO / "configs" / "hf_llama_int8.yaml")
    assert [v.scheme for v in int8.quantize.all_variants()] == ["w8a8-dynamic", "w8a16"]


def test_demo_config_in_configs_is_the_packaged_one():
    # `llmship demo` runs the packaged llmship/demo.yaml; configs/demo.yaml is the copy users read and edit
    assert (REPO / "configs" / "demo.yaml").read_text() == (REPO / "llmship" / "demo.yaml").read_text()


def test_text_overrides_stay_text():
    cfg = load_config(None, ["output.dir=2024", "model.revision=0123", "model.path=yes", "model.adapter=null",
                             "bench.num_prompts=3", "export.opset=17"])
    assert (cfg.output.dir, cfg.model.revision, cfg.model.path) == ("2024", "0123", "yes")
    assert cfg.model.adapter is None and cfg.bench.num_prompts == 3 and cfg.export.opset == 17
    # lists and mappings are still read as YAML
    cfg = load_config(None, ["quantize.exclude=[lm_head, '*down_proj*']", "quantize.options={block_size: 64}"])
    assert cfg.quantize.exclude == ["lm_head", "*down_proj*"] and cfg.quantize.options == {"block_size": 64}


def test_overrides_apply_after_file(tmp_path):
    path = write(tmp_path, "model:\n  path: ./a\noutput:\n  dir: x\n")
    cfg = load_config(path, ["model.path=./m", "output.dir=./out", "calibration.seq_len=64",
                             "quantize.scheme=w4a16", "calibration.sources.0.samples=7", "runtime.threads=2"])
    assert cfg.model.path == "./m"
    assert cfg.output.dir == "./out"
    assert cfg.calibration.seq_len == 64
    assert cfg.quantize.scheme == "w4a16"
    assert cfg.calibration.sources[0].samples == 7
    assert cfg.runtime.threads == 2


def test_variant_names():
    cfg = load_config(None, ["quantize.scheme=w4a16", "quantize.method=gptq"])
    assert cfg.quantize.all_variants()[0].variant_name == "w4a16-gptq"
    assert load_config(None).quantize.all_variants()[0].variant_name == "fp32"


BAD_CONFIGS = [
    # (yaml text, overrides, fragments the one-line message must contain)
    ("model:\n  pth: ./m\n", [], ["cfg.yaml:2", "model.pth", "did you mean 'path'"]),
    ("modle:\n  path: ./m\n", [], ["cfg.yaml:1", "'modle'", "did you mean 'model'"]),
    ("calibration:\n  seq_len: long\n", [], ["cfg.yaml:2", "calibration.seq_len", "integer"]),
    ("calibration:\n  seq_len: 4\n", [], ["calibration.seq_len", "greater than or equal to 8"]),
    ("quantize:\n  scheme: int8\n", [], ["cfg.yaml:2", "quantize.scheme", "w8a8-dynamic"]),
    ("calibration:\n  sources:\n    - {kind: wiki, samples: 3}\n", [], ["calibration.sources.0.kind", "c4"]),
    ("calibration:\n  sources:\n    - {kind: c4}\n", [], ["calibration.sources.0.samples", "required"]),
    ("bench:\n  num_prompts: 0\n", [], ["cfg.yaml:2", "bench.num_prompts"]),
    ("eval:\n  ceval:\n    modes: [ppl, mcq]\n", [], ["eval.ceval.modes.1"]),
    ("gate:\n  goals:\n    - {metric: ppl/c4, type: max-drop, value: 1}\n", [], ["gate.goals.0.type", "max-degradation"]),
    ("output: out\n", [], ["cfg.yaml:1", "'output'"]),
    ("model: [1, 2\n", [], ["cfg.yaml", "malformed YAML"]),
    ("- a\n- b\n", [], ["top level must be a mapping"]),
    ("quantize:\n  name: a/b\n", [], ["quantize.name", "plain folder name"]),
    ("quantize:\n  variants:\n    - {scheme: w4a16}\n    - {scheme: w4a16}\n", [], ["variant names must be unique", "w4a16"]),
    ("runtime:\n  provider: tpu\n", [], ["runtime.provider", "cuda"]),
    ("", ["model.pth=./m"], ["model.pth", "did you mean 'path'"]),
    ("", ["noequals"], ["override 'noequals'", "section.field=value"]),
    ("", ["calibration.sources.9.samples=1"], ["not an index"]),
]


@pytest.mark.parametrize(("text", "overrides", "fragments"), BAD_CONFIGS)
def test_bad_config_names_field(tmp_path, text, overrides, fragments):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_schema_documents_every_field():
    text = schema_text()
    lines = [line for line in text.splitlines() if "(" in line.split("#")[0]]
    assert len(lines) > 60
    assert all("#" in line and line.split("#", 1)[1].strip() for line in lines)
    assert "quantize.scheme" in text and "calibration.seq_len" in text and "gate.goals" in text


def test_cli_bad_config_exit_2_one_line_no_traceback(tmp_path):
    path = write(tmp_path, "model:\n  pth: ./m\n")
    for verb in ("compile", "eval", "bench", "run"):
        proc = run_cli(verb, str(path), "--quiet")
        assert proc.returncode == 2, (verb, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and "model.pth" in lines[0], proc.stderr


def test_cli_schema_and_show(tmp_path):
    proc = run_cli("config", "schema")
    assert proc.returncode == 0 and "model.path" in proc.stdout
    path = write(tmp_path, "model:\n  path: ./m\n")
    proc = run_cli("config", "show", str(path), "output.dir=elsewhere")
    assert proc.returncode == 0 and "dir: elsewhere" in proc.stdout and "path: ./m" in proc.stdout


def test_cli_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli("compile", str(write(tmp_path, "")), f"output.dir={blocker}/sub", "--quiet")
    assert proc.returncode == 2 and "output.dir" in proc.stderr and "Traceback" not in proc.stderr
