"""The fraud model: feature tokens + card-history tokens -> core Backbone -> CLS -> logit.

Tokens of one transaction (``T = 1 + N + C + H``):

* ``[CLS, num_1..num_N, cat_1..cat_C]`` from ``core.adapters.FeatureTokenizer`` over the
  causal features of ``apps.fraud.features`` (scaled by ``apps.fraud.inputs``);
* ``H`` history tokens: the card's most recent earlier transactions, each a linear map of
  its history features plus a learned lag embedding; missing lags are padding (the
  backbone's ``padding_mask_BT``), so a card's first transaction attends to features only.

Optional wide part (``wide=True``, :class:`WideLogit`): a logistic term straight on the
piecewise codes, added to the CLS logit, so a threshold rule is one weight (wide and deep).
Optional row path (``row_mlp=(64, 32)``, :class:`RowMLP`): a small MLP over the whole row of
scaled numeric features, its logit added to the CLS logit. Per-feature tokens make every
interaction go through attention; the row path gives the model the plain MLP's view of the
row beside it (TabTransformer feeds its continuous features to the head the same way).

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

from apps.fraud.fastscore import mlp_layers
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
        n_bins: int = 16,
        bin_steps: bool = False,
        wide: bool = False,
        row_mlp: Sequence[int] = (),
    ) -> None:
        if any(int(h) < 1 for h in row_mlp):
            raise ValueError(f"row_mlp hidden sizes must be >= 1, got {list(row_mlp)}")
        if numeric_encoding not in NUMERIC_ENCODINGS:
            raise ValueError(
                f"numeric_encoding must be one of {NUMERIC_ENCODINGS}, got {numeric_encoding!r}"
            )
        if wide and numeric_encoding != "piecewise":
            raise ValueError("wide=True needs numeric_encoding='piecewise' (it reads its codes)")
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
            n_bins=n_bins,
            bin_steps=bin_steps,
            wide=wide,
            row_mlp=[int(h) for h in row_mlp],
        )
        d = self.backbone_config.d_model
        self.tokenizer = FeatureTokenizer(n_numeric, list(cat_cardinalities), d, cls_token=True)
        self.periodic = (
            PeriodicNumeric(n_numeric, d, n_frequencies, frequency_scale)
            if numeric_encoding == "periodic" and n_numeric
            else None
        )
        self.piecewise = (
            PiecewiseLinearNumeric(n_numeric, d, n_bins, bin_steps)
            if numeric_encoding == "piecewise" and n_numeric
            else None
        )
        self.history_len = history_len if n_hist_features else 0
        if self.history_len:
            self.hist_proj = nn.Linear(n_hist_features, d)
            self.hist_lag = LagEmbedding(history_len, d)
            self.register_load_state_dict_pre_hook(_rename_pre_lag_embedding_key)
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(d, 1))
        self.wide = (
            WideLogit(n_numeric, self.piecewise.n_codes) if wide and self.piecewise else None
        )
        self.row = RowMLP(n_numeric, row_mlp, head_dropout) if row_mlp and n_numeric else None
        self.loss_kind = loss
        self.pos_weight = float(pos_weight)
        self.focal_gamma = float(focal_gamma)

    # ------------------------------------------------------------------ tokens
    def feature_tokens(self, batch: Mapping[str, Tensor]) -> Tensor:
        x_cat = batch["x_cat"] if self.tokenizer.cat_cardinalities else None
        tok_BTD = self.tokenizer(batch["x_num"], x_cat)
        extra = self.periodic or self.piecewise
        if extra is None:
            return tok_BTD
        n = self.tokenizer.n_numeric
        add_BND = extra(batch["x_num"])
        return torch.cat([tok_BTD[:, :1], tok_BTD[:, 1 : 1 + n] + add_BND, tok_BTD[:, 1 + n :]], 1)

    def fit_numeric_encoding(
        self, x_num_NF: np.ndarray, y_N: np.ndarray | None = None, bin_edges: str = "quantile"
    ) -> FraudModel:
        """Fit what the numeric encoding learns from data before training: the bin edges
        of ``piecewise`` from the TRAINING rows' scaled features (``bin_edges='tree'`` also
        reads their labels; see :meth:`PiecewiseLinearNumeric.fit_edges`). A no-op for
        ``linear`` and ``periodic``. Returns self."""
        if self.piecewise is not None:
            self.piecewise.fit_edges(x_num_NF, y_N, bin_edges)
        return self

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
        logit_B = self.head(out.last_hidden[:, 0]).squeeze(-1)
        if self.wide is not None:
            logit_B = logit_B + self.wide_contributions(batch["x_num"]).sum(-1).to(logit_B.dtype)
        if self.row is not None:
            logit_B = logit_B + self.row(batch["x_num"]).to(logit_B.dtype)
        return logit_B

    def wide_contributions(self, x_num_BN: Tensor) -> Tensor:
        """(B, N) per-feature terms of the wide logit, each relative to its feature at value 0
        (the training mean after scaling, the attributions' baseline), so they are the wide
        part's exact attributions. The baseline row's own terms are a constant, which the
        deep head's bias already covers."""
        assert self.wide is not None and self.piecewise is not None
        code_BNK = self.piecewise.encode(x_num_BN)
        base_1NK = self.piecewise.encode(torch.zeros_like(x_num_BN[:1]))
        return self.wide(code_BNK - base_1NK)

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
        if self.wide is not None:
            # The wide part is linear in the codes: its per-feature terms are exact.
            wide_BN = self.wide_contributions(batch["x_num"]).detach()
            n = wide_BN.shape[1]
            contrib = torch.cat([contrib[:, :n] + wide_BN, contrib[:, n:]], 1)
            logit_B = logit_B + wide_BN.sum(-1)
        if self.row is not None:
            # The row path reads the numeric features directly: gradient x input, the same
            # first-order rule with the same baseline (value 0, the training mean).
            row_B, row_BN = self.row.attributions(batch["x_num"])
            n = row_BN.shape[1]
            contrib = torch.cat([contrib[:, :n] + row_BN, contrib[:, n:]], 1)
            logit_B = logit_B + row_B
        if hist is not None:
            contrib = torch.cat([contrib, (tok_BHD * grads[1]).sum((1, 2)).unsqueeze(1)], 1)
        return logit_B.detach(), contrib.detach()


NUMERIC_ENCODINGS = ("linear", "periodic", "piecewise")


class FraudEnsemble(nn.Module):
    """The mean logit of ``K`` independently trained :class:`FraudModel` members (config
    ``ensemble_size``; member seeds from ``core.engine.member_seed``).

    On ULB the backbone's test PR-AUC moves by about 0.02 between seeds and the best epoch
    its 32-fraud validation block picks changes with the seed; averaging members' logits is
    meant to cancel part of that noise (the maintenance app's ``RULEnsemble`` does so for
    RUL). Measured: 3 members lost ULB's prequential selection to one model (mean fold
    PR-AUC 0.807 against 0.827, BENCHMARKS.md session 27), so no shipped config sets it.
    The mean of logits, not of probabilities, keeps one calibration and threshold for
    the ensemble as for one model, and keeps attributions exact: the ensemble's per-feature
    terms are the mean of the members' terms, on the same baseline. Duck-types what the
    predictor and the training loop read from a model: ``forward``, :meth:`attributions`,
    ``history_len`` and ``hparams`` (member 0's plus ``n_members``).
    """

    def __init__(self, members: Sequence[FraudModel]) -> None:
        super().__init__()
        if not members:
            raise ValueError("FraudEnsemble needs at least one member")
        shapes = {(m.history_len, m.tokenizer.n_numeric) for m in members}
        if len(shapes) != 1:
            raise ValueError(f"FraudEnsemble members read different inputs: {sorted(shapes)}")
        self.members = nn.ModuleList(members)
        self.history_len = members[0].history_len

    @property
    def hparams(self) -> dict[str, Any]:
        return {**dict(self.members[0].hparams), "n_members": len(self.members)}

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        return torch.stack([m(batch) for m in self.members]).mean(0)

    def attributions(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(logit_B, contrib_BK)``: the means of the members' (same columns as one model)."""
        outs = [m.attributions(batch) for m in self.members]
        return (
            torch.stack([o[0] for o in outs]).mean(0),
            torch.stack([o[1] for o in outs]).mean(0),
        )


def fraud_model_from_hparams(hparams: Mapping[str, Any]) -> FraudModel | FraudEnsemble:
    """A fresh model of saved ``hparams`` (an ensemble when they hold ``n_members``), for
    loading saved weights into."""
    hp = dict(hparams)
    n = hp.pop("n_members", None)
    backbone, optim = hp.pop("backbone_config"), hp.pop("optim_config")
    if n is None:
        return FraudModel(backbone, optim, **hp)
    return FraudEnsemble([FraudModel(backbone, optim, **hp) for _ in range(int(n))])


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


class PiecewiseLinearNumeric(nn.Module):
    """Piecewise-linear numeric embeddings ("PLE-LR", Gorishniy et al., NeurIPS 2022):
    feature j is cut at edges ``b_0 <= .. <= b_K`` fitted on the training rows (quantiles,
    or a per-feature decision tree's splits: :meth:`fit_edges`) and encoded as K numbers,
    bin t being 1 above it, 0 below it and the position inside it; ``steps`` adds K 0/1
    codes "at or above bin t's upper edge". The token adds ``relu(W_j e_j + b_j)``.
    A linear token (``x W_j``) is one direction and periodic features are smooth; fraud
    rules are thresholds (an amount above a limit, a terminal's recent fraud rate above
    zero), which tree edges with step codes represent with one weight. The outer bins are
    open-ended so values beyond the training range keep their slope. Edges are a buffer:
    they travel in the state dict, fitted once on training data (no test rows). Repeated
    edges (a binary or mostly-constant feature) give zero-width bins, which act as a step
    at that value.
    """

    def __init__(self, n_features: int, d_model: int, n_bins: int, steps: bool = False) -> None:
        super().__init__()
        if n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {n_bins}")
        self.n_bins, self.steps = n_bins, steps
        # Placeholder edges (standard-normal range) until fit_edges: scaled features are
        # standardised, so an unfitted model is still sensible.
        edges = torch.linspace(-3.0, 3.0, n_bins + 1).expand(n_features, -1).contiguous()
        self.register_buffer("edges_NE", edges)
        self.n_codes = n_codes = 2 * n_bins if steps else n_bins
        self.weight_NKD = nn.Parameter(torch.randn(n_features, n_codes, d_model) * n_codes**-0.5)
        self.bias_ND = nn.Parameter(torch.zeros(n_features, d_model))

    @torch.no_grad()
    def fit_edges(
        self, x_NF: np.ndarray, y_N: np.ndarray | None = None, method: str = "quantile"
    ) -> None:
        """Edges from training rows. ``quantile``: evenly spaced quantiles (unsupervised).
        ``tree``: the split points of a per-feature decision tree on the labels
        (``max_leaf_nodes = n_bins``; "PLE-T" in the paper): quantile bins spend their
        resolution where the data is dense, while fraud rules live in the tails (the
        handbook's amounts above 220, under 0.1% of its rows, share one quantile bin).
        A feature with fewer useful splits repeats its top edge (zero-width steps there)."""
        x = np.nan_to_num(np.asarray(x_NF, np.float64))
        n_features = self.edges_NE.shape[0]
        if x.ndim != 2 or x.shape[1] != n_features:
            raise ValueError(f"fit_edges expects (rows, {n_features}) features, got {x.shape}")
        if len(x) == 0:
            raise ValueError("fit_edges needs at least one training row")
        if method == "quantile":
            edges = np.quantile(x, np.linspace(0.0, 1.0, self.n_bins + 1), axis=0).T
        elif method == "tree":
            if y_N is None or len(y_N) != len(x):
                raise ValueError("tree bin edges need one label per training row")
            edges = np.stack([tree_edges(x[:, j], y_N, self.n_bins) for j in range(n_features)])
        else:
            raise ValueError(f"bin edge method must be 'quantile' or 'tree', got {method!r}")
        self.edges_NE.copy_(torch.as_tensor(edges, dtype=self.edges_NE.dtype))

    def encode(self, x_BN: Tensor) -> Tensor:
        """(B, N) -> (B, N, K) piecewise-linear codes, then with ``steps`` K more: 1 where
        x is at or above bin t's upper edge. The linear codes are continuous, so a rule
        at an edge is only a change of slope there: a step out of them needs a weight of
        1 / (bin width), huge for a wide tail bin such as the amounts above 220. The
        step codes make "above this edge" one unit-sized input."""
        x_BN1 = torch.nan_to_num(x_BN.float()).unsqueeze(-1)
        lo_NK, hi_NK = self.edges_NE[:, :-1], self.edges_NE[:, 1:]
        width_NK = hi_NK - lo_NK
        # Zero-width bins are steps: 1 at or above the edge, else 0.
        safe_NK = torch.where(width_NK > 0, width_NK, torch.ones_like(width_NK))
        frac_BNK = torch.where(
            width_NK > 0, (x_BN1 - lo_NK) / safe_NK, (x_BN1 >= lo_NK).to(x_BN1.dtype)
        )
        k = self.n_bins
        # Inner bins clip to [0, 1]; the first is open below and the last open above.
        lower = torch.zeros(k, device=x_BN.device)
        upper = torch.ones(k, device=x_BN.device)
        lower[0], upper[-1] = -torch.inf, torch.inf
        code_BNK = torch.maximum(torch.minimum(frac_BNK, upper), lower)
        if not self.steps:
            return code_BNK
        return torch.cat([code_BNK, (x_BN1 >= hi_NK).to(code_BNK.dtype)], dim=-1)

    def forward(self, x_BN: Tensor) -> Tensor:
        code_BNK = self.encode(x_BN)
        out_BND = torch.einsum("bnk,nkd->bnd", code_BNK, self.weight_NKD.to(code_BNK.dtype))
        return torch.relu(out_BND + self.bias_ND)


class WideLogit(nn.Module):
    """The "wide" half of a wide-and-deep model (Cheng et al., 2016): a logistic term
    straight on the piecewise codes, added to the backbone's logit. A threshold rule (the
    handbook's "every amount above 220 is fraud") is then one weight on one step code,
    learned from a few dozen examples, instead of a pattern the deep path must carry through
    the tokens, the attention and the CLS head, where it competed with the card and terminal
    signals and stayed weak (AP of that kind of fraud 0.16 against LightGBM's 0.68).
    Zero-initialised, so training starts from the deep model alone. No bias: the deep
    head has one. ``forward`` returns the (B, N) per-feature terms ``sum_k w_nk c_bnk``;
    the wide logit is their sum."""

    def __init__(self, n_features: int, n_codes: int) -> None:
        super().__init__()
        self.weight_NK = nn.Parameter(torch.zeros(n_features, n_codes))

    def forward(self, code_BNK: Tensor) -> Tensor:
        return torch.einsum("bnk,nk->bn", code_BNK, self.weight_NK.to(code_BNK.dtype))


class RowMLP(nn.Module):
    """``x_num_BN -> logit_B``: an MLP (SiLU, dropout) over the whole row of scaled numeric
    features, added to the CLS logit (``FraudModel(row_mlp=...)``).

    Why: on rows of a few dozen dense features (ULB's PCA components) a plain MLP over the
    row is a strong model, and feature tokens alone must rebuild every interaction through
    attention from per-feature embeddings. Added as a logit term the two views train jointly
    under one loss, and each keeps its own attribution (:meth:`attributions`)."""

    def __init__(self, n_features: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.net = mlp_layers(n_features, hidden, dropout)

    def forward(self, x_BN: Tensor) -> Tensor:
        return self.net(x_BN).squeeze(-1)

    def attributions(self, x_BN: Tensor) -> tuple[Tensor, Tensor]:
        """``(logit_B, contrib_BN)``: contributions are gradient x input, relative to the
        all-zero row (every feature at its training mean). First-order: they sum to
        ``logit - logit(0)`` exactly where the MLP is linear along the path, approximately
        elsewhere (the feature tokens' rule)."""
        with torch.enable_grad():
            x = x_BN.detach().float().requires_grad_(True)
            logit_B = self(x)
            (grad_BN,) = torch.autograd.grad(logit_B.sum(), [x])
        return logit_B.detach(), (x * grad_BN).detach()


def tree_edges(
    x_N: np.ndarray, y_N: np.ndarray, n_bins: int, min_leaf_frac: float = 1e-4
) -> np.ndarray:
    """``n_bins + 1`` non-decreasing edges of one feature: its minimum, the thresholds of a
    best-first decision tree with ``n_bins`` leaves fitted on ``(x, y)``, its maximum, and
    the maximum repeated when the tree finds fewer splits. Leaves keep at least
    ``min_leaf_frac`` of the rows (and 1), so a split is never about a single row."""
    from sklearn.tree import DecisionTreeClassifier

    lo, hi = float(x_N.min()), float(x_N.max())
    splits = np.empty(0)
    if hi > lo and len(np.unique(y_N)) > 1:
        tree = DecisionTreeClassifier(
            max_leaf_nodes=n_bins,
            min_samples_leaf=max(1, int(min_leaf_frac * len(x_N))),
            random_state=0,
        ).fit(x_N.reshape(-1, 1), y_N)
        t = tree.tree_
        splits = np.unique(t.threshold[t.feature >= 0])
    edges = np.concatenate([[lo], splits[(splits > lo) & (splits < hi)], [hi]])
    return np.concatenate([edges, np.full(n_bins + 1 - len(edges), hi)])


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


class ResampledBatchLoader:
    """Shuffled batches of a pool of rows whose legitimate rows are drawn afresh each epoch.

    Why: a fixed draw of legitimate rows (``head.neg_sample_rate``) shows the model the same
    few of them every epoch, and it can fit that draw. A fresh draw per epoch keeps the class
    ratio, the steps per epoch and so the learning-rate schedule and ``pos_weight``, while
    the epochs together cover most legitimate rows. ``first``: positions in the pool of
    epoch 0's rows (every fraud of the pool plus the seeded draw); epoch 0 batches exactly
    as :class:`BatchLoader` over those rows would, so a run departs from the fixed draw only
    from epoch 1. Later epochs take every fraud and as many legitimate rows as epoch 0, drawn
    without replacement by a generator seeded with ``(seed, epoch)``. Each pass over the
    loader is one epoch (Lightning iterates the training loader once per epoch).
    """

    def __init__(
        self,
        pool: Mapping[str, np.ndarray],
        first: np.ndarray,
        batch_size: int,
        seed: int = 0,
        label_key: str = "y",
    ) -> None:
        y_P = np.asarray(pool[label_key])
        self.frauds = np.flatnonzero(y_P == 1)
        self.legit = np.flatnonzero(y_P == 0)
        self.first = np.asarray(first, dtype=np.int64)
        if not np.isin(self.frauds, self.first).all():
            raise ValueError("epoch 0's rows must hold every fraud of the pool")
        self.n_legit = len(self.first) - len(self.frauds)
        self.tensors = ArrayDataset(pool).tensors
        self.batch_size, self.seed = batch_size, seed
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch = 0

    def rows(self, epoch: int) -> np.ndarray:
        """Pool positions of ``epoch``'s rows (in pool order)."""
        if epoch == 0:
            return self.first
        rng = np.random.default_rng([self.seed, epoch])
        drawn = rng.choice(self.legit, size=self.n_legit, replace=False)
        return np.sort(np.concatenate([self.frauds, drawn]))

    def __len__(self) -> int:
        return (len(self.first) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        rows = torch.from_numpy(self.rows(self.epoch))
        self.epoch += 1
        order = torch.randperm(len(rows), generator=self.gen)
        for s in range(0, len(rows), self.batch_size):
            b = rows[order[s : s + self.batch_size]]
            yield {k: v[b] for k, v in self.tensors.items()}


def resampled_loader(
    pool: Mapping[str, np.ndarray], first: np.ndarray, batch_size: int, seed: int = 0
) -> DataLoader:
    """A DataLoader over :class:`ResampledBatchLoader` (Lightning needs a real DataLoader)."""
    return DataLoader(
        _Batches(ResampledBatchLoader(pool, first, batch_size, seed)), batch_size=None
    )


def loader(
    arrays: Mapping[str, np.ndarray], batch_size: int, shuffle: bool, seed: int = 0
) -> DataLoader:
    """A DataLoader over pre-batched slices (Lightning needs a real DataLoader)."""
    bl = BatchLoader(arrays, batch_size, shuffle, seed)
    return DataLoader(_Batches(bl), batch_size=None, shuffle=False)


class _Batches(torch.utils.data.IterableDataset):
    def __init__(self, bl: BatchLoader | ResampledBatchLoader) -> None:
        self.bl = bl

    def __len__(self) -> int:
        return len(self.bl)

    def __iter__(self):
        return iter(self.bl)


@torch.no_grad()
def predict_logits(
    model: FraudModel | FraudEnsemble, arrays: Mapping[str, np.ndarray], batch_size: int = 2048
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
