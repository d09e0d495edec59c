"""A tiny FSDP2 training run, executed as a script by ``test_sharding.py``.

Lightning starts the other ranks by re-running this script (``_SubprocessScriptLauncher``),
so the 2-process gloo run has to be a program, not a function inside the test. Each rank
records its per-step loss; rank 0 also writes the gathered single-device weights, and all
ranks together write a sharded checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lightning  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from core.engine import OptimConfig, TrainerConfig, build_trainer, seed_everything  # noqa: E402
from core.sharding import single_device_copy  # noqa: E402
from tests.core.test_engine import TinySeqTask, synthetic_dataset, tiny_backbone  # noqa: E402

STEPS, PER_RANK_BATCH = 6, 16


class LossRecorder(lightning.Callback):
    """Each step's training loss on this rank (its own micro-batch)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def train_loader(world: int, strategy: str) -> DataLoader:
    """The same global batches for every run.

    Under a distributed strategy Lightning swaps in a ``DistributedSampler`` (shuffled, seed
    0): rank r takes entries r, r+world, ... of one permutation, so each global step covers
    the same rows as one process with a ``world`` times larger batch drawing from that
    sampler, which the unsharded reference run is given explicitly.
    """
    data = synthetic_dataset(STEPS * PER_RANK_BATCH * 2, seed=1)
    batch = PER_RANK_BATCH * (2 // world)
    if strategy == "auto":
        sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
        return DataLoader(data, batch_size=batch, sampler=sampler)
    return DataLoader(data, batch_size=batch, shuffle=False)


def new_module() -> TinySeqTask:
    seed_everything(0)
    return TinySeqTask(tiny_backbone(), OptimConfig(lr=3e-3, warmup_steps=2))


def run(out: Path, world: int, strategy: str, precision: str = "32") -> None:
    """Train STEPS steps; write losses_rank<r>.json, full_state.pt (rank 0), ckpt/ (sharded)."""
    recorder = LossRecorder()
    cfg = TrainerConfig(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        precision=precision,
        max_steps=STEPS,
        default_root_dir=str(out),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        seed=0,
    )
    trainer = build_trainer(cfg, extra_callbacks=[recorder], logger=False)
    module = new_module()
    trainer.fit(module, train_dataloaders=train_loader(world, strategy))
    rank = trainer.global_rank
    (out / f"losses_rank{rank}.json").write_text(json.dumps(recorder.losses))
    if strategy == "fsdp2":
        trainer.save_checkpoint(out / "ckpt")  # collective: one shard file per rank
    plain = single_device_copy(module)  # collective under fsdp2
    if rank == 0:
        torch.save(plain.state_dict(), out / "full_state.pt")
    if torch.distributed.is_initialized():
        # Tear gloo down before the interpreter exits: left to the exit handlers, its
        # threads can still be alive and the process aborts ("terminate called without an
        # active exception", exit -6) after all the work is done (seen once in CI).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--strategy", default="fsdp2")
    ap.add_argument("--precision", default="32")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    run(a.out, a.world, a.strategy, a.precision)
