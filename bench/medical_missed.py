"""Why were nodules missed? For each held-out nodule that a saved detector never hits, print
whether it lies in the lung mask, its image intensity and the peak heat-map probability near
its centre, and the nearest candidate.

    python -m bench.medical_missed --data <npz folder of bench.medical_bench> --model-dir <dir>

Same split and preparation as :mod:`bench.medical_bench`; reads the held-out series only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from apps.medical.data import load_raw_scan, read_truth, split_series
from apps.medical.data import prepare as prep
from apps.medical.dense import sliding_window_dense
from apps.medical.froc import evaluate_froc
from apps.medical.geometry import world_to_index
from apps.medical.predictor import NoduleDetector


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    det = NoduleDetector.load(args.model_dir)
    cfg, dc = det.config, det.config.detector
    truth = read_truth(args.data)
    _, held = split_series(truth.seriesuids, cfg.data.heldout_fraction, cfg.data.split_seed)
    for uid in held:
        scan = prep(cfg, load_raw_scan(args.data, uid))
        cands = det.detect(scan)
        sub = truth.subset([uid])
        res = evaluate_froc(cands, sub.annotations, [uid], sub.excluded)
        missed = res.nodules[~res.nodules["detected"]]
        if missed.empty:
            continue
        prob = sliding_window_dense(det.detector, scan.image, dc.crop_zyx, dc.stride_zyx, 8)
        xyz_c = cands[["coordX", "coordY", "coordZ"]].to_numpy()
        for _, r in missed.iterrows():
            xyz = np.array([r.coordX, r.coordY, r.coordZ])
            k = tuple(int(v) for v in np.round(world_to_index(scan.affine, xyz)))
            near = tuple(slice(max(0, c - 3), c + 4) for c in k)
            d = np.sqrt(((xyz_c - xyz) ** 2).sum(1)) if len(xyz_c) else np.array([np.inf])
            j = int(np.argmin(d))
            print(
                f"{uid[-12:]} {r.diameter_mm:5.1f} mm voxel {k} lung {bool(scan.lung[k])} "
                f"intensity {float(scan.image[k]):.2f} peak p (7^3) {float(prob[near].max()):.3f} "
                f"nearest candidate {d[j]:.1f} mm (hit radius {r.diameter_mm / 2:.1f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
