"""Record the bundled model's eval results (per-question predictions and metrics) for the gate tests.

tests/eval/test_gate_intervals.py checks that the shipped configs' goals pass on the bundled model, judged as they are
configured (by the worse end of the paired 95% interval for C-Eval accuracies). It reads the recording this script
writes, so the test runs in a second instead of compiling and scoring three variants. Regenerate it after a change
that moves the bundled model's predictions (the model, the quantizers, the C-Eval prompts):

    HF_HUB_OFFLINE=1 llmship compile configs/hf_llama_int8.yaml model.path=@embedded \\
        'calibration.sources=[{kind: c4, path: "@embedded", samples: 8}]' calibration.seq_len=256 output.dir=/tmp/int8
    HF_HUB_OFFLINE=1 llmship eval configs/hf_llama_int8.yaml model.path=@embedded eval.ceval.path=@embedded \\
        eval.perplexity.c4_path=@embedded eval.perplexity.alpaca_path=@embedded eval.perplexity.seq_len=256 \\
        output.dir=/tmp/int8            # exits 1 when a goal fails; results.json is written either way
    llmship compile llmship/demo.yaml output.dir=/tmp/demo && llmship eval llmship/demo.yaml output.dir=/tmp/demo
    # fp16: the same two commands on configs/hf_llama_fp16.yaml with runtime.provider=cpu and output.dir=/tmp/fp16
    python scripts/record_embedded_eval.py /tmp/int8/eval/results.json /tmp/demo/eval/results.json \
        /tmp/fp16/eval/results.json

Engines are merged by name (the first file's baseline is kept; every file must hold the same baseline scores).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "assets" / "embedded_eval.json"
KEPT = ("subject", "idx", "pred", "correct")


def compact(engine: dict) -> dict:
    """Metrics, C-Eval predictions (without scores and generated text) and consistency counts of one engine."""
    preds = {mode: [{k: r[k] for k in KEPT} for r in records] for mode, records in (engine.get("predictions") or {}).items()}
    out = {"metrics": engine["metrics"], "predictions": preds}
    if engine.get("consistency_top1_prompts"):
        out["consistency_top1_prompts"] = engine["consistency_top1_prompts"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="eval/results.json files of the bundled model")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    engines: dict[str, dict] = {}
    groups: dict = {}
    for path in args.results:
        stored = json.loads(path.read_text(encoding="utf-8"))
        baseline = stored["baseline"]
        base = compact(stored["engines"][baseline])
        if "pytorch" in engines and engines["pytorch"]["predictions"] != base["predictions"]:
            sys.exit(f"{path}: its baseline predictions differ from the first file's")
        engines.setdefault("pytorch", base)
        for name, rec in stored["engines"].items():
            if name != baseline:
                engines[name] = compact(rec)
        groups = groups or stored["groups"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"groups": groups, "engines": engines}, ensure_ascii=False, separators=(",", ":")),
                        encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): {', '.join(engines)}")


if __name__ == "__main__":
    main()
