"""The fraud model: feature tokens + card-history tokens -> core Backbone -> CLS -> logit.

Tokens of one transaction (``T = 1 + N + C + H``):

* ``[CLS, num_1..num_N, cat_1..cat_C]`` from ``core.adapters.FeatureTokenizer`` over the
  causal features of ``apps.fraud.features`` (scaled by ``apps.fraud.inputs``);
* ``H`` history tokens: the card's most recent earlier transactions, each a linear map of
  its history features plus a learned lag embedding; missing lags are padding (the
  backbone's ``padding_mask_BT``), so a card's first transaction attends to features only.

Imbalance: BCE with ``pos_weight`` (default sqrt(n_legit / n_fraud) on the training rows:
the full ratio over-weights ~100 frauds per batch-worth of data and makes training noisy;
the square root is the usual compromise) or focal loss (``gamma``). Probabilities are
calibrated afterwards on the validation block (``apps.fraud.calibration``).

Explanations (:meth:`FraudModel.attributions`): gradient x (token - baseline token) on the
feature tokens, where the baseline is the tokenizer's content-free position embedding
(a numeric feature at value 0, i.e. at its training mean after scaling; a categorical at
"unknown"). It is one backward pass, and for the first-order (linear) part of the model
it is exact: the contributions sum to the logit difference from the baseline row.
History tokens are summed into one ``card_history`` contribution (baseline: no token).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from core.adapters import FeatureTokenizer
from core.backbone import BackboneOutput
from core.config import BackboneConfig
from core.engine import TaskModule
from core.optim import OptimConfig


class FraudModel(TaskModule):
    """See the module docstring. ``pos_weight`` is a float (1.0 = unweighted)."""

    def __init__(
        self,
        backbone_config: BackboneConfig | Mapping[str, Any],
        optim_config: OptimConfig | Mapping[str, Any] | None = None,
        n_numeric: int = 1,
        cat_cardinalities: Sequence[int] = (),
        n_hist_features: int = 0,
        history_len: int = 0,
        loss: str = "bce",
        pos_weight: float = 1.0,
        focal_gamma: float = 2.0,
        head_dropout: float = 0.1,
        numeric_encoding: str = "linear",
        n_frequencies: int = 16,
        frequency_scale: float = 0.5,
    ) -> None:
        if numeric_encoding not in NUMERIC_ENCODINGS:
            raise ValueError(
                f"numeric_encoding must be one of {NUMERIC_ENCODINGS}, got {numeric_encoding!r}"
            )
        super().__init__(
            backbone_config,
            optim_config,
            n_numeric=n_numeric,
            cat_cardinalities=list(cat_cardinalities),
            n_hist_features=n_hist_features,
            history_len=history_len,
            loss=loss,
            pos_weight=pos_weight,
            focal_gamma=focal_gamma,
            head_dropout=head_dropout,
            numeric_encoding=numeric_encoding,
            n_frequencies=n_frequencies,
            frequency_scale=frequency_scale,
        )
        d = self.backbone_config.d_model
        self.tokenizer = FeatureTokenizer(n_numeric, list(cat_cardinalities), d, cls_token=True)
        self.periodic = (
            PeriodicNumeric(n_numeric, d, n_frequencies, frequency_scale)
            if numeric_encoding == "periodic" and n_numeric
            else None
        )
        self.history_len = history_len if n_hist_features else 0
        if self.history_len:
            self.hist_proj = nn.Linear(n_hist_features, d)
            self.hist_lag = LagEmbedding(history_len, d)
            self.register_load_state_dict_pre_hook(_rename_pre_lag_embedding_key)
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(d, 1))
        self.loss_kind = loss
        self.pos_weight = float(pos_weight)
        self.focal_gamma = float(focal_gamma)

    # ------------------------------------------------------------------ tokens
    def feature_tokens(self, batch: Mapping[str, Tensor]) -> Tensor:
        x_cat = batch["x_cat"] if self.tokenizer.cat_cardinalities else None
        tok_BTD = self.tokenizer(batch["x_num"], x_cat)
        if self.periodic is None:
            return tok_BTD
        n = self.tokenizer.n_numeric
        per_BND = self.periodic(batch["x_num"])
        return torch.cat([tok_BTD[:, :1], tok_BTD[:, 1 : 1 + n] + per_BND, tok_BTD[:, 1 + n :]], 1)

    def history_tokens(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor] | None:
        if not self.history_len:
            return None
        hist_BHF = batch["hist"][:, : self.history_len]
        pad_BH = batch["hist_pad"][:, : self.history_len].bool()
        tok_BHD = self.hist_proj(hist_BHF) + self.hist_lag()
        return tok_BHD.masked_fill(pad_BH.unsqueeze(-1), 0.0), pad_BH

    def tokens(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        feat_BTD = self.feature_tokens(batch)
        hist = self.history_tokens(batch)
        if hist is None:
            return feat_BTD, None
        tok_BHD, pad_BH = hist
        pad_BT = torch.zeros(feat_BTD.shape[:2], dtype=torch.bool, device=feat_BTD.device)
        return torch.cat([feat_BTD, tok_BHD], dim=1), torch.cat([pad_BT, pad_BH], dim=1)

    def head_forward(self, out: BackboneOutput, batch: Any) -> Tensor:
        return self.head(out.last_hidden[:, 0]).squeeze(-1)

    def logits_from_tokens(self, tokens_BTD: Tensor, pad_BT: Tensor | None) -> Tensor:
        out = self.backbone(tokens_BTD, padding_mask_BT=pad_BT)
        return self.head(out.last_hidden[:, 0]).squeeze(-1)

    # ------------------------------------------------------------------ loss
    def loss(self, preds: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        y = batch["y"].float()
        logits = preds.float()
        pw = torch.tensor(self.pos_weight, device=logits.device)
        if self.loss_kind == "bce":
            return nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=pw)
        # focal loss (Lin et al. 2017) with the class weight as alpha
        bce = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
        p_t = torch.exp(-bce)
        w = torch.where(y > 0, pw, torch.ones_like(pw))
        return (w * (1 - p_t) ** self.focal_gamma * bce).mean()

    # ------------------------------------------------------------------ validation AP
    def on_validation_epoch_start(self) -> None:
        self._val_logits: list[Tensor] = []
        self._val_y: list[Tensor] = []

    def val_metrics(self, preds: Tensor, batch: Mapping[str, Tensor]) -> None:
        """Collect validation logits: average precision is a whole-block metric (a mean of
        per-batch APs is not AP), computed in :meth:`on_validation_epoch_end`."""
        if hasattr(self, "_val_logits"):
            self._val_logits.append(preds.detach().float().cpu())
            self._val_y.append(batch["y"].detach().cpu())
        return None

    def on_validation_epoch_end(self) -> None:
        """Log ``val/ap`` (average precision over the whole validation block), the metric
        early stopping / best-epoch selection should follow: validation loss rewards
        calibration of the many legitimate rows, not the ranking of the few frauds."""
        if not getattr(self, "_val_logits", None):
            return
        s = torch.cat(self._val_logits).numpy()
        y = torch.cat(self._val_y).numpy()
        self._val_logits, self._val_y = [], []
        if 0 < y.sum() < len(y):
            self.log("val/ap", float(average_precision_np(y, s)), prog_bar=True)

    # ------------------------------------------------------------------ explanations
    def attributions(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(logit_B, contrib_BK)``: K = N + C feature tokens (+1 for card history)."""
        with torch.enable_grad():
            feat_BTD = self.feature_tokens(batch).detach().requires_grad_(True)
            hist = self.history_tokens(batch)
            if hist is None:
                tokens, pad = feat_BTD, None
                tok_BHD = None
            else:
                tok_BHD = hist[0].detach().requires_grad_(True)
                pad_H = hist[1]
                zeros = torch.zeros(feat_BTD.shape[:2], dtype=torch.bool, device=feat_BTD.device)
                tokens, pad = torch.cat([feat_BTD, tok_BHD], 1), torch.cat([zeros, pad_H], 1)
            logit_B = self.logits_from_tokens(tokens, pad)
            grads = torch.autograd.grad(logit_B.sum(), [feat_BTD] + ([tok_BHD] if hist else []))
        base_TD = self.tokenizer.position_embeddings().detach()
        contrib = ((feat_BTD - base_TD) * grads[0]).sum(-1)[:, 1:]  # drop CLS
        if hist is not None:
            contrib = torch.cat([contrib, (tok_BHD * grads[1]).sum((1, 2)).unsqueeze(1)], 1)
        return logit_B.detach(), contrib.detach()


