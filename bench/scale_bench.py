"""Distillation and progressive growth, measured per app (issue #6).

    python -m bench.scale_bench --device cuda                       # H200, ~8 min
    python -m bench.scale_bench --device cpu --tiny --no-record      # smoke check
    python -m bench.scale_bench --device cpu --apps maintenance --teacher-epochs 12 \
        --student-epochs 12 --growth-epochs 12                        # CPU figures

**Distillation** (per app): train a teacher (>= 4x the student's active parameters), distil
a student from it (``apps/<app>/distillation.py``: same data, protocol and evaluation as
the app's training), and train the same student from scratch with the same budget (same
config, epochs, seed). Reported for all three: the app's primary metric on its held-out
data under the official protocol (maintenance: RMSE capped at 125 on the C-MAPSS test
units + median lead time on held-out run-to-failure units; fraud: test-block PR-AUC),
active parameters, and scoring throughput (rows / s of the model's forward, batch 1024
for maintenance windows and 2048 for fraud rows, after warm-up).
``<app>_student_retention`` = student metric / teacher metric oriented so higher is better
(maintenance: teacher_rmse / student_rmse; fraud: student PR-AUC / teacher PR-AUC).

**Growth** (maintenance, FD001): the large model (dense, 4 blocks, FFN 256) trained from
scratch reaches validation loss ``L`` (its best per-epoch ``val/loss`` on the
policy-validation units); FLOPs_scratch = training FLOPs until that epoch. The small model
(2 blocks, FFN 128, same width) trains until ``--grow-at`` of the scratch run's steps, is
grown by ``TrainerConfig.growth`` (``grow_depth`` inserts 2 identity blocks, ``grow_width``
widens the FFN: the large architecture, function-preserving) and continues until its
validation loss is <= L; FLOPs_grow = training FLOPs until that epoch.
``growth_flops_saving = 1 - FLOPs_grow / FLOPs_scratch``. FLOPs per step = samples x tokens
per sample x ``Backbone.flops_per_token(tokens)`` (6 x active matmul params + attention),
backbone only (patch embedding and heads are equal in both runs and tiny).

**ddp2** (``python -m bench.train_bench ddp2``, implemented here in :func:`cmd_ddp2`): 1 GPU
vs 2 GPUs with DDP and FSDP2 on the same global batch: throughput, per-GPU bytes of params +
grads + AdamW state, loss curves (``core.json`` key ``ddp2_scaling_efficiency``); ``--tiny``
runs it on CPU with gloo.

No MLflow import anywhere on this path; fraud needs polars (skipped with a message when
absent). Medical distillation is not implemented (no ``apps/medical/distillation.py``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import Logger

from bench.common import machine, record, time_fn
from core.distill import count_active_params
from core.growth import GrowthSchedule, GrowthStep

ROOT = Path(__file__).resolve().parents[1]
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


# ============================================================================ helpers


class CurveLogger(Logger):
    """A Lightning logger that only keeps ``(global_step, value)`` of chosen metrics."""

    def __init__(self, keys: tuple[str, ...] = ("val/loss",)) -> None:
        super().__init__()
        self.keys = keys
        self.curves: dict[str, list[tuple[int, float]]] = {k: [] for k in keys}

    @property
    def name(self) -> str:
        return "curve"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        # Lightning passes the index of the last optimizer step: +1 = steps completed
        for k in self.keys:
            if k in metrics:
                self.curves[k].append((int(step or 0) + 1, float(metrics[k])))


def throughput(fn: Any, n_rows: int, device: str) -> float:
    """Rows per second of ``fn()`` (scores ``n_rows`` rows), median of timed repetitions."""
    t = time_fn(fn, warmup=2, reps=5 if device == "cpu" else 20)
    return n_rows / (t["median_ms"] / 1e3)


def _device_trainer(cfg: Any, device: str, epochs: int, precision: str | None) -> None:
    cfg.trainer.accelerator = "gpu" if device == "cuda" else "cpu"
    cfg.trainer.devices = 1
    cfg.trainer.max_epochs = epochs
    cfg.trainer.enable_progress_bar = False
    cfg.trainer.enable_model_summary = False
    cfg.trainer.enable_checkpointing = False
    if precision:
        cfg.trainer.precision = precision


# ============================================================================ maintenance


def dense_student_model(teacher_model: Any, d_model: int, n_layers: int) -> Any:
    """The teacher's backbone config shrunk to a small dense student (2 heads, FFN 2 x d)."""
    return dataclasses.replace(
        teacher_model,
        d_model=d_model,
        n_layers=n_layers,
        ffn_hidden=2 * d_model,
        moe=None,
        n_dense_layers=n_layers,
        attention=dataclasses.replace(teacher_model.attention, n_heads=2),
    )


