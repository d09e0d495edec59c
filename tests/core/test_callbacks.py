"""ExpertBiasUpdate: once per optimizer step, over all micro-batches and all ranks."""

from __future__ import annotations

import logging
import os
import socket

import lightning
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core.callbacks import ExpertBiasUpdate, max_over_mean, sync_and_update_expert_biases
from core.config import MoEConfig
from core.engine import OptimConfig, fit, seed_everything
from core.moe import MoEFeedForward
from tests.core.test_engine import TinyData, TinySeqTask, quiet_cfg, tiny_backbone


class UpdateRecorder(lightning.pytorch.Callback):
    """Records, for every expert-bias update, the counts used and the tokens actually seen."""

    def __init__(self) -> None:
        self.valid_tokens = 0
        self.records: list[dict] = []

    @staticmethod
    def _ebu(trainer: lightning.Trainer) -> ExpertBiasUpdate:
        return next(cb for cb in trainer.callbacks if isinstance(cb, ExpertBiasUpdate))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.valid_tokens += int(batch[1].sum())  # lengths = non-padding tokens per row

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ebu = self._ebu(trainer)
        if ebu.n_updates > len(self.records):
            moe = next(pl_module.backbone.moe_layers())
            self.records.append(
                {
                    "batch_idx": batch_idx,
                    "global_step": trainer.global_step,
                    "counts": ebu.last_counts[0].clone(),
                    "valid_tokens": self.valid_tokens,
                    "bias": moe.expert_bias.detach().clone(),
                    "pending": moe.tokens_per_expert.detach().clone(),
                }
            )
            self.valid_tokens = 0


def test_one_update_per_optimizer_step_with_all_micro_batches(tmp_path):
    seed_everything(0)
    module = TinySeqTask(tiny_backbone(), OptimConfig(lr=1e-3))
    recorder = UpdateRecorder()
    cfg = quiet_cfg(tmp_path, max_epochs=1, accumulate_grad_batches=2, enable_checkpointing=False)
    trainer = fit(module, TinyData(n_train=256, batch_size=32), cfg, extra_callbacks=[recorder])

    top_k = module.backbone_config.moe.top_k
    assert trainer.global_step == 4 and len(recorder.records) == 4
    assert UpdateRecorder._ebu(trainer).n_updates == 4
    for i, rec in enumerate(recorder.records):
        assert rec["batch_idx"] == 2 * i + 1  # after the second micro-batch of each step
        assert rec["global_step"] == i + 1
        # every non-padding token of both micro-batches was counted top_k times
        assert float(rec["counts"].sum()) == rec["valid_tokens"] * top_k
        assert rec["valid_tokens"] > 32 * 8 // 2 * 2  # two batches' worth, not one
        assert float(rec["pending"].sum()) == 0.0  # counts reset after the update
    biases = [r["bias"] for r in recorder.records]
    assert all(
        not torch.equal(a, b) for a, b in zip(biases[:-1], biases[1:], strict=True)
    )  # moved every step


def test_bias_moves_toward_balance(tmp_path):
    """Frozen weights (lr = 0), a skewed starting bias: only the bias updates can fix it.

    The skew (0.12) exceeds the spread of the router's sigmoid scores (~0.03 at init), so
    experts 0 and 1 take every token at first; gamma = 0.004 per step undoes it in ~30 steps.
    """
    seed_everything(0)
    module = TinySeqTask(tiny_backbone(bias_update_rate=0.004), OptimConfig(lr=0.0))
    moe = next(module.backbone.moe_layers())
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.12, 0.04, -0.04, -0.12]))
    recorder = UpdateRecorder()
    cfg = quiet_cfg(
        tmp_path,
        max_epochs=6,
        enable_checkpointing=False,
        gradient_clip_val=None,
        limit_val_batches=0,
    )
    fit(module, TinyData(n_train=128, batch_size=16), cfg, extra_callbacks=[recorder])

    balances = [max_over_mean(r["counts"]) for r in recorder.records]
    assert len(balances) == 48
    assert balances[0] >= 1.9  # two of four experts take (nearly) all tokens
    late = sum(balances[-8:]) / 8
    assert late < 1.25, balances
    final_bias = moe.expert_bias
    assert final_bias[0] < 0.12 - 0.1 and final_bias[3] > -0.12 + 0.1
    assert abs(float(final_bias.mean())) < 1e-6  # re-centred every update


# ----------------------------------------------------------------------------- 2 ranks


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same weights on every rank
        cfg = MoEConfig(
            n_routed_experts=4, top_k=2, n_shared_experts=1, expert_hidden=32, bias_update_rate=0.01
        )
        moe = MoEFeedForward(32, cfg).train()
        g = torch.Generator().manual_seed(100 + rank)  # different data per rank
        with torch.no_grad():
            moe(torch.randn(2 + rank, 8, 32, generator=g))  # two micro-batches
            moe(torch.randn(1, 8, 32, generator=g))
        local = moe.tokens_per_expert.clone()
        summed = sync_and_update_expert_biases([moe])
        torch.save(
            {
                "local": local,
                "summed": summed[0],
                "bias": moe.expert_bias.clone(),
                "pending": moe.tokens_per_expert.clone(),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_counts_are_summed_over_ranks_before_the_update(tmp_path):
    # fork: the children inherit the imported modules instead of re-importing torch and
    # lightning (seconds each); they run single-threaded, so the parent's OpenMP pool is moot.
    mp.start_processes(
        _rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)

    assert float(r0["local"].sum()) == (3 * 8) * 2 and float(r1["local"].sum()) == (4 * 8) * 2
    assert not torch.equal(r0["local"], r1["local"])
    total = r0["local"] + r1["local"]
    assert torch.equal(r0["summed"], total) and torch.equal(r1["summed"], total)
    # every rank applied the same update, computed from the global counts
    assert torch.equal(r0["bias"], r1["bias"])
    expected = 0.01 * torch.sign(total.mean() - total)
    torch.testing.assert_close(r0["bias"], expected - expected.mean())
    assert float(r0["pending"].sum()) == 0.0 and float(r1["pending"].sum()) == 0.0


def test_warns_when_moe_layers_start_training_in_eval_mode(tmp_path, caplog):
    seed_everything(0)
    module = TinySeqTask(tiny_backbone(), OptimConfig(lr=1e-3))
    module.eval()  # Lightning keeps this mode at fit start
    cfg = quiet_cfg(tmp_path, max_steps=2, enable_checkpointing=False, limit_val_batches=0)
    with caplog.at_level(logging.WARNING, logger="core.callbacks"):
        fit(module, TinyData(), cfg)
    assert any("eval mode at the start of training" in r.getMessage() for r in caplog.records)
    assert float(next(module.backbone.moe_layers()).expert_bias.abs().sum()) == 0.0
