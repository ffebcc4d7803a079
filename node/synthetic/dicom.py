"""Write a :class:`~node.synthetic.phantom.Phantom` as a DICOM CT or MR series.

The basic writer stores a standard axial stack of single-frame instances.
:func:`write_variant` stores the same phantom in the other ways real scanners
and PACS do (shuffled, feet first, bottom-up rows, transposed, per-slice
rescale, sagittal, coronal, oblique, Legacy Converted Enhanced multi-frame,
JPEG lossless / JPEG-LS / JPEG 2000 / RLE) for the geometry tests and the demo.
Every variant is lossless, and all but ``oblique`` keep the very same voxels at
the same patient positions, so a reader can be checked for exact equality.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, MRImageStorage, generate_uid

from node.synthetic.phantom import Phantom, SampledPhantom, axial_affine, rotated


@dataclass(frozen=True)
class Patient:
    """Synthetic patient/study identity written into the phantom's DICOM headers."""

    name: str = "PHANTOM^CT"
    id: str = "PH0001"
    birth_date: str = "19700101"
    sex: str = "O"
    accession: str = "ACC0001"
    study_uid: str = ""  # empty: derived from the seed
    study_date: str = "20260101"


@dataclass
class WrittenSeries:
    files: list[Path]
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    affine: np.ndarray  # index->LPS of the sampled grid (slice, row, col)
    truth: SampledPhantom  # ground truth on that grid


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=["pacs-node-phantom", *map(str, parts)])


def write_axial_series(
    phantom: Phantom,
    out_dir: Path,
    *,
    modality: str = "CT",
    shape: tuple[int, int, int] = (60, 256, 256),
    pixel_spacing: float = 1.5,
    slice_spacing: float = 5.0,
    z_center: float = -20.0,
    seed: int = 0,
    noise: float | None = None,
    patient: Patient = Patient(),
    series_number: int = 1,
) -> WrittenSeries:
    """Sample ``phantom`` on a standard axial grid and write one file per slice."""
    affine = axial_affine(shape, pixel_spacing, slice_spacing, z_center)
    truth = phantom.sample(
        affine,
        shape,
        modality,
        noise=(12.0 if modality == "CT" else 2.0) if noise is None else noise,
        seed=seed,
    )
    return write_grid(
        truth, affine, out_dir, modality=modality, seed=seed, patient=patient, series_number=series_number
    )


