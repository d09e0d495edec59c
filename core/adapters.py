"""Token adapters: turn each app's raw inputs into the [B, T, D] tokens the backbone eats.

* :class:`FeatureTokenizer` (tabular rows, fraud): one token per feature, FT-Transformer
  style (Gorishniy et al. 2021), plus a learnable CLS token first.
* :class:`PatchEmbed1d` (multichannel time series, maintenance): one token per
  non-overlapping window of ``patch_len`` steps (PatchTST, Nie et al. 2023).
* :class:`PatchEmbed3d` (volumes, medical): one token per ``(pz, py, px)`` voxel block (ViT /
  UNETR style), with a fixed factorised sinusoidal position code that fits any grid size.

The backbone has no positional encoding of its own: adapters provide positions (feature
identity is a position for tabular tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import KeelInputError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise KeelInputError(msg)


class FeatureTokenizer(nn.Module):
    """Per-feature tokens for a table row: ``[CLS, num_1..num_N, cat_1..cat_C]``.

    Numeric feature j: ``x_j * W_j + b_j`` (its own direction and offset per feature). A NaN
    numeric value becomes a learned per-feature "missing" token instead. Categorical
    feature j with cardinality c_j: an embedding table of c_j + 1 rows, where row c_j is
    "unknown/missing": any code outside ``[0, c_j)`` (e.g. -1 for missing, or a category
    unseen at fit time) maps to it, so serving never indexes out of range.

    ``forward(x_num_BN, x_cat_BC=None) -> tokens_BTD`` with ``T = cls + N + C``.
    """

    def __init__(
        self,
        n_numeric: int,
        cat_cardinalities: Sequence[int] = (),
        d_model: int = 128,
        cls_token: bool = True,
    ) -> None:
        super().__init__()
        cards = [int(c) for c in cat_cardinalities]
        if n_numeric < 0 or any(c < 1 for c in cards):
            raise ValueError(
                f"n_numeric must be >= 0 and every cardinality >= 1, got {n_numeric}, {cards}"
            )
        if n_numeric + len(cards) == 0:
            raise ValueError("FeatureTokenizer needs at least one numeric or categorical feature")
        self.n_numeric = n_numeric
        self.cat_cardinalities = cards
        self.d_model = d_model
        self.has_cls = cls_token
        self.num_weight_ND = nn.Parameter(torch.empty(n_numeric, d_model))
        self.num_bias_ND = nn.Parameter(torch.empty(n_numeric, d_model))
        self.num_missing_ND = nn.Parameter(torch.empty(n_numeric, d_model))
        self.cat_embed = nn.Embedding(sum(c + 1 for c in cards), d_model) if cards else None
        offsets = [0]
        for c in cards[:-1]:
            offsets.append(offsets[-1] + c + 1)
        self.register_buffer("cat_offsets_C", torch.tensor(offsets[: len(cards)]), persistent=False)
        self.register_buffer("cat_cards_C", torch.tensor(cards, dtype=torch.long), persistent=False)
        self.cls = nn.Parameter(torch.empty(d_model)) if cls_token else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 1/sqrt(D)): every token starts with a norm of about 1."""
        std = self.d_model**-0.5
        if self.n_numeric:
            for p in (self.num_weight_ND, self.num_bias_ND, self.num_missing_ND):
                nn.init.normal_(p, std=std)
        if self.cat_embed is not None:
            nn.init.normal_(self.cat_embed.weight, std=std)
        if self.cls is not None:
            nn.init.normal_(self.cls, std=std)

    @property
    def n_tokens(self) -> int:
        return int(self.has_cls) + self.n_numeric + len(self.cat_cardinalities)

    def position_embeddings(self) -> torch.Tensor:
        """[T, D] content-free code of each slot, for mask tokens in pretraining.

        Zero for CLS; a numeric feature's token at value 0 (its bias ``b_j``); a
        categorical feature's "unknown" row. Each identifies the feature without its value.
        """
        parts = [self.num_bias_ND]
        if self.cat_embed is not None:
            parts.append(self.cat_embed(self.cat_offsets_C + self.cat_cards_C))
        if self.cls is not None:
            parts.insert(0, torch.zeros_like(self.cls).unsqueeze(0))
        return torch.cat(parts, dim=0)

    def forward(
        self, x_num_BN: torch.Tensor | None, x_cat_BC: torch.Tensor | None = None
    ) -> torch.Tensor:
        parts = []
        B = None
        if self.n_numeric:
            _check(
                x_num_BN is not None
                and x_num_BN.dim() == 2
                and x_num_BN.shape[1] == self.n_numeric,
                f"FeatureTokenizer: x_num_BN must be [B, {self.n_numeric}] numeric features, got "
                f"{None if x_num_BN is None else tuple(x_num_BN.shape)}",
            )
            _check(
                x_num_BN.is_floating_point(),
                f"FeatureTokenizer: x_num_BN must be floating point, got {x_num_BN.dtype}",
            )
            B = x_num_BN.shape[0]
            missing_BN = torch.isnan(x_num_BN)
            x_BN1 = torch.where(missing_BN, 0.0, x_num_BN).unsqueeze(-1)
            tok_BND = x_BN1 * self.num_weight_ND + self.num_bias_ND
            parts.append(torch.where(missing_BN.unsqueeze(-1), self.num_missing_ND, tok_BND))
        n_cat = len(self.cat_cardinalities)
        if n_cat:
            _check(
                x_cat_BC is not None and x_cat_BC.dim() == 2 and x_cat_BC.shape[1] == n_cat,
                f"FeatureTokenizer: x_cat_BC must be [B, {n_cat}] category codes, got "
                f"{None if x_cat_BC is None else tuple(x_cat_BC.shape)}",
            )
            _check(
                not x_cat_BC.is_floating_point() and x_cat_BC.dtype != torch.bool,
                f"FeatureTokenizer: x_cat_BC must hold integer codes, got {x_cat_BC.dtype}",
            )
            _check(
                B is None or x_cat_BC.shape[0] == B,
                f"FeatureTokenizer: batch sizes differ: x_num_BN has {B} rows, x_cat_BC "
                f"{x_cat_BC.shape[0]}",
            )
            B = x_cat_BC.shape[0]
            codes_BC = x_cat_BC.long()
            known_BC = (codes_BC >= 0) & (codes_BC < self.cat_cards_C)
            idx_BC = torch.where(known_BC, codes_BC, self.cat_cards_C) + self.cat_offsets_C
            parts.append(self.cat_embed(idx_BC))
        tokens = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if self.cls is not None:
            cls_B1D = self.cls.to(tokens.dtype).expand(B, 1, self.d_model)
            tokens = torch.cat([cls_B1D, tokens], dim=1)
        return tokens


