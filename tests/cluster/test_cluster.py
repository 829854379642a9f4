"""cluster.backend: ray: the eval's units as Ray tasks on a real local cluster (an in-process `ray.init(num_cpus=2)`
shared by the module; one test with two `ray start` node processes on the loopback address), compared with the local
run of the same config: same predictions bit for bit, a killed worker retried, a unit that always fails named, a
rerun scoring only the units missing from the unit cache."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from testkit import ROOT

from llmship.config import Config
from llmship.errors import UserError
from llmship.eval.ceval import Ceval

ray = pytest.importorskip("ray")

# Small but every task and both modes: two C-Eval and two CMMLU subjects (8 units each), perplexity, consistency.
EVAL = {"ceval": {"max_questions": 3, "subjects": ["civil_servant", "metrology_engineer"]},
        "cmmlu": {"max_questions": 2, "subjects": ["economics", "world_history"]},
        "perplexity": {"windows": 2, "alpaca_samples": 4}, "consistency_prompts": 2}
# One thread per engine and one CPU per task: the local run and every worker run the same kernels.
SAME_THREADS = {"runtime": {"threads": 1}}
GOAL = {"goals": [{"metric": "ceval/ppl/average", "type": "max-degradation", "value": 50.0}]}


def config(out: Path, backend: str = "local", **cluster) -> Config:
    return Config.model_validate({**SAME_THREADS, "eval": EVAL, "gate": GOAL, "output": {"dir": str(out)},
                                  "cluster": {"backend": backend, "num_cpus": 1, **cluster}})


@pytest.fixture(scope="module")
def local_cluster():
    """One in-process Ray of 2 CPUs and one bench-node label for the module (starting one costs seconds); this module's classes travel by
    value, so the tasks' test subclasses run on the workers."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, resources={"bench-node": 1}, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


def scored(eval_dir: Path) -> dict:
    """What a run decides, without timings and placement: every engine's record, summary and gate rows, junit."""
    results = json.loads((eval_dir / "results.json").read_text(encoding="utf-8"))
    engines = {name: {k: v for k, v in rec.items() if k not in ("wall_s", "nodes")}
               for name, rec in results["engines"].items()}
    return {"engines": engines, "summary": results["summary"], "gate": results["gate"],
            "intervals": results["intervals"], "junit": (eval_dir / "junit.xml").read_text(encoding="utf-8"),
            "table": (eval_dir / "summary.txt").read_text(encoding="utf-8")}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, embedded_fp32) -> dict:
    """The local run every cluster run is compared with (the PyTorch baseline and the embedded fp32 export)."""
    from llmship.eval import run_eval

    out = tmp_path_factory.mktemp("local")
    run_eval(config(out), {"fp32": embedded_fp32.path}, out / "eval")
    return scored(out / "eval")


def test_eval_through_ray_equals_the_local_run(local_cluster, local_run, embedded_fp32, tmp_path):
    from llmship.eval import run_eval

    result = run_eval(config(tmp_path, "ray"), {"fp32": embedded_fp32.path}, tmp_path / "eval")
    got = scored(tmp_path / "eval")
    assert got["engines"]["fp32"]["predictions"] == local_run["engines"]["fp32"]["predictions"]
    assert got["engines"]["pytorch"]["cmmlu_predictions"] == local_run["engines"]["pytorch"]["cmmlu_predictions"]
    assert got == local_run
    assert set(result["metrics"]["fp32"]) >= {"ceval/gen/average", "cmmlu/ppl/average", "ppl/c4", "consistency/kl"}
    # 2 engines x (C-Eval 4 + CMMLU 4 + c4 + alpaca + consistency teacher-forced and greedy) units, each cached
    # under the output dir
    assert len(list((tmp_path / ".llmship" / "eval-units").glob("*.pkl"))) == 2 * 12
    records = json.loads((tmp_path / "eval" / "results.json").read_text())["engines"]
    assert len(records["fp32"]["nodes"]) == 1  # the one in-process node


class KilledOnce(Ceval):
    """C-Eval whose unit `ppl/civil_servant` kills its own worker process on the first attempt (a marker file says
    it did), as the out-of-memory killer or a lost node would."""

    marker: Path

    def score_unit(self, engine, prepared, unit, tokenizer, progress=None):
        if unit == "ppl/civil_servant" and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().score_unit(engine, prepared, unit, tokenizer, progress)


def only(task: Ceval):
    return lambda cfg: [task]


