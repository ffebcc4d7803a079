"""Series -> volume with exact patient geometry.

Slices are ordered by their position along the slice normal, never by
InstanceNumber. The volume keeps the in-plane storage orientation of the
source (rows bottom-up, transposed, sagittal... are all just affines) so that
volume slice ``i`` is exactly source frame ``frames[i]``; the slice axis runs
along ``column direction x row direction`` (highdicom's right-handed
convention, head->feet for a standard axial stack).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Collection
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
import pydicom
from pydicom import Dataset

from node.errors import InputError

if TYPE_CHECKING:
    from node.ingest.series import SourceSeries


@dataclass(frozen=True)
class SourceFrame:
    """Where one volume slice came from."""

    dataset: Dataset  # the source instance (header; pixel data may have been released)
    frame: int | None  # 1-based frame number in a multi-frame instance, None for single-frame


@dataclass
class SeriesVolume:
    """A source series assembled into a volume, plus what is needed to reference it."""

    series_uid: str
    modality: str  # "CT" or "MR"
    volume: hd.Volume  # float32 (slices, rows, cols) in modality units (HU for CT); LPS patient geometry
    frames: list[SourceFrame | None]  # per volume slice; None = slice interpolated over a gap
    datasets: list[Dataset]  # distinct source instances in volume order (for SEG/GSPS/SR references)
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was done to make unusual input usable

    @property
    def first_dataset(self) -> Dataset:
        """A source header: patient, study and request attributes are the same in all of them."""
        return self.datasets[0] if self.datasets else next(f.dataset for f in self.frames if f)


# Tolerances. Positions and orientations come as DS strings; scanners jitter by ~1e-3 mm.
_ORIENTATION_TOL = 1e-4  # direction cosines
_SPACING_RTOL = 0.02  # slice spacing deviation, fraction of the spacing
_INPLANE_TOL_MM = 0.05  # slice origins must lie on one line along the normal (no gantry tilt)
_MAX_MISSING_FRACTION = 0.10
_MIN_PROCESSES = 4  # decoding in fewer processes than this costs about what it saves (spawn + imports)


@dataclass
class _Frame:
    """Geometry and rescale of one 2D frame, from a single-frame instance or one frame of a multi-frame."""

    index: int  # index into series.datasets
    frame: int | None  # 1-based frame number or None
    position: np.ndarray
    orientation: np.ndarray  # 6 direction cosines: row direction, column direction
    spacing: tuple[float, float]  # (between rows, between columns)
    thickness: float | None
    slope: float
    intercept: float


def load_volume(
    series: SourceSeries,
    accepted_modalities: Collection[str] = ("CT", "MR"),
    *,
    model_name: str | None = None,
    workers: int = 8,
) -> SeriesVolume:
    """Assemble ``series`` into a float32 volume in modality units with its exact patient affine.

    Raises :class:`InputError` (naming the series UID and the file, never patient data)
    when the series cannot be made into one regular volume.
    """
    uid = series.series_uid
    modality = series.modality.upper()
    if modality not in {m.upper() for m in accepted_modalities}:
        by = f" by model {model_name}" if model_name else ""
        raise InputError(
            f"series {uid}: modality {modality or '(none)'} is not accepted{by} "
            f"(accepts {', '.join(accepted_modalities)})"
        )
    if not series.datasets:
        raise InputError(f"series {uid}: no images")
    names = [
        str(series.files[i]) if i < len(series.files) else f"instance {i + 1}"
        for i in range(len(series.datasets))
    ]

    frames: list[_Frame] = []
    for i, ds in enumerate(series.datasets):
        frames.extend(_frames_of(ds, i, f"series {uid}: {names[i]}"))
    _check_consistent(series, frames, names)

    first = frames[0]
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    normal = np.cross(col_dir, row_dir)  # right-handed (slice, row, col), as highdicom
    dist = np.array([float(np.dot(f.position, normal)) for f in frames])
    order = np.argsort(dist, kind="stable")
    frames = [frames[k] for k in order]
    dist = dist[order]
    slots, step, notes = _slots(uid, frames, dist, names, normal)

    rows, cols = int(series.datasets[0].Rows), int(series.datasets[0].Columns)
    array = np.empty((len(slots), rows, cols), np.float32)
    slot_of = {id(f): s for s, f in enumerate(slots) if f is not None}
    _read_pixels(series, frames, slot_of, array, names, workers)
    _fill_gaps(array, slots)

    affine = np.eye(4)
    affine[:3, 0] = normal * step
    affine[:3, 1] = col_dir * first.spacing[0]
    affine[:3, 2] = row_dir * first.spacing[1]
    affine[:3, 3] = frames[0].position
    volume = hd.Volume(
        array,
        affine,
        coordinate_system="PATIENT",
        frame_of_reference_uid=str(series.datasets[0].FrameOfReferenceUID),
    )

    source = [
        None if f is None else SourceFrame(series.datasets[f.index], f.frame) for f in slots
    ]  # per volume slice
    seen: dict[int, None] = {}
    for f in slots:
        if f is not None:
            seen.setdefault(f.index, None)
    files = [series.files[i] for i in seen if i < len(series.files)]
    return SeriesVolume(
        series_uid=uid,
        modality=modality,
        volume=volume,
        frames=source,
        datasets=[series.datasets[i] for i in seen],
        files=files,
        notes=notes,
    )


# -- geometry -----------------------------------------------------------------


def _frames_of(ds: Dataset, index: int, where: str) -> list[_Frame]:
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()
        per_frame = ds.get("PerFrameFunctionalGroupsSequence") or [Dataset()] * n_frames
        if len(per_frame) != n_frames:
            raise InputError(f"{where} has {len(per_frame)} per-frame items for {n_frames} frames")
        out = []
        for f, item in enumerate(per_frame):

            def get(seq: str, attr: str, item: Dataset = item) -> object:
                for group in (item, shared):
                    if seq in group and len(group[seq].value) and attr in group[seq][0]:
                        return group[seq][0][attr].value
                return None

            out.append(
                _make_frame(
                    index,
                    f + 1,
                    get("PlanePositionSequence", "ImagePositionPatient"),
                    get("PlaneOrientationSequence", "ImageOrientationPatient"),
                    get("PixelMeasuresSequence", "PixelSpacing"),
                    get("PixelMeasuresSequence", "SliceThickness"),
                    get("PixelValueTransformationSequence", "RescaleSlope"),
                    get("PixelValueTransformationSequence", "RescaleIntercept"),
                    f"{where} frame {f + 1}",
                )
            )
        return out
    if n_frames > 1:
        raise InputError(f"{where} is a multi-frame image without per-frame geometry (not supported)")
    return [
        _make_frame(
            index,
            None,
            ds.get("ImagePositionPatient"),
            ds.get("ImageOrientationPatient"),
            ds.get("PixelSpacing"),
            ds.get("SliceThickness"),
            ds.get("RescaleSlope"),
            ds.get("RescaleIntercept"),
            where,
        )
    ]


def _make_frame(index, frame, position, orientation, spacing, thickness, slope, intercept, where) -> _Frame:
    for name, value, n in (
        ("ImagePositionPatient", position, 3),
        ("ImageOrientationPatient", orientation, 6),
        ("PixelSpacing", spacing, 2),
    ):
        if value is None or value == "":
            raise InputError(f"{where} has no {name}")
        try:
            ok = len(value) == n and all(np.isfinite(float(v)) for v in value)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InputError(f"{where} has an invalid {name}")
    sp = (float(spacing[0]), float(spacing[1]))
    if min(sp) <= 0:
        raise InputError(f"{where} has invalid PixelSpacing {sp[0]:g}\\{sp[1]:g} (must be > 0)")
    iop = np.array([float(v) for v in orientation])
    r, c = iop[:3], iop[3:]
    if abs(np.linalg.norm(r) - 1) > 1e-3 or abs(np.linalg.norm(c) - 1) > 1e-3 or abs(np.dot(r, c)) > 1e-3:
        raise InputError(f"{where} has an ImageOrientationPatient that is not two orthogonal unit vectors")
    iop = np.concatenate([r / np.linalg.norm(r), c / np.linalg.norm(c)])
    return _Frame(
        index=index,
        frame=frame,
        position=np.array([float(v) for v in position]),
        orientation=iop,
        spacing=sp,
        thickness=float(thickness) if thickness not in (None, "") else None,
        slope=float(slope) if slope not in (None, "") else 1.0,
        intercept=float(intercept) if intercept not in (None, "") else 0.0,
    )


def _check_consistent(series: SourceSeries, frames: list[_Frame], names: list[str]) -> None:
    uid = series.series_uid
    fors = {}
    for i, ds in enumerate(series.datasets):
        fors.setdefault(str(ds.get("FrameOfReferenceUID", "")), i)
    if "" in fors:
        raise InputError(f"series {uid}: {names[fors['']]} has no FrameOfReferenceUID")
    if len(fors) > 1:
        a, b = list(fors.values())[:2]
        raise InputError(f"series {uid}: slices in {len(fors)} frames of reference ({names[a]}, {names[b]})")
    sizes = {}
    for i, ds in enumerate(series.datasets):
        if "Rows" not in ds or "Columns" not in ds:
            raise InputError(f"series {uid}: {names[i]} has no Rows/Columns")
        sizes.setdefault((int(ds.Rows), int(ds.Columns)), i)
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise InputError(f"series {uid}: {names[i]} is not a grayscale image")
    if len(sizes) > 1:
        (s1, a), (s2, b) = list(sizes.items())[:2]
        raise InputError(
            f"series {uid}: slices of different size ({s1[0]}x{s1[1]} in {names[a]}, {s2[0]}x{s2[1]} in {names[b]})"
        )
    f0 = frames[0]
    for f in frames[1:]:
        if np.abs(f.orientation - f0.orientation).max() > _ORIENTATION_TOL:
            raise InputError(
                f"series {uid}: mixed image orientations ({_name(f0, names)} and {_name(f, names)}); "
                "send one orientation per series"
            )
        if not np.allclose(f.spacing, f0.spacing, rtol=1e-4, atol=1e-5):
            raise InputError(f"series {uid}: mixed PixelSpacing ({_name(f0, names)} and {_name(f, names)})")


def _name(f: _Frame, names: list[str]) -> str:
    return names[f.index] + (f" frame {f.frame}" if f.frame is not None else "")


def _slots(
    uid: str, frames: list[_Frame], dist: np.ndarray, names: list[str], normal: np.ndarray
) -> tuple[list[_Frame | None], float, list[str]]:
    """Place sorted frames on a regular grid of slices; None marks a missing slice to interpolate."""
    notes: list[str] = []
    if len(frames) == 1:
        f = frames[0]
        step = f.thickness if f.thickness and f.thickness > 0 else 1.0
        notes.append(f"single-slice series: slice thickness taken as {step:g} mm")
        return [f], step, notes
    # every origin must lie on the line through the first along the normal
    for f in frames[1:]:
        d = f.position - frames[0].position
        if np.linalg.norm(d - np.dot(d, normal) * normal) > _INPLANE_TOL_MM:
            raise InputError(
                f"series {uid}: slice positions are not stacked along the slice normal "
                f"({_name(f, names)}; gantry tilt or sheared stacks are not supported)"
            )
    diffs = np.diff(dist)
    tiny = np.flatnonzero(diffs < 1e-3)
    if tiny.size:
        a, b = frames[tiny[0]], frames[tiny[0] + 1]
        raise InputError(
            f"series {uid}: duplicate slice positions ({_name(a, names)} and {_name(b, names)} "
            f"at {float(np.dot(a.position, -normal)):.2f} mm)"
        )
    # the usual step; gaps must be whole multiples of it (a few missing slices), nothing smaller
    base = float(np.median(diffs))
    multiples = np.maximum(np.round(diffs / base), 1)
    deviation = np.abs(diffs - multiples * base)
    if np.any(deviation > _SPACING_RTOL * base):
        k = int(np.argmax(deviation))
        raise InputError(
            f"series {uid}: irregular slice spacing ({diffs[k]:.3g} mm between {_name(frames[k], names)} and "
            f"{_name(frames[k + 1], names)}, {base:.3g} mm elsewhere)"
        )
    missing = int((multiples - 1).sum())
    total = len(frames) + missing
    if missing > max(1, int(_MAX_MISSING_FRACTION * total + 1e-9)):
        raise InputError(
            f"series {uid}: {missing} of {total} slices missing (gaps in the stack; "
            f"at most {int(_MAX_MISSING_FRACTION * 100)}% can be interpolated)"
        )
    step = float((dist[-1] - dist[0]) / (total - 1))  # mean step: spreads DS rounding over the stack
    slots: list[_Frame | None] = [frames[0]]
    gap_positions = []
    for f, m in zip(frames[1:], multiples, strict=True):
        for _ in range(int(m) - 1):
            # slice location as scanners report it: along row x column (z for axial)
            gap_positions.append(-(dist[0] + len(slots) * step))
            slots.append(None)
        slots.append(f)
    if missing:
        where = ", ".join(f"{p:.1f}" for p in gap_positions)
        s = "s" if missing > 1 else ""
        notes.append(f"{missing} missing slice{s} interpolated (slice location{s} {where} mm)")
    return slots, step, notes


# -- pixels -------------------------------------------------------------------


def _read_pixels(
    series: SourceSeries,
    frames: list[_Frame],
    slot_of: dict[int, int],
    array: np.ndarray,
    names: list[str],
    workers: int,
) -> None:
    by_instance: dict[int, list[_Frame]] = {}
    for f in frames:
        by_instance.setdefault(f.index, []).append(f)
    indices = list(by_instance)

    def place(index: int, pixels: np.ndarray | None, problem: str) -> None:
        where = f"series {series.series_uid}: {names[index]}"
        if pixels is None:
            raise InputError(f"{where}{problem}")
        if pixels.ndim == 2:
            pixels = pixels[None]
        if pixels.ndim != 3 or pixels.shape[1:] != array.shape[1:]:
            raise InputError(f"{where}: pixel data does not match Rows/Columns")
        for f in by_instance[index]:
            k = 0 if f.frame is None else f.frame - 1
            if k >= pixels.shape[0]:
                raise InputError(f"{where}: frame {f.frame} missing from the pixel data")
            out = array[slot_of[id(f)]]
            np.multiply(pixels[k], np.float32(f.slope), out=out, dtype=np.float32, casting="unsafe")
            out += np.float32(f.intercept)

    def load(index: int) -> None:
        ds = series.datasets[index]
        if any(k in ds for k in _PIXEL_KEYWORDS):  # an in-memory dataset that still has its pixels
            place(index, *_decode(ds))
        elif index < len(series.files):
            place(index, *_decode_file(series.files[index]))
        else:
            place(index, None, " has no pixel data")

    on_disk = [
        i
        for i in indices
        if i < len(series.files) and not any(k in series.datasets[i] for k in _PIXEL_KEYWORDS)
    ]
    compressed = [i for i in on_disk if _is_compressed(series.datasets[i])]
    processes = min(workers, os.cpu_count() or 1, len(compressed) // 8)
    if processes >= _MIN_PROCESSES:
        # JPEG/JPEG-LS/JPEG 2000/RLE decoders hold the GIL: decode in worker processes ("spawn":
        # safe next to the worker's threads), copy the small uint16 frames back
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            paths = [series.files[i] for i in compressed]
            for index, result in zip(compressed, pool.map(_decode_file, paths, chunksize=8), strict=True):
                place(index, *result)
        indices = [i for i in indices if i not in set(compressed)]
    if workers > 1 and len(indices) > 8:
        # reading and numpy work on uncompressed data release the GIL
        with ThreadPoolExecutor(min(workers, len(indices))) as pool:
            list(pool.map(load, indices))
    else:
        for i in indices:
            load(i)


_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _is_compressed(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    return bool(ts is not None and ts.is_compressed)


def _decode(ds: Dataset) -> tuple[np.ndarray | None, str]:
    """Stored pixel values (no rescale), or None and what is wrong (appended to 'series X: file')."""
    try:
        return ds.pixel_array, ""
    except Exception as exc:  # decoder errors on corrupt or cut-off data are the user's to fix
        text = " ".join(str(exc).split())[:120] or type(exc).__name__
        return None, f": truncated or unreadable DICOM ({text})"


def _decode_file(path: Path) -> tuple[np.ndarray | None, str]:
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        text = " ".join(str(exc).split())[:120] or type(exc).__name__
        return None, f": truncated or unreadable DICOM ({text})"
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        if _bytes_after_header(path):  # pydicom drops a pixel element that is cut off
            return None, ": truncated or unreadable DICOM (pixel data cut short)"
        return None, " has no pixel data"
    return _decode(ds)


def _bytes_after_header(path: Path) -> bool:
    with open(path, "rb") as fp:
        pydicom.dcmread(fp, stop_before_pixels=True)
        return fp.tell() < path.stat().st_size


def _fill_gaps(array: np.ndarray, slots: list[_Frame | None]) -> None:
    """Linear interpolation along the slice axis between the present neighbours of each missing slice."""
    present = [i for i, f in enumerate(slots) if f is not None]
    for a, b in zip(present[:-1], present[1:], strict=True):
        for k in range(a + 1, b):
            t = np.float32((k - a) / (b - a))
            array[k] = (1 - t) * array[a] + t * array[b]
