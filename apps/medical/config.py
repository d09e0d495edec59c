"""Configuration of the lung-nodule detector (``MedicalConfig``), YAML round-trip.

Everything a run needs is plain data here, so a registered model is rebuilt from its YAML
and ``state_dict`` alone. Spacing/crop/patch sizes are in voxels of the *resampled* grid
(``spacing_zyx`` mm per voxel), z first, as arrays are indexed ``[z, y, x]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from apps.medical.errors import MedicalDataError
from core.config import BackboneConfig
from core.config import small_backbone as core_small_backbone
from core.configio import YamlConfig
from core.engine import OptimConfig, TrainerConfig

CONFIG_DIR = Path(__file__).with_name("configs")
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _small_backbone(d_model: int = 64, n_layers: int = 2, top_k: int | None = 32) -> BackboneConfig:
    return core_small_backbone(d_model, n_layers, top_k)


@dataclass
class DataConfig:
    """Where the series and LUNA16 CSVs live, and how they are split by series.

    ``root``: a folder with ``dicom/<uid>/``, ``annotations.csv``,
    ``annotations_excluded.csv``, ``seriesuids.csv`` (relative paths are taken from the
    project root). ``generate``: when set (``{"n_series": 32, "size": "small", "seed": 7}``)
    the folder is (re)generated with :func:`apps.medical.synthetic.generate_dataset` under
    ``cache_dir`` when absent. ``heldout_fraction`` of the series (at least one, chosen by a
    seeded shuffle of the UID list, so by series, never by crop) is held out for
    evaluation; ``heldout_fraction=0`` evaluates on the training series (demo only: it
    then measures memorisation, and says so in the protocol). ``val_fraction`` of the
    remaining (training) series is kept out of training to pick the candidate NMS radius
    (``detector.nms_grid_mm``); the held-out series never choose anything.
    """

    root: str = "data_samples/medical"
    generate: dict | None = None
    cache_dir: str = "~/.cache/keel/medical"
    heldout_fraction: float = 0.25
    split_seed: int = 0
    val_fraction: float = 0.0

    def resolved_root(self) -> Path:
        if self.generate:
            n, size, seed = (
                int(self.generate.get("n_series", 8)),
                str(self.generate.get("size", "small")),
                int(self.generate.get("seed", 0)),
            )
            base = Path(os.environ.get("KEEL_MEDICAL_CACHE", self.cache_dir)).expanduser()
            return base / f"synthetic_{size}_n{n}_seed{seed}"
        p = Path(self.root).expanduser()
        return p if p.is_absolute() else PROJECT_ROOT / p


@dataclass
class DetectorConfig:
    """Stage 1: per-patch-token nodule probability on sliding windows of ``crop_zyx`` voxels.

    A token is positive when a nodule centre lies within ``pos_radius_mm`` of its patch
    centre (or inside its patch). ``offset_weight``: weight of the smooth-L1 regression of
    the nodule centre within the patch (0 turns it off).

    ``kind="dense"`` selects :class:`apps.medical.dense.DenseHeatmapModel` instead: a conv
    stem of ``stem_channels`` before the patch tokens and a per-voxel CenterNet heat map
    (Gaussian of ``sigma = clip(diameter / 4, *sigma_mm)`` mm, focal loss), trained on
    ``samples_per_epoch`` crops drawn on the fly (``pos_fraction`` around nodules) and run
    over whole scans with windows every ``infer_stride_zyx`` voxels (default ``stride_zyx``).
    ``train_minutes`` stops training after that wall time (None: run all epochs).
    ``nms_grid_mm``: NMS radii tried on the validation series (``data.val_fraction``).
    ``tta_flips`` (dense only): average the heat maps of the scan and of its z, y and x
    flips at inference (4x the work). ``infer_batch_size``: windows per forward when
    scoring whole scans (None: ``batch_size``); inference keeps no activations for a
    backward pass, so larger batches fit and keep a GPU busy, and the choice does not change
    the heat map. ``pos_size_power`` (dense only): nodule-centred crops
    pick nodule ``i`` with probability proportional to ``diameter_i ** -pos_size_power``
    (0: uniform over nodules), so small nodules, which the detector misses most, are seen
    more often.
    """

    kind: str = "token"
    stem_channels: int = 16
    sigma_mm: tuple[float, float] = (1.5, 4.0)
    pos_fraction: float = 0.5
    pos_size_power: float = 0.0
    samples_per_epoch: int = 512
    infer_stride_zyx: tuple[int, int, int] | None = None
    infer_batch_size: int | None = None
    train_minutes: float | None = None
    nms_grid_mm: tuple[float, ...] = ()
    tta_flips: bool = False
    crop_zyx: tuple[int, int, int] = (32, 32, 32)
    patch_zyx: tuple[int, int, int] = (4, 4, 4)
    stride_zyx: tuple[int, int, int] = (24, 24, 24)
    pos_radius_mm: float = 6.0
    offset_weight: float = 1.0
    pos_weight: float = 4.0
    crops_per_nodule: int = 12
    neg_crops_per_scan: int = 16
    jitter_vox: int = 10
    batch_size: int = 8
    threshold: float = 0.05
    nms_radius_mm: float = 8.0
    max_candidates: int = 100
    backbone: BackboneConfig = field(default_factory=_small_backbone)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, warmup_steps=10))
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig.quiet(6, log_every_n_steps=5)
    )

    @property
    def scoring_batch_size(self) -> int:
        """Windows per forward when scoring whole scans."""
        return int(self.infer_batch_size or self.batch_size)


@dataclass
class FPReductionConfig:
    """Stage 2: one probability per candidate from a ``crop_zyx`` crop around it (CLS token).

    Trained on jittered crops at true nodules (positives) and at stage-1 false positives on
    the TRAINING series plus random lung points (negatives). ``enabled=False`` keeps the
    stage-1 probability as the final one.

    The final probability fuses both stages geometrically, ``p1 ** (1 - w) * p2 ** w`` with
    ``w = score_weight``: 1 is stage 2 alone, 0 stage 1 alone. A small classifier on a
    ``crop_zyx`` crop sees less context than stage 1, so replacing the stage-1 score can
    lose what stage 1 knew; fusing keeps both. With ``score_weight_grid`` set (and a
    validation part, ``data.val_fraction``), stage 2 trains without the validation series
    and ``score_weight`` is chosen there by LUNA16 CPM, like the NMS radius.
    """

    enabled: bool = True
    score_weight: float = 1.0
    score_weight_grid: tuple[float, ...] = ()
    crop_zyx: tuple[int, int, int] = (16, 16, 16)
    patch_zyx: tuple[int, int, int] = (4, 4, 4)
    crops_per_nodule: int = 8
    jitter_vox: int = 2
    random_neg_per_scan: int = 16
    max_hard_neg_per_scan: int = 40
    batch_size: int = 16
    backbone: BackboneConfig = field(
        default_factory=lambda: _small_backbone(d_model=64, n_layers=2, top_k=None)
    )
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, warmup_steps=10))
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig.quiet(6, log_every_n_steps=5)
    )


@dataclass
class PretrainConfig:
    """Optional masked-token pretraining of the stage-1 backbone on unlabeled lung crops."""

    enabled: bool = False
    steps: int = 50
    mask_ratio: float = 0.4
    lr: float = 1e-3
    batch_size: int = 8


@dataclass
class MedicalConfig(YamlConfig):
    """One training run of the two-stage nodule detector."""

    data: DataConfig = field(default_factory=DataConfig)
    spacing_zyx: tuple[float, float, float] = (2.5, 2.5, 2.5)
    window_hu: tuple[float, float] = (-1000.0, 400.0)
    lung_mask: bool = True
    lung_margin_mm: float = 8.0
    refine_centroid: bool = True
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    fp_reduction: FPReductionConfig = field(default_factory=FPReductionConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sr_threshold: float = 0.5
    output_dir: str = "keel_outputs/medical"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.detector.kind not in ("token", "dense"):
            raise MedicalDataError(f"detector.kind={self.detector.kind!r}; expected token or dense")
        self.spacing_zyx = tuple(float(s) for s in self.spacing_zyx)  # type: ignore[assignment]
        if len(self.spacing_zyx) != 3 or min(self.spacing_zyx) <= 0:
            raise MedicalDataError(f"spacing_zyx={self.spacing_zyx}; expected 3 positive mm")
        for name, crop, patch in (
            ("detector", self.detector.crop_zyx, self.detector.patch_zyx),
            ("fp_reduction", self.fp_reduction.crop_zyx, self.fp_reduction.patch_zyx),
        ):
            if any(int(c) % int(p) for c, p in zip(crop, patch, strict=True)):
                raise MedicalDataError(
                    f"{name}.crop_zyx={tuple(crop)} must be a multiple of patch_zyx={tuple(patch)}"
                )
        if any(
            int(s) % int(p) or int(s) < 1 or int(s) > int(c)
            for s, p, c in zip(
                self.detector.stride_zyx,
                self.detector.patch_zyx,
                self.detector.crop_zyx,
                strict=True,
            )
        ):
            raise MedicalDataError(
                f"detector.stride_zyx={tuple(self.detector.stride_zyx)} must be a positive "
                f"multiple of patch_zyx={tuple(self.detector.patch_zyx)} and <= crop_zyx"
            )

        ib = self.detector.infer_batch_size
        if ib is not None and int(ib) < 1:
            raise MedicalDataError(f"detector.infer_batch_size={ib}; expected >= 1 or null")

    @classmethod
    def named(cls, name: str) -> MedicalConfig:
        """``demo`` / ``synthetic_bench`` -> the YAML under ``apps/medical/configs``."""
        return cls.from_yaml(CONFIG_DIR / f"{name}.yaml")


def demo_config() -> MedicalConfig:
    return MedicalConfig.named("demo")
