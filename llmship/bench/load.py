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


def load_warning(sample: dict[str, Any]) -> str | None:
    """One line when the sample says other work was running, else None."""
    busy = sample["others_fraction"] > BUSY_FRACTION_WARNING
    queued = sample["load_average_1m"] is not None and sample["load_average_1m"] > LOAD_PER_CPU_WARNING * sample["cpus"]
    if not (busy or queued):
        return None
    load = "" if sample["load_average_1m"] is None else f", 1-minute load average {sample['load_average_1m']:.2f}"
    return (f"machine busy: other processes used {sample['others_cpus']:.2f} of {sample['cpus']} CPUs during a "
            f"{sample['probe_s']:.0f} s probe{load}; figures are slowed and ratios between engines less reliable")
