"""Medical bench: LUNA16 FROC of the two-stage detector on held-out synthetic scans.

Runs without mlflow, pydicom or MONAI once the scans exist as ``.npz``:

    # where pydicom is installed (writes npz/ + LUNA16 CSVs, deterministic by seed)
    python -m bench.medical_bench --prepare keel_outputs/medical_bench_data
    # anywhere with torch/lightning/scipy/pandas (GPU used when present)
    python -m bench.medical_bench --data keel_outputs/medical_bench_data

Records ``synthetic_sensitivity_at_4fp``, ``synthetic_cpm``, ``synthetic_sensitivity_at_1fp``
in ``bench/results/medical.json`` (targets: >= 0.94 and >= 0.85). ``--quick`` shrinks the
training (fewer epochs/crops) for a CPU smoke run; its numbers are labelled as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from apps.medical.config import MedicalConfig


def prepare(out: Path, cfg: MedicalConfig) -> Path:
    """The config's synthetic phantoms as ``npz/<uid>.npz`` + LUNA16 CSVs (needs pydicom)."""
    from apps.medical.preprocess import Scan, save_scan_npz
    from apps.medical.synthetic import SyntheticConfig, luna_frames, make_phantom

    gen = cfg.data.generate or {}
    n, size, seed = (
        int(gen.get("n_series", 32)),
        str(gen.get("size", "small")),
        int(gen.get("seed", 7)),
    )
    (out / "npz").mkdir(parents=True, exist_ok=True)
    phantoms = []
    for i in range(n):
        ph = make_phantom(seed, i, SyntheticConfig(size=size))
        save_scan_npz(Scan(ph.hu, ph.affine, ph.series_uid), out / "npz" / f"{ph.series_uid}.npz")
        phantoms.append(
            dataclasses.replace(
                ph, hu=ph.hu[:1], lung_mask=ph.lung_mask[:1], nodule_mask=ph.nodule_mask[:1]
            )
        )
    ann, exc, uids = luna_frames(phantoms)
    ann.to_csv(out / "annotations.csv", index=False, float_format="%.4f")
    exc.to_csv(out / "annotations_excluded.csv", index=False, float_format="%.4f")
    (out / "seriesuids.csv").write_text("".join(u + "\n" for u in uids))
    return out


def run(data: Path, cfg: MedicalConfig, label: str) -> dict[str, float]:
    from apps.medical.data import load_raw_scan, read_truth, split_series
    from apps.medical.data import prepare as prep
    from apps.medical.evaluation import evaluate_scans, froc_metrics
    from apps.medical.predictor import NoduleDetector
    from apps.medical.training import fit_detector, fit_fp_reduction
    from bench.common import record

    truth = read_truth(data)
    train, held = split_series(truth.seriesuids, cfg.data.heldout_fraction, cfg.data.split_seed)
    t0 = time.time()
    scans = [prep(cfg, load_raw_scan(data, u)) for u in train]
    det = fit_detector(cfg, scans, truth.subset(train))
    fp = (
        fit_fp_reduction(cfg, det, scans, truth.subset(train)) if cfg.fp_reduction.enabled else None
    )
    t_train = time.time() - t0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    predictor = NoduleDetector(cfg, det.to(device), fp.to(device) if fp is not None else None)
    result, cands = evaluate_scans(
        predictor.detect_volume, [load_raw_scan(data, u) for u in held], truth.subset(held)
    )
    m = froc_metrics(result)
    details = {
        "label": label,
        "n_train_series": len(train),
        "n_heldout_series": len(held),
        "n_nodules": result.n_nodules,
        "n_detected_any_threshold": result.n_detected,
        "cpm": m["cpm"],
        "sensitivity_at_fp": {
            f"{r:g}": float(s) for r, s in zip(result.fp_rates, result.sensitivity_at, strict=True)
        },
        "train_seconds": round(t_train, 1),
        "protocol": "LUNA16 FROC (apps/medical/froc.py) on held-out synthetic series",
        "targets": {"sensitivity_at_4fp": 0.94, "cpm": 0.85},
    }
    missed = result.nodules[~result.nodules["detected"]]
    details["missed_diameters_mm"] = [round(float(d), 1) for d in missed["diameter_mm"]]
    record("medical", "synthetic_sensitivity_at_4fp", m["sensitivity_at_4fp"], details)
    record("medical", "synthetic_sensitivity_at_1fp", m["sensitivity_at_1fp"], {"label": label})
    record("medical", "synthetic_cpm", m["cpm"], {"label": label})
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="synthetic_bench")
    ap.add_argument("--prepare", type=Path, help="write npz scans + CSVs here and exit")
    ap.add_argument("--data", type=Path, help="folder with npz/ + LUNA16 CSVs")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: 4 epochs, fewer crops")
    args = ap.parse_args(argv)
    cfg = MedicalConfig.named(args.config)
    if args.prepare:
        prepare(args.prepare, cfg)
        print(f"wrote {args.prepare}")
        return 0
    if args.data is None:
        ap.error("--data or --prepare is required")
    label = args.config
    if args.quick:
        for stage in (cfg.detector, cfg.fp_reduction):
            stage.trainer.max_epochs = 4
            stage.crops_per_nodule = 6
        cfg.detector.neg_crops_per_scan = 6
        label += " (quick CPU smoke run)"
    m = run(args.data, cfg, label)
    print(
        {
            k: round(v, 4)
            for k, v in m.items()
            if k in ("cpm", "sensitivity_at_1fp", "sensitivity_at_4fp")
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
