"""run_eval end to end on a tiny exported model: outputs, fp32 == PyTorch predictions, baseline cache,
a corrupted variant failing the gate, a stored baseline, and the real C-Eval sample when present."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import random
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from testkit import SHARED_DATA

from llmship.config import Config

SHARED = SHARED_DATA

SUBJECTS = {"college_physics": ["College Physics", "大学物理", "STEM"],
            "computer_network": ["Computer Network", "计算机网络", "STEM"],
            "law": ["Law", "法学", "Humanities"]}
WORDS_ZH = list("我们今天天气很好去公园散步中国的首都是北京计算机网络考试单项选择题请选出正确答案学习知识")
WORDS_EN = ["the", "model", "runs", "fast", "on", "small", "data", "and", "we", "measure", "every", "token", "of", "the", "answer", "question", "about", "weather"]


def _write_ceval(root: Path, rng: random.Random) -> Path:
    folder = root / "ceval"
    for split, count in (("dev", 5), ("val", 6)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for name in SUBJECTS:
            with (folder / split / f"{name}_{split}.csv").open("w", encoding="utf-8", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["id", "question", "A", "B", "C", "D", "answer"] + (["explanation"] if split == "dev" else []))
                for i in range(count):
                    words = ["".join(rng.choices(WORDS_ZH, k=rng.randint(2, 5))) for _ in range(5)]
                    writer.writerow([i, words[0] + "____。", *words[1:], rng.choice("ABCD")] + (["因为"] if split == "dev" else []))
    (folder / "subject_mapping.json").write_text(json.dumps(SUBJECTS, ensure_ascii=False), encoding="utf-8")
    return folder


def _write_c4(root: Path, rng: random.Random) -> Path:
    path = root / "c4.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for i in range(12):
            text = " ".join(rng.choices(WORDS_EN, k=rng.randint(60, 120))) + "."
            fh.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{i}"}) + "\n")
    return path


def _write_alpaca(root: Path, rng: random.Random) -> Path:
    records = [{"instruction": " ".join(rng.choices(WORDS_EN, k=6)) + "?", "input": "" if i % 2 else "今天天气很好",
                "output": " ".join(rng.choices(WORDS_EN, k=rng.randint(5, 20))) + "."} for i in range(60)]
    path = root / "alpaca.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def _corrupt(fp32: Path, target: Path) -> Path:
    """A copy of the fp32 export with noise added to its largest weight (the kind of damage the gate must catch)."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(fp32, target)
    model = onnx.load(str(target / "model.onnx"))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(init)
    noisy = arr + np.random.default_rng(0).normal(scale=3 * float(arr.std()), size=arr.shape).astype(arr.dtype)
    init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    onnx.save(model, str(target / "model.onnx"))
    return target


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, tiny_fp32):
    pytest.importorskip("llmship.data.sources")
    root = tmp_path_factory.mktemp("evalrun")
    rng = random.Random(0)
    model = tiny_model
    cfg = Config.model_validate({
        "model": {"path": str(model)},
        "output": {"dir": str(root / "out")},
        "export": {"optimize": False, "parity": {"greedy_tokens": 4, "decode_steps": 2}},  # as tiny_fp32 was exported
        "eval": {"ceval": {"path": str(_write_ceval(root, rng)), "max_out_len": 4},
                 "perplexity": {"c4_path": str(_write_c4(root, rng)), "alpaca_path": str(_write_alpaca(root, rng)),
                                "seq_len": 64, "windows": 4, "alpaca_samples": 6},
                 "consistency_prompts": 4, "batch_size": 4},
        "gate": {"goals": [{"metric": "ceval/ppl/average", "type": "max-degradation", "value": 5.0},
                           {"metric": "ppl/c4", "type": "percent-max-degradation", "value": 5.0},
                           {"metric": "consistency/top1", "type": "threshold", "value": 90.0}]},
    })
    fp32 = tiny_fp32  # exported once per session, shared: read only
    broken = _corrupt(fp32, root / "out" / "broken")
    return cfg, root, fp32, broken


def test_fp32_export_scores_like_pytorch_and_writes_every_output(setup):
    from llmship.eval import run_eval

    cfg, root, fp32, _ = setup
    out = root / "eval1"
    result = run_eval(cfg, {"fp32": fp32}, out)
    m = result["metrics"]
    assert not result["baseline_cached"] and result["baseline"] == "pytorch"
    for mode in ("ppl", "gen"):
        assert m["fp32"][f"ceval/{mode}/agreement"] >= 99.5
        assert m["fp32"][f"ceval/{mode}/average"] == pytest.approx(m["pytorch"][f"ceval/{mode}/average"])
        assert {f"ceval/{mode}/{g}" for g in ("stem", "humanities", "hard", "average")} <= set(m["pytorch"])
    assert m["fp32"]["ppl/c4"] == pytest.approx(m["pytorch"]["ppl/c4"], rel=1e-3)
    assert m["fp32"]["ppl/alpaca"] == pytest.approx(m["pytorch"]["ppl/alpaca"], rel=1e-3)
    assert m["fp32"]["consistency/top1"] >= 99.0 and m["fp32"]["consistency/kl"] < 1e-4
    assert all(row["passed"] for row in result["gate"]) and len(result["gate"]) == 3
    ci = result["intervals"]["fp32"]
    for mode in ("ppl", "gen"):  # identical predictions: the paired difference is exactly zero, over 18 questions
        assert (ci[f"ceval/{mode}/average"]["low"], ci[f"ceval/{mode}/average"]["high"]) == (0.0, 0.0)
        assert ci[f"ceval/{mode}/average"]["n"] == 18 and ci[f"ceval/{mode}/law"]["n"] == 6
    assert ci["consistency/top1"]["n"] == 4 and ci["consistency/top1"]["low"] <= ci["consistency/top1"]["diff"] <= 0
    assert {r["metric"]: r["judge"] for r in result["gate"]} == {"ceval/ppl/average": "interval", "ppl/c4": "point",
                                                                 "consistency/top1": "interval"}
    results = json.loads((out / "results.json").read_text())
    preds = results["engines"]["fp32"]["predictions"]
    assert len(preds["ppl"]) == len(preds["gen"]) == 18 and {"pred", "gold", "scores"} <= set(preds["ppl"][0])
    header = (out / "summary.csv").read_text().splitlines()[0]
    assert header == "dataset,version,metric,mode,pytorch,fp32,n,fp32_diff_low,fp32_diff_high"
    assert "| dataset | version | metric | mode | pytorch | fp32 |" in (out / "summary.md").read_text()
    assert "ceval-college_physics" in (out / "summary.txt").read_text()
    assert len(ET.parse(out / "junit.xml").getroot().findall(".//testcase")) == 3


