"""FSDP2 through the engine against the unsharded path, and sharded models back on one device.

The issue's CPU contract: on a fixed seed the sharded path (one process, and two processes
over gloo) gives the same losses as the unsharded one, and a sharded checkpoint reloads into
a plain single-device model for scoring.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.engine import TrainerConfig, build_trainer
from core.sharding import (
    consolidate_checkpoint,
    full_state_dict,
    is_sharded,
    load_module,
    read_checkpoint,
    single_device_copy,
)
from tests.core import fsdp2_worker
from tests.core.test_engine import TinyData, TinySeqTask, synthetic_dataset

WORKER = Path(fsdp2_worker.__file__)


def losses(out: Path, world: int) -> list[float]:
    """Per-step loss of the global batch: the mean of the ranks' equal-sized micro-batch losses."""
    per_rank = [json.loads((out / f"losses_rank{r}.json").read_text()) for r in range(world)]
    return [sum(step) / world for step in zip(*per_rank, strict=True)]


def val_batch():
    x, lengths, y = synthetic_dataset(24, seed=7).tensors
    return x, lengths, y


@pytest.fixture(scope="module")
def unsharded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("unsharded")
    fsdp2_worker.run(out, world=1, strategy="auto")
    return out


def test_fsdp2_one_process_matches_unsharded(unsharded_run, tmp_path, clean_dist_env):
    fsdp2_worker.run(tmp_path, world=1, strategy="fsdp2")
    ref, got = losses(unsharded_run, 1), losses(tmp_path, 1)
    assert len(got) == fsdp2_worker.STEPS
    assert got == pytest.approx(ref, abs=1e-5)
    assert ref[-1] < ref[0]  # it trained, so equal curves mean something
    want = torch.load(unsharded_run / "full_state.pt")
    have = torch.load(tmp_path / "full_state.pt")
    assert have.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(have[k], want[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_fsdp2_two_processes_over_gloo_match_unsharded(unsharded_run, tmp_path):
    # a fresh job: no rendezvous settings left in this process by earlier in-process runs
    dist_vars = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars and not k.startswith("PL_")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path), "--world", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = losses(tmp_path, 2)
    assert got == pytest.approx(losses(unsharded_run, 1), abs=1e-5)
    want = torch.load(unsharded_run / "full_state.pt")
    have = torch.load(tmp_path / "full_state.pt")
    for k in want:
        torch.testing.assert_close(have[k], want[k], atol=1e-5, rtol=1e-4, msg=k)
    # the two ranks' shards, read back in this one process without a process group
    shards = sorted(p.name for p in (tmp_path / "ckpt").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    module = load_module(tmp_path / "ckpt", TinySeqTask)
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, have[k], msg=k)


def sharded_fit(tmp_path: Path, precision: str = "32") -> tuple[TinySeqTask, object]:
    cfg = TrainerConfig(
        accelerator="cpu",
        devices=1,
        strategy="fsdp2",
        precision=precision,
        max_steps=3,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer = build_trainer(cfg, logger=False)
    module = fsdp2_worker.new_module()
    trainer.fit(module, TinyData(n_train=96, n_val=32))
    return module, trainer


def test_sharded_checkpoint_reloads_on_one_device(tmp_path, clean_dist_env):
    module, trainer = sharded_fit(tmp_path)
    assert is_sharded(module)
    trainer.save_checkpoint(tmp_path / "ckpt")
    assert (tmp_path / "ckpt").is_dir()

    batch = val_batch()
    module.eval()
    with torch.no_grad():
        sharded_out = module(batch)
    plain = single_device_copy(module)
    assert not is_sharded(plain) and type(plain) is TinySeqTask
    loaded = load_module(tmp_path / "ckpt", TinySeqTask)
    assert not is_sharded(loaded) and not loaded.training
    single_file = consolidate_checkpoint(tmp_path / "ckpt", tmp_path / "model.ckpt")
    from_file = TinySeqTask.load_from_checkpoint(single_file, map_location="cpu").eval()
    with torch.no_grad():
        outs = [m.eval()(batch) for m in (plain, loaded, from_file)]
    for out in outs:
        torch.testing.assert_close(out, sharded_out, atol=1e-6, rtol=1e-5)
    # the sharded weights moved by training: this is not a comparison of fresh models
    fresh = fsdp2_worker.new_module().state_dict()
    moved = full_state_dict(module)["head.weight"] - fresh["head.weight"]
    assert float(moved.abs().max()) > 1e-4
    # a consolidated file carries what the trainer saved beside the weights
    assert read_checkpoint(single_file)["global_step"] == 3


def test_single_device_copy_of_a_plain_module_is_the_module():
    module = fsdp2_worker.new_module()
    assert not is_sharded(module)
    assert single_device_copy(module) is module


def test_load_module_names_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=rf"{tmp_path.name}.*meta\.pt"):
        load_module(tmp_path, TinySeqTask)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_module(tmp_path / "missing", TinySeqTask)


def test_bf16_mixed_gathers_bf16_weights_and_keeps_fp32_shards(tmp_path, clean_dist_env):
    """FSDP2's mixed-precision policy under bf16-mixed: forward sees bf16 weights, the
    optimizer's shards stay float32."""
    seen: list[torch.dtype] = []
    module, _ = sharded_fit(tmp_path, precision="bf16-mixed")
    # the shards the optimizer updated (state_dict reshards the root units, which keep
    # their gathered bf16 weights after the last forward)
    state = module.state_dict()
    not_fp32 = {k: v.dtype for k, v in state.items() if v.dtype != torch.float32}
    assert not not_fp32, not_fp32
    assert is_sharded(module)
    assert all(v.dtype == torch.float32 for v in full_state_dict(module).values())
    qkv = module.backbone.blocks[0].attn.qkv
    handle = qkv.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    with torch.no_grad():
        module(val_batch())
    handle.remove()
    assert seen == [torch.bfloat16]  # what forward computed with
