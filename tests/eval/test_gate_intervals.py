"""A gate that knows its sample size: paired bootstrap intervals of a variant's difference from the baseline,
goals judged by their interval, goals that cannot be met rejected as config errors, and the shipped int8 config's
goals on recorded embedded-model predictions."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from testkit import ASSETS, ROOT
from typer.testing import CliRunner

from llmship.cli import app
from llmship.config import Goal, load_config
from llmship.eval import ceval
from llmship.eval.gate import evaluate_goals, junit_xml
from llmship.eval.intervals import ceval_intervals, engine_intervals, top1_interval
from llmship.eval.summary import to_csv, to_md, to_txt

RECORDED = ASSETS / "embedded_eval.json"


def _records(answers: dict[str, list[bool]]) -> list[dict]:
    """Per-question predictions: a correct question predicts its gold 'A', a wrong one 'B'."""
    return [{"subject": s, "idx": i, "gold": "A", "pred": "A" if ok else "B", "correct": ok}
            for s, hits in answers.items() for i, ok in enumerate(hits)]


def _subjects(answers: dict[str, list[bool]]) -> list[dict]:
    return [{"name": s, "slug": "stem", "questions": len(h)} for s, h in answers.items()]


def test_identical_predictions_give_a_zero_interval():
    answers = {"law": [True, False, True, True, False, True], "college_physics": [False, True, True, False]}
    groups = ceval.group_members(_subjects(answers))
    found = ceval_intervals("ppl", groups, _records(answers), {"same": _records(answers)})["same"]
    assert set(found) == {"ceval/ppl/law", "ceval/ppl/college_physics", "ceval/ppl/stem", "ceval/ppl/hard",
                          "ceval/ppl/average", "ceval/ppl/agreement"}
    assert all((e["diff"], e["low"], e["high"]) == (0.0, 0.0, 0.0) for e in found.values())
    assert found["ceval/ppl/average"]["n"] == 10 and found["ceval/ppl/hard"]["n"] == 4
    # each engine's own accuracy is uncertain, the paired difference is not
    assert found["ceval/ppl/law"]["value_low"] < found["ceval/ppl/law"]["value_high"]


def test_one_lost_question_has_the_exact_bootstrap_interval():
    """One subject of 10, the variant loses one question: the resampled count X of that question is Binomial(10, 0.1),
    the difference is -10 X points; P(X <= 2) = 0.930 < 0.975 <= P(X <= 3) = 0.987, P(X = 0) = 0.349 > 0.025, so the
    95% percentile interval is exactly [-30, 0]."""
    base = {"law": [True] * 10}
    variant = {"law": [True] * 9 + [False]}
    found = ceval_intervals("gen", {"average": ["law"]}, _records(base), {"v": _records(variant)})["v"]
    for metric in ("ceval/gen/law", "ceval/gen/average", "ceval/gen/agreement"):
        assert found[metric]["diff"] == pytest.approx(-10.0)
        assert (found[metric]["low"], found[metric]["high"]) == (-30.0, 0.0)
        assert found[metric]["n"] == 10


def test_average_is_resampled_within_subjects_as_the_unweighted_mean():
    """Subjects of 4 and 20 questions, one lost in the small one: OpenCompass's average drops by 25 / 2 = 12.5
    (the question-pooled accuracy would drop by 1/24 = 4.17). X ~ Binomial(4, 1/4): P(X <= 2) = 0.949 < 0.975 <=
    P(X <= 3) = 0.996, so the average's interval is [-3 * 25 / 2, 0] = [-37.5, 0]."""
    base = {"law": [True] * 4, "college_physics": [True] * 10 + [False] * 10}
    variant = {"law": [True] * 3 + [False], "college_physics": [True] * 10 + [False] * 10}
    subjects = _subjects(base)
    groups = ceval.group_members(subjects)
    found = ceval_intervals("ppl", groups, _records(base), {"v": _records(variant)})["v"]
    expected = ceval.accuracy_metrics("ppl", subjects, _records(variant))
    reference = ceval.accuracy_metrics("ppl", subjects, _records(base))
    for metric, value in expected.items():  # the point difference is the eval's own aggregate
        assert found[metric]["diff"] == pytest.approx(value - reference[metric]), metric
    assert found["ceval/ppl/average"]["diff"] == pytest.approx(-12.5)
    assert (found["ceval/ppl/average"]["low"], found["ceval/ppl/average"]["high"]) == (-37.5, 0.0)
    assert found["ceval/ppl/college_physics"]["low"] == found["ceval/ppl/college_physics"]["high"] == 0.0
    assert found["ceval/ppl/average"]["n"] == 24