def test_second_run_reuses_the_cached_baseline(setup, monkeypatch):
    import llmship.runtime as runtime
    from llmship.config import ModelConfig
    from llmship.eval import run_eval

    cfg, root, fp32, _ = setup
    first = run_eval(cfg, {"fp32": fp32}, root / "eval2a")
    real = runtime.load_engine

    def no_baseline(spec, runtime_cfg=None):
        assert not isinstance(spec, ModelConfig), "the baseline was re-scored"
        return real(spec, runtime_cfg)

    monkeypatch.setattr(runtime, "load_engine", no_baseline)
    second = run_eval(cfg, {"fp32": fp32}, root / "eval2b")
    assert second["baseline_cached"]
    assert second["metrics"]["pytorch"] == first["metrics"]["pytorch"]
    assert second["metrics"]["fp32"]["consistency/top1"] == first["metrics"]["fp32"]["consistency/top1"]


def test_corrupted_variant_fails_the_gate(setup, caplog):
    from llmship.eval import run_eval

    cfg, root, fp32, broken = setup
    with caplog.at_level(logging.ERROR, logger="llmship"):
        result = run_eval(cfg, {"fp32": fp32, "broken": broken}, root / "eval3")
    verdict = {}
    for row in result["gate"]:
        verdict.setdefault(row["variant"], []).append(row["passed"])
    assert all(verdict["fp32"]) and not all(verdict["broken"])
    assert "broken" in caplog.text and "failed" in caplog.text
    cases = ET.parse(root / "eval3" / "junit.xml").getroot().findall(".//testcase")
    assert any(c.find("failure") is not None and c.get("classname") == "llmship.gate.broken" for c in cases)


def test_stored_baseline_json_replaces_the_baseline_run(setup, monkeypatch):
    import llmship.runtime as runtime
    from llmship.config import ModelConfig
    from llmship.eval import run_eval

    cfg, root, fp32, _ = setup
    first = run_eval(cfg, {"fp32": fp32}, root / "eval4a")
    real = runtime.load_engine
    monkeypatch.setattr(runtime, "load_engine", lambda spec, rc=None: (_ for _ in ()).throw(AssertionError("re-scored"))
                        if isinstance(spec, ModelConfig) else real(spec, rc))
    goals = [g for g in cfg.gate.goals if not g.metric.startswith("consistency/")]  # no consistency without the baseline
    stored = cfg.model_copy(update={"gate": cfg.gate.model_copy(update={"goals": goals,
                                                                        "baseline_json": first["paths"]["results"]})})
    result = run_eval(stored, {"fp32": fp32}, root / "eval4b")
    assert result["metrics"]["pytorch"]["ceval/ppl/average"] == first["metrics"]["pytorch"]["ceval/ppl/average"]
    assert all(row["passed"] for row in result["gate"])


@pytest.mark.skipif(not (SHARED / "ceval" / "subject_mapping.json").is_file(), reason="../shared/data is absent")
def test_real_ceval_sample_every_subject_both_modes(setup):
    from llmship.eval import run_eval

    cfg, root, _, _ = setup
    real = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={
        "ceval": cfg.eval.ceval.model_copy(update={"path": str(SHARED / "ceval"), "max_questions": 1}),
        "perplexity": cfg.eval.perplexity.model_copy(update={"enabled": False}), "consistency_prompts": 0}),
        "gate": cfg.gate.model_copy(update={"goals": []})})
    result = run_eval(real, {}, root / "eval5")
    subjects = sorted(p.name.removesuffix("_val.csv") for p in (SHARED / "ceval" / "val").glob("*_val.csv"))
    metrics = result["metrics"]["pytorch"]
    for mode in ("ppl", "gen"):
        assert all(f"ceval/{mode}/{s}" in metrics for s in subjects)
        for group in ("stem", "social-science", "humanities", "other", "hard", "average"):
            assert 0.0 <= metrics[f"ceval/{mode}/{group}"] <= 100.0
    mapping = json.loads((SHARED / "ceval" / "subject_mapping.json").read_text())
    stem = [s for s in subjects if mapping[s][2] == "STEM"]
    assert metrics["ceval/ppl/stem"] == pytest.approx(np.mean([metrics[f"ceval/ppl/{s}"] for s in stem]))
