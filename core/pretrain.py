"""Self-supervised pretraining by masked-token reconstruction (BERT / MAE style, any adapter).

Given tokens from any adapter:

1. choose, per row, ``round(mask_ratio * n)`` of its n maskable tokens uniformly at random
   (never a prefix token such as CLS, never padding; at least one when n > 0);
2. replace them by a learned ``mask_token`` (+ the slot's position code, when the adapter
   provides one: adapters add positions inside their tokens, and a bare mask token would
   not say *which* patch or feature to rebuild);
3. run the backbone and a linear decoder; the loss is the MSE against the target at the
   masked positions only.

The target defaults to the original tokens, detached. With a jointly trained adapter
that target can collapse (an adapter emitting constants makes it trivial), so prefer a
fixed target where one exists: raw patch values (``PatchEmbed1d.patchify``), numeric
features, voxel blocks. All selection is on device: no ``.item()``, fixed shapes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.backbone import Backbone
from core.errors import KeelInputError


def sample_token_mask(
    maskable_BT: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Bool [B, T]: ``round(mask_ratio * n_b)`` (>= 1 if n_b > 0) random maskable tokens per row."""
    B, T = maskable_BT.shape
    n_B = maskable_BT.sum(dim=1)
    n_mask_B = torch.minimum(torch.round(n_B * mask_ratio).clamp_min(1), n_B)
    score_BT = torch.rand(B, T, generator=generator, device=maskable_BT.device)
    score_BT = torch.where(maskable_BT, score_BT, 2.0)  # non-maskable tokens rank last
    rank_BT = score_BT.argsort(dim=1).argsort(dim=1)
    return rank_BT < n_mask_B.unsqueeze(1)


class MaskedTokenPretrainer(nn.Module):
    """Backbone + learned mask token + linear decoder; ``forward`` returns ``(loss, details)``.

    ``target_dim``: width of the reconstruction target (default ``d_model``: the tokens).
    ``n_prefix_tokens``: leading tokens never masked (1 for a CLS token, 0 without).
    """

    def __init__(
        self,
        backbone: Backbone,
        mask_ratio: float = 0.3,
        target_dim: int | None = None,
        n_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if n_prefix_tokens < 0:
            raise ValueError(f"n_prefix_tokens must be >= 0, got {n_prefix_tokens}")
        d_model = backbone.cfg.d_model
        self.backbone = backbone
        self.mask_ratio = mask_ratio
        self.n_prefix_tokens = n_prefix_tokens
        self.target_dim = target_dim or d_model
        self.mask_token = nn.Parameter(torch.empty(d_model))
        self.decoder = nn.Linear(d_model, self.target_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.decoder.weight, std=0.02)
        nn.init.zeros_(self.decoder.bias)

    def _align_target(self, target: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """Accept targets for all T tokens or only for the T - n_prefix non-prefix tokens."""
        if target.dim() != 3 or target.shape[0] != B or target.shape[2] != self.target_dim:
            raise KeelInputError(
                f"MaskedTokenPretrainer: target must be [B={B}, T, {self.target_dim}], got "
                f"{tuple(target.shape)}"
            )
        if target.shape[1] == T - self.n_prefix_tokens and self.n_prefix_tokens:
            prefix = target.new_zeros(B, self.n_prefix_tokens, self.target_dim)
            target = torch.cat([prefix, target], dim=1)
        if target.shape[1] != T:
            raise KeelInputError(
                f"MaskedTokenPretrainer: target has {target.shape[1]} positions; expected T={T} "
                f"or T - n_prefix_tokens={T - self.n_prefix_tokens}"
            )
        return target

    def forward(
        self,
        tokens_BTD: torch.Tensor,
        padding_mask_BT: torch.Tensor | None = None,
        target_BTK: torch.Tensor | None = None,
        *,
        positions_BTD: torch.Tensor | None = None,
        maskable_BT: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Mask, encode, decode; loss = mean squared error over masked tokens only.

        ``positions_BTD``: the position code of each slot ([B, T, D] or [T, D]), added to
        the mask token (adapters' ``position_embeddings``). ``maskable_BT``: restricts
        which tokens may be masked (combined with the prefix and padding rules).
        ``details``: ``mask_BT``, ``pred_BTK``, ``target_BTK``, ``n_masked``, ``output``.
        """
        B, T, D = tokens_BTD.shape
        if target_BTK is None:
            if self.target_dim != D:
                raise KeelInputError(
                    f"MaskedTokenPretrainer: target_dim={self.target_dim} != d_model={D}, "
                    "so a target_BTK must be given"
                )
            target_BTK = tokens_BTD.detach()
        target_BTK = self._align_target(target_BTK, B, T)
        maskable = torch.ones(B, T, dtype=torch.bool, device=tokens_BTD.device)
        maskable[:, : self.n_prefix_tokens] = False
        if padding_mask_BT is not None:
            maskable = maskable & ~padding_mask_BT
        if maskable_BT is not None:
            maskable = maskable & maskable_BT
        mask_BT = sample_token_mask(maskable, self.mask_ratio, generator)
        fill_BTD = self.mask_token.to(tokens_BTD.dtype).expand(B, T, D)
        if positions_BTD is not None:
            fill_BTD = fill_BTD + positions_BTD.to(tokens_BTD.dtype)
        x_BTD = torch.where(mask_BT.unsqueeze(-1), fill_BTD, tokens_BTD)
        out = self.backbone(x_BTD, padding_mask_BT)
        pred_BTK = self.decoder(out.last_hidden)
        err_BT = (pred_BTK.float() - target_BTK.float()).pow(2).mean(dim=-1)
        n_masked = mask_BT.sum()
        loss = (err_BT * mask_BT).sum() / n_masked.clamp_min(1)
        details = {
            "mask_BT": mask_BT,
            "pred_BTK": pred_BTK,
            "target_BTK": target_BTK,
            "n_masked": n_masked,
            "output": out,
        }
        return loss, details
