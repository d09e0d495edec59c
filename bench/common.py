"""Shared helpers for benchmarks: honest timing and result files.

Timing follows the usual GPU method: warm up (compile, autotune, allocator), then time
many repetitions with device events and report the median. Results are merged into
``bench/results/<area>.json`` atomically, each figure beside the machine, date and the
command that reproduces it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
H200_BF16_PEAK_FLOPS = 989e12  # dense bf16 datasheet peak used for MFU (the reference)


def machine() -> str:
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n}x {torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} (torch {torch.__version__})"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], warmup: int = 3, reps: int = 10) -> dict[str, float]:
    """Median / min / max milliseconds of ``fn()`` over ``reps`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "reps": reps,
    }


def _command() -> str:
    """How to rerun this: ``python -m bench.<script> args`` from the project root."""
    script = Path(sys.argv[0])
    if script.suffix == ".py" and script.parent.name == "bench":
        return " ".join(["python -m bench." + script.stem, *sys.argv[1:]])
    return " ".join(["python", *sys.argv])


def record(
    area: str,
    key: str,
    value: float,
    details: dict[str, Any] | None = None,
    results_dir: Path | None = None,
) -> dict[str, Any]:
    """Merge one figure into ``<results_dir>/<area>.json`` (atomic replace)."""
    out_dir = Path(results_dir or os.environ.get("KEEL_BENCH_RESULTS", RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{area}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    entry = {
        "value": value,
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "command": _command(),
        "details": details or {},
    }
    data[key] = entry
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)
    print(
        f"[{area}] {key} = {value:.4g}  {json.dumps(details or {}, default=str)[:300]}", flush=True
    )
    return entry