def test_variant_on_other_questions_gets_no_interval():
    base = _records({"law": [True, True]})
    shifted = [{**r, "idx": r["idx"] + 1} for r in base]
    assert ceval_intervals("ppl", {"average": ["law"]}, base, {"v": shifted}) == {"v": {}}


def test_consistency_top1_resamples_prompts():
    """Two prompts, all 10 positions agree in one and 5 of 10 in the other: a resample holds the first twice (1/4),
    both (1/2) or the second twice (1/4): differences 0, -25, -50, so the interval is [-50, 0] around -25."""
    found = top1_interval([[10, 10], [5, 10]])
    assert (found["diff"], found["low"], found["high"], found["n"], found["positions"]) == (-25.0, -50.0, 0.0, 2, 20)
    assert top1_interval([]) is None


# --------------------------------------------------------------------------- judging by interval
def _one_lost(n: int) -> tuple[dict, dict]:
    """Results and intervals of a variant that loses one of n questions of one subject (baseline all correct)."""
    base, variant = {"law": [True] * n}, {"law": [True] * (n - 1) + [False]}
    engines = {"pytorch": {"predictions": {"ppl": _records(base)}}, "v": {"predictions": {"ppl": _records(variant)}}}
    metrics = {"pytorch": {"ceval/ppl/average": 100.0}, "v": {"ceval/ppl/average": 100.0 * (n - 1) / n}}
    return metrics, engine_intervals(engines, "pytorch", {"average": ["law"]})


def test_interval_judging_fails_a_difference_the_sample_cannot_resolve():
    metrics, intervals = _one_lost(96)  # one question of 96 is 1.04 points
    goal = {"metric": "ceval/ppl/average", "type": "max-degradation", "value": 2.0}
    point = evaluate_goals([Goal(**goal, judge="point")], metrics, "pytorch", intervals)[0]
    interval = evaluate_goals([Goal(**goal, judge="interval")], metrics, "pytorch", intervals)[0]
    default = evaluate_goals([Goal(**goal)], metrics, "pytorch", intervals)[0]
    assert point["passed"] and point["judged"] == pytest.approx(100 - 100 / 96)
    assert not interval["passed"] and interval["judged"] == pytest.approx(100 + interval["diff_low"])
    assert interval["diff_low"] < -2.0 and interval["diff_high"] == 0.0 and interval["n"] == 96
    assert "n=96 cannot show it" in interval["message"]
    assert default["judge"] == "interval" and not default["passed"]
    # the same loss on 1000 questions is resolved: the interval's worse end clears the limit
    metrics, intervals = _one_lost(1000)
    wide = evaluate_goals([Goal(**goal)], metrics, "pytorch", intervals)[0]
    assert wide["passed"] and -2.0 < wide["diff_low"] < -0.1


def test_interval_judging_of_a_threshold_uses_the_variants_own_interval():
    metrics, intervals = _one_lost(96)
    goal = {"metric": "ceval/ppl/average", "type": "threshold", "value": 97.0}
    point = evaluate_goals([Goal(**goal, judge="point")], metrics, "pytorch", intervals)[0]
    interval = evaluate_goals([Goal(**goal)], metrics, "pytorch", intervals)[0]
    assert point["passed"] and not interval["passed"]
    assert interval["judged"] == intervals["v"]["ceval/ppl/average"]["value_low"] < 97.0


def test_unset_judge_falls_back_to_the_point_without_an_interval_but_an_explicit_one_fails():
    metrics, _ = _one_lost(96)
    goal = {"metric": "ceval/ppl/average", "type": "max-degradation", "value": 2.0}
    assert evaluate_goals([Goal(**goal)], metrics, "pytorch")[0]["judge"] == "point"
    explicit = evaluate_goals([Goal(**goal, judge="interval")], metrics, "pytorch")[0]
    assert not explicit["passed"] and "no paired interval" in explicit["message"]