NUMERIC_ENCODINGS = ("linear", "periodic")


def average_precision_np(y: np.ndarray, s: np.ndarray) -> float:
    """Average precision (sklearn's definition, ties grouped) without a polars import."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tps = np.cumsum(y_sorted)[last]
    precision = tps / (last + 1)
    return float(np.sum(np.diff(np.r_[0.0, tps]) / tps[-1] * precision))


def _rename_pre_lag_embedding_key(
    module: nn.Module, state_dict: dict, prefix: str, *_: Any
) -> None:
    """State dicts saved before :class:`LagEmbedding` name its parameter ``hist_lag_HD``."""
    old = f"{prefix}hist_lag_HD"
    if old in state_dict:
        state_dict[f"{prefix}hist_lag.lag_HD"] = state_dict.pop(old)


class LagEmbedding(nn.Module):
    """A learned vector per position in the card's history (0 = most recent).

    A module of its own, not a bare parameter of the model, because FSDP2 shards
    submodules (``core.engine.fully_shard_task``). Its parameter was the model's
    ``hist_lag_HD`` before; state dicts saved under that name still load.
    """

    def __init__(self, history_len: int, d_model: int) -> None:
        super().__init__()
        self.lag_HD = nn.Parameter(torch.randn(history_len, d_model) * d_model**-0.5)

    def forward(self) -> Tensor:
        return self.lag_HD


class PeriodicNumeric(nn.Module):
    """Periodic numeric embeddings ("PLR", Gorishniy et al., NeurIPS 2022): feature j is
    ``relu(W_j [sin(2 pi c_j x), cos(2 pi c_j x)] + b_j)`` with K learned frequencies
    ``c_j`` per feature. A single linear token ``x W_j`` can only scale one direction;
    fraud on PCA features lives in narrow value ranges (tails), which periodic features
    resolve; they are what lets MLPs / transformers match boosted trees on tabular data.
    Added to the tokenizer's linear tokens, so ``linear`` stays a special case.
    """

    def __init__(self, n_features: int, d_model: int, n_frequencies: int, sigma: float) -> None:
        super().__init__()
        self.freq_NK = nn.Parameter(torch.randn(n_features, n_frequencies) * sigma)
        self.weight_NKD = nn.Parameter(
            torch.randn(n_features, 2 * n_frequencies, d_model) * (2 * n_frequencies) ** -0.5
        )
        self.bias_ND = nn.Parameter(torch.zeros(n_features, d_model))

    def forward(self, x_BN: Tensor) -> Tensor:
        x_BN = torch.nan_to_num(x_BN.float())
        ang_BNK = 2 * torch.pi * x_BN.unsqueeze(-1) * self.freq_NK
        feat_BNK = torch.cat([torch.sin(ang_BNK), torch.cos(ang_BNK)], -1)
        out_BND = torch.einsum("bnk,nkd->bnd", feat_BNK, self.weight_NKD) + self.bias_ND
        return torch.relu(out_BND)


# ============================================================================ data


class ArrayDataset(Dataset):
    """Rows of a dict of equally long numpy arrays, as tensors."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        self.n = len(next(iter(self.tensors.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class BatchLoader:
    """Batches by slicing whole tensors (much faster than per-row ``__getitem__``)."""

    def __init__(
        self, arrays: Mapping[str, np.ndarray], batch_size: int, shuffle: bool, seed: int = 0
    ):
        self.ds = ArrayDataset(arrays)
        self.batch_size, self.shuffle = batch_size, shuffle
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (self.ds.n + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        idx = (
            torch.randperm(self.ds.n, generator=self.gen)
            if self.shuffle
            else torch.arange(self.ds.n)
        )
        for s in range(0, self.ds.n, self.batch_size):
            b = idx[s : s + self.batch_size]
            yield {k: v[b] for k, v in self.ds.tensors.items()}


def loader(
    arrays: Mapping[str, np.ndarray], batch_size: int, shuffle: bool, seed: int = 0
) -> DataLoader:
    """A DataLoader over pre-batched slices (Lightning needs a real DataLoader)."""
    bl = BatchLoader(arrays, batch_size, shuffle, seed)
    return DataLoader(_Batches(bl), batch_size=None, shuffle=False)


class _Batches(torch.utils.data.IterableDataset):
    def __init__(self, bl: BatchLoader) -> None:
        self.bl = bl

    def __len__(self) -> int:
        return len(self.bl)

    def __iter__(self):
        return iter(self.bl)


@torch.no_grad()
def predict_logits(
    model: FraudModel, arrays: Mapping[str, np.ndarray], batch_size: int = 2048
) -> np.ndarray:
    """Logits of every row, in order, in eval mode on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    n = len(arrays["x_num"])
    for s in range(0, n, batch_size):
        batch = {
            k: torch.from_numpy(np.ascontiguousarray(v[s : s + batch_size])).to(device)
            for k, v in arrays.items()
        }
        out.append(model(batch).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)
