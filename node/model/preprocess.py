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
from functools import lru_cache

import highdicom as hd
import numpy as np
from scipy import ndimage

from node.model.manifest import InputSpec, IntensitySpec
from node.model.resize import resize_bicubic_aa

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
    """(S, H, W) modality values -> (S, C, H, W) float32 model input (see :class:`IntensitySpec`).

    ``windows``: CT through fixed HU windows, one channel each; MR scaled by the series' robust range
    (``mr_scale``, computed over the whole series by :func:`mr_range`). ``zscore``: each slice on its
    own (CT clipped below ``clip_below`` first). ``dataset``: the training set's mean and std.
    """
    spec = spec or IntensitySpec()
    if spec.kind == "zscore":
        x = np.asarray(image, np.float64)
        if modality == "CT" and spec.clip_below is not None:
            x = np.maximum(x, spec.clip_below)
        mean = x.mean(axis=(-2, -1), keepdims=True)
        std = x.std(axis=(-2, -1), keepdims=True)
        return ((x - mean) / (std + spec.eps))[:, None].astype(np.float32)
    if spec.kind == "dataset":
        return ((np.asarray(image, np.float32) - spec.mean) / spec.std)[:, None].astype(np.float32)
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
    # Outside the tilted slab, repeat the edge rather than fill with air: an artificial straight
    # air boundary through the body would look like lung to a slice model.
    array = ndimage.affine_transform(
        volume.array, m[:3, :3], m[:3, 3], output_shape=shape, order=1, mode="nearest"
    )
    return hd.Volume(array.astype(np.float32), affine, "PATIENT", volume.frame_of_reference_uid)


def acquired(source: hd.Volume, canonical: hd.Volume) -> np.ndarray:
    """Which voxels of ``canonical`` (:func:`to_canonical` of ``source``) lie inside the acquired
    volume: outside a tilted slab the resampled grid only repeats its edge."""
    m = np.linalg.inv(source.affine) @ canonical.affine
    index = [np.arange(n, dtype=np.float32).reshape([-1 if a == b else 1 for b in range(3)]) for a, n in enumerate(canonical.shape)]
    inside = np.ones(canonical.shape, bool)
    for a in range(3):  # the source index along axis a of every canonical voxel
        coord = m[a, 3] + m[a, 0] * index[0] + m[a, 1] * index[1] + m[a, 2] * index[2]
        inside &= (coord >= -0.5) & (coord <= source.shape[a] - 0.5)
    return inside


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
        """(S, H, W) canonical -> (S, size, size) model plane, blurred first when shrinking.

        Blur and linear resampling are both linear along each axis, so each axis is one small
        (size x n) matrix: the Gaussian (``ndimage.gaussian_filter1d``'s own kernel and edge mode,
        applied to the identity) followed by the interpolation weights. Two matrix products per
        slice replace a full-resolution blur, and only the sampled rows/columns are ever computed.
        Pixels whose centre falls outside the source are ``fill``.
        """
        rows, out_r = self._resample_matrix(0)
        cols, out_c = self._resample_matrix(1)
        x = np.asarray(slices, np.float32)
        out = np.matmul(rows, np.matmul(x, cols.T))  # (S, size, size)
        if out_r.any() or out_c.any():
            out[:, out_r, :] = fill
            out[:, :, out_c] = fill
        return out

    def _resample_matrix(self, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """(size, n) float32 blur+interpolation matrix along ``axis`` and the mask of outside pixels."""
        return _resample_matrix(
            self.shape[axis], tuple(self.model_to_canonical(axis)), self.model_spacing / self.spacing[axis]
        )

    def to_canonical(self, planes: np.ndarray) -> np.ndarray:
        """(..., size, size) model plane -> (..., H, W) canonical, linear interpolation."""
        out = _lerp(planes, self.canonical_to_model(0), axis=-2)
        return _lerp(out, self.canonical_to_model(1), axis=-1)

    def _lerp_matrix(self, axis: int) -> np.ndarray:
        """(H or W, size) float32 matrix of :meth:`to_canonical`'s interpolation along ``axis``."""
        return _lerp_matrix(self.size, tuple(self.canonical_to_model(axis)))

    def labels_to_canonical(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, C, size, size) class probabilities -> canonical (N, H, W) arg-max labels and uint8 confidence.

        The same result as ``p = to_canonical(probs); p.argmax(1), round(p.max(1) * 255)``
        without resizing every class: where the four model pixels around a canonical pixel
        share their arg-max class k, the interpolated k is the largest interpolated class (a
        convex combination of values that are each the largest), so the label is k and the
        confidence is the interpolated per-pixel maximum, one channel. Only pixels near a class
        boundary are interpolated in full, with the same float32 operations in the same order.
        """
        n, c = probs.shape[:2]
        r0, r1, wr = _taps(self.canonical_to_model(0), probs.shape[-2])
        c0, c1, wc = _taps(self.canonical_to_model(1), probs.shape[-1])
        top = probs.argmax(axis=1).astype(np.uint8)  # (N, s, s)
        # does the cell (i..i+1, j..j+1) of the model grid hold more than one class?
        e = np.pad(top, ((0, 0), (0, 1), (0, 1)), mode="edge")
        mixed = (e[:, :-1, :-1] != e[:, 1:, :-1]) | (e[:, :-1, :-1] != e[:, :-1, 1:])
        mixed |= e[:, :-1, :-1] != e[:, 1:, 1:]
        labels = top[:, r0][:, :, c0]
        # confidence: the per-pixel maximum resized as two small matrix products (BLAS, ~10x a gather);
        # it differs from the element-wise formula by float rounding only (at most 1 in the uint8 scale)
        conf = np.matmul(np.matmul(self._lerp_matrix(0), probs.max(axis=1)), self._lerp_matrix(1).T)
        k, i, j = np.nonzero(mixed[:, r0][:, :, c0])
        if k.size:
            flat = probs.transpose(0, 2, 3, 1).reshape(n, -1, c)  # (N, s*s, C)
            s = probs.shape[-1]
            ri0, ri1, cj0, cj1 = r0[i], r1[i], c0[j], c1[j]
            w_r, w_c = wr[i, None], wc[j, None]
            left = flat[k, ri0 * s + cj0] * (1 - w_r) + flat[k, ri1 * s + cj0] * w_r
            right = flat[k, ri0 * s + cj1] * (1 - w_r) + flat[k, ri1 * s + cj1] * w_r
            full = left * (1 - w_c) + right * w_c  # (K, C)
            labels[k, i, j] = full.argmax(axis=1)
            conf[k, i, j] = full.max(axis=1)
        return labels, np.round(conf * 255).astype(np.uint8)


@dataclass(frozen=True)
class ResizeMap(PlaneMap):
    """The whole slice stretched to the model's square input (no resampling to a spacing, no
    padding), with PyTorch's antialiased bicubic resize (:mod:`node.model.resize`); outputs go
    back with linear interpolation."""

    def canonical_to_model(self, axis: int) -> np.ndarray:
        r = np.arange(self.shape[axis])
        return (r + 0.5) * self.size / self.shape[axis] - 0.5

    def model_to_canonical(self, axis: int) -> np.ndarray:
        u = np.arange(self.size)
        return (u + 0.5) * self.shape[axis] / self.size - 0.5

    def to_model(self, slices: np.ndarray, fill: float) -> np.ndarray:
        return resize_bicubic_aa(slices, (self.size, self.size))


def plane_map(shape: tuple[int, int], spacing: tuple[float, float], spec: InputSpec) -> PlaneMap:
    """How a slice of ``shape`` (at ``spacing``, mm) reaches the model's input, per the manifest."""
    cls = ResizeMap if spec.geometry == "resize" else PlaneMap
    return cls(tuple(shape), tuple(spacing), spec.size)


