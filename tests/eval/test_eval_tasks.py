"""The eval tasks behind one protocol: the registry, directions the gate reads from the tasks, the stage key derived
from the enabled tasks' declarations, units scored one at a time, and the baseline cache as a cached stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmship.config import SAMPLES_DIR, Config, Goal
from llmship.eval import run_eval, stage_inputs
from llmship.eval.gate import evaluate_goals
from llmship.eval.registry import TASKS, enabled_tasks, higher_is_better

ONLY_CMMLU = {"ceval": {"enabled": False}, "perplexity": {"enabled": False}, "consistency_prompts": 0,
              "cmmlu": {"modes": ["ppl"], "max_questions": 1}}


def test_registry_lists_every_task_once_in_table_order():
    assert [t.name for t in TASKS] == ["ceval", "cmmlu", "c4", "alpaca", "consistency"]
    off = Config.model_validate({"eval": {"cmmlu": {"enabled": False}, "consistency_prompts": 0}})
    assert [t.name for t in enabled_tasks(off)] == ["ceval", "c4", "alpaca"]


@pytest.mark.parametrize(("metric", "higher"), [("ppl/c4", False), ("ppl/alpaca", False), ("consistency/kl", False),
                                                ("consistency/top1", True), ("consistency/greedy_prefix", True),
                                                ("ceval/gen/average", True), ("cmmlu/ppl/china-specific", True)])
def test_directions_come_from_the_tasks(metric, higher):
    assert higher_is_better(metric) is higher


def test_gate_judges_a_perplexity_threshold_downwards():
    goal = Goal(metric="ppl/c4", type="threshold", value=3.0)
    rows = evaluate_goals([goal], {"pytorch": {"ppl/c4": 2.5}, "v": {"ppl/c4": 2.9}, "w": {"ppl/c4": 3.1}}, "pytorch")
    assert [(r["variant"], r["passed"], r["higher_is_better"]) for r in rows] == [("v", True, False), ("w", False, False)]


def test_stage_inputs_follow_the_enabled_tasks(tmp_path):
    base = stage_inputs(Config())
    assert set(base["tasks"]) == {"ceval", "cmmlu", "c4", "alpaca", "consistency"}
    assert set(stage_inputs(Config.model_validate({"eval": {"cmmlu": {"enabled": False}}}))["tasks"]) == \
        {"ceval", "c4", "alpaca", "consistency"}
    # the gate's goals are not an input (a changed gate re-gates); a changed CMMLU file is
    gated = Config.model_validate({"gate": {"goals": [{"metric": "cmmlu/ppl/average", "type": "threshold", "value": 1}]}})
    assert stage_inputs(gated) == base
    copy = tmp_path / "cmmlu"
    shutil.copytree(SAMPLES_DIR / "cmmlu", copy)
    moved = stage_inputs(Config.model_validate({"eval": {"cmmlu": {"path": str(copy)}}}))["tasks"]["cmmlu"]
    assert moved["data"] == base["tasks"]["cmmlu"]["data"]
    with (copy / "test" / "economics.csv").open("a", encoding="utf-8") as fh:
        fh.write("4,新题,a,b,c,d,A\n")
    changed = stage_inputs(Config.model_validate({"eval": {"cmmlu": {"path": str(copy)}}}))["tasks"]["cmmlu"]
    assert changed["data"] != base["tasks"]["cmmlu"]["data"]


def test_ceval_units_scored_one_by_one_equal_the_whole():
    from llmship.eval import eval_tokenizer
    from llmship.eval.ceval import Ceval
    from llmship.runtime import load_engine

    cfg = Config.model_validate({"eval": {"ceval": {"max_questions": 2, "subjects": ["civil_servant", "metrology_engineer"]}}})
    task, tokenizer = Ceval(cfg), eval_tokenizer(cfg)
    cset = task.prepare(tokenizer, 1024)
    assert task.units(cset) == ["ppl/civil_servant", "ppl/metrology_engineer", "gen/civil_servant",
                                "gen/metrology_engineer"]
    engine = load_engine(cfg.model, cfg.runtime)
    try:
        whole, metrics, _ = task.score(engine, cset, tokenizer, None)
        parts = [task.score_unit(engine, cset, unit, tokenizer) for unit in task.units(cset)]
    finally:
        engine.close()
    for unit, (fields, unit_metrics, _) in zip(task.units(cset), parts, strict=True):
        mode, subject = unit.split("/")
        assert fields["predictions"][mode] == [r for r in whole["predictions"][mode] if r["subject"] == subject]
        assert unit_metrics == {f"ceval/{unit}": metrics[f"ceval/{unit}"]}


def test_baseline_scores_are_a_cached_stage(tmp_path):
    out = tmp_path / "out"
    cfg = Config.model_validate({"output": {"dir": str(out)}, "eval": ONLY_CMMLU})
    first = run_eval(cfg, {}, tmp_path / "eval1")
    assert not first["baseline_cached"]
    record = json.loads((out / ".llmship" / "stages" / "eval-baseline.json").read_text())
    folder = out / record["artifact"]
    assert (folder / "baseline.json").is_file() and folder.parent == out / ".llmship" / "eval-baseline"
    second = run_eval(cfg, {}, tmp_path / "eval2")
    assert second["baseline_cached"] and second["metrics"] == first["metrics"]
    assert "cmmlu/ppl/average" in second["metrics"]["pytorch"]
    # another question count is another key: scored again, and the stale entry goes
    more = cfg.model_copy(update={"eval": Config.model_validate({"eval": {**ONLY_CMMLU, "cmmlu": {
        "modes": ["ppl"], "max_questions": 2}}}).eval})
    third = run_eval(more, {}, tmp_path / "eval3")
    assert not third["baseline_cached"] and not folder.exists()
    assert [p.name for p in (out / ".llmship" / "eval-baseline").iterdir()] == \
        [Path(json.loads((out / ".llmship" / "stages" / "eval-baseline.json").read_text())["artifact"]).name]
    # eval.baseline_cache: false neither reads nor writes it
    off = more.model_copy(update={"eval": more.eval.model_copy(update={"baseline_cache": False})})
    assert not run_eval(off, {}, tmp_path / "eval4")["baseline_cached"]


def test_cmmlu_goals_are_validated_like_ceval_goals():
    from llmship.errors import UserError

    goal = {"metric": "cmmlu/gen/average", "type": "threshold", "value": 20}
    assert Config.model_validate({"gate": {"goals": [goal]}}).gate.goals[0].judged_by_interval
    for eval_section in ({"cmmlu": {"enabled": False}}, {"cmmlu": {"modes": ["ppl"]}}):
        with pytest.raises((UserError, ValueError), match="not measured with this eval config"):
            Config.model_validate({"eval": eval_section, "gate": {"goals": [goal]}})
    with pytest.raises((UserError, ValueError), match="a percentage"):
        Config.model_validate({"gate": {"goals": [{**goal, "value": 120}]}})


def test_c4_blocks_of_windows_scored_one_by_one_merge_into_the_whole():
    from llmship.eval import eval_tokenizer
    from llmship.eval.perplexity import C4Perplexity
    from llmship.runtime import load_engine

    cfg = Config.model_validate({"eval": {"batch_size": 2, "perplexity": {"windows": 11, "seq_len": 64}}})
    task, tokenizer = C4Perplexity(cfg), eval_tokenizer(cfg)
    windows = task.prepare(tokenizer, 1024)
    assert task.units(windows) == ["windows 0-7", "windows 8-10"]  # 4 batches of 2 per unit
    engine = load_engine(cfg.model, cfg.runtime)
    try:
        whole = task.score(engine, windows, tokenizer, None)
        parts = [task.score_unit(engine, windows, unit, tokenizer) for unit in task.units(windows)]
    finally:
        engine.close()
    assert [len(fields["c4"]["window_nll"]) for fields, _, _ in parts] == [8, 3]
    assert task.merge_units(windows, parts) == whole


def test_alpaca_blocks_of_batches_scored_one_by_one_merge_into_the_whole():
    from llmship.eval import eval_tokenizer
    from llmship.eval.lm import batches
    from llmship.eval.perplexity import AlpacaPerplexity, response_nll
    from llmship.runtime import load_engine

    cfg = Config.model_validate({"eval": {"batch_size": 2, "perplexity": {"alpaca_samples": 10}}})
    task, tokenizer = AlpacaPerplexity(cfg), eval_tokenizer(cfg)
    examples = task.prepare(tokenizer, 1024)
    assert len(examples) == 10 and task.units(examples) == ["batches 0-3", "batches 4-4"]  # 4 batches of 2 per unit
    order = [i for group in batches([len(e["ids"]) for e in examples], 2) for i in group]
    assert order != sorted(order)  # the batches are formed by length, not in record order
    engine = load_engine(cfg.model, cfg.runtime)
    try:
        whole = task.score(engine, examples, tokenizer, None)
        nll = response_nll(engine, examples, 2)
        parts = [task.score_unit(engine, examples, unit, tokenizer) for unit in task.units(examples)]
    finally:
        engine.close()
    assert [fields["alpaca"]["nll"] for fields, _, _ in parts] == [[nll[i] for i in order[:8]],
                                                                    [nll[i] for i in order[8:]]]
    assert task.merge_units(examples, parts) == whole
    assert whole[0]["alpaca"]["records"] == 10 and whole[1]["ppl/alpaca"] > 1


def test_consistency_blocks_of_batches_scored_one_by_one_merge_into_the_whole():
    import numpy as np

    from llmship.eval import eval_tokenizer
    from llmship.eval.consistency import Consistency
    from llmship.runtime import load_engine

    cfg = Config.model_validate({"eval": {"batch_size": 2, "consistency_prompts": 3}})
    task, tokenizer = Consistency(cfg), eval_tokenizer(cfg)
    prompts = task.prepare(tokenizer, 1024)
    assert len(prompts) == 3
    assert task.units(prompts) == ["teacher-forced batches 0-0", "teacher-forced batches 1-1", "greedy batches 0-0",
                                   "greedy batches 1-1"]  # one batch of 2 per unit
    # teacher-forced batches go by length, greedy ones by prompt order: the units follow each
    assert list(task.blocks(prompts).values()) == [[0, 2], [1], [0, 1], [2]]
    engine = load_engine(cfg.model, cfg.runtime)
    try:
        _, _, whole = task.score(engine, prompts, tokenizer, None)
        parts = [task.score_unit(engine, prompts, unit, tokenizer) for unit in task.units(prompts)]
    finally:
        engine.close()
    assert [len(next(iter(ref.values()))) for _, _, ref in parts] == [2, 1, 2, 1]
    fields, metrics, merged = task.merge_units(prompts, parts)
    assert fields == {} and metrics == {}
    assert merged["greedy"] == whole["greedy"] and all(len(g) > 0 for g in merged["greedy"])
    assert len(merged["logprobs"]) == len(whole["logprobs"]) == 3
    for got, want in zip(merged["logprobs"], whole["logprobs"], strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want) and got.shape[0] > 0
