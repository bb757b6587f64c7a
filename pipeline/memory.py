"""Peak private memory of this process, per piece of work (a stage, a Ray task).

What a process holds of its own is its anonymous resident memory (RssAnon in
/proc/self/status). Its RSS also counts the pages of Ray's shared object store that it
mapped to read or write objects; those belong to the object store, whose size Ray sets
and which spills to disk, so they are left out here. Linux keeps no high-water mark of
RssAnon, so a thread samples it every few milliseconds while the work runs (`reset_peak`
starts a new measurement; `peak_rss_mb` reads it). Where /proc is missing, the process's
lifetime peak RSS from getrusage is reported instead.
"""

from __future__ import annotations

import resource
import sys
import threading
from pathlib import Path

_STATUS = Path("/proc/self/status")
_INTERVAL_S = 0.005


def _anon_mb() -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


class _Sampler:
    """The highest RssAnon seen since the last reset, sampled by a daemon thread."""

    def __init__(self) -> None:
        self.peak = 0.0
        self.lock = threading.Lock()
        self.available = _anon_mb() is not None
        if self.available:
            threading.Thread(target=self._run, name="peak-rss", daemon=True).start()

    def _run(self) -> None:
        stop = threading.Event()
        while not stop.wait(_INTERVAL_S):
            now = _anon_mb() or 0.0
            with self.lock:
                self.peak = max(self.peak, now)

    def reset(self) -> None:
        with self.lock:
            self.peak = _anon_mb() or 0.0

    def read(self) -> float:
        with self.lock:
            self.peak = max(self.peak, _anon_mb() or 0.0)
            return self.peak


_sampler: _Sampler | None = None


def _get() -> _Sampler:
    global _sampler
    if _sampler is None:
        _sampler = _Sampler()
    return _sampler


def reset_peak() -> None:
    """Start measuring a new peak from the current private memory."""
    _get().reset()


def peak_rss_mb() -> float:
    """Peak private resident memory since the last `reset_peak`, in MB (see the module docstring)."""
    sampler = _get()
    if sampler.available:
        return round(sampler.read(), 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 2**20 if sys.platform == "darwin" else peak / 1024, 1)  # bytes on macOS, kB elsewhere
