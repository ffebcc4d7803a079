"""DICOM Segmentation (BINARY) of a :class:`~node.analysis.findings.Findings`.

Every SEG frame is a source frame: its plane position, orientation and pixel
measures are copied from the source instance (highdicom does this when the
plane positions are not given), and its Derivation Image / Source Image
references name that instance and, for a multi-frame source, that frame. A
volume slice interpolated over a gap has no source and is left out. So an
overlay can never be shifted by resampling or rounding on the way.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sr.codedict import codes
from pydicom.tag import Tag

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
    # the source planes each segment crosses, and every plane any segment crosses
    by_index = {s.index: s for s in sources}
    covered = [{plane_of[i]: by_index[i] for i in seg.slices if i in by_index} for seg in segments]
    union = sorted(set().union(*covered))
    if not union:
        raise ValueError("Findings.segments: every mask is empty on the acquired slices; nothing to write.")

    algorithms = {m: algorithm_identification(m) for m in {seg.model or model for seg in segments}}
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=seg.number,
            segment_label=seg.label[:64],
            segmented_property_category=seg.category.coded(),
            segmented_property_type=seg.type.coded(),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithms[seg.model or model],  # a series may go through several
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

    # highdicom writes everything but the frames, for two segments each crossing exactly the planes
    # that any segment crosses: so its per-frame items of segment 1 (source references, positions,
    # dimension indices) are those of every segment of the whole SEG, one per plane in its order;
    # the frames are then written here, each segment's from its box. (highdicom's constructor
    # builds a Dataset per frame: TotalSegmentator's ~8,000 frames of a 300-slice CT take it
    # seconds, then as long again to write.) A single segment is highdicom's own, whole: its
    # Segment Identification then goes in the shared functional groups.
    single = len(segments) == 1
    pixels = np.zeros((n_planes, rows, cols), np.uint8)
    if single:
        for p, s in covered[0].items():
            pixels[p] = s.plane_to_source(segments[0].mask.plane(s.index))
    else:
        pixels[union, 0, 0], pixels[union, -1, -1] = 1, 2
    seg_ds = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions[:2],
        **uids.instance_identity(
            series.series_uid, src0.get("SeriesNumber"), model.name, model.version, "seg"
        ),
        content_label="AI_SEGMENTATION",
        content_description=f"{model.name} {model.version}"[:64],
        omit_empty_frames=True,
    )
    if not single:
        seg_ds.SegmentSequence = descriptions
        frame_items, packed = _frames(seg_ds, segments, covered, (rows, cols))
        seg_ds.NumberOfFrames = len(frame_items)
        items = b"".join(frame_items)  # written as they are; pydicom parses them only if asked
        seg_ds[_PER_FRAME] = RawDataElement(_PER_FRAME, "SQ", len(items), items, 0, False, True)
        # as if read from an explicit VR little endian file: so pydicom writes the items as they are,
        # rather than parsing them all to look for ambiguous VRs (they have none)
        seg_ds.set_original_encoding(False, True, seg_ds._character_set)
        seg_ds["PixelData"] = DataElement("PixelData", "OB", packed)  # 1 bit allocated: OB (PS3.5 8.2)
        seg_ds.SegmentsOverlap = "YES" if _overlap(segments) else "NO"
    # highdicom draws a random Dimension Organization UID; ours must be reproducible
    dim_uid = uid("seg-dimension-organization")
    seg_ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = dim_uid
    for item in seg_ds.DimensionIndexSequence:
        item.DimensionOrganizationUID = dim_uid
    seg_ds.ContentCreatorName = (
        ""  # Type 2 (Content Identification): an algorithm, named in Software Versions
    )
    return seg_ds


_PER_FRAME = Tag(0x52009230)  # Per-frame Functional Groups Sequence
_ITEM = b"\xfe\xff\x00\xe0"
# where a per-frame item names its segment: Dimension Index Values (UL, the segment's index
# first) and Referenced Segment Number (US), as explicit VR little endian tag + VR
_DIMENSION_INDEX, _SEGMENT_NUMBER = b"\x20\x00\x57\x91UL", b"\x62\x00\x0b\x00US"


def _frames(seg_ds, segments, covered, shape) -> tuple[list[bytes], bytes]:
    """Per-frame items and packed BINARY pixels, segment by segment and, within each, in the
    order of the template's planes (highdicom's frame order, empty frames left out)."""
    templates = []  # (plane, encoded item, offsets of the segment number fields)
    planes = {(s.dataset.SOPInstanceUID, s.frame): p for p, s in _plane_sources(covered)}
    for item in seg_ds.PerFrameFunctionalGroupsSequence:
        if item.SegmentIdentificationSequence[0].ReferencedSegmentNumber != 1:
            continue
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        frame = int(ref.ReferencedFrameNumber) if "ReferencedFrameNumber" in ref else None
        body = _encode(item)
        at = [body.index(_DIMENSION_INDEX) + 8, body.index(_SEGMENT_NUMBER) + 8]
        if any(body.count(m) != 1 for m in (_DIMENSION_INDEX, _SEGMENT_NUMBER)):
            raise ValueError("a per-frame functional group item names its segment more than once")
        templates.append((planes[(ref.ReferencedSOPInstanceUID, frame)], body, at))
    # BINARY: one bit per pixel, frames back to back with no padding between them (PS3.5 8.1.1):
    # packed a segment at a time when a frame is whole bytes (512x512), else all at the end
    aligned = shape[0] * shape[1] % 8 == 0
    items, packed, blocks = [], [], []
    for seg, cover in zip(segments, covered, strict=True):
        chosen = []
        for plane, body, (dim_at, num_at) in templates:
            if plane not in cover:
                continue
            b = bytearray(body)
            b[dim_at : dim_at + 4] = struct.pack("<I", seg.number)
            b[num_at : num_at + 2] = struct.pack("<H", seg.number)
            items.append(_ITEM + struct.pack("<I", len(b)) + bytes(b))
            chosen.append(cover[plane])
        blocks.append(_segment_frames(seg.mask, chosen, shape))
        if aligned:
            packed.append(np.packbits(blocks.pop(), bitorder="little").tobytes())
    if blocks:
        packed.append(np.packbits(np.concatenate(blocks), bitorder="little").tobytes())
    pixels = b"".join(packed)
    return items, pixels + b"\x00" * (len(pixels) % 2)


def _segment_frames(mask, sources: list[SliceSource], shape: tuple[int, int]) -> np.ndarray:
    """A segment's frames on these source planes, the box copied straight in where the volume
    slice is the source frame as stored (the usual case)."""
    block = np.zeros((len(sources), *shape), bool)
    for j, source in enumerate(sources):
        if source.is_identity and shape == mask.shape[1:]:
            block[j][mask.box[1:]] = mask.crop[source.index - mask.box[0].start]
        else:
            block[j] = source.plane_to_source(mask.plane(source.index))
    return block


def _plane_sources(covered) -> list[tuple[int, SliceSource]]:
    return list({p: s for cover in covered for p, s in cover.items()}.items())


def _encode(item: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, item)
    return fp.getvalue()


def _overlap(segments) -> bool:
    """Whether any voxel is in two segments (an organ's lesion is also in the organ)."""
    count = np.zeros(segments[0].mask.shape, np.uint8)
    for seg in segments:
        count[seg.mask.box] += seg.mask.crop
        if count[seg.mask.box].max(initial=0) > 1:
            return True
    return False


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
