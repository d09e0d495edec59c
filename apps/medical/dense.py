"""Dense (voxel-level) nodule heat map: conv stem -> patch tokens -> backbone -> decoder.

Why this exists beside the token head of :mod:`apps.medical.model`: a linear 4^3 patch
embedding scores 12 mm blocks, so a 3-6 mm nodule (the LUNA16 hit radius is half its
diameter) cannot be localised from tokens alone, and one logit per block makes the positive
class tiny and noisy. Here a 3-D stem sees every voxel first (a fixed multi-scale Gaussian /
Hessian-eigenvalue filter bank, then learned pointwise layers: blob vs. tube vs. plate),
:class:`core.adapters.PatchEmbed3d` turns the stem features into tokens that the shared
backbone mixes (context), and a light decoder upsamples the token features back to voxels
and fuses them with the stem features (a U-Net-like skip), giving a per-voxel centre-ness
logit. Training follows CenterNet: a Gaussian around each nodule
centre (width from its diameter), the centre voxel set to 1, penalty-reduced focal loss,
the final bias set to a 1 % prior so the loss starts balanced. Crops are sampled on the fly,
half of them around a nodule (any position in the crop), half at random lung points, with
flips / in-plane transposes and a mild intensity jitter.

Whole scans are scored by overlapping windows blended with a Gaussian importance map
(window borders lack context), candidates are 3-D local maxima (max-pool) refined to
sub-voxel positions, then a greedy NMS in world mm.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from apps.medical.candidates import _refine, nms_world
from apps.medical.geometry import index_to_world, split_affine
from apps.medical.model import window_starts
from apps.medical.preprocess import PreparedScan
from core.adapters import PatchEmbed3d
from core.backbone import BackboneOutput
from core.engine import TaskModule

PRIOR = 0.01


def _gauss_1d(sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


class FilterBank(nn.Module):
    """Fixed (not learned) multi-scale blob features of a volume ``[B, 1, Z, Y, X]``.

    Per scale ``s`` (voxels): the Gaussian-smoothed volume and the three eigenvalues of its
    Hessian times ``s^2`` (scale-normalised; a bright blob has three strongly negative ones,
    a vessel two, the pleura one), plus the raw volume: ``1 + 4 * len(sigmas)`` channels.
    Why fixed: these are the classical blob/tube/plate cues, and on CPU the weight gradient
    of a full-resolution 3-D convolution is the slowest op of the whole model (seconds per
    batch), whereas a fixed bank costs one forward pass and the learned layers after it are
    pointwise (matmuls) and the patch embedding. Separable Gaussians with zero padding,
    second derivatives by central differences of the smoothed volume.
    """

    def __init__(self, sigmas: Sequence[float] = (0.75, 1.5, 3.0)) -> None:
        super().__init__()
        self.sigmas = tuple(float(s) for s in sigmas)
        for i, s in enumerate(self.sigmas):
            self.register_buffer(f"g{i}", _gauss_1d(s), persistent=False)

    @property
    def n_channels(self) -> int:
        return 1 + 4 * len(self.sigmas)

    @property
    def margin(self) -> int:
        """Voxels of context each output voxel depends on (largest kernel radius + 1)."""
        return max(1, int(math.ceil(3.0 * max(self.sigmas)))) + 1

    @staticmethod
    def _smooth(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        r = (len(g) - 1) // 2
        w = g.to(x.dtype)
        x = F.conv3d(x, w.view(1, 1, -1, 1, 1), padding=(r, 0, 0))
        x = F.conv3d(x, w.view(1, 1, 1, -1, 1), padding=(0, r, 0))
        return F.conv3d(x, w.view(1, 1, 1, 1, -1), padding=(0, 0, r))

    @staticmethod
    def _hessian_eigs(g: torch.Tensor) -> torch.Tensor:
        """Eigenvalues (ascending) of the finite-difference Hessian of ``g [B,1,Z,Y,X]``,
        in closed form (Smith 1961: trigonometric solution of the symmetric 3x3 case),
        elementwise and much faster than a batched ``eigvalsh`` on CPU."""
        p = F.pad(g, (1, 1, 1, 1, 1, 1), mode="replicate")[:, 0]
        c = p[:, 1:-1, 1:-1, 1:-1]
        Z, Y, X = c.shape[1:]

        def sh(dz: int, dy: int, dx: int) -> torch.Tensor:
            return p[:, 1 + dz : 1 + dz + Z, 1 + dy : 1 + dy + Y, 1 + dx : 1 + dx + X]

        a = sh(1, 0, 0) - 2 * c + sh(-1, 0, 0)  # zz
        b = sh(0, 1, 0) - 2 * c + sh(0, -1, 0)  # yy
        e = sh(0, 0, 1) - 2 * c + sh(0, 0, -1)  # xx
        d = (sh(1, 1, 0) - sh(1, -1, 0) - sh(-1, 1, 0) + sh(-1, -1, 0)) / 4  # zy
        f = (sh(1, 0, 1) - sh(1, 0, -1) - sh(-1, 0, 1) + sh(-1, 0, -1)) / 4  # zx
        h = (sh(0, 1, 1) - sh(0, 1, -1) - sh(0, -1, 1) + sh(0, -1, -1)) / 4  # yx
        q = (a + b + e) / 3
        p1 = d * d + f * f + h * h
        p2 = (a - q) ** 2 + (b - q) ** 2 + (e - q) ** 2 + 2 * p1
        pp = torch.sqrt(p2 / 6).clamp_min(1e-12)
        A, B, E = (a - q) / pp, (b - q) / pp, (e - q) / pp
        D, Fz, H = d / pp, f / pp, h / pp
        det = A * (B * E - H * H) - D * (D * E - H * Fz) + Fz * (D * H - B * Fz)
        phi = torch.acos((det / 2).clamp(-1.0, 1.0)) / 3
        hi = q + 2 * pp * torch.cos(phi)
        lo = q + 2 * pp * torch.cos(phi + 2 * math.pi / 3)
        mid = 3 * q - hi - lo
        return torch.stack([lo, mid, hi], dim=1)  # [B, 3, Z, Y, X]

    @torch.no_grad()
    def forward(self, x_B1ZYX: torch.Tensor) -> torch.Tensor:
        x = x_B1ZYX.float()
        eigs = _hessian_eigs_compiled if x.is_cuda else self._hessian_eigs
        out = [x]
        for i, s in enumerate(self.sigmas):
            g = self._smooth(x, getattr(self, f"g{i}"))
            out += [g, eigs(g) * (s * s)]
        return torch.cat(out, dim=1)


_COMPILED_EIGS: Any = None  # None: not tried yet; False: compiling failed, stay eager


def _hessian_eigs_compiled(g: torch.Tensor) -> torch.Tensor:
    """:meth:`FilterBank._hessian_eigs`, compiled once per process (dynamic shapes: scans
    differ in size), for CUDA, where eagerly its ~60 elementwise ops each make a pass over
    the whole volume; fused, it reads the smoothed volume once. On an H200 the bank was
    the largest part of scoring a scan that teacher and student share (BENCHMARKS.md,
    issue #6). The eager method stays the reference and the CPU path, and is used, with a
    warning, if compiling fails."""
    global _COMPILED_EIGS
    if _COMPILED_EIGS is None:
        _COMPILED_EIGS = torch.compile(FilterBank._hessian_eigs, dynamic=True)
    if _COMPILED_EIGS is not False:
        try:
            return _COMPILED_EIGS(g)
        except Exception as err:  # no Triton / inductor on this machine
            warnings.warn(
                f"compiled Hessian eigenvalues failed ({err!r}); eager instead", stacklevel=2
            )
            _COMPILED_EIGS = False
    return FilterBank._hessian_eigs(g)


class DenseHeatmapModel(TaskModule):
    """Per-voxel nodule-centre logit for a crop ``[B, 1, Z, Y, X]`` (sizes: multiples of the patch).

    Stem: :class:`FilterBank` -> pointwise linear + GELU (``stem_channels``); tokens:
    :class:`core.adapters.PatchEmbed3d` of the stem features; the shared backbone mixes the
    tokens; decoder: token features upsampled (trilinear) to voxels, concatenated with the
    stem features, pointwise MLP -> logit. Batch: ``image`` (optionally with ``margin``
    voxels of context on every side, trimmed after the filter bank) or precomputed
    ``features`` (:meth:`features_of`, used for whole scans); for training also
    ``target_BZYX`` (Gaussian centre-ness, 1 at centres) and ``weight_BZYX``.
    """

    def __init__(
        self,
        backbone_config: Any,
        optim_config: Any = None,
        patch_zyx: Sequence[int] = (4, 4, 4),
        stem_channels: int = 16,
        focal_alpha: float = 2.0,
        focal_beta: float = 4.0,
        sigmas_vox: Sequence[float] = (0.75, 1.5, 3.0),
    ) -> None:
        super().__init__(
            backbone_config,
            optim_config,
            patch_zyx=list(patch_zyx),
            stem_channels=stem_channels,
            focal_alpha=focal_alpha,
            focal_beta=focal_beta,
            sigmas_vox=list(sigmas_vox),
        )
        c, d = int(stem_channels), self.backbone_config.d_model
        self.patch_zyx = tuple(int(p) for p in patch_zyx)
        self.bank = FilterBank(sigmas_vox)
        self.stem = nn.Sequential(nn.Linear(self.bank.n_channels, c), nn.GELU(), nn.Linear(c, c))
        self.embed = PatchEmbed3d(c, self.patch_zyx, d, max_patches=1 << 16)
        self.up = nn.Linear(d, c)
        self.decode = nn.Sequential(nn.Linear(2 * c, c), nn.GELU(), nn.Linear(c, 1))
        nn.init.constant_(self.decode[-1].bias, math.log(PRIOR / (1 - PRIOR)))
        self.focal_alpha, self.focal_beta = float(focal_alpha), float(focal_beta)

    @property
    def margin(self) -> int:
        return self.bank.margin

    def features_of(self, image: torch.Tensor, margin: int = 0) -> torch.Tensor:
        """Filter-bank features ``[B, K, Z, Y, X]`` of ``image [B, 1, Z+2m, Y+2m, X+2m]``."""
        f = self.bank(image)
        if margin:
            m = int(margin)
            f = f[:, :, m:-m, m:-m, m:-m]
        return f

    def tokens(self, batch: dict[str, Any]) -> tuple[torch.Tensor, None]:
        f = batch.get("features")
        if f is None:
            margin = batch.get("margin", 0)
            margin = int(margin[0]) if torch.is_tensor(margin) and margin.ndim else int(margin)
            f = self.features_of(batch["image"], margin)
        h_BZYXC = self.stem(f.permute(0, 2, 3, 4, 1).to(self.stem[0].weight.dtype))
        batch["stem_BZYXC"] = h_BZYXC  # the decoder's skip input
        return self.embed(h_BZYXC.permute(0, 4, 1, 2, 3)), None

    def head_forward(self, out: BackboneOutput, batch: dict[str, Any]) -> torch.Tensor:
        h = batch.pop("stem_BZYXC")
        B, Z, Y, X, C = h.shape
        grid = tuple(s // p for s, p in zip((Z, Y, X), self.patch_zyx, strict=True))
        tok = self.up(out.last_hidden).transpose(1, 2).reshape(B, C, *grid)
        tok = F.interpolate(tok.float(), size=(Z, Y, X), mode="trilinear").to(h.dtype)
        return self.decode(torch.cat([h, tok.permute(0, 2, 3, 4, 1)], dim=-1))[..., 0].float()

    def loss(self, logit_BZYX: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return centernet_focal_loss(
            logit_BZYX,
            batch["target_BZYX"].float(),
            batch["weight_BZYX"].float(),
            self.focal_alpha,
            self.focal_beta,
        )


def centernet_focal_loss(
    logit: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 4.0,
) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (Zhou et al. 2019), summed and divided by the
    number of centre voxels (target == 1) in the batch: near-centre negatives are damped by
    ``(1 - target)^beta``, easy voxels by ``p^alpha``, so the few centres are not drowned."""
    logp, log1mp = F.logsigmoid(logit), F.logsigmoid(-logit)
    p = logp.exp()
    pos = (target >= 1.0 - 1e-6).float()
    pos_term = pos * (1 - p).pow(alpha) * logp
    neg_term = (1 - pos) * (1 - target).pow(beta) * p.pow(alpha) * log1mp
    return -((pos_term + neg_term) * weight).sum() / pos.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------- targets


def dense_targets(
    start_zyx: Sequence[int],
    crop_zyx: Sequence[int],
    spacing_zyx: Sequence[float],
    nodules_zyx: np.ndarray,
    diameters_mm: np.ndarray,
    excluded_zyx: np.ndarray,
    sigma_mm: Sequence[float] = (1.5, 4.0),
    ignore_mm: float = 5.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(target, weight)`` of a crop: per nodule a Gaussian of ``sigma = clip(diameter/4,
    *sigma_mm)`` mm around its (sub-voxel) centre, max over nodules, exactly 1 at the voxel
    nearest each centre inside the crop; weight 0 within ``ignore_mm`` of an excluded finding
    where the target is low (LUNA16 neither rewards nor penalises hits there)."""
    crop = tuple(int(c) for c in crop_zyx)
    sp = np.asarray(spacing_zyx, dtype=np.float64)
    axes = [s + np.arange(n, dtype=np.float64) for s, n in zip(start_zyx, crop, strict=True)]
    target = np.zeros(crop, np.float32)
    weight = np.ones(crop, np.float32)
    for c, dia in zip(np.reshape(nodules_zyx, (-1, 3)), np.reshape(diameters_mm, -1), strict=True):
        sig = float(np.clip(float(dia) / 4.0, sigma_mm[0], sigma_mm[1]))
        d2 = [((a - ci) * s) ** 2 for a, ci, s in zip(axes, c, sp, strict=True)]
        if min(float(v.min()) for v in d2) > (4 * sig) ** 2 * 3:
            continue
        g = np.exp(
            -(d2[0][:, None, None] + d2[1][None, :, None] + d2[2][None, None, :]) / (2 * sig * sig)
        )
        np.maximum(target, g.astype(np.float32), out=target)
        k = np.round(np.asarray(c) - np.asarray(start_zyx)).astype(int)
        if np.all(k >= 0) and np.all(k < np.asarray(crop)):
            target[tuple(k)] = 1.0
    for c in np.reshape(excluded_zyx, (-1, 3)):
        d2 = [((a - ci) * s) ** 2 for a, ci, s in zip(axes, c, sp, strict=True)]
        near = (d2[0][:, None, None] + d2[1][None, :, None] + d2[2][None, None, :]) <= ignore_mm**2
        weight[near & (target < 0.5)] = 0.0
    return target, weight


def _crop_channels(
    vol_KZYX: torch.Tensor, start_zyx: np.ndarray, size_zyx: np.ndarray
) -> torch.Tensor:
    """``vol[:, start:start+size]`` with zeros where the box leaves the volume."""
    out = torch.zeros((vol_KZYX.shape[0], *(int(s) for s in size_zyx)), dtype=vol_KZYX.dtype)
    src, dst = [slice(None)], [slice(None)]
    for s, n, L in zip(start_zyx, size_zyx, vol_KZYX.shape[1:], strict=True):
        lo, hi = max(int(s), 0), min(int(s) + int(n), L)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(s), hi - int(s)))
    out[tuple(dst)] = vol_KZYX[tuple(src)]
    return out


class DenseCropDataset(Dataset):
    """Random training crops of filter-bank features, drawn on the fly (fresh every epoch).

    The bank (``bank``, a :class:`FilterBank`) runs once per whole training scan, exactly as
    at inference, and is kept in float16. ``pos_fraction`` of the items are centred near a
    nodule (the nodule anywhere in the crop but 3 voxels from its faces; nodule ``i`` drawn
    with probability ~ ``diameter_i ** -pos_size_power``, uniformly at 0), the rest at
    random voxels of the (dilated) lung field. Augmentations keep the
    labels and the features valid (Gaussians and Hessian eigenvalues are invariant under
    axis flips and transposes): flips of any axis, swapping y and x, and an intensity
    jitter ``x * a + b`` (``a ~ U(0.9, 1.1)``, ``b ~ U(-0.03, 0.03)``) applied as ``a, b`` on
    the intensity channels and ``a`` on the eigenvalue channels.

    ``labelled`` (one flag per scan, default all True): an unlabeled scan (a distillation
    transfer-set scan) has no truth; its ``nodules`` entry holds crop centres to sample near
    instead (e.g. a teacher's candidates), and its crops come with an all-zero target and
    weight, so the task loss (weighted, normalised by the labelled centres) ignores them and
    only a teacher term reads them.
    """

    def __init__(
        self,
        scans: Sequence[PreparedScan],
        nodules: Sequence[tuple[np.ndarray, np.ndarray]],
        excluded: Sequence[np.ndarray],
        crop_zyx: Sequence[int],
        spacing_zyx: Sequence[float],
        n_samples: int,
        pos_fraction: float = 0.5,
        sigma_mm: Sequence[float] = (1.5, 4.0),
        seed: int = 0,
        augment: bool = True,
        bank: FilterBank | None = None,
        pos_size_power: float = 0.0,
        labelled: Sequence[bool] | None = None,
    ) -> None:
        self.scans, self.nodules, self.excluded = list(scans), list(nodules), list(excluded)
        self.labelled = (
            [True] * len(self.scans) if labelled is None else [bool(v) for v in labelled]
        )
        if len(self.labelled) != len(self.scans):
            raise ValueError(f"labelled has {len(self.labelled)} flags for {len(self.scans)} scans")
        self.crop = np.asarray([int(c) for c in crop_zyx])
        self.spacing = tuple(float(s) for s in spacing_zyx)
        self.n = int(n_samples)
        self.pos_fraction = float(pos_fraction)
        self.sigma_mm = tuple(float(s) for s in sigma_mm)
        self.augment = augment
        self.rng = np.random.default_rng(seed)
        self.index = [(i, k) for i, (c, _) in enumerate(self.nodules) for k in range(len(c))]
        # P(nodule) ~ diameter ** -pos_size_power: small nodules are the ones missed
        self.pos_size_power = float(pos_size_power)
        if pos_size_power < 0:
            raise ValueError(f"pos_size_power must be >= 0, got {pos_size_power}")
        dia = np.asarray([self.nodules[i][1][k] for i, k in self.index], dtype=np.float64)
        w = np.maximum(dia, 1.0) ** -self.pos_size_power
        self.pos_prob = w / w.sum() if len(w) else w
        self.lung_idx = [np.flatnonzero(s.lung.ravel()) for s in self.scans]
        bank = bank or FilterBank()
        dev = bank.g0.device
        self.features = [
            bank(torch.from_numpy(s.image)[None, None].to(dev))[0].to(torch.float16).cpu()
            for s in self.scans
        ]
        self.seed, self._worker = seed, None
        n_scales = len(bank.sigmas)
        self.intensity_ch = [0] + [1 + 4 * k for k in range(n_scales)]

    def __len__(self) -> int:
        return self.n

    def _centre(self) -> tuple[int, np.ndarray]:
        info = torch.utils.data.get_worker_info()
        if info is not None and self._worker != info.id:  # forked copies must not repeat
            self._worker = info.id
            self.rng = np.random.default_rng([self.seed, 1 + info.id])
        rng = self.rng
        if self.index and rng.random() < self.pos_fraction:
            if self.pos_size_power:
                j = int(rng.choice(len(self.index), p=self.pos_prob))
            else:  # uniform: the same random stream as before the option existed
                j = int(rng.integers(len(self.index)))
            i, k = self.index[j]
            half = np.maximum(self.crop // 2 - 3, 0)
            return i, self.nodules[i][0][k] + rng.uniform(-half, half)
        i = int(rng.integers(len(self.scans)))
        idx = self.lung_idx[i]
        flat = int(rng.choice(idx)) if len(idx) else int(rng.integers(self.scans[i].image.size))
        return i, np.asarray(np.unravel_index(flat, self.scans[i].image.shape), np.float64)

    def __getitem__(self, _: int) -> dict[str, torch.Tensor]:
        i, centre = self._centre()
        start = np.round(centre).astype(int) - self.crop // 2
        feats = _crop_channels(self.features[i], start, self.crop).float()
        nod, dia = self.nodules[i]
        if self.labelled[i]:
            target, weight = dense_targets(
                start, self.crop, self.spacing, nod, dia, self.excluded[i], self.sigma_mm
            )
        else:  # no truth: the task loss must not read this crop (weight 0 everywhere)
            shape = tuple(int(c) for c in self.crop)
            target, weight = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        tgt, wgt = torch.from_numpy(target), torch.from_numpy(weight)
        if self.augment:
            rng = self.rng
            dims = [a for a in range(3) if rng.random() < 0.5]
            if dims:
                feats = feats.flip([d + 1 for d in dims])
                tgt, wgt = tgt.flip(dims), wgt.flip(dims)
            if rng.random() < 0.5 and self.crop[1] == self.crop[2]:
                feats, tgt, wgt = feats.transpose(2, 3), tgt.transpose(1, 2), wgt.transpose(1, 2)
            gain, shift = float(rng.uniform(0.9, 1.1)), float(rng.uniform(-0.03, 0.03))
            feats = feats * gain
            feats[self.intensity_ch] += shift
        return {
            "features": feats.contiguous(),
            "target_BZYX": tgt.contiguous(),
            "weight_BZYX": wgt.contiguous(),
        }


# ----------------------------------------------------------------------------- inference


def _importance_1d(n: int) -> np.ndarray:
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    return np.maximum(np.exp(-0.5 * (x / (0.25 * n)) ** 2), 1e-3)


def occupied_window_starts(
    vol_ZYX: torch.Tensor, crop_zyx: Sequence[int], stride_zyx: Sequence[int]
) -> list[tuple[int, int, int]]:
    """Starts ``(z, y, x)`` of the windows (:func:`window_starts` per axis, z-major) that hold
    at least one voxel > 0; prepared images are 0 outside the lung field, so the others
    score 0 without running the model.

    Counted on the volume's device with a summed-volume table (each window's count is 8
    lookups), so only one small vector leaves the GPU instead of the whole mask, and no
    Python loop touches the voxels. ``vol_ZYX`` must be at least ``crop`` on every axis.
    """
    crop = [int(c) for c in crop_zyx]
    occ = (vol_ZYX > 0).to(torch.int32)
    table = F.pad(occ.cumsum(0).cumsum(1).cumsum(2), (1, 0, 1, 0, 1, 0))
    axes = [
        torch.as_tensor(window_starts(n, c, int(s)), device=vol_ZYX.device)
        for n, c, s in zip(vol_ZYX.shape, crop, stride_zyx, strict=True)
    ]
    a, b, c = (t.reshape(-1) for t in torch.meshgrid(*axes, indexing="ij"))
    A, B, C = a + crop[0], b + crop[1], c + crop[2]
    count = (
        table[A, B, C]
        - table[a, B, C]
        - table[A, b, C]
        - table[A, B, c]
        + table[a, b, C]
        + table[a, B, c]
        + table[A, b, c]
        - table[a, b, c]
    )
    keep = torch.stack([a, b, c], dim=1)[count > 0].cpu().tolist()
    return [(int(z), int(y), int(x)) for z, y, x in keep]


@torch.no_grad()
def sliding_window_dense(
    model: DenseHeatmapModel,
    image_ZYX: np.ndarray | torch.Tensor,
    crop_zyx: Sequence[int],
    stride_zyx: Sequence[int],
    batch_size: int = 8,
    tta_flips: bool = False,
    accumulate: str = "auto",
) -> torch.Tensor:
    """Probability ``[Z, Y, X]`` (on the model's device) of a whole volume.

    The filter bank runs once on the whole (zero-padded) volume, so no window sees a fake
    border; the learned part runs on overlapping windows of those features, each weighted by
    a Gaussian importance map (a window's border tokens lack context), averaged. Windows
    whose image is all zero (outside the masked lung field) are skipped and score 0. bf16
    autocast on CUDA.

    ``tta_flips``: also score the volume flipped along z, y and x (one axis at a time) and
    average the four maps, each flipped back. Each pass runs the whole path (filter bank
    included) on the flipped scan; 4x the work.

    ``accumulate``: how windows are cut out of the features and blended back. ``loop``: one
    slice per window (a few small kernels each); ``batched``: one gather and one
    ``index_add_`` per batch of windows, through flat voxel indices (on a GPU the per-window
    launches are the cost; on a CPU the loop is faster); ``auto``: batched on CUDA, loop
    elsewhere. Both give the same map up to float summation order (tested).
    """
    if accumulate not in ("auto", "loop", "batched"):
        raise ValueError(f"accumulate must be auto, loop or batched, got {accumulate!r}")
    if tta_flips:

        def one(img: Any) -> torch.Tensor:
            return sliding_window_dense(
                model, img, crop_zyx, stride_zyx, batch_size, accumulate=accumulate
            )

        maps = [one(image_ZYX)]
        vol_ZYX = torch.as_tensor(image_ZYX)
        for axis in range(3):
            maps.append(one(vol_ZYX.flip(axis).contiguous()).flip(axis))
        return torch.stack(maps).mean(0)
    device = next(model.parameters()).device
    model.eval()
    vol = torch.as_tensor(image_ZYX, dtype=torch.float32).to(device)
    crop = tuple(int(c) for c in crop_zyx)
    shape = tuple(max(n, c) for n, c in zip(vol.shape, crop, strict=True))
    if shape != tuple(vol.shape):
        pad = torch.zeros(shape, dtype=vol.dtype, device=device)
        pad[: vol.shape[0], : vol.shape[1], : vol.shape[2]] = vol
        vol = pad
    feats = model.features_of(vol[None, None])[0]  # [K, Z, Y, X]
    w = np.einsum("i,j,k->ijk", *[_importance_1d(c) for c in crop])
    w_ZYX = torch.as_tensor(w, dtype=torch.float32, device=device)
    acc = torch.zeros(shape, dtype=torch.float32, device=device)
    wsum = torch.zeros(shape, dtype=torch.float32, device=device)
    starts = occupied_window_starts(vol, crop, stride_zyx)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    batched = accumulate == "batched" or (accumulate == "auto" and device.type == "cuda")
    if batched:
        # flat index of every voxel of a window starting at the origin; window (a, b, c)
        # adds a*Y*X + b*X + c
        _, Y, X = shape
        axes = [torch.arange(n, device=device) for n in crop]
        offs_N = (axes[0][:, None, None] * (Y * X) + axes[1][None, :, None] * X + axes[2]).view(-1)
        # channel-last, so one row gather gives the layout the stem's pointwise layers read
        feats_VK = feats.reshape(feats.shape[0], -1).t().contiguous()
        w_N = w_ZYX.reshape(-1)
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        if batched:
            base_B = torch.tensor([a * Y * X + b * X + c for a, b, c in chunk], device=device)
            idx_BN = base_B[:, None] + offs_N
            f = feats_VK[idx_BN.view(-1)].view(len(chunk), *crop, -1).permute(0, 4, 1, 2, 3)
        else:
            f = torch.stack(
                [feats[:, a : a + crop[0], b : b + crop[1], c : c + crop[2]] for a, b, c in chunk]
            )
        with autocast:
            prob = torch.sigmoid(model({"features": f}).float())
        if batched:
            acc.view(-1).index_add_(0, idx_BN.view(-1), (prob.view(len(chunk), -1) * w_N).view(-1))
            wsum.view(-1).index_add_(0, idx_BN.view(-1), w_N.expand(len(chunk), -1).reshape(-1))
            continue
        for k, (a, b, c) in enumerate(chunk):
            box = (slice(a, a + crop[0]), slice(b, b + crop[1]), slice(c, c + crop[2]))
            acc[box] += prob[k] * w_ZYX
            wsum[box] += w_ZYX
    out = acc / wsum.clamp_min(1e-6)  # windows holding no lung voxel were skipped: 0 there
    return out[: image_ZYX.shape[0], : image_ZYX.shape[1], : image_ZYX.shape[2]]


def heatmap_peaks(
    prob_ZYX: torch.Tensor, threshold: float, limit: int = 2000
) -> tuple[np.ndarray, np.ndarray]:
    """``(zyx [N, 3] int, values [N])``: voxels equal to their 3x3x3 maximum, >= threshold,
    the best ``limit`` of them, highest first (max-pool on the map's device)."""
    p = prob_ZYX[None, None]
    is_max = (p == F.max_pool3d(p, 3, stride=1, padding=1)) & (p >= threshold)
    vals = prob_ZYX[is_max[0, 0]]
    idx = torch.nonzero(is_max[0, 0])
    if len(vals) > limit:
        top = torch.topk(vals, limit).indices
        vals, idx = vals[top], idx[top]
    order = torch.argsort(vals, descending=True)
    return idx[order].cpu().numpy(), vals[order].float().cpu().numpy().astype(np.float64)


def candidates_from_heatmap(
    prob_ZYX: torch.Tensor | np.ndarray,
    scan: PreparedScan,
    threshold: float,
    nms_radius_mm: float,
    max_candidates: int = 100,
    refine: bool = True,
    prob_np: np.ndarray | None = None,
) -> pd.DataFrame:
    """Stage-1 candidate rows (world mm + prepared-grid ``z, y, x``) from a dense map."""
    prob_t = torch.as_tensor(prob_ZYX)
    zyx, vals = heatmap_peaks(prob_t, threshold, limit=max(20 * max(max_candidates, 1), 200))
    keep_lung = scan.lung[tuple(zyx.T)] if len(zyx) else np.zeros(0, bool)
    zyx, vals = zyx[keep_lung], vals[keep_lung]
    xyz = index_to_world(scan.affine, zyx.astype(np.float64)) if len(zyx) else np.empty((0, 3))
    keep = nms_world(xyz, vals, nms_radius_mm, limit=max_candidates or None)
    zyx, vals = zyx[keep], vals[keep]
    pts = zyx.astype(np.float64).reshape(-1, 3)
    if refine and len(pts):
        if prob_np is None:
            prob_np = prob_t.float().cpu().numpy()
        pts = _refine(prob_np, zyx)
    xyz = index_to_world(scan.affine, pts) if len(pts) else np.empty((0, 3))
    return pd.DataFrame(
        {
            "seriesuid": [scan.seriesuid] * len(pts),
            "coordX": xyz[:, 0] if len(pts) else np.empty(0),
            "coordY": xyz[:, 1] if len(pts) else np.empty(0),
            "coordZ": xyz[:, 2] if len(pts) else np.empty(0),
            "probability": vals if len(pts) else np.empty(0),
            "z": pts[:, 0] if len(pts) else np.empty(0),
            "y": pts[:, 1] if len(pts) else np.empty(0),
            "x": pts[:, 2] if len(pts) else np.empty(0),
        }
    )


def detect_scan_dense(
    model: DenseHeatmapModel,
    scan: PreparedScan,
    crop_zyx: Sequence[int],
    stride_zyx: Sequence[int],
    threshold: float,
    nms_radius_mm: float,
    max_candidates: int = 100,
    refine: bool = True,
    batch_size: int = 8,
    tta_flips: bool = False,
) -> pd.DataFrame:
    """Dense heat map of a prepared scan -> stage-1 candidates (see :func:`candidates_from_heatmap`)."""
    prob = sliding_window_dense(model, scan.image, crop_zyx, stride_zyx, batch_size, tta_flips)
    return candidates_from_heatmap(prob, scan, threshold, nms_radius_mm, max_candidates, refine)


def spacing_of(scan: PreparedScan) -> np.ndarray:
    return np.asarray(split_affine(scan.affine)[0], dtype=np.float64)
