"""DICOM Segmentation (BINARY) of a :class:`~node.analysis.findings.Findings`.

Every SEG frame is a source frame: its plane position, orientation and pixel
measures are copied from the source instance (highdicom does this when the
plane positions are not given), and its Derivation Image / Source Image
references name that instance and, for a multi-frame source, that frame. A
volume slice interpolated over a gap has no source and is left out. So an
overlay can never be shifted by resampling or rounding on the way.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes

from node.analysis.findings import Findings, ModelRef
from node.identity import NODE_NAME
from node.ingest.volume import SeriesVolume
from node.writers import uids

# Tolerances for "this volume slice is that source frame": a fraction of a pixel in-plane,
# a fraction of the slice spacing out of plane (source positions are decimal strings).
_IN_PLANE_TOL_PX = 0.05
_OUT_OF_PLANE_TOL = 0.25


@dataclass(frozen=True)
class SliceSource:
    """How volume slice ``index`` maps onto its source frame.

    ``transform`` is a 2x3 integer matrix: (source row, source col) = transform @ (row, col, 1)
    in index coordinates of the volume slice. It is the identity unless the volume was
    built with rows/columns flipped or transposed relative to the stored frames.
    """

    index: int
    dataset: Dataset
    frame: int | None  # 1-based frame number in a multi-frame source, None for single-frame
    transform: np.ndarray
    shape: tuple[int, int]  # (Rows, Columns) of the source frame

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.transform, [[1, 0, 0], [0, 1, 0]]))

    def plane_to_source(self, plane: np.ndarray) -> np.ndarray:
        """A volume slice's 2D mask as a mask on the source frame's pixel matrix."""
        if self.is_identity and plane.shape == self.shape:
            return plane
        out = np.zeros(self.shape, plane.dtype)
        rr, cc = np.nonzero(plane)
        src = self.points_to_source(np.stack([rr, cc], axis=1)).astype(np.int64)
        if len(src) and (src.min() < 0 or np.any(src.max(axis=0) >= self.shape)):
            raise ValueError(f"Segment mask on volume slice {self.index} lies outside its source frame.")
        out[src[:, 0], src[:, 1]] = plane[rr, cc]
        return out

    def points_to_source(self, points: np.ndarray) -> np.ndarray:
        """(row, col) index coordinates on the volume slice -> on the source frame (floats kept)."""
        points = np.asarray(points, float).reshape(-1, 2)
        return points @ self.transform[:, :2].T + self.transform[:, 2]

    def graphic_data(self, points: np.ndarray) -> np.ndarray:
        """(row, col) index coordinates on the volume slice -> (column, row) DICOM image coordinates.

        SR SCOORD and GSPS PIXEL units put 0.0\\0.0 at the top left corner of the top left
        pixel, so a pixel centre (integer index) is at index + 0.5.
        """
        return self.points_to_source(points)[:, ::-1] + 0.5


def closed(points: np.ndarray) -> np.ndarray:
    """A closed POLYLINE (GSPS, SR SCOORD) repeats its first point at the end (find_contours does
    for closed contours)."""
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    return points


def frame_geometry(ds: Dataset, frame: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(position, row cosine, column cosine, (row spacing, column spacing)) of one source frame."""
    if frame is None:
        pos, ori, spacing = ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
    else:
        if not 1 <= frame <= int(ds.get("NumberOfFrames", 1)):
            raise ValueError(f"SourceFrame.frame {frame} is out of range for instance {ds.SOPInstanceUID}.")
        per_frame = ds.PerFrameFunctionalGroupsSequence[frame - 1]
        shared = ds.SharedFunctionalGroupsSequence[0]

        def group(name: str) -> Dataset:
            for item in (per_frame, shared):
                if name in item:
                    return item[name][0]
            raise ValueError(f"Source instance {ds.SOPInstanceUID} frame {frame} has no {name}.")

        pos = group("PlanePositionSequence").ImagePositionPatient
        ori = group("PlaneOrientationSequence").ImageOrientationPatient
        spacing = group("PixelMeasuresSequence").PixelSpacing
    ori = np.asarray(ori, float)
    return np.asarray(pos, float), ori[:3], ori[3:], np.asarray(spacing, float)


def slice_sources(series: SeriesVolume) -> list[SliceSource]:
    """Source frame of every acquired volume slice, in volume order; interpolated slices are skipped."""
    vol = series.volume
    if len(series.frames) != vol.spatial_shape[0]:
        raise ValueError(
            f"SeriesVolume.frames has {len(series.frames)} entries for {vol.spatial_shape[0]} volume slices."
        )
    affine = vol.affine
    out = []
    for i, sf in enumerate(series.frames):
        if sf is None:
            continue
        pos, row_cos, col_cos, (row_sp, col_sp) = frame_geometry(sf.dataset, sf.frame)
        normal = np.cross(row_cos, col_cos)
        # volume index (i, r, c) -> patient -> source (row, col); evaluated at 3 in-plane points
        corners = np.array([[i, 0, 0, 1], [i, 1, 0, 1], [i, 0, 1, 1]], float)
        d = (affine @ corners.T)[:3].T - pos
        if np.max(np.abs(d @ normal)) > _OUT_OF_PLANE_TOL * vol.spacing_between_slices:
            raise ValueError(
                f"SeriesVolume.frames[{i}] does not lie in the plane of volume slice {i} "
                f"(instance {sf.dataset.SOPInstanceUID})."
            )
        src = np.stack([d @ col_cos / row_sp, d @ row_cos / col_sp], axis=1)  # (row, col) per corner
        t = np.column_stack([src[1] - src[0], src[2] - src[0], src[0]])
        rounded = np.round(t)
        lin = rounded[:, :2]
        if (
            np.max(np.abs(t - rounded)) > _IN_PLANE_TOL_PX
            or not np.array_equal(np.abs(lin).sum(axis=0), [1, 1])
            or not np.array_equal(np.abs(lin).sum(axis=1), [1, 1])
        ):
            raise ValueError(
                f"Volume slice {i} is not on the pixel grid of its source frame "
                f"(instance {sf.dataset.SOPInstanceUID}): the volume must not be resampled in-plane."
            )
        shape = (int(sf.dataset.Rows), int(sf.dataset.Columns))
        out.append(SliceSource(i, sf.dataset, sf.frame, rounded.astype(np.int64), shape))
    if not out:
        raise ValueError("SeriesVolume.frames: no acquired slice (all slices are interpolated).")
    return out


