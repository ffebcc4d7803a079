"""3D sliding-window inference (``input.kind: patch3d``), as nnU-Net v2's ``nnUNetPredictor`` does it.

A volume in the network's axes (:attr:`Patch3DSpec.axes`) goes through the steps of nnU-Net's
``DefaultPreprocessor`` and predictor, each a port of its numpy code so that the node needs no
torch and no nnU-Net at run time:

1. crop to the bounding box of the non-zero voxels (``crop_to_nonzero``; filling holes, as nnU-Net
   does, never changes a box), then normalise (``CTNormalization``: clip to the dataset's
   0.5/99.5 percentiles, z-score with its foreground statistics; ``ZScoreNormalization``: the
   image's own mean and standard deviation);
2. resample to the network's spacing (``resample_data_or_seg_to_shape``: cubic spline in plane,
   the anisotropic axis on its own when one spacing is more than 3x the smallest);
3. pad to at least one patch (zeros, centred), tiles at nnU-Net's evenly spread steps, each
   weighted by the Gaussian importance map (sigma 1/8 of the patch, scaled to 10), mirrored
   test-time augmentation over the allowed axes; the sums are kept in float16, as nnU-Net keeps
   them, and only a patch deep: rows no later tile reaches go on to step 4 at once
   (:class:`SlidingWindow`), so a 100+-class network's memory does not grow with the series;
4. logits back to the cropped shape (linear), arg-max, the crop put back into the full volume,
   slab by slab as the rows arrive (:func:`labels_from_slabs`). The result equals nnU-Net's whole-
   array computation: streaming changes when a voxel is computed, never how.

A MONAI bundle's model (``tiling: monai``, ``resampling.grid: monai``) goes through its transforms
and ``SlidingWindowInferer`` instead, ported the same way: no crop, ``Spacingd``'s grid and linear
interpolation, the intensity transform before or after it as the bundle orders them, MONAI's tile
positions and importance map, and ``Invertd``'s way back (the probabilities interpolated when the
bundle's softmax comes first). Only the sums differ from MONAI's float32: float16, as above.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.transform import resize

from node.identity import Stage
from node.model.manifest import IntensitySpec, Patch3DSpec, Resampling
from node.timing import Stopwatch

Network = Callable[[np.ndarray], np.ndarray]  # (1, C, *patch) float32 -> (1, K, *patch) logits


@dataclass(frozen=True)
class VolumeSegmentation:
    """A 3D network's answer on the grid it was given."""

    labels: np.ndarray  # uint8 class index per voxel
    confidence: np.ndarray  # uint8: softmax probability of the chosen class x 255
    tiles: int  # network evaluations (tiles x mirrorings)


def segment(
    image: np.ndarray,
    spacing: tuple[float, float, float],
    spec: Patch3DSpec,
    intensity: IntensitySpec,
    net: Network,
    clock: Stopwatch | None = None,
    part: str = "network",
) -> VolumeSegmentation:
    """(Z, Y, X) modality values at ``spacing`` (mm, same order), in the network's axes -> labels there.

    ``clock`` gets the preprocessing, the tiles (inference, and ``part``) and the way back (postprocessing)."""
    clock = clock or Stopwatch()
    r = spec.resampling
    with clock(Stage.PREPROCESS):
        box = nonzero_box(image) if spec.crop_nonzero else tuple(slice(0, n) for n in image.shape)
        x = image[box].astype(np.float32)[None]
        cropped = x.shape[1:]
        if spec.normalise_first:
            x[0] = normalise_volume(x[0], intensity)
        if r.grid == "monai":
            x = resample_monai(
                x, monai_shape(cropped, spacing, spec.spacing), spacing, spec.spacing, r.data_order
            )
        else:
            target = new_shape(cropped, spacing, spec.spacing)
            x = resample(
                x, target, spacing, spec.spacing, r.data_order, r.order_z, r.force_separate_z, r.anisotropy
            )
        if not spec.normalise_first:
            x = normalise_volume(x[0].astype(np.float32), intensity)[None]
    # the tiles and the way back run interleaved (the sums of every class are never held whole):
    # the network's time is inference, the rest (summing, arg-max, resampling) postprocessing
    tiles_clock = Stopwatch()

    def timed(tile: np.ndarray) -> np.ndarray:
        with tiles_clock(Stage.INFERENCE):
            return net(tile)

    with clock(Stage.POSTPROCESS):
        windows = SlidingWindow(x.astype(np.float32), spec, timed)
        labels = np.zeros(image.shape, np.uint8)
        conf = np.zeros(image.shape, np.uint8)
        labels[box], conf[box] = labels_from_slabs(windows, x.shape[1:], cropped, spec.spacing, spacing, r)
    network = tiles_clock.seconds[Stage.INFERENCE]
    clock.seconds[Stage.POSTPROCESS] -= network
    clock.seconds[Stage.INFERENCE] += network
    clock.parts[part] += network
    return VolumeSegmentation(labels, conf, windows.tiles)


