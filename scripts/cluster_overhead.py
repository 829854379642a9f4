"""Wall time of one config's eval here and through a Ray cluster started on this machine, in one run (issue 18's
overhead figure; the README's "Running on a cluster" quotes it).

    python -m llmship.cli compile llmship/demo.yaml output.dir=/tmp/demo   # once
    python scripts/cluster_overhead.py llmship/demo.yaml output.dir=/tmp/demo [--rounds 2]

Each round scores the baseline and every compiled variant twice, alternating: `cluster.backend: local`, then
`cluster.backend: ray` with `cluster.address: ''` (Ray's start and the node probe are inside the timed ray run,
the unit cache is emptied first, the baseline cache is off for both). Prints one JSON line per run and the ratio of
the medians; checks that both runs give the same metrics.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's llmship, also for the Ray workers (they start in this folder)

from llmship.config import load_config  # noqa: E402
from llmship.eval import run_eval  # noqa: E402
from llmship.eval.fanout import UNIT_FOLDER  # noqa: E402
from llmship.preflight import compiled_folders  # noqa: E402
from llmship.quantize import resolve_variants  # noqa: E402


def timed_eval(config: str, overrides: list[str], backend: str, out: Path) -> tuple[float, dict]:
    cfg = load_config(config, [*overrides, f"cluster.backend={backend}", "eval.baseline_cache=false"])
    variants = compiled_folders(resolve_variants(cfg.quantize), Path(cfg.output.dir).expanduser())
    shutil.rmtree(Path(cfg.output.dir).expanduser() / UNIT_FOLDER, ignore_errors=True)
    start = time.perf_counter()
    result = run_eval(cfg, variants, out)
    return time.perf_counter() - start, result["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    scratch = Path(load_config(args.config, args.overrides).output.dir).expanduser() / "overhead"
    walls: dict[str, list[float]] = {"local": [], "ray": []}
    metrics: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for backend in ("local", "ray"):
            wall, metrics[backend] = timed_eval(args.config, args.overrides, backend, scratch / backend)
            walls[backend].append(wall)
            print(json.dumps({"round": round_, "backend": backend, "wall_s": round(wall, 2)}), flush=True)
    if metrics["local"] != metrics["ray"]:
        sys.exit("the local and the Ray run disagree on some metric")
    local, ray = statistics.median(walls["local"]), statistics.median(walls["ray"])
    print(json.dumps({"local_s": round(local, 2), "ray_s": round(ray, 2), "ratio": round(ray / local, 3)}))


if __name__ == "__main__":
    main()
