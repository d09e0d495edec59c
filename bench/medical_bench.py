"""Medical bench: LUNA16 FROC of the nodule detector on held-out synthetic scans, whole-scan
inference time, and the rank of LIDC-IDRI-0001's nodule.

One command does everything on a GPU machine (no mlflow, pydicom only for ``--prepare``,
MONAI only for ``--monai-retinanet``)::

    python -m bench.medical_bench --data keel_outputs/medical_bench_data --minutes 6 \\
        --timing --monai-retinanet

``--data DIR``: generated there first when ``DIR/seriesuids.csv`` is absent (synthetic
phantoms as ``npz/`` + LUNA16 CSVs, deterministic by the config's seed; needs pydicom for
the UIDs). Training uses only the training series (a validation part of them picks the NMS
radius); the held-out series give ``synthetic_sens_at_4fp`` / ``synthetic_cpm``.
``--timing``: a fresh process loads the saved model and times whole-scan inference
(HU array in memory -> resample, lung mask, heat map, candidates) of a 512x512x300 scan
(0.703 mm pixels, 1 mm slices; a synthetic phantom resampled to that grid): median of
repeats, ``infer_s_gpu`` or ``infer_s_cpu`` + ``infer_peak_gb_cpu`` (ru_maxrss of that
process; ``--threads`` torch threads). ``--monai-retinanet``: the same timing for MONAI's
LUNA16 RetinaNet in the tutorial configuration (random weights; imports torchvision).
``--lidc``: where LIDC-IDRI-0001's nodule ranks among the candidates (needs pydicom and the
shared data). ``--cpu-small``: a smaller backbone for CPU runs (labelled).
``--extra-train-series N``: N more phantoms (indices after the config's ``n_series``) that
only train: the held-out series, the validation series and their figures stay those of a run
without them, so the effect of more training data is measured on the same scans.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apps.medical.config import MedicalConfig

TARGETS = {"sensitivity_at_4fp": 0.94, "cpm": 0.85, "infer_s_cpu": 180.0, "infer_s_gpu": 1.4}
TIMING_SHAPE_ZYX = (300, 512, 512)
TIMING_SPACING_ZYX = (1.0, 0.703125, 0.703125)
EXTRA_TRAIN_FILE = "extra_train_seriesuids.csv"


# ----------------------------------------------------------------------------- data


def _phantom_npz(args: tuple[int, int, str, str]) -> tuple[Any, ...]:
    import dataclasses

    from apps.medical.preprocess import Scan, save_scan_npz
    from apps.medical.synthetic import SyntheticConfig, make_phantom

    seed, i, size, out = args
    ph = make_phantom(seed, i, SyntheticConfig(size=size))
    save_scan_npz(Scan(ph.hu, ph.affine, ph.series_uid), Path(out) / "npz" / f"{ph.series_uid}.npz")
    return dataclasses.replace(
        ph, hu=ph.hu[:1], lung_mask=ph.lung_mask[:1], nodule_mask=ph.nodule_mask[:1]
    )


def prepare(out: Path, cfg: MedicalConfig, workers: int | None = None) -> Path:
    """The config's synthetic phantoms as ``npz/<uid>.npz`` + LUNA16 CSVs (needs pydicom)."""
    from apps.medical.synthetic import luna_frames

    gen = cfg.data.generate or {}
    n, size, seed = (
        int(gen.get("n_series", 32)),
        str(gen.get("size", "small")),
        int(gen.get("seed", 7)),
    )
    n_extra = int(gen.get("extra_train_series", 0))
    (out / "npz").mkdir(parents=True, exist_ok=True)
    # phantoms n .. n + n_extra - 1 are training-only extras: the first n (and so the
    # held-out split and the validation series) stay exactly those of a run without extras
    jobs = [(seed, i, size, str(out)) for i in range(n + n_extra)]
    workers = workers or max(1, min(8, (os.cpu_count() or 1) - 1))
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            phantoms = pool.map(_phantom_npz, jobs)
    else:
        phantoms = [_phantom_npz(j) for j in jobs]
    ann, exc, uids = luna_frames(phantoms)
    ann.to_csv(out / "annotations.csv", index=False, float_format="%.4f")
    exc.to_csv(out / "annotations_excluded.csv", index=False, float_format="%.4f")
    (out / EXTRA_TRAIN_FILE).write_text("".join(u + "\n" for u in uids[n:]))
    (out / "seriesuids.csv").write_text("".join(u + "\n" for u in uids[:n]))  # last: marks done
    return out