def logits_to_labels(
    logits: np.ndarray,
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    target: tuple[float, ...],
    r: Resampling,
    slab: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """(K, z, y, x) float16 logits at the network's spacing -> (labels, uint8 confidence) of ``shape``;
    :func:`labels_from_slabs` with the logits in one piece."""
    return labels_from_slabs([(0, logits)], logits.shape[1:], shape, spacing, target, r, slab)


def labels_from_slabs(
    slabs: Iterable[tuple[int, np.ndarray]],
    grid: tuple[int, ...],
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    target: tuple[float, ...],
    r: Resampling,
    slab: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits on the network's ``grid`` at ``spacing``, given as ``(first row, (K, rows, y, x))`` in
    order along z (as :class:`SlidingWindow` gives them) -> (labels, uint8 confidence) of ``shape``.

    The labels are nnU-Net's (its linear resampling of every class, then arg-max) computed without
    resampling every class: linear interpolation is a convex combination of the eight network voxels
    around an output voxel, so where those share their arg-max class it stays the arg-max. Only the
    voxels near a class boundary are interpolated in full, slab by slab, and each output slab as soon
    as the network rows it reads have come: so only those few rows of every class are held, however
    large the series and however many classes. The confidence is the chosen class's softmax
    probability on the network's grid, interpolated the same way.

    ``grid: monai``: the same with ``Invertd``'s coordinates, interpolating the softmax probabilities
    (a convex combination of them keeps a shared arg-max too) when ``interpolate`` says so, or the
    network grid's labels, nearest (``logits_order`` 0).
    """
    monai = r.grid == "monai"
    # another spline order mixes more than eight voxels: nnU-Net's way, in full
    if r.logits_order != 1 and not monai:
        logits = np.concatenate([block for _, block in slabs], axis=1)
        probs = softmax(
            resample(
                logits, shape, spacing, target, r.logits_order, r.order_z, r.force_separate_z, r.anisotropy
            ).astype(np.float32)
        )
        return probs.argmax(0).astype(np.uint8), np.round(probs.max(0) * 255).astype(np.uint8)
    if monai:
        taps = [
            _monai_taps(n_in, n_out, t / s, r.logits_order == 0)
            for n_in, n_out, s, t in zip(grid, shape, spacing, target, strict=True)
        ]
    else:
        axis = _separate_axis(r.force_separate_z, spacing, target, r.anisotropy)
        nearest = axis is not None and r.order_z == 0
        taps = [
            _axis_taps(n_in, n_out, nearest and a == axis)
            for a, (n_in, n_out) in enumerate(zip(grid, shape, strict=True))
        ]
    probabilities = monai and r.interpolate == "probabilities"
    top = np.empty(grid, np.uint8)
    peak = np.empty(grid, np.float32)
    labels = np.empty(shape, np.uint8)
    conf = np.empty(shape, np.uint8)
    (y0, y1, wy), (x0, x1, wx) = taps[1], taps[2]
    held, first_held, a = None, 0, 0  # the network rows [first_held, arrived) output rows from a on read
    for z, block in slabs:
        for s in range(0, block.shape[1], slab):  # softmax over classes, a few network slices at a time
            p = softmax(block[:, s : s + slab].astype(np.float32))
            rows = slice(z + s, z + s + p.shape[1])
            top[rows], peak[rows] = p.argmax(0), p.max(0)
        held = block if held is None else np.concatenate([held, block], axis=1)
        arrived = z + block.shape[1]
        while a < shape[0] and taps[0][1][min(a + slab, shape[0]) - 1] < arrived:
            b = min(a + slab, shape[0])
            z0, z1, wz = (t[a:b] for t in taps[0])
            corners = [
                (np.ix_(zi, yi, xi), w)
                for zi, fz in ((z0, 1 - wz), (z1, wz))
                for yi, fy in ((y0, 1 - wy), (y1, wy))
                for xi, fx in ((x0, 1 - wx), (x1, wx))
                for w in [fz[:, None, None] * fy[None, :, None] * fx[None, None, :]]
            ]
            first = top[corners[0][0]]
            mixed = np.zeros(first.shape, bool)
            c = np.zeros(first.shape, np.float32)
            for index, w in corners:
                mixed |= top[index] != first
                c += w * peak[index]
            out = first
            m = np.nonzero(mixed)
            if m[0].size:  # every class, linearly, where the corners disagree; float16 as nnU-Net keeps them
                full = np.zeros((held.shape[0], m[0].size), np.float32)
                for index, w in corners:
                    zi, yi, xi = (ix.ravel()[k] for ix, k in zip(index, m, strict=True))  # np.ix_: one axis each
                    values = held[:, zi - first_held, yi, xi].astype(np.float32)
                    full += w[m] * (softmax(values) if probabilities else values)
                out[m] = full.argmax(0) if monai else full.astype(np.float16).argmax(0)
            labels[a:b] = out
            conf[a:b] = np.round(np.clip(c, 0, 1) * 255)
            a = b
        if a < shape[0] and (drop := min(int(taps[0][0][a]), arrived) - first_held) > 0:  # read by none to come
            held, first_held = held[:, drop:], first_held + drop
    return labels, conf


def _axis_taps(n_in: int, n_out: int, nearest: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index: the two input indices and the second's weight, as skimage's ``resize``
    (``mode="edge"``, align_corners False) interpolates linearly, or the one nearest input index
    (``map_coordinates`` order 0) along nnU-Net's separately resampled axis."""
    if n_in == n_out:
        i = np.arange(n_out)
        return i, i, np.zeros(n_out, np.float32)
    c = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    if nearest:
        i = np.floor(c + 0.5).astype(np.intp)
        return i, i, np.zeros(n_out, np.float32)
    i0 = np.floor(c).astype(np.intp)
    return i0, np.minimum(i0 + 1, n_in - 1), (c - i0).astype(np.float32)


def _monai_taps(
    n_in: int, n_out: int, scale: float, nearest: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """As :func:`_axis_taps` for MONAI's ``Spacing`` and its inverse: output voxel ``i`` sits at input
    coordinate ``i * scale`` (the grids share their first voxel centre), clamped to the border
    (``padding_mode="border"``); nearest rounds half to even, as torch's ``grid_sample``."""
    c = np.clip(np.arange(n_out) * scale, 0, n_in - 1)
    if nearest:
        i = np.rint(c).astype(np.intp)
        return i, i, np.zeros(n_out, np.float32)
    i0 = np.floor(c).astype(np.intp)
    return i0, np.minimum(i0 + 1, n_in - 1), (c - i0).astype(np.float32)


def monai_shape(
    shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]
) -> tuple[int, ...]:
    """MONAI's ``compute_shape_offset`` for an axis-aligned grid: voxel centres span ``(n - 1) * spacing``."""
    return tuple(int(np.round((n - 1) * s / t + 1.0)) for n, s, t in zip(shape, spacing, target, strict=True))


def resample_monai(
    data: np.ndarray,
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    target: tuple[float, ...],
    order: int,
) -> np.ndarray:
    """(C, Z, Y, X) -> (C, *shape) float32: MONAI's ``Spacing`` (float64 arithmetic, as its default dtype).

    Trilinear interpolation is the product of three linear ones, so it runs one axis at a time
    (no coordinate arrays of the volume's size)."""
    out = data.astype(np.float64)
    for axis, (n_out, s, t) in enumerate(zip(shape, spacing, target, strict=True)):
        i0, i1, w = _monai_taps(out.shape[axis + 1], n_out, t / s, order == 0)
        if order == 0:
            out = out.take(i0, axis + 1)
            continue
        w = w.astype(np.float64).reshape([-1 if a == axis + 1 else 1 for a in range(out.ndim)])
        out = out.take(i0, axis + 1) * (1 - w) + out.take(i1, axis + 1) * w
    return out.astype(np.float32)


def nonzero_box(image: np.ndarray) -> tuple[slice, ...]:
    """nnU-Net's crop: the bounding box of voxels that are not exactly 0 (the whole volume if none)."""
    box = []
    for axis in range(image.ndim):
        other = tuple(a for a in range(image.ndim) if a != axis)
        hit = np.flatnonzero(np.any(image != 0, axis=other))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, image.shape[axis]))
    return tuple(box)


