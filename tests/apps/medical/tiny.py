"""Tiny configs and data for the medical model tests (seconds on one core)."""

from __future__ import annotations

from pathlib import Path

from apps.medical.config import MedicalConfig
from apps.medical.synthetic import generate_dataset

_TRAINER = {
    "max_epochs": 1,
    "monitor": None,
    "enable_checkpointing": False,
    "num_sanity_val_steps": 0,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "log_every_n_steps": 1,
}


def _backbone(top_k: int | None) -> dict:
    return {
        "d_model": 24,
        "n_layers": 2,
        "ffn_hidden": 32,
        "attention": {"n_heads": 4, "gated": True, "top_k": top_k},
        "moe": {"n_routed_experts": 4, "top_k": 2, "n_shared_experts": 1, "expert_hidden": 16},
    }


def tiny_config(root: Path | None = None, heldout_fraction: float = 0.34) -> MedicalConfig:
    return MedicalConfig.from_dict(
        {
            "data": {
                "root": str(root) if root is not None else "data_samples/medical",
                "heldout_fraction": heldout_fraction,
            },
            "spacing_zyx": [8.0, 8.0, 8.0],
            "detector": {
                "crop_zyx": [16, 16, 16],
                "patch_zyx": [4, 4, 4],
                "stride_zyx": [16, 16, 16],
                "threshold": 0.0,
                "crops_per_nodule": 2,
                "neg_crops_per_scan": 2,
                "batch_size": 4,
                "max_candidates": 10,
                "backbone": _backbone(4),
                "trainer": _TRAINER,
            },
            "fp_reduction": {
                "crop_zyx": [4, 4, 4],
                "patch_zyx": [4, 4, 4],
                "crops_per_nodule": 1,
                "random_neg_per_scan": 2,
                "max_hard_neg_per_scan": 3,
                "batch_size": 8,
                "backbone": _backbone(None),
                "trainer": _TRAINER,
            },
            "sr_threshold": 0.0,
        }
    )


def tiny_dataset(root: Path, n_series: int = 3, seed: int = 5) -> Path:
    generate_dataset(root, n_series=n_series, size="tiny", seed=seed)
    return root
