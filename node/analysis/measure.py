"""Measurements of a segment on its source volume: volume, intensity, longest in-plane diameter.

Conventions (also stated in the conformance statement):

- Volume counts every voxel of the mask, interpolated slices included: they
  stand for tissue that lies in the gap between two acquired slices.
- Mean and maximum intensity use acquired slices only (an interpolated value
  was never measured); if the mask lies only on interpolated slices they fall
  back to all of its voxels.
- The longest diameter (lesions only) is the largest Feret diameter of the
  mask's outline within one acquired slice, over all acquired slices the
  lesion crosses. The outline is the 0.5 iso-contour of the mask (marching
  squares), i.e. it runs half-way between inside and outside pixel centres, so
  a run of n pixels measures n pixel spacings. Distances are computed in mm
  with the row and column spacings, so anisotropic pixels are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import ConvexHull, QhullError
from skimage.measure import find_contours

from node.analysis.findings import Segment
from node.ingest.volume import SeriesVolume


@dataclass(frozen=True)
class Diameter:
    length_mm: float
    slice_index: int  # index along the volume's slice axis
    endpoints: tuple[tuple[float, float], tuple[float, float]]  # (row, col) in volume index coordinates


def measure(segment: Segment, volume: SeriesVolume) -> None:
    """Fill ``segment``'s measurement fields from its mask and the source volume."""
    array = volume.volume.array
    shape = segment.mask.shape
    if shape != array.shape[:3]:
        raise ValueError(f"Segment.mask has shape {shape}, the volume has {array.shape[:3]}.")
    if len(volume.frames) != shape[0]:
        raise ValueError(
            f"SeriesVolume.frames has {len(volume.frames)} entries for {shape[0]} volume slices."
        )
    acquired = np.array([f is not None for f in volume.frames], bool)
    if not segment.mask.crop.any():
        segment.volume_ml = 0.0
        segment.mean = segment.maximum = 0.0
        segment.longest_diameter_mm = segment.diameter_slice = segment.diameter_endpoints = None
        return
    box = segment.mask.box  # every step below works on the mask's bounding box only
    mask, array, acquired = segment.mask.crop, array[box], acquired[box[0]]
    count = int(np.count_nonzero(mask))
    segment.volume_ml = count * float(volume.volume.voxel_volume) / 1000.0

    measured = mask & acquired[:, None, None]
    values = array[measured] if measured.any() else array[mask]
    segment.mean = float(np.mean(values, dtype=np.float64))
    segment.maximum = float(np.max(values))

    if segment.kind == "lesion":
        d = longest_diameter(mask, volume.volume.pixel_spacing, acquired)
        segment.longest_diameter_mm = d.length_mm if d else None
        segment.diameter_slice = d.slice_index + box[0].start if d else None
        segment.diameter_endpoints = (
            tuple((r + box[1].start, c + box[2].start) for r, c in d.endpoints) if d else None
        )
    else:
        segment.longest_diameter_mm = segment.diameter_slice = segment.diameter_endpoints = None


def longest_diameter(
    mask: np.ndarray, pixel_spacing: tuple[float, float], acquired: np.ndarray | None = None
) -> Diameter | None:
    """Largest in-plane Feret diameter of a 3D mask over its (acquired) slices; None if there is none."""
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D (slices, rows, cols), got {mask.ndim}D.")
    spacing = np.asarray(pixel_spacing, float)
    if spacing.shape != (2,) or np.any(spacing <= 0):
        raise ValueError(f"pixel_spacing must be two positive numbers, got {pixel_spacing!r}.")
    best: Diameter | None = None
    for i in np.flatnonzero(mask.any(axis=(1, 2))):
        if acquired is not None and not acquired[i]:
            continue
        d = _feret_2d(mask[i], spacing)
        if d is not None and (best is None or d[0] > best.length_mm):
            best = Diameter(d[0], int(i), d[1])
    return best


def outline(plane: np.ndarray) -> list[np.ndarray]:
    """Closed 0.5 iso-contours (N, 2) of a 2D mask in (row, col) index coordinates.

    Traced on the mask's bounding box only (the same squares in the same raster order, so the
    same contours as on the whole plane, just without scanning the empty rest of it).
    """
    box = _bbox(plane)
    if box is None:
        return []
    crop = plane[box]
    padded = np.pad(crop.astype(np.float32), 1)  # contours of regions touching the edge stay closed
    offset = np.array([box[0].start - 1.0, box[1].start - 1.0])
    return [c + offset for c in find_contours(padded, 0.5)]


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box (one slice per axis) holding every true voxel of ``mask``; None if empty."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=others) if others else mask)
        if idx.size == 0:
            return None
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def _feret_2d(plane: np.ndarray, spacing: np.ndarray):
    contours = outline(plane)
    if not contours:
        return None
    idx = np.unique(np.concatenate(contours), axis=0)
    pts = idx * spacing  # mm
    if len(pts) > 3:
        try:
            hull = ConvexHull(pts)
            keep = hull.vertices
            idx, pts = idx[keep], pts[keep]
        except QhullError:  # collinear outline: every point is a candidate
            pass
    diff = pts[:, None, :] - pts[None, :, :]
    dist2 = np.einsum("ijk,ijk->ij", diff, diff)
    a, b = np.unravel_index(int(np.argmax(dist2)), dist2.shape)
    p, q = idx[a], idx[b]
    ends = ((float(p[0]), float(p[1])), (float(q[0]), float(q[1])))
    return float(np.sqrt(dist2[a, b])), ends
