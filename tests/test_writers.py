"""DICOM writers (SEG, TID 1500 SR, GSPS) on a small phantom with known ground truth."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from node.analysis.findings import Classification, Concept, Findings, ModelRef, Segment
from node.analysis.measure import measure
from node.ingest.volume import SeriesVolume, SourceFrame
from node.synthetic.dicom import write_axial_series
from node.synthetic.phantom import Lesion, Phantom
from node.writers import uids
from node.writers.gsps import write_gsps
from node.writers.seg import slice_sources, write_seg
from node.writers.sr import CODES, OHIF_LENGTH, OHIF_OUTLINE, write_outlines, write_sr
from tests.seg_readback import read_segments

ORGAN = Concept("123037004", "SCT", "Anatomical Structure")
LIVER = Concept("10200004", "SCT", "Liver")
ALTERED = Concept("49755003", "SCT", "Morphologically Altered Structure")
LESION = Concept("52988006", "SCT", "Lesion")
PRESENT = Concept("52101004", "SCT", "Present")
NOTE = "2 missing slices interpolated"
PIXEL, SLICE = 2.0, 2.5  # mm
LESION_RADII = (11.0, 6.0)


@dataclasses.dataclass
class Case:
    phantom: Phantom
    findings: Findings
    dir: Path


def _phantom(seed: int = 3) -> Phantom:
    """A random torso with two spherical lesions placed well inside the liver (so they are whole spheres)."""
    ph = Phantom.random(seed, n_lesions=0)
    c = np.asarray(next(e for label, e in ph.organs if label == 1).center)
    lesions = (
        Lesion(tuple(map(float, c + (-15, -10, 4))), LESION_RADII[0], 1, 0.0, 300.0),
        Lesion(tuple(map(float, c + (25, 15, -6))), LESION_RADII[1], 1, 120.0, 700.0),
    )
    return dataclasses.replace(ph, lesions=lesions)


def make_case(out: Path, modality: str = "CT", version: str = "1.0", transform=None) -> Case:
    """20 axial slices of 128x128; masks from the ground truth; ``transform`` re-orients the volume."""
    ph = _phantom()
    z = float(next(e for label, e in ph.organs if label == 1).center[2])
    ws = write_axial_series(
        ph, out, modality=modality, shape=(20, 128, 128), pixel_spacing=PIXEL, slice_spacing=SLICE, z_center=z
    )
    datasets = sorted((pydicom.dcmread(f) for f in ws.files), key=lambda d: -float(d.ImagePositionPatient[2]))
    volume = hd.get_volume_from_series(datasets)
    frames = [SourceFrame(d, None) for d in datasets]
    organs, lesions = ws.truth.organs, ws.truth.lesion
    if transform is not None:
        volume, frames, organs, lesions = transform(volume, frames, organs, lesions)
    sv = SeriesVolume(ws.series_uid, modality, volume, frames, datasets)
    return Case(ph, _findings(sv, organs, lesions, version), out)


def _findings(sv: SeriesVolume, organs: np.ndarray, lesions: np.ndarray, version: str) -> Findings:
    segments = [Segment(1, "Liver", "organ", ORGAN, LIVER, organs == 1, probability=0.95)]
    for k in (1, 2):
        segments.append(
            Segment(k + 1, f"Lesion {k}", "lesion", ALTERED, LESION, lesions == k, probability=0.8)
        )
    for s in segments:
        measure(s, sv)
    return Findings(
        sv,
        ModelRef("phantom-fm", version),
        segments,
        [Classification("lesion-presence", LESION, PRESENT, 0.97, positive=True)],
        [NOTE],
    )


def flip_and_transpose(volume, frames, organs, lesions):
    """Volume rows reversed and rows/columns swapped relative to the stored frames."""

    def f(a):
        return np.swapaxes(a[:, ::-1, :], 1, 2)

    return volume.flip_spatial(1).swap_spatial_axes(1, 2), frames, f(organs), f(lesions)


def write_all(case: Case) -> dict[str, Path]:
    seg = write_seg(case.findings)
    out = {
        "seg": seg,
        "sr": write_sr(case.findings, seg),
        "outlines": write_outlines(case.findings, seg),
        "gsps": write_gsps(case.findings),
    }
    paths = {}
    for kind, ds in out.items():
        paths[kind] = case.dir / f"{kind}.dcm"
        ds.save_as(paths[kind], enforce_file_format=True)
    return paths


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> tuple[Case, dict[str, Path]]:
    case = make_case(tmp_path_factory.mktemp("ct"))
    return case, write_all(case)


@pytest.fixture(scope="module")
def mr(tmp_path_factory) -> tuple[Case, dict[str, Path]]:
    case = make_case(tmp_path_factory.mktemp("mr"), modality="MR")
    return case, write_all(case)


def dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]


# -- validity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["seg", "sr", "outlines", "gsps"])
@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_dciodvfy_reports_no_errors(kind, modality, request):
    _, paths = request.getfixturevalue(modality)
    assert dciodvfy_errors(paths[kind]) == []


def test_dsrdump_reads_the_sr(ct):
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump (DCMTK) is not installed")
    _, paths = ct
    r = subprocess.run(["dsrdump", str(paths["sr"])], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Oncology Measurement Report" in r.stdout  # the complete report: see node.writers.sr
    assert "Lesion 2" in r.stdout and NOTE in r.stdout


# -- SEG ------------------------------------------------------------------------------------------


def test_seg_masks_read_back_on_source_instances(ct):
    case, paths = ct
    seg = hd.seg.segread(paths["seg"])
    f = case.findings
    uids_in_order = [fr.dataset.SOPInstanceUID for fr in f.series.frames]
    pixels = seg.get_pixels_by_source_instance(uids_in_order, assert_missing_frames_are_empty=True)
    assert pixels.shape == (20, 128, 128, len(f.segments))
    for k, s in enumerate(f.segments):
        np.testing.assert_array_equal(pixels[..., k].astype(bool), np.asarray(s.mask), err_msg=s.label)
    # empty frames are omitted: one frame per (segment, slice it crosses)
    assert seg.NumberOfFrames == sum(len(s.slices) for s in f.segments)


def test_seg_plane_positions_are_the_source_positions(ct):
    case, paths = ct
    seg = pydicom.dcmread(paths["seg"])
    by_uid = {d.SOPInstanceUID: d for d in case.findings.series.datasets}
    for item in seg.PerFrameFunctionalGroupsSequence:
        src_uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        # compared as stored strings: any resampling or rounding would show
        assert [str(v) for v in item.PlanePositionSequence[0].ImagePositionPatient] == [
            str(v) for v in by_uid[src_uid].ImagePositionPatient
        ]
    shared = seg.SharedFunctionalGroupsSequence[0]
    src = case.findings.series.datasets[0]
    assert list(shared.PlaneOrientationSequence[0].ImageOrientationPatient) == list(
        src.ImageOrientationPatient
    )
    assert list(shared.PixelMeasuresSequence[0].PixelSpacing) == list(src.PixelSpacing)


def test_seg_header(ct):
    case, paths = ct
    seg = pydicom.dcmread(paths["seg"])
    src = case.findings.series.datasets[0]
    assert seg.SegmentationType == "BINARY"
    assert (seg.StudyInstanceUID, seg.PatientID, seg.PatientName) == (
        src.StudyInstanceUID,
        src.PatientID,
        src.PatientName,
    )
    assert seg.Manufacturer == "pacs-node"
    assert "phantom-fm 1.0" in list(seg.SoftwareVersions)
    assert seg.SeriesDescription == "AI segmentation (phantom-fm 1.0)"
    assert seg.SeriesNumber == 191
    labels = [item.SegmentLabel for item in seg.SegmentSequence]
    assert labels == ["Liver", "Lesion 1", "Lesion 2"]
    for item in seg.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("phantom-fm", "1.0")
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence
    lesion = seg.SegmentSequence[1]
    assert lesion.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"


def test_seg_follows_a_flipped_and_transposed_volume(tmp_path):
    """The SEG frames are always in the stored frames' pixel order, however the volume is oriented."""
    case = make_case(tmp_path, transform=flip_and_transpose)
    plain = make_case(tmp_path / "plain")
    seg = write_seg(case.findings)
    uids_in_order = [fr.dataset.SOPInstanceUID for fr in case.findings.series.frames]
    pixels = hd.seg.Segmentation.from_dataset(seg).get_pixels_by_source_instance(uids_in_order)
    for k, s in enumerate(plain.findings.segments):
        np.testing.assert_array_equal(pixels[..., k].astype(bool), np.asarray(s.mask), err_msg=s.label)
    # outlines are drawn in the stored frames' pixel order too
    assert_outlines_on_boundary(
        write_gsps(case.findings),
        case.findings,
        {s.label: np.asarray(s.mask) for s in plain.findings.lesions},
    )
    # measurements do not depend on how the volume is oriented
    for a, b in zip(case.findings.segments, plain.findings.segments, strict=True):
        assert a.volume_ml == pytest.approx(b.volume_ml)
        assert a.longest_diameter_mm == pytest.approx(b.longest_diameter_mm)


