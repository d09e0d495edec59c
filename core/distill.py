"""Knowledge distillation: a small student learns from a frozen, larger teacher.

Three signals, combined by :class:`DistillationModule`:

* **Soft targets** (Hinton et al. 2015): ``alpha * T^2 * KL(p_teacher^T || p_student^T) +
  (1 - alpha) * task_loss``, where ``p^T = softmax(logits / T)``. The ``T^2`` factor keeps
  the soft term's gradient magnitude independent of ``T`` (the gradient of the tempered KL
  scales as ``1 / T^2``), so ``alpha`` means the same thing at every temperature. Single-logit
  (binary) heads become two-class distributions ``[sigmoid(z/T), 1 - sigmoid(z/T)]``;
  regression heads use ``alpha * MSE|Huber(student, teacher) + (1 - alpha) * task_loss``.
* **Hidden-state matching** (FitNets / TinyBERT): student hidden states are projected to the
  teacher's width by one learned ``nn.Linear`` per mapped layer and compared by MSE over the
  real (non-padding) tokens, optionally after a parameter-free layer norm so the loss
  compares directions and relative magnitudes, not the two models' residual-stream scales.
* **Stored soft labels**: :func:`produce_soft_labels` runs the teacher once over a dataset;
  :class:`SoftLabelDataset` serves those logits next to the inputs, so a student can train
  on unlabeled data (``alpha=1``) without the teacher in memory.
* **Unlabelled rows beside labelled ones** (optional): a batch key
  (``DistillConfig.label_mask_key``) with 1 for a labelled row and 0 for a row whose label is
  unknown (fraud: transactions whose labels arrive after the training cut-off). The teacher term
  covers every row; the task loss is computed on the labelled rows only, so a student can mix
  a transfer set into its batches with ``alpha < 1`` and never read a placeholder label.
  ``teacher_rows="unlabelled"`` narrows the teacher term to the unlabelled rows too (labels
  where known, the teacher where not: self-training with soft pseudo-labels).
* **Per-row weights** (optional): a batch key (``DistillConfig.sample_weight_key``) with one
  non-negative weight per row turns the teacher term's mean over rows into a weighted mean
  ``sum(w * l) / sum(w)``. With rare positives (fraud: ~0.2 % of rows) an unweighted mean
  is dominated by the easy negatives while the task loss is class-weighted; the weights let
  the teacher term follow the same class balance.

The teacher is never a registered submodule of the student's module: it is stored with
``object.__setattr__``, so it is absent from ``state_dict``, ``parameters()`` (the optimizer
never sees it), checkpoints and ``.train()`` calls (it stays in eval mode).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from core.configio import YamlConfig
from core.engine import TaskModule, TrainerConfig, build_trainer, fully_shard_task
from core.errors import KeelInputError
from core.sharding import single_device_copy

KINDS = ("auto", "softmax", "binary", "regression")
REGRESSION_LOSSES = ("mse", "huber")
COLUMN_KINDS = ("binary", "regression")
POSITION_REDUCTIONS = ("mean", "sum")
TEACHER_ROWS = ("all", "unlabelled")


@dataclass
class DistillConfig(YamlConfig):
    """Distillation settings (YAML round-trip through :class:`core.configio.YamlConfig`).

    ``alpha``: weight of the teacher term (1 = teacher only, for unlabeled data; 0 = task loss
    only). ``temperature``: ``T`` of the softened distributions. ``kind``: ``softmax``
    (multi-class logits ``[..., C]``), ``binary`` (one logit per row), ``regression``, or
    ``auto`` (binary when the prediction is 1-D or has a last dim of 1, else softmax).
    ``regression_loss``: ``mse`` or ``huber`` (``huber_delta``). ``hidden_weight``: weight of
    the hidden-matching term (0 = off). ``layer_map``: student hidden-state index -> teacher
    hidden-state index, where index 0 is the embeddings and ``i`` the output of block ``i``
    (``BackboneOutput.hidden_states`` numbering). ``normalize_hidden``: layer-norm both sides
    (no affine) before the MSE. ``soft_label_key``: batch key holding stored teacher logits;
    when present the teacher is not run. ``sample_weight_key``: batch key holding one
    non-negative weight per row (shape ``[B]``); when present the teacher term is the
    weighted mean over rows (every leading position of row ``b`` gets ``w[b]``).
    ``label_mask_key``: batch key holding 1 (labelled) or 0 (label unknown) per row (``[B]``);
    when present the task loss sees only the labelled rows (0 for a batch without one).
    ``teacher_rows``: which rows the teacher term covers: ``all`` (default) or ``unlabelled``
    (only rows marked 0 under ``label_mask_key``: labels where they are known, the teacher
    where they are not, as in self-training; 0 for a batch without such a row, and always 0
    for batches without the mask key, e.g. validation).
    ``position_reduction``: how the teacher term reduces over the positions of one row
    (tokens, voxels) before the mean over rows: ``mean`` (default) or ``sum``. ``sum`` is for
    dense per-position heads whose task loss is a sum normalised by a few positives
    (CenterNet's focal loss): a per-voxel mean would be ~1e-5 of that loss and the teacher
    would be ignored.
    ``column_kinds``: one kind per output column (``binary`` / ``regression``) for heads
    whose columns are different tasks (maintenance: RUL and alarm); the teacher term is then
    combined over columns. ``column_weights``: how: empty = the mean over columns; otherwise
    ``sum_c w_c * term_c``. Set them to the task loss's own column weights so the teacher
    term asks the shared layers for the same balance between the columns as the labels do
    (a plain mean can weigh a column several times more than the task loss does).
    """

    alpha: float = 0.5
    temperature: float = 2.0
    kind: str = "auto"
    regression_loss: str = "mse"
    huber_delta: float = 1.0
    hidden_weight: float = 0.0
    layer_map: dict[int, int] = field(default_factory=dict)
    normalize_hidden: bool = True
    soft_label_key: str = "soft_labels"
    sample_weight_key: str = "sample_weight"
    label_mask_key: str = "has_label"
    teacher_rows: str = "all"
    position_reduction: str = "mean"
    column_kinds: list[str] = field(default_factory=list)
    column_weights: list[float] = field(default_factory=list)
    logits_key: str = "logits"

    def __post_init__(self) -> None:
        self.column_kinds = [str(k) for k in self.column_kinds]
        bad = [k for k in self.column_kinds if k not in COLUMN_KINDS]
        if bad:
            raise ValueError(
                f"DistillConfig.column_kinds entries must be in {COLUMN_KINDS}, got {bad}"
            )
        self.column_weights = [float(w) for w in self.column_weights]
        # weights may come before the kinds (an app fills its head's kinds in later)
        n_kinds = len(self.column_kinds)
        if self.column_weights and n_kinds and len(self.column_weights) != n_kinds:
            raise ValueError(
                f"DistillConfig.column_weights has {len(self.column_weights)} entries but"
                f" column_kinds names {len(self.column_kinds)} columns"
            )
        if any(not math.isfinite(w) or w < 0 for w in self.column_weights):
            raise ValueError(
                f"DistillConfig.column_weights must be finite and >= 0, got {self.column_weights}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"DistillConfig.alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"DistillConfig.temperature must be > 0, got {self.temperature}")
        if self.kind not in KINDS:
            raise ValueError(f"DistillConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.regression_loss not in REGRESSION_LOSSES:
            raise ValueError(
                f"DistillConfig.regression_loss must be one of {REGRESSION_LOSSES},"
                f" got {self.regression_loss!r}"
            )
        if self.teacher_rows not in TEACHER_ROWS:
            raise ValueError(
                f"DistillConfig.teacher_rows must be one of {TEACHER_ROWS}, got {self.teacher_rows!r}"
            )
        if self.position_reduction not in POSITION_REDUCTIONS:
            raise ValueError(
                f"DistillConfig.position_reduction must be one of {POSITION_REDUCTIONS},"
                f" got {self.position_reduction!r}"
            )
        if self.hidden_weight < 0:
            raise ValueError(f"DistillConfig.hidden_weight must be >= 0, got {self.hidden_weight}")
        # YAML keys may arrive as strings
        self.layer_map = {int(k): int(v) for k, v in dict(self.layer_map).items()}
        if self.hidden_weight > 0 and not self.layer_map:
            raise ValueError("DistillConfig.hidden_weight > 0 needs a non-empty layer_map")


# ============================================================================ losses


def weighted_row_mean(
    loss_rows: Tensor, weight_B: Tensor | None, position_reduction: str = "mean"
) -> Tensor:
    """Mean of per-row losses ``[B, ...]``; with ``weight_B`` (``[B]``, >= 0) the weighted
    mean ``sum(w * l) / sum(w)``, each leading position of row ``b`` weighted ``w[b]``.
    ``position_reduction="sum"`` first sums each row over its positions (``[B, ...]`` ->
    ``[B]``), so the result is the (weighted) mean over rows of per-row sums."""
    loss_rows = loss_rows.float()
    if position_reduction == "sum" and loss_rows.dim() > 1:
        loss_rows = loss_rows.reshape(loss_rows.shape[0], -1).sum(-1)
    if weight_B is None:
        return loss_rows.mean()
    w = weight_B.to(device=loss_rows.device, dtype=torch.float32)
    B = loss_rows.shape[0] if loss_rows.dim() else 1
    if w.dim() != 1 or w.shape[0] != B:
        raise KeelInputError(
            f"sample weights must have shape [{B}] (one per row), got {tuple(w.shape)}"
        )
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise KeelInputError("sample weights must be finite and >= 0")
    w_full = w.reshape(B, *([1] * (loss_rows.dim() - 1))).expand_as(loss_rows)
    total = w_full.sum()
    if float(total) <= 0:
        raise KeelInputError("sample weights of a batch sum to 0: no row would count")
    return (w_full * loss_rows).sum() / total


def soft_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    weight_B: Tensor | None = None,
    position_reduction: str = "mean",
) -> Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` over the last dim, mean over all rows.

    Logits ``[..., C]``; the KL is taken per leading position and averaged ("batchmean"),
    or weighted by ``weight_B`` (:func:`weighted_row_mean`). The log softmaxes are taken in
    float32: under bf16 autocast the small probabilities of a confident teacher would round
    to 0 and the KL would lose exactly the "dark knowledge".
    """
    if student_logits.shape != teacher_logits.shape:
        raise KeelInputError(
            f"student logits {tuple(student_logits.shape)} and teacher logits"
            f" {tuple(teacher_logits.shape)} must have the same shape"
        )
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl_rows = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
    return weighted_row_mean(kl_rows, weight_B, position_reduction) * temperature**2


def _binary_as_two_class(logits: Tensor) -> Tensor:
    """One logit ``z`` -> two-class logits ``[z, 0]``: softmax of that is ``[sigmoid(z), 1 - sigmoid(z)]``."""
    z = logits.float()
    if z.dim() > 1 and z.shape[-1] == 1:
        z = z.squeeze(-1)
    return torch.stack([z, torch.zeros_like(z)], dim=-1)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    task_loss: Tensor | float,
    alpha: float,
    temperature: float,
) -> Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * task_loss`` (multi-class)."""
    soft = soft_kl(student_logits, teacher_logits, temperature)
    return alpha * soft + (1.0 - alpha) * task_loss


def binary_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    task_loss: Tensor | float,
    alpha: float,
    temperature: float,
) -> Tensor:
    """:func:`distillation_loss` for single-logit heads: sigmoid -> two-class distributions."""
    return distillation_loss(
        _binary_as_two_class(student_logits),
        _binary_as_two_class(teacher_logits),
        task_loss,
        alpha,
        temperature,
    )


def regression_distillation_loss(
    student_pred: Tensor,
    teacher_pred: Tensor,
    task_loss: Tensor | float,
    alpha: float,
    loss: str = "mse",
    huber_delta: float = 1.0,
    weight_B: Tensor | None = None,
    position_reduction: str = "mean",
) -> Tensor:
    """``alpha * MSE|Huber(student, teacher) + (1 - alpha) * task_loss`` (no temperature).

    The teacher term is the mean over all elements, or with ``weight_B`` the weighted mean
    over rows of each row's mean error (:func:`weighted_row_mean`)."""
    if student_pred.shape != teacher_pred.shape:
        raise KeelInputError(
            f"student predictions {tuple(student_pred.shape)} and teacher predictions"
            f" {tuple(teacher_pred.shape)} must have the same shape"
        )
    s, t = student_pred.float(), teacher_pred.float()
    if loss == "mse":
        err = F.mse_loss(s, t, reduction="none")
    elif loss == "huber":
        err = F.huber_loss(s, t, delta=huber_delta, reduction="none")
    else:
        raise ValueError(f"regression loss must be one of {REGRESSION_LOSSES}, got {loss!r}")
    soft = weighted_row_mean(err, weight_B, position_reduction)
    return alpha * soft + (1.0 - alpha) * task_loss


