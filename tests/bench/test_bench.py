"""Bench: vLLM ShareGPT sampling rules, metric definitions, roofline byte counts, and a full run on a tiny model."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from testkit import SHARED_DATA

from llmship.bench import metrics, roofline, runner
from llmship.bench.sharegpt import Limits, sample_requests
from llmship.errors import UserError

SHARED = SHARED_DATA


class WordTokenizer:
    """BOS + one token per whitespace-separated word: lengths the test can state exactly."""

    class _Out:
        def __init__(self, ids: list[int]):
            self.input_ids = ids

    def __call__(self, text: str) -> WordTokenizer._Out:
        return self._Out([1] + [3 + len(w) for w in text.split()])


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def conv(cid: str, prompt: str, answer: str | None, first: str = "human") -> dict:
    turns = [{"from": first, "value": prompt}]
    if answer is not None:
        turns.append({"from": "gpt", "value": answer})
    return {"id": cid, "conversations": turns}


# prompt tokens = words + 1 (BOS); limits below: min 4, prompt <= 20, total <= 40
CASES = [
    conv("one_turn", words(5), None),
    conv("gpt_first", words(5), words(5), first="gpt"),
    conv("system_first", words(5), words(5), first="system"),
    conv("prompt_short", words(2), words(5)),  # 3 tokens
    conv("output_short", words(5), words(2)),  # output 3 tokens
    conv("prompt_long", words(20), words(5)),  # 21 tokens > 20
    conv("total_long", words(15), words(30)),  # 16 + 31 = 47 > 40
    conv("keep_min", words(3), words(3)),  # 4 + 4, both at the minimum
    conv("keep_prompt_max", words(19), words(5)),  # 20 tokens, the longest allowed prompt
    conv("keep_total_max", words(15), words(23)),  # 16 + 24 = 40, exactly the total limit
    conv("keep_a", words(6), words(9)),
    conv("keep_b", words(10), words(4)),
]
LIMITS = Limits(min_len=4, max_prompt_len=20, max_total_len=40)
KEPT = {"keep_min", "keep_prompt_max", "keep_total_max", "keep_a", "keep_b"}


def vllm_order(entries: list[dict], seed: int) -> list[str]:
    """vLLM's ShareGPTDataset.load_data order, with the module-level random as vLLM uses it."""
    data = [e for e in entries if len(e["conversations"]) >= 2]
    random.seed(seed)
    random.shuffle(data)
    return [e["id"] for e in data]


def test_sampling_rules_exact_counts(tmp_path):
    # a hand-made ShareGPT V3 file with one conversation per rule, read by the loader the bench uses
    from llmship.bench.sharegpt import load_conversations

    file = tmp_path / "sharegpt_cases.json"
    file.write_text(json.dumps(CASES, ensure_ascii=False), encoding="utf-8")
    conversations = load_conversations(str(file))
    requests, report = sample_requests(conversations, WordTokenizer(), num_prompts=100, seed=0, limits=LIMITS,
                                       oversample=False)
    assert {r.conversation_id for r in requests} == KEPT
    assert report.read == 12 and report.examined == 11 and report.kept == 5 and report.used == 5
    assert report.dropped == {"fewer_than_2_turns": 1, "not_human_first": 2, "prompt_too_short": 1, "output_too_short": 1,
                              "prompt_too_long": 1, "total_too_long": 1}
    # vLLM's shuffled order is kept; only the dropped conversations are missing
    assert [r.conversation_id for r in requests] == [c for c in vllm_order(CASES, 0) if c in KEPT]
    by_id = {r.conversation_id: r for r in requests}
    assert by_id["keep_total_max"].prompt_len == 16 and by_id["keep_total_max"].output_len == 24
    assert by_id["keep_min"].prompt_ids[0] == 1  # BOS counted


def test_sampling_fixed_output_len_and_order_by_seed():
    requests, report = sample_requests(CASES, WordTokenizer(), 100, seed=3, output_len=10, limits=LIMITS, oversample=False)
    # fixed output: the short-output rule is not applied; totals use 10 (prompt 16 + 10 fits)
    assert {r.conversation_id for r in requests} == KEPT | {"output_short", "total_long"}
    assert report.dropped["output_too_short"] == 0 and report.dropped["total_too_long"] == 0
    assert all(r.output_len == 10 for r in requests)
    assert [r.conversation_id for r in requests] == [c for c in vllm_order(CASES, 3) if c in KEPT | {"output_short", "total_long"}]