def test_seg_skips_interpolated_slices(tmp_path):
    case = make_case(tmp_path)
    f = case.findings
    lesion_slices = f.segments[1].slices
    gap = lesion_slices[len(lesion_slices) // 2]
    f.series.frames[gap] = None  # as if this slice had been interpolated over a gap
    seg = hd.seg.Segmentation.from_dataset(write_seg(f))
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    assert f.series.datasets[gap].SOPInstanceUID not in referenced
    assert seg.NumberOfFrames == sum(len(s.slices) - (gap in s.slices) for s in f.segments)


def multiframe_case(tmp_path: Path) -> tuple[Findings, Dataset, list[int]]:
    """The case's slices as one enhanced multi-frame instance, its frames shuffled; the volume runs
    feet to head. Returns the findings, the instance and each volume slice's frame number."""
    case = make_case(tmp_path)
    datasets = case.findings.series.datasets
    shuffled = [datasets[i] for i in np.random.default_rng(0).permutation(len(datasets))]
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        shuffled,
        series_instance_uid=case.findings.series.series_uid,
        series_number=1,
        sop_instance_uid=pydicom.uid.generate_uid(entropy_srcs=["test-mf"]),
        instance_number=1,
    )
    # frame number of each volume slice, found by position; the volume runs feet->head (reversed)
    z_of_frame = [
        float(it.PlanePositionSequence[0].ImagePositionPatient[2])
        for it in mf.PerFrameFunctionalGroupsSequence
    ]
    f = case.findings
    volume = f.series.volume.flip_spatial(0)
    frame_of_slice = []
    for i in range(volume.spatial_shape[0]):
        z = float((volume.affine @ [i, 0, 0, 1])[2])
        frame_of_slice.append(int(np.argmin(np.abs(np.asarray(z_of_frame) - z))) + 1)
    assert frame_of_slice != list(range(1, 21))
    sv = SeriesVolume(f.series.series_uid, "CT", volume, [SourceFrame(mf, n) for n in frame_of_slice], [mf])
    organs = np.stack([np.asarray(s.mask) for s in f.segments])[:, ::-1]
    flipped = Findings(
        sv, f.model, [dataclasses.replace(s, mask=m) for s, m in zip(f.segments, organs, strict=True)]
    )

    for s in flipped.segments:
        measure(s, sv)
    return flipped, mf, frame_of_slice


