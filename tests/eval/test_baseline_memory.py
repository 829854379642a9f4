"""The PyTorch baseline's memory plan (llmship.runtime.torch_baseline) on the embedded model: the whole-model estimate
from the checkpoint headers, auto's choice against a patched available-memory figure, the layer-at-a-time baseline
scoring as the whole model does, which baseline ran in the eval and bench reports, and bench refusing a streamed
baseline before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from testkit import run_cli

import llmship.runtime.torch_baseline as torch_baseline
from llmship.config import Config, ModelConfig
from llmship.errors import UserError


def patch_available(monkeypatch: pytest.MonkeyPatch, available: int) -> None:
    monkeypatch.setattr(torch_baseline, "available_memory", lambda: available)


def loaded_parameters(dtype: str = "float32") -> tuple[int, str]:
    from llmship.runtime import load_engine

    engine = load_engine(ModelConfig(dtype=dtype))
    try:
        params = list(engine.model.parameters())
        return sum(p.numel() for p in params), str(params[0].dtype)
    finally:
        engine.close()


def test_the_estimate_is_the_checkpoint_parameters_in_model_dtype_plus_the_margin():
    parameters, loaded_dtype = loaded_parameters()
    fp32 = torch_baseline.plan_baseline(ModelConfig())
    bf16 = torch_baseline.plan_baseline(ModelConfig(dtype="bfloat16"))
    assert fp32.parameters == bf16.parameters == parameters == 1_506_432 and loaded_dtype == "torch.float32"
    margin = torch_baseline.MARGIN_BYTES
    assert fp32.whole_bytes == int(parameters * 4 * (1 + torch_baseline.MARGIN_FRACTION)) + margin
    assert bf16.whole_bytes == int(parameters * 2 * (1 + torch_baseline.MARGIN_FRACTION)) + margin
    # layer at a time: one of the four decoder layers, the norms and lm_head (one chunk: all of it here), in fp32
    assert fp32.whole_bytes > fp32.layerwise_bytes > margin


def test_model_dtype_is_the_dtype_the_whole_baseline_loads_and_reports():
    from llmship.runtime import load_engine

    engine = load_engine(ModelConfig(dtype="bfloat16"))
    try:
        info = engine.info()
        assert str(next(engine.model.parameters()).dtype) == "torch.bfloat16"
    finally:
        engine.close()
    assert info["dtype"] == "bfloat16"
    assert {k: info["baseline"][k] for k in ("engine", "mode", "dtype", "requested")} == {
        "engine": "torch", "mode": "whole", "dtype": "bfloat16", "requested": "auto"}


def test_auto_falls_back_to_layerwise_only_when_the_whole_model_does_not_fit(monkeypatch):
    needed = torch_baseline.plan_baseline(ModelConfig()).whole_bytes
    patch_available(monkeypatch, needed)
    assert torch_baseline.plan_baseline(ModelConfig()).mode == "whole"
    patch_available(monkeypatch, needed - 1)
    plan = torch_baseline.plan_baseline(ModelConfig())
    assert (plan.mode, plan.dtype, plan.model_dtype) == ("layerwise", "float32", "float32")
    assert "one decoder layer at a time, float32" in plan.sentence() and "slow" in plan.sentence()
    assert torch_baseline.plan_baseline(ModelConfig(baseline="whole")).mode == "whole"
    patch_available(monkeypatch, plan.layerwise_bytes - 1)
    with pytest.raises(UserError, match=r"^model.baseline: .*even one decoder layer at a time: \d+\.\d\d GiB needed"):
        torch_baseline.plan_baseline(ModelConfig())


def test_the_layer_at_a_time_baseline_computes_in_fp32_whatever_model_dtype_says():
    plan = torch_baseline.plan_baseline(ModelConfig(dtype="bfloat16", baseline="layerwise"))
    assert (plan.mode, plan.dtype, plan.model_dtype, plan.requested) == ("layerwise", "float32", "bfloat16", "layerwise")
    assert plan.sentence().startswith("PyTorch baseline: one decoder layer at a time, float32 (whole model estimated at ")
    assert "in bfloat16" in plan.sentence()


def small_eval(out: Path, **model: str) -> Config:
    return Config.model_validate({
        "model": model, "output": {"dir": str(out)},
        "eval": {"ceval": {"subjects": ["high_school_chemistry", "civil_servant"], "max_questions": 3, "shots": 2,
                           "max_out_len": 3},
                 "cmmlu": {"enabled": False},
                 "perplexity": {"seq_len": 64, "windows": 3, "alpaca_samples": 4},
                 "consistency_prompts": 2, "batch_size": 4, "baseline_cache": False},
    })


def test_layerwise_baseline_scores_as_the_whole_model_and_the_report_says_which_ran(tmp_path, monkeypatch):
    from llmship.eval import run_eval

    whole = run_eval(small_eval(tmp_path / "a"), {}, tmp_path / "whole")
    needed = torch_baseline.plan_baseline(ModelConfig()).whole_bytes
    patch_available(monkeypatch, needed - 1)  # auto must now stream the layers
    streamed = run_eval(small_eval(tmp_path / "b"), {}, tmp_path / "streamed")

    assert whole["baseline_run"]["mode"] == "whole" and streamed["baseline_run"]["mode"] == "layerwise"
    assert "available_bytes" not in whole["baseline_run"]  # a whole-model record is the same from run to run
    expected, got = whole["metrics"]["pytorch"], streamed["metrics"]["pytorch"]
    assert set(got) == set(expected) and {"ppl/c4", "ppl/alpaca", "ceval/ppl/average", "ceval/gen/average"} <= set(got)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert 1 < got["ppl/c4"] < 3000  # a real perplexity of the embedded model, not a placeholder

    results = json.loads((tmp_path / "streamed" / "results.json").read_text())
    ran = results["baseline_run"]
    assert (ran["engine"], ran["dtype"], ran["mode"], ran["requested"]) == ("torch", "float32", "layerwise", "auto")
    assert ran["whole_bytes"] == needed and ran["available_bytes"] == needed - 1
    assert any("one decoder layer at a time" in note and "slow" in note for note in results["notes"])
    summary_md = (tmp_path / "streamed" / "summary.md").read_text()
    assert "pytorch: PyTorch baseline: one decoder layer at a time, float32" in summary_md
    assert "PyTorch baseline: whole model, float32" in (tmp_path / "whole" / "summary.md").read_text()
    assert "PyTorch baseline" not in (tmp_path / "whole" / "summary.txt").read_text()  # OpenCompass's layout, as it was


def test_bench_refuses_a_baseline_that_would_not_fit_whole_before_any_work(tmp_path, monkeypatch):
    import llmship.bench as bench

    def no_work(*_args, **_kwargs):
        raise AssertionError("bench started work before refusing the baseline")

    monkeypatch.setattr(bench, "load_conversations", no_work)
    cfg = Config.model_validate({"output": {"dir": str(tmp_path)}})
    needed = torch_baseline.plan_baseline(cfg.model).whole_bytes
    patch_available(monkeypatch, needed - 1)
    with pytest.raises(UserError) as caught:
        bench.run_bench(cfg, {}, tmp_path / "bench")
    message = str(caught.value)
    assert message.startswith("bench.baseline: the PyTorch bench baseline needs the whole model in memory")
    assert f"{needed / (1 << 30):.2f} GiB" in message and "would time the disk" in message
    assert "bench.baseline=false" in message and "\n" not in message
    assert not (tmp_path / "bench").exists()
    cfg.bench.baseline = False  # the variants only: nothing to refuse
    bench.check_baseline_fits(cfg)


def test_forced_layerwise_is_refused_by_bench_and_its_worker():
    from llmship.bench import runner

    model = ModelConfig(baseline="layerwise")
    assert "model.baseline is layerwise" in torch_baseline.bench_problem(model)
    assert torch_baseline.bench_problem(ModelConfig()) is None
    with pytest.raises(UserError, match="^bench.baseline: the PyTorch bench baseline needs the whole model"):
        runner.check_baseline({"kind": "torch", "model": {**model.model_dump(), "baseline": "layerwise"}})


def test_model_baseline_survives_overrides_and_stays_out_of_the_stage_keys(tmp_path):
    from llmship.config import load_config, resolved_tree

    file = tmp_path / "c.yaml"
    file.write_text("model:\n  baseline: layerwise\n", encoding="utf-8")
    cfg = load_config(file, ["model.dtype=bfloat16"])
    assert (cfg.model.baseline, cfg.model.dtype) == ("layerwise", "bfloat16")
    assert "baseline" not in cfg.model.model_dump() and resolved_tree(cfg)["model"]["baseline"] == "layerwise"


def test_cli_check_bench_exits_2_with_one_line(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text(f"model:\n  baseline: layerwise\noutput:\n  dir: {tmp_path / 'out'}\n", encoding="utf-8")
    proc = run_cli("check", file, "--verb", "bench", timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "needs the whole model in memory" in lines[0] and "Traceback" not in proc.stderr


def test_the_baseline_keys_change_only_when_the_baseline_computes_in_another_dtype(tmp_path):
    from llmship.eval import stage_inputs
    from llmship.eval.baseline import baseline_key
    from llmship.eval.registry import enabled_tasks

    def keys(**model: str) -> tuple[str, dict]:
        cfg = Config.model_validate({"model": model, "output": {"dir": str(tmp_path)}})
        return baseline_key(cfg, enabled_tasks(cfg)), stage_inputs(cfg)

    assert keys() == keys(baseline="layerwise")  # fp32 both ways: the same scores
    bf16, bf16_streamed = keys(dtype="bfloat16"), keys(dtype="bfloat16", baseline="layerwise")
    assert bf16[0] != bf16_streamed[0] and bf16[0] != keys()[0]
    assert "baseline_computed_in" not in bf16[1] and bf16_streamed[1]["baseline_computed_in"] == ["computed in float32"]
