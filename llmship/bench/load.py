"""How busy the machine is just before an engine is timed: a bench on a shared machine measures the other work too.

`sample_load()` records the 1-minute load average and the CPU time that processes other than this one take during a
short probe (this process sleeps through it). `load_warning()` turns a busy sample into one line for bench.md and the
report; it never fails the bench, since the figures are still what was measured, only not comparable across runs.
"""

from __future__ import annotations

import os
import time
from typing import Any

PROBE_S = 2.0  # long enough to average over the scheduler's time slices, short next to any engine's run
# Other processes taking more than a tenth of the machine's CPU time: enough to shift an engine that uses every core
# by about as much as two runs on an idle machine differ (README, "Speed extras": up to 15% run to run).
BUSY_FRACTION_WARNING = 0.10
# More runnable threads than CPUs over the last minute (the kernel's load average counts them): some work waited.
LOAD_PER_CPU_WARNING = 1.0
BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")  # steal: CPU taken by other virtual machines


def _busy_seconds(times: Any) -> float:
    return sum(getattr(times, name, 0.0) for name in BUSY_FIELDS)


def sample_load(seconds: float = PROBE_S) -> dict[str, Any]:
    """Load average and other processes' CPU use (in CPUs and as a share of all CPUs) over a `seconds` probe."""
    import psutil

    me = psutil.Process()
    cpus = psutil.cpu_count(logical=True) or 1
    machine_before, own_before, start = psutil.cpu_times(), me.cpu_times(), time.perf_counter()
    time.sleep(seconds)
    machine_after, own_after, wall = psutil.cpu_times(), me.cpu_times(), time.perf_counter() - start
    own = (own_after.user + own_after.system) - (own_before.user + own_before.system)
    others = max(0.0, _busy_seconds(machine_after) - _busy_seconds(machine_before) - own)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"probe_s": round(wall, 3), "cpus": cpus, "load_average_1m": load1, "others_cpus": others / wall,
            "others_fraction": others / wall / cpus}


def is_busy(sample: dict[str, Any]) -> bool:
    """Other processes took over BUSY_FRACTION_WARNING of the CPUs, or more threads were runnable than CPUs."""
    queued = sample["load_average_1m"] is not None and sample["load_average_1m"] > LOAD_PER_CPU_WARNING * sample["cpus"]
    return sample["others_fraction"] > BUSY_FRACTION_WARNING or queued


def describe(sample: dict[str, Any]) -> str:
    load = "" if sample["load_average_1m"] is None else f", 1-minute load average {sample['load_average_1m']:.2f}"
    return f"other processes used {sample['others_cpus']:.2f} of {sample['cpus']} CPUs during a {sample['probe_s']:.0f} s probe{load}"


def busy_warning(samples: list[tuple[str, dict[str, Any]]]) -> str | None:
    """One line for all runs, (label, sample) each, when any was busy; None when every run had the machine to itself."""
    busy = [(label, sample) for label, sample in samples if is_busy(sample)]
    if not busy:
        return None
    which = f" ({busy[0][0]})" if len(busy) == 1 else ""
    most = max(sample["others_cpus"] for _, sample in busy)
    loads = [sample["load_average_1m"] for _, sample in busy if sample["load_average_1m"] is not None]
    load = f", 1-minute load average up to {max(loads):.2f}" if loads else ""
    return (f"machine busy before {len(busy)} of {len(samples)} runs{which}: other processes used up to {most:.2f} of "
            f"{busy[0][1]['cpus']} CPUs during the {busy[0][1]['probe_s']:.0f} s probes{load}; figures are slowed and "
            "ratios between engines less reliable")