def test_a_killed_worker_is_retried_and_answers_the_same(local_cluster, local_run, embedded_fp32, tmp_path,
                                                          monkeypatch):
    import llmship.eval
    from llmship.eval import run_eval

    cfg = config(tmp_path, "ray", max_retries=1)
    task = KilledOnce(cfg)
    task.marker = tmp_path / "killed"
    monkeypatch.setattr(llmship.eval, "enabled_tasks", only(task))
    run_eval(cfg, {"fp32": embedded_fp32.path}, tmp_path / "eval")
    assert task.marker.is_file()  # the first attempt died
    got = scored(tmp_path / "eval")["engines"]
    for name in ("pytorch", "fp32"):
        assert got[name]["predictions"] == local_run["engines"][name]["predictions"]
        ceval = {k: v for k, v in got[name]["metrics"].items() if k.startswith("ceval/")}
        assert ceval == {k: v for k, v in local_run["engines"][name]["metrics"].items() if k.startswith("ceval/")}


class KilledAlways(Ceval):
    """C-Eval whose unit `gen/metrology_engineer` of the fp32 variant kills its worker on every attempt, once every
    other unit is cached (so the test knows which units a rerun must redo); each attempt appends a line to `log`."""

    log: Path
    units_folder: Path
    others: int

    def score_unit(self, engine, prepared, unit, tokenizer, progress=None):
        with self.log.open("a") as fh:
            fh.write(f"{unit}\n")
        if unit == "gen/metrology_engineer" and engine.info()["engine"] != "torch":  # the ONNX variant, not the baseline
            deadline = time.monotonic() + 120
            while len(list(self.units_folder.glob("*.pkl"))) < self.others and time.monotonic() < deadline:
                time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().score_unit(engine, prepared, unit, tokenizer, progress)


class Logged(Ceval):
    """C-Eval that appends each unit it scores to `log`."""

    log: Path

    def score_unit(self, engine, prepared, unit, tokenizer, progress=None):
        with self.log.open("a") as fh:
            fh.write(f"{unit}\n")
        return super().score_unit(engine, prepared, unit, tokenizer, progress)


def test_a_unit_failing_every_attempt_stops_the_run_and_a_rerun_redoes_only_it(local_cluster, local_run,
                                                                                  embedded_fp32, tmp_path, monkeypatch):
    import llmship.eval
    from llmship.eval import run_eval

    cfg = config(tmp_path, "ray", max_retries=1)
    failing = KilledAlways(cfg)
    failing.log, failing.units_folder, failing.others = tmp_path / "first.log", tmp_path / ".llmship" / "eval-units", 7
    monkeypatch.setattr(llmship.eval, "enabled_tasks", only(failing))
    with pytest.raises(UserError) as err:
        run_eval(cfg, {"fp32": embedded_fp32.path}, tmp_path / "eval")
    message = str(err.value)
    assert message.startswith("eval unit ceval gen/metrology_engineer of fp32: failed on all 2 attempt(s)")
    assert "\n" not in message and not (tmp_path / "eval").exists()
    assert failing.log.read_text().count("gen/metrology_engineer\n") == 3  # pytorch's once, fp32's twice
    assert len(list(failing.units_folder.glob("*.pkl"))) == 7

    again = Logged(cfg)
    again.log = tmp_path / "rerun.log"
    monkeypatch.setattr(llmship.eval, "enabled_tasks", only(again))
    run_eval(cfg, {"fp32": embedded_fp32.path}, tmp_path / "eval")
    assert again.log.read_text() == "gen/metrology_engineer\n"  # the seven cached units were not scored again
    got = scored(tmp_path / "eval")["engines"]
    assert got["fp32"]["predictions"] == local_run["engines"]["fp32"]["predictions"]


class RaisesAlways(Ceval):
    """C-Eval whose unit `ppl/civil_servant` raises on every attempt (each appends a line to `log`)."""

    log: Path

    def score_unit(self, engine, prepared, unit, tokenizer, progress=None):
        if unit == "ppl/civil_servant":
            with self.log.open("a") as fh:
                fh.write("attempt\n")
            raise ValueError("scores went NaN")
        return super().score_unit(engine, prepared, unit, tokenizer, progress)


def test_a_unit_raising_every_attempt_is_retried_then_named(local_cluster, tmp_path, monkeypatch):
    import llmship.eval
    from llmship.eval import run_eval

    cfg = config(tmp_path, "ray", max_retries=1)
    task = RaisesAlways(cfg)
    task.log = tmp_path / "attempts.log"
    monkeypatch.setattr(llmship.eval, "enabled_tasks", only(task))
    with pytest.raises(UserError, match=r"^eval unit ceval ppl/civil_servant of pytorch: failed on all 2 attempt\(s\) "
                                        r"\(cluster.max_retries 1\): ValueError: scores went NaN$"):
        run_eval(cfg, {}, tmp_path / "eval")
    assert task.log.read_text() == "attempt\nattempt\n"