def test_sampling_stops_at_num_prompts_and_oversamples():
    first, report = sample_requests(CASES, WordTokenizer(), 2, seed=0, limits=LIMITS)
    assert len(first) == 2 and report.kept == 2 and report.examined < 11
    many, report = sample_requests(CASES, WordTokenizer(), 9, seed=0, limits=LIMITS)
    assert report.kept == 5 and report.oversampled == 4 and report.used == 9
    random.seed(0)  # vLLM: reseed, then random.choice over the kept requests
    expected = [random.choice(many[:5]).conversation_id for _ in range(4)]
    assert [r.conversation_id for r in many[5:]] == expected and all(r.oversampled for r in many[5:])
    none_pass = [conv("x", words(1), words(1))]
    with pytest.raises(UserError, match="prompt_too_short 1"):
        sample_requests(none_pass, WordTokenizer(), 4, limits=LIMITS)


def test_limits_clipped_to_max_positions():
    assert Limits.clipped(4, 1024, 2048, 256) == Limits(4, 255, 256)
    assert Limits.clipped(4, 100, 2048, 4096) == Limits(4, 100, 2048)


# --------------------------------------------------------------------------- metrics
def test_request_latencies_and_summary():
    lat = metrics.request_latencies([10.5, 10.7, 11.0, 11.6], start=10.0)
    assert lat["ttft"] == pytest.approx(0.5) and lat["e2el"] == pytest.approx(1.6)
    assert lat["tpot"] == pytest.approx(1.1 / 3) and lat["itl"] == pytest.approx([0.2, 0.3, 0.6])
    assert metrics.request_latencies([1.2], start=1.0)["tpot"] is None
    s = metrics.summarize([0.001 * v for v in range(1, 101)])
    assert s["mean_ms"] == pytest.approx(50.5) and s["median_ms"] == pytest.approx(50.5)
    assert s["p90_ms"] == pytest.approx(90.1) and s["p99_ms"] == pytest.approx(99.01)
    recs = [{"prompt_len": 10, "produced_len": 4, **lat}, {"prompt_len": 6, "produced_len": 1,
                                                            **metrics.request_latencies([1.2], 1.0)}]
    agg = metrics.aggregate(recs, duration=2.0)
    assert agg["output_throughput"] == 2.5 and agg["total_token_throughput"] == 10.5 and agg["request_throughput"] == 1.0
    assert agg["latency"]["tpot"]["count"] == 1 and agg["latency"]["itl"]["count"] == 3


def test_plan_groups_by_length_and_padding():
    lengths = [(10, 50), (3, 5), (8, 48), (4, 6)]
    batches = runner.plan_batches(lengths, 2)
    assert batches == [[1, 3], [2, 0]]
    pad = runner.padding_overhead(lengths, batches)
    assert pad["padded_prompt_tokens"] == 2 * 4 + 2 * 10 and pad["decode_slots"] == 2 * 6 + 2 * 50
    assert pad["prompt_padding"] == pytest.approx(28 / 25 - 1) and pad["decode_padding"] == pytest.approx(112 / 109 - 1)


