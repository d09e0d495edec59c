"""``python -m bench.train_bench ddp2 --tiny``: the 2-GPU scaling bench's code path on CPU
(two gloo processes), checked for what its GPU figures rest on: the 1-process and 2-process
runs see the same global batches (equal losses), full sharding halves each rank's state,
and the Lightning FSDP2 run reloads from its sharded checkpoint to the same logits."""

from __future__ import annotations

import argparse

import pytest

from bench.scale_bench import cmd_ddp2


@pytest.mark.slow
def test_ddp2_tiny_same_losses_half_state_and_reload(clean_dist_env, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    value, d = cmd_ddp2(argparse.Namespace(tiny=True, return_results=True))

    assert 0 < value < 10
    assert d["max_loss_gap_vs_single_accum"]["ddp"] < 1e-5
    assert d["max_loss_gap_vs_single_accum"]["fsdp2"] < 1e-5
    assert d["lightning_max_loss_gap_fsdp2_vs_single"] < 1e-5
    first, last = d["loss_first_last"]["single_accum"]
    assert last < first  # the curves being compared actually move
    state = d["state_gb_per_rank"]
    assert state["fsdp2"] == pytest.approx(state["single"] / 2, rel=0.02)
    assert state["ddp"] == pytest.approx(state["single"], rel=1e-6)
    reload = d["lightning_reload_max_abs_gap"]
    assert reload["checkpoint_vs_gathered"] < 1e-6 and reload["gathered_vs_sharded"] < 1e-5
    assert reload["logit_scale"] > 0.1


def test_fsdp2_one_device_tiny_matches_unsharded_and_reloads(clean_dist_env):
    """``python -m bench.train_bench fsdp2-1gpu --tiny``: FSDP2 through the engine on one
    process equals the unsharded engine run, and its checkpoint reloads exactly."""
    from bench.scale_bench import cmd_fsdp2_one_gpu

    value, d = cmd_fsdp2_one_gpu(argparse.Namespace(tiny=True, return_results=True))
    bf16 = d["variants"]["bf16"]  # fp32 on the CPU (the name is the GPU run's precision)
    assert value == bf16["max_loss_gap_fsdp2_vs_unsharded"] < 1e-5
    first, last = bf16["loss_first_last"]["fsdp2"]
    assert last < first
    reload = bf16["reload_max_abs_gap"]
    assert reload["checkpoint_vs_gathered"] < 1e-6 and reload["gathered_vs_sharded"] < 1e-5


def test_fp8_emulated_under_fsdp2_matches_unsharded_and_reloads(clean_dist_env, tmp_path):
    """The CPU path of FP8 composed with FSDP2 through the engine (the GPU runs use torchao):
    emulated-FP8 linears (bf16-true underneath) under a 1-process fsdp2 mesh give the
    unsharded run's losses, the loss moves, and the sharded checkpoint reloads exactly."""
    import json

    from bench.scale_bench import _lightning_worker, _lm_settings

    losses, runs = {}, {}
    for strategy in ("auto", "fsdp2"):
        run = {
            **_lm_settings(argparse.Namespace(), tiny=True),
            "batch": 4,
            "accum": 1,
            "steps": 4,
            "strategy": strategy,
            "precision": "fp8-emulated",
            "fp8_min_features": 16,
        }
        out = tmp_path / f"{strategy}.json"
        _lightning_worker(0, 1, run, str(out))
        runs[strategy] = json.loads(out.read_text())
        losses[strategy] = runs[strategy]["losses"]
    assert max(abs(a - b) for a, b in zip(losses["auto"], losses["fsdp2"], strict=True)) < 1e-5
    assert losses["fsdp2"][-1] < losses["fsdp2"][0]
    reload = runs["fsdp2"]["reload_max_abs_gap"]
    assert reload["checkpoint_vs_gathered"] < 1e-6
    # the sharded forward runs bf16 weights and emulated FP8 matmuls, the gathered copy fp32
    assert reload["gathered_vs_sharded"] < 0.05 * reload["logit_scale"]


def test_ddp2_plan_keeps_the_full_plan_and_adds_engine_weak_scaling() -> None:
    from bench.scale_bench import ddp2_plan

    full = ddp2_plan(16, 64, (60, 20), fp8_compile=True)
    names = [n for n, *_ in full]
    assert names[:7] == [
        "single_accum",
        "ddp",
        "fsdp2",
        "single",
        "single_large",
        "ddp_large",
        "fsdp2_large",
    ]
    assert names[7:] == [
        "lightning_single",
        "lightning_fsdp2",
        "lightning_single_fp8",
        "lightning_fsdp2_fp8",
    ]
    by_name = {n: (world, a) for n, _, world, a in full}
    assert by_name["lightning_single"] == (1, {"batch": 32, "accum": 1, "steps": 60})
    assert by_name["lightning_fsdp2_fp8"][1]["precision"] == "fp8"
    engine = {n: (world, a) for n, _, world, a in ddp2_plan(16, 64, (60, 20), engine_only=True)}
    assert set(engine) == {
        "lightning_single",
        "lightning_fsdp2",
        "lightning_single_large",
        "lightning_fsdp2_large",
    }
    # weak scaling: one GPU runs the same micro-batch as each rank
    assert engine["lightning_single_large"] == (1, {"batch": 64, "accum": 1, "steps": 20})
    assert engine["lightning_fsdp2_large"] == (2, {"batch": 64, "accum": 1, "steps": 20})


@pytest.mark.slow
def test_ddp2_engine_only_tiny_reports_engine_scaling(clean_dist_env, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    value, d = cmd_ddp2(argparse.Namespace(tiny=True, return_results=True, engine_only=True))

    eng = d["engine_bf16"]
    assert value == eng["weak_scaling_efficiency_large_batch"] > 0
    tps = eng["tokens_per_s"]
    assert value == pytest.approx(
        tps["lightning_fsdp2_large"] / (2 * tps["lightning_single_large"])
    )
    assert eng["max_loss_gap_fsdp2_vs_single"] < 1e-5
    assert eng["reload_max_abs_gap"]["checkpoint_vs_gathered"] < 1e-6
    assert eng["state_gb_per_rank"]["lightning_fsdp2"] == pytest.approx(
        eng["state_gb_per_rank"]["lightning_single"] / 2, rel=0.02
    )
    assert "single_accum" not in d["runs"] and "engine_fp8" not in d
