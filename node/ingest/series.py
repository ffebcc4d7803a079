"""Find DICOM input and group it into series.

Only headers are read here (``stop_before_pixels``) so that scanning a folder
of thousands of files stays fast; pixel data is read later by
:func:`node.ingest.volume.load_volume`. Problems with individual files are returned
as :class:`~node.errors.InputError` values instead of being raised, so one bad
file does not stop the other series.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from node.errors import InputError

log = logging.getLogger(__name__)

# Objects that are never input images; the node's own output (SEG, SR, PR) must never loop back in.
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTRECORD", "REG", "DOC"})
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR


@dataclass
class SourceSeries:
    """One series found in the input: headers only (no pixel data), one per file, in discovery order."""

    series_uid: str
    modality: str
    files: list[Path]
    datasets: list[Dataset]  # parallel to ``files``


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass
class ScanResult:
    series: list[SourceSeries] = field(default_factory=list)
    errors: list[InputError] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def find_series(inputs: Sequence[Path]) -> tuple[list[SourceSeries], list[InputError]]:
    """Walk files and folders, read headers and group images by SeriesInstanceUID.

    Named files that are not (readable) DICOM give an error; non-DICOM files inside
    folders and non-image objects (SEG, SR, PR, KO, DICOMDIR...) are skipped with a warning.
    """
    result = scan(inputs)
    return result.series, result.errors


def scan(inputs: Sequence[Path]) -> ScanResult:
    """Like :func:`find_series`, but also says what was skipped and why."""
    result = ScanResult()
    by_uid: dict[str, SourceSeries] = {}
    seen_files: set[Path] = set()
    seen_sops: set[str] = set()
    broken: dict[str, InputError] = {}
    for path, named in _walk(inputs, result):
        key = path.resolve()
        if key in seen_files:
            continue
        seen_files.add(key)
        ds = _read_header(path, named, result)
        if ds is None:
            continue
        reason = _not_an_image(ds)
        if reason:
            _skip(result, path, reason)
            continue
        series_uid = str(ds.get("SeriesInstanceUID", ""))
        if not series_uid:
            result.errors.append(InputError(f"{path}: DICOM file without SeriesInstanceUID"))
            continue
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        if sop_uid and sop_uid in seen_sops:
            _skip(result, path, "same SOPInstanceUID as a file already read")
            continue
        seen_sops.add(sop_uid)
        if ds.pacs_node_short_pixels:
            # the series is known but incomplete: fail it whole rather than infer on a hole
            broken.setdefault(
                series_uid,
                InputError(f"series {series_uid}: {path}: truncated DICOM ({ds.pacs_node_short_pixels})"),
            )
            continue
        series = by_uid.get(series_uid)
        if series is None:
            series = by_uid[series_uid] = SourceSeries(series_uid, str(ds.get("Modality", "")), [], [])
            result.series.append(series)
        series.files.append(path)
        series.datasets.append(ds)
    result.series = [s for s in result.series if s.series_uid not in broken]
    result.errors.extend(broken.values())
    return result


def _walk(inputs: Sequence[Path], result: ScanResult) -> Iterable[tuple[Path, bool]]:
    """Yield (file, named explicitly); sorted within folders so runs are reproducible."""
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    if not name.startswith("."):
                        yield Path(root) / name, False
        elif path.is_file():
            yield path, True
        else:
            result.errors.append(InputError(f"{path}: no such file or folder"))


def _read_header(path: Path, named: bool, result: ScanResult) -> Dataset | None:
    try:
        with open(path, "rb") as fp:
            ds = dcmread(fp, stop_before_pixels=True)
            pixel_offset = fp.tell()
    except InvalidDicomError:
        if named:
            result.errors.append(InputError(f"{path}: not a DICOM file"))
        else:
            _skip(result, path, "not a DICOM file")
        return None
    except Exception as exc:  # pydicom raises many kinds on a cut-off or garbled file
        result.errors.append(InputError(f"{path}: truncated or unreadable DICOM ({_short(exc)})"))
        return None
    if "SOPClassUID" not in ds and "DirectoryRecordSequence" not in ds:
        # pydicom reads a file cut inside its header without complaint; the identity is then missing
        result.errors.append(InputError(f"{path}: truncated or unreadable DICOM (no SOPClassUID)"))
        return None
    ds.pacs_node_short_pixels = _native_pixel_data_short(
        ds, path, pixel_offset
    )  # judged per series in scan()
    return ds


def _native_pixel_data_short(ds: Dataset, path: Path, pixel_offset: int) -> str:
    """Cheap truncation check for uncompressed pixel data: is the file long enough?"""
    if "Rows" not in ds or ds.file_meta.get("TransferSyntaxUID") is None:
        return ""
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return ""  # encapsulated: a cut-off stream is found when it is decoded
    try:
        expected = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.get("NumberOfFrames", 1) or 1)
            * int(ds.get("SamplesPerPixel", 1))
            * int(ds.BitsAllocated)
            // 8
        )
    except (AttributeError, TypeError, ValueError):
        return ""
    available = path.stat().st_size - pixel_offset - 12  # tag + VR + reserved + 4-byte length
    if 0 <= pixel_offset < path.stat().st_size and available < expected:
        return f"pixel data has {max(available, 0)} of {expected} bytes"
    return ""


def _not_an_image(ds: Dataset) -> str:
    modality = str(ds.get("Modality", "")).upper()
    if modality in NON_IMAGE_MODALITIES:
        return f"{modality} object, not an image"
    sop_class = str(ds.get("SOPClassUID", "")) or str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
    if sop_class == _MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        return "DICOMDIR, not an image"
    if "Rows" not in ds:
        return f"{modality or 'unknown'} object without image pixels"
    return ""


def _skip(result: ScanResult, path: Path, reason: str) -> None:
    log.warning("skipping %s: %s", path, reason)
    result.skipped.append(Skipped(path, reason))


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