def algorithm_identification(model: ModelRef) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=codes.DCM.ArtificialIntelligence,
        version=model.version,
        source=NODE_NAME,
        parameters={"runtime": model.runtime},
    )


def write_seg(findings: Findings) -> hd.seg.Segmentation:
    """One BINARY SEG instance with a segment per :class:`~node.analysis.findings.Segment`."""
    series, model = findings.series, findings.model
    _check_segments(findings)
    sources = slice_sources(series)
    src0 = sources[0].dataset
    multiframe = sources[0].frame is not None
    if multiframe:
        if any(s.frame is None or s.dataset.SOPInstanceUID != src0.SOPInstanceUID for s in sources):
            raise ValueError(
                "SeriesVolume.frames: a multi-frame source must be the series' only instance "
                "(several multi-frame or mixed instances are not supported)."
            )
        n_planes = int(src0.NumberOfFrames)
        plane_of = {s.index: s.frame - 1 for s in sources}
        source_images = [src0]
    else:
        if any(s.frame is not None for s in sources):
            raise ValueError("SeriesVolume.frames: mixed single-frame and multi-frame sources.")
        if len({s.dataset.SOPInstanceUID for s in sources}) != len(sources):
            raise ValueError("SeriesVolume.frames: a single-frame instance is the source of two slices.")
        n_planes = len(sources)
        plane_of = {s.index: j for j, s in enumerate(sources)}
        source_images = [s.dataset for s in sources]

    rows, cols = sources[0].shape
    segments = findings.segments
    # Planes in the order highdicom expects: the source images' order (single-frame) or frame order.
    # Segment-major storage, handed over as a (planes, rows, cols, segments) view: highdicom's
    # overlap check sums over the segment axis, ~10x faster when each segment is contiguous.
    stack = np.zeros((len(segments), n_planes, rows, cols), bool)
    for k, seg in enumerate(segments):
        mask = np.asarray(seg.mask, bool)
        for s in sources:
            if mask[s.index].any():
                stack[k, plane_of[s.index]] = s.plane_to_source(mask[s.index])
    pixels = stack.transpose(1, 2, 3, 0)
    if not pixels.any():
        raise ValueError("Findings.segments: every mask is empty on the acquired slices; nothing to write.")

    algorithm = algorithm_identification(model)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=seg.number,
            segment_label=seg.label[:64],
            segmented_property_category=seg.category.coded(),
            segmented_property_type=seg.type.coded(),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=findings.tracking_uid(seg),
            tracking_id=seg.label[:64],
        )
        for seg in segments
    ]
    for d, seg in zip(descriptions, segments, strict=True):
        if seg.modifier:  # highdicom takes no modifier; the attribute is the standard's (C.8.20.2)
            d.SegmentedPropertyTypeModifierCodeSequence = [seg.modifier.coded()]

    def uid(kind: str) -> str:
        return uids.output_uid(series.series_uid, model.name, model.version, kind)

    seg_ds = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        **uids.instance_identity(
            series.series_uid, src0.get("SeriesNumber"), model.name, model.version, "seg"
        ),
        content_label="AI_SEGMENTATION",
        content_description=f"{model.name} {model.version}"[:64],
        omit_empty_frames=True,
    )
    # highdicom draws a random Dimension Organization UID; ours must be reproducible
    dim_uid = uid("seg-dimension-organization")
    seg_ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = dim_uid
    for item in seg_ds.DimensionIndexSequence:
        item.DimensionOrganizationUID = dim_uid
    seg_ds.ContentCreatorName = ""  # Type 2 (Content Identification): an algorithm, named in Software Versions
    return seg_ds


def _check_segments(findings: Findings) -> None:
    shape = findings.series.volume.spatial_shape
    if not findings.segments:
        raise ValueError("Findings.segments is empty; a SEG needs at least one segment.")
    numbers = [s.number for s in findings.segments]
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"Segment.number must run 1, 2, ... in list order, got {numbers}.")
    for s in findings.segments:
        if np.shape(s.mask) != tuple(shape):
            raise ValueError(
                f"Segment.mask of segment {s.number} has shape {np.shape(s.mask)}, volume {shape}."
            )
        if s.kind not in ("organ", "lesion"):
            raise ValueError(
                f"Segment.kind of segment {s.number} must be 'organ' or 'lesion', got {s.kind!r}."
            )