class PatchEmbed1d(nn.Module):
    """Non-overlapping patches of a [B, L, C] series -> tokens ``[CLS, patch_1..patch_P]``.

    Patch p is ``x[p*P : (p+1)*P, :]`` flattened (P = ``patch_len``), projected by one
    linear layer, plus a learned position embedding; a patch token depends on its own steps
    only (no overlap, no convolution across patches), so a token never sees the future
    beyond its patch.

    L not divisible by P (``remainder``): ``"pad"`` (default) left-pads with zeros, marked as
    padding in the time mask, so the LAST patch ends at the latest step (the most recent
    data, which matters most for monitoring, is never split or dropped); then ``T = cls +
    ceil(L / P)``. ``"error"`` raises. For divisible L, ``T = cls + L // P``.

    ``padding_mask_BL`` (True = padded/missing step): those steps are zeroed before the
    projection; a token is padding iff all of its steps are. :meth:`forward_with_mask`
    returns that token mask ([B, T]; CLS is never padding) alongside the tokens.
    """

    # Entry points besides forward that read parameters: under FSDP2 they must gather the
    # shards like forward does (core.engine.fully_shard_task registers them).
    fsdp_forward_methods = ("forward_with_mask",)

    def __init__(
        self,
        n_channels: int,
        patch_len: int,
        d_model: int,
        max_patches: int = 512,
        cls_token: bool = True,
        remainder: str = "pad",
    ) -> None:
        super().__init__()
        if n_channels < 1 or patch_len < 1 or max_patches < 1:
            raise ValueError(
                "n_channels, patch_len and max_patches must be >= 1, got "
                f"{n_channels}, {patch_len}, {max_patches}"
            )
        if remainder not in ("pad", "error"):
            raise ValueError(f"remainder must be 'pad' or 'error', got {remainder!r}")
        self.n_channels = n_channels
        self.patch_len = patch_len
        self.d_model = d_model
        self.max_patches = max_patches
        self.remainder = remainder
        self.proj = nn.Linear(patch_len * n_channels, d_model)
        self.pos_PD = nn.Parameter(torch.empty(max_patches, d_model))
        self.cls = nn.Parameter(torch.empty(d_model)) if cls_token else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.proj.weight, std=(self.patch_len * self.n_channels) ** -0.5)
        nn.init.zeros_(self.proj.bias)
        nn.init.normal_(self.pos_PD, std=0.02)
        if self.cls is not None:
            nn.init.normal_(self.cls, std=self.d_model**-0.5)

    def n_patches(self, seq_len: int) -> int:
        return math.ceil(seq_len / self.patch_len)

    def n_tokens(self, seq_len: int) -> int:
        return int(self.cls is not None) + self.n_patches(seq_len)

    def position_embeddings(self, seq_len: int) -> torch.Tensor:
        """[T, D] position code of each token slot (zero for CLS), for pretraining masks."""
        pos = self.pos_PD[: self.n_patches(seq_len)]
        if self.cls is not None:
            pos = torch.cat([torch.zeros_like(pos[:1]), pos], dim=0)
        return pos

    def patchify(
        self, x_BLC: torch.Tensor, padding_mask_BL: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(patches_BPK, patch_pad_BPS)``: raw patch values [B, P, patch_len * C]
        (padded steps zeroed; usable as a reconstruction target) and the per-step padding
        [B, P, patch_len]."""
        _check(
            x_BLC.dim() == 3 and x_BLC.shape[2] == self.n_channels,
            f"PatchEmbed1d: x_BLC must be [B, L, {self.n_channels}], got {tuple(x_BLC.shape)}",
        )
        B, L, C = x_BLC.shape
        _check(L > 0, "PatchEmbed1d: the series is empty (L = 0)")
        n_patch = self.n_patches(L)
        _check(
            n_patch <= self.max_patches,
            f"PatchEmbed1d: {L} steps make {n_patch} patches of {self.patch_len}, more than "
            f"max_patches={self.max_patches}",
        )
        left = n_patch * self.patch_len - L
        _check(
            left == 0 or self.remainder == "pad",
            f"PatchEmbed1d: series length {L} is not a multiple of patch_len={self.patch_len}"
            " (remainder='error')",
        )
        if padding_mask_BL is None:
            step_pad_BL = torch.zeros(B, L, dtype=torch.bool, device=x_BLC.device)
        else:
            _check(
                padding_mask_BL.shape == (B, L),
                f"PatchEmbed1d: padding_mask_BL must be [B, L] = {(B, L)}, got "
                f"{tuple(padding_mask_BL.shape)}",
            )
            step_pad_BL = padding_mask_BL.to(torch.bool)
        x_BLC = x_BLC.masked_fill(step_pad_BL.unsqueeze(-1), 0.0)
        if left:
            x_BLC = F.pad(x_BLC, (0, 0, left, 0))
            step_pad_BL = F.pad(step_pad_BL, (left, 0), value=True)
        patches_BPK = x_BLC.reshape(B, n_patch, self.patch_len * C)
        return patches_BPK, step_pad_BL.view(B, n_patch, self.patch_len)

    def forward_with_mask(
        self, x_BLC: torch.Tensor, padding_mask_BL: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens_BTD, padding_mask_BT)``; a token is padding iff all its steps are."""
        patches_BPK, step_pad_BPS = self.patchify(x_BLC, padding_mask_BL)
        B, n_patch, _ = patches_BPK.shape
        tokens = self.proj(patches_BPK) + self.pos_PD[:n_patch]
        pad_BP = step_pad_BPS.all(dim=-1)
        if self.cls is not None:
            cls_B1D = self.cls.to(tokens.dtype).expand(B, 1, self.d_model)
            tokens = torch.cat([cls_B1D, tokens], dim=1)
            pad_BP = F.pad(pad_BP, (1, 0), value=False)
        return tokens, pad_BP

    def forward(
        self, x_BLC: torch.Tensor, padding_mask_BL: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.forward_with_mask(x_BLC, padding_mask_BL)[0]


def sincos_3d(
    grid: tuple[int, int, int],
    d_model: int,
    device: torch.device | None = None,
    offset: tuple[int, int, int] = (0, 0, 0),
) -> torch.Tensor:
    """Fixed factorised sine-cosine code [gz*gy*gx, D] for a (z, y, x) grid, z-major order.

    Each axis gets ``2 * (D // 6)`` channels (sin and cos at ``D // 6`` geometric
    frequencies, as in the transformer's 1-D code) and any leftover channels are zero.
    A position's code depends only on its integer coordinates (plus ``offset``), not on
    the grid size, so windows of any size and a sliding window's patches agree.
    """
    n_freq = d_model // 6
    chans = []
    coords = [
        torch.arange(g, device=device, dtype=torch.float32) + o
        for g, o in zip(grid, offset, strict=True)
    ]
    zz, yy, xx = torch.meshgrid(*coords, indexing="ij")
    if n_freq:
        freq = 1.0 / (
            10000.0 ** (torch.arange(n_freq, device=device, dtype=torch.float32) / n_freq)
        )
        for pos in (zz, yy, xx):
            ang = pos.reshape(-1, 1) * freq
            chans += [torch.sin(ang), torch.cos(ang)]
    n = zz.numel()
    used = 6 * n_freq
    if used < d_model:
        chans.append(torch.zeros(n, d_model - used, device=device, dtype=torch.float32))
    return torch.cat(chans, dim=1)


class PatchEmbed3d(nn.Module):
    """Non-overlapping 3-D patches of a [B, C, Z, Y, X] volume -> tokens (z-major order).

    A ``Conv3d`` with kernel = stride = ``patch_size`` is a linear map of each voxel block,
    so each token depends on its own block only. Positions: ``"sincos"`` (default) adds the
    fixed factorised code of :func:`sincos_3d`, which works for any grid size (sliding
    windows of any shape); ``"learned"`` adds a learned table indexed by the flat patch
    index, only meaningful for one fixed grid. Spatial sizes must be multiples of the patch
    size (volumes are cropped/padded by the app's transforms, which know the spacing);
    :meth:`grid_shape` gives the token grid and :meth:`tokens_to_grid` maps tokens back.
    """

    def __init__(
        self,
        in_channels: int,
        patch_size: int | Sequence[int] = (4, 4, 4),
        d_model: int = 128,
        max_patches: int = 4096,
        cls_token: bool = False,
        pos_encoding: str = "sincos",
    ) -> None:
        super().__init__()
        ps = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
        if len(ps) != 3 or min(ps) < 1 or in_channels < 1:
            raise ValueError(
                f"patch_size must be 3 positive ints and in_channels >= 1, got {patch_size}, {in_channels}"
            )
        if pos_encoding not in ("sincos", "learned"):
            raise ValueError(f"pos_encoding must be 'sincos' or 'learned', got {pos_encoding!r}")
        self.in_channels = in_channels
        self.patch_size: tuple[int, int, int] = ps  # type: ignore[assignment]
        self.d_model = d_model
        self.max_patches = max_patches
        self.pos_encoding = pos_encoding
        self.proj = nn.Conv3d(in_channels, d_model, kernel_size=ps, stride=ps)
        self.pos_PD = (
            nn.Parameter(torch.empty(max_patches, d_model)) if pos_encoding == "learned" else None
        )
        self.cls = nn.Parameter(torch.empty(d_model)) if cls_token else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_in = self.in_channels * math.prod(self.patch_size)
        nn.init.normal_(self.proj.weight, std=fan_in**-0.5)
        nn.init.zeros_(self.proj.bias)
        if self.pos_PD is not None:
            nn.init.normal_(self.pos_PD, std=0.02)
        if self.cls is not None:
            nn.init.normal_(self.cls, std=self.d_model**-0.5)

    def grid_shape(self, x_shape: Sequence[int]) -> tuple[int, int, int]:
        """Token grid (gz, gy, gx) for an input shape [B, C, Z, Y, X] or spatial (Z, Y, X)."""
        spatial = tuple(int(s) for s in x_shape[-3:])
        _check(
            len(x_shape) in (3, 5),
            f"PatchEmbed3d: expected [B, C, Z, Y, X] or (Z, Y, X), got {tuple(x_shape)}",
        )
        bad = [(s, p) for s, p in zip(spatial, self.patch_size, strict=True) if s % p or s == 0]
        _check(
            not bad,
            f"PatchEmbed3d: spatial size {spatial} must be a positive multiple of patch_size "
            f"{self.patch_size} on every axis",
        )
        return tuple(s // p for s, p in zip(spatial, self.patch_size, strict=True))  # type: ignore[return-value]

    def forward(
        self, x_BCZYX: torch.Tensor, offset: tuple[int, int, int] = (0, 0, 0)
    ) -> torch.Tensor:
        """Tokens [B, (cls +) gz*gy*gx, D]. ``offset``: grid coordinates of this window's
        first patch in a larger volume (sincos only), so sliding windows can share one
        global frame; the default treats every window as its own frame."""
        _check(
            x_BCZYX.dim() == 5 and x_BCZYX.shape[1] == self.in_channels,
            f"PatchEmbed3d: x must be [B, {self.in_channels}, Z, Y, X], got {tuple(x_BCZYX.shape)}",
        )
        grid = self.grid_shape(x_BCZYX.shape)
        n = math.prod(grid)
        _check(
            n <= self.max_patches,
            f"PatchEmbed3d: grid {grid} has {n} patches, more than max_patches={self.max_patches}",
        )
        tokens = self.proj(x_BCZYX).flatten(2).transpose(1, 2)  # [B, n, D]
        if self.pos_PD is not None:
            tokens = tokens + self.pos_PD[:n]
        else:
            tokens = tokens + sincos_3d(grid, self.d_model, tokens.device, offset).to(tokens.dtype)
        if self.cls is not None:
            cls_B1D = self.cls.to(tokens.dtype).expand(tokens.shape[0], 1, self.d_model)
            tokens = torch.cat([cls_B1D, tokens], dim=1)
        return tokens

    def position_embeddings(
        self, grid: Sequence[int], offset: tuple[int, int, int] = (0, 0, 0)
    ) -> torch.Tensor:
        """[T, D] position code of each token slot (zero for CLS), for pretraining masks."""
        n = math.prod(grid)
        if self.pos_PD is not None:
            pos = self.pos_PD[:n]
        else:
            pos = sincos_3d(tuple(grid), self.d_model, self.proj.weight.device, offset)
        if self.cls is not None:
            pos = torch.cat([torch.zeros_like(pos[:1]), pos], dim=0)
        return pos

    def tokens_to_grid(self, tokens_BTD: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Inverse of the flattening: [B, T, D] -> [B, D, gz, gy, gx] (CLS dropped if present)."""
        if self.cls is not None:
            tokens_BTD = tokens_BTD[:, 1:]
        gz, gy, gx = grid
        _check(
            tokens_BTD.shape[1] == gz * gy * gx,
            f"PatchEmbed3d: {tokens_BTD.shape[1]} patch tokens do not fill grid {tuple(grid)}",
        )
        return tokens_BTD.transpose(1, 2).reshape(tokens_BTD.shape[0], -1, gz, gy, gx)