def maintenance_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    from apps.maintenance.config import load_config

    teacher = load_config("fd001")
    if args.tiny:
        teacher.data.data_dir = str(ROOT / "data_samples/maintenance/cmapss")
        teacher.data.subset = "SYN"
        teacher.train_stride = 8
        if getattr(teacher, "steps_per_epoch", None):
            teacher.steps_per_epoch = 4
        teacher.model.d_model, teacher.model.ffn_hidden = 32, 64
        teacher.model.moe.expert_hidden = 32
    elif args.data_dir:
        teacher.data.data_dir = args.data_dir
    if args.train_stride:
        teacher.train_stride = args.train_stride
    teacher.seed = args.seed
    teacher.trainer.seed = args.seed
    student = copy.deepcopy(teacher)
    student.model = dense_student_model(teacher.model, 16 if args.tiny else 32, n_layers=2)
    _device_trainer(teacher, args.device, args.teacher_epochs, args.precision)
    _device_trainer(student, args.device, args.student_epochs, args.precision)
    return teacher, student


def _maint_row(name: str, predictor: Any, data: Any, cfg: Any, device: str) -> dict[str, Any]:
    from apps.maintenance.training import evaluate_prepared, split_windows

    ev = evaluate_prepared(predictor, data, cfg, figures=False)
    m = ev.metrics
    model = predictor.model.to(device)
    w = split_windows(predictor, data.test, cfg.window)
    rows_s = throughput(lambda: model.predict_windows(w.x, w.mask), len(w.x), device)
    model.cpu()
    row = {
        "model": name,
        "rmse_capped": m["rmse_capped"],
        "phm08_capped": m.get("phm08_capped"),
        "lead_time_median": m.get("lead_time_median"),
        "lead_detection_rate": m.get("lead_detection_rate"),
        "active_params": count_active_params(predictor.model),
        "windows_per_s": rows_s,
    }
    print(json.dumps(row), flush=True)
    return row | {"protocol": ev.protocol}


def run_maintenance_distill(args: argparse.Namespace) -> dict[str, Any]:
    from apps.maintenance.data import prepare_data
    from apps.maintenance.distillation import distill_fit_predictor
    from apps.maintenance.training import fit

    tcfg, scfg = maintenance_configs(args)
    data = prepare_data(tcfg)
    say("maintenance: data ready; teacher")
    t0 = time.perf_counter()
    teacher = fit(tcfg, data=data, device=args.device).predictor
    t_teacher = time.perf_counter() - t0
    say("maintenance: distilled student")
    t0 = time.perf_counter()
    distilled = distill_fit_predictor(scfg, teacher, {"alpha": args.alpha}, data=data).predictor
    t_distill = time.perf_counter() - t0
    say("maintenance: scratch student")
    t0 = time.perf_counter()
    scratch = fit(scfg, data=data, device=args.device).predictor
    t_scratch = time.perf_counter() - t0
    rows = [
        _maint_row("teacher", teacher, data, tcfg, args.device),
        _maint_row("student_distilled", distilled, data, scfg, args.device),
        _maint_row("student_scratch", scratch, data, scfg, args.device),
    ]
    protocol = rows[0].pop("protocol")
    for r in rows[1:]:
        r.pop("protocol")
    ratio = rows[0]["active_params"] / rows[1]["active_params"]
    retention = rows[0]["rmse_capped"] / rows[1]["rmse_capped"]
    details = {
        "rows": rows,
        "teacher_over_student_active_params": ratio,
        "scratch_retention": rows[0]["rmse_capped"] / rows[2]["rmse_capped"],
        "alpha": args.alpha,
        "epochs": {"teacher": args.teacher_epochs, "student": args.student_epochs},
        "train_seconds": {"teacher": t_teacher, "distill": t_distill, "scratch": t_scratch},
        "data": "SYN sample (tiny)" if args.tiny else "C-MAPSS FD001",
        "protocol": protocol,
        "machine": machine(),
        "seed": args.seed,
    }
    if ratio < 4:
        details["warning"] = f"teacher has only {ratio:.1f}x the student's active params"
    return {"maintenance_student_retention": (retention, details)}