def extra_train_uids(data: Path, cfg: MedicalConfig) -> list[str]:
    """The training-only extra series of ``data``; refuses a folder made with another count."""
    want = int((cfg.data.generate or {}).get("extra_train_series", 0))
    path = data / EXTRA_TRAIN_FILE
    text = path.read_text() if path.is_file() else ""
    have = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(have) != want:
        raise SystemExit(
            f"{data} holds {len(have)} extra training series ({EXTRA_TRAIN_FILE}), the run asks "
            f"for {want}: prepare a new --data folder"
        )
    return have


# ----------------------------------------------------------------------------- accuracy


def run(data: Path, cfg: MedicalConfig, label: str, model_dir: Path | None) -> dict[str, float]:
    """Train on the training series, LUNA16 FROC on the held-out ones, record the figures."""
    from apps.medical.data import Truth, load_prepared, load_raw_scan, read_truth, split_series
    from apps.medical.evaluation import evaluate_scans, froc_metrics
    from apps.medical.predictor import NoduleDetector
    from apps.medical.training import fit_detector, fit_fp_reduction
    from bench.common import record

    truth = read_truth(data)
    train, held = split_series(truth.seriesuids, cfg.data.heldout_fraction, cfg.data.split_seed)
    extras = extra_train_uids(data, cfg)
    if extras and cfg.fp_reduction.enabled:
        raise SystemExit("extra training series are wired for stage 1 only")
    fit_uids = [*train, *extras]
    train_truth = Truth(truth.annotations, truth.excluded, fit_uids).subset(fit_uids)
    t0 = time.time()
    scans = load_prepared(cfg, data, train)
    extra_scans = load_prepared(cfg, data, extras) if extras else []
    t_prep = time.time() - t0
    det = fit_detector(cfg, scans, train_truth, extra_fit_scans=extra_scans)
    fp = (
        fit_fp_reduction(cfg, det, scans, truth.subset(train)) if cfg.fp_reduction.enabled else None
    )
    t_train = time.time() - t0
    del scans, extra_scans
    device = "cuda" if torch.cuda.is_available() else "cpu"
    predictor = NoduleDetector(cfg, det.to(device), fp.to(device) if fp is not None else None)
    if model_dir is not None:
        predictor.save(model_dir)
    t1 = time.time()
    held_scans = [load_raw_scan(data, u) for u in held]
    result, _ = evaluate_scans(predictor.detect_volume, held_scans, truth.subset(held))
    t_eval = time.time() - t1
    m = froc_metrics(result)
    missed = result.nodules[~result.nodules["detected"]]
    details = {
        "label": label,
        "n_train_series": len(train),
        "n_extra_train_series": len(extras),
        "n_validation_series": int(round(cfg.data.val_fraction * len(train))),
        "n_heldout_series": len(held),
        "n_nodules": result.n_nodules,
        "n_detected_any_threshold": result.n_detected,
        "cpm": m["cpm"],
        "sensitivity_at_fp": {
            f"{r:g}": float(s) for r, s in zip(result.fp_rates, result.sensitivity_at, strict=True)
        },
        "missed_diameters_mm": [round(float(d), 1) for d in missed["diameter_mm"]],
        "nodules_diameter_mm_tp_probability": [
            [round(float(d), 1), None if np.isnan(p) else round(float(p), 4)]
            for d, p in zip(
                result.nodules["diameter_mm"], result.nodules["probability"], strict=True
            )
        ],
        "nms_radius_mm_chosen_on_validation": cfg.detector.nms_radius_mm,
        "spacing_zyx_mm": list(cfg.spacing_zyx),
        "crop_zyx": list(cfg.detector.crop_zyx),
        "tta_flips": cfg.detector.tta_flips,
        "detector": cfg.detector.kind,
        "backbone": {
            "d_model": cfg.detector.backbone.d_model,
            "n_layers": cfg.detector.backbone.n_layers,
        },
        "precision": cfg.detector.trainer.precision,
        "prepare_seconds": round(t_prep, 1),
        "train_seconds": round(t_train - t_prep, 1),
        "train_steps": getattr(det, "train_steps_", None),
        "batch_size": cfg.detector.batch_size,
        "heldout_eval_seconds": round(t_eval, 1),
        "protocol": "LUNA16 FROC (apps/medical/froc.py) on held-out synthetic series",
        "targets": {"sensitivity_at_4fp": 0.94, "cpm": 0.85},
    }
    record("medical", "synthetic_sens_at_4fp", m["sensitivity_at_4fp"], details)
    if cfg.detector.tta_flips:  # the same model without flips, for the record
        predictor.config.detector.tta_flips = False
        res0, _ = evaluate_scans(predictor.detect_volume, held_scans, truth.subset(held))
        predictor.config.detector.tta_flips = True
        m0 = froc_metrics(res0)
        keys = ("cpm", "sensitivity_at_4fp", "sensitivity_at_1fp")
        details["without_tta_flips"] = {k: round(float(m0[k]), 4) for k in keys}
        print(f"[medical] without flip TTA: {details['without_tta_flips']}", flush=True)
        record("medical", "synthetic_sens_at_4fp", m["sensitivity_at_4fp"], details)
    record("medical", "synthetic_cpm", m["cpm"], {"label": label, "see": "synthetic_sens_at_4fp"})
    record(
        "medical",
        "synthetic_sensitivity_at_1fp",
        m["sensitivity_at_1fp"],
        {"label": label, "see": "synthetic_sens_at_4fp"},
    )
    return m


