"""What both benchmarks print first (software, hardware, threads, load) and how they time things."""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device, clock: str = "wall") -> str:
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    lines = [f"torch {torch.__version__} | python {platform.python_version()} | device {device} ({hw}) | "
             f"threads {torch.get_num_threads()} of {os.cpu_count()} cpus | clock {clock}"]
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        lines.append(f"load average {load:.2f} at start" + (
            f" -- busier than {os.cpu_count()} cpus: wall timings are noisy (ratios measured side by side hold best;"
            f" --threads 1 --clock cpu counts only this process's CPU time)"
            if load > (os.cpu_count() or 1) * 0.75 else ""))
    return "\n".join(lines)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def check_clock(clock: str, device: torch.device) -> None:
    """'cpu' (process CPU time) ignores time the OS gives to other processes, which on a busy shared machine is
    most of the noise; it is only meaningful for one CPU thread (several threads add up, OpenMP spin-waits included)."""
    if clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise SystemExit("error: --clock cpu needs --device cpu and --threads 1")


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1,
          clock: str = "wall") -> tuple[float, list[float], Any]:
    """Median seconds of ``repeats`` runs after ``warmup`` untimed runs; returns (median, all times, last result)."""
    now = CLOCKS[clock]
    out = None
    for _ in range(warmup):  # allocator, oneDNN/MKL kernel selection, CUDA context
        out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = now()
        out = fn()
        sync(device)
        times.append(now() - t0)
    return (statistics.median(times) if times else float("nan")), times, out


def interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1,
                clock: str = "wall") -> dict[str, tuple[float, list[float], Any]]:
    """Like ``timed`` for several functions at once, run round-robin (one run of each per round) so that a
    shared machine's drifting load hits them alike; returns name -> (median, times, last result)."""
    outs = {k: timed(f, device, repeats=0, warmup=warmup, clock=clock)[2] for k, f in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in tqdm(range(repeats), desc="timing rounds", leave=False, disable=repeats < 2):
        for k, f in fns.items():
            _, t, outs[k] = timed(f, device, repeats=1, warmup=0, clock=clock)
            times[k] += t
    return {k: (statistics.median(times[k]), times[k], outs[k]) for k in fns}