def test_junit_and_summary_tables_show_interval_and_n():
    metrics, intervals = _one_lost(96)
    rows = evaluate_goals([Goal(metric="ceval/ppl/average", type="max-degradation", value=2.0)], metrics, "pytorch",
                          intervals)
    failure = ET.fromstring(junit_xml(rows)).find(".//failure")
    assert failure is not None and "(n=96)" in failure.text and "[-" in failure.text
    table = [{"dataset": "ceval", "version": "-", "metric": "naive_average", "mode": "ppl", "n": 96,
              "values": {"pytorch": 100.0, "v": 100 - 100 / 96}, "intervals": {"v": intervals["v"]["ceval/ppl/average"]}}]
    low = intervals["v"]["ceval/ppl/average"]["low"]
    assert to_csv(table, ["pytorch", "v"], "pytorch").splitlines() == [
        "dataset,version,metric,mode,pytorch,v,n,v_diff_low,v_diff_high", f"ceval,-,naive_average,ppl,100.00,98.96,96,{low:.2f},0.00"]
    assert to_md(table, ["pytorch", "v"], "pytorch").splitlines()[2].endswith(f"| 96 | -1.04 [{low:+.2f}, +0.00] |")
    assert to_txt(table, ["pytorch", "v"]).splitlines()[0].split() == ["dataset", "version", "metric", "mode", "pytorch", "v"]


# --------------------------------------------------------------------------- goals that cannot be met
IMPOSSIBLE = [
    ({"metric": "ceval/ppl/average", "type": "threshold", "value": 101}, ["gate.goals.0.value", "percentage"]),
    ({"metric": "consistency/top1", "type": "threshold", "value": -1}, ["gate.goals.0.value", "percentage"]),
    ({"metric": "ceval/ppl/average", "type": "max-degradation", "value": -0.5}, ["gate.goals.0.value", "negative"]),
    ({"metric": "ppl/c4", "type": "percent-max-degradation", "value": 100}, ["gate.goals.0.value", "[0, 100)"]),
    ({"metric": "ppl/c4", "type": "percent-max-degradation", "value": -2}, ["gate.goals.0.value", "[0, 100)"]),
    ({"metric": "accuracy/average", "type": "threshold", "value": 50}, ["gate.goals.0.metric", "no eval task produces"]),
    ({"metric": "ppl/c4", "type": "max-degradation", "value": 1, "judge": "interval"}, ["gate.goals.0.judge", "no interval"]),
    ({"metric": "ceval/gen/average", "type": "max-degradation", "value": 1}, ["gate", "ceval/gen/average", "not measured"]),
]


@pytest.mark.parametrize(("goal", "fragments"), IMPOSSIBLE)
def test_a_goal_that_cannot_be_met_is_an_exit_2_config_error(tmp_path, goal, fragments):
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps({"eval": {"ceval": {"modes": ["ppl"]}}, "gate": {"goals": [goal]},
                                "output": {"dir": str(tmp_path / "out")}}))
    result = CliRunner().invoke(app, ["eval", str(path)])
    assert result.exit_code == 2, result.stderr[-2000:]
    message = " ".join(line for line in result.stderr.splitlines() if line.strip())
    assert message.startswith("error:") and "Traceback" not in result.stderr
    for fragment in [str(path), *fragments]:
        assert fragment in message, (fragment, message)
    assert not (tmp_path / "out").exists()


def test_a_subject_the_data_lacks_is_an_error_naming_the_file_before_scoring(tmp_path):
    from llmship.errors import UserError
    from llmship.eval import check_goals

    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps({"gate": {"goals": [{"metric": "ceval/ppl/no_such_subject", "type": "threshold",
                                                    "value": 50}]}}))
    with pytest.raises(UserError) as info:
        check_goals(load_config(path), {"ceval/ppl/average", "ceval/ppl/law", "ppl/c4"})
    assert f"{path}: gate.goals.0.metric" in str(info.value) and "no_such_subject" in str(info.value)


def test_boundary_goals_are_accepted(tmp_path):
    goals = [{"metric": "ceval/ppl/average", "type": "threshold", "value": 100},
             {"metric": "consistency/top1", "type": "threshold", "value": 0},
             {"metric": "ppl/c4", "type": "max-degradation", "value": 0},
             {"metric": "ppl/c4", "type": "percent-max-degradation", "value": 99.9},
             {"metric": "ppl/c4", "type": "threshold", "value": 250.0}]
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps({"gate": {"goals": goals}}))
    assert len(load_config(path).gate.goals) == 5


