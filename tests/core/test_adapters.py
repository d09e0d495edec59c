"""Token adapters: shapes, locality (a token sees only its own feature/patch), unknowns."""

from __future__ import annotations

import pytest
import torch

from core.adapters import FeatureTokenizer, PatchEmbed1d, PatchEmbed3d, sincos_3d
from core.errors import KeelInputError

D = 16


# ------------------------------------------------------------------ FeatureTokenizer
def _tok(cls_token: bool = True) -> FeatureTokenizer:
    torch.manual_seed(0)
    return FeatureTokenizer(3, [4, 2], D, cls_token=cls_token)


def _rows() -> tuple[torch.Tensor, torch.Tensor]:
    x_num = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -3.0]])
    x_cat = torch.tensor([[0, 1], [3, 0]])
    return x_num, x_cat


def test_feature_tokenizer_shapes_and_cls_first() -> None:
    tok = _tok()
    x_num, x_cat = _rows()
    out = tok(x_num, x_cat)
    assert out.shape == (2, 1 + 3 + 2, D) and tok.n_tokens == 6
    torch.testing.assert_close(out[:, 0], tok.cls.expand(2, D))
    assert _tok(cls_token=False)(x_num, x_cat).shape == (2, 5, D)
    only_num = FeatureTokenizer(2, [], D)
    assert only_num(torch.randn(4, 2)).shape == (4, 3, D)
    only_cat = FeatureTokenizer(0, [5], D, cls_token=False)
    assert only_cat(None, torch.tensor([[1], [2]])).shape == (2, 1, D)


def test_numeric_token_is_affine_per_feature_and_local() -> None:
    tok = _tok()
    x_num, x_cat = _rows()
    out = tok(x_num, x_cat)
    torch.testing.assert_close(out[0, 2], x_num[0, 1] * tok.num_weight_ND[1] + tok.num_bias_ND[1])
    x2 = x_num.clone()
    x2[0, 1] += 3.0
    changed = (tok(x2, x_cat) - out).abs().amax(-1) > 0
    assert changed.tolist() == [[False, False, True, False, False, False], [False] * 6]


def test_unknown_and_missing_categories_share_the_unknown_row() -> None:
    tok = _tok()
    x_num, _ = _rows()
    codes = torch.tensor([[-1, 1], [4, 1], [99, 1], [2, 1]])
    out = tok(x_num[[0, 0, 0, 0]], codes)
    cat0 = out[:, 4]  # first categorical token
    torch.testing.assert_close(cat0[0], cat0[1])
    torch.testing.assert_close(cat0[0], cat0[2])
    assert not torch.allclose(cat0[0], cat0[3])
    torch.testing.assert_close(cat0[0], tok.cat_embed.weight[4])  # row c_0 = 4 of table 0
    # the second feature's table is separate: code 1 of feature 1 is row 5 + 1
    torch.testing.assert_close(out[0, 5], tok.cat_embed.weight[6])


def test_nan_numeric_uses_missing_token_and_gradients_flow() -> None:
    tok = _tok()
    x_num, x_cat = _rows()
    x_num[1, 2] = float("nan")
    out = tok(x_num, x_cat)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1, 3], tok.num_missing_ND[2])
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in tok.parameters())
    assert tok.num_missing_ND.grad[2].abs().sum() > 0


def test_feature_tokenizer_rejects_bad_input() -> None:
    tok = _tok()
    x_num, x_cat = _rows()
    with pytest.raises(KeelInputError, match=r"\[B, 3\]"):
        tok(x_num[:, :2], x_cat)
    with pytest.raises(KeelInputError, match="integer codes"):
        tok(x_num, x_cat.float())
    with pytest.raises(KeelInputError, match=r"\[B, 2\]"):
        tok(x_num, None)
    with pytest.raises(KeelInputError, match="batch sizes"):
        tok(x_num, x_cat[:1])
    with pytest.raises(ValueError):
        FeatureTokenizer(0, [], D)


