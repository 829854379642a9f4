"""The bad-input catalogue: every case runs the real CLI and must exit 2 (1 for a failed gate) with one line
naming the file or field and what was expected, no traceback, and earlier outputs left as they were.

Most cases run in-process (typer's CliRunner) to keep the suite quick; the disk-full case needs a real
process with a file-size limit.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
import yaml
from typer.testing import CliRunner

from llmship.cli import app
from llmship.config import SAMPLES_DIR

BASE = {
    "quantize": {"scheme": "none"},
    "calibration": {"seq_len": 64, "sources": [{"kind": "c4", "samples": 4}, {"kind": "ceval", "samples": 2},
                                                {"kind": "alpaca", "samples": 2}]},
    "eval": {"ceval": {"modes": ["ppl"], "shots": 0, "max_questions": 4}, "perplexity": {"windows": 2, "seq_len": 64,
                                                                                           "alpaca_samples": 2},
             "consistency_prompts": 2},
    "bench": {"num_prompts": 2, "output_len": 4, "baseline": False, "warmup": 0},
    "gate": {"goals": []},
}


@dataclass
class Ctx:
    root: Path
    model: Path
    compiled: Path  # an output dir holding a compiled fp32 variant of `model`

    def config(self, name: str = "cfg.yaml", **sections) -> Path:
        tree = json.loads(json.dumps(BASE))
        tree["model"] = {"path": str(self.model)}
        tree["output"] = {"dir": str(self.compiled)}
        for key, value in sections.items():
            tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
        path = self.root / name
        path.write_text(yaml.safe_dump(tree, allow_unicode=True))
        return path

    def model_copy(self, name: str) -> Path:
        target = self.root / name
        shutil.copytree(self.model, target)
        return target

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_model) -> Ctx:
    root = tmp_path_factory.mktemp("bad")
    c = Ctx(root, tiny_model, root / "out")  # the session's tiny model: cases that change it copy it (model_copy)
    result = CliRunner().invoke(app, ["compile", str(c.config()), "--quiet"])
    assert result.exit_code == 0, result.output
    return c


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- the catalogue
# Each case returns the CLI arguments (after the verb's config is written) and the fragments the one-line
# message must contain.
Case = Callable[[Ctx], tuple[list[str], list[str]]]


def malformed_yaml(c):
    return ["compile", str(c.write("bad.yaml", "model:\n  path: [unclosed\n"))], ["bad.yaml:", "malformed YAML"]


def unknown_key(c):
    return ["compile", str(c.config(export={"opsett": 17}))], ["export.opsett", "opset"]


def wrong_type(c):
    return ["compile", str(c.config(export={"opset": "eighteen"}))], ["export.opset", "integer"]


def missing_config_file(c):
    return ["compile", str(c.root / "nope.yaml")], ["nope.yaml"]


def bad_override(c):
    return ["compile", str(c.config()), "bench.num_promts=3"], ["bench.num_promts", "num_prompts"]


def escaping_variant_name(c):
    return ["compile", str(c.config(quantize={"scheme": "none", "variants": [{"scheme": "fp16", "name": "../x"}]}))], [
        "quantize.variants.0.name", "plain folder name"]


def missing_model_folder(c):
    return ["compile", str(c.config(model={"path": str(c.root / "no-such-model")}, output={"dir": str(c.root / "o1")}))], [
        "no-such-model"]


def missing_config_json(c):
    m = c.model_copy("m-noconfig")
    (m / "config.json").unlink()
    return ["compile", str(c.config(model={"path": str(m)}, output={"dir": str(c.root / "o2")}))], ["config.json"]


def other_architecture(c):
    m = c.model_copy("m-gpt2")
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (m / "config.json").write_text(json.dumps(cfg))
    return ["compile", str(c.config(model={"path": str(m)}, output={"dir": str(c.root / "o3")}))], ["GPT2LMHeadModel", "Llama"]


def remote_code_model(c):
    m = c.model_copy("m-remote")
    cfg = json.loads((m / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (m / "config.json").write_text(json.dumps(cfg))
    return ["compile", str(c.config(model={"path": str(m)}, output={"dir": str(c.root / "o4")}))], ["trust_remote_code"]


def truncated_safetensors(c):
    m = c.model_copy("m-trunc")
    weights = m / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ["compile", str(c.config(model={"path": str(m)}, output={"dir": str(c.root / "o5")}))], ["model.safetensors", "truncated"]


def vocab_mismatch(c):
    m = c.model_copy("m-vocab")
    cfg = json.loads((m / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    state = load_file(m / "model.safetensors")
    state = {k: (v[:300] if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in state.items()}
    save_file(state, m / "model.safetensors", metadata={"format": "pt"})
    cfg["vocab_size"] = 300
    (m / "config.json").write_text(json.dumps(cfg))
    return ["compile", str(c.config(model={"path": str(m)}, output={"dir": str(c.root / "o6")}))], ["tokenizer", "300"]


def missing_tokenizer(c):
    m = c.model_copy("m-notok")
    for f in m.glob("tokenizer*"):
        f.unlink()
    return ["compile", str(c.config(model={"path": str(m)}, output={"dir": str(c.root / "o7")}))], ["tokenizer"]


def adapter_for_other_base(c):
    from peft import LoraConfig, get_peft_model

    from llmship.export.tiny import make_llama

    other = make_llama(c.root / "other-base", hidden_size=96, intermediate_size=160)
    from transformers import LlamaForCausalLM

    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(other), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(c.root / "adapter-other")
    return ["compile", str(c.config(model={"path": str(c.model), "adapter": str(c.root / "adapter-other")},
                                    output={"dir": str(c.root / "o8")}))], ["adapter-other"]


def adapter_without_config(c):
    folder = c.root / "adapter-empty"
    folder.mkdir(exist_ok=True)
    return ["compile", str(c.config(model={"path": str(c.model), "adapter": str(folder)}, output={"dir": str(c.root / "o9")}))], [
        "adapter-empty"]


def _calib(c, kind: str, path: Path, **extra) -> Path:
    sources = [{"kind": kind, "path": str(path), "samples": 2}]
    # w8a8-static reads the calibration set (w8a8-dynamic, which these cases used before, reads none)
    return c.config(quantize={"scheme": "none", "variants": [{"scheme": "w8a8-static"}]},
                    calibration={"seq_len": 64, "sources": sources, **extra})


def empty_c4(c):
    return ["compile", str(_calib(c, "c4", c.write("c4/empty.json.gz", gzip.compress(b""))))], ["empty.json.gz"]


def truncated_c4(c):
    data = (SAMPLES_DIR / "c4").glob("*.json.gz").__next__().read_bytes()
    return ["compile", str(_calib(c, "c4", c.write("c4/trunc.json.gz", data[: len(data) // 3])))], ["trunc.json.gz"]


def ceval_without_answer(c):
    folder = c.root / "ceval-noanswer"
    shutil.copytree(SAMPLES_DIR / "ceval", folder)
    for csv_file in (folder / "dev").glob("*.csv"):
        lines = csv_file.read_text(encoding="utf-8").splitlines()
        lines[0] = lines[0].replace("answer", "solution")
        csv_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ["compile", str(_calib(c, "ceval", folder))], ["answer"]


def alpaca_not_records(c):
    return ["compile", str(_calib(c, "alpaca", c.write("alpaca/bad.json", json.dumps([{"prompt": "x"}]))))], ["bad.json", "instruction"]


def seq_len_too_long(c):
    return ["compile", str(_calib(c, "c4", SAMPLES_DIR / "c4", seq_len=4096))], ["seq_len", "256"]


def too_few_samples(c):
    path = c.write("c4/few.json.gz", gzip.compress(json.dumps({"text": "short text", "timestamp": "", "url": ""}).encode()))
    return ["compile", str(_calib(c, "c4", path))], ["few.json.gz"]


def ceval_without_val(c):
    folder = c.root / "ceval-noval"
    shutil.copytree(SAMPLES_DIR / "ceval", folder)
    shutil.rmtree(folder / "val")
    return ["eval", str(c.config(eval={"ceval": {"path": str(folder), "modes": ["ppl"], "shots": 0}}))], ["val"]


def perplexity_file_missing(c):
    return ["eval", str(c.config(eval={"perplexity": {"c4_path": str(c.root / "missing-c4.json.gz")}}))], ["missing-c4.json.gz"]


def sharegpt_not_a_list(c):
    path = c.write("sg/obj.json", json.dumps({"id": "x", "conversations": []}))
    return ["bench", str(c.config(bench={"dataset": str(path)}))], ["obj.json", "list"]


def sharegpt_unknown_roles(c):
    entries = [{"id": f"r{i}", "conversations": [{"from": "narrator", "value": "a b c d e f"},
                                                 {"from": "robot", "value": "g h i j k l"}]} for i in range(4)]
    path = c.write("sg/roles.json", json.dumps(entries))
    return ["bench", str(c.config(bench={"dataset": str(path)}))], ["bench.dataset", "human"]


def sharegpt_prompts_too_long(c):
    long_text = " ".join(["token"] * 2000)
    entries = [{"id": f"l{i}", "conversations": [{"from": "human", "value": long_text}, {"from": "gpt", "value": "ok fine sure yes"}]}
               for i in range(4)]
    path = c.write("sg/long.json", json.dumps(entries))
    return ["bench", str(c.config(bench={"dataset": str(path)}))], ["bench.dataset", "too_long"]


def cuda_not_available(c):
    return ["bench", str(c.config(runtime={"provider": "cuda"}))], ["cuda", "runtime.provider"]


def onnx_folder_from_other_tool(c):
    out = c.root / "foreign-out"
    (out / "fp32").mkdir(parents=True)
    shutil.copy(c.compiled / "fp32" / "model.onnx", out / "fp32" / "model.onnx")
    return ["eval", str(c.config(output={"dir": str(out)}))], ["fp32", "compile"]


def unsupported_op(c):
    out = c.root / "badop-out"
    shutil.copytree(c.compiled, out)
    graph = onnx.load(out / "fp32" / "model.onnx")
    node = onnx.helper.make_node("FancyAttention", ["input_ids"], ["fancy"], domain="com.example")
    graph.graph.node.insert(0, node)
    graph.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    onnx.save(graph, out / "fp32" / "model.onnx", save_as_external_data=False)
    return ["bench", str(c.config(output={"dir": str(out)}))], ["model.onnx", "FancyAttention"]


def output_dir_not_writable(c):
    blocker = c.write("a-file", "x")
    return ["compile", str(c.config(output={"dir": str(blocker / "out")}))], ["output.dir"]


CASES: dict[str, Case] = {f.__name__: f for f in (
    malformed_yaml, unknown_key, wrong_type, missing_config_file, bad_override, escaping_variant_name,
    missing_model_folder, missing_config_json, other_architecture, remote_code_model, truncated_safetensors,
    vocab_mismatch, missing_tokenizer, adapter_for_other_base, adapter_without_config,
    empty_c4, truncated_c4, ceval_without_answer, alpaca_not_records, seq_len_too_long, too_few_samples,
    ceval_without_val, perplexity_file_missing,
    sharegpt_not_a_list, sharegpt_unknown_roles, sharegpt_prompts_too_long, cuda_not_available,
    onnx_folder_from_other_tool, unsupported_op, output_dir_not_writable,
)}


def case_output_dir(args: list[str]) -> Path | None:
    """The output.dir of the case's config file (None when the file is not a readable YAML mapping)."""
    try:
        tree = yaml.safe_load(Path(args[1]).read_text())
        return Path(tree["output"]["dir"])
    except (OSError, yaml.YAMLError, TypeError, KeyError, IndexError):
        return None


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line(ctx, name):
    before = tree_digest(ctx.compiled / "fp32")
    args, fragments = CASES[name](ctx)
    # Every case's output folder holds earlier results (a compiled variant, stage records) that must survive it.
    out = case_output_dir(args)
    if out is not None and not out.exists() and out.parent.is_dir():
        shutil.copytree(ctx.compiled, out)
    out_before = tree_digest(out) if out is not None and out.is_dir() else None
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.stderr[-2000:]}"
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    message = " ".join(lines[lines.index(errors[0]):])  # rich may wrap a long line
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    assert tree_digest(ctx.compiled / "fp32") == before
    if out_before is not None:
        assert tree_digest(out) == out_before, f"{name} changed {out}"


def test_failed_gate_exits_1_and_writes_junit(ctx):
    goals = [{"metric": "ppl/c4", "type": "threshold", "value": 1.0, "higher_is_better": False}]
    result = CliRunner().invoke(app, ["eval", str(ctx.config(gate={"goals": goals}))])
    assert result.exit_code == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    junit = (ctx.compiled / "eval" / "junit.xml").read_text()
    assert "<failure" in junit and "ppl/c4" in junit


def test_debug_shows_the_traceback(ctx):
    result = CliRunner().invoke(app, ["compile", str(ctx.config(model={"path": str(ctx.root / "no-such-model")})), "--debug"])
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_disk_full_during_write_keeps_earlier_output(ctx, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(ctx.compiled, out)
    before = tree_digest(out / "fp32")
    config = ctx.config("full.yaml", output={"dir": str(out)})

    def limit_file_size():  # every file larger than 64 kB fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    proc = subprocess.run([sys.executable, "-m", "llmship.cli", "compile", str(config), "--force", "--quiet"],
                          capture_output=True, text=True, preexec_fn=limit_file_size, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr
    assert tree_digest(out / "fp32") == before
    assert not list(out.glob("*.tmp-*"))