def normalise_volume(image: np.ndarray, spec: IntensitySpec) -> np.ndarray:
    """nnU-Net's ``CTNormalization`` (``dataset`` with ``clip``) or ``ZScoreNormalization`` (``volume_zscore``)."""
    if spec.kind == "dataset":
        if spec.clip is not None:
            np.clip(image, spec.clip[0], spec.clip[1], out=image)
        image -= np.float32(spec.mean)
        image /= np.float32(max(spec.std, 1e-8))
        return image
    if spec.kind == "volume_zscore" and spec.nonzero:  # MONAI's NormalizeIntensity(nonzero=True)
        mask = image != 0
        if mask.any():
            values = image[mask]
            std = values.std()
            image[mask] = (values - values.mean()) / (std if std != 0 else 1.0)
        return image
    if spec.kind == "volume_zscore":
        mean, std = image.mean(), image.std()
        return (image - mean) / max(std, 1e-8)
    if spec.kind == "range":  # MONAI's ScaleIntensityRange, in its order of operations
        r = spec.scale
        image = (image - np.float32(r.a_min)) / np.float32(r.a_max - r.a_min)
        image = image * np.float32(r.b_max - r.b_min) + np.float32(r.b_min)
        return np.clip(image, r.b_min, r.b_max) if r.clip else image
    raise ValueError(f"intensity {spec.kind} is for 2D slice models")


