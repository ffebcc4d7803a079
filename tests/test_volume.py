"""Input discovery and series -> volume assembly, proved against the analytic phantom.

Every storage variant must put the same value at the same patient position as the
ground truth; every kind of bad input must give one clear InputError naming the
series and the file.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.errors import InputError
from node.ingest.series import SourceSeries, find_series, scan
from node.ingest.volume import SeriesVolume, load_volume
from node.synthetic.dicom import VARIANTS, WrittenSeries, write_variant
from node.synthetic.phantom import Phantom

MR_VARIANTS = ("axial", "bottom_up", "rescale", "sagittal", "oblique", "multiframe", "jpegls")
CASES = [("CT", v) for v in VARIANTS] + [("MR", v) for v in MR_VARIANTS]
EXACT_SAME_AS_AXIAL = ("shuffled", "feet_first", "multiframe", "jpeg_lossless", "jpegls", "j2k", "rle")


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return Phantom.random(3, n_lesions=2)


@pytest.fixture(scope="module")
def written(phantom, tmp_path_factory):
    """Write each (modality, variant) once per module; returns a getter."""
    cache: dict[tuple[str, str], WrittenSeries] = {}
    root = tmp_path_factory.mktemp("variants")

    def get(modality: str, variant: str) -> WrittenSeries:
        if (modality, variant) not in cache:
            cache[modality, variant] = write_variant(
                phantom, root / modality / variant, variant, modality=modality
            )
        return cache[modality, variant]

    return get


def load_dir(path: Path, **kw) -> SeriesVolume:
    series, errors = find_series([path])
    assert errors == []
    assert len(series) == 1
    return load_volume(series[0], **kw)


def lookup_truth(vol: SeriesVolume, ws: WrittenSeries) -> np.ndarray:
    """Ground truth at the patient position of every voxel of ``vol`` (which must lie on the truth grid)."""
    idx = np.indices(vol.volume.spatial_shape).reshape(3, -1)
    pts = vol.volume.affine @ np.vstack([idx, np.ones(idx.shape[1])])
    ti = (np.linalg.inv(ws.affine) @ pts)[:3]
    r = np.round(ti).astype(int)
    assert np.abs(ti - r).max() < 1e-3, "volume voxels do not lie on the ground-truth grid"
    for axis in range(3):
        assert r[axis].min() >= 0 and r[axis].max() < ws.truth.image.shape[axis]
    return ws.truth.image[r[0], r[1], r[2]].reshape(vol.volume.spatial_shape)


def copy_series(ws: WrittenSeries, dst: Path) -> list[Path]:
    dst.mkdir(parents=True)
    out = []
    for f in ws.files:
        shutil.copy(f, dst / f.name)
        out.append(dst / f.name)
    return out


def edit(path: Path, fn) -> None:
    ds = pydicom.dcmread(path)
    fn(ds)
    ds.save_as(path)


# -- every storage variant gives the ground truth ---------------------------------------------------


@pytest.mark.parametrize(("modality", "variant"), CASES)
def test_variant_voxels_equal_truth_at_same_patient_positions(written, modality, variant):
    ws = written(modality, variant)
    vol = load_dir(ws.files[0].parent)
    assert vol.series_uid == ws.series_uid
    assert vol.modality == modality
    assert vol.volume.array.dtype == np.float32
    assert vol.volume.coordinate_system.value == "PATIENT"
    assert vol.volume.frame_of_reference_uid == ws.frame_of_reference_uid
    assert vol.volume.array.size == ws.truth.image.size
    np.testing.assert_array_equal(vol.volume.array, lookup_truth(vol, ws))
    assert vol.notes == []
    assert all(f is not None for f in vol.frames)


@pytest.mark.parametrize("variant", EXACT_SAME_AS_AXIAL)
def test_pure_storage_variants_give_the_axial_volume(written, variant):
    ref = load_dir(written("CT", "axial").files[0].parent)
    vol = load_dir(written("CT", variant).files[0].parent)
    np.testing.assert_allclose(vol.volume.affine, ref.volume.affine, atol=1e-6)
    np.testing.assert_array_equal(vol.volume.array, ref.volume.array)


def test_axial_volume_is_head_to_feet_with_hu(written):
    ws = written("CT", "axial")
    vol = load_dir(ws.files[0].parent)
    np.testing.assert_allclose(vol.volume.affine, ws.affine, atol=1e-6)
    assert vol.volume.affine[2, 0] < 0  # slice index runs towards the feet
    assert vol.volume.array.min() >= -1024 and vol.volume.array.max() < 3072
    assert np.median(vol.volume.array[:, 0, 0]) == pytest.approx(-1000, abs=50)  # air in the corner


def test_oblique_matches_analytic_phantom_labels(phantom, tmp_path):
    ws = write_variant(phantom, tmp_path / "obl", "oblique", noise=0.0)
    vol = load_dir(tmp_path / "obl")
    idx = np.indices(vol.volume.spatial_shape).reshape(3, -1)

    def expected(affine: np.ndarray) -> np.ndarray:
        pts = (affine @ np.vstack([idx, np.ones(idx.shape[1])]))[:3].T
        hu = phantom.values(*phantom.labels(pts), "CT")
        return np.clip(np.round(hu + 1024), 0, 4095) - 1024

    got = vol.volume.array.reshape(-1)
    assert np.mean(got != expected(vol.volume.affine)) < 1e-3  # only boundary voxels may flip on DS rounding
    # the same check with the unrotated axial affine must fail: the test can tell geometries apart
    wrong = write_variant(phantom, tmp_path / "ax", "axial", noise=0.0).affine
    assert np.mean(got != expected(wrong)) > 0.05
    # and the oblique orientation is really oblique about two axes
    iop = np.array(pydicom.dcmread(ws.files[0], stop_before_pixels=True).ImageOrientationPatient, float)
    assert np.count_nonzero(np.abs(iop) > 0.1) >= 4


def test_frames_reference_the_right_sources(written):
    ws = written("CT", "shuffled")
    vol = load_dir(ws.files[0].parent)
    assert len(vol.frames) == len(vol.datasets) == vol.volume.spatial_shape[0]
    for i, f in enumerate(vol.frames):
        assert f is not None and f.frame is None
        assert f.dataset is vol.datasets[i]
        pos = vol.volume.affine @ np.array([i, 0, 0, 1.0])
        np.testing.assert_allclose(np.array(f.dataset.ImagePositionPatient, float), pos[:3], atol=1e-4)
        assert "PixelData" not in f.dataset  # headers only: no pixel data kept in memory
    assert sorted(vol.files) == sorted(ws.files)


def test_multiframe_frames_are_numbered(written):
    vol = load_dir(written("MR", "multiframe").files[0].parent)
    assert len(vol.datasets) == 1
    assert sorted(f.frame for f in vol.frames) == list(range(1, 21))
    pfg = vol.datasets[0].PerFrameFunctionalGroupsSequence
    for i, f in enumerate(vol.frames):
        pos = vol.volume.affine @ np.array([i, 0, 0, 1.0])
        ipp = pfg[f.frame - 1].PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose(np.array(ipp, float), pos[:3], atol=1e-4)


@pytest.mark.parametrize(("modality", "variant"), CASES)
def test_variant_files_pass_dciodvfy(written, modality, variant):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    ws = written(modality, variant)
    for f in {ws.files[0], ws.files[-1]}:
        res = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, check=False)
        errors = [line for line in (res.stderr + res.stdout).splitlines() if line.startswith("Error")]
        assert errors == [], f"{variant}: {errors}"


def test_compressed_series_decoded_in_worker_processes(written, monkeypatch):
    """The process-pool path for compressed data gives the same volume as the in-process path."""
    from concurrent.futures import ProcessPoolExecutor

    pools = []

    class RecordingPool(ProcessPoolExecutor):
        def __init__(self, processes, **kw):
            pools.append(processes)
            super().__init__(processes, **kw)

    ws = written("CT", "rle")
    series, _ = find_series([ws.files[0].parent])
    ref = load_volume(series[0], workers=1)
    monkeypatch.setattr("node.ingest.volume._MIN_PROCESSES", 2)
    monkeypatch.setattr("node.ingest.volume.os.cpu_count", lambda: 2)
    monkeypatch.setattr("node.ingest.volume.ProcessPoolExecutor", RecordingPool)
    vol = load_volume(series[0], workers=2)
    assert pools == [2], "the compressed frames were not decoded in worker processes"
    np.testing.assert_array_equal(vol.volume.array, ref.volume.array)
    np.testing.assert_array_equal(vol.volume.array, lookup_truth(vol, ws))


def test_in_memory_datasets_without_files(written):
    """A series fetched over the network (datasets with pixels, no files) loads the same way."""
    ws = written("CT", "transposed")
    datasets = [pydicom.dcmread(f) for f in reversed(ws.files)]
    vol = load_volume(SourceSeries(ws.series_uid, "CT", [], datasets))
    np.testing.assert_array_equal(vol.volume.array, lookup_truth(vol, ws))
    assert vol.files == []


# -- unusual but usable --------------------------------------------------------------------------


def test_missing_slices_are_interpolated_and_noted(written, tmp_path):
    ws = written("CT", "axial")
    files = copy_series(ws, tmp_path / "gap")
    files[7].unlink()
    files[12].unlink()
    vol = load_dir(tmp_path / "gap")
    assert vol.volume.spatial_shape == (20, 96, 96)
    assert [i for i, f in enumerate(vol.frames) if f is None] == [7, 12]
    assert len(vol.datasets) == 18
    np.testing.assert_allclose(vol.volume.affine, ws.affine, atol=1e-6)
    truth = ws.truth.image
    for k in (7, 12):
        np.testing.assert_allclose(vol.volume.array[k], (truth[k - 1] + truth[k + 1]) / 2, atol=1e-3)
    keep = [i for i in range(20) if i not in (7, 12)]
    np.testing.assert_array_equal(vol.volume.array[keep], truth[keep])
    z = [ws.affine[2, 3] + ws.affine[2, 0] * k for k in (7, 12)]
    assert vol.notes == [f"2 missing slices interpolated (slice locations {z[0]:.1f}, {z[1]:.1f} mm)"]


def test_two_adjacent_missing_slices(written, tmp_path):
    files = copy_series(written("CT", "axial"), tmp_path / "gap")
    files[9].unlink()
    files[10].unlink()
    vol = load_dir(tmp_path / "gap")
    assert [i for i, f in enumerate(vol.frames) if f is None] == [9, 10]
    a, b = vol.volume.array[8], vol.volume.array[11]
    np.testing.assert_allclose(vol.volume.array[9], a + (b - a) / 3, atol=1e-3)


def test_single_slice(written, tmp_path):
    ws = written("CT", "axial")
    vol = load_dir(ws.files[5])
    assert vol.volume.spatial_shape == (1, 96, 96)
    assert vol.volume.spacing_between_slices == pytest.approx(5.0)
    np.testing.assert_array_equal(vol.volume.array[0], ws.truth.image[5])
    assert len(vol.notes) == 1 and "single-slice" in vol.notes[0]


# -- bad input -----------------------------------------------------------------------------------


def _other_uid(ds: Dataset) -> None:
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


BAD_EDITS = {
    "mixed image orientations": lambda ds: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]),
    "frames of reference": lambda ds: setattr(ds, "FrameOfReferenceUID", generate_uid()),
    "no pixel data": lambda ds: delattr(ds, "PixelData"),
    "no ImagePositionPatient": lambda ds: delattr(ds, "ImagePositionPatient"),
    "no ImageOrientationPatient": lambda ds: delattr(ds, "ImageOrientationPatient"),
    "no PixelSpacing": lambda ds: delattr(ds, "PixelSpacing"),
    "invalid PixelSpacing 0": lambda ds: setattr(ds, "PixelSpacing", [0, 3.5]),
    "invalid PixelSpacing -3.5": lambda ds: setattr(ds, "PixelSpacing", [-3.5, -3.5]),
    "mixed PixelSpacing": lambda ds: setattr(ds, "PixelSpacing", [3.0, 3.0]),
    "slices of different size": lambda ds: (
        setattr(ds, "Rows", 48),
        setattr(ds, "Columns", 48),
        setattr(ds, "PixelData", bytes(48 * 48 * 2)),
    ),
    "irregular slice spacing": lambda ds: setattr(
        ds, "ImagePositionPatient", [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 2.5]
    ),
    "not stacked along the slice normal": lambda ds: setattr(
        ds, "ImagePositionPatient", [float(ds.ImagePositionPatient[0]) + 3, *ds.ImagePositionPatient[1:]]
    ),
}


@pytest.mark.parametrize("expected", list(BAD_EDITS))
def test_bad_input_names_series_and_file(written, tmp_path, expected):
    ws = written("CT", "axial")
    files = copy_series(ws, tmp_path / "bad")
    edit(files[6], BAD_EDITS[expected])
    with pytest.raises(InputError) as info:
        load_dir(tmp_path / "bad")
    msg = str(info.value)
    assert f"series {ws.series_uid}:" in msg
    assert expected in msg
    assert str(files[6]) in msg
    assert "\n" not in msg
    assert "PHANTOM" not in msg and "PH0001" not in msg  # no patient name/ID


def test_duplicate_positions(written, tmp_path):
    ws = written("CT", "axial")
    files = copy_series(ws, tmp_path / "dup")
    shutil.copy(files[4], tmp_path / "dup" / "copy.dcm")
    edit(tmp_path / "dup" / "copy.dcm", _other_uid)
    with pytest.raises(InputError, match=f"series {ws.series_uid}: duplicate slice positions") as info:
        load_dir(tmp_path / "dup")
    assert "copy.dcm" in str(info.value)


def test_too_many_missing_slices(written, tmp_path):
    ws = written("CT", "axial")
    files = copy_series(ws, tmp_path / "gap")
    for f in files[5:10]:
        f.unlink()
    with pytest.raises(InputError, match=rf"series {ws.series_uid}: 5 of 20 slices missing"):
        load_dir(tmp_path / "gap")


def test_modality_not_accepted(written):
    ws = written("CT", "axial")
    series, _ = find_series(ws.files)
    cr = SourceSeries("1.2.3", "CR", series[0].files, series[0].datasets)
    with pytest.raises(InputError) as info:
        load_volume(cr, ("CT", "MR"), model_name="phantom-fm")
    assert str(info.value) == "series 1.2.3: modality CR is not accepted by model phantom-fm (accepts CT, MR)"
    with pytest.raises(InputError, match="modality MR is not accepted"):
        load_volume(SourceSeries("1.2.4", "MR", [], []), ("CT",))


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_corrupt_compressed_pixel_data(written, tmp_path):
    ws = written("CT", "j2k")
    files = copy_series(ws, tmp_path / "j2k")
    data = files[3].read_bytes()
    files[3].write_bytes(data[: len(data) - 2000])
    with pytest.raises(InputError) as info:
        load_dir(tmp_path / "j2k")
    assert f"series {ws.series_uid}: {files[3]}: truncated or unreadable DICOM" in str(info.value)


# -- finding input ---------------------------------------------------------------------------------


def _non_image(path: Path, modality: str, sop_class: str) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.save_as(path, enforce_file_format=True)


def test_find_series_groups_and_skips(written, tmp_path):
    ct, mr = written("CT", "axial"), written("MR", "shuffled")
    root = tmp_path / "in"
    copy_series(ct, root / "a")
    copy_series(mr, root / "b" / "c")
    (root / "README").write_text("hello")
    (root / "notes.txt").write_text("x")
    _non_image(root / "seg.dcm", "SEG", "1.2.840.10008.5.1.4.1.1.66.4")
    _non_image(root / "sr.dcm", "SR", "1.2.840.10008.5.1.4.1.1.88.22")
    _non_image(root / "pr.dcm", "PR", "1.2.840.10008.5.1.4.1.1.11.1")
    _non_image(root / "ko.dcm", "KO", "1.2.840.10008.5.1.4.1.1.88.59")
    result = scan([root, root / "a"])  # the same files twice must not double the series
    assert result.errors == []
    assert {s.series_uid: len(s.files) for s in result.series} == {ct.series_uid: 20, mr.series_uid: 20}
    assert {s.modality for s in result.series} == {"CT", "MR"}
    assert all("PixelData" not in ds for s in result.series for ds in s.datasets)
    reasons = {p.name: r for p, r in ((s.path, s.reason) for s in result.skipped)}
    assert reasons["README"] == reasons["notes.txt"] == "not a DICOM file"
    for name, modality in (("seg.dcm", "SEG"), ("sr.dcm", "SR"), ("pr.dcm", "PR"), ("ko.dcm", "KO")):
        assert reasons[name] == f"{modality} object, not an image"


def test_named_bad_files_are_errors_not_fatal(written, tmp_path):
    ws = written("CT", "axial")
    text = tmp_path / "report.txt"
    text.write_text("not dicom")
    cut_header = tmp_path / "cut_header.dcm"
    cut_header.write_bytes(ws.files[0].read_bytes()[:400])
    cut_pixels = tmp_path / "cut_pixels.dcm"
    cut_pixels.write_bytes(ws.files[1].read_bytes()[:-1000])
    series, errors = find_series([text, cut_header, cut_pixels, tmp_path / "nope", *ws.files[2:]])
    msgs = [str(e) for e in errors]
    assert msgs[0] == f"{text}: not a DICOM file"
    assert msgs[1].startswith(f"{cut_header}: truncated or unreadable DICOM (")
    assert msgs[2] == f"{tmp_path / 'nope'}: no such file or folder"
    # a readable header with cut pixel data fails its whole series, named, rather than leave a hole
    assert (
        msgs[3]
        == f"series {ws.series_uid}: {cut_pixels}: truncated DICOM (pixel data has 17432 of 18432 bytes)"
    )
    assert len(errors) == 4
    assert series == []
    other, errs = find_series([text, cut_header, *ws.files[2:]])  # unreadable headers belong to no series
    assert len(errs) == 2 and len(other) == 1 and len(other[0].files) == 18


# -- speed ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_512x512x300_ct_loads_in_a_few_seconds(written, tmp_path):
    template = pydicom.dcmread(written("CT", "axial").files[0])
    template.Rows = template.Columns = 512
    rng = np.random.default_rng(0)
    for i in range(300):
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.ImagePositionPatient = [-250, -250, -i * 1.0]
        template.PixelData = rng.integers(0, 4096, (512, 512), dtype=np.uint16).tobytes()
        template.save_as(tmp_path / f"{i:03d}.dcm")
    t0 = time.perf_counter()
    vol = load_dir(tmp_path)
    elapsed = time.perf_counter() - t0
    assert vol.volume.spatial_shape == (300, 512, 512)
    assert elapsed < 10.0, f"{elapsed:.1f} s"