def resolve_kind(kind: str, preds: Tensor) -> str:
    """``auto`` -> ``binary`` for 1-D or ``[..., 1]`` predictions, else ``softmax``."""
    if kind != "auto":
        return kind
    return "binary" if preds.dim() == 1 or preds.shape[-1] == 1 else "softmax"


def teacher_term(
    student_preds: Tensor,
    teacher_preds: Tensor,
    cfg: DistillConfig,
    weight_B: Tensor | None = None,
) -> Tensor:
    """The teacher part alone (what ``alpha`` multiplies), per ``cfg.kind`` (or per column);
    a weighted mean over rows when ``weight_B`` (one weight per row) is given."""
    if cfg.column_weights and len(cfg.column_weights) != len(cfg.column_kinds):
        raise KeelInputError(
            f"column_weights {cfg.column_weights} need one column kind each, got column_kinds"
            f" {cfg.column_kinds}"
        )
    if cfg.column_kinds:
        C = len(cfg.column_kinds)
        if student_preds.shape[-1] != C or teacher_preds.shape != student_preds.shape:
            raise KeelInputError(
                f"column_kinds names {C} columns; student predictions"
                f" {tuple(student_preds.shape)} and teacher predictions"
                f" {tuple(teacher_preds.shape)} must both have {C} in the last dim"
            )
        terms_C = torch.stack(
            [
                teacher_term(
                    student_preds[..., c],
                    teacher_preds[..., c],
                    dataclasses.replace(cfg, kind=kind, column_kinds=[], column_weights=[]),
                    weight_B,
                )
                for c, kind in enumerate(cfg.column_kinds)
            ]
        )
        if not cfg.column_weights:
            return terms_C.mean()
        w_C = torch.tensor(cfg.column_weights, dtype=terms_C.dtype, device=terms_C.device)
        return (w_C * terms_C).sum()
    kind = resolve_kind(cfg.kind, student_preds)
    if kind == "softmax":
        return soft_kl(
            student_preds, teacher_preds, cfg.temperature, weight_B, cfg.position_reduction
        )
    if kind == "binary":
        return soft_kl(
            _binary_as_two_class(student_preds),
            _binary_as_two_class(teacher_preds),
            cfg.temperature,
            weight_B,
            cfg.position_reduction,
        )
    return regression_distillation_loss(
        student_preds,
        teacher_preds,
        0.0,
        1.0,
        cfg.regression_loss,
        cfg.huber_delta,
        weight_B,
        cfg.position_reduction,
    )