# the model's slicing plane as a permutation of the canonical FPL axes: slices along the first axis,
# rows along the second, columns along the third (axial: P by L, coronal: I by L, sagittal: I by P)
PLANES = {"axial": (0, 1, 2), "coronal": (1, 0, 2), "sagittal": (2, 0, 1)}


def _taps(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two source indices and the float32 weight of the second, as :func:`_lerp` uses them."""
    c = np.clip(coords, 0, n - 1)
    i0 = np.floor(c).astype(np.intp)
    return i0, np.minimum(i0 + 1, n - 1), (c - i0).astype(np.float32)


@lru_cache(maxsize=32)
def _lerp_matrix(n: int, coords: tuple[float, ...]) -> np.ndarray:
    i0, i1, w = _taps(np.asarray(coords), n)
    rows = np.arange(len(coords))
    m = np.zeros((len(coords), n), np.float32)
    m[rows, i0] += 1 - w
    m[rows, i1] += w
    m.setflags(write=False)
    return m


@lru_cache(maxsize=32)
def _resample_matrix(n: int, coords: tuple[float, ...], shrink: float):
    """Blur (when ``shrink`` > 1) then interpolate at ``coords``, as one (len(coords), n) matrix."""
    lerp = _lerp_matrix(n, coords).astype(np.float64)
    sigma = max(0.0, (shrink - 1) / 2)
    if sigma > 0:  # the blur as a matrix: the filter applied to each unit impulse (same kernel, same edges)
        blur = ndimage.gaussian_filter1d(np.eye(n), sigma, axis=0, mode="nearest")
        lerp = lerp @ blur
    c = np.asarray(coords)
    outside = (c < -0.5) | (c > n - 0.5)
    lerp[outside] = 0.0
    matrix = lerp.astype(np.float32)
    matrix.setflags(write=False)
    outside.setflags(write=False)
    return matrix, outside


def _lerp(a: np.ndarray, coords: np.ndarray, axis: int, fill: float | None = None) -> np.ndarray:
    """Linear interpolation of ``a`` along one axis at fractional ``coords``.

    Outside the source range: ``fill`` if given, else the edge value (clamped).
    """
    n = a.shape[axis]
    i0, i1, w = _taps(coords, n)
    shape = [1] * a.ndim
    shape[axis] = len(coords)
    w = w.reshape(shape)
    out = np.take(a, i0, axis=axis) * (1 - w) + np.take(a, i1, axis=axis) * w
    if fill is not None:
        outside = ((coords < -0.5) | (coords > n - 0.5)).reshape(shape)
        out = np.where(outside, np.float32(fill), out)
    return out.astype(np.float32, copy=False)


def air_value(modality: str) -> float:
    return _AIR.get(modality, 0.0)
