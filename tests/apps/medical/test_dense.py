"""Dense (voxel) heat-map detector: targets, filter bank, model, whole-scan windows, peaks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apps.medical.config import MedicalConfig
from apps.medical.data import Truth
from apps.medical.dense import (
    DenseCropDataset,
    DenseHeatmapModel,
    FilterBank,
    candidates_from_heatmap,
    centernet_focal_loss,
    dense_targets,
    sliding_window_dense,
)
from apps.medical.geometry import make_affine, world_to_index
from apps.medical.preprocess import PreparedScan
from apps.medical.training import split_validation
from tests.apps.medical.tiny import _backbone


def _tiny_model() -> DenseHeatmapModel:
    cfg = MedicalConfig.from_dict({"detector": {"backbone": _backbone(4)}}).detector
    torch.manual_seed(0)
    return DenseHeatmapModel(cfg.backbone, None, (4, 4, 4), stem_channels=4, sigmas_vox=(1.0,))


def test_targets_peak_at_nodule_voxel_and_ignore_excluded():
    nod = np.array([[5.4, 6.6, 7.0]])
    t, w = dense_targets((0, 0, 0), (12, 12, 12), (3, 3, 3), nod, np.array([6.0]), np.zeros((0, 3)))
    assert t[5, 7, 7] == 1.0 and (t == 1.0).sum() == 1
    assert 0.3 < t[6, 7, 7] < 1.0 and t[0, 0, 0] < 1e-6  # sigma 1.5 mm: one voxel away ~0.37
    exc = np.array([[1.0, 1.0, 1.0]])
    _, w2 = dense_targets((0, 0, 0), (12, 12, 12), (3, 3, 3), nod, np.array([6.0]), exc)
    assert w2[1, 1, 1] == 0 and w2[5, 7, 7] == 1 and w2.sum() == w.sum() - (w2 == 0).sum()


def test_filter_bank_eigenvalues_match_numpy():
    bank = FilterBank((1.0,))
    x = torch.rand(1, 1, 9, 10, 11)
    g = bank._smooth(x, bank.g0)
    eig = bank._hessian_eigs(g)[0].permute(1, 2, 3, 0).numpy()
    P = torch.nn.functional.pad(g, (1, 1, 1, 1, 1, 1), mode="replicate")[0, 0].numpy()
    c = P[1:-1, 1:-1, 1:-1]

    def sh(dz, dy, dx):
        return P[1 + dz : 10 + dz, 1 + dy : 11 + dy, 1 + dx : 12 + dx]

    a = sh(1, 0, 0) - 2 * c + sh(-1, 0, 0)
    b = sh(0, 1, 0) - 2 * c + sh(0, -1, 0)
    e = sh(0, 0, 1) - 2 * c + sh(0, 0, -1)
    d = (sh(1, 1, 0) - sh(1, -1, 0) - sh(-1, 1, 0) + sh(-1, -1, 0)) / 4
    f = (sh(1, 0, 1) - sh(1, 0, -1) - sh(-1, 0, 1) + sh(-1, 0, -1)) / 4
    h = (sh(0, 1, 1) - sh(0, 1, -1) - sh(0, -1, 1) + sh(0, -1, -1)) / 4
    H = np.stack([np.stack([a, d, f], -1), np.stack([d, b, h], -1), np.stack([f, h, e], -1)], -2)
    assert np.allclose(eig, np.linalg.eigvalsh(H), atol=1e-5)
    # a bright blob: three negative eigenvalues at its centre
    blob = torch.zeros(1, 1, 15, 15, 15)
    blob[0, 0, 6:9, 6:9, 6:9] = 1.0
    f_all = bank(blob)[0, :, 7, 7, 7]
    assert bool((f_all[2:5] < 0).all())


def test_focal_loss_falls_when_the_centre_is_predicted():
    target = torch.zeros(1, 8, 8, 8)
    target[0, 4, 4, 4] = 1.0
    weight = torch.ones_like(target)
    flat = torch.full_like(target, -4.6)
    good = flat.clone()
    good[0, 4, 4, 4] = 4.0
    assert centernet_focal_loss(good, target, weight) < centernet_focal_loss(flat, target, weight)


def _scan_with_blob(centre_zyx, shape=(20, 24, 28), spacing=(3.0, 3.0, 3.0)):
    img = np.full(shape, 0.1, np.float32)
    zz, yy, xx = np.indices(shape)
    r2 = sum(((g - c) * s) ** 2 for g, c, s in zip((zz, yy, xx), centre_zyx, spacing, strict=True))
    img[r2 <= 36.0] = 0.75
    affine = make_affine(spacing, (10.0, -20.0, -200.0), np.eye(3))
    return PreparedScan(img, np.ones(shape, bool), affine, "1.2.3")


def test_sliding_window_covers_volume_and_candidates_land_in_world_mm():
    model = _tiny_model().eval()
    scan = _scan_with_blob((9.0, 11.0, 13.0))
    prob = sliding_window_dense(model, scan.image, (12, 12, 12), (8, 8, 8), batch_size=5)
    assert prob.shape == scan.image.shape
    assert torch.all((prob > 0) & (prob < 1))
    # a map that peaks at a known voxel: the candidate maps back to that voxel in world mm
    z, y, x = np.indices(scan.image.shape)
    peak = np.exp(-((z - 9.0) ** 2 + (y - 11.3) ** 2 + (x - 13.0) ** 2) / 4.0).astype(np.float32)
    cands = candidates_from_heatmap(torch.from_numpy(peak), scan, 0.05, 6.0, 10)
    top = cands.iloc[0]
    found = world_to_index(scan.affine, [top.coordX, top.coordY, top.coordZ])
    assert np.allclose(found, [9.0, 11.3, 13.0], atol=0.25), found


def _positive_crops(scan, nodules, **kw) -> DenseCropDataset:
    """8 nodule-centred 12^3 crops of one 3 mm scan, one-scale filter bank."""
    return DenseCropDataset(
        [scan],
        [nodules],
        [np.zeros((0, 3))],
        (12, 12, 12),
        (3.0, 3.0, 3.0),
        n_samples=8,
        pos_fraction=1.0,
        bank=FilterBank((1.0,)),
        **kw,
    )


def test_dataset_oversamples_nodules_and_one_step_trains():
    scan = _scan_with_blob((9.0, 11.0, 13.0))
    ds = _positive_crops(scan, (np.array([[9.0, 11.0, 13.0]]), np.array([12.0])))
    items = [ds[i] for i in range(len(ds))]
    assert all(float(it["target_BZYX"].max()) == 1.0 for it in items)  # every crop holds it
    assert items[0]["features"].shape == (5, 12, 12, 12)
    model = _tiny_model()
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model.loss(model(dict(batch)), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_unlabeled_scan_crops_centre_on_given_points_and_add_no_task_loss():
    """A transfer-set scan (``labelled`` False): its positives are drawn near the given
    centres (the blob is in every crop), its target and weight are zero everywhere, so the
    focal loss of a batch with its crops equals the loss of the labelled crops alone."""
    scan = _scan_with_blob((9.0, 11.0, 13.0))
    blob = (np.array([[9.0, 11.0, 13.0]]), np.array([12.0]))
    free = _positive_crops(scan, blob, labelled=[False], augment=False)
    items = [free[i] for i in range(len(free))]
    for it in items:
        assert float(it["target_BZYX"].abs().sum()) == 0.0
        assert float(it["weight_BZYX"].abs().sum()) == 0.0
        assert float(it["features"][0].max()) > 0.5  # the blob (0.75) is in the crop
    labelled = _positive_crops(scan, blob, augment=False)
    lab = [labelled[i] for i in range(4)]
    model = _tiny_model()

    def loss_of(rows):
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        return float(model.loss(model(dict(batch)), batch))

    assert loss_of(lab + items[:4]) == pytest.approx(loss_of(lab), rel=1e-6)
    with pytest.raises(ValueError, match="labelled has 2 flags for 1 scans"):
        _positive_crops(scan, blob, labelled=[True, False])


def test_size_weighted_positive_sampling_follows_the_diameter_power():
    """pos_size_power=2: a 4 mm and a 16 mm nodule are drawn 16:1 (diameter^-2), measured
    over many draws; 0 keeps the uniform choice."""
    scan = _scan_with_blob((9.0, 11.0, 13.0))
    nod = (np.array([[9.0, 11.0, 13.0], [9.0, 11.0, 20.0]]), np.array([4.0, 16.0]))

    def share_of_small(power: float) -> float:
        ds = _positive_crops(scan, nod, pos_size_power=power, seed=3)
        np.testing.assert_allclose(ds.pos_prob.sum(), 1.0)
        # each centre lies within crop/2 - 3 = 3 voxels of its nodule: x < 16.5 is the small one
        xs = np.array([ds._centre()[1][2] for _ in range(4000)])
        return float(np.mean(xs < 16.5))

    assert abs(share_of_small(2.0) - 16 / 17) < 0.02
    assert abs(share_of_small(0.0) - 0.5) < 0.03
    with pytest.raises(ValueError, match="pos_size_power"):
        _positive_crops(scan, nod, pos_size_power=-1.0)


def test_validation_split_is_disjoint_and_seeded():
    scans = [
        PreparedScan(np.zeros((2, 2, 2)), np.ones((2, 2, 2), bool), np.eye(4), str(i))
        for i in range(10)
    ]
    fit, val = split_validation(scans, 0.2, 0)
    assert len(val) == 2 and len(fit) == 8
    assert not {s.seriesuid for s in fit} & {s.seriesuid for s in val}
    assert [s.seriesuid for s in split_validation(scans, 0.2, 0)[1]] == [s.seriesuid for s in val]
    assert split_validation(scans, 0.0, 0) == (scans, [])
    assert isinstance(Truth, type)


@pytest.mark.slow
def test_dense_detector_trains_saves_and_reloads(tmp_path):
    """End to end on 3 tiny DICOM series: dense stage 1 trains through Lightning, picks its
    NMS radius on a validation series, and the saved predictor reloads with identical output."""
    from apps.medical.data import load_raw_scan, prepare, read_truth
    from apps.medical.predictor import NoduleDetector
    from apps.medical.training import fit_detector
    from tests.apps.medical.tiny import tiny_config, tiny_dataset

    root = tiny_dataset(tmp_path / "data")
    cfg = tiny_config(root)
    cfg.data.val_fraction = 0.34
    cfg.fp_reduction.enabled = False
    dc = cfg.detector
    dc.kind, dc.stem_channels, dc.samples_per_epoch, dc.batch_size = "dense", 4, 8, 4
    dc.crop_zyx, dc.stride_zyx, dc.nms_grid_mm = (8, 8, 8), (4, 4, 4), (8.0, 20.0)
    truth = read_truth(root)
    scans = [prepare(cfg, load_raw_scan(root, u)) for u in truth.seriesuids]
    det = fit_detector(cfg, scans, truth)
    assert dc.nms_radius_mm in (8.0, 20.0)
    assert 0.0 <= det.validation_cpm_ <= 1.0  # the CPM that chose the radius, kept for benches
    pred = NoduleDetector(cfg, det)
    pred.save(tmp_path / "model")
    again = NoduleDetector.load(tmp_path / "model")
    assert again.config.detector.kind == "dense"
    raw = load_raw_scan(root, truth.seriesuids[0])
    a, b = pred.detect_volume(raw), again.detect_volume(raw)
    assert len(a) >= 1 and list(a.columns) == [
        "seriesuid",
        "coordX",
        "coordY",
        "coordZ",
        "probability",
    ]
    assert np.allclose(a["probability"], b["probability"]) and (a["probability"] <= 1).all()


def test_torch_preprocessing_matches_scipy():
    """The GPU path of prepare_scan (grid_sample resampling, ball-convolution dilation) gives
    the same grid, affine, image and lung field as the scipy path (run here on CPU)."""
    from scipy import ndimage

    from apps.medical.preprocess import Scan, dilate_mm, prepare_scan, resample, resample_torch
    from apps.medical.synthetic import make_phantom

    ph = make_phantom(3, 0, None)
    scan = Scan(ph.hu, ph.affine, ph.series_uid)
    a, aff_a = resample(ph.hu, ph.affine, (4.0, 4.0, 4.0))
    b, aff_b = resample_torch(ph.hu, ph.affine, (4.0, 4.0, 4.0), "cpu")
    assert a.shape == b.shape and np.allclose(aff_a, aff_b)
    assert np.abs(a - b).max() < 0.05  # HU, float32 rounding of the coordinates
    m = np.zeros((12, 13, 14), bool)
    m[5, 6, 7] = m[2, 2, 2] = True
    ref = ndimage.distance_transform_edt(~m, sampling=(3.0, 2.0, 2.5)) <= 6.0
    assert np.array_equal(dilate_mm(m, (3.0, 2.0, 2.5), 6.0, "cpu"), ref)
    p1 = prepare_scan(scan, (4.0, 4.0, 4.0))
    p2 = prepare_scan(scan, (4.0, 4.0, 4.0), device="cpu")
    assert (p1.lung != p2.lung).mean() < 0.001 and np.abs(p1.image - p2.image).max() < 0.01


def test_filter_bank_is_flip_equivariant_so_feature_flips_are_valid_augmentations():
    """DenseCropDataset augments by flipping precomputed features (not the scan); that is
    only sound when the features of a flipped scan are the flipped features (symmetric
    Gaussians, reflection-invariant Hessian eigenvalues)."""
    bank = FilterBank()
    vol = torch.rand(1, 1, 14, 15, 16)
    f = bank(vol)
    for axis in (2, 3, 4):  # float32 closed-form eigenvalues: ~1e-5 of the channel scale
        err = (bank(vol.flip(axis)) - f.flip(axis)).abs().amax(dim=(0, 2, 3, 4))
        assert torch.all(err <= 1e-4 * f.abs().amax(dim=(0, 2, 3, 4)).clamp_min(1.0)), err


def test_tta_flips_averages_the_map_and_its_three_axis_flips():
    model = _tiny_model().eval()
    scan = _scan_with_blob((9.0, 11.0, 13.0))
    args = ((12, 12, 12), (8, 8, 8), 5)
    plain = sliding_window_dense(model, scan.image, *args)
    tta = sliding_window_dense(model, scan.image, *args, tta_flips=True)
    img = torch.from_numpy(scan.image)
    manual = [plain] + [
        sliding_window_dense(model, img.flip(a).contiguous(), *args).flip(a) for a in range(3)
    ]
    assert torch.allclose(tta, torch.stack(manual).mean(0), atol=1e-6)
    assert not torch.allclose(tta, plain, atol=1e-4)  # the flips do change the map


def test_scoring_batch_defaults_to_the_training_batch_and_is_validated():
    """``detector.infer_batch_size`` sets the windows per forward when scoring whole scans
    (None: ``batch_size``); a value below 1 is refused naming the field."""
    import pytest

    from apps.medical.errors import MedicalDataError

    cfg = MedicalConfig.from_dict({"detector": {"batch_size": 16}})
    assert cfg.detector.scoring_batch_size == 16
    cfg = MedicalConfig.from_dict({"detector": {"batch_size": 16, "infer_batch_size": 128}})
    assert cfg.detector.scoring_batch_size == 128
    with pytest.raises(MedicalDataError, match="infer_batch_size=0"):
        MedicalConfig.from_dict({"detector": {"infer_batch_size": 0}})


def test_batched_window_accumulation_equals_the_per_window_loop():
    """The GPU path (one gather and one index_add_ per batch of windows) against the
    readable per-window loop, on the CPU: same heat map, with and without TTA, with a last
    batch shorter than the others and windows overlapping unevenly at the far faces."""
    model = _tiny_model().eval()
    scan = _scan_with_blob((9.0, 11.0, 13.0))
    args = ((12, 12, 12), (8, 8, 8), 4)  # 2 x 3 x 3 = 18 windows: the last batch holds 2
    for tta in (False, True):
        loop = sliding_window_dense(model, scan.image, *args, tta_flips=tta, accumulate="loop")
        fast = sliding_window_dense(model, scan.image, *args, tta_flips=tta, accumulate="batched")
        assert fast.shape == loop.shape == scan.image.shape
        assert torch.allclose(fast, loop, atol=1e-6), (fast - loop).abs().max()
    with pytest.raises(ValueError, match="accumulate"):
        sliding_window_dense(model, scan.image, *args, accumulate="fast")


def test_occupied_window_starts_match_a_direct_scan_of_every_window():
    """The summed-volume count keeps exactly the windows holding a voxel > 0, in z-major
    order, including windows whose only occupied voxel sits on a face or a corner."""
    from apps.medical.dense import occupied_window_starts
    from apps.medical.model import window_starts

    rng = np.random.default_rng(3)
    vol = np.zeros((21, 26, 30), np.float32)
    vol[rng.random(vol.shape) < 0.002] = 1.0
    vol[0, 0, 0] = vol[20, 25, 29] = 0.5  # the first and last voxels
    crop, stride = (8, 8, 8), (6, 7, 5)
    want = [
        (a, b, c)
        for a in window_starts(21, 8, 6)
        for b in window_starts(26, 8, 7)
        for c in window_starts(30, 8, 5)
        if vol[a : a + 8, b : b + 8, c : c + 8].any()
    ]
    got = occupied_window_starts(torch.from_numpy(vol), crop, stride)
    assert got == want
    n_all = (
        len(window_starts(21, 8, 6)) * len(window_starts(26, 8, 7)) * len(window_starts(30, 8, 5))
    )
    assert 0 < len(want) < n_all  # some windows are empty, so the test can tell
    assert occupied_window_starts(torch.zeros(8, 8, 8), crop, stride) == []


def test_filter_bank_falls_back_to_eager_eigenvalues_when_compiling_fails(monkeypatch):
    """The CUDA path compiles the Hessian eigenvalues; where compiling fails (no Triton,
    no compiler) the eager reference is used, with a warning, and the result is the same."""
    import apps.medical.dense as dense

    def broken(*args, **kwargs):
        raise RuntimeError("no inductor here")

    monkeypatch.setattr(dense, "_COMPILED_EIGS", lambda g: broken())
    g = torch.randn(1, 1, 6, 7, 8)
    with pytest.warns(UserWarning, match="eager instead"):
        got = dense._hessian_eigs_compiled(g)
    torch.testing.assert_close(got, dense.FilterBank._hessian_eigs(g), rtol=0, atol=0)
    assert dense._COMPILED_EIGS is False  # not tried again
    again = dense._hessian_eigs_compiled(g)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
