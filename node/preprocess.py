"""Source volume -> model grid, and model outputs -> source grid, exactly.

Two steps, each with an exact inverse:

1. *canonical*: the source volume as an axial stack in highdicom's ``FPL``
   orientation (slices head->feet, rows anterior->posterior, columns
   right->left). Axis-aligned sources (any slice order, bottom-up rows,
   transposed, sagittal, coronal) are only permuted and flipped, so no voxel
   moves; oblique sources are resampled (trilinear) onto an axis-aligned grid.
2. *model plane*: every canonical slice is resampled to the model's square
   input (isotropic pixels, the field of view centred and padded), with an
   anti-aliasing blur when shrinking.

Model outputs go back the same way: per-class probabilities are resized to
the canonical slice with linear interpolation (smooth outlines), arg-maxed,
and the label map is permuted/flipped (or nearest-neighbour resampled for
oblique sources) onto the source grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from scipy import ndimage

from node.model_repo import IntensitySpec

CANONICAL = "FPL"
_AIR = {"CT": -1000.0, "MR": 0.0}


def mr_range(image: np.ndarray, spec: IntensitySpec | None = None) -> tuple[float, float]:
    """Robust intensity range of a whole MR series (MR has no absolute scale), from a subsample."""
    spec = spec or IntensitySpec()
    sample = image.ravel()[:: max(1, image.size // 2_000_000)]
    fg = sample[sample > np.percentile(sample, 5) + 1e-3]
    lo, hi = np.percentile(fg if fg.size else sample, spec.mr_percentiles)
    return float(lo), float(max(hi, lo + 1e-6))


def normalise(
    image: np.ndarray,
    modality: str,
    spec: IntensitySpec | None = None,
    mr_scale: tuple[float, float] | None = None,
) -> np.ndarray:
    """(S, H, W) modality values -> (S, C, H, W) float32 model input, one channel per window.

    CT uses fixed HU windows; MR is scaled by the series' robust range
    (``mr_scale``, computed over the whole series by :func:`mr_range`).
    """
    spec = spec or IntensitySpec()
    if modality == "CT":
        chans = [(np.clip(image, lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2) for lo, hi in spec.ct_windows]
    else:
        lo, hi = mr_scale or mr_range(image, spec)
        scaled = np.clip((image - lo) / (hi - lo) * 2 - 1, -1.5, 2.0)
        chans = [scaled] * len(spec.ct_windows)
    return np.stack(chans, axis=1).astype(np.float32)


def is_axis_aligned(volume: hd.Volume, tol: float = 1e-4) -> bool:
    d = np.abs(volume.direction)
    return bool(np.all((d < tol) | (np.abs(d - 1) < tol)))


def to_canonical(volume: hd.Volume) -> hd.Volume:
    """The source volume as an axial FPL stack; resampled only when the source is oblique."""
    if is_axis_aligned(volume):
        return volume.to_patient_orientation(CANONICAL)
    # oblique: axis-aligned grid covering the source's bounding box at its finest spacing
    corners = np.array(
        [
            [i, j, k, 1]
            for i in (0, volume.shape[0] - 1)
            for j in (0, volume.shape[1] - 1)
            for k in (0, volume.shape[2] - 1)
        ],
        float,
    )
    lps = (volume.affine @ corners.T)[:3].T
    lo, hi = lps.min(0), lps.max(0)
    inplane = float(min(volume.pixel_spacing))
    step = float(volume.spacing_between_slices)
    # FPL: axis0 -z (head->feet), axis1 +y, axis2 +x
    shape = (
        int(np.floor((hi[2] - lo[2]) / step)) + 1,
        int(np.floor((hi[1] - lo[1]) / inplane)) + 1,
        int(np.floor((hi[0] - lo[0]) / inplane)) + 1,
    )
    affine = np.eye(4)
    affine[:3, 0] = (0, 0, -step)
    affine[:3, 1] = (0, inplane, 0)
    affine[:3, 2] = (inplane, 0, 0)
    affine[:3, 3] = (lo[0], lo[1], hi[2])
    m = np.linalg.inv(volume.affine) @ affine
    fill = float(volume.array.min())
    array = ndimage.affine_transform(
        volume.array, m[:3, :3], m[:3, 3], output_shape=shape, order=1, cval=fill, mode="constant"
    )
    return hd.Volume(array.astype(np.float32), affine, "PATIENT", volume.frame_of_reference_uid)


def labels_to_source(labels: np.ndarray, canonical: hd.Volume, source: hd.Volume) -> np.ndarray:
    """Label map on the canonical grid -> the same labels on the source grid."""
    lab = canonical.with_array(labels)
    if is_axis_aligned(source):
        return lab.match_geometry(source).array
    m = np.linalg.inv(canonical.affine) @ source.affine
    return ndimage.affine_transform(labels, m[:3, :3], m[:3, 3], output_shape=source.shape, order=0, cval=0)


@dataclass(frozen=True)
class PlaneMap:
    """Maps canonical slice pixels (H, W at spacing sr, sc) to a square model plane and back."""

    shape: tuple[int, int]  # canonical (rows, cols)
    spacing: tuple[float, float]  # canonical (row, col) spacing, mm
    size: int  # model plane size (pixels)

    @property
    def model_spacing(self) -> float:
        return max(n * s for n, s in zip(self.shape, self.spacing, strict=True)) / self.size

    def _pad(self, axis: int) -> float:
        return (self.size * self.model_spacing - self.shape[axis] * self.spacing[axis]) / 2

    def model_to_canonical(self, axis: int) -> np.ndarray:
        """For each model pixel along ``axis``, its (fractional) canonical pixel coordinate."""
        u = np.arange(self.size)
        return ((u + 0.5) * self.model_spacing - self._pad(axis)) / self.spacing[axis] - 0.5

    def canonical_to_model(self, axis: int) -> np.ndarray:
        r = np.arange(self.shape[axis])
        return ((r + 0.5) * self.spacing[axis] + self._pad(axis)) / self.model_spacing - 0.5

    def to_model(self, slices: np.ndarray, fill: float) -> np.ndarray:
        """(S, H, W) canonical -> (S, size, size) model plane, blurred first when shrinking."""
        factors = [self.model_spacing / s for s in self.spacing]
        sigma = [0.0] + [max(0.0, (f - 1) / 2) for f in factors]
        if any(sigma):
            slices = ndimage.gaussian_filter(slices, sigma, mode="nearest")
        out = _lerp(slices, self.model_to_canonical(0), axis=-2, fill=fill)
        return _lerp(out, self.model_to_canonical(1), axis=-1, fill=fill)

    def to_canonical(self, planes: np.ndarray) -> np.ndarray:
        """(..., size, size) model plane -> (..., H, W) canonical, linear interpolation."""
        out = _lerp(planes, self.canonical_to_model(0), axis=-2)
        return _lerp(out, self.canonical_to_model(1), axis=-1)


def _lerp(a: np.ndarray, coords: np.ndarray, axis: int, fill: float | None = None) -> np.ndarray:
    """Linear interpolation of ``a`` along one axis at fractional ``coords``.

    Outside the source range: ``fill`` if given, else the edge value (clamped).
    """
    n = a.shape[axis]
    c = np.clip(coords, 0, n - 1)
    i0 = np.floor(c).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    shape = [1] * a.ndim
    shape[axis] = len(c)
    w = (c - i0).reshape(shape).astype(np.float32)
    out = np.take(a, i0, axis=axis) * (1 - w) + np.take(a, i1, axis=axis) * w
    if fill is not None:
        outside = ((coords < -0.5) | (coords > n - 0.5)).reshape(shape)
        out = np.where(outside, np.float32(fill), out)
    return out.astype(np.float32, copy=False)


def air_value(modality: str) -> float:
    return _AIR.get(modality, 0.0)
