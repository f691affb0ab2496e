"""Timing and memory measurement for benchmarks/speed.py, on the CPU and on CUDA.

The CPU is timed by wall clock, the layers of one size in rounds (``interleaved_medians``; each
call then also finds caches holding the other layers' data, as in a model), counting each call's
page faults too (see heap.py). CUDA is timed by
events recorded on the stream around each call, the calls queued back to back (so the GPU does not
wait between them unless the host falls behind, as it does for single-token calls); the times are
read after one synchronize. ``median_ms`` and ``copy_gb_per_s`` touch ``torch.cuda`` only when
given a CUDA device.
"""

import statistics
import time
from typing import Callable, NamedTuple

import torch
from heap import minor_faults


def median_ms(
    device: torch.device, fn: Callable[[], object], repeats: int, budget_s: float
) -> float:
    """Median time of ``fn`` in milliseconds on ``device``, after warm-up."""
    if device.type == "cuda":
        return _cuda_median_ms(fn, repeats, budget_s)
    return _wall_median_ms(fn, repeats, budget_s)


def _wall_median_ms(fn: Callable[[], object], repeats: int, budget_s: float) -> float:
    """Median wall time of fn after one warm-up call, stopping early once budget_s is spent."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return 1e3 * statistics.median(times)


class Median(NamedTuple):
    ms: float
    faults: int  # page faults per call (minor_faults)


def interleaved_medians(
    fns: list[Callable[[], object]], repeats: int, budget_s: float
) -> list[Median]:
    """Median wall time and page faults of each fn, timed in rounds (one call of each per round)
    so that a slow minute of a shared machine slows every fn alike and the ratios between them
    stay put."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    faults: list[list[int]] = [[] for _ in fns]
    start = time.perf_counter()
    for round_ in range(repeats):
        if round_ >= 3 and time.perf_counter() - start > budget_s * len(fns):
            break
        for fn, fn_times, fn_faults in zip(fns, times, faults):
            faults_before = minor_faults()
            begin = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - begin)
            fn_faults.append(minor_faults() - faults_before)
    # median_low: a count some call took, not the mean of two
    return [
        Median(1e3 * statistics.median(t), statistics.median_low(f)) for t, f in zip(times, faults)
    ]


def _cuda_median_ms(fn: Callable[[], object], repeats: int, budget_s: float) -> float:
    """Median GPU time of fn: one warm-up call, one timed call to size the run, then ``repeats``
    timed calls, fewer (but at least 3) where they would not fit in budget_s."""
    fn()  # warm-up: allocator, cuBLAS handles and heuristics, lazy kernel loading
    estimate = _cuda_event_times([fn])[0]
    count = min(repeats, max(3, int(1e3 * budget_s / max(estimate, 1e-3))))
    return statistics.median(_cuda_event_times([fn] * count))


def _cuda_event_times(calls: list[Callable[[], object]]) -> list[float]:
    """GPU milliseconds of each call, queued back to back and read after one synchronize."""
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in calls
    ]
    torch.cuda.synchronize()
    for call, (start, end) in zip(calls, events):
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def copy_gb_per_s(device: torch.device, mib: int, repeats: int, budget_s: float) -> float:
    """Bandwidth of ``dst.copy_(src)`` over ``mib`` MiB on ``device``, counting the bytes read and
    the bytes written: the practical ceiling of a kernel that streams its data once."""
    src = torch.ones(mib << 20, dtype=torch.uint8, device=device)  # touched, so the pages are real
    dst = torch.empty_like(src)
    ms = median_ms(device, lambda: dst.copy_(src), repeats, budget_s)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def cuda_peak_extra_mib(fn: Callable[[], object]) -> float:
    """Peak CUDA memory one call of ``fn`` allocates beyond what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def cpu_peak_extra_mib(fn: Callable[[], object]) -> float:
    """Peak CPU memory one call of ``fn`` allocates beyond what was allocated before it, in MiB:
    the running sum of the allocations and frees PyTorch's CPU allocator reports to the profiler,
    in order. It counts every tensor (intermediates, saved activations, gradients, kernel scratch
    from at::empty); not memory a library allocates on its own (oneDNN, MKL workspaces)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        fn()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda event: event.start_ns())
    current = peak = 0
    for event in events:
        if event.device_type() == torch.autograd.DeviceType.CPU:
            current += event.nbytes()
            peak = max(peak, current)
    return peak / 2**20
