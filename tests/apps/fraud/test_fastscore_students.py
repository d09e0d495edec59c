"""apps/fraud/fastscore.py students: the distilled MLP fits with core's distillation loss
(identical to the MSE-on-logits loop it replaced), and the from-scratch MLP shares its
loop: same initial weights, batches and step count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from apps.fraud.fastscore import (
    StudentMLP,
    distill_student,
    scratch_student,
    student_distill_config,
    student_logits,
    student_steps,
)
from apps.fraud.metrics import average_precision

torch.set_num_threads(1)


def _data(n: int = 2000, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    teacher = 2.0 * x[:, 0] - x[:, 1] + 0.5 * x[:, 2] * x[:, 3] - 3.0
    y = (teacher + rng.normal(scale=0.5, size=n) > -1.0).astype(np.int64)
    return x, teacher.astype(np.float32), y


def _mse_loop(x_NF, t_N, hidden, epochs, batch_size, lr, seed) -> StudentMLP:
    """The loop distill_student had before it used core's loss (nn.functional.mse_loss)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student = StudentMLP(x_NF.shape[1], hidden)
    x, t = torch.from_numpy(x_NF), torch.from_numpy(t_N)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch_size):
            b = perm[s : s + batch_size]
            loss = nn.functional.mse_loss(student(x[b]), t[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return student.eval()


def test_default_teacher_term_is_the_previous_mse_on_logits() -> None:
    cfg = student_distill_config()
    assert (cfg.alpha, cfg.kind, cfg.regression_loss) == (1.0, "regression", "mse")
    x, t, _ = _data()
    got = distill_student(x, t, hidden=(16, 8), epochs=3, batch_size=128, seed=3)
    ref = _mse_loop(x, t, (16, 8), 3, 128, 2e-3, 3)
    for a, b in zip(got.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert got.fit_steps == student_steps(len(x), 3, 128) == 3 * 16


def test_scratch_and_distilled_share_init_batches_and_steps() -> None:
    x, t, y = _data()
    kw = {"hidden": (16, 8), "epochs": 8, "batch_size": 128, "seed": 5}
    # lr 0: no update, so both end at their (shared) initial weights
    d0 = distill_student(x, t, lr=0.0, **kw)
    s0 = scratch_student(x, y, 4.0, lr=0.0, **kw)
    for a, b in zip(d0.parameters(), s0.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    d = distill_student(x, t, **kw)
    s = scratch_student(x, y, 4.0, **kw)
    assert d.fit_steps == s.fit_steps == 8 * 16
    assert [p.shape for p in d.parameters()] == [p.shape for p in s.parameters()]

    # each learned its own target: the distilled one the teacher's logits, the scratch one
    # the labels
    def mse(m) -> float:
        return float(np.mean((student_logits(m, x) - t) ** 2))

    assert mse(d) < 0.5 * mse(d0)
    assert np.corrcoef(student_logits(d, x), t)[0, 1] > 0.6
    assert (
        average_precision(y, student_logits(s, x))
        > 0.8
        > average_precision(y, student_logits(s0, x))
    )


def test_distill_student_options_and_errors() -> None:
    x, t, y = _data(600)
    binary = distill_student(x, t, epochs=2, cfg={"kind": "binary", "temperature": 2.0})
    assert np.isfinite(student_logits(binary, x)).all()
    mixed = distill_student(x, t, epochs=2, cfg={"alpha": 0.5}, y_N=y, pos_weight=3.0)
    assert mixed.fit_steps == 2 * 1
    with pytest.raises(ValueError, match="needs one label per row"):
        distill_student(x, t, cfg={"alpha": 0.5})
    with pytest.raises(ValueError, match="equal"):
        scratch_student(x, y[:10])
    assert student_logits(binary, x[:0]).shape == (0,)


def test_unknown_labels_are_taught_by_the_teacher_alone() -> None:
    """Rows inside the label delay (NaN label) add no task term: with every label of a
    batch unknown the mixed loss equals alpha times the teacher term alone, and with
    known labels only the known rows enter the BCE average."""
    x, t, y = _data(512)
    kw = {"hidden": (16, 8), "epochs": 2, "batch_size": 64, "seed": 1}
    y_nan = y.astype(np.float64)
    y_nan[256:] = np.nan
    # alpha 0.5 on half-unknown labels equals a hand-written reference loop
    got = distill_student(x, t, cfg={"alpha": 0.5}, y_N=y_nan, pos_weight=2.0, **kw)

    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    ref = StudentMLP(x.shape[1], (16, 8))
    xt, tt, yt = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y_nan).float()
    opt = torch.optim.AdamW(ref.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=2 * 8)
    for _ in range(2):
        perm = torch.randperm(len(xt), generator=g)
        for s in range(0, len(xt), 64):
            b = perm[s : s + 64]
            out = ref(xt[b])
            mse = nn.functional.mse_loss(out, tt[b])
            k = ~torch.isnan(yt[b])
            bce = nn.functional.binary_cross_entropy_with_logits(
                out[k], yt[b][k], pos_weight=torch.tensor(2.0), reduction="sum"
            ) / max(int(k.sum()), 1)
            loss = 0.5 * mse + 0.5 * bce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    for a, b in zip(got.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert np.isfinite(student_logits(got, x)).all()

    # every label known: the same as the plain mixed loss (no masking path)
    full = distill_student(x, t, cfg={"alpha": 0.5}, y_N=y, pos_weight=2.0, **kw)
    full_f = distill_student(
        x, t, cfg={"alpha": 0.5}, y_N=y.astype(np.float64), pos_weight=2.0, **kw
    )
    for a, b in zip(full.parameters(), full_f.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least one known label"):
        distill_student(x, t, cfg={"alpha": 0.5}, y_N=np.full(len(x), np.nan), **kw)
