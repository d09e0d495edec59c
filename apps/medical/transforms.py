"""MONAI dictionary transforms for chest CT: load, resample, window, lung mask.

Images travel as ``monai.data.MetaTensor`` of shape ``[1, Z, Y, X]`` whose ``.affine`` maps
index ``(z, y, x)`` to patient **LPS** ``(x, y, z)`` mm (see :mod:`apps.medical.geometry`).
MONAI updates that affine through resampling and cropping, so a candidate found at any
stage maps back to world millimetres with :func:`voxel_to_world`, the coordinates LUNA16
scores in. Note: MONAI's orientation codes (``Orientationd(axcodes="RAS")``) assume a RAS
affine; do not use ``Orientationd`` on these LPS tensors.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Spacingd

from apps.medical.dicom_io import CTVolume, DicomReadConfig, load_series
from apps.medical.errors import MedicalDataError
from apps.medical.geometry import index_to_world, split_affine, world_to_index
from apps.medical.lung import lung_mask


def volume_to_metatensor(volume: CTVolume) -> MetaTensor:
    """``[1, Z, Y, X]`` float32 HU with the volume's index->LPS affine."""
    data = torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))[None]
    return MetaTensor(data, affine=torch.as_tensor(volume.affine, dtype=torch.float64))


def affine_of(image: MetaTensor) -> np.ndarray:
    """The 4x4 index ``(z, y, x)`` -> LPS ``(x, y, z)`` affine of a MetaTensor."""
    return np.asarray(image.affine.detach().cpu().numpy(), dtype=np.float64)


def voxel_to_world(image: MetaTensor, zyx: np.ndarray | Sequence[float]) -> np.ndarray:
    """Index ``(z, y, x)`` of ``image`` (``(..., 3)``) -> LPS ``(x, y, z)`` mm."""
    return index_to_world(affine_of(image), zyx)


def world_to_voxel(image: MetaTensor, xyz: np.ndarray | Sequence[float]) -> np.ndarray:
    """LPS ``(x, y, z)`` mm (``(..., 3)``) -> fractional index ``(z, y, x)`` of ``image``."""
    return world_to_index(affine_of(image), xyz)


class LoadCTSeriesd(MapTransform):
    """Replace a DICOM folder/file list (or a :class:`CTVolume`) by a ``[1,Z,Y,X]`` HU MetaTensor.

    Also stores ``seriesuid`` so predictions can be written as LUNA16 rows.
    """

    def __init__(
        self,
        keys: KeysCollection,
        config: DicomReadConfig | None = None,
        uid_key: str = "seriesuid",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.config = config
        self.uid_key = uid_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            src = d[key]
            volume = src if isinstance(src, CTVolume) else load_series(src, config=self.config)
            d[key] = volume_to_metatensor(volume)
            d.setdefault(self.uid_key, volume.series_uid)
        return d


class ResampleToSpacingd(MapTransform):
    """Resample to a common ``(z, y, x)`` spacing in mm, keeping the world geometry.

    Wraps ``monai.transforms.Spacingd`` with ``diagonal=False`` so the direction cosines are
    kept and only voxel sizes change; the output affine (in ``.affine``) is exact for the new
    grid. Use ``mode="nearest"`` for masks.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spacing_zyx: Sequence[float] = (1.5, 1.5, 1.5),
        mode: str | Sequence[str] = "bilinear",
        padding_mode: str | Sequence[str] = "border",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(spacing_zyx) != 3 or min(spacing_zyx) <= 0:
            raise MedicalDataError(
                f"spacing_zyx={tuple(spacing_zyx)}; expected 3 positive mm values"
            )
        self.spacing_zyx = tuple(float(s) for s in spacing_zyx)
        self._spacing = Spacingd(
            keys=keys,
            pixdim=self.spacing_zyx,
            diagonal=False,
            mode=mode,
            padding_mode=padding_mode,
            dtype=np.float32,
            allow_missing_keys=allow_missing_keys,
        )

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if not isinstance(d[key], MetaTensor):
                raise MedicalDataError(
                    f"key '{key}': expected a MetaTensor [1, Z, Y, X] with an affine (use "
                    f"LoadCTSeriesd first), got {type(d[key]).__name__}"
                )
        out = self._spacing(d)
        for key in self.key_iterator(out):
            out[key] = out[key].float()
        return out


class HUWindowd(MapTransform):
    """Map a HU window ``[lo, hi]`` linearly to ``[0, 1]``, clipping outside (lung: -1000..400)."""

    def __init__(
        self,
        keys: KeysCollection,
        window: tuple[float, float] = (-1000.0, 400.0),
        clip: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        lo, hi = (float(v) for v in window)
        if not hi > lo:
            raise MedicalDataError(f"window={window}; expected (low, high) with high > low")
        self.lo, self.hi, self.clip = lo, hi, clip

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = (d[key] - self.lo) / (self.hi - self.lo)
            d[key] = x.clamp(0.0, 1.0) if self.clip else x
        return d


class LungMaskd(MapTransform):
    """Add a lung-field mask (``mask_key``, ``[1, Z, Y, X]`` float 0/1, same affine) computed
    from a HU image by :func:`lung_mask`. Run it before windowing (it thresholds HU)."""

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "lung_mask",
        threshold_hu: float = -320.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise MedicalDataError(f"LungMaskd takes one HU image key, got {self.keys}")
        self.mask_key = mask_key
        self.threshold_hu = threshold_hu

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if not isinstance(image, MetaTensor) or image.ndim != 4 or image.shape[0] != 1:
                raise MedicalDataError(
                    f"key '{key}': expected a MetaTensor [1, Z, Y, X] in HU, got "
                    f"{type(image).__name__} {tuple(getattr(image, 'shape', ()))}"
                )
            spacing_zyx, _, _ = split_affine(affine_of(image))
            mask = lung_mask(image[0].detach().cpu().numpy(), spacing_zyx, self.threshold_hu)
            d[self.mask_key] = MetaTensor(
                torch.from_numpy(mask[None].astype(np.float32)), affine=image.affine.clone()
            )
        return d


__all__ = [
    "HUWindowd",
    "LoadCTSeriesd",
    "LungMaskd",
    "ResampleToSpacingd",
    "affine_of",
    "lung_mask",
    "volume_to_metatensor",
    "voxel_to_world",
    "world_to_voxel",
]
