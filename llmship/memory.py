"""Resident memory of this process and its children, as the kernel counts it; freed heap handed back to the OS."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any


def high_water_mark() -> int | None:
    """Peak RSS of this process from /proc/self/status (bytes), None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


class PeakRss:
    """Samples the resident memory of this process and its children (the whole process tree) in a thread. Where this
    process's own high-water mark (VmHWM) rose inside the window, that exact figure counts too: a sampler misses short
    peaks, and misses fewer of them the more samples a run takes, so sampled peaks grow with a run's length."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self._process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        import psutil

        total = 0
        for proc in [self._process, *self._process.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        self.peak = max(self.peak, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakRss:
        self._mark_before = high_water_mark()
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        mark = high_water_mark()
        if mark is not None and self._mark_before is not None and mark > self._mark_before:
            self.peak = max(self.peak, mark)

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc): tensors of a few MB fall under malloc's dynamic mmap threshold
    and land on the heap, where the holes they leave would let the resident size creep up with every layer."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None
