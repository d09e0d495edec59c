"""The lung mask's fast paths against their readable references."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from apps.medical.lung import fill_holes_2d, lung_mask
from apps.medical.synthetic import make_phantom


def test_fill_holes_2d_equals_scipy_binary_fill_holes():
    rng = np.random.default_rng(0)
    n_with_holes = 0
    for _ in range(200):
        shape = tuple(int(v) for v in rng.integers(1, 48, size=2))
        smooth = ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.5, 3.0))
        m = smooth > rng.uniform(0.3, 0.7)
        ref = ndimage.binary_fill_holes(m)
        n_with_holes += int(ref.sum() > m.sum())
        np.testing.assert_array_equal(fill_holes_2d(m), ref)
    assert n_with_holes > 20  # the cases do exercise hole filling


def test_threaded_lung_mask_equals_serial():
    ph = make_phantom(7, 0)
    spacing = (2.5, 2.0, 2.0)
    serial = lung_mask(ph.hu, spacing, workers=1)
    threaded = lung_mask(ph.hu, spacing, workers=4)
    assert serial.sum() > 0.05 * serial.size  # a real lung field, not an empty mask
    np.testing.assert_array_equal(threaded, serial)
