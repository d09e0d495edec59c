"""Time preparing a bench dataset's training scans on the GPU path against the CPU path.

``load_prepared`` prepares training scans on the GPU when there is one (resampling and the
lung-margin dilation in torch, the lung mask on CPU threads). This prints how long all the
training series take that way, how long ``--cpu-scans`` of them take on the scipy path, and
how far the two disagree (largest windowed-intensity difference, largest fraction of
lung-mask voxels that differ). Usage: ``python -m bench.medical_prep_bench --data <dir>``
(a folder from ``python -m bench.medical_bench --prepare <dir> --n-series 128``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from apps.medical.config import MedicalConfig
    from apps.medical.data import load_prepared, preparation_device, read_truth, split_series

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--config", default="synthetic_bench")
    ap.add_argument("--cpu-scans", type=int, default=8)
    args = ap.parse_args(argv)
    cfg = MedicalConfig.named(args.config)
    truth = read_truth(args.data)
    train, _ = split_series(truth.seriesuids, cfg.data.heldout_fraction, cfg.data.split_seed)
    device = preparation_device() or "cpu"  # the torch path also runs on the CPU
    t0 = time.perf_counter()
    fast = load_prepared(cfg, args.data, train, device=device)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = load_prepared(cfg, args.data, train[: args.cpu_scans], device=None)
    t_ref = time.perf_counter() - t0
    d_img = max(float(np.abs(a.image - b.image).max()) for a, b in zip(fast, ref, strict=False))
    d_lung = max(float((a.lung != b.lung).mean()) for a, b in zip(fast, ref, strict=False))
    n = len(ref)
    print(
        f"torch path on {device}: {len(train)} scans in {t_fast:.1f} s; scipy path: {n} scans "
        f"in {t_ref:.1f} s (x{len(train) / n:.0f} = {t_ref * len(train) / n:.0f} s); "
        f"max |image diff| {d_img:.2e}, max lung-voxel disagreement {d_lung:.2e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