def _samples_at(step: int, n: int, batch: int, steps_per_epoch: int | None = None) -> int:
    """Training samples seen after ``step`` optimizer steps: ``steps_per_epoch`` full random
    batches per epoch when set (the app's recipe), else shuffled passes over ``n`` windows."""
    if steps_per_epoch:
        return step * batch
    spe = math.ceil(n / batch)
    return (step // spe) * n + min((step % spe) * batch, n)


def _first_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    for step, v in curve:
        if v <= target:
            return step
    return None


def run_maintenance_growth(args: argparse.Namespace) -> dict[str, Any]:
    from apps.maintenance.data import prepare_data
    from apps.maintenance.training import fit, split_windows
    from core.backbone import Backbone

    base, _ = maintenance_configs(args)
    d = base.model.d_model
    large = copy.deepcopy(base)
    large.model = dataclasses.replace(
        base.model, n_layers=4, ffn_hidden=4 * d, moe=None, n_dense_layers=4
    )
    small = copy.deepcopy(large)
    small.model = dataclasses.replace(large.model, n_layers=2, ffn_hidden=2 * d, n_dense_layers=2)
    for c in (large, small):
        _device_trainer(c, args.device, args.growth_epochs, args.precision)
        c.trainer.check_val_every_n_epoch = 1
        # Both runs train their whole budget and keep their final weights: an early stop
        # would end the small run before it grows, and restoring the best (pre-growth,
        # smaller) weights into the grown model cannot work.
        c.early_stopping_patience = None
        c.restore_best = False
    data = prepare_data(large)
    n_train = len(
        split_windows(_norm_state(data), data.train, large.window, stride=large.train_stride).x
    )
    B = large.batch_size
    fixed = getattr(large, "steps_per_epoch", None)
    spe = fixed or math.ceil(n_train / B)
    total_steps = spe * args.growth_epochs
    grow_at = int(round(args.grow_at * total_steps))
    T = math.ceil(large.window / large.patch_len) + 1  # patches + CLS
    fpt_large = Backbone(large.model).flops_per_token(T) * T
    fpt_small = Backbone(small.model).flops_per_token(T) * T

    say(f"growth: large from scratch ({total_steps} steps, grow at {grow_at})")
    scratch_log = CurveLogger()
    t0 = time.perf_counter()
    fit(large, data=data, logger=scratch_log, device=args.device)
    t_scratch = time.perf_counter() - t0
    curve_s = scratch_log.curves["val/loss"]
    step_L, L = min(curve_s, key=lambda sv: sv[1])
    flops_scratch = fpt_large * _samples_at(step_L, n_train, B, fixed)

    grown = copy.deepcopy(small)
    grown.trainer.max_epochs = int(math.ceil(args.growth_epochs * args.grow_budget))
    # new blocks after each old block: 0, 1 -> 0, new, 1, new
    grown.trainer.growth = GrowthSchedule(
        [
            GrowthStep(grow_at, "grow_depth", {"new_layers_at": [1, 2]}),
            GrowthStep(grow_at, "grow_width", {"new_ffn_hidden": large.model.ffn_hidden}),
        ]
    )
    say("growth: small -> grow -> continue")
    grow_log = CurveLogger()
    t0 = time.perf_counter()
    out = fit(grown, data=data, logger=grow_log, device=args.device)
    t_grow = time.perf_counter() - t0
    final_cfg = out.predictor.model.backbone.cfg
    same_arch = (final_cfg.n_layers, final_cfg.ffn_hidden) == (4, large.model.ffn_hidden)
    curve_g = grow_log.curves["val/loss"]
    step_g = _first_reach(curve_g, L)

    def flops_grow(step: int) -> float:
        s_small = _samples_at(min(step, grow_at), n_train, B, fixed)
        return fpt_small * s_small + fpt_large * (_samples_at(step, n_train, B, fixed) - s_small)

    details = {
        "target_val_loss_L": L,
        "scratch_step_at_L": step_L,
        "grow_step_at_L": step_g,
        "flops_scratch": flops_scratch,
        "flops_grow": flops_grow(step_g) if step_g is not None else None,
        "grow_best_val_loss": min(v for _, v in curve_g),
        "grow_at_step": grow_at,
        "steps_per_epoch": spe,
        "epochs": {"scratch": args.growth_epochs, "grow_budget": grown.trainer.max_epochs},
        "large": {"n_layers": 4, "ffn_hidden": large.model.ffn_hidden, "d_model": d},
        "small": {"n_layers": 2, "ffn_hidden": small.model.ffn_hidden, "d_model": d},
        "grown_final_is_large_architecture": same_arch,
        "flops_per_sample": {"large": fpt_large, "small": fpt_small},
        "curve_scratch": curve_s,
        "curve_grow": curve_g,
        "train_seconds": {"scratch": t_scratch, "grow": t_grow},
        "data": "SYN sample (tiny)" if args.tiny else "C-MAPSS FD001",
        "val_loss": "RULModel val/loss (Huber on RUL/125 + 0.2 x alarm BCE) on policy units",
        "machine": machine(),
        "seed": args.seed,
    }
    if step_g is None:
        details["note"] = "grown run never reached L within its budget: saving reported as 0"
        saving = 0.0
    else:
        saving = 1.0 - details["flops_grow"] / flops_scratch
    print(json.dumps({k: v for k, v in details.items() if not k.startswith("curve")}), flush=True)
    return {"growth_flops_saving": (saving, details)}


def _norm_state(data: Any) -> dict[str, Any]:
    from apps.maintenance.predictor import normalizer_state

    return normalizer_state(data.normalizer)


# ============================================================================ fraud


def fraud_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    from apps.fraud.config import load_config

    teacher = load_config(args.fraud_config)
    teacher.baseline.enabled = False
    teacher.seed = args.seed
    if args.tiny:
        teacher.model.d_model, teacher.model.ffn_hidden = 32, 64
        teacher.model.moe.expert_hidden = 32
    student = copy.deepcopy(teacher)
    student.model = dense_student_model(teacher.model, 16, n_layers=1)
    _device_trainer(teacher, args.device, args.fraud_teacher_epochs, args.precision)
    _device_trainer(student, args.device, args.fraud_student_epochs, args.precision)
    return teacher, student


def _fraud_row(name: str, predictor: Any, ev: Any, inputs: Any, device: str) -> dict[str, Any]:
    from apps.fraud.model import predict_logits

    model = predictor.model.to(device)
    rows_s = throughput(lambda: predict_logits(model, inputs), len(inputs["x_num"]), device)
    model.cpu()
    row = {
        "model": name,
        "pr_auc": ev.metrics["pr_auc"],
        "roc_auc": ev.metrics.get("roc_auc"),
        "active_params": count_active_params(predictor.model),
        "rows_per_s": rows_s,
    }
    print(json.dumps(row), flush=True)
    return row


def run_fraud_distill(args: argparse.Namespace) -> dict[str, Any]:
    try:
        from apps.fraud.distillation import distill_fit_predictor
        from apps.fraud.training import evaluate_inputs, fit
    except ImportError as err:  # polars missing on the GPU machine
        print(f"fraud skipped: {err}", flush=True)
        return {}
    tcfg, scfg = fraud_configs(args)
    say("fraud: teacher")
    dev = "cuda" if args.device == "cuda" else None
    t0 = time.perf_counter()
    tout = fit(tcfg, device=dev)
    t_teacher = time.perf_counter() - t0
    data = tout.data
    say("fraud: distilled student")
    t0 = time.perf_counter()
    dout = distill_fit_predictor(scfg, tout.predictor, {"alpha": args.alpha}, data=data, device=dev)
    t_distill = time.perf_counter() - t0
    say("fraud: scratch student")
    t0 = time.perf_counter()
    sout = fit(scfg, data=data, device=dev)
    t_scratch = time.perf_counter() - t0
    test_inputs = tout.inputs.take(data.split.test)
    s_ev = evaluate_inputs(scfg, data, sout.predictor, sout.inputs, figures=False)
    rows = [
        _fraud_row("teacher", tout.predictor, tout.evaluation, test_inputs, args.device),
        _fraud_row("student_distilled", dout.predictor, dout.evaluation, test_inputs, args.device),
        _fraud_row(
            "student_scratch",
            sout.predictor,
            s_ev,
            sout.inputs.take(data.split.test),
            args.device,
        ),
    ]
    ratio = rows[0]["active_params"] / rows[1]["active_params"]
    details = {
        "rows": rows,
        "teacher_over_student_active_params": ratio,
        "scratch_retention": rows[2]["pr_auc"] / rows[0]["pr_auc"],
        "alpha": args.alpha,
        "config": args.fraud_config,
        "epochs": {"teacher": args.fraud_teacher_epochs, "student": args.fraud_student_epochs},
        "train_seconds": {"teacher": t_teacher, "distill": t_distill, "scratch": t_scratch},
        "protocol": tout.evaluation.protocol,
        "machine": machine(),
        "seed": args.seed,
    }
    if ratio < 4:
        details["warning"] = f"teacher has only {ratio:.1f}x the student's active params"
    return {"fraud_student_retention": (rows[1]["pr_auc"] / rows[0]["pr_auc"], details)}


# ============================================================================ ddp2


def _state_bytes(model: Any, opt: torch.optim.Optimizer) -> dict[str, float]:
    """This rank's bytes of parameters, gradients and optimizer state (local shards under FSDP2)."""

    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = sum(nbytes(p) for p in model.parameters())
    grads = sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    state = sum(nbytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    return {
        "params_gb": params / 2**30,
        "grads_gb": grads / 2**30,
        "optim_gb": state / 2**30,
        "total_gb": (params + grads + state) / 2**30,
    }


def _ddp2_worker(rank: int, world: int, mode: str, a: dict, port: int, out: str) -> None:
    """One rank: the same global batch per step (rank r takes micro-batch r); world=1
    accumulates both micro-batches, so the three runs compute the same loss."""
    import os

    import torch.distributed as dist
    from torch import nn

    from bench.train_bench import LMBench, make_batch
    from core.config import AttentionConfig, BackboneConfig, MoEConfig

    cuda = a["device"] == "cuda"
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    dev = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    torch.manual_seed(0)
    cfg = BackboneConfig(
        d_model=a["d"],
        n_layers=a["layers"],
        ffn_hidden=4 * a["d"],
        attention=AttentionConfig(n_heads=max(1, a["d"] // 64), gated=True, top_k=None),
        moe=MoEConfig(n_routed_experts=8, top_k=2, n_shared_experts=1, expert_hidden=2 * a["d"]),
        n_dense_layers=1,
    )
    model = LMBench(cfg, a["vocab"]).to(dev)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        fn = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.backbone.blocks:
            fully_shard(block)
        fully_shard(model)
        fn = model
    else:
        fn = model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95))
    gen = torch.Generator(device=dev).manual_seed(1)
    b, seq, vocab = a["batch"], a["seq"], a["vocab"]
    n_micro = 2 if world == 1 else 1
    losses, times = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(a["warmup"] + a["steps"]):
        ids, target = make_batch(vocab, 2 * b, seq, dev, gen)  # the global batch
        parts = [slice(0, b), slice(b, 2 * b)]
        mine = parts if world == 1 else [parts[rank]]
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        total = 0.0
        for sl in mine:
            with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
                logits = fn(ids[sl])
                loss = nn.functional.cross_entropy(
                    logits.float().view(-1, vocab), target[sl].reshape(-1)
                )
            (loss / n_micro).backward()
            total += float(loss.detach()) / n_micro
        opt.step()
        opt.zero_grad(set_to_none=False)
        if cuda:
            torch.cuda.synchronize()
        if step >= a["warmup"]:
            times.append((time.perf_counter() - t0) * 1e3)
        if world > 1:
            t = torch.tensor([total], device=dev)
            dist.all_reduce(t)
            total = float(t) / world
        losses.append(total)
    mem = _state_bytes(model, opt)
    mem["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    times.sort()
    step_ms = times[len(times) // 2]
    if rank == 0:
        res = {
            "mode": mode,
            "world": world,
            "step_ms": step_ms,
            "tokens_per_s": 2 * b * seq / (step_ms / 1e3),
            "losses": losses,
            "mem_per_rank": mem,
        }
        with open(out, "w") as fh:
            json.dump(res, fh)
    if world > 1:
        dist.destroy_process_group()


def cmd_ddp2(args: argparse.Namespace) -> None:
    """1 GPU vs 2 GPUs (DDP, FSDP2): throughput, per-GPU state memory, loss curves.

    Same global batch (2 x ``--batch`` sequences) every step in all three runs: the 1-GPU
    run accumulates the two micro-batches, each of the 2 ranks takes one. Efficiency =
    tokens/s on 2 GPUs / (2 x tokens/s on 1 GPU). Memory: this rank's parameters +
    gradients + AdamW state (local shards under FSDP2), plus the CUDA peak. ``--tiny`` runs
    the same code on CPU with 2 gloo processes (a smoke check, not a measurement).
    Entry points: ``python -m bench.train_bench ddp2 [--tiny]`` or this function.
    """
    import tempfile

    import torch.multiprocessing as mp

    tiny = getattr(args, "tiny", False)
    device = "cpu" if tiny else "cuda"
    if device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit(f"ddp2 needs 2 GPUs; found {torch.cuda.device_count()}")
    a = {
        "device": device,
        "d": 64 if tiny else args.d_model,
        "layers": 2 if tiny else args.layers,
        "seq": 32 if tiny else args.seq,
        "batch": 2 if tiny else args.batch,
        "vocab": 256 if tiny else 8192,
        "steps": 3 if tiny else args.steps,
        "warmup": 1 if tiny else args.warmup,
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for port, (mode, world) in enumerate([("single", 1), ("ddp", 2), ("fsdp2", 2)]):
            out = f"{tmp}/{mode}.json"
            if world == 1:
                _ddp2_worker(0, 1, mode, a, 0, out)
            else:
                mp.spawn(_ddp2_worker, args=(world, mode, a, 29533 + port, out), nprocs=world)
            with open(out) as fh:
                results[mode] = json.load(fh)
            r = results[mode]
            print(
                f"{mode}: {r['tokens_per_s']:.0f} tok/s, state/rank"
                f" {r['mem_per_rank']['total_gb']:.3f} GB, last loss {r['losses'][-1]:.4f}",
                flush=True,
            )
    single = results["single"]["tokens_per_s"]
    ref = results["single"]["losses"]
    max_loss_gap = {
        m: max(abs(x - y) for x, y in zip(results[m]["losses"], ref, strict=True))
        for m in ("ddp", "fsdp2")
    }
    details = {
        "settings": a,
        "runs": {m: {k: v for k, v in r.items() if k != "mode"} for m, r in results.items()},
        "fsdp2_efficiency": results["fsdp2"]["tokens_per_s"] / (2 * single),
        "state_gb_per_rank": {m: r["mem_per_rank"]["total_gb"] for m, r in results.items()},
        "max_loss_gap_vs_single": max_loss_gap,
        "definition": "tokens/s on 2 GPUs (DDP) / (2 x tokens/s on 1 GPU), same global batch",
    }
    value = results["ddp"]["tokens_per_s"] / (2 * single)
    if tiny:
        print(json.dumps({"ddp2_scaling_efficiency(cpu smoke)": value, **details}, default=str))
    else:
        record("core", "ddp2_scaling_efficiency", value, details)


# ============================================================================ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--apps", nargs="+", default=["maintenance", "fraud"])
    ap.add_argument("--skip-growth", action="store_true")
    ap.add_argument("--skip-distill", action="store_true", help="growth experiment only")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke sizes (data_samples)")
    ap.add_argument("--data-dir", default=None, help="C-MAPSS folder (default: shared data)")
    ap.add_argument("--precision", default=None)
    ap.add_argument("--alpha", type=float, default=0.7, help="teacher-term weight")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-stride", type=int, default=None, help="maintenance window stride")
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--student-epochs", type=int, default=30)
    ap.add_argument("--growth-epochs", type=int, default=30)
    ap.add_argument("--grow-at", type=float, default=0.5, help="share of scratch steps")
    ap.add_argument("--grow-budget", type=float, default=1.3, help="x scratch epochs")
    ap.add_argument("--fraud-config", default="demo", help="demo | ulb | handbook | YAML")
    ap.add_argument("--fraud-teacher-epochs", type=int, default=5)
    ap.add_argument("--fraud-student-epochs", type=int, default=5)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    if args.tiny:
        for k in ("teacher_epochs", "student_epochs", "growth_epochs"):
            setattr(args, k, min(getattr(args, k), 1))
        args.fraud_teacher_epochs = min(args.fraud_teacher_epochs, 1)
        args.fraud_student_epochs = min(args.fraud_student_epochs, 1)
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    unknown = set(args.apps) - {"maintenance", "fraud"}
    if unknown:
        ap.error(f"apps {sorted(unknown)}: only maintenance and fraud have distillation here")
    results: dict[str, tuple[float, dict[str, Any]]] = {}
    t0 = time.perf_counter()
    if "maintenance" in args.apps:
        if not args.skip_distill:
            results |= run_maintenance_distill(args)
        if not args.skip_growth:
            results |= run_maintenance_growth(args)
    if "fraud" in args.apps and not args.skip_distill:
        results |= run_fraud_distill(args)
    cmd = "python -m bench.scale_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    for key, (value, details) in results.items():
        details = {**details, "command": cmd, "tiny": args.tiny}
        if args.no_record:
            print(f"{key} = {value:.4g}", flush=True)
        else:
            record("scale", key, float(value), details)
    print(f"total {time.perf_counter() - t0:.0f} s on {machine()}", flush=True)
    print(json.dumps({k: v for k, (v, _) in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