# --------------------------------------------------------------------------- roofline
def test_onnx_weight_bytes_counts_one_embedding_row():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.zeros((100, 8), np.float32), "embed")
    w = numpy_helper.from_array(np.zeros((8, 16), np.float32), "w")
    w4 = helper.make_tensor("w4", TensorProto.INT4, [16, 4], vals=np.zeros(64, np.int8))
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"]),
             helper.make_node("Cast", ["w4"], ["w4f"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["y", "w4f"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [table, w, w4])
    model = helper.make_model(graph)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"llmship-roofline-{os.getpid()}.onnx"
    onnx.save(model, str(path))
    try:
        got = roofline.onnx_weight_bytes(path)
        assert got["weight_bytes"] == 3200 + 512 + 32
        assert got["bytes_per_step"] == 32 + 512 + 32  # one 8-float row + the MatMul weight + 64 int4 values
        # tied: the table also feeds a MatMul, so it is read in full every step
        graph.node.append(helper.make_node("MatMul", ["z", "embed"], ["t"]))
        onnx.save(helper.make_model(graph), str(path))
        assert roofline.onnx_weight_bytes(path)["bytes_per_step"] == 3200 + 512 + 32
    finally:
        path.unlink(missing_ok=True)


def test_roofline_figures_and_bandwidth():
    r = roofline.roofline(bytes_per_step=1_000_000, bandwidth=10e9, decode_steps=500, decode_seconds=1.0)
    assert r["limit_steps_per_s"] == pytest.approx(10_000) and r["fraction_of_limit"] == pytest.approx(0.05)
    r = roofline.roofline(bytes_per_step=1_000_000, bandwidth=10e9, decode_steps=500, decode_seconds=1.0,
                          cache_bytes_per_step=250_000)
    assert r["limit_steps_per_s"] == pytest.approx(8_000) and r["fraction_of_limit"] == pytest.approx(0.0625)
    assert r["weights_fraction_of_limit"] == pytest.approx(0.05)
    bw = roofline.measure_read_bandwidth(threads=2, array_bytes=8 << 20, repeats=2)
    assert bw["bytes_per_s"] > 1e8 and bw["threads"] == 2


def test_decode_cache_bytes_count_each_live_context():
    # 2 layers x 4 kv heads x 8 dims x fp32, keys and values: 512 bytes per cached token
    per_token = roofline.cache_bytes_per_token(layers=2, kv_heads=4, head_dim=8, itemsize=4)
    assert per_token == 512
    # request 0: prompt 10, 3 outputs -> decode steps read 11 and 12 tokens; request 1: prompt 5, 1 output -> none
    assert roofline.decode_cache_bytes([(10, 3), (5, 1)], [[1, 0]], per_token) == (11 + 12) * 512
    assert roofline.decode_cache_bytes([(10, 3), (5, 4)], [[0], [1]], per_token) == (11 + 12 + 6 + 7 + 8) * 512


def test_onnx_cache_bytes_read_a_symbolic_head_size_from_genai_config(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from llmship.errors import UserError

    past = [helper.make_tensor_value_info(f"past_key_values.0.{kv}", TensorProto.FLOAT16, ["batch", 4, "past", "kv_cache_dim"])
            for kv in ("key", "value")]
    nodes = [helper.make_node("Identity", [p.name], [f"present.0.{p.name.rsplit('.', 1)[1]}"]) for p in past]
    outputs = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT16, None) for n in nodes]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", past, outputs)), str(tmp_path / "model.onnx"))
    with pytest.raises(UserError, match="genai_config.json"):
        roofline.onnx_cache_bytes_per_token(tmp_path / "model.onnx")
    decoder = {"num_key_value_heads": 4, "head_size": 16, "num_hidden_layers": 1}
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": decoder}}))
    assert roofline.onnx_cache_bytes_per_token(tmp_path / "model.onnx") == 2 * 4 * 16 * 2  # key + value, fp16


# --------------------------------------------------------------------------- full runs on a tiny exported model
@pytest.fixture(scope="module")
def tiny(tiny_model, tiny_fp32):
    """The session's tiny model and its fp32 export (root / "fp32"; shared, never written to)."""
    from llmship.config import Config

    root = tiny_fp32.parent
    cfg = Config()
    cfg.model.path = str(tiny_model)
    cfg.runtime.threads = 1
    cfg.bench.num_prompts = 5
    cfg.bench.batch_size = 2
    cfg.bench.max_prompt_len = 96  # keeps the run short; the sampling rules are tested exactly above
    cfg.bench.isolate = False
    return cfg, root


def test_ignore_eos_gives_exact_lengths(tiny):
    from llmship.runtime import load_engine

    cfg, _ = tiny
    engine = load_engine(cfg.model, cfg.runtime)
    prompt = [1, 40, 41, 42, 43]
    first = engine.generate([prompt], 1)[0][0]
    engine.eos_token_id = first  # the model's very first token is now EOS
    assert engine.generate([prompt], 6) == [[first]]
    outputs, start, steps = runner.run_batch(engine, [prompt, prompt[:3]], [6, 3])
    assert [len(o) for o in outputs] == [6, 3] and len(steps) == 6 and all(t > start for t in steps)


def test_run_bench_baseline_and_variant(tiny, tmp_path):
    from llmship.bench import run_bench

    cfg, root = tiny
    progress_lines: list[str] = []
    result = run_bench(cfg, {"fp32": root / "fp32"}, tmp_path / "bench", progress=progress_lines.append)
    assert result["baseline"] == "pytorch" and [e["name"] for e in result["engines"]] == ["pytorch", "fp32"]
    row = result["engines"][1]
    for key in ("mean_ttft_ms", "median_tpot_ms", "p90_itl_ms", "p99_e2el_ms", "output_throughput"):
        assert row["metrics"][key] > 0, key
    assert row["ratio_output_throughput"] > 0 and row["peak_rss_mb"] > 0 and row["roofline_fraction"] > 0
    assert all(Path(p["path"]).is_file() for p in result["plots"])
    assert result["sampling"]["used"] == 5 and result["sampling"]["read"] >= 5
    assert result["sampling"]["limits"]["max_total_len"] == 256  # clipped to the tiny model's max positions
    full = json.loads((tmp_path / "bench" / "bench.json").read_text())
    requested = [r["output_len"] for r in full["requests"]]
    for name, engine in full["engines"].items():
        assert [r["produced_len"] for r in engine["records"]] == requested, name
        m = engine["metrics"]
        for key in ("request_throughput", "output_throughput", "total_token_throughput", "duration_s"):
            assert m[key] > 0, (name, key)
        for metric in metrics.LATENCY_METRICS:
            for stat in ("mean_ms", "median_ms", "p90_ms", "p99_ms"):
                assert m["latency"][metric][stat] > 0, (name, metric, stat)
        assert engine["load_s"] > 0 and engine["memory"]["peak_rss_bytes"] > 0 and engine["size_bytes"] > 0
        roof = engine["roofline"]
        assert roof["fraction_of_limit"] > roof["weights_fraction_of_limit"] > 0 and roof["limit_steps_per_s"] > 0
        cache = roofline.decode_cache_bytes([(r["prompt_len"], r["output_len"]) for r in full["requests"]],
                                            full["batches"], engine["weights"]["cache_bytes_per_token"])
        assert roof["cache_bytes_per_step"] == pytest.approx(cache / engine["decode"]["steps"])
        assert m["output_tokens"] == sum(requested)
    base, var = full["engines"]["pytorch"], full["engines"]["fp32"]
    # the same model and fp32 cache: PyTorch's config and the graph's past inputs give the same bytes per token
    assert base["weights"]["cache_bytes_per_token"] == var["weights"]["cache_bytes_per_token"] > 0
    assert var["ratios"]["output_throughput"] == pytest.approx(var["metrics"]["output_throughput"] / base["metrics"]["output_throughput"])
    assert var["ratios"]["size_bytes"] == pytest.approx(var["size_bytes"] / base["size_bytes"])
    # same fp32 weights: bytes read per step agree within the rotary tables the graph adds
    assert var["weights"]["bytes_per_step"] == pytest.approx(base["weights"]["bytes_per_step"], rel=0.05)
    assert full["padding"]["decode_slots"] >= full["padding"]["output_tokens"]
    for png in ("throughput.png", "latency.png"):
        assert (tmp_path / "bench" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert "| pytorch (baseline) |" in md and "| fp32 |" in md
    assert "Baseline (engine torch, float32): PyTorch baseline: whole model, float32" in md
    assert (full["baseline_run"]["mode"], full["baseline_run"]["dtype"]) == ("whole", "float32")
    assert any(line.startswith("bench fp32: 5/5") for line in progress_lines)


def test_run_bench_isolated_process(tiny, tmp_path):
    from llmship.bench import run_bench

    cfg, root = tiny
    cfg = cfg.model_copy(deep=True)
    cfg.bench.isolate = True
    cfg.bench.baseline = False
    cfg.bench.num_prompts = 2
    result = run_bench(cfg, {"fp32": root / "fp32"}, tmp_path / "iso")
    engine = result["engines"][0]
    assert result["baseline"] is None and engine["ratios"] == {} and engine["ratio_output_throughput"] is None
    full = json.loads((tmp_path / "iso" / "bench.json").read_text())
    assert engine["memory"]["method"].endswith("fresh process") or os.name != "posix"
    assert engine["memory"]["peak_rss_bytes"] >= engine["memory"]["rss_before_load_bytes"] > 0
    assert [r["produced_len"] for r in full["engines"]["fp32"]["records"]] == [r["output_len"] for r in full["requests"]]


def test_genai_engine_matches_ort(tiny):
    pytest.importorskip("onnxruntime_genai")
    from llmship.runtime import GenaiEngine, load_engine

    cfg, root = tiny
    prompts = [[1, 40, 41, 42, 43, 50, 60], [1, 77, 78]]
    ort = load_engine(root / "fp32", cfg.runtime)
    before = {f.name: f.stat().st_mtime_ns for f in (root / "fp32").iterdir()}
    genai = load_engine(root / "fp32", cfg.runtime.model_copy(update={"engine": "genai"}))
    assert isinstance(genai, GenaiEngine)
    steps: list[int] = []
    try:
        got = genai.generate(prompts, [6, 3], ignore_eos=True, on_step=lambda step, _tokens: steps.append(step))
        assert got == ort.generate(prompts, [6, 3], ignore_eos=True)
        assert steps == list(range(6))
        assert {f.name: f.stat().st_mtime_ns for f in (root / "fp32").iterdir()} == before  # the folder is never written to
    finally:
        genai.close()


# --------------------------------------------------------------------------- real ShareGPT sample
@pytest.mark.skipif(not (SHARED / "sharegpt").is_dir() or not (SHARED / "tokenizers" / "llama-32k").is_dir(),
                    reason="../shared/data ShareGPT sample or LLaMA tokenizer absent")
def test_real_sharegpt_with_llama_tokenizer():
    import sentencepiece as spm

    from llmship.bench.sharegpt import load_conversations
    from llmship.source import load_tokenizer

    file = SHARED / "sharegpt" / "ShareGPT_V3_unfiltered_cleaned_split.sample300.json"
    entries = load_conversations(file)
    tokenizer = load_tokenizer(SHARED / "tokenizers" / "llama-32k")
    requests, report = sample_requests(entries, tokenizer, 1000, seed=0, oversample=False)
    assert report.read == 300 and report.used == len(requests) == report.kept
    assert report.examined == report.read - report.dropped["fewer_than_2_turns"]
    assert report.dropped["not_human_first"] > 0  # the sample holds gpt- and system-first conversations
    assert sum(report.dropped.values()) + report.kept == report.read
    # lengths as SentencePiece itself counts them, BOS included (what vLLM's LLaMA tokenizer gives)
    sp = spm.SentencePieceProcessor(model_file=str(SHARED / "tokenizers" / "llama-32k" / "tokenizer.model"))
    by_id = {e["id"]: e for e in entries}
    for r in requests[:40]:
        turns = by_id[r.conversation_id]["conversations"]
        assert r.prompt_ids == [1, *sp.encode(turns[0]["value"])]
        assert r.output_len == 1 + len(sp.encode(turns[1]["value"]))
        assert 4 <= r.prompt_len <= 1024 and r.prompt_len + r.output_len <= 2048


# --------------------------------------------------------------------------- threads, machine load, repeats
def test_every_engine_runs_the_same_threads_under_omp_num_threads_1(tiny, tmp_path, monkeypatch):
    """PyTorch follows OMP_NUM_THREADS and ONNX Runtime does not: the bench sets both explicitly (fresh workers inherit
    the environment, so torch there starts from the variable)."""
    from llmship.bench import run_bench
    from llmship.runtime.threads import default_threads

    cfg, root = tiny
    cfg = cfg.model_copy(deep=True)
    cfg.runtime.threads = 0  # the default: the machine's physical cores
    cfg.bench.isolate = True
    cfg.bench.num_prompts = 1
    cfg.bench.warmup = 0
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = run_bench(cfg, {"fp32": root / "fp32"}, tmp_path / "threads")
    cores = default_threads()
    assert result["threads"] == {"intra_op": cores, "inter_op": 1, "source": "physical cores"}
    assert {e["name"]: e["threads"] for e in result["engines"]} == {"pytorch": cores, "fp32": cores}
    assert {e["name"]: e["info"]["interop_threads"] for e in result["engines"]} == {"pytorch": 1, "fp32": 1}
    assert not [w for w in result["warnings"] if "intra-op threads" in w]
    md = (tmp_path / "threads" / "bench.md").read_text()
    assert f"{cores} intra-op threads (physical cores)" in md and f"| fp32 | {cores} (1) |" in md


def test_runtime_threads_reach_every_engine(tiny):
    import torch

    from llmship.bench import runner

    cfg, root = tiny
    runtime = {**cfg.runtime.model_dump(), "threads": 3}
    before = torch.get_num_threads()
    try:
        for spec in ({"kind": "torch", "model": cfg.model.model_dump()}, {"kind": "ort", "folder": str(root / "fp32")}):
            engine = runner.load(spec, runtime)
            try:
                assert engine.info()["threads"] == 3, spec["kind"]
            finally:
                engine.close()
    finally:
        torch.set_num_threads(before)  # torch's pool is process-wide: later tests get theirs back
    pytest.importorskip("onnxruntime_genai")
    genai = runner.load({"kind": "genai", "folder": str(root / "fp32")}, runtime)
    try:
        decoder = json.loads((genai._view / "genai_config.json").read_text())["model"]["decoder"]
        assert decoder["session_options"]["intra_op_num_threads"] == 3 == genai.info()["threads"]
    finally:
        genai.close()


def test_load_probe_sees_another_process_spinning():
    import subprocess
    import sys

    from llmship.bench.load import busy_warning, is_busy, sample_load

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        sample = sample_load(1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert 0.9 < sample["probe_s"] < 5 and sample["cpus"] >= 1
    # one spinning process alone takes a whole CPU (less only if this loaded machine starves it)
    assert sample["others_cpus"] > 0.3 and sample["others_fraction"] == pytest.approx(sample["others_cpus"] / sample["cpus"])
    assert is_busy(sample)
    idle = {**sample, "others_cpus": 0.02 * sample["cpus"], "others_fraction": 0.02, "load_average_1m": 0.1}
    queued = {**idle, "load_average_1m": sample["cpus"] + 0.5}  # more runnable threads than CPUs
    assert not is_busy(idle) and is_busy(queued)
    assert busy_warning([("a", idle), ("b", idle)]) is None
    one = busy_warning([("a", idle), ("b", sample)])
    assert one.startswith("machine busy before 1 of 2 runs (b): other processes used up to "
                          f"{sample['others_cpus']:.2f} of {sample['cpus']} CPUs")
    assert busy_warning([("a", queued), ("b", sample)]).startswith("machine busy before 2 of 2 runs: ")


def test_repeats_report_median_and_spread(tiny, tmp_path):
    from llmship.bench import run_bench
    from llmship.bench.load import is_busy
    from llmship.report import write_report

    cfg, root = tiny
    cfg = cfg.model_copy(deep=True)
    cfg.bench.repeats = 3
    cfg.bench.num_prompts = 2
    result = run_bench(cfg, {"fp32": root / "fp32"}, tmp_path / "rep")
    full = json.loads((tmp_path / "rep" / "bench.json").read_text())
    assert full["repeats"] == 3
    for name, engine in full["engines"].items():
        figure = engine["spread"]["output_throughput"]
        assert len(figure["runs"]) == 3 and figure["min"] <= figure["median"] <= figure["max"]
        assert figure["median"] == pytest.approx(sorted(figure["runs"])[1])
        assert engine["metrics"]["output_throughput"] == pytest.approx(figure["median"])
        tpot = engine["spread"]["tpot_median"]
        assert engine["metrics"]["latency"]["tpot"]["median_ms"] == pytest.approx(tpot["median"])
        assert len(engine["load"]) == 3 and [r["repeat"] for r in engine["records"]] == [0, 0, 1, 1, 2, 2], name
    base, var = full["engines"]["pytorch"]["spread"], full["engines"]["fp32"]["spread"]
    paired = [v / b for v, b in zip(var["output_throughput"]["runs"], base["output_throughput"]["runs"], strict=True)]
    assert var["ratio_output_throughput"]["runs"] == pytest.approx(paired)
    assert "ratio_output_throughput" not in base
    md = (tmp_path / "rep" / "bench.md").read_text()
    assert "## Spread over 3 runs" in md and "Every engine ran 3 times" in md and "## Machine load before each run" in md
    assert md.count("| fp32 | 1 |") + md.count("| fp32 | 2 |") + md.count("| fp32 | 3 |") >= 3  # a load row per run
    busy = sum(is_busy(sample) for engine in full["engines"].values() for sample in engine["load"])
    assert ("- **Warning**: machine busy before" in md) == (busy > 0)  # the load of this shared machine decides which
    if busy:
        assert f"machine busy before {busy} of 6 runs" in md
    write_report(cfg, {"fp32": root / "fp32"}, None, result, tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert ("Warning: machine busy before" in report) == (busy > 0)
    assert "| engine | threads | output tok/s |" in report and "Spread over 3 runs" in report
    assert f"| fp32 | 1 | {var['output_throughput']['median']:.2f} |" in report