# ------------------------------------------------------------------ PatchEmbed1d
def test_patch1d_shapes_and_causal_locality() -> None:
    torch.manual_seed(0)
    pe = PatchEmbed1d(n_channels=3, patch_len=4, d_model=D)
    x = torch.randn(2, 20, 3)
    out = pe(x)
    assert out.shape == (2, 1 + 5, D)
    for t in (0, 5, 19):
        x2 = x.clone()
        x2[0, t, 1] += 1.0
        changed = ((pe(x2) - out).abs().amax(-1) > 0)[0]
        expected = torch.zeros(6, dtype=torch.bool)
        expected[1 + t // 4] = True
        assert torch.equal(changed, expected), (t, changed)


def test_patch1d_left_pads_remainder_and_masks_it() -> None:
    torch.manual_seed(0)
    pe = PatchEmbed1d(n_channels=2, patch_len=4, d_model=D)
    x = torch.randn(
        1, 10, 2
    )  # 2 padded steps on the left: patches [pad pad x0 x1], [x2..x5], [x6..x9]
    tokens, mask = pe.forward_with_mask(x)
    assert tokens.shape == (1, 1 + 3, D) and mask.tolist() == [[False] * 4]
    patches, step_pad = pe.patchify(x)
    torch.testing.assert_close(patches[0, 2], x[0, 6:10].reshape(-1))  # last patch = latest steps
    assert step_pad[0, 0].tolist() == [True, True, False, False]
    x2 = x.clone()
    x2[0, 1] += 1.0  # step 1 lives in the first patch
    changed = ((pe(x2) - tokens).abs().amax(-1) > 0)[0]
    assert changed.tolist() == [False, True, False, False]
    strict = PatchEmbed1d(2, 4, D, remainder="error")
    with pytest.raises(KeelInputError, match="not a multiple"):
        strict(x)


def test_patch1d_time_padding_mask_gives_token_mask() -> None:
    torch.manual_seed(0)
    pe = PatchEmbed1d(n_channels=1, patch_len=2, d_model=D)
    x = torch.randn(2, 8, 1)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[0, :5] = True  # left padding of a short series: patches 0, 1 fully, patch 2 partly
    tokens, mask = pe.forward_with_mask(x, pad)
    assert mask.tolist() == [[False, True, True, False, False], [False] * 5]
    x2 = x.clone()
    x2[pad] = 1e3  # values under the mask do not matter
    torch.testing.assert_close(pe.forward_with_mask(x2, pad)[0], tokens)


def test_patch1d_limits() -> None:
    pe = PatchEmbed1d(n_channels=1, patch_len=2, d_model=D, max_patches=3)
    with pytest.raises(KeelInputError, match="max_patches"):
        pe(torch.randn(1, 8, 1))
    with pytest.raises(KeelInputError, match=r"\[B, L, 1\]"):
        pe(torch.randn(1, 4, 2))


# ------------------------------------------------------------------ PatchEmbed3d
def test_patch3d_shapes_grid_and_locality() -> None:
    torch.manual_seed(0)
    pe = PatchEmbed3d(in_channels=2, patch_size=(2, 2, 4), d_model=D)
    x = torch.randn(1, 2, 4, 6, 8)
    grid = pe.grid_shape(x.shape)
    assert grid == (2, 3, 2) and pe.grid_shape((4, 6, 8)) == grid
    out = pe(x)
    assert out.shape == (1, 12, D)
    x2 = x.clone()
    x2[0, 1, 3, 2, 5] += 1.0  # voxel (3, 2, 5) -> patch (1, 1, 1) -> flat 1*6 + 1*2 + 1 = 9
    changed = ((pe(x2) - out).abs().amax(-1) > 0)[0]
    assert changed.nonzero().flatten().tolist() == [9]
    grid_tokens = pe.tokens_to_grid(out, grid)
    assert grid_tokens.shape == (1, D, 2, 3, 2)
    torch.testing.assert_close(grid_tokens[0, :, 1, 1, 1], out[0, 9])


def test_patch3d_sincos_works_for_any_grid_and_sliding_windows() -> None:
    torch.manual_seed(0)
    pe = PatchEmbed3d(in_channels=1, patch_size=2, d_model=24, cls_token=True)
    vol = torch.randn(1, 1, 8, 8, 8)
    big = pe(vol)
    small = pe(vol[:, :, :4, :4, :4])  # a window with a different grid size
    assert big.shape == (1, 1 + 64, 24) and small.shape == (1, 1 + 8, 24)
    # same content at the same (window-relative) grid position -> same token
    torch.testing.assert_close(small[0, 1], big[0, 1])
    # a window at grid offset (2, 0, 0) placed in the global frame matches the big volume
    shifted = pe(vol[:, :, 4:, :4, :4], offset=(2, 0, 0))
    torch.testing.assert_close(shifted[0, 1], big[0, 1 + 2 * 16])
    code = sincos_3d((2, 3, 4), 24)
    assert code.shape == (24, 24) and code.abs().max() <= 1.0
    assert len({tuple(r.tolist()) for r in code}) == 24  # every position distinct


def test_patch3d_learned_positions_and_errors() -> None:
    pe = PatchEmbed3d(1, 2, D, max_patches=8, pos_encoding="learned")
    assert pe(torch.randn(2, 1, 4, 4, 4)).shape == (2, 8, D)
    with pytest.raises(KeelInputError, match="max_patches"):
        pe(torch.randn(1, 1, 4, 4, 6))
    with pytest.raises(KeelInputError, match="multiple of patch_size"):
        pe(torch.randn(1, 1, 4, 4, 5))
    with pytest.raises(KeelInputError, match=r"\[B, 1, Z, Y, X\]"):
        pe(torch.randn(1, 2, 4, 4, 4))
