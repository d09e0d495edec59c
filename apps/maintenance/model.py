"""The RUL model: causal windows -> patch tokens + CLS -> backbone -> RUL and alarm heads.

A window of the last ``W`` readings (``[B, W, C]``, left-padded early in life) becomes
``W / patch_len`` patch tokens plus a CLS token (``core.adapters.PatchEmbed1d``). The heads
read the CLS token together with the most recent patch token (the newest data says most
about the current wear):

* RUL head: regression on the piecewise-linear target ``min(RUL, cap) / cap`` (Huber or MSE;
  scaled to [0, 1] so one learning rate fits any cap). Predictions are ``cap * output``.
* alarm head: a logit for "failure within ``alarm_horizon``" (BCE on the *uncapped* truth),
  an auxiliary task that sharpens the end of life, where alarms are decided.

:func:`pretrain_masked` optionally pretrains adapter + backbone on unlabeled windows with
``core.pretrain.MaskedTokenPretrainer`` reconstructing the *raw* patch values (a fixed target,
so the adapter cannot collapse it).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from core.adapters import PatchEmbed1d
from core.backbone import BackboneOutput
from core.engine import TaskModule
from core.pretrain import MaskedTokenPretrainer


class RULModel(TaskModule):
    """PatchEmbed1d (CLS) -> Backbone -> [CLS, last patch] -> RUL head + alarm head.

    ``forward(batch)`` returns ``[B, 2]``: column 0 the RUL in target units (0..1 ~ 0..cap),
    column 1 the alarm logit. ``batch``: ``x`` [B, W, C] float, ``mask`` [B, W] bool (True =
    padded step), and for the loss ``rul`` [B] (uncapped true RUL).
    """

    def __init__(
        self,
        backbone_config: Any,
        optim_config: Any = None,
        n_channels: int = 1,
        window: int = 30,
        patch_len: int = 5,
        rul_cap: float = 125.0,
        alarm_horizon: float = 30.0,
        alarm_loss_weight: float = 0.2,
        loss_kind: str = "huber",
        input_noise: float = 0.0,
        val_max_rul: float | None = None,
    ) -> None:
        super().__init__(
            backbone_config,
            optim_config,
            n_channels=n_channels,
            window=window,
            patch_len=patch_len,
            rul_cap=rul_cap,
            alarm_horizon=alarm_horizon,
            alarm_loss_weight=alarm_loss_weight,
            loss_kind=loss_kind,
            input_noise=input_noise,
            val_max_rul=val_max_rul,
        )
        if loss_kind not in ("huber", "mse"):
            raise ValueError(f"loss_kind={loss_kind!r}: expected 'huber' or 'mse'")
        d = self.backbone_config.d_model
        self.window, self.patch_len = window, patch_len
        self.rul_cap, self.alarm_horizon = float(rul_cap), float(alarm_horizon)
        self.alarm_loss_weight, self.loss_kind = float(alarm_loss_weight), loss_kind
        self.input_noise = float(input_noise)
        self.val_max_rul = None if val_max_rul is None else float(val_max_rul)
        self.patch_embed = PatchEmbed1d(
            n_channels, patch_len, d, max_patches=math.ceil(window / patch_len), cls_token=True
        )
        self.rul_head = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 1))
        self.alarm_head = nn.Linear(2 * d, 1)

    # ------------------------------------------------------------------ TaskModule API
    def tokens(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        x_BWC = batch["x"]
        if self.training and self.input_noise > 0:
            # augmentation: sensor noise on real (not padded) steps, training only
            noise_BWC = torch.randn_like(x_BWC) * self.input_noise
            x_BWC = x_BWC + noise_BWC * (~batch["mask"]).unsqueeze(-1).to(x_BWC.dtype)
        return self.patch_embed.forward_with_mask(x_BWC, batch["mask"])

    def head_forward(self, out: BackboneOutput, batch: dict[str, Tensor]) -> Tensor:
        h_BD = torch.cat([out.last_hidden[:, 0], out.last_hidden[:, -1]], dim=-1)
        return torch.cat([self.rul_head(h_BD), self.alarm_head(h_BD)], dim=-1)  # [B, 2]

    def loss(self, preds: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Task loss over the windows whose RUL is known. Windows with a NaN RUL (the
        teacher-labelled mixup windows of distillation, ``apps.maintenance.distillation``)
        add nothing here: only the teacher term reads them. A mask, not a boolean index, so
        the step never waits on the GPU."""
        preds = preds.float()
        rul = batch["rul"].float()
        known = torch.isfinite(rul)
        w = known.float()
        n = w.sum().clamp(min=1.0)
        rul = torch.where(known, rul, torch.zeros_like(rul))
        target = rul.clamp(max=self.rul_cap) / self.rul_cap
        if self.loss_kind == "huber":
            reg_B = F.huber_loss(preds[:, 0], target, delta=0.1, reduction="none")
        else:
            reg_B = F.mse_loss(preds[:, 0], target, reduction="none")
        fails_soon = (rul <= self.alarm_horizon).float()
        alarm_B = F.binary_cross_entropy_with_logits(preds[:, 1], fails_soon, reduction="none")
        return ((reg_B + self.alarm_loss_weight * alarm_B) * w).sum() / n

    def val_metrics(self, preds: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``mse_capped`` over every window; ``se_near`` / ``frac_near``: the mean of squared
        errors times "true RUL <= ``val_max_rul``" and the mean of that indicator. Lightning
        averages both over the epoch weighted by batch size, so their ratio is exactly the MSE
        over the windows near failure (see ``BestValidationRMSE``)."""
        target = batch["rul"].float().clamp(max=self.rul_cap)
        se = (self.rul(preds) - target) ** 2
        out = {"mse_capped": se.mean()}
        if self.val_max_rul is not None:
            near = (batch["rul"].float() <= self.val_max_rul).float()
            out |= {"se_near": (se * near).mean(), "frac_near": near.mean()}
        return out

    def rul(self, preds: Tensor) -> Tensor:
        """Predicted RUL (cycles or time units) from ``forward``'s output, clamped to
        ``[0, rul_cap]``: the model estimates the capped target, which never leaves that range."""
        return preds[:, 0].float().clamp(0.0, 1.0) * self.rul_cap

    @torch.no_grad()
    def grow_d_model(self, old_d: int, new_d: int) -> None:
        """``core.growth.apply_growth`` hook for ``d_model`` growth, function-preserving: new
        token channels start at 0 (zero projection rows, position and CLS entries, matching
        the zero-padded backbone channels); the heads read ``[CLS, last]`` at the new offsets
        with zero weights on the new channels; the RUL head's new hidden units have zero
        output weights, so the outputs are unchanged until training moves them."""
        pad = new_d - old_d
        pe = self.patch_embed
        pe.proj = _pad_linear(pe.proj, pe.proj.in_features, [(0, 0, pe.proj.in_features)], new_d)
        pe.proj.weight[old_d:].zero_()
        if pe.proj.bias is not None:
            pe.proj.bias[old_d:].zero_()
        pe.pos_PD = nn.Parameter(F.pad(pe.pos_PD, (0, pad)))
        if pe.cls is not None:
            pe.cls = nn.Parameter(F.pad(pe.cls, (0, pad)))
        pe.d_model = new_d
        cat = [(0, 0, old_d), (old_d, new_d, old_d)]  # [CLS, last] at the new offsets
        h1, act, h2 = self.rul_head
        self.rul_head = nn.Sequential(
            _pad_linear(h1, 2 * new_d, cat, new_d), act, _pad_linear(h2, new_d, [(0, 0, old_d)], 1)
        )
        self.alarm_head = _pad_linear(self.alarm_head, 2 * new_d, cat, 1)

    @torch.no_grad()
    def predict_windows(
        self, x_NWC: np.ndarray, mask_NW: np.ndarray, batch_size: int = 1024
    ) -> tuple[np.ndarray, np.ndarray]:
        """(RUL [N], alarm probability [N]) for numpy windows, in eval mode, on the model's device."""
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        rul, prob = [], []
        for i in range(0, len(x_NWC), batch_size):
            batch = {
                "x": torch.as_tensor(x_NWC[i : i + batch_size], device=dev),
                "mask": torch.as_tensor(mask_NW[i : i + batch_size], device=dev),
            }
            out = self(batch)
            rul.append(self.rul(out).cpu().numpy())
            prob.append(torch.sigmoid(out[:, 1].float()).cpu().numpy())
        self.train(was_training)
        if not rul:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(rul).astype(np.float64), np.concatenate(prob).astype(np.float64)


def _pad_linear(
    old: nn.Linear, in_f: int, in_map: list[tuple[int, int, int]], out_f: int
) -> nn.Linear:
    """A wider copy of ``old`` (``in_f`` inputs, ``out_f`` outputs): input columns
    ``old[:, a:a+n]`` go to ``new[:, b:b+n]`` for each ``(a, b, n)`` in ``in_map``; the old
    outputs' other input columns are 0 (they read channels that are 0 at growth time); the
    first ``old.out_features`` outputs are the old ones, the new ones keep their random init
    (the caller zeroes whatever reads them)."""
    new = nn.Linear(in_f, out_f, bias=old.bias is not None)
    new = new.to(old.weight.device, old.weight.dtype)
    o = old.out_features
    with torch.no_grad():
        new.weight[:o].zero_()
        for a, b, n in in_map:
            new.weight[:o, b : b + n] = old.weight[:, a : a + n]
        if old.bias is not None:
            new.bias[:o] = old.bias
    return new


def pretrain_masked(
    model: RULModel,
    x_NWC: np.ndarray,
    mask_NW: np.ndarray,
    epochs: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    mask_ratio: float = 0.3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[float]:
    """Masked-patch pretraining of ``model.patch_embed`` + ``model.backbone`` on unlabeled
    windows (labels are never read). Target: the raw patch values from ``patchify``.
    Returns the mean loss of each epoch; the pretrainer's own mask token and decoder are
    discarded afterwards (the fine-tuning heads start fresh)."""
    if epochs <= 0 or len(x_NWC) == 0:
        return []
    pe = model.patch_embed
    pre = MaskedTokenPretrainer(
        model.backbone,
        mask_ratio=mask_ratio,
        target_dim=pe.patch_len * pe.n_channels,
        n_prefix_tokens=1,
    )
    model.to(device)
    pre.to(device)
    params = {id(p): p for p in [*pe.parameters(), *pre.parameters()]}
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    x_all, m_all = torch.as_tensor(x_NWC), torch.as_tensor(mask_NW)
    losses: list[float] = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x_BLC, m_BL = x_all[idx].to(device), m_all[idx].to(device)
            tokens_BTD, pad_BT = pe.forward_with_mask(x_BLC, m_BL)
            target_BPK, _ = pe.patchify(x_BLC, m_BL)
            loss, _ = pre(
                tokens_BTD,
                pad_BT,
                target_BPK,
                positions_BTD=pe.position_embeddings(x_BLC.shape[1]),
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            opt.step()
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        losses.append(total / max(n, 1))
    return losses


class RULEnsemble(nn.Module):
    """The mean of ``K`` independently trained :class:`RULModel` members (``ensemble_size``).

    Each member is trained from its own initialisation and batch order and keeps its own best
    epoch; averaging their estimates cancels much of the seed-to-seed variance that dominates
    the C-MAPSS error (one model: about 0.5 RMSE between seeds). Costs ``K`` times the
    training and scoring time. Duck-types what the predictor reads from a model: ``window``,
    ``rul_cap``, ``alarm_horizon``, ``hparams`` (member 0's plus ``n_members``) and
    :meth:`predict_windows` (mean RUL, mean alarm probability).
    """

    def __init__(self, members: list[RULModel]) -> None:
        super().__init__()
        if not members:
            raise ValueError("RULEnsemble: needs at least one member")
        self.members = nn.ModuleList(members)
        m0 = members[0]
        self.window, self.patch_len = m0.window, m0.patch_len
        self.rul_cap, self.alarm_horizon = m0.rul_cap, m0.alarm_horizon

    @property
    def hparams(self) -> dict[str, Any]:
        return {**dict(self.members[0].hparams), "n_members": len(self.members)}

    @torch.no_grad()
    def predict_windows(
        self, x_NWC: np.ndarray, mask_NW: np.ndarray, batch_size: int = 1024
    ) -> tuple[np.ndarray, np.ndarray]:
        outs = [m.predict_windows(x_NWC, mask_NW, batch_size) for m in self.members]
        return np.mean([o[0] for o in outs], axis=0), np.mean([o[1] for o in outs], axis=0)


def load_rul_model(hparams: dict[str, Any]) -> RULModel | RULEnsemble:
    """A fresh model (or ensemble, when ``hparams`` has ``n_members``) for saved weights."""
    hp = dict(hparams)
    n = int(hp.pop("n_members", 1))
    if "n_members" in hparams:
        return RULEnsemble([RULModel(**hp) for _ in range(n)])
    return RULModel(**hp)
