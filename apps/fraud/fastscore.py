"""Polars-free scoring path: row features in torch + a small distilled student.

For schemas WITHOUT card / terminal ids (ULB) every feature of a transaction is an
elementwise function of its own raw columns (amount, log1p(amount), hour, night flag, the
schema's numeric columns), so features can be computed in torch on the scoring device
next to the model: :class:`RowFeatures` reproduces ``FeatureBuilder.transform`` +
``Scaler.transform`` exactly from the JSON state of a fitted ``InputBuilder``
(``InputBuilder.state_dict()``), with no polars import. Throughput benchmarks use it so
that "features included" means the same work for every model.

:class:`StudentMLP` is a small MLP distilled from the backbone's logits
(:func:`distill_student`, core's distillation loss on stored soft labels): the cheap scorer
for CPU serving, evaluated on the same test block as its teacher. :func:`scratch_student`
fits the same MLP on the labels alone, with the same loop, rows and steps (the control of
``bench/scale_bench.py --fraud-student mlp``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from core.distill import DistillConfig

CLIP = 8.0  # same clip as apps.fraud.inputs.CLIP
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


class RowFeatures(nn.Module):
    """``raw_BR -> x_BF`` for schemas without card / terminal ids.

    ``raw_BR`` columns: ``[time, amount, *numeric_columns]`` with time in the schema's
    ``time_unit`` since a midnight origin (ULB: seconds since the first transaction).
    ``scaled=True`` returns the backbone's inputs (log1p on flagged columns, standardised
    with training mean/std, clipped to +-8); ``scaled=False`` the unscaled features
    LightGBM reads. NaN numeric values get the training fill value, as in ``features.py``.
    """

    def __init__(
        self,
        feature_names: Sequence[str],
        numeric_columns: Sequence[str],
        fill_values: Mapping[str, float],
        log: Sequence[bool],
        mean: Sequence[float],
        std: Sequence[float],
        seconds_per_unit: float = 1.0,
        night_hours: tuple[int, int] = (22, 6),
    ) -> None:
        super().__init__()
        known = {"amount", "amount_log1p", "hour", "is_night", *numeric_columns}
        unknown = [f for f in feature_names if f not in known]
        if unknown:
            raise ValueError(
                f"RowFeatures handles only row-local features; {unknown} need per-card or "
                "per-terminal history (use apps.fraud.inputs.InputBuilder)"
            )
        if not len(feature_names) == len(log) == len(mean) == len(std):
            raise ValueError("feature_names, log, mean and std must have equal lengths")
        self.feature_names = list(feature_names)
        self.numeric_columns = list(numeric_columns)
        self.seconds_per_unit = float(seconds_per_unit)
        self.night_hours = (int(night_hours[0]), int(night_hours[1]))
        # features are computed in this base order, then permuted to ``feature_names``
        base = ["amount", "amount_log1p", "hour", "is_night", *numeric_columns]
        perm = [base.index(f) for f in feature_names]
        self.identity = perm == list(range(len(base)))
        self.register_buffer("perm_F", torch.tensor(perm, dtype=torch.long), persistent=False)
        fill = [0.0, 0.0, *[float(fill_values[c]) for c in numeric_columns]]
        self.register_buffer("fill_R", torch.tensor(fill, dtype=torch.float64), persistent=False)
        log_idx = [i for i, v in enumerate(log) if v]
        self.register_buffer("log_idx", torch.tensor(log_idx, dtype=torch.long), persistent=False)
        self.register_buffer("mean_F", torch.tensor([float(v) for v in mean]), persistent=False)
        inv = [1.0 / float(v) for v in std]
        self.register_buffer("inv_std_F", torch.tensor(inv), persistent=False)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RowFeatures:
        """From ``InputBuilder.state_dict()`` (plain JSON; no polars needed)."""
        schema, feats = state["schema"], state["features"]
        if schema.get("card_column") or schema.get("terminal_column"):
            raise ValueError(
                f"schema {schema.get('name')!r} has card/terminal ids: its features need "
                "history; RowFeatures covers row-local schemas only"
            )
        if state["categorical"]:
            raise ValueError("RowFeatures does not encode categorical columns")
        if schema.get("time_kind") != "offset" or schema.get("time_origin") not in (None, ""):
            raise ValueError("RowFeatures needs an offset time column from a midnight origin")
        sc = state["scaler"]
        return cls(
            state["numeric"],
            list(schema["numeric_columns"]),
            state["fill_values"],
            sc["log"],
            sc["mean"],
            sc["std"],
            seconds_per_unit=_SECONDS[schema.get("time_unit", "s")],
            night_hours=tuple(feats.get("night_hours", (22, 6))),
        )

    @property
    def raw_columns(self) -> int:
        return 2 + len(self.numeric_columns)

    def forward(self, raw_BR: Tensor, scaled: bool = True) -> Tensor:
        """Scaled features in float32 (the backbone's inputs); unscaled ones computed in
        float64 on CPU and rounded to float32, as ``FeatureBuilder.to_matrices`` does
        (the matrix LightGBM was trained on)."""
        if raw_BR.ndim != 2 or raw_BR.shape[1] != self.raw_columns:
            raise ValueError(
                f"raw rows must be [B, {self.raw_columns}] (time, amount, "
                f"{len(self.numeric_columns)} numeric columns), got {tuple(raw_BR.shape)}"
            )
        wide = not scaled and raw_BR.device.type == "cpu"
        dtype = torch.float64 if wide else torch.float32
        t = raw_BR[:, 0].to(torch.float64)  # hour boundaries need float64 seconds
        raw_BR = raw_BR.to(dtype)
        raw_BR = torch.where(torch.isnan(raw_BR), self.fill_R.to(dtype), raw_BR)
        hour_B = torch.floor(t * self.seconds_per_unit / 3600.0).remainder(24.0)
        lo, hi = self.night_hours
        night_B = ((hour_B >= lo) | (hour_B < hi)) if lo > hi else ((hour_B >= lo) & (hour_B < hi))
        amount_B1 = raw_BR[:, 1:2]
        x_BF = torch.cat(
            [
                amount_B1,
                torch.log1p(amount_B1.clamp_min(0)),
                hour_B.to(dtype).unsqueeze(1),
                night_B.to(dtype).unsqueeze(1),
                raw_BR[:, 2:],
            ],
            1,
        )
        if not self.identity:
            x_BF = x_BF[:, self.perm_F]
        if not scaled:
            return x_BF.float()
        if self.log_idx.numel():
            x_BF[:, self.log_idx] = torch.log1p(x_BF[:, self.log_idx].clamp_min(0))
        return ((x_BF - self.mean_F) * self.inv_std_F).clamp_(-CLIP, CLIP)


def mlp_layers(n_features: int, hidden: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """``Linear -> SiLU (-> Dropout)`` per hidden size, then ``Linear(., 1)``: the MLP of the
    student (no dropout, so its saved layer indices never change) and of the backbone's
    row path (``model.RowMLP``)."""
    dims = [n_features, *[int(h) for h in hidden]]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        layers += [nn.Linear(a, b), nn.SiLU()] + ([nn.Dropout(dropout)] if dropout else [])
    layers.append(nn.Linear(dims[-1], 1))
    return nn.Sequential(*layers)


class StudentMLP(nn.Module):
    """``x_num_BF -> logit_B``: a small MLP (SiLU) distilled from the backbone's logits."""

    def __init__(self, n_features: int, hidden: Sequence[int] = (64, 32)) -> None:
        super().__init__()
        self.net = mlp_layers(n_features, hidden)
        self.n_features = n_features
        self.hidden = list(hidden)
        self.fit_steps = 0  # optimizer steps of the fit that made these weights (0: none here)

    def forward(self, x_BF: Tensor) -> Tensor:
        return self.net(x_BF).squeeze(-1)


def student_steps(n_rows: int, epochs: int, batch_size: int) -> int:
    """Optimizer steps of one :func:`distill_student` / :func:`scratch_student` fit."""
    return epochs * math.ceil(n_rows / batch_size)


def _fit_mlp(
    x_NF: np.ndarray,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    hidden: Sequence[int],
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> StudentMLP:
    """The one training loop of both students: ``loss_fn(logits_B, rows_B)`` per batch.

    Sharing it is what makes a distilled and a from-scratch student comparable: with the
    same ``seed`` they start from the same weights and see the same rows in the same
    batches, with the same AdamW + one-cycle schedule; only the targets differ. The step
    count is kept on the student (``fit_steps``) so a benchmark can show it."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student = StudentMLP(x_NF.shape[1], hidden)
    x = torch.from_numpy(np.ascontiguousarray(x_NF, np.float32))
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-4)
    steps = student_steps(len(x), epochs, batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    student.train()
    done = 0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch_size):
            b = perm[s : s + batch_size]
            loss = loss_fn(student(x[b]), b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done += 1
    student.fit_steps = done
    return student.eval()


def _check_rows(x_NF: np.ndarray, target_N: np.ndarray, what: str) -> None:
    if len(x_NF) != len(target_N) or len(x_NF) == 0:
        raise ValueError(f"x has {len(x_NF)} rows, {what} {len(target_N)}; need equal, > 0")


def student_distill_config(cfg: DistillConfig | Mapping[str, Any] | None = None) -> DistillConfig:
    """The student's teacher term: by default ``alpha=1`` (soft targets only) and MSE on the
    logit (``kind="regression"``), i.e. match the teacher's score on every row, frauds and
    the many legitimate rows alike (a tempered two-class KL would flatten the ranking
    among the confident legitimate rows)."""
    from core.distill import DistillConfig  # lazy: the scoring path needs no lightning

    if isinstance(cfg, DistillConfig):
        return cfg
    return DistillConfig.from_dict({"alpha": 1.0, "kind": "regression", **dict(cfg or {})})


def distill_student(
    x_NF: np.ndarray,
    teacher_logits_N: np.ndarray,
    hidden: Sequence[int] = (64, 32),
    epochs: int = 6,
    batch_size: int = 1024,
    lr: float = 2e-3,
    seed: int = 0,
    cfg: DistillConfig | Mapping[str, Any] | None = None,
    y_N: np.ndarray | None = None,
    pos_weight: float = 1.0,
) -> StudentMLP:
    """Fit a :class:`StudentMLP` to the teacher's logits (stored soft labels). The loss is
    core's: ``alpha * teacher_term(student, teacher, cfg) + (1 - alpha) * task`` as in
    :class:`core.distill.DistillationModule` (``cfg``: :func:`student_distill_config`;
    ``alpha < 1`` needs the labels ``y_N``, task = BCE with ``pos_weight``). Use rows the
    teacher was trained or validated on, never test rows.

    A label may be NaN: not known yet. Transactions inside the label delay exist when the
    student is trained but their labels do not; they still carry the teacher's soft label.
    The task term then averages over the batch's known labels only, so a row without one
    is taught by the teacher alone (semi-supervised distillation)."""
    from core.distill import teacher_term  # lazy: the scoring path needs no lightning

    _check_rows(x_NF, teacher_logits_N, "teacher logits")
    cfg = student_distill_config(cfg)
    if cfg.alpha < 1.0 and (y_N is None or len(y_N) != len(x_NF)):
        raise ValueError(f"alpha={cfg.alpha} < 1 needs one label per row (y_N)")
    t = torch.from_numpy(np.ascontiguousarray(teacher_logits_N, np.float32))
    y = None if y_N is None else torch.from_numpy(np.asarray(y_N, np.float32))
    known = None if y is None else ~torch.isnan(y)
    if cfg.alpha < 1.0 and not bool(known.any()):
        raise ValueError(f"alpha={cfg.alpha} < 1 needs at least one known label; all are NaN")
    partial = known is not None and not bool(known.all())
    pw = torch.tensor(float(pos_weight))

    def loss(logits_B: Tensor, rows_B: Tensor) -> Tensor:
        total = cfg.alpha * teacher_term(logits_B, t[rows_B], cfg)
        if cfg.alpha < 1.0:
            if partial:  # rows inside the label delay: no task term
                k_B = known[rows_B]
                per_row = F.binary_cross_entropy_with_logits(
                    logits_B[k_B], y[rows_B][k_B], pos_weight=pw, reduction="sum"
                )
                task = per_row / k_B.sum().clamp_min(1)
            else:
                task = F.binary_cross_entropy_with_logits(logits_B, y[rows_B], pos_weight=pw)
            total = total + (1.0 - cfg.alpha) * task
        return total

    return _fit_mlp(x_NF, loss, hidden, epochs, batch_size, lr, seed)


def scratch_student(
    x_NF: np.ndarray,
    y_N: np.ndarray,
    pos_weight: float = 1.0,
    hidden: Sequence[int] = (64, 32),
    epochs: int = 6,
    batch_size: int = 1024,
    lr: float = 2e-3,
    seed: int = 0,
) -> StudentMLP:
    """The same :class:`StudentMLP` fitted on the labels alone (class-weighted BCE: frauds
    weighted ``pos_weight``), with the loop, rows, batches and schedule of
    :func:`distill_student`: the from-scratch control of a distillation benchmark."""
    _check_rows(x_NF, y_N, "labels")
    y = torch.from_numpy(np.asarray(y_N, np.float32))
    pw = torch.tensor(float(pos_weight))

    def loss(logits_B: Tensor, rows_B: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits_B, y[rows_B], pos_weight=pw)

    return _fit_mlp(x_NF, loss, hidden, epochs, batch_size, lr, seed)


@torch.no_grad()
def student_logits(student: StudentMLP, x_NF: np.ndarray, batch_size: int = 65536) -> np.ndarray:
    """Logits of prepared (scaled) feature rows, batch by batch, in eval mode."""
    student.eval()
    x = torch.from_numpy(np.ascontiguousarray(x_NF, np.float32))
    out = [student(x[s : s + batch_size]) for s in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


@torch.no_grad()
def score_rows(
    features: RowFeatures, model: nn.Module, raw_BR: Tensor, batch_size: int = 65536
) -> Tensor:
    """Logits of raw rows: features + model, batch by batch, on ``raw_BR``'s device.
    ``model`` takes either ``x_num`` (a student) or the backbone's batch dict."""
    out = []
    for s in range(0, raw_BR.shape[0], batch_size):
        x_BF = features(raw_BR[s : s + batch_size])
        if isinstance(model, StudentMLP):
            out.append(model(x_BF))
        else:
            n = x_BF.shape[0]
            batch = {
                "x_num": x_BF,
                "x_cat": torch.zeros(n, 0, dtype=torch.long, device=x_BF.device),
                "hist": torch.zeros(n, 0, 0, device=x_BF.device),
                "hist_pad": torch.ones(n, 0, dtype=torch.bool, device=x_BF.device),
            }
            out.append(model(batch).float())
    return torch.cat(out)