# ----------------------------------------------------------------------------- timing


def timing_scan(npz: Path | None = None) -> Any:
    """A 512x512x300 HU volume (0.703 mm pixels, 1 mm slices): a synthetic "small" phantom
    (``npz``, else a fresh one; needs pydicom) resampled linearly to that grid, so the
    anatomy spans the field like a real chest CT."""
    from scipy import ndimage

    from apps.medical.geometry import make_affine
    from apps.medical.preprocess import Scan, load_scan_npz

    if npz is not None:
        hu = load_scan_npz(npz).array
    else:
        from apps.medical.synthetic import make_phantom

        hu = make_phantom(7, 0).hu
    zoom = [t / s for t, s in zip(TIMING_SHAPE_ZYX, hu.shape, strict=True)]
    big = ndimage.zoom(hu, zoom, order=1, output=np.float32)
    origin = (-180.0, -180.0, -150.0)
    return Scan(big, make_affine(TIMING_SPACING_ZYX, origin, np.eye(3)), "1.2.826.0.1.9999.1")


def time_inference(
    model_dir: Path, device: str, threads: int, reps: int, npz: Path | None = None
) -> dict[str, Any]:
    """Whole-scan inference of :func:`timing_scan` with the saved predictor (this process)."""
    from apps.medical.data import prepare as prep
    from apps.medical.predictor import NoduleDetector

    torch.set_num_threads(threads)
    scan = timing_scan(npz)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pred = NoduleDetector.load(model_dir)
    pred.detector.to(device)
    if pred.fp_model is not None:
        pred.fp_model.to(device)
    if device == "cuda":
        pred.config.detector.batch_size = max(pred.config.detector.batch_size, 64)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2 if device == "cuda" else 1):  # warm-up (allocator, kernels)
        pred.detect_volume(scan)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, t_prep, n_cands = [], [], 0
    for _ in range(reps):
        t0 = time.perf_counter()
        prepared = prep(pred.config, scan, "cuda" if device == "cuda" else None)
        t1 = time.perf_counter()
        cands = pred.detect(prepared)
        sync()
        t2 = time.perf_counter()
        times.append(t2 - t0)
        t_prep.append(t1 - t0)
        n_cands = len(cands)
    out = {
        "seconds_median": statistics.median(times),
        "seconds_all": [round(t, 3) for t in times],
        "prepare_seconds_median": statistics.median(t_prep),
        "input_shape_zyx": list(TIMING_SHAPE_ZYX),
        "input_spacing_zyx_mm": list(TIMING_SPACING_ZYX),
        "model_grid_zyx": list(prepared.image.shape),
        "model_spacing_mm": list(pred.config.spacing_zyx),
        "n_candidates": n_cands,
        "device": device,
        "torch_threads": threads,
        "peak_rss_gb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "rss_gb_before_model": rss0 / 1024**2,
    }
    if device == "cuda":
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1024**3
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def time_monai_retinanet(device: str, threads: int, reps: int) -> dict[str, Any]:
    """MONAI's LUNA16 RetinaNet (tutorial config: ResNet50-FPN 3-D, returned_layers [1, 2],
    conv1_t_stride [2, 2, 1], anchors [[6,8,4],[8,6,5],[10,10,6]], sliding window
    512x512x192, overlap 0.25, bf16/fp16 autocast on GPU) on a resampled 512x512x240 input,
    random weights. Imports torchvision (only here, never in apps/)."""
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.networks.retinanet_network import (
        RetinaNet,
        resnet_fpn_feature_extractor,
    )
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
    from monai.networks.nets import resnet

    torch.set_num_threads(threads)
    returned_layers, stride = [1, 2], [2, 2, 1]
    anchors = AnchorGeneratorWithAnchorShape(
        feature_map_scales=[2**k for k in range(len(returned_layers) + 1)],
        base_anchor_shapes=[[6, 8, 4], [8, 6, 5], [10, 10, 6]],
    )
    backbone = resnet.ResNet(
        block=resnet.ResNetBottleneck,
        layers=[3, 4, 6, 3],
        block_inplanes=resnet.get_inplanes(),
        n_input_channels=1,
        conv1_t_stride=stride,
        conv1_t_size=[max(7, 2 * s + 1) for s in stride],
    )
    fe = resnet_fpn_feature_extractor(
        backbone=backbone,
        spatial_dims=3,
        pretrained_backbone=False,
        returned_layers=returned_layers,
    )
    size_div = [s * 2 * 2 ** max(returned_layers) for s in fe.body.conv1.stride]
    net = RetinaNet(
        spatial_dims=3,
        num_classes=1,
        num_anchors=anchors.num_anchors_per_location()[0],
        feature_extractor=fe,
        size_divisible=size_div,
    )
    det = RetinaNetDetector(network=net, anchor_generator=anchors, debug=False).to(device)
    det.set_box_selector_parameters(
        score_thresh=0.02, topk_candidates_per_level=1000, nms_thresh=0.22, detections_per_img=100
    )
    det.set_sliding_window_inferer(
        roi_size=[512, 512, 192], overlap=0.25, sw_batch_size=1, mode="constant", device=device
    )
    det.eval()
    x = torch.rand(1, 1, 512, 512, 240, device=device)  # MONAI order: [B, C, X, Y, Z]

    def once() -> None:
        with torch.no_grad(), torch.autocast(device, enabled=device == "cuda"):
            det([x[0]], use_inferer=True)
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2 if device == "cuda" else 0):
        once()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return {
        "seconds_median": statistics.median(times),
        "seconds_all": [round(t, 3) for t in times],
        "input_xyz": [512, 512, 240],
        "config": "MONAI tutorial LUNA16 RetinaNet (random weights), sliding window "
        "512x512x192 overlap 0.25, autocast on GPU; network + box selection only, "
        "no resampling",
        "device": device,
    }


