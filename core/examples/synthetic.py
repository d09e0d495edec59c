"""A synthetic tabular classification task that exercises the whole core stack.

Features: 6 numeric and 2 categorical columns. The label depends on feature
*interactions* (``x0 * x1``, ``sin(2 x2)``, a categorical offset) that a linear model
cannot express, so a backbone that learns them shows it in ROC-AUC. Used by ``make demo``
before any app is trained, and by the core tracking / registry tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from core.adapters import FeatureTokenizer
from core.backbone import BackboneOutput
from core.config import AttentionConfig, BackboneConfig, MoEConfig
from core.configio import YamlConfig
from core.engine import OptimConfig, TaskModule, TrainerConfig, build_trainer
from core.spec import AppSpec, EvalResult, TrainResult

NUMERIC = [f"x{i}" for i in range(6)]
CATEGORICAL = {"c0": 5, "c1": 7}
COLUMNS = NUMERIC + list(CATEGORICAL)


def make_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(NUMERIC)))
    c0 = rng.integers(0, CATEGORICAL["c0"], n)
    c1 = rng.integers(0, CATEGORICAL["c1"], n)
    offset = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])[c0]
    logit = 2.0 * x[:, 0] * x[:, 1] + 1.5 * np.sin(2 * x[:, 2]) + offset + 0.5 * x[:, 3] ** 2 - 0.5
    y = (logit + rng.normal(scale=0.5, size=n) > 0).astype(np.int64)
    frame = pd.DataFrame(x, columns=NUMERIC)
    frame["c0"], frame["c1"], frame["label"] = c0, c1, y
    return frame


@dataclass
class SyntheticConfig(YamlConfig):
    n_train: int = 6000
    n_val: int = 1000
    n_test: int = 2000
    seed: int = 0
    batch_size: int = 128
    backbone: BackboneConfig = field(
        default_factory=lambda: BackboneConfig(
            d_model=32,
            n_layers=2,
            ffn_hidden=64,
            attention=AttentionConfig(n_heads=4, gated=True, top_k=None),
            moe=MoEConfig(n_routed_experts=4, top_k=2, n_shared_experts=1, expert_hidden=32),
        )
    )
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=20))
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(max_epochs=4, precision="32")
    )


class SyntheticClassifier(TaskModule):
    """FeatureTokenizer -> Backbone -> CLS token -> linear logit; BCE loss."""

    def __init__(self, backbone: dict[str, Any], optim: dict[str, Any]):
        super().__init__(backbone, optim)
        d = self.backbone_config.d_model
        self.tokenizer = FeatureTokenizer(
            len(NUMERIC), list(CATEGORICAL.values()), d, cls_token=True
        )
        self.head = nn.Linear(d, 1)

    def tokens(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, None]:
        return self.tokenizer(batch["x_num"], batch["x_cat"]), None

    def head_forward(self, out: BackboneOutput, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(out.last_hidden[:, 0]).squeeze(-1)

    def loss(self, preds: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(preds.float(), batch["y"].float())


def _tensors(frame: pd.DataFrame) -> dict[str, torch.Tensor]:
    return {
        "x_num": torch.tensor(frame[NUMERIC].to_numpy(np.float32)),
        "x_cat": torch.tensor(frame[list(CATEGORICAL)].to_numpy(np.int64)),
    }


class _DictDataset(torch.utils.data.Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.n = len(next(iter(tensors.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class SyntheticDataModule(L.LightningDataModule):
    def __init__(self, cfg: SyntheticConfig):
        super().__init__()
        self.cfg = cfg
        self.train_df = make_frame(cfg.n_train, cfg.seed)
        self.val_df = make_frame(cfg.n_val, cfg.seed + 1)
        self.test_df = make_frame(cfg.n_test, cfg.seed + 2)

    def _loader(self, frame: pd.DataFrame, shuffle: bool) -> DataLoader:
        t = _tensors(frame)
        t["y"] = torch.tensor(frame["label"].to_numpy())
        return DataLoader(_DictDataset(t), batch_size=self.cfg.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_df, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_df, False)


class SyntheticPredictor:
    """Frame in, probabilities out; rows with missing or out-of-range values are rejected."""

    input_columns = COLUMNS

    def __init__(self, model: SyntheticClassifier):
        self.model = model.eval()

    def save(self, path: Path) -> None:
        (path / "config.json").write_text(
            json.dumps(
                {
                    "backbone": self.model.backbone_config.to_dict(),
                    "optim": self.model.optim_config.to_dict(),
                }
            )
        )
        torch.save(self.model.state_dict(), path / "weights.pt")

    @classmethod
    def load(cls, path: Path) -> SyntheticPredictor:
        cfg = json.loads((path / "config.json").read_text())
        model = SyntheticClassifier(cfg["backbone"], cfg["optim"])
        model.load_state_dict(
            torch.load(path / "weights.pt", weights_only=True, map_location="cpu")
        )
        return cls(model)

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        missing = [c for c in COLUMNS if c not in frame]
        if missing:
            raise ValueError(f"input lacks columns {missing}; expected {COLUMNS}")
        reasons = pd.Series([None] * len(frame), index=frame.index, dtype=object)
        num = frame[NUMERIC].apply(pd.to_numeric, errors="coerce")
        for col in NUMERIC:
            reasons[num[col].isna() & reasons.isna()] = f"{col}: missing or non-numeric"
        for col, card in CATEGORICAL.items():
            codes = pd.to_numeric(frame[col], errors="coerce")
            bad = (codes.isna() | (codes < 0) | (codes >= card)) & reasons.isna()
            reasons[bad] = f"{col}: expected an integer code in [0, {card})"
        ok = reasons.isna().to_numpy()
        prob = np.full(len(frame), np.nan)
        if ok.any():
            good = frame[ok]
            t = {
                "x_num": torch.tensor(num[ok].to_numpy(np.float32)),
                "x_cat": torch.tensor(good[list(CATEGORICAL)].astype("int64").to_numpy()),
            }
            with torch.no_grad():
                prob[ok] = torch.sigmoid(self.model(t)).numpy()
        return pd.DataFrame(
            {"probability": prob, "reject_reason": reasons.to_numpy()}, index=frame.index
        )


def _evaluate_frame(predictor: SyntheticPredictor, frame: pd.DataFrame) -> EvalResult:
    from sklearn.metrics import accuracy_score, roc_auc_score

    p = predictor.predict(frame[COLUMNS])["probability"].to_numpy()
    y = frame["label"].to_numpy()
    return EvalResult(
        metrics={
            "roc_auc": float(roc_auc_score(y, p)),
            "accuracy": float(accuracy_score(y, p > 0.5)),
        },
        protocol="synthetic task: held-out test sample (seed+2) drawn from the training distribution",
    )


def train(cfg: SyntheticConfig, run: Any = None) -> TrainResult:
    from core.tracking import fingerprint_frame, lightning_logger

    dm = SyntheticDataModule(cfg)
    logger = lightning_logger(run)
    # the trainer seeds (``cfg.trainer.seed``): build it before the model, so the initial
    # weights, and the demo's figures, are the same in every process
    trainer = build_trainer(cfg.trainer, logger=logger)
    model = SyntheticClassifier(cfg.backbone.to_dict(), cfg.optim.to_dict())
    trainer.fit(model, datamodule=dm)
    predictor = SyntheticPredictor(model.cpu())
    return TrainResult(
        predictor=predictor,
        evaluation=_evaluate_frame(predictor, dm.test_df),
        input_example=dm.test_df[COLUMNS].head(5),
        data_fingerprint=fingerprint_frame(dm.train_df),
    )


def evaluate(predictor: SyntheticPredictor, cfg: SyntheticConfig) -> EvalResult:
    return _evaluate_frame(predictor, make_frame(cfg.n_test, cfg.seed + 2))


SPEC = AppSpec(
    name="synthetic",
    description="synthetic tabular classification exercising the whole core stack",
    config_cls=SyntheticConfig,
    train=train,
    evaluate=evaluate,
    predictor_cls=SyntheticPredictor,
    primary_metric="roc_auc",
    guard_metrics={"accuracy": ("max", 0.02)},
    demo_config=SyntheticConfig,
)


def demo_score_input(out_dir: Path, cfg: SyntheticConfig) -> Path:
    """A file to batch-score in the demo, with two deliberately bad rows."""
    frame = make_frame(500, cfg.seed + 3)[COLUMNS]
    frame.loc[3, "x0"] = np.nan
    frame.loc[7, "c1"] = 99
    path = out_dir / "synthetic_input.parquet"
    frame.to_parquet(path, index=False)
    return path