def test_probe_names_the_node_and_the_path_it_does_not_see(local_cluster, tmp_path):
    from llmship.cluster import probe_nodes

    names = probe_nodes(local_cluster, tmp_path, {"eval.ceval.path": ROOT / "llmship" / "assets" / "samples" / "ceval"})
    assert len(names) == 1
    absent = tmp_path / "nowhere"
    with pytest.raises(UserError, match=r"^eval.ceval.path: node [\d.]+ \(\w{8}\) does not see .*nowhere \(every input"):
        probe_nodes(local_cluster, tmp_path, {"eval.ceval.path": absent})


def test_ray_missing_is_one_line_naming_the_extra(tmp_path):
    """cluster.backend: ray without Ray installed: the preflight says so, naming the extra (exit 2)."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["ray"] = None  # as if not installed
        sys.argv = ["llmship", "check", {str(ROOT / "llmship" / "demo.yaml")!r}, "cluster.backend=ray",
                    "output.dir={tmp_path}"]
        from llmship.cli import main
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'llmship[ray]'" in lines[0] and "cluster.backend" in lines[0]
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "ray", None)
        from llmship.cluster import import_ray

        with pytest.raises(UserError, match=r"llmship\[ray\]"):
            import_ray()


def test_backend_local_never_imports_ray(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from llmship.config import Config
        from llmship.eval import run_eval
        cfg = Config.model_validate({{"output": {{"dir": {str(tmp_path)!r}}}, "eval": {{
            "ceval": {{"modes": ["ppl"], "max_questions": 1, "subjects": ["civil_servant"]}}, "cmmlu": {{"enabled": False}},
            "perplexity": {{"enabled": False}}, "consistency_prompts": 0}}}})
        run_eval(cfg, {{}}, {str(tmp_path / "eval")!r})
        assert "ray" not in sys.modules, "ray imported"
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "eval" / "results.json").is_file()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def start_node(args: list[str], temp: Path, env: dict) -> subprocess.Popen:
    """`ray start ARGS --block` in a session of its own: the node's processes (GCS, raylet, workers) are its
    children, ended together by their process group at teardown."""
    command = [ray_cli(), "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--temp-dir", str(temp),
               "--disable-usage-stats", "--block"]
    return subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def stop_nodes(nodes: list[subprocess.Popen]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for node in reversed(nodes):
            try:
                os.killpg(node.pid, sig)
            except ProcessLookupError:
                continue
        for node in nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=30)


WAIT_FOR_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + 90
while sum(n["Alive"] for n in ray.nodes()) < 2 and time.monotonic() < deadline:
    time.sleep(0.5)
sys.exit(0 if sum(n["Alive"] for n in ray.nodes()) == 2 else 1)
"""


# C-Eval only (8 units): the start of two nodes and their workers is most of this test's time.
TWO_NODE_EVAL = {"ceval": {"max_questions": 2, "subjects": ["civil_servant", "metrology_engineer"]},
                 "cmmlu": {"enabled": False}, "perplexity": {"enabled": False}, "consistency_prompts": 0}