# --------------------------------------------------------------------------- shipped configs on the bundled model
@pytest.mark.skipif(not RECORDED.is_file(), reason="recorded embedded-model eval absent")
@pytest.mark.parametrize("config", ["configs/hf_llama_int8.yaml", "configs/hf_llama_fp16.yaml", "configs/demo.yaml"])
def test_shipped_goals_pass_on_recorded_embedded_results(config):
    """Per-question predictions and metrics of the bundled model's PyTorch baseline, fp32, fp16, w8a8-dynamic, w8a16, w4a16-rtn
    (recorded by `python scripts/record_embedded_eval.py`): each shipped goal passes, judged as the config says."""
    recorded = json.loads(RECORDED.read_text(encoding="utf-8"))
    engines = recorded["engines"]
    cfg = load_config(ROOT / config)
    names = {"pytorch", *(v.variant_name for v in cfg.quantize.all_variants())} & set(engines)
    engines = {name: engines[name] for name in engines if name in names}
    metrics = {name: rec["metrics"] for name, rec in engines.items()}
    intervals = engine_intervals(engines, "pytorch", recorded["groups"])
    rows = evaluate_goals(cfg.gate.goals, metrics, "pytorch", intervals)
    assert rows and all(row["passed"] for row in rows), [row["message"] for row in rows if not row["passed"]]
    if config.endswith("int8.yaml"):  # the case that failed before: w8a16 loses 1 of 96 questions, 89.58 -> 88.54
        assert metrics["pytorch"]["ceval/ppl/average"] == pytest.approx(89.5833, abs=1e-3)
        assert metrics["w8a16"]["ceval/ppl/average"] == pytest.approx(88.5417, abs=1e-3)
        ceval_rows = [r for r in rows if r["metric"] == "ceval/ppl/average"]
        assert all(r["judge"] == "interval" and r["n"] == 96 for r in ceval_rows)
        lost = [r for r in ceval_rows if r["variant"] == "w8a16"][0]
        assert lost["judged"] < lost["value"] and np.isclose(lost["limit"], 89.5833 - cfg.gate.goals[0].value, atol=1e-3)
        assert (lost["diff_low"], lost["diff_high"]) == (pytest.approx(-3.125, abs=0.01), 0.0)
        # the goal shipped before judged a 1-point limit by the point: one question of 96 failed it
        before = Goal(metric="ceval/ppl/average", type="max-degradation", value=1.0, judge="point")
        assert [r["passed"] for r in evaluate_goals([before], metrics, "pytorch", intervals) if r["variant"] == "w8a16"] == [False]


def test_regate_of_a_record_without_intervals_computes_them_from_the_stored_predictions(tmp_path):
    """An eval recorded before intervals existed is re-gated from its results.json, without scoring again."""
    from llmship.config import Config
    from llmship.eval import regate

    base, variant = {"law": [True] * 12}, {"law": [True] * 11 + [False]}
    engines = {"pytorch": {"metrics": {"ceval/ppl/average": 100.0}, "predictions": {"ppl": _records(base)}},
               "v": {"metrics": {"ceval/ppl/average": 100 - 100 / 12}, "predictions": {"ppl": _records(variant)}}}
    (tmp_path / "results.json").write_text(json.dumps({"baseline": "pytorch", "engines": engines,
                                                       "groups": {"average": ["law"]}, "gate": []}))
    old = {"baseline": "pytorch", "metrics": {n: e["metrics"] for n, e in engines.items()}, "gate": [],
           "summary": [{"name": "ceval/ppl/average", "values": {}}]}
    cfg = Config.model_validate({"eval": {"perplexity": {"enabled": False}, "consistency_prompts": 0},
                                 "gate": {"goals": [{"metric": "ceval/ppl/average", "type": "max-degradation", "value": 10}]}})
    result = regate(cfg, old, tmp_path)
    row = result["gate"][0]
    assert row["judge"] == "interval" and row["n"] == 12 and row["diff_low"] < -10 and not row["passed"]
    assert result["summary"][0]["intervals"]["v"]["n"] == 12
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["intervals"]["v"]["ceval/ppl/average"]["low"] == row["diff_low"]
    assert "<failure" in (tmp_path / "junit.xml").read_text()