def _subprocess_json(args: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.medical_bench", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- LIDC


def lidc_rank(model_dir: Path, data_root: Path) -> dict[str, Any]:
    """Rank (1 = top) of the first candidate hitting LIDC-IDRI-0001's LUNA16 nodule."""
    import pandas as pd

    from apps.medical.dicom_io import find_series, load_series
    from apps.medical.predictor import NoduleDetector
    from apps.medical.preprocess import Scan

    pred = NoduleDetector.load(model_dir)
    groups = find_series(data_root / "medical" / "lidc-idri-0001")
    ((uid, files),) = groups.items()
    vol = load_series(files)
    t0 = time.time()
    cands = pred.detect_volume(Scan(vol.array, vol.affine, vol.series_uid))
    seconds = time.time() - t0
    ann = pd.read_csv(data_root / "medical" / "luna16" / "annotations.csv")
    ann = ann[ann["seriesuid"] == uid]
    cands = cands.sort_values("probability", ascending=False).reset_index(drop=True)
    xyz = cands[["coordX", "coordY", "coordZ"]].to_numpy()
    out: dict[str, Any] = {"n_candidates": len(cands), "seconds": round(seconds, 1), "nodules": []}
    for _, row in ann.iterrows():
        c = row[["coordX", "coordY", "coordZ"]].to_numpy(np.float64)
        r = (row["diameter_mm"] if row["diameter_mm"] > 0 else 10.0) / 2
        d = np.linalg.norm(xyz - c, axis=1) if len(xyz) else np.zeros(0)
        hits = np.flatnonzero(d**2 < r**2)
        out["nodules"].append(
            {
                "diameter_mm": float(row["diameter_mm"]),
                "rank": int(hits[0]) + 1 if len(hits) else None,
                "probability": float(cands["probability"].iloc[hits[0]]) if len(hits) else None,
                "nearest_candidate_mm": float(d.min()) if len(d) else None,
            }
        )
    out["top_probabilities"] = [round(float(p), 4) for p in cands["probability"].head(5)]
    return out


# ----------------------------------------------------------------------------- CLI


def _configure(args: argparse.Namespace) -> tuple[MedicalConfig, str]:
    cfg = MedicalConfig.named(args.config)
    dc = cfg.detector
    label = args.config
    cuda = torch.cuda.is_available()
    if cuda:
        dc.trainer.precision = "bf16-mixed"
        cfg.fp_reduction.trainer.precision = "bf16-mixed"
        dc.batch_size = max(dc.batch_size, 32)
    if args.cpu_small:
        dc.backbone.d_model, dc.backbone.n_layers = 64, 2
        dc.backbone.ffn_hidden, dc.backbone.moe.expert_hidden = 128, 64
        dc.backbone.moe.n_routed_experts = 4
        dc.stem_channels = 12
        label += " (cpu-small backbone d64 L2)"
    if args.epochs is not None:
        dc.trainer.max_epochs = args.epochs
    if args.samples is not None:
        dc.samples_per_epoch = args.samples
    if args.n_series is not None:
        cfg.data.generate = {**(cfg.data.generate or {}), "n_series": int(args.n_series)}
        label += f" ({args.n_series} series)"
    if args.extra_train_series:
        cfg.data.generate = {
            **(cfg.data.generate or {}),
            "extra_train_series": int(args.extra_train_series),
        }
        label += f" (+{args.extra_train_series} training-only series)"
    if args.spacing is not None:  # a finer grid for small nodules; crops keep their voxels
        cfg.spacing_zyx = (args.spacing,) * 3
        label += f" ({args.spacing:g} mm grid)"
    if args.crop is not None:
        dc.crop_zyx = (args.crop,) * 3
        dc.stride_zyx = (args.crop * 2 // 3,) * 3
        label += f" (crop {args.crop})"
    if args.tta:
        dc.tta_flips = True
        label += " (flip TTA)"
    if args.pos_size_power is not None:  # oversample small nodules (the misses)
        dc.pos_size_power = args.pos_size_power
        label += f" (positives ~ diameter^-{args.pos_size_power:g})"
    if args.minutes is not None:
        dc.train_minutes = args.minutes
        label += f" ({args.minutes:g} min training budget)"
    label += " on " + ("GPU bf16-mixed" if cuda else f"CPU {torch.get_num_threads()} threads")
    return cfg, label


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="synthetic_bench")
    ap.add_argument("--prepare", type=Path, help="only write npz scans + CSVs here")
    ap.add_argument("--data", type=Path, help="folder with npz/ + LUNA16 CSVs (made if absent)")
    ap.add_argument("--model-dir", type=Path, help="save/load the predictor here")
    ap.add_argument("--minutes", type=float, help="stage-1 training wall-time budget")
    ap.add_argument("--epochs", type=int, help="stage-1 max epochs")
    ap.add_argument("--samples", type=int, help="stage-1 crops per epoch")
    ap.add_argument("--n-series", type=int, help="synthetic series to generate (25%% held out)")
    ap.add_argument(
        "--extra-train-series",
        type=int,
        help="more synthetic series that only train (held-out and validation series unchanged)",
    )
    ap.add_argument("--spacing", type=float, help="isotropic grid in mm (config: 3)")
    ap.add_argument("--crop", type=int, help="training/inference crop edge in voxels")
    ap.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    ap.add_argument("--pos-size-power", type=float, help="positive crops ~ diameter^-p")
    ap.add_argument("--cpu-small", action="store_true", help="smaller backbone for CPU runs")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for CPU timing")
    ap.add_argument("--timing", action="store_true", help="time whole-scan inference")
    ap.add_argument("--timing-reps", type=int, default=None)
    ap.add_argument("--monai-retinanet", action="store_true", help="time MONAI's RetinaNet")
    ap.add_argument("--lidc", action="store_true", help="rank of LIDC-IDRI-0001's nodule")
    ap.add_argument("--skip-train", action="store_true", help="use the saved --model-dir")
    ap.add_argument("--time-model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--time-monai", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    reps = args.timing_reps or (10 if device == "cuda" else 2)

    # child processes (fresh memory high-water mark)
    if args.time_model is not None:
        npz = sorted((args.data / "npz").glob("*.npz"))[:1] if args.data else []
        res = time_inference(args.time_model, device, args.threads, reps, npz[0] if npz else None)
        print(json.dumps(res))
        return 0
    if args.time_monai:
        print(json.dumps(time_monai_retinanet(device, args.threads, reps)))
        return 0

    cfg, label = _configure(args)
    if args.prepare:
        prepare(args.prepare, cfg)
        print(f"wrote {args.prepare}")
        return 0
    if args.skip_train and not (args.timing or args.lidc or args.monai_retinanet):
        ap.error(
            "--skip-train evaluates nothing on its own: add --timing, --lidc or --monai-retinanet"
        )
    if args.skip_train and (
        args.tta or args.pos_size_power is not None or args.minutes or args.extra_train_series
    ):
        ap.error(
            "--tta / --pos-size-power / --minutes / --extra-train-series act on training and the"
            " held-out evaluation,"
            " which --skip-train skips (timing and LIDC use the saved model's own config)"
        )
    needs_data = not args.skip_train or args.timing
    if args.data is None and (needs_data or args.model_dir is None):
        ap.error(
            "--data or --prepare is required (only --skip-train --lidc --model-dir runs without)"
        )
    from bench.common import record

    if needs_data and not (args.data / "seriesuids.csv").is_file():
        t0 = time.time()
        prepare(args.data, cfg)
        print(f"[medical] prepared {args.data} in {time.time() - t0:.0f} s", flush=True)
    model_dir = args.model_dir or (args.data / "model")
    if not args.skip_train:
        m = run(args.data, cfg, label, model_dir)
        print({k: round(v, 4) for k, v in m.items() if k in ("cpm", "sensitivity_at_4fp")})
    if args.timing:
        base = ["--time-model", str(model_dir), "--data", str(args.data), "--device", device]
        res = _subprocess_json([*base, "--threads", str(args.threads), "--timing-reps", str(reps)])
        if device == "cuda":
            record("medical", "infer_s_gpu", res["seconds_median"], res)
        else:
            record("medical", "infer_s_cpu", res["seconds_median"], res)
            record(
                "medical",
                "infer_peak_gb_cpu",
                res["peak_rss_gb_process"],
                {"what": "ru_maxrss of the timing process (Python + torch + scan + model)"},
            )
    if args.monai_retinanet:
        res = _subprocess_json(["--time-monai", "--device", device, "--timing-reps", str(reps)])
        record(
            "medical",
            "infer_s_gpu_monai" if device == "cuda" else "infer_s_cpu_monai",
            res["seconds_median"],
            res,
        )
    if args.lidc:
        from apps.medical.config import PROJECT_ROOT

        root = Path(os.environ.get("KEEL_DATA_DIR", PROJECT_ROOT.parent / "shared" / "data"))
        res = lidc_rank(model_dir, root)
        rank = res["nodules"][0]["rank"] if res["nodules"] else None
        res["value_meaning"] = "1 = top candidate; -1 = not among the candidates"
        record("medical", "lidc0001_nodule_rank", rank if rank is not None else -1, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
