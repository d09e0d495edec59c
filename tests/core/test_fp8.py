"""FP8: the layer filter, the emulated tensorwise recipe's numerics, and the trainer wiring."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

from core.engine import TrainerConfig, build_trainer, fit
from core.precision import (
    E4M3,
    E5M2,
    EmulatedFloat8Linear,
    Float8LinearFilter,
    Float8Training,
    PrecisionUnavailableError,
    convert_to_emulated_float8,
    emulated_float8_linear,
    fake_quantize_float8,
    float8_layer_names,
    sqnr_db,
    to_float8,
)
from tests.core.test_engine import TinyData, new_task, quiet_cfg

# ----------------------------------------------------------------------------- filter


def test_filter_picks_only_aligned_large_linears():
    with torch.device("meta"):
        model = nn.ModuleDict(
            {
                "big": nn.Linear(2048, 4096),  # yes: both multiples of 16, min 2048
                "wide": nn.Linear(2048, 8192),  # yes
                "router": nn.Linear(4096, 64),  # no: out 64 < 2048
                "unaligned": nn.Linear(2056, 4096),  # no: 2056 % 16 = 8
                "small": nn.Linear(1024, 4096),  # no: below the size floor
                "head": nn.Linear(4096, 4096),  # no: excluded by name
                "conv": nn.Conv1d(4096, 4096, 1),  # no: not a Linear
                "blocks": nn.ModuleList([nn.Sequential(nn.Linear(4096, 4096), nn.ReLU())]),
            }
        )
    fp8_filter = Float8LinearFilter(exclude=("head",))
    convert_to_emulated_float8(model, fp8_filter)
    assert sorted(float8_layer_names(model)) == ["big", "blocks.0.0", "wide"]
    assert type(model["router"]) is nn.Linear and type(model["head"]) is nn.Linear
    assert Float8LinearFilter(min_features=64)(model["router"], "router")


def test_filter_on_the_backbone_skips_router_and_gates():
    module = new_task()
    backbone = module.backbone
    expected = {
        name
        for name, m in backbone.named_modules()
        if isinstance(m, nn.Linear)
        and m.in_features % 16 == 0
        and m.out_features % 16 == 0
        and min(m.in_features, m.out_features) >= 32
    }
    converted = module.convert_to_float8("emulated", Float8LinearFilter(min_features=32))
    assert set(converted) == expected
    assert "blocks.0.attn.qkv" in converted and "blocks.1.ffn.shared.w2" in converted
    assert not any(name.endswith(("router", "gate")) for name in converted)
    assert module.convert_to_float8("emulated", Float8LinearFilter(min_features=32)) == converted


# ----------------------------------------------------------------------------- numerics


def _layer(n_in: int = 256, n_out: int = 512, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


def test_per_layer_sqnr_against_bf16_forward_and_backward():
    torch.manual_seed(1)
    x = torch.randn(64, 256)
    grad_out = torch.randn(64, 512)

    x_ref = x.bfloat16().requires_grad_()
    ref_layer = _layer().bfloat16()
    ref = ref_layer(x_ref)
    ref.backward(grad_out.bfloat16())

    fp8_layer = EmulatedFloat8Linear.from_linear(_layer().bfloat16())
    x_fp8 = x.bfloat16().requires_grad_()
    out = fp8_layer(x_fp8)
    out.backward(grad_out.bfloat16())

    assert out.dtype == torch.bfloat16
    # seen: 28.7 dB forward, 24.6 dB for both gradients (the same with torchao on an H200);
    # e5m2 keeps 2 mantissa bits, so gradients are noisier than the e4m3 forward
    assert sqnr_db(ref, out) >= 18.0
    assert sqnr_db(x_ref.grad, x_fp8.grad) >= 20.0
    assert sqnr_db(ref_layer.weight.grad, fp8_layer.weight.grad) >= 20.0
    torch.testing.assert_close(
        fp8_layer.bias.grad, ref_layer.bias.grad
    )  # bias stays high precision
    assert sqnr_db(ref, out) < 60.0  # it really is quantised


def test_forward_matches_torch_scaled_mm():
    """Emulation == the FP8 GEMM torchao calls (``torch._scaled_mm``), up to bf16 rounding."""
    torch.manual_seed(0)
    x = torch.randn(48, 128)
    w = torch.randn(64, 128) * 0.05
    x_bits, x_scale = to_float8(x, E4M3)
    w_bits, w_scale = to_float8(w, E4M3)
    real = torch._scaled_mm(
        x_bits,
        w_bits.t(),
        scale_a=x_scale.reciprocal(),
        scale_b=w_scale.reciprocal(),
        out_dtype=torch.bfloat16,
    )
    emulated = emulated_float8_linear(x.bfloat16(), w.bfloat16())
    # inputs rounded to bf16 first can move a value across an FP8 rounding boundary, so
    # compare to scaled_mm on the same bf16-rounded operands
    xb_bits, xb_scale = to_float8(x.bfloat16(), E4M3)
    wb_bits, wb_scale = to_float8(w.bfloat16(), E4M3)
    real_b = torch._scaled_mm(
        xb_bits,
        wb_bits.t(),
        scale_a=xb_scale.reciprocal(),
        scale_b=wb_scale.reciprocal(),
        out_dtype=torch.bfloat16,
    )
    torch.testing.assert_close(emulated, real_b, rtol=2**-7, atol=1e-6)
    assert sqnr_db(real.float(), emulated.float()) > 30.0


def test_backward_quantises_the_output_gradient_to_e5m2():
    torch.manual_seed(0)
    x = torch.randn(32, 64, requires_grad=True)
    w = torch.randn(48, 64, requires_grad=True)
    g = torch.randn(32, 48)
    emulated_float8_linear(x, w).backward(g)
    gq5, xq, wq = (
        fake_quantize_float8(g, E5M2),
        fake_quantize_float8(x, E4M3),
        fake_quantize_float8(w, E4M3),
    )
    torch.testing.assert_close(x.grad, gq5 @ wq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, gq5.t() @ xq, rtol=1e-5, atol=1e-5)
    gq4 = fake_quantize_float8(g, E4M3)
    assert not torch.allclose(x.grad, gq4 @ wq, rtol=1e-5, atol=1e-5)


def test_scaling_uses_amax_and_saturates():
    x = torch.tensor([0.5, -2.0, 1.0])
    bits, scale = to_float8(x, E4M3)
    assert float(scale) == pytest.approx(448.0 / 2.0)
    assert float(bits.float().abs().max()) == 448.0  # amax maps onto the FP8 max
    zeros = torch.zeros(4, 8, requires_grad=True)
    out = emulated_float8_linear(zeros, torch.randn(16, 8))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(zeros.grad).all()


def test_conversion_keeps_parameters_and_state_dict_keys():
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    params_before = [id(p) for p in model.parameters()]
    keys_before = list(model.state_dict())
    convert_to_emulated_float8(model, Float8LinearFilter(min_features=16))
    assert [type(m).__name__ for m in model] == [
        "EmulatedFloat8Linear",
        "GELU",
        "EmulatedFloat8Linear",
    ]
    assert [id(p) for p in model.parameters()] == params_before
    assert list(model.state_dict()) == keys_before
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(4, 32)).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- trainer wiring


def test_fp8_without_hardware_raises_a_clear_error():
    with pytest.raises(PrecisionUnavailableError) as info:
        build_trainer(TrainerConfig(precision="fp8", accelerator="cpu"))
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "accelerator='cpu'" in message and "fp8-emulated" in message
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in message
    if importlib.util.find_spec("torchao") is None:
        assert "torchao is not installed" in message


def _train_and_validate(tmp_path, precision: str, **kw):
    module = new_task(seed=0, lr=1e-3, warmup_steps=5)
    cfg = quiet_cfg(
        tmp_path / precision,
        precision=precision,
        max_steps=30,
        check_val_every_n_epoch=100,  # validate once, after training
        enable_checkpointing=False,
        seed=0,
        **kw,
    )
    data = TinyData(n_train=256, n_val=256)
    trainer = fit(module, data, cfg)
    val_loss = float(trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"])
    return module, trainer, val_loss


def test_emulated_fp8_training_tracks_bf16(tmp_path):
    """30 steps of FP8 (emulated) vs bf16, same seed, same bf16-true weights: val loss within 2%.

    Seen here over seeds 0-2: gaps of 0.03-0.06% at lr 1e-3; at lr 2e-3 one seed in three
    jumped to 2.5% (a discrete routing flip in the MoE, not FP8 noise as such).
    """
    _, _, bf16_loss = _train_and_validate(tmp_path, "bf16-true")
    module, trainer, fp8_loss = _train_and_validate(tmp_path, "fp8-emulated", fp8_min_features=16)

    fp8_cb = next(cb for cb in trainer.callbacks if isinstance(cb, Float8Training))
    assert fp8_cb.backend == "emulated"
    assert len(fp8_cb.converted) == 10 and float8_layer_names(module.backbone) == fp8_cb.converted
    assert module.backbone.blocks[0].attn.qkv.weight.dtype == torch.bfloat16  # bf16-true
    assert bf16_loss < 0.8 * math.log(2.0)  # both runs learned something
    assert fp8_loss != bf16_loss  # FP8 changed the numerics...
    assert abs(fp8_loss - bf16_loss) <= 0.02 * bf16_loss, (fp8_loss, bf16_loss)  # ...but little


def test_fp8_emulated_flag_equals_precision_name():
    cfg = TrainerConfig(
        precision="fp8", fp8_emulated=True, accelerator="cpu", enable_progress_bar=False
    )
    trainer = build_trainer(cfg)
    assert trainer.precision == "bf16-true"
    assert any(
        isinstance(cb, Float8Training) and cb.backend == "emulated" for cb in trainer.callbacks
    )