# ============================================================================ hidden states


class HiddenStateMatcher(nn.Module):
    """Learned projections student width -> teacher width and the masked hidden MSE.

    One bias-free ``nn.Linear(d_student, d_teacher)`` per mapped student layer (keys of
    ``layer_map``). With equal widths the projections start as the identity (so a student
    that equals the teacher starts at zero loss); otherwise at a small normal init.
    """

    def __init__(
        self,
        layer_map: Mapping[int, int],
        d_student: int,
        d_teacher: int,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if not layer_map:
            raise ValueError("HiddenStateMatcher needs a non-empty layer_map")
        self.layer_map = {int(k): int(v) for k, v in layer_map.items()}
        self.normalize = normalize
        self.d_teacher = d_teacher
        self.proj = nn.ModuleDict(
            {str(s): nn.Linear(d_student, d_teacher, bias=False) for s in self.layer_map}
        )
        for lin in self.proj.values():
            if d_student == d_teacher:
                nn.init.eye_(lin.weight)
            else:
                nn.init.normal_(lin.weight, std=1.0 / math.sqrt(d_student))

    def forward(
        self,
        student_hidden: list[Tensor],
        teacher_hidden: list[Tensor],
        padding_mask_BT: Tensor | None = None,
    ) -> Tensor:
        """Mean over mapped layers of the per-token MSE, averaged over non-padding tokens."""
        losses = []
        for s_idx, t_idx in self.layer_map.items():
            for idx, hidden, who in (
                (s_idx, student_hidden, "student"),
                (t_idx, teacher_hidden, "teacher"),
            ):
                if not -len(hidden) <= idx < len(hidden):
                    raise KeelInputError(
                        f"layer_map index {idx} is out of range for the {who}'s"
                        f" {len(hidden)} hidden states (0 = embeddings, i = block i)"
                    )
            s_BTD = self.proj[str(s_idx)](student_hidden[s_idx].float())
            t_BTD = teacher_hidden[t_idx].float()
            if s_BTD.shape != t_BTD.shape:
                raise KeelInputError(
                    f"projected student hidden state {s_idx} {tuple(s_BTD.shape)} does not match"
                    f" teacher hidden state {t_idx} {tuple(t_BTD.shape)}"
                )
            if self.normalize:
                s_BTD = F.layer_norm(s_BTD, (self.d_teacher,))
                t_BTD = F.layer_norm(t_BTD, (self.d_teacher,))
            err_BT = (s_BTD - t_BTD).pow(2).mean(-1)
            if padding_mask_BT is None:
                losses.append(err_BT.mean())
            else:
                real_BT = (~padding_mask_BT.to(torch.bool)).float()
                losses.append((err_BT * real_BT).sum() / real_BT.sum().clamp_min(1.0))
        return torch.stack(losses).mean()


# ============================================================================ module


def select_rows(obj: Any, rows_B: Tensor, B: int) -> Any:
    """``obj`` (a tensor, or a mapping / list / tuple of them) restricted to the rows where
    ``rows_B`` is true: every tensor whose leading dim is the batch size ``B`` is indexed,
    anything else (scalars, per-batch constants) passes through unchanged."""
    if isinstance(obj, Tensor):
        return obj[rows_B.to(obj.device)] if obj.dim() > 0 and obj.shape[0] == B else obj
    if isinstance(obj, Mapping):
        return {k: select_rows(v, rows_B, B) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple takes positional args
        return type(obj)(*(select_rows(v, rows_B, B) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(select_rows(v, rows_B, B) for v in obj)
    return obj


def _logits_of(preds: Any, key: str = "logits") -> Tensor:
    """Predictions as one tensor: a tensor itself, or ``preds[key]`` for dict heads."""
    if isinstance(preds, Tensor):
        return preds
    if isinstance(preds, Mapping) and key in preds:
        return preds[key]
    raise TypeError(
        f"distillation needs tensor predictions or a dict with {key!r}; got"
        f" {type(preds).__name__}"
        + (f" with keys {sorted(preds)}" if isinstance(preds, Mapping) else "")
    )


class DistillationModule(lightning.LightningModule):
    """Trains ``student`` (a :class:`TaskModule`) against a frozen ``teacher``.

    Only the student and the hidden-state projections are submodules, so checkpoints hold
    ``student.*`` and ``matcher.*`` keys and no teacher weights; keep ``module.student`` for
    deployment. ``teacher`` may be ``None`` when every batch carries stored soft labels
    (``cfg.soft_label_key``; hidden matching then needs a teacher and is an error).

    The optimizer and LR schedule are the student's (``student.optim_config``), over the
    student's and the projections' parameters. Logged per step: ``train/loss`` (total),
    ``train/distill_loss`` (teacher term), ``train/task_loss`` (when ``alpha < 1``) and
    ``train/hidden_loss`` (when hidden matching is on); the same under ``val/``.
    """

    def __init__(
        self,
        student: TaskModule,
        teacher: TaskModule | None,
        cfg: DistillConfig | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = (
            cfg if isinstance(cfg, DistillConfig) else DistillConfig.from_dict(dict(cfg or {}))
        )
        self.student = student
        self.optim_config = student.optim_config
        self.save_hyperparameters(
            {
                "distill_config": self.cfg.to_dict(),
                "student_hparams": dict(student.hparams),
            }
        )
        self.set_teacher(teacher)
        self._batch_size = 0
        self.matcher: HiddenStateMatcher | None = None
        if self.cfg.hidden_weight > 0:
            if teacher is None:
                raise ValueError("hidden-state matching (hidden_weight > 0) needs a teacher")
            self.matcher = HiddenStateMatcher(
                self.cfg.layer_map,
                student.backbone_config.d_model,
                teacher.backbone_config.d_model,
                self.cfg.normalize_hidden,
            )

    def configure_model(self) -> None:
        """Under the fsdp2 strategy: shard the student (as its own ``configure_model`` would)
        and the projections; the frozen teacher is unregistered and stays whole on every
        rank (it only runs forward)."""
        if self._device_mesh is None:
            return
        bf16 = self._trainer is not None and self.trainer.precision == "bf16-mixed"
        fully_shard_task(self.student, self._device_mesh, bf16_gather=bf16)
        if self.matcher is not None:
            from torch.distributed.fsdp import fully_shard

            dp = self._device_mesh
            dp = dp["data_parallel"] if "data_parallel" in (dp.mesh_dim_names or ()) else dp
            fully_shard(self.matcher, mesh=dp)

    # ------------------------------------------------------------------ teacher handling
    def set_teacher(self, teacher: TaskModule | None) -> None:
        """Freeze ``teacher`` and store it unregistered (not in state_dict / parameters)."""
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)

    def _teacher_to_device(self) -> None:
        teacher = self.teacher
        if teacher is None:
            return
        p = next(self.student.parameters())
        tp = next(teacher.parameters(), None)
        if tp is not None and tp.device != p.device:
            teacher.to(p.device)
        teacher.eval()  # in case anyone called .train() on it directly

    @property
    def backbone(self) -> nn.Module:
        """The student's backbone (engine callbacks such as ``ExpertBiasUpdate`` look here)."""
        return self.student.backbone

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Any) -> Any:
        return self.student(batch)

    def _encode(
        self, module: TaskModule, batch: Any, hidden: bool
    ) -> tuple[Any, Any, Tensor | None]:
        tokens_BTD, pad_BT = module.tokens(batch)
        self._batch_size = int(tokens_BTD.shape[0])
        out = module.backbone(
            tokens_BTD,
            padding_mask_BT=pad_BT,
            return_hidden=hidden or module.return_hidden,
            return_gates=module.return_gates,
        )
        return out, module.head_forward(out, batch), pad_BT

    def losses(self, batch: Any) -> dict[str, Tensor]:
        """All loss parts for one batch: ``loss`` (total), ``distill``, and ``task`` / ``hidden``."""
        cfg = self.cfg
        use_hidden = self.matcher is not None
        s_out, s_preds, pad_BT = self._encode(self.student, batch, use_hidden)
        stored = batch.get(cfg.soft_label_key) if isinstance(batch, Mapping) else None
        t_out = None
        if stored is None or use_hidden:
            if self.teacher is None:
                raise KeelInputError(
                    f"batch has no {cfg.soft_label_key!r} soft labels and no teacher was given"
                )
            self._teacher_to_device()
            with torch.no_grad():
                t_out, t_preds, _ = self._encode(self.teacher, batch, use_hidden)
        key = cfg.logits_key
        teacher_logits = (stored if stored is not None else _logits_of(t_preds, key)).detach()
        student_logits = _logits_of(s_preds, key)
        weight_B = batch.get(cfg.sample_weight_key) if isinstance(batch, Mapping) else None
        parts = {"distill": self._teacher_term(student_logits, teacher_logits, weight_B, batch)}
        total = cfg.alpha * parts["distill"]
        if cfg.alpha < 1.0:
            parts["task"] = self._task_loss(s_preds, batch)
            total = total + (1.0 - cfg.alpha) * parts["task"]
        if use_hidden:
            parts["hidden"] = self.matcher(s_out.hidden_states, t_out.hidden_states, pad_BT)
            total = total + cfg.hidden_weight * parts["hidden"]
        parts["loss"] = total
        self._student_preds = s_preds
        return parts

    def _teacher_term(
        self, student_logits: Tensor, teacher_logits: Tensor, weight_B: Tensor | None, batch: Any
    ) -> Tensor:
        """:func:`teacher_term` over every row, or (``teacher_rows="unlabelled"``) over the
        rows the batch's label mask marks 0 only; 0, with the graph kept, when none is."""
        cfg = self.cfg
        teacher_logits = teacher_logits.to(student_logits.device)
        if cfg.teacher_rows == "all":
            return teacher_term(student_logits, teacher_logits, cfg, weight_B)
        mask = batch.get(cfg.label_mask_key) if isinstance(batch, Mapping) else None
        B = int(student_logits.shape[0])
        rows_B = (
            torch.zeros(B, dtype=torch.bool, device=student_logits.device)
            if mask is None
            else ~self._labelled_rows(mask)
        )
        if not bool(rows_B.any()):
            return student_logits.float().sum() * 0.0
        sel = [select_rows(x, rows_B, B) for x in (student_logits, teacher_logits, weight_B)]
        return teacher_term(sel[0], sel[1], cfg, sel[2])

    def _labelled_rows(self, mask: Tensor) -> Tensor:
        """The label mask as ``[B]`` booleans, checked against the batch size."""
        labelled_B = mask.to(torch.bool).reshape(-1)
        if int(labelled_B.shape[0]) != self._batch_size:
            raise KeelInputError(
                f"{self.cfg.label_mask_key!r} must have one entry per row ({self._batch_size}),"
                f" got shape {tuple(mask.shape)}"
            )
        return labelled_B

    def _task_loss(self, s_preds: Any, batch: Any) -> Tensor:
        """The student's own loss, over the labelled rows only when the batch carries
        ``cfg.label_mask_key``: unlabelled rows hold placeholder labels that must never
        reach the loss. A batch without a labelled row contributes 0."""
        mask = batch.get(self.cfg.label_mask_key) if isinstance(batch, Mapping) else None
        if mask is None:
            return self.student.loss(s_preds, batch)
        labelled_B = self._labelled_rows(mask)
        B = int(labelled_B.shape[0])
        if bool(labelled_B.all()):
            return self.student.loss(s_preds, batch)
        if not bool(labelled_B.any()):
            return _logits_of(s_preds, self.cfg.logits_key).sum() * 0.0  # keeps the graph
        return self.student.loss(
            select_rows(s_preds, labelled_B, B), select_rows(batch, labelled_B, B)
        )

    # ------------------------------------------------------------------ steps
    def _log_parts(self, stage: str, parts: dict[str, Tensor], batch_size: int) -> None:
        training = stage == "train"
        kw = {
            "on_step": training,
            "on_epoch": True,
            "batch_size": batch_size,
            "sync_dist": not training,
        }
        self.log(f"{stage}/loss", parts["loss"], prog_bar=True, **kw)
        for name in ("distill", "task", "hidden"):
            if name in parts:
                self.log(f"{stage}/{name}_loss", parts[name], **kw)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        parts = self.losses(batch)
        self._student_preds = None  # do not keep the training graph alive
        bs = self._batch_size
        self._log_parts("train", parts, bs)
        TaskModule._log_moe_balance(self, "moe", bs, per_layer=False)
        return parts["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Loss parts under ``val/``, plus the student's own ``val_metrics`` (``val/<name>``),
        so callbacks that monitor an app metric work the same with and without a teacher."""
        parts = self.losses(batch)
        bs = self._batch_size
        self._log_parts("val", parts, bs)
        metrics = self.student.val_metrics(self._student_preds, batch)
        if metrics:
            self.log_dict(
                {f"val/{name}": value for name, value in metrics.items()},
                on_step=False,
                on_epoch=True,
                batch_size=bs,
                sync_dist=True,
            )
        return parts["loss"]

    def on_validation_epoch_start(self) -> None:
        self.student.on_validation_epoch_start()

    def on_validation_epoch_end(self) -> None:
        """Run the student's own epoch-end hook, where whole-block validation metrics that
        do not decompose over batches (fraud ``val/ap``) are computed and logged. Lightning
        calls hooks on this module only, so without this a student's best-epoch selection
        (``KeepBestWeights`` on ``val/ap``) would never see its metric. The student logs
        through the same trainer, under this hook's name."""
        student = self.student
        previous = student._current_fx_name
        student._current_fx_name = self._current_fx_name
        try:
            student.on_validation_epoch_end()
        finally:
            student._current_fx_name = previous

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self.student(batch)

    def configure_optimizers(self) -> dict[str, Any]:
        """The student's AdamW + warmup/cosine, over student and projection parameters."""
        return TaskModule.configure_optimizers(self)  # uses self.optim_config / self.trainer

    def on_train_start(self) -> None:
        self._teacher_to_device()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Defensive: no ``teacher.*`` key may reach a checkpoint even if someone registered it."""
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]


# ============================================================================ soft labels


@torch.no_grad()
def produce_soft_labels(
    teacher: TaskModule, dataloader: DataLoader, device: torch.device | str | None = None
) -> Tensor:
    """Teacher logits for every row of ``dataloader``, in order, on CPU (float32).

    The loader must not shuffle: row ``i`` of the result belongs to dataset item ``i``, which
    is how :class:`SoftLabelDataset` pairs them. The teacher runs in eval mode (dropout off)
    and is put back in its previous mode afterwards.
    """
    if isinstance(getattr(dataloader, "sampler", None), RandomSampler):
        raise ValueError(
            "produce_soft_labels needs a loader with shuffle=False: soft label i must belong to"
            " dataset item i"
        )
    was_training = teacher.training
    teacher.eval()
    if device is not None:
        teacher.to(device)
    dev = next(teacher.parameters()).device
    outs = []
    try:
        for batch in dataloader:
            batch = lightning.pytorch.utilities.move_data_to_device(batch, dev)
            outs.append(_logits_of(teacher(batch)).detach().float().cpu())
    finally:
        teacher.train(was_training)
    if not outs:
        raise ValueError("produce_soft_labels: the dataloader yielded no batches")
    return torch.cat(outs, dim=0)


class SoftLabelDataset(Dataset):
    """Serves ``dict(base[i]) | {key: soft_labels[i]}``: inputs with stored teacher logits.

    ``base`` items must be mappings (dict batches, as Keel's task modules use). Hard labels
    are optional: with ``DistillConfig.alpha == 1`` the student's task loss is never called.
    """

    def __init__(self, base: Dataset, soft_labels: Tensor, key: str = "soft_labels") -> None:
        n = len(base)  # type: ignore[arg-type]
        if soft_labels.shape[0] != n:
            raise KeelInputError(
                f"soft_labels has {soft_labels.shape[0]} rows but the dataset has {n} items"
            )
        self.base, self.soft_labels, self.key = base, soft_labels, key

    def __len__(self) -> int:
        return self.soft_labels.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        if not isinstance(item, Mapping):
            raise KeelInputError(
                f"SoftLabelDataset needs mapping items; item {i} is {type(item).__name__}"
            )
        if self.key in item:
            raise KeelInputError(f"dataset item {i} already has a {self.key!r} key")
        return {**item, self.key: self.soft_labels[i]}


# ============================================================================ one call


def distill_fit(
    student: TaskModule,
    teacher: TaskModule | None,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    trainer_cfg: TrainerConfig,
    cfg: DistillConfig | Mapping[str, Any] | None = None,
    logger: Any = False,
    extra_callbacks: Iterable[lightning.pytorch.Callback] = (),
) -> TaskModule:
    """Train ``student`` against ``teacher`` with the app's own loaders and ``TrainerConfig``.

    What every app's ``distillation.py`` needs in one call: a :class:`DistillationModule`
    through :func:`core.engine.build_trainer` (so the config's precision, growth schedule,
    early stopping on ``val/loss`` etc. apply), then the trained student on CPU in eval
    mode, ready for the app's predictor. The teacher is not modified (frozen, eval mode)
    and is moved back to CPU afterwards.
    """
    module = DistillationModule(student, teacher, cfg)
    trainer = build_trainer(trainer_cfg, extra_callbacks=extra_callbacks, logger=logger)
    try:
        trainer.fit(module, train_loader, val_loader)
    finally:
        if teacher is not None:
            teacher.cpu()
    return single_device_copy(module.student).float().cpu().eval()


def count_active_params(module: nn.Module) -> int:
    """Active parameters of a task module: all its parameters less the routed experts each
    token skips, in every :class:`core.backbone.Backbone` it holds. A module with several
    backbones that all run on every input (a seed ensemble, teacher + student) therefore
    counts the sum of their active parameters."""
    from core.backbone import Backbone

    total = sum(p.numel() for p in module.parameters())
    for m in module.modules():
        if isinstance(m, Backbone):
            total -= m.count_params() - m.count_active_params()
    return total


__all__ = [
    "DistillConfig",
    "DistillationModule",
    "HiddenStateMatcher",
    "SoftLabelDataset",
    "binary_distillation_loss",
    "count_active_params",
    "distill_fit",
    "distillation_loss",
    "produce_soft_labels",
    "regression_distillation_loss",
    "soft_kl",
    "teacher_term",
    "weighted_row_mean",
]
