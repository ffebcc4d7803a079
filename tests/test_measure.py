"""node.analysis.measure on synthetic volumes with exactly known answers."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset

from node.analysis.findings import Concept, Segment
from node.analysis.measure import longest_diameter, measure
from node.ingest.volume import SeriesVolume, SourceFrame

TYPE = Concept("52988006", "SCT", "Lesion")
CATEGORY = Concept("49755003", "SCT", "Morphologically Altered Structure")


def series(array: np.ndarray, pixel_spacing=(1.0, 1.0), slice_spacing=1.0, gaps=()) -> SeriesVolume:
    vol = hd.Volume.from_attributes(
        array=array.astype(np.float32),
        image_position=(0.0, 0.0, 0.0),
        image_orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        pixel_spacing=pixel_spacing,
        spacing_between_slices=slice_spacing,
        coordinate_system="PATIENT",
    )
    frames = [None if i in gaps else SourceFrame(Dataset(), None) for i in range(array.shape[0])]
    return SeriesVolume("1.2.3", "CT", vol, frames, [])


def lesion(mask: np.ndarray, kind="lesion") -> Segment:
    return Segment(1, "Lesion 1", kind, CATEGORY, TYPE, mask)


def test_volume_and_intensities():
    array = np.zeros((4, 10, 10))
    array[1, 2:5, 2:5] = 50.0
    array[1, 3, 3] = 80.0
    mask = array > 0
    s = lesion(mask)
    measure(s, series(array, pixel_spacing=(0.5, 0.8), slice_spacing=2.0))
    assert s.volume_ml == pytest.approx(9 * 0.5 * 0.8 * 2.0 / 1000)
    assert s.mean == pytest.approx((8 * 50 + 80) / 9)
    assert s.maximum == 80.0


def test_diameter_is_exact_in_mm_for_anisotropic_pixels():
    mask = np.zeros((3, 20, 20), bool)
    mask[1, 5, 3:13] = True  # one row of 10 pixels: 10 column spacings
    s = lesion(mask)
    measure(s, series(np.zeros(mask.shape), pixel_spacing=(1.3, 0.7)))
    assert s.longest_diameter_mm == pytest.approx(7.0)
    assert s.diameter_slice == 1
    assert sorted(s.diameter_endpoints) == [(5.0, 2.5), (5.0, 12.5)]  # half a pixel beyond the end centres

    mask = np.zeros((3, 20, 20), bool)
    mask[2, 4:10, 7] = True  # one column of 6 pixels: 6 row spacings
    s = lesion(mask)
    measure(s, series(np.zeros(mask.shape), pixel_spacing=(1.3, 0.7)))
    assert s.longest_diameter_mm == pytest.approx(7.8)
    assert s.diameter_slice == 2


def test_diameter_of_a_sphere_and_its_volume():
    n, r = 41, 10.0
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    mask = x**2 + y**2 + z**2 <= r**2
    s = lesion(mask)
    measure(s, series(np.zeros(mask.shape)))
    assert s.longest_diameter_mm == pytest.approx(2 * r, abs=1.0)  # within one pixel
    assert s.diameter_slice == n // 2
    assert s.volume_ml == pytest.approx(4 / 3 * np.pi * r**3 / 1000, rel=0.03)
    (r0, c0), (r1, c1) = s.diameter_endpoints
    assert np.hypot(r1 - r0, c1 - c0) == pytest.approx(s.longest_diameter_mm)


def test_interpolated_slices_count_for_volume_but_not_for_diameter_or_intensity():
    array = np.zeros((5, 30, 30))
    array[1, 10:14, 10:14] = 10.0  # small on an acquired slice
    array[2, 5:25, 5:25] = 99.0  # large, but on an interpolated slice
    mask = array > 0
    s = lesion(mask)
    measure(s, series(array, gaps=(2,)))
    assert s.diameter_slice == 1
    # the 0.5 iso-contour cuts the corners: from (-0.5, 0) to (3.5, 3)
    assert s.longest_diameter_mm == pytest.approx(5.0)
    assert s.volume_ml == pytest.approx((16 + 400) / 1000)
    assert s.mean == 10.0 and s.maximum == 10.0


def test_organs_get_no_diameter_and_empty_masks_measure_zero():
    array = np.ones((2, 8, 8))
    s = lesion(array > 0, kind="organ")
    measure(s, series(array))
    assert s.longest_diameter_mm is None and s.diameter_endpoints is None
    s = lesion(np.zeros((2, 8, 8), bool))
    measure(s, series(array))
    assert s.volume_ml == 0.0 and s.longest_diameter_mm is None


def test_mask_on_the_edge_is_closed():
    mask = np.zeros((1, 6, 6), bool)
    mask[0, 0:6, 0:2] = True
    d = longest_diameter(mask, (1.0, 1.0))
    assert d is not None and d.length_mm == pytest.approx(np.hypot(6, 1))  # (-0.5, 0) to (5.5, 1)


def test_measure_validates_shapes():
    with pytest.raises(ValueError, match="Segment.mask"):
        measure(lesion(np.zeros((2, 8, 8), bool)), series(np.zeros((3, 8, 8))))
    with pytest.raises(ValueError, match="pixel_spacing"):
        longest_diameter(np.zeros((1, 4, 4), bool), (0.0, 1.0))