def test_seg_references_the_right_frames_of_a_multiframe_source(tmp_path):
    flipped, mf, frame_of_slice = multiframe_case(tmp_path)
    seg_ds = write_seg(flipped)
    outputs = {"seg": seg_ds, "sr": write_sr(flipped, seg_ds), "gsps": write_gsps(flipped)}
    for kind, ds in outputs.items():
        ds.save_as(tmp_path / f"{kind}_mf.dcm", enforce_file_format=True)
        assert dciodvfy_errors(tmp_path / f"{kind}_mf.dcm") == [], kind
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    for i, n in enumerate(frame_of_slice):
        got = seg.get_pixels_by_source_frame(mf.SOPInstanceUID, [n])[0]
        for k, s in enumerate(flipped.segments):
            np.testing.assert_array_equal(
                got[..., k].astype(bool), s.mask.plane(i), err_msg=f"slice {i} frame {n}"
            )

    gsps = outputs["gsps"]
    assert_outlines_on_boundary(gsps, flipped, {s.label: np.asarray(s.mask) for s in flipped.lesions})
    frames = {int(a.ReferencedImageSequence[0].ReferencedFrameNumber) for a in gsps.GraphicAnnotationSequence}
    assert frames == {frame_of_slice[i] for s in flipped.lesions for i in s.slices}


def highdicom_seg(findings: Findings) -> Dataset:
    """The SEG as highdicom's constructor alone writes it (every frame of every segment handed to
    it as one array): what :func:`write_seg` must equal."""
    series, model = findings.series, findings.model
    sources = slice_sources(series)
    multiframe = sources[0].frame is not None
    source_images = [sources[0].dataset] if multiframe else [s.dataset for s in sources]
    plane_of = {s.index: (s.frame - 1 if multiframe else j) for j, s in enumerate(sources)}
    n_planes = int(sources[0].dataset.NumberOfFrames) if multiframe else len(sources)
    pixels = np.zeros((n_planes, *sources[0].shape, len(findings.segments)), bool)
    for k, seg in enumerate(findings.segments):
        for s in sources:
            pixels[plane_of[s.index], :, :, k] = s.plane_to_source(seg.mask.plane(s.index))
    ours = write_seg(findings)  # its segment descriptions and identity, to compare the rest
    ref = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=ours.SegmentSequence,
        **uids.instance_identity(
            series.series_uid, source_images[0].get("SeriesNumber"), model.name, model.version, "seg"
        ),
        content_label="AI_SEGMENTATION",
        content_description=f"{model.name} {model.version}"[:64],
        omit_empty_frames=True,
    )
    for item in [*ref.DimensionOrganizationSequence, *ref.DimensionIndexSequence]:
        item.DimensionOrganizationUID = ours.DimensionOrganizationSequence[0].DimensionOrganizationUID
    ref.ContentCreatorName = ""
    return ref


def _read_back(ds: Dataset, path: Path) -> Dataset:
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def _many_segments(case: Case, n: int) -> Findings:
    """``n`` overlapping ellipsoids of every size, some on one slice, some on all, added to the case's."""
    f = case.findings
    shape = f.series.volume.spatial_shape
    rng = np.random.default_rng(7)
    grid = np.indices(shape)
    segments = list(f.segments)
    for k in range(n):
        c, r = rng.uniform(0, shape), rng.uniform((0.3, 2, 2), np.asarray(shape) / 2)
        mask = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r, strict=True)) <= 1
        if mask.any():
            segments.append(Segment(len(segments) + 1, f"Structure {k}", "organ", ORGAN, LIVER, mask))
    return dataclasses.replace(f, segments=segments)


@pytest.mark.parametrize("variant", ["ct", "one segment", "many segments", "flipped", "gap", "multi-frame"])
def test_seg_equals_highdicoms_own_encoding(variant, tmp_path):
    """write_seg takes from highdicom all but the frames and writes those itself: the file is the
    one highdicom's constructor writes, element for element and bit for bit in the pixels."""
    if variant == "multi-frame":
        findings = multiframe_case(tmp_path)[0]
    else:
        case = make_case(tmp_path, transform=flip_and_transpose if variant == "flipped" else None)
        findings = case.findings
        if variant == "one segment":
            findings = dataclasses.replace(findings, segments=findings.segments[:1])
        elif variant == "many segments":
            findings = _many_segments(case, 120)
        elif variant == "gap":
            findings.series.frames[findings.segments[1].slices[1]] = None
    ours = _read_back(write_seg(findings), tmp_path / "ours.dcm")
    ref = _read_back(highdicom_seg(findings), tmp_path / "ref.dcm")
    assert ours.NumberOfFrames == ref.NumberOfFrames > len(findings.segments)
    assert ours.SegmentsOverlap == ref.SegmentsOverlap
    for ds in (ours, ref):  # the moment each was made
        for item in ds.get("ContributingEquipmentSequence", []):
            item.pop("ContributionDateTime", None)
    moments = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime"}
    differ = [e.keyword for e in ref if e.keyword not in {"PixelData", *moments} and ours.get(e.tag) != e]
    assert differ == [], differ
    assert [e.tag for e in ours] == [e.tag for e in ref]
    np.testing.assert_array_equal(ours.pixel_array, ref.pixel_array)
    assert dciodvfy_errors(tmp_path / "ours.dcm") == []
    # and the independent reader finds every segment's voxels where they are in patient space
    read = read_segments(tmp_path / "ours.dcm")
    vol = findings.series.volume
    assert len(read) == len(findings.segments) > (100 if variant == "many segments" else 0)
    for seg in findings.segments:
        ijk = np.argwhere(np.asarray(seg.mask))
        ijk = ijk[[findings.series.frames[i] is not None for i in ijk[:, 0]]]
        got = read[seg.label]
        assert len(got.points) == len(ijk), seg.label
        np.testing.assert_allclose(
            got.centroid, (vol.affine @ np.c_[ijk, np.ones(len(ijk))].T)[:3].mean(axis=1), atol=1e-3
        )


# -- SR -------------------------------------------------------------------------------------------


def _num(group, name, derivation=None) -> tuple[float, str]:
    for m in group.get_measurements(name=name):
        if derivation is None or (m.derivation is not None and m.derivation.value == derivation.value):
            return float(m.value), m.unit.value
    raise AssertionError(f"no {name.meaning} measurement in group {group.tracking_identifier}")


def test_sr_measurements(ct):
    case, paths = ct
    sr = hd.sr.srread(paths["sr"])
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Liver", "Lesion 1", "Lesion 2"]
    for g, s, radius in zip(groups[1:], case.findings.lesions, LESION_RADII, strict=True):
        volume, unit = _num(g, CODES["volume"])
        assert unit == "ml"
        assert volume == pytest.approx(4 / 3 * np.pi * radius**3 / 1000, rel=0.08)
        assert volume == pytest.approx(s.volume_ml)
        mean, unit = _num(g, CODES["ct_intensity"], CODES["mean"])
        assert unit == "[hnsf'U]" and mean == pytest.approx(s.mean)
        maximum, _ = _num(g, CODES["ct_intensity"], CODES["maximum"])
        assert maximum == pytest.approx(s.maximum) and maximum >= mean
        diameter, unit = _num(g, CODES["long_axis"])
        assert unit == "mm"
        # the true diameter of the sphere's cross-section on the slice where it was measured
        lesion = case.phantom.lesions[int(s.label.split()[-1]) - 1]
        z = float((case.findings.series.volume.affine @ [s.diameter_slice, 0, 0, 1])[2])
        true = 2 * np.sqrt(lesion.radius_mm**2 - (z - lesion.center[2]) ** 2)
        assert abs(diameter - true) <= PIXEL
    # the liver group has no diameter
    assert groups[0].get_measurements(name=CODES["long_axis"]) == []


def test_sr_mr_intensity_has_no_unit(mr):
    case, paths = mr
    sr = hd.sr.srread(paths["sr"])
    group = sr.content.get_volumetric_roi_measurement_groups()[1]
    mean, unit = _num(group, CODES["mr_intensity"], CODES["mean"])
    assert unit == "1" and mean == pytest.approx(case.findings.lesions[0].mean)
    proc = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert proc[0].ConceptCodeSequence[0].CodeValue == "25056-3"  # CID 100: MRI unspecified body region


def test_sr_references_the_seg_segments(ct):
    case, paths = ct
    seg = pydicom.dcmread(paths["seg"])
    sr = hd.sr.srread(paths["sr"])
    groups = sr.content.get_volumetric_roi_measurement_groups()
    tracking = {int(i.SegmentNumber): i.TrackingUID for i in seg.SegmentSequence}
    for number, g in enumerate(groups, start=1):
        ref = g.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_sop_class_uid == seg.SOPClassUID
        assert ref.referenced_segment_numbers == [number]
        assert ref.source_series_for_segmentation.value == case.findings.series.series_uid
        assert g.tracking_uid == tracking[number]
        assert _texts(g, "Algorithm Name") == ["phantom-fm"] and _texts(g, "Algorithm Version") == ["1.0"]
    evidence = {
        i.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence
    assert {d.SOPInstanceUID for d in case.findings.series.datasets} <= evidence


def _texts(group, meaning: str) -> list[str]:
    """TEXT values of a group's direct children with this concept name meaning."""
    return [
        i.TextValue
        for i in group[0].ContentSequence
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


def test_sr_classification_notes_and_observer(ct):
    _, paths = ct
    sr = hd.sr.srread(paths["sr"])
    generic = sr.content.get_image_measurement_groups()
    cls = [g for g in generic if g.tracking_identifier == "Classification lesion-presence"][0]
    (ev,) = cls.get_qualitative_evaluations()
    assert (ev.name.value, ev.value.value) == ("52988006", "52101004")
    assert _num(cls, CODES["probability"]) == (pytest.approx(0.97), "1")
    # every group carries the notes as a TEXT Comment
    all_groups = generic + sr.content.get_volumetric_roi_measurement_groups()
    assert len(all_groups) == 3 + 2 + 1  # segments, long axis lines, classification
    for g in all_groups:
        assert _texts(g, "Comment") == [NOTE]
    ds = pydicom.dcmread(paths["sr"])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in ds.ContentSequence}
    assert items["Observer Type"].ConceptCodeSequence[0].CodeValue == "121007"  # Device
    assert uids.device_uid() == items["Device Observer UID"].UID
    assert items["Device Observer Name"].TextValue == "pacs-node"


def test_sr_long_axis_line_lies_on_the_lesion(ct):
    """The SCOORD of each long axis (for viewers that draw lines) joins the GSPS/measure end points."""
    case, paths = ct
    ds = pydicom.dcmread(paths["sr"])
    imaging = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"][0]
    lines = []
    for group in imaging.ContentSequence:
        for item in group.ContentSequence:
            scoords = [c for c in item.get("ContentSequence", []) if c.ValueType == "SCOORD"]
            if item.ValueType == "NUM" and scoords:
                (scoord,) = scoords
                assert scoord.GraphicType == "POLYLINE" and scoord.RelationshipType == "INFERRED FROM"
                lines.append(
                    (
                        float(item.MeasuredValueSequence[0].NumericValue),
                        np.reshape(scoord.GraphicData, (2, 2)),
                    )
                )
    assert len(lines) == 2
    for (length, pts), s in zip(lines, case.findings.lesions, strict=True):
        assert length == pytest.approx(s.longest_diameter_mm)
        assert np.linalg.norm((pts[0] - pts[1]) * PIXEL) == pytest.approx(length, rel=1e-5)
        expected = np.asarray(s.diameter_endpoints)[:, ::-1] + 0.5
        np.testing.assert_allclose(pts, expected, atol=1e-4)


def _groups(path: Path) -> list[Dataset]:
    ds = pydicom.dcmread(path)
    imaging = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"][0]
    return list(imaging.ContentSequence)


def test_outlines_sr_is_what_ohif_draws(ct):
    """Every group of the outlines SR is one OHIF draws and lists: its first NUM has exactly one
    child, an SCOORD selected from a source image; its Tracking Identifier is one OHIF maps to a
    tool; its first Comment (OHIF's label) is the segment's name. Lesions first, each outlined on
    every slice it crosses; the key outline carries the segment's own Tracking UID (SEG, report)."""
    from skimage.measure import points_in_poly

    case, paths = ct
    assert pydicom.dcmread(paths["outlines"]).ConceptNameCodeSequence[0].CodeValue == "126000"
    seg = pydicom.dcmread(paths["seg"])
    tracking = {i.SegmentLabel: i.TrackingUID for i in seg.SegmentSequence}
    sop_slice = {fr.dataset.SOPInstanceUID: i for i, fr in enumerate(case.findings.series.frames)}
    seen: dict[str, list[int]] = {}
    for group in _groups(paths["outlines"]):
        items = {i.ConceptNameCodeSequence[0].CodeValue: i for i in reversed(group.ContentSequence)}
        nums = [i for i in group.ContentSequence if i.ValueType == "NUM"]
        (scoord,) = nums[0].ContentSequence
        assert scoord.ValueType == "SCOORD" and scoord.RelationshipType == "INFERRED FROM"
        (image,) = scoord.ContentSequence
        assert image.ValueType == "IMAGE" and all("ContentSequence" not in n for n in nums[1:])
        label = items["121106"].TextValue  # the first Comment
        identifier = items["112039"].TextValue
        points = np.reshape(scoord.GraphicData, (-1, 2))
        index = sop_slice[image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
        if identifier == OHIF_LENGTH:
            assert label.endswith(" long axis") and len(points) == 2
            continue
        assert identifier == OHIF_OUTLINE and np.array_equal(points[0], points[-1])
        segment = next(s for s in case.findings.segments if s.label == label)
        if label not in seen:  # the key outline: the segment's Tracking UID, and its volume
            assert tracking[label] == items["112040"].UID
            assert any(n.ConceptNameCodeSequence[0].CodeValue == CODES["volume"].value for n in nums)
        rows, cols = np.nonzero(segment.mask.plane(index))
        inside = points_in_poly(np.c_[cols + 0.5, rows + 0.5], points)  # flipped/transposed: not here
        assert inside.mean() > 0.9, (label, index)
        seen.setdefault(label, []).append(index)
    assert list(seen) == ["Lesion 1", "Lesion 2", "Liver"]
    for lesion in case.findings.lesions:
        assert sorted(seen[lesion.label]) == lesion.slices
    assert seen["Liver"] == [int(case.findings.segments[0].mask.areas().argmax())]


def test_outlines_sr_refuses_findings_without_segments(ct):
    case, paths = ct
    empty = dataclasses.replace(case.findings, segments=[])
    with pytest.raises(ValueError, match="nothing to outline"):
        write_outlines(empty, pydicom.dcmread(paths["seg"]))


# -- GSPS -----------------------------------------------------------------------------------------


def assert_outlines_on_boundary(pr: Dataset, findings: Findings, masks: dict[str, np.ndarray]) -> None:
    """Every closed POLYLINE runs on the boundary of the lesion's mask, given in stored pixel order."""
    slice_of = {(fr.dataset.SOPInstanceUID, fr.frame): i for i, fr in enumerate(findings.series.frames)}
    outlined: set[tuple[str, int]] = set()
    for ann in pr.GraphicAnnotationSequence:
        assert ann.GraphicLayer == "AI_LESIONS"
        ref = ann.ReferencedImageSequence[0]
        frame = int(ref.ReferencedFrameNumber) if "ReferencedFrameNumber" in ref else None
        i = slice_of[(ref.ReferencedSOPInstanceUID, frame)]
        for obj in ann.GraphicObjectSequence:
            assert obj.GraphicAnnotationUnits == "PIXEL" and obj.GraphicType == "POLYLINE"
            pts = np.reshape(obj.GraphicData, (-1, 2))
            mask = masks[obj.TrackingID][i]
            if len(pts) == 2:  # the diameter line
                continue
            assert np.allclose(pts[0], pts[-1])  # closed
            outlined.add((obj.TrackingID, i))
            rc = pts[:, ::-1] - 0.5  # (col, row) image coordinates -> (row, col) pixel index
            for r, c in rc:
                # a marching-squares point sits half-way between an inside and an outside pixel
                if abs(r - round(r)) < 1e-6:
                    a, b = mask[round(r), int(np.floor(c))], mask[round(r), int(np.ceil(c))]
                else:
                    a, b = mask[int(np.floor(r)), round(c)], mask[int(np.ceil(r)), round(c)]
                assert a != b, (obj.TrackingID, i, r, c)
    assert outlined == {(s.label, i) for s in findings.lesions for i in s.slices}


def test_gsps_outlines_lie_on_the_lesion_boundary(ct):
    case, paths = ct
    masks = {s.label: np.asarray(s.mask) for s in case.findings.lesions}
    assert_outlines_on_boundary(pydicom.dcmread(paths["gsps"]), case.findings, masks)


def test_gsps_labels_references_and_window(ct, mr):
    case, paths = ct
    pr = pydicom.dcmread(paths["gsps"])
    f = case.findings
    referenced = {
        i.ReferencedSOPInstanceUID for s in pr.ReferencedSeriesSequence for i in s.ReferencedImageSequence
    }
    assert referenced == {d.SOPInstanceUID for d in f.series.datasets}
    texts = {}
    for ann in pr.GraphicAnnotationSequence:
        for t in ann.get("TextObjectSequence", []):
            texts[t.UnformattedTextValue] = ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    for s in f.lesions:
        text = f"{s.label}, {s.longest_diameter_mm:.0f} mm"
        assert texts[text] == f.series.frames[s.diameter_slice].dataset.SOPInstanceUID
    voi = pr.SoftcopyVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (40.0, 400.0)
    assert pr.SeriesDescription == "AI annotations (phantom-fm 1.0)"
    mr_voi = pydicom.dcmread(mr[1]["gsps"]).SoftcopyVOILUTSequence[0]
    assert 200 < float(mr_voi.WindowCenter) < 900 and float(mr_voi.WindowWidth) > 100


# -- determinism ----------------------------------------------------------------------------------


def _uids(paths: dict[str, Path]) -> list[str]:
    out = []
    for p in paths.values():
        ds = pydicom.dcmread(p)
        out += [ds.SOPInstanceUID, ds.SeriesInstanceUID]
        if "SegmentSequence" in ds:
            out += [i.TrackingUID for i in ds.SegmentSequence]
            out += [ds.DimensionOrganizationSequence[0].DimensionOrganizationUID]
    return out


def test_uids_are_deterministic_per_model_version(ct, tmp_path):
    case, paths = ct
    again = make_case(tmp_path / "again")
    newer = make_case(tmp_path / "newer", version="1.1")
    first, second, third = _uids(paths), _uids(write_all(again)), _uids(write_all(newer))
    assert first == second
    assert not set(first) & set(third)
    assert len(set(first)) == len(first)


def test_output_uid_validates_and_separates_kinds():
    a = uids.output_uid("1.2.3", "m", "1", "seg-instance")
    assert a == uids.output_uid("1.2.3", "m", "1", "seg-instance")
    assert a != uids.output_uid("1.2.3", "m", "1", "sr-instance")
    assert a != uids.output_uid("1.2.4", "m", "1", "seg-instance")
    assert len(a) <= 64
    with pytest.raises(ValueError, match="model_version"):
        uids.output_uid("1.2.3", "m", "", "seg-instance")


# -- input validation -----------------------------------------------------------------------------


def test_writers_reject_bad_segments(ct):
    case, _ = ct
    f = case.findings
    bad = dataclasses.replace(f, segments=[dataclasses.replace(s, number=s.number + 1) for s in f.segments])
    with pytest.raises(ValueError, match="Segment.number"):
        write_seg(bad)
    bad = dataclasses.replace(
        f, segments=[dataclasses.replace(f.segments[0], mask=np.asarray(f.segments[0].mask)[:-1])]
    )
    with pytest.raises(ValueError, match="Segment.mask"):
        write_seg(bad)
    with pytest.raises(ValueError, match="seg"):
        write_sr(f, pydicom.Dataset())


def test_gsps_window_explanation_is_one_value(ct, mr):
    for case, explanation in ((ct, "SOFT TISSUE"), (mr, "P1-P99")):
        voi = pydicom.dcmread(case[1]["gsps"]).SoftcopyVOILUTSequence[0]
        assert voi.WindowCenterWidthExplanation == explanation


def test_uid_recipe_is_pinned():
    """Released UIDs: a changed recipe would make every re-run duplicate its objects in a PACS."""
    from node.identity import OutputKind

    root = "1.2.826.0.1.3680043.8.498."
    assert uids.output_uid("1.2.3.4", "phantom-fm", "1.0", f"{OutputKind.SEG}-instance") == (
        root + "88997640099499565421213010343821682654"
    )
    assert (
        uids.tracking_uid("1.2.3.4", "phantom-fm", "1.0", 3)
        == root + "75275804463636406956283185101839899507"
    )
    assert uids.device_uid() == root + "11562223126079392950233619306303314404"