def new_shape(
    shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]
) -> tuple[int, ...]:
    return tuple(int(round(s / t * n)) for s, t, n in zip(spacing, target, shape, strict=True))


def _separate_axis(
    force: bool | None, spacing: tuple[float, ...], target: tuple[float, ...], threshold: float
) -> int | None:
    """nnU-Net's ``determine_do_sep_z_and_axis``: the one low-resolution axis resampled on its own, or None."""

    def lowres(sp) -> np.ndarray:
        return np.where(max(sp) / np.asarray(sp) == 1)[0]

    def anisotropic(sp) -> bool:
        return max(sp) / min(sp) > threshold

    if force is not None:
        axes = lowres(spacing) if force else None
    elif anisotropic(spacing):
        axes = lowres(spacing)
    elif anisotropic(target):
        axes = lowres(target)
    else:
        axes = None
    return int(axes[0]) if axes is not None and len(axes) == 1 else None


def resample(
    data: np.ndarray,
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    target: tuple[float, ...],
    order: int,
    order_z: int,
    force_separate_z: bool | None,
    threshold: float,
) -> np.ndarray:
    """(C, Z, Y, X) -> (C, *shape): nnU-Net's ``resample_data_or_seg_to_shape`` (``is_seg`` False)."""
    if tuple(data.shape[1:]) == tuple(shape):
        return data
    axis = _separate_axis(force_separate_z, spacing, target, threshold)
    out = np.zeros((data.shape[0], *shape), data.dtype)
    for c in range(data.shape[0]):
        channel = data[c].astype(float, copy=False)
        if axis is None:
            out[c] = resize(channel, shape, order, mode="edge", anti_aliasing=False)
            continue
        inplane = tuple(n for a, n in enumerate(shape) if a != axis)
        mid_shape = list(shape)
        mid_shape[axis] = channel.shape[axis]
        mid = np.zeros(mid_shape)
        for i in range(channel.shape[axis]):
            index = (slice(None),) * axis + (i,)
            mid[index] = resize(channel[index], inplane, order, mode="edge", anti_aliasing=False)
        if mid.shape[axis] == shape[axis]:
            out[c] = mid
            continue
        # skimage's align_corners=False coordinates, as nnU-Net's copy of them
        coords = np.meshgrid(
            *[(m / n) * (np.arange(n) + 0.5) - 0.5 for m, n in zip(mid.shape, shape, strict=True)],
            indexing="ij",
        )
        out[c] = ndimage.map_coordinates(mid, np.array(coords), order=order_z, mode="nearest")
    return out