@pytest.mark.slow
def test_two_node_processes_on_loopback_share_the_units(embedded_fp32, tmp_path):
    """A head and a worker node started by `ray start` (one CPU each, different resources) on 127.0.0.1; the eval
    joins them by address, the probe runs on both, both score units, and the answers are the local run's."""
    port = free_port()
    temp = Path("/tmp") / f"ray-t{os.getpid()}-{port}"  # short: Ray's socket paths have a length limit
    # Ray 2.60 `ray start` turns token authentication on: every process of this cluster gets the same fresh token.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    nodes = [start_node(["--head", "--port", str(port), "--resources", '{"head-node": 1}', "--include-dashboard",
                         "false"], temp, env)]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the GCS listens: the worker node can join
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        nodes.append(start_node(["--address", f"127.0.0.1:{port}", "--resources", '{"bench-node": 1}'], temp, env))
        joined = subprocess.run([sys.executable, "-c", WAIT_FOR_NODES, f"127.0.0.1:{port}"], capture_output=True,
                                text=True, timeout=150, cwd=ROOT, env=env)
        assert joined.returncode == 0, joined.stderr[-2000:]
        out = tmp_path / "out"
        settings = {**config(out, "ray", address=f"127.0.0.1:{port}").model_dump(mode="json"), "eval": TWO_NODE_EVAL}
        code = textwrap.dedent(f"""
            import json
            from llmship.config import Config
            from llmship.eval import run_eval
            cfg = Config.model_validate(json.loads({json.dumps(json.dumps(settings))}))
            run_eval(cfg, {{"fp32": {str(embedded_fp32.path)!r}}}, {str(out / "eval")!r})
        """)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = json.loads((out / "eval" / "results.json").read_text())["engines"]
        assert len(set(records["pytorch"]["nodes"]) | set(records["fp32"]["nodes"])) == 2
        from llmship.eval import run_eval

        here = Config.model_validate({**settings, "cluster": {}, "output": {"dir": str(tmp_path / "here")}})
        run_eval(here, {"fp32": embedded_fp32.path}, tmp_path / "here" / "eval")
        assert scored(out / "eval") == scored(tmp_path / "here" / "eval")
    finally:
        stop_nodes(nodes)
        shutil.rmtree(temp, ignore_errors=True)


def model_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".onnx", ".data")}


@pytest.mark.slow
def test_compile_builds_the_variants_as_ray_tasks_after_the_export(local_cluster, tmp_path):
    """The fp32 export is built here; the two variants built from it as Ray tasks are the local build's files byte
    for byte, recorded as stages (a second compile builds nothing)."""
    from llmship.pipeline import compile_variants
    from llmship.quantize import resolve_variants

    def compile_in(out: Path, backend: str) -> dict:
        cfg = Config.model_validate({
            "export": {"optimize": False, "parity": {"greedy_tokens": 4, "decode_steps": 2}}, **SAME_THREADS,
            "quantize": {"scheme": "none", "variants": [
                {"scheme": "w8a8-dynamic"}, {"scheme": "w4a16", "method": "rtn", "options": {"block_size": 32}}]},
            "output": {"dir": str(out)}, "cluster": {"backend": backend}})
        return compile_variants(cfg, out, resolve_variants(cfg.quantize))

    local = compile_in(tmp_path / "local", "local")
    shutil.copytree(tmp_path / "local", tmp_path / "ray")  # the export is reused (records are relative to output.dir)
    for name in ("w8a8-dynamic", "w4a16-rtn"):
        shutil.rmtree(tmp_path / "ray" / name)
        (tmp_path / "ray" / ".llmship" / "stages" / f"variant-{name}.json").unlink()
    compiled = compile_in(tmp_path / "ray", "ray")
    for name, stage in compiled.items():
        assert model_files(stage.artifact) == model_files(local[name].artifact), name
    records = sorted((tmp_path / "ray" / ".llmship" / "stages").glob("*.json"))
    written = [record.stat().st_mtime_ns for record in records]
    compile_in(tmp_path / "ray", "ray")
    assert [record.stat().st_mtime_ns for record in records] == written  # nothing built or recorded again


@pytest.mark.slow
def test_bench_runs_each_engine_on_a_labelled_node_and_names_it(local_cluster, embedded_fp32, tmp_path):
    from llmship.bench import run_bench

    settings = {**SAME_THREADS, "bench": {"num_prompts": 2, "output_len": 4, "warmup": 0},
                "cluster": {"backend": "ray", "bench_resource": "bench-node"}, "output": {"dir": str(tmp_path)}}
    summary = run_bench(Config.model_validate(settings), {"fp32": embedded_fp32.path}, tmp_path / "bench")
    node = probe_nodes_names(local_cluster, tmp_path)
    assert {row["name"]: row["nodes"] for row in summary["engines"]} == {"pytorch": [node], "fp32": [node]}
    assert all(row["metrics"]["completed"] == 2 for row in summary["engines"])
    assert f"Nodes (Ray, one engine per bench node at a time): pytorch on {node}; fp32 on {node}." in \
        (tmp_path / "bench" / "bench.md").read_text()
    settings["cluster"]["bench_resource"] = "a100-node"
    with pytest.raises(UserError, match=r"^cluster.bench_resource: no node of the Ray cluster carries .*'a100-node'"):
        run_bench(Config.model_validate(settings), {"fp32": embedded_fp32.path}, tmp_path / "bench2")


def probe_nodes_names(ray_module, out: Path) -> str:
    from llmship.cluster import probe_nodes

    (name,) = probe_nodes(ray_module, out, {})
    return name
