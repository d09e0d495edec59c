"""Where whole-scan scoring of the dense nodule detector spends its time, per model.

Diagnostic for the distillation speed target (issue #6): the teacher against student
architectures that differ in width (``d``), stem channels and patch size. Per model: whole
scans per second through :func:`apps.medical.dense.sliding_window_dense` with the per-window
loop and with the batched gather / ``index_add_`` path, and the parts of one scan (filter
bank, window selection) and of one forward of ``--batch`` windows (stem + patch embedding,
backbone, decoder), bf16 autocast on CUDA as scoring runs. Speed does not depend on the
weights, so students are untrained.

    python -m bench.medical_scoring_profile --data <npz dir> [--teacher-dir <saved detector>]
        --device cuda --students d32,s16,p4 d32,s8,p4 d24,s8,p4

Prints one JSON line per model and writes them all to ``--out`` (default stdout only).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import machine, time_fn


def _student_spec(text: str) -> dict[str, int]:
    """``d32,s8,p4`` -> d_model 32, stem 8 channels, patch 4 (top-k attention as the
    teacher); ``d32,s8,p4,k0``: the same with full attention (top_k None)."""
    keys = {"d": "d", "s": "stem", "p": "patch", "k": "top_k"}
    out = {}
    for part in text.split(","):
        if not part or part[0] not in keys or not part[1:].isdigit():
            raise argparse.ArgumentTypeError(f"student spec {text!r}: expected like d32,s8,p4")
        out[keys[part[0]]] = int(part[1:])
    if out.get("top_k", 0) != 0 or not {"d", "stem", "patch"} <= set(out):
        raise argparse.ArgumentTypeError(f"student spec {text!r}: expected like d32,s8,p4[,k0]")
    return out


def _parts_ms(model: Any, feats_BKZYX: torch.Tensor, device: str) -> dict[str, float]:
    """Median ms of one forward of a window batch and of its three stages."""
    cast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    def full() -> None:
        with cast:
            model({"features": feats_BKZYX})

    def tokens() -> None:
        with cast:
            model.tokens({"features": feats_BKZYX})

    with cast:
        batch = {"features": feats_BKZYX}
        tok, _ = model.tokens(batch)
        stem = batch["stem_BZYXC"]
        out = model.backbone(tok)

    def backbone() -> None:
        with cast:
            model.backbone(tok)

    def head() -> None:
        with cast:
            model.head_forward(out, {"stem_BZYXC": stem})

    return {
        name: time_fn(fn, warmup=2, reps=5)["median_ms"]
        for name, fn in (
            ("forward", full),
            ("stem_embed", tokens),
            ("backbone", backbone),
            ("decoder", head),
        )
    }


def bank_check(bank: Any, image: np.ndarray, device: str) -> dict[str, float]:
    """The filter bank as scoring runs it (Hessian eigenvalues compiled on CUDA) against
    the eager reference on one scan: largest absolute difference per channel group, and
    the eager and scoring times."""
    from apps.medical.dense import FilterBank

    bank = bank.to(device)
    vol = torch.as_tensor(image, dtype=torch.float32, device=device)[None, None]
    with torch.inference_mode():
        fast = bank(vol)
        x, ref = vol.float(), [vol.float()]
        for i, s in enumerate(bank.sigmas):
            g = bank._smooth(x, getattr(bank, f"g{i}"))
            ref += [g, FilterBank._hessian_eigs(g) * (s * s)]
        ref = torch.cat(ref, dim=1)

        def eager() -> None:
            for i in range(len(bank.sigmas)):
                FilterBank._hessian_eigs(bank._smooth(x, getattr(bank, f"g{i}")))

        out = {
            "max_abs_diff": float((fast - ref).abs().max()),
            "max_abs_value": float(ref.abs().max()),
            "bank_ms": time_fn(lambda: bank(vol), warmup=1, reps=5)["median_ms"],
            "smooth_and_eager_eigs_ms": time_fn(eager, warmup=1, reps=5)["median_ms"],
        }
    bank.cpu()
    return out


def profile_model(
    name: str, model: Any, scans: list[Any], dc: Any, batch: int, device: str
) -> dict[str, Any]:
    from apps.medical.dense import occupied_window_starts, sliding_window_dense
    from bench.scale_bench import count_active_params

    model = model.to(device).eval()
    stride = dc.infer_stride_zyx or dc.stride_zyx
    crop = tuple(int(c) for c in dc.crop_zyx)
    row: dict[str, Any] = {"model": name, "active_params": count_active_params(model)}
    with torch.inference_mode():
        for mode in ("loop", "batched"):

            def fn(mode: str = mode) -> None:
                for s in scans:
                    sliding_window_dense(model, s.image, crop, stride, batch, accumulate=mode)

            t = time_fn(fn, warmup=1, reps=3)["median_ms"]
            row[f"scans_per_s_{mode}"] = len(scans) / (t / 1e3)
        vols = [torch.as_tensor(s.image, dtype=torch.float32, device=device) for s in scans]

        def bank() -> None:
            for v in vols:
                model.features_of(v[None, None])

        row["filter_bank_ms_per_scan"] = time_fn(bank, warmup=1, reps=3)["median_ms"] / len(vols)
        n_windows = []
        for v in vols:  # padded up to one crop, as scoring pads a small scan
            shape = [max(n, c) for n, c in zip(v.shape, crop, strict=True)]
            padded = torch.zeros(shape, dtype=v.dtype, device=v.device)
            padded[: v.shape[0], : v.shape[1], : v.shape[2]] = v
            n_windows.append(len(occupied_window_starts(padded, crop, stride)))
        row["windows_per_scan"] = float(np.mean(n_windows))
        feats = model.features_of(vols[0][None, None])[0]
        f = torch.stack([feats[:, : crop[0], : crop[1], : crop[2]]] * batch)
        row[f"ms_per_{batch}_windows"] = _parts_ms(model, f, device)
    model.cpu()
    print(json.dumps(row), flush=True)
    return row


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="npz folder (bench.medical_bench --prepare)")
    ap.add_argument(
        "--teacher-dir",
        default=str(Path(__file__).resolve().parent / "artifacts" / "medical_teacher"),
        help="saved detector to time against (default: the committed distillation teacher)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--scans", type=int, default=6, help="held-out series timed")
    ap.add_argument("--batch", type=int, default=64, help="windows per forward")
    ap.add_argument(
        "--students", nargs="+", type=_student_spec, default=[_student_spec("d32,s16,p4")]
    )
    ap.add_argument("--out", default=None, help="JSON file for all rows")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    from apps.medical.data import load_prepared, read_truth, split_series
    from apps.medical.predictor import NoduleDetector, build_detector
    from bench.scale_bench import dense_student_model, reshape_dense_student

    teacher = NoduleDetector.load(Path(args.teacher_dir))
    cfg = teacher.config
    truth = read_truth(Path(args.data))
    _, held = split_series(truth.seriesuids, cfg.data.heldout_fraction, cfg.data.split_seed)
    scans = load_prepared(cfg, Path(args.data), held[: args.scans])
    check = bank_check(teacher.detector.bank, scans[0].image, args.device)
    print(json.dumps({"filter_bank_check": check}), flush=True)
    rows = [
        profile_model("teacher", teacher.detector, scans, cfg.detector, args.batch, args.device)
    ]
    for spec in args.students:
        scfg = copy.deepcopy(cfg)
        scfg.detector.backbone = dense_student_model(scfg.detector.backbone, spec["d"], 2)
        full = spec.get("top_k", 1) == 0
        reshape_dense_student(scfg.detector, spec["stem"], spec["patch"], full_attention=full)
        name = f"student_d{spec['d']}_stem{spec['stem']}_patch{spec['patch']}"
        if full:
            name += "_topkNone"
        rows.append(
            profile_model(name, build_detector(scfg), scans, cfg.detector, args.batch, args.device)
        )
    if args.out:
        payload = {
            "filter_bank_check": check,
            "rows": rows,
            "batch": args.batch,
            "n_scans": len(scans),
            "machine": machine(),
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=1)
        os.replace(tmp, out)


if __name__ == "__main__":
    main()