def tile_starts(size: tuple[int, ...], patch: tuple[int, ...], step: float) -> list[list[int]]:
    """nnU-Net's ``compute_steps_for_sliding_window``: tiles at most ``step`` x patch apart, spread evenly."""
    starts = []
    for n, p in zip(size, patch, strict=True):
        count = int(np.ceil((n - p) / (p * step))) + 1
        gap = (n - p) / (count - 1) if count > 1 else 0
        starts.append([int(np.round(gap * i)) for i in range(count)])
    return starts


def tile_starts_monai(size: tuple[int, ...], patch: tuple[int, ...], step: float) -> list[list[int]]:
    """MONAI's ``_get_scan_interval`` and ``dense_patch_slices``: every ``int(patch * (1 - overlap))``
    voxels (one tile where the patch is the size), the last tile moved back inside the volume."""
    starts = []
    for n, p in zip(size, patch, strict=True):
        interval = p if p == n else max(int(p * step), 1)
        count = next((d for d in range(int(np.ceil(n / interval))) if d * interval + p >= n), 0) + 1
        starts.append([i * interval - max(i * interval + p - n, 0) for i in range(count)])
    return starts


def importance_map_monai(patch: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    """MONAI's ``compute_importance_map`` (gaussian): the product of 1D Gaussians of sigma
    ``sigma_scale`` x patch, peak 1, float32, clamped below at its minimum or 1e-3."""
    g = np.ones((), np.float32)
    for p in patch:
        x = np.arange(-(p - 1) / 2.0, (p - 1) / 2.0 + 1, dtype=np.float32)
        g = np.multiply.outer(g, np.exp(x**2 / np.float32(-2 * (p * sigma_scale) ** 2)))
    return np.maximum(g, max(float(g.min()), 1e-3)).astype(np.float32)


def importance_map(patch: tuple[int, ...]) -> np.ndarray:
    """nnU-Net's ``compute_gaussian`` (sigma 1/8 of the patch, peak 10, no zeros), in float16 as it keeps it."""
    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    g = ndimage.gaussian_filter(impulse, [p / 8 for p in patch], 0, mode="constant", cval=0)
    g = (g / (g.max() / 10)).astype(np.float32).astype(np.float16)  # via float32, as torch converts
    g[g == 0] = g[g != 0].min()
    return g


class SlidingWindow:
    """The tiles' weighted sums, given back in order along the first (z) axis as they become final.

    Tiles go z-outermost, so once every tile at one z start has been added, the rows before the next
    z start are final: only a patch's depth of sums is held at a time, not the network's whole grid
    (which, for a 105-class network on a 512x512x600 CT at 1.5 mm, is 6 GB of float16). Iterating
    gives ``(first row, (K, rows, Y, X) float16 logits)`` in the unpadded grid, each row once."""

    def __init__(self, x: np.ndarray, spec: Patch3DSpec, net: Network, rows: int = 16):
        """``x``: (C, Z, Y, X) normalised input at the network's spacing; ``rows``: the most rows given at once."""
        self.x, self.spec, self.net, self.rows = x, spec, net, rows
        self.tiles = 0  # network evaluations so far (tiles x mirrorings)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        spec, patch = self.spec, self.spec.patch
        pads = [(0, 0)] + [
            ((max(p - n, 0)) // 2, max(p - n, 0) - max(p - n, 0) // 2)
            for n, p in zip(self.x.shape[1:], patch, strict=True)
        ]
        data = np.pad(self.x, pads, mode="constant", constant_values=0) if any(map(any, pads)) else self.x
        if spec.tiling == "monai":  # MONAI's float32 weights; its padding is the same (zeros, centred)
            gaussian = (
                importance_map_monai(patch, spec.sigma_scale) if spec.gaussian else np.ones(patch, np.float32)
            )
            starts = tile_starts_monai(data.shape[1:], patch, spec.step)
        else:
            gaussian = importance_map(patch) if spec.gaussian else np.ones(patch, np.float16)
            starts = tile_starts(data.shape[1:], patch, spec.step)
        mirrors = [
            m for i in range(len(spec.mirror_axes)) for m in itertools.combinations(spec.mirror_axes, i + 1)
        ]
        depth, size = patch[0], data.shape[1:]
        (z_lo, z_hi), plane = pads[1], tuple(slice(lo, n - hi) for (lo, hi), n in zip(pads[2:], size[1:], strict=True))
        sums = None  # the sums of padded rows [top, top + depth)
        weight = np.zeros((depth, *size[1:]), gaussian.dtype)
        z_starts = sorted(set(starts[0]))
        for i, top in enumerate(z_starts):
            for rest in itertools.product(*starts[1:]):
                window = tuple(slice(s, s + p) for s, p in zip((top, *rest), patch, strict=True))
                pred = self._predict(np.ascontiguousarray(data[(slice(None), *window)][None]), mirrors)
                if sums is None:
                    sums = np.zeros((pred.shape[0], depth, *size[1:]), np.float16)
                here = (slice(None), slice(0, depth), *window[1:])
                # float16 sums of float32 products, rounded once per tile as torch's in-place add does
                # (in place: a 100+-class tile's float32 temporaries would be a gigabyte each)
                pred *= gaussian
                pred += sums[here]
                sums[here] = pred
                weight[here[1:]] += gaussian
                del pred  # before the next tile's is made
            final = (z_starts[i + 1] if i + 1 < len(z_starts) else size[0]) - top  # rows no later tile adds to
            for a in range(0, final, self.rows):
                b = min(a + self.rows, final)
                lo, hi = max(top + a, z_lo), min(top + b, size[0] - z_hi)  # padding rows are not given
                if lo < hi:
                    rows = slice(lo - top, hi - top)
                    given = (sums[:, rows] / weight[rows]).astype(np.float16, copy=False)
                    yield lo - z_lo, given[(slice(None), slice(None), *plane)]
            # the rows the next z start's tiles add to, moved to the front a piece at a time (pieces
            # that do not overlap: numpy copies an overlapping source whole first)
            for a in range(0, depth - final, final):
                b = min(a + final, depth - final)
                sums[:, a:b], weight[a:b] = sums[:, a + final : b + final], weight[a + final : b + final]
            sums[:, depth - final :], weight[depth - final :] = 0, 0

    def _predict(self, tile: np.ndarray, mirrors) -> np.ndarray:
        pred = np.asarray(self.net(tile), np.float32)[0]
        for axes in mirrors:  # nnU-Net's mirrored test-time augmentation: flip in, flip the answer back
            flip = tuple(a + 2 for a in axes)
            pred += np.flip(np.asarray(self.net(np.ascontiguousarray(np.flip(tile, flip))), np.float32), flip)[0]
        pred /= len(mirrors) + 1
        self.tiles += len(mirrors) + 1
        return pred


def sliding_window(x: np.ndarray, spec: Patch3DSpec, net: Network) -> tuple[np.ndarray, int]:
    """(C, Z, Y, X) normalised input at the network's spacing -> (K, Z, Y, X) float16 logits, whole
    (the frameworks' comparison tests; inference streams them, :class:`SlidingWindow`)."""
    window = SlidingWindow(x, spec, net)
    return np.concatenate([block for _, block in window], axis=1), window.tiles


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)