def write_grid(
    truth: SampledPhantom,
    affine: np.ndarray,
    out_dir: Path,
    *,
    modality: str = "CT",
    seed: int = 0,
    patient: Patient = Patient(),
    series_number: int = 1,
    series_description: str = "",
    rescale: Sequence[tuple[float, float]] | None = None,
) -> WrittenSeries:
    """Write a sampled volume (axes slice,row,col) with the given affine as single-frame instances.

    ``rescale`` gives (slope, intercept) per slice; the stored values are then signed 16-bit.
    The returned ``truth.image`` holds the values exactly as stored (rounded, clipped, rescaled),
    so a reader can be checked for exact equality.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets, written = _grid_datasets(
        truth, affine, modality, seed, patient, series_number, series_description, rescale
    )
    files = []
    for i, ds in enumerate(datasets):
        path = out_dir / f"{modality}{series_number:03d}_{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    written.files = files
    return written


def _grid_datasets(
    truth: SampledPhantom,
    affine: np.ndarray,
    modality: str,
    seed: int,
    patient: Patient,
    series_number: int,
    series_description: str,
    rescale: Sequence[tuple[float, float]] | None,
) -> tuple[list[Dataset], WrittenSeries]:
    study_uid = patient.study_uid or _uid("study", patient.id, seed)
    series_uid = _uid("series", study_uid, modality, seed, series_number, series_description)
    for_uid = _uid("for", study_uid, seed)
    row_dir = affine[:3, 2] / np.linalg.norm(affine[:3, 2])  # direction along a row = column index
    col_dir = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    spacing = (float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 2])))
    slice_step = float(np.linalg.norm(affine[:3, 0]))
    n = truth.image.shape[0]
    if rescale is not None:
        if len(rescale) != n:
            raise ValueError(f"rescale: {len(rescale)} (slope, intercept) pairs for {n} slices")
        slopes = np.array([s for s, _ in rescale], np.float64)[:, None, None]
        intercepts = np.array([b for _, b in rescale], np.float64)[:, None, None]
        lo, hi = (-1024, 3071) if modality == "CT" else (0, 65535)
        values = np.clip(np.round(truth.image.astype(np.float64)), lo, hi)
        stored = np.round((values - intercepts) / slopes)
        if stored.min() < -32768 or stored.max() > 32767:
            raise ValueError("rescale: stored values do not fit in signed 16 bits")
        stored = stored.astype(np.int16)
        image = (stored * slopes + intercepts).astype(np.float32)
    elif modality == "CT":
        # rounded in float64 before the offset, as the rescale variant is: in float32, x + 1024 can
        # round a value just below k + 0.5 up to it, and the two variants would differ by 1 HU there
        stored = np.clip(np.round(truth.image.astype(np.float64)) + 1024.0, 0, 4095).astype(np.uint16)
        image = stored.astype(np.float32) - 1024.0
    else:
        stored = np.clip(np.round(truth.image), 0, 65535).astype(np.uint16)
        image = stored.astype(np.float32)
    datasets = []
    for i in range(n):
        pos = affine @ np.array([i, 0, 0, 1.0])
        ds = _base_dataset(
            modality, patient, study_uid, series_uid, for_uid, series_number, series_description
        )
        ds.SOPInstanceUID = _uid("sop", series_uid, i)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [_ds(v) for v in pos[:3]]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [_ds(spacing[0]), _ds(spacing[1])]
        ds.SliceThickness = _ds(slice_step)
        ds.SpacingBetweenSlices = _ds(slice_step)
        ds.SliceLocation = _ds(float(np.dot(pos[:3], np.cross(row_dir, col_dir))))
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12 if modality == "CT" and rescale is None else 16
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if rescale is not None else 0
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = _ds(rescale[i][0]), _ds(rescale[i][1])
            ds.RescaleType = "HU" if modality == "CT" else "US"
        elif modality == "CT":
            ds.RescaleIntercept = "-1024"
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
        # a window on every frame: the Legacy Converted Enhanced IODs require one per frame
        ds.WindowCenter, ds.WindowWidth = ("40", "400") if modality == "CT" else ("500", "1000")
        ds.PixelData = stored[i].tobytes()
        datasets.append(ds)
    quantized = SampledPhantom(image=image, tissue=truth.tissue, lesion=truth.lesion)
    return datasets, WrittenSeries([], series_uid, study_uid, for_uid, np.array(affine, float), quantized)


# -- storage variants -----------------------------------------------------------

VARIANTS = (
    "axial",
    "shuffled",
    "feet_first",
    "bottom_up",
    "transposed",
    "rescale",
    "sagittal",
    "coronal",
    "oblique",
    "multiframe",
    "jpeg_lossless",
    "jpegls",
    "j2k",
    "rle",
)
# variant -> (axis permutation of the axial grid, axes to flip afterwards)
_RESTORE: dict[str, tuple[tuple[int, int, int], tuple[int, ...]]] = {
    "feet_first": ((0, 1, 2), (0,)),
    "bottom_up": ((0, 1, 2), (1,)),
    "transposed": ((0, 2, 1), ()),
    "sagittal": ((2, 0, 1), ()),  # slices right->left, rows head->feet, columns anterior->posterior
    "coronal": ((1, 0, 2), ()),  # slices anterior->posterior, rows head->feet, columns right->left
}
# DCMTK command per compressed variant (all lossless); j2k goes through pydicom + openjpeg
_DCMTK = {"jpeg_lossless": ["dcmcjpeg", "+e1"], "jpegls": ["dcmcjpls", "+el"], "rle": ["dcmcrle"]}


def write_variant(
    phantom: Phantom,
    out_dir: Path,
    variant: str,
    modality: str = "CT",
    seed: int = 0,
    *,
    shape: tuple[int, int, int] = (20, 96, 96),
    pixel_spacing: float = 3.5,
    slice_spacing: float = 5.0,
    z_center: float = -20.0,
    noise: float | None = None,
    oblique_degrees: tuple[float, float] = (15.0, 15.0),
    patient: Patient = Patient(),
    series_number: int = 1,
) -> WrittenSeries:
    """Write the phantom stored one particular way (see :data:`VARIANTS`).

    Pure storage variants (all but ``oblique``) hold the very same voxels at the same
    patient positions as ``axial``; the returned ``affine``/``truth`` describe the grid as
    stored, so ``truth.image[i, j, k]`` is the value at ``affine @ (i, j, k, 1)``.
    ``oblique`` samples the phantom on a grid rotated about the left-right then the
    anterior-posterior axis through the centre of the axial field of view.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant: unknown {variant!r} (known: {', '.join(VARIANTS)})")
    affine = axial_affine(shape, pixel_spacing, slice_spacing, z_center)
    if variant == "oblique":
        affine = rotated(affine, shape, *oblique_degrees)
    sigma = (12.0 if modality == "CT" else 2.0) if noise is None else noise
    truth = phantom.sample(affine, shape, modality, noise=sigma, seed=seed)
    if variant in _RESTORE:
        truth, affine = _restore(truth, affine, *_RESTORE[variant])
    rescale = None
    if variant == "rescale":
        # power-of-two slopes and integer intercepts keep stored -> modality values exact in float32
        rng = np.random.default_rng(seed + 17)
        slopes, intercepts = (
            (0.25, 0.5, 1.0),
            ((-2048.0, -1024.0, -1000.0, 0.0) if modality == "CT" else (0.0, -100.0, 50.0)),
        )
        rescale = [
            (float(rng.choice(slopes)), float(rng.choice(intercepts))) for _ in range(truth.image.shape[0])
        ]
    description = f"{modality} phantom" if variant == "axial" else f"{modality} phantom {variant}"
    datasets, written = _grid_datasets(
        truth, affine, modality, seed, patient, series_number, description, rescale
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if variant == "multiframe":
        written.files = [_write_multiframe(datasets, written, modality, series_number, out_dir)]
        return written
    names = [f"{modality}{series_number:03d}_{i + 1:04d}.dcm" for i in range(len(datasets))]
    if variant == "shuffled":
        rng = np.random.default_rng(seed + 23)
        numbers = rng.permutation(len(datasets)) + 1
        for ds, number in zip(datasets, numbers, strict=True):
            ds.InstanceNumber = int(number)
        names = [f"IM{_uid('name', ds.SOPInstanceUID)[-8:]}" for ds in datasets]  # no order in the names
        order = rng.permutation(len(datasets))
        datasets, names = [datasets[i] for i in order], [names[i] for i in order]
    files = []
    for ds, name in zip(datasets, names, strict=True):
        if variant == "j2k":
            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        path = out_dir / name
        ds.save_as(path, enforce_file_format=True)
        if variant in _DCMTK:
            _dcmtk_compress(_DCMTK[variant], path)
        files.append(path)
    written.files = files
    return written


def _restore(
    truth: SampledPhantom, affine: np.ndarray, perm: tuple[int, int, int], flips: tuple[int, ...]
) -> tuple[SampledPhantom, np.ndarray]:
    """Same voxels, other storage order: permute the array axes, then flip some of them."""
    arrays = [np.transpose(a, perm) for a in (truth.image, truth.tissue, truth.lesion)]
    out = np.eye(4)
    out[:3, :3] = affine[:3, list(perm)]
    out[:3, 3] = affine[:3, 3]
    for axis in flips:
        n = arrays[0].shape[axis]
        out[:3, 3] += out[:3, axis] * (n - 1)
        out[:3, axis] = -out[:3, axis]
        arrays = [np.flip(a, axis) for a in arrays]
    image, tissue, lesion = (np.ascontiguousarray(a) for a in arrays)
    return SampledPhantom(image=image, tissue=tissue, lesion=lesion), out


def _write_multiframe(
    datasets: list[Dataset], written: WrittenSeries, modality: str, series_number: int, out_dir: Path
) -> Path:
    """One Legacy Converted Enhanced CT/MR instance holding every slice as a frame."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage, LegacyConvertedEnhancedMRImage

    cls = LegacyConvertedEnhancedCTImage if modality == "CT" else LegacyConvertedEnhancedMRImage
    series_uid = _uid("series", written.study_uid, modality, "multiframe-enhanced", series_number)
    image = cls(
        legacy_datasets=datasets,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=_uid("sop", series_uid, 0),
        instance_number=1,
    )
    # The Common Instance Reference to the single-frame sources (never written out) makes dciodvfy
    # report "does not reference Instances"; the Conversion Source Attributes keep the provenance.
    if "ReferencedSeriesSequence" in image:
        del image.ReferencedSeriesSequence
    written.series_uid = series_uid
    path = out_dir / f"{modality}{series_number:03d}_multiframe.dcm"
    image.save_as(path, enforce_file_format=True)
    return path


def _dcmtk_compress(command: list[str], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    subprocess.run([*command, str(path), str(tmp)], check=True, capture_output=True)
    tmp.replace(path)


def _ds(v: float) -> str:
    """A DICOM DS string (max 16 chars) for v."""
    s = f"{float(v):.6f}".rstrip("0").rstrip(".")
    return s if s not in ("-0", "") else "0"


def _base_dataset(
    modality: str,
    patient: Patient,
    study_uid: str,
    series_uid: str,
    for_uid: str,
    series_number: int,
    series_description: str,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Modality = modality
    ds.Manufacturer = "pacs-node phantom"
    ds.PatientName = patient.name
    ds.PatientID = patient.id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = patient.study_date
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = patient.accession
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "PHANTOM TORSO"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description or f"{modality} phantom"
    ds.SeriesDate = patient.study_date
    ds.SeriesTime = "120000"
    ds.ContentDate = patient.study_date
    ds.ContentTime = "120000"
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    if modality == "CT":
        ds.KVP = "120"
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = "10"
        ds.RepetitionTime = "500"
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = "1.5"
        ds.ImagingFrequency = "63.9"
        ds.ImagedNucleus = "1H"
    return ds
