"""Clocks that count asynchronous device work, and peak-memory meters, for CPU and CUDA."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


class StepClock:
    """Timestamps between generation steps; durations() gives the seconds between consecutive marks.

    On CUDA, kernels run asynchronously: a host clock would time the launches, not the work. So each mark
    records a CUDA event in the stream, and durations() synchronises once at the end, leaving the steps
    themselves free of host syncs. On CPU, work is synchronous and perf_counter is exact enough.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        if self.cuda:
            torch.cuda.synchronize(device)  # earlier queued work must not leak into the first step

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]
        return [b - a for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_times(fn, device: torch.device, repeats: int) -> list[float]:
    """Wall time of each of `repeats` calls of fn(), the device synchronised around each call."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    return statistics.median(wall_times(fn, device, repeats))


class PeakMemory:
    """Peak memory during one run.

    CUDA: torch's allocator statistics (max_memory_allocated after reset_peak_memory_stats), i.e. the
    most bytes held in tensors at once, weights included. CPU: the process's peak resident set size
    (VmHWM in /proc/self/status), reset before the run by writing 5 to /proc/self/clear_refs, so the
    value is the highest RSS reached during this run: weights, cache, activations and the interpreter.
    Where the reset is unavailable (non-Linux), the lifetime peak is reported and `exact` is False.

    growth_bytes() is the peak minus the same measure at the start: what the run itself added. On CPU the
    peak RSS is mostly weights and interpreter, the same for every strategy, so the growth is what differs.
    """

    STATUS = Path("/proc/self/status")
    CLEAR_REFS = Path("/proc/self/clear_refs")

    def __init__(self, device: torch.device):
        self.device = device
        self.exact = device.type == "cuda" or self._can_reset_rss()
        self.base = 0

    def describe(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated during the run (tensors on the GPU, weights included)"
        if self.exact:
            return "peak resident set size (VmHWM) during the run, reset via /proc/self/clear_refs"
        return "peak resident set size of the process since it started (no per-run reset available)"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.exact:
            self.CLEAR_REFS.write_text("5")
        self.base = self.peak_bytes()  # just reset: the current value

    def growth_bytes(self, peak: int) -> float:
        return peak - self.base if self.exact else float("nan")  # a lifetime peak says nothing about this run

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return self._vm_hwm()

    def _can_reset_rss(self) -> bool:
        try:
            self.CLEAR_REFS.write_text("5")
            return self._vm_hwm() > 0
        except OSError:
            return False

    def _vm_hwm(self) -> int:
        try:
            for line in self.STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB
