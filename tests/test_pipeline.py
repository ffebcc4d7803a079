"""The offline pipeline end to end, with the committed reference model and real files.

Geometry: the same phantom stored in many ways must give the same
segmentation in patient coordinates, read back by an independent reader.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from node.ingest.series import find_series
from node.model.manifest import load_model
from node.model.select import select_runtime
from node.pipeline import Pipeline
from node.synthetic.dicom import Patient, write_variant
from node.synthetic.phantom import ORGANS, Phantom
from tests.seg_readback import read_segments

SHAPE = (24, 112, 112)
PIXEL, STEP = 3.4, 6.0
# pure storage changes: the very same voxels at the same patient positions
STORAGE_VARIANTS = [
    "shuffled", "feet_first", "bottom_up", "transposed", "rescale",
    "sagittal", "coronal", "multiframe", "jpeg_lossless", "rle",
]  # fmt: skip


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    model = load_model("phantom-fm")
    return Pipeline(model, select_runtime(model, "onnxruntime")[0])


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return Phantom.random(4242, n_lesions=3)


def _run(pipeline: Pipeline, phantom: Phantom, variant: str, root: Path, modality: str = "CT"):
    src = root / f"{modality}-{variant}"
    write_variant(
        phantom, src, variant, modality, seed=3, shape=SHAPE, pixel_spacing=PIXEL, slice_spacing=STEP
    )
    series, errors = find_series([src])
    assert not errors and len(series) == 1
    result = pipeline.process(series[0], root / f"out-{modality}-{variant}")
    assert result.ok, result.error
    return result


@pytest.fixture(scope="module")
def axial(pipeline, phantom, tmp_path_factory):
    return _run(pipeline, phantom, "axial", tmp_path_factory.mktemp("axial"))


def assert_valid(path: Path) -> None:
    """dciodvfy (dicom3tools) must report no Error line."""
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
    assert not errors, f"{path.name}: {errors}"


def _points(result) -> dict[str, set]:
    segs = read_segments(result.files[0])
    return {k: {tuple(p) for p in np.round(v.points, 2)} for k, v in segs.items()}


def test_axial_result_finds_organs_and_lesions(axial):
    labels = {s.label for s in axial.findings.segments}
    assert {"Liver", "Lung", "Bone", "Kidney"} <= labels
    assert axial.findings.lesions, "the phantom's lesions were missed"


def test_lesions_of_one_size_are_numbered_by_where_they_are_not_by_how_slices_are_stored():
    from node.analysis.postprocess import lesion_components

    mask = np.zeros((4, 8, 8), bool)
    mask[0, :2, :2] = mask[3, 5:7, 5:7] = True  # two lesions of 4 voxels each
    head_first = np.diag([1.0, 1.0, 1.0, 1.0])
    head_first[:3, 0] = (0, 0, -5)  # slice i at z = -5 i
    feet_first = head_first.copy()
    feet_first[:3, 0], feet_first[2, 3] = (0, 0, 5), -15  # the same slices stored the other way round

    def first(m, affine):
        comps, keep = lesion_components(m, 100.0, affine)
        return {tuple(affine[:3, :3] @ v + affine[:3, 3]) for v in np.argwhere(comps == keep[0])}

    assert first(mask, head_first) == first(mask[::-1], feet_first)


@pytest.mark.parametrize("variant", STORAGE_VARIANTS)
def test_same_segmentation_in_patient_coordinates(pipeline, phantom, axial, variant, tmp_path):
    result = _run(pipeline, phantom, variant, tmp_path)
    expected, got = _points(axial), _points(result)
    assert got.keys() == expected.keys()
    for label in expected:
        assert got[label] == expected[label], f"{variant}: segment {label} moved"
    for path in result.files:
        assert_valid(path)


def test_oblique_acquisition_lands_in_the_same_place(pipeline, phantom, axial, tmp_path):
    """The tilted slab covers another part of the body, so compare each with the phantom's truth, in mm."""
    result = _run(pipeline, phantom, "oblique", tmp_path)
    organ_index = {name.capitalize(): i for i, name in ORGANS.items()}

    def precision(res, organ):
        points = read_segments(res.files[0])[organ].points
        tissue, _ = phantom.labels(points)
        return float(np.mean(tissue == organ_index[organ]))

    for organ in ("Liver", "Lung", "Bone"):
        straight, tilted = precision(axial, organ), precision(result, organ)
        assert straight > 0.85, organ
        assert tilted > straight - 0.1, (
            f"{organ}: {tilted:.2f} of the oblique segment is {organ} ({straight:.2f} axial)"
        )
    assert any("oblique" in n for n in result.findings.notes)


def test_outputs_are_valid_and_filed_with_the_study(axial):
    source = pydicom.dcmread(next(iter(axial.findings.series.files)))
    for path in axial.files:
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID and ds.PatientName == source.PatientName
        if "FrameOfReferenceUID" in ds:
            assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert_valid(path)
    seg = hd.seg.segread(axial.files[0])
    assert seg.number_of_segments == len(axial.findings.segments)
    sr = hd.sr.srread(axial.files[1])
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(axial.findings.segments)


def test_probability_map_shows_where_the_lesions_are(axial):
    """The Parametric Map's frames are source slices; inside every lesion the mapped probability
    is at least 0.5 (the lesion label is the arg-max), and far from all lesions it is low."""
    pm = pydicom.dcmread(next(p for p in axial.files if p.stem == "pmap"))
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert float(mapping.RealWorldValueSlope) == 1.0 and "FloatPixelData" in pm  # the probability itself
    sources = {str(f.dataset.SOPInstanceUID): i for i, f in enumerate(axial.findings.series.frames) if f}
    frames = pm.pixel_array.reshape(-1, pm.Rows, pm.Columns) * float(mapping.RealWorldValueSlope)
    assert frames.min() >= 0.0 and frames.max() <= 1.0
    shown = {}
    for k, item in enumerate(pm.PerFrameFunctionalGroupsSequence):
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        shown[sources[uid]] = frames[k]
    lesions = np.any([np.asarray(s.mask) for s in axial.findings.lesions], axis=0)
    assert sorted(shown) == list(range(len(sources)))  # every source image: OHIF and dcmqi need the stack
    for i, p in shown.items():
        assert (p[lesions[i]] >= 0.5).all()
    far = [p[~ndimage.binary_dilation(lesions[i], iterations=8)] for i, p in shown.items()]
    assert np.median(np.concatenate(far)) < 0.05


def test_mr_series(pipeline, phantom, tmp_path):
    result = _run(pipeline, phantom, "axial", tmp_path, modality="MR")
    assert {"Liver", "Lung"} <= {s.label for s in result.findings.segments}
    for path in result.files:
        assert_valid(path)


def test_rerun_gives_the_same_uids_and_replaces(pipeline, phantom, axial, tmp_path):
    again = _run(pipeline, phantom, "axial", tmp_path)
    for a, b in zip(axial.files, again.files, strict=True):
        assert pydicom.dcmread(a).SOPInstanceUID == pydicom.dcmread(b).SOPInstanceUID
    series, _ = find_series([tmp_path / "CT-axial"])
    out = tmp_path / "out-CT-axial"
    pipeline.process(series[0], out)
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [
        "gsps.dcm",
        "outlines.dcm",
        "pmap.dcm",
        "seg.dcm",
        "sr.dcm",
    ]


# -- the command line -------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_demo_writes_a_ct_and_an_mr_result(tmp_path):
    """``pacs-node demo`` (``make demo``): phantoms through the same entry as ``run``, every object."""
    proc = _cli("demo", "--out", str(tmp_path), "--slices", "16", "--size", "96")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == 2
    makers = set()
    for folder in folders:
        assert {f.name for f in folder.glob("*.dcm")} >= {"seg.dcm", "sr.dcm", "gsps.dcm"}
        seg = pydicom.dcmread(folder / "seg.dcm")
        assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == folder.name
        makers.add(pydicom.dcmread(folder / "sr.dcm").Manufacturer)
    assert makers == {"pacs-node"}
    assert "CT" in proc.stdout and "MR" in proc.stdout


def _write(tmp: Path, name: str, **kw) -> Path:
    out = tmp / name
    seed = sum(map(ord, name))  # distinct series (and UIDs) per name
    write_variant(
        Phantom.random(7, n_lesions=1), out, "axial", seed=seed, shape=(12, 96, 96), pixel_spacing=4.0, **kw
    )
    return out


def _edit_all(folder: Path, fn) -> None:
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        fn(ds, f)
        ds.save_as(f)


def _not_dicom(tmp: Path) -> Path:
    p = tmp / "notes.dcm"
    p.write_text("this is not DICOM\n")
    return p


def _truncated(tmp: Path) -> Path:
    src = _write(tmp, "trunc")
    f = sorted(src.glob("*.dcm"))[3]
    f.write_bytes(f.read_bytes()[:2000])
    return src


def _cr(tmp: Path) -> Path:
    src = _write(tmp, "cr")
    _edit_all(src, lambda ds, f: setattr(ds, "Modality", "CR"))
    return src


def _two_frames_of_reference(tmp: Path) -> Path:
    src = _write(tmp, "for")

    def edit(ds, f):
        if ds.InstanceNumber % 2:
            ds.FrameOfReferenceUID = pydicom.uid.generate_uid(entropy_srcs=["other"])

    _edit_all(src, edit)
    return src


def _zero_spacing(tmp: Path) -> Path:
    src = _write(tmp, "zero")
    _edit_all(src, lambda ds, f: setattr(ds, "PixelSpacing", [0, 0]))
    return src


def _no_pixels(tmp: Path) -> Path:
    src = _write(tmp, "nopix")
    _edit_all(src, lambda ds, f: delattr(ds, "PixelData"))
    return src


BAD = {
    "not DICOM": (_not_dicom, "not a DICOM file"),
    "truncated": (_truncated, "truncated"),
    "modality": (_cr, "modality CR is not accepted"),
    "frames of reference": (_two_frames_of_reference, "frame"),
    "zero spacing": (_zero_spacing, "spacing"),
    "no pixel data": (_no_pixels, "pixel data"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exit_2_one_line_nothing_written(case, tmp_path):
    make, expected = BAD[case]
    src = make(tmp_path)
    out = tmp_path / "results"
    proc = _cli("run", str(src), "--out", str(out), "--no-progress")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected.lower() in lines[0].lower()
    assert "Traceback" not in proc.stderr and "PHANTOM" not in lines[0]
    assert not out.exists() or not any(out.rglob("*"))


def test_partial_failure_keeps_the_good_series(tmp_path):
    good = _write(tmp_path / "in", "good")
    bad = _cr(tmp_path / "in")
    out = tmp_path / "results"
    proc = _cli("run", str(good.parent), "--out", str(out), "--no-progress")
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("error:") == 1 and "CR" in proc.stderr
    written = sorted(p.name for p in out.rglob("*.dcm"))
    assert written == ["gsps.dcm", "outlines.dcm", "pmap.dcm", "seg.dcm", "sr.dcm"]
    assert not list(out.glob(".partial-*"))
    assert bad.exists()


def test_help_documents_exit_codes():
    proc = _cli("run", "--help")
    assert proc.returncode == 0 and "partial failure" in proc.stdout


def test_missing_slices_are_processed_and_said(pipeline, tmp_path):
    src = _write(tmp_path, "gap", patient=Patient(id="GAP1"))
    files = sorted(src.glob("*.dcm"))
    files[5].unlink()
    series, _ = find_series([src])
    result = pipeline.process(series[0], tmp_path / "out")
    assert result.ok, result.error
    assert any("missing slice" in n for n in result.findings.notes)
    seg = pydicom.dcmread(result.files[0])
    referenced = {
        fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for fg in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced <= {pydicom.dcmread(f).SOPInstanceUID for f in files if f.exists()}
    texts = [str(e.value) for e in pydicom.dcmread(result.files[1]).iterall() if e.keyword == "TextValue"]
    assert any("missing slice" in t for t in texts)


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="DCMTK not installed")
def test_dsrdump_reads_the_sr(axial):
    proc = subprocess.run(["dsrdump", str(axial.files[1])], capture_output=True, text=True)
    assert proc.returncode == 0 and "Oncology Measurement Report" in proc.stdout  # the complete report


def test_single_slice_is_processed_and_said(pipeline, tmp_path):
    src = _write(tmp_path, "single")
    for f in sorted(src.glob("*.dcm"))[1:]:
        f.unlink()
    series, _ = find_series([src])
    result = pipeline.process(series[0], tmp_path / "out")
    assert result.ok, result.error
    assert any("single-slice" in n for n in result.findings.notes)
    for path in result.files:
        assert_valid(path)
