"""Configuration of the fraud app: one YAML-round-tripping dataclass per concern.

``FraudConfig`` names the dataset (a shipped schema or a schema YAML, plus the data
path), the evaluation protocol (handbook train/delay/test blocks or the ULB time-fraction
split), the features, the backbone, the head (history length, imbalance handling,
calibration), the optimizer and trainer, the alert-threshold policy and the LightGBM
baseline. Ship files live in ``apps/fraud/configs/`` (``demo.yaml``, ``ulb.yaml``,
``ulb_ema.yaml``, ``handbook.yaml``) and load with :func:`load_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from apps.fraud.errors import FraudConfigError
from apps.fraud.features import FeatureConfig
from core.config import BackboneConfig
from core.config import small_backbone as core_small_backbone
from core.configio import YamlConfig
from core.engine import TrainerConfig
from core.optim import OptimConfig

PROTOCOLS = ("handbook", "time_fraction")
THRESHOLD_RULES = ("alert_budget", "cost")
CALIBRATIONS = ("platt", "isotonic", "none")
LOSSES = ("bce", "focal")
WEIGHT_AVERAGES = (None, "ema", "uniform")


@dataclass
class ProtocolConfig:
    """How rows are split (see ``apps.fraud.splits``).

    ``handbook``: train ``[train_start, +train_days)`` whose last ``valid_days`` validate,
    then ``delay_days`` (labels unknown: unused), then ``test_days``; known-compromised
    cards are removed from test days. ``time_fraction`` (ULB): the first ``train_frac`` of
    the time range trains (its last ``valid_frac`` validates), the rest up to
    ``test_end_frac`` of the range tests (1.0: to the end; prequential folds assess earlier
    slices, see ``apps.fraud.selection``).
    ``card_precision_k``: the k of Card Precision@k per day (100 on the handbook set).
    """

    kind: str = "handbook"
    train_start: str | int = 0
    train_days: int = 7
    valid_days: int = 2
    delay_days: int = 7
    test_days: int = 7
    train_frac: float = 0.7
    valid_frac: float = 0.2
    test_end_frac: float = 1.0
    card_precision_k: int = 100

    def __post_init__(self) -> None:
        if self.kind not in PROTOCOLS:
            raise FraudConfigError(f"protocol.kind must be one of {PROTOCOLS}, got {self.kind!r}")


@dataclass
class HeadConfig:
    """Everything of the fraud model outside the shared backbone.

    ``history_len``: earlier transactions of the same card fed as extra tokens (0 = off;
    ignored for schemas without a card column). ``pos_weight``: BCE weight of frauds;
    ``"sqrt"`` = sqrt(n_legit / n_fraud) of the (sub-sampled) training rows, a float, or
    ``None``. ``neg_sample_rate``: keep this share of legitimate training rows (all frauds
    kept); calibration on the full validation block restores true probabilities.
    ``neg_resample``: draw that share afresh every epoch (epoch 0 keeps the seeded draw;
    later epochs take as many legitimate rows, without replacement, from all of them), so
    the model sees most legitimate rows over its epochs at an unchanged class ratio, steps
    per epoch and ``pos_weight`` (``model.ResampledBatchLoader``; needs a rate below 1).
    ``calibration``: ``platt`` (logistic on the logit; monotone, keeps the ranking and so
    PR-AUC), ``isotonic`` (may tie scores) or ``none``. ``n_reasons``: features listed per alert.
    ``numeric_encoding``: ``linear`` tokens, ``periodic`` (+ learned sin/cos embeddings,
    ``n_frequencies`` per feature, init scale ``frequency_scale``; see ``model.PeriodicNumeric``)
    or ``piecewise`` (+ piecewise-linear codes over ``n_bins`` bins of the training rows;
    ``bin_edges``: ``quantile`` or ``tree``, the splits of a per-feature decision tree on the
    training labels; ``bin_steps``: also a 0/1 "at or above the bin's upper edge" code per
    bin, so a threshold rule is one input; see ``model.PiecewiseLinearNumeric``).
    ``wide``: also a logistic term straight on those codes, added to the logit (wide and
    deep; ``model.WideLogit``; needs ``piecewise``).
    ``row_mlp``: hidden sizes of a row path (``model.RowMLP``): an MLP over the whole row
    of scaled numeric features whose logit is added to the CLS logit (``None`` = off).
    ``select_best``: keep the weights of the epoch with the best validation average
    precision (``"val/ap"``) instead of the last epoch's; ``None`` keeps the last.
    ``weight_average``: one model with averaged weights (``core.callbacks.AveragedWeights``):
    ``"ema"`` (decay ``ema_decay`` per optimizer step) or ``"uniform"`` (mean of every
    step's weights), from epoch ``average_start_epoch`` on; validation, best-epoch
    selection and the final model use the averaged weights. ``None`` = off.
    """

    history_len: int = 8
    loss: str = "bce"
    pos_weight: float | str | None = "sqrt"
    focal_gamma: float = 2.0
    neg_sample_rate: float = 1.0
    neg_resample: bool = False
    calibration: str = "platt"
    batch_size: int = 256
    dropout: float = 0.1
    n_reasons: int = 3
    numeric_encoding: str = "linear"
    n_frequencies: int = 16
    frequency_scale: float = 0.5
    n_bins: int = 16
    bin_edges: str = "quantile"
    bin_steps: bool = False
    wide: bool = False
    row_mlp: list[int] | None = None
    select_best: str | None = None
    weight_average: str | None = None
    ema_decay: float = 0.998
    average_start_epoch: int = 0

    def __post_init__(self) -> None:
        if self.weight_average not in WEIGHT_AVERAGES:
            raise FraudConfigError(
                f"head.weight_average must be one of {WEIGHT_AVERAGES}, got {self.weight_average!r}"
            )
        if not 0 < self.ema_decay < 1:
            raise FraudConfigError(f"head.ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.average_start_epoch < 0:
            raise FraudConfigError(
                f"head.average_start_epoch must be >= 0, got {self.average_start_epoch}"
            )
        if self.numeric_encoding not in ("linear", "periodic", "piecewise"):
            raise FraudConfigError(
                "head.numeric_encoding must be 'linear', 'periodic' or 'piecewise', "
                f"got {self.numeric_encoding!r}"
            )
        if self.wide and self.numeric_encoding != "piecewise":
            raise FraudConfigError(
                "head.wide reads the piecewise codes: it needs head.numeric_encoding 'piecewise', "
                f"got {self.numeric_encoding!r}"
            )
        if self.n_bins < 2:
            raise FraudConfigError(f"head.n_bins must be >= 2, got {self.n_bins}")
        if self.bin_edges not in ("quantile", "tree"):
            raise FraudConfigError(
                f"head.bin_edges must be 'quantile' or 'tree', got {self.bin_edges!r}"
            )
        if self.row_mlp is not None and (
            not self.row_mlp or any(not isinstance(h, int) or h < 1 for h in self.row_mlp)
        ):
            raise FraudConfigError(
                f"head.row_mlp must be null or a list of hidden sizes >= 1, got {self.row_mlp!r}"
            )
        if self.select_best not in (None, "val/ap"):
            raise FraudConfigError(
                f"head.select_best must be null or 'val/ap', got {self.select_best!r}"
            )
        if self.history_len < 0:
            raise FraudConfigError(f"head.history_len must be >= 0, got {self.history_len}")
        if self.loss not in LOSSES:
            raise FraudConfigError(f"head.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.calibration not in CALIBRATIONS:
            raise FraudConfigError(
                f"head.calibration must be one of {CALIBRATIONS}, got {self.calibration!r}"
            )
        if isinstance(self.pos_weight, str) and self.pos_weight != "sqrt":
            raise FraudConfigError(
                f"head.pos_weight must be 'sqrt', a number or null, got {self.pos_weight!r}"
            )
        if not 0 < self.neg_sample_rate <= 1:
            raise FraudConfigError(
                f"head.neg_sample_rate must be in (0, 1], got {self.neg_sample_rate}"
            )
        if self.neg_resample and self.neg_sample_rate == 1:
            raise FraudConfigError(
                "head.neg_resample draws a new share of legitimate rows each epoch: it needs "
                "head.neg_sample_rate below 1, got 1 (every row is already kept)"
            )


@dataclass
class ThresholdConfig:
    """Operating point, chosen on the validation block only (``apps.fraud.thresholds``).

    ``alert_budget``: the lowest threshold whose mean alerts per validation day fit
    ``alerts_per_day``; ``cost``: minimise missed fraud amount + ``alert_cost`` per alert.
    """

    rule: str = "alert_budget"
    alerts_per_day: float = 100.0
    alert_cost: float = 5.0

    def __post_init__(self) -> None:
        if self.rule not in THRESHOLD_RULES:
            raise FraudConfigError(
                f"threshold.rule must be one of {THRESHOLD_RULES}, got {self.rule!r}"
            )


@dataclass
class BaselineConfig:
    """LightGBM baseline (``apps.fraud.baseline.LightGBMBaseline``) on the same features.

    ``imbalance``: ``none`` by default: LightGBM's defaults with early stopping on
    validation average precision. ``scale_pos_weight = n_legit / n_fraud`` (~580 on ULB)
    over-weights a few hundred frauds, over-fits them and measured AP 0.68 vs 0.77 on the
    ULB time split (issue #3 diagnosis); weighting changes calibration, not the ranking
    that AP and Card Precision measure.
    """

    enabled: bool = True
    n_estimators: int = 1000
    learning_rate: float = 0.05
    num_leaves: int = 31
    early_stopping_rounds: int = 100
    imbalance: str = "none"
    subsample: float = 1.0
    colsample_bytree: float = 1.0
    n_jobs: int = 1


STUDENT_KINDS = ("backbone", "mlp")


@dataclass
class StudentConfig:
    """What ``keel fraud distill`` (``apps.fraud.distillation.distill``) trains when this
    config is the student's. ``backbone``: this config's backbone, distilled through core's
    Lightning loop. ``mlp``: the CPU scorer of ``apps/fraud/fastscore.py``, an MLP of
    ``hidden`` widths over the teacher's scaled numeric features (categorical tokens and the
    card's history sequence are not read), fitted to the teacher's logits on every row of
    the training block (``epochs``, ``batch_size``, ``lr``); it scores orders of magnitude
    faster than the backbone on a CPU (BENCHMARKS.md, issue #3)."""

    kind: str = "backbone"
    hidden: tuple[int, ...] = (64, 32)
    epochs: int = 6
    batch_size: int = 1024
    lr: float = 2e-3

    def __post_init__(self) -> None:
        if self.kind not in STUDENT_KINDS:
            raise FraudConfigError(f"student.kind={self.kind!r}: expected one of {STUDENT_KINDS}")
        self.hidden = tuple(int(h) for h in self.hidden)
        if not self.hidden or min(self.hidden) < 1:
            raise FraudConfigError(f"student.hidden={self.hidden}: expected widths >= 1")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise FraudConfigError(
                f"student: epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr};"
                " expected epochs >= 1, batch_size >= 1, lr > 0"
            )


def _small_backbone() -> BackboneConfig:
    return core_small_backbone(dropout=0.1)


@dataclass
class FraudConfig(YamlConfig):
    """One fraud training run. ``data_path=None`` reads the schema's ``default_path``;
    ``history_path`` (optional) is prepended to files scored by the predictor so that
    per-card history features see the days before the file (see ``predictor.py``).

    ``refit_on_validation``: after choosing the backbone's epoch count (best validation
    AP), LightGBM's tree count (early stopping), calibration and threshold on the
    validation block, retrain both models from scratch on training + validation rows
    for exactly those counts and score the test block with them (calibration and
    threshold stay the validation-fitted ones; ``training.refit_backbone``). On a
    time-ordered split the validation block is the data just before the test block, the
    freshest fraud patterns. Off by default; it roughly doubles training time. The kept
    threshold may not fit the retrained model's scores: on ULB's prequential folds it turned
    a budget of 100 alerts a day into 706 and 2,938 (BENCHMARKS.md, session 27), so check
    alerts per day before acting on a refit model's decisions.

    ``ensemble_size``: train that many backbones, member ``k`` from seed
    ``core.engine.member_seed(seed, k)`` (its own initialisation, batch order and draw of
    legitimate rows; member 0 is the single-model run), each keeping its own best epoch, and
    score with the mean of their logits (``model.FraudEnsemble``), calibrated and
    thresholded on the validation block as one model. It multiplies training and backbone
    scoring time by ``ensemble_size``; a distilled MLP student costs the same as before."""

    schema: str = "synthetic"
    data_path: str | None = None
    history_path: str | None = None
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: BackboneConfig = field(default_factory=_small_backbone)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-3, warmup_steps=30, weight_decay=0.01)
    )
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig.quiet(4, monitor="val/loss", log_every_n_steps=20)
    )
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    refit_on_validation: bool = False
    ensemble_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.ensemble_size, bool) or not isinstance(self.ensemble_size, int):
            raise FraudConfigError(f"ensemble_size={self.ensemble_size!r}: expected an integer")
        if self.ensemble_size < 1:
            raise FraudConfigError(f"ensemble_size={self.ensemble_size}: expected >= 1")
        if self.ensemble_size > 1 and self.refit_on_validation:
            raise FraudConfigError(
                "ensemble_size > 1 with refit_on_validation: the refit retrains one backbone;"
                " use one of the two"
            )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["model"] = self.model.to_dict()
        data["optim"] = self.optim.to_dict()
        data["trainer"] = self.trainer.to_dict()
        return _plain_tuples(data)


def _plain_tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain_tuples(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_tuples(v) for v in value]
    return value


def config_path(name: str) -> Path:
    """Path of a shipped config (``demo``, ``ulb``, ``handbook``)."""
    res = resources.files("apps.fraud").joinpath("configs", f"{name}.yaml")
    return Path(str(res))


def load_config(name_or_path: str | Path) -> FraudConfig:
    """A shipped config by name or a YAML path; unknown keys raise naming the file."""
    text = str(name_or_path)
    path = Path(text) if text.endswith((".yaml", ".yml")) else config_path(text)
    if not path.exists():
        raise FraudConfigError(f"fraud config {path} not found")
    try:
        return FraudConfig.from_yaml(path)
    except FraudConfigError as err:
        raise FraudConfigError(f"{path}: {err}") from None
    except (TypeError, ValueError) as err:
        raise FraudConfigError(f"{path}: {err}") from None


def demo_config() -> FraudConfig:
    return load_config("demo")
