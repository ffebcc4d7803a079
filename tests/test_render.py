"""node.tools.render: the node's GSPS drawn over its source slice as a viewer would, from a real pipeline run.

`pacs-node run` on a small CT phantom gives a real gsps.dcm; renders are checked against the
standard's rules: PIXEL coordinates put pixel centres at +0.5, the GSPS window wins, outlines in
the layer colour, and errors a user can fix name the file.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import Dataset

from node.cli import main
from node.errors import InputError
from node.synthetic.dicom import write_variant
from node.synthetic.phantom import Phantom
from node.tools.render import annotated_images, render, render_to_png

pytestmark = pytest.mark.slow  # runs the reference model (a few seconds per series)

SCALE = 2


@dataclasses.dataclass
class Run:
    src: Path
    gsps_path: Path
    gsps: Dataset
    label_uid: str  # the slice whose annotation carries the text label
    label_frame: int | None
    files: dict[str, Path]  # SOP Instance UID -> source file


def _run(root: Path, variant: str) -> Run:
    """The phantom of tests/test_pipeline.py (its liver lesion is found), stored as ``variant``."""
    src, out = root / f"src-{variant}", root / f"out-{variant}"
    write_variant(
        Phantom.random(4242, n_lesions=3),
        src,
        variant,
        "CT",
        seed=3,
        shape=(24, 112, 112),
        pixel_spacing=3.4,
        slice_spacing=6.0,
    )
    assert main(["run", str(src), "--out", str(out), "--no-progress"]) == 0
    (gsps_path,) = out.glob("*/gsps.dcm")
    gsps = pydicom.dcmread(gsps_path)
    labelled = [a for a in gsps.GraphicAnnotationSequence if a.get("TextObjectSequence")]
    assert labelled, "the pipeline found no lesion to label"
    ref = labelled[0].ReferencedImageSequence[0]
    frame = int(ref.ReferencedFrameNumber) if "ReferencedFrameNumber" in ref else None
    files = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in src.glob("*.dcm")}
    return Run(src, gsps_path, gsps, str(ref.ReferencedSOPInstanceUID), frame, files)


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Run:
    return _run(tmp_path_factory.mktemp("render"), "axial")


def _label_image(run: Run) -> Dataset:
    return pydicom.dcmread(run.files[run.label_uid])


def _plain(gsps: Dataset) -> Dataset:
    """The same presentation state without its annotations: the greyscale a viewer shows underneath."""
    out = copy.deepcopy(gsps)
    del out.GraphicAnnotationSequence
    return out


def _rgb(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB")).astype(int)


def _outline_vertices(gsps: Dataset, uid: str) -> np.ndarray:
    """(column, row) PIXEL coordinates of the closed outlines drawn on image ``uid``."""
    points = [
        np.asarray(obj.GraphicData, float).reshape(-1, 2)
        for ann in gsps.GraphicAnnotationSequence
        if str(ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID) == uid
        for obj in ann.get("GraphicObjectSequence", [])
        if obj.GraphicType == "POLYLINE" and int(obj.NumberOfGraphicPoints) > 2
    ]
    return np.concatenate(points)


def _window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window to 8 bits, each pixel a SCALE x SCALE block."""
    y = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    y = np.round(y * 255).astype(int)
    return np.repeat(np.repeat(y, SCALE, axis=0), SCALE, axis=1)


def _hu(image: Dataset) -> np.ndarray:
    return image.pixel_array * float(image.RescaleSlope) + float(image.RescaleIntercept)


def test_png_is_the_labelled_slice_at_scale(ct: Run, tmp_path: Path):
    # outlined-only slices first, so that picking the first annotated image would pick the wrong one
    gsps = copy.deepcopy(ct.gsps)
    gsps.GraphicAnnotationSequence = sorted(
        gsps.GraphicAnnotationSequence, key=lambda a: bool(a.get("TextObjectSequence"))
    )
    assert annotated_images(gsps)[0][0] != ct.label_uid
    gsps_path = tmp_path / "gsps.dcm"
    gsps.save_as(gsps_path, enforce_file_format=True)
    png = render_to_png(gsps_path, ct.src, tmp_path / "shot" / "gsps.png")
    image = _label_image(ct)
    with Image.open(png) as im:
        assert im.format == "PNG"
        assert im.size == (int(image.Columns) * SCALE, int(image.Rows) * SCALE)
        shown = _rgb(im)
    # the slice a reader looks at: the one with the label, not just the first with an outline
    np.testing.assert_array_equal(shown, _rgb(render(ct.gsps, image, scale=SCALE)))


def test_outline_is_drawn_in_the_layer_colour_on_grey(ct: Run):
    image = _label_image(ct)
    drawn = _rgb(render(ct.gsps, image, scale=SCALE))
    plain = _rgb(render(_plain(ct.gsps), image, scale=SCALE))
    # a point (x, y) in PIXEL units lies in source pixel (floor(y), floor(x)), i.e. canvas pixel floor(S*p)
    xy = np.floor(_outline_vertices(ct.gsps, ct.label_uid) * SCALE).astype(int)
    at = drawn[xy[:, 1], xy[:, 0]]
    yellow = (at[:, 0] > 200) & (at[:, 1] > 200) & (at[:, 2] < 80)
    assert yellow.mean() > 0.9, at[~yellow]  # the label's dark rim may cover a vertex or two
    under = plain[xy[:, 1], xy[:, 0]]
    assert (under[:, 0] == under[:, 1]).all() and (under[:, 1] == under[:, 2]).all()
    assert (plain[..., 0] == plain[..., 2]).all(), "nothing coloured without annotations"


def test_a_point_lands_on_the_centre_of_its_pixel(ct: Run):
    """PIXEL units: the top left corner of the image is 0.0\\0.0, so pixel (row r, column c) is centred
    at (c + 0.5, r + 0.5); at scale 3 that centre is canvas pixel (3r + 1, 3c + 1)."""
    row, col, scale = 40, 70, 3
    gsps = copy.deepcopy(ct.gsps)
    ann = next(a for a in gsps.GraphicAnnotationSequence if a.get("TextObjectSequence"))
    point = Dataset()
    point.GraphicAnnotationUnits = "PIXEL"
    point.GraphicDimensions = 2
    point.NumberOfGraphicPoints = 1
    point.GraphicData = [col + 0.5, row + 0.5]
    point.GraphicType = "POINT"
    ann.GraphicObjectSequence = [point]
    del ann.TextObjectSequence
    gsps.GraphicAnnotationSequence = [ann]
    image = _label_image(ct)
    marked = np.any(
        _rgb(render(gsps, image, scale=scale)) != _rgb(render(_plain(ct.gsps), image, scale=scale)), axis=-1
    )
    rows, cols = np.nonzero(marked)
    assert len(rows) > 1
    assert (rows.mean(), cols.mean()) == (scale * row + 1, scale * col + 1)


def test_the_presentation_states_window_is_applied(ct: Run):
    image = _label_image(ct)
    plain = _rgb(render(_plain(ct.gsps), image, scale=SCALE))[..., 0]
    voi = ct.gsps.SoftcopyVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (40.0, 400.0)  # CT soft tissue
    assert plain[0, 0] == 0 and plain[-1, -1] == 0, "air far outside the body is black"
    assert np.abs(plain - _window(_hu(image), 40.0, 400.0)).max() <= 1
    # the GSPS's window, not the image's own (also 40/400 here): a lung window shows air grey
    lung = _plain(ct.gsps)
    lung.SoftcopyVOILUTSequence[0].WindowCenter, lung.SoftcopyVOILUTSequence[0].WindowWidth = -600, 1600
    shown = _rgb(render(lung, image, scale=SCALE))[..., 0]
    assert shown[0, 0] > 40
    assert np.abs(shown - _window(_hu(image), -600.0, 1600.0)).max() <= 1


def test_errors_a_user_can_fix_name_the_file(ct: Run, tmp_path: Path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for uid, path in ct.files.items():
        if uid != ct.label_uid:
            shutil.copy(path, partial / path.name)
    (partial / "notes.txt").write_text("not DICOM")  # other files in a source folder are skipped
    with pytest.raises(InputError, match=ct.label_uid) as err:
        render_to_png(ct.gsps_path, partial, tmp_path / "out.png")
    assert str(ct.gsps_path) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out.png").exists()

    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a DICOM file at all")
    with pytest.raises(InputError, match="not a DICOM file") as err:
        render_to_png(junk, ct.src, tmp_path / "out.png")
    assert str(junk) in str(err.value)

    empty = tmp_path / "empty-gsps.dcm"
    _plain(ct.gsps).save_as(empty, enforce_file_format=True)
    with pytest.raises(InputError, match="no graphic annotations") as err:
        render_to_png(empty, ct.src, tmp_path / "out.png")
    assert str(empty) in str(err.value)

    with pytest.raises(InputError, match="not referenced"):
        render_to_png(ct.gsps_path, ct.src, tmp_path / "out.png", sop_instance_uid="1.2.3.4")


def test_multiframe_source_shows_the_same_picture(ct: Run, tmp_path: Path):
    """One Legacy Converted Enhanced CT holding the same voxels: the frame comes from
    ReferencedFrameNumber, and the picture is pixel for pixel the single-frame one."""
    mf = _run(tmp_path, "multiframe")
    assert mf.label_frame is not None and all(f is not None for _, f in annotated_images(mf.gsps))
    one = render_to_png(ct.gsps_path, ct.src, tmp_path / "single.png")
    multi = render_to_png(mf.gsps_path, mf.src, tmp_path / "multi.png")
    with Image.open(one) as a, Image.open(multi) as b:
        np.testing.assert_array_equal(_rgb(a), _rgb(b))
    image = pydicom.dcmread(mf.files[mf.label_uid])
    wrong = _rgb(render(mf.gsps, image, frame=mf.label_frame + 1, scale=SCALE))
    assert not np.array_equal(wrong, _rgb(render(mf.gsps, image, frame=mf.label_frame, scale=SCALE)))


def test_render_command(ct: Run, tmp_path: Path, capsys):
    out = tmp_path / "key.png"
    assert main(["render", str(ct.gsps_path), "--images", str(ct.src), "--out", str(out)]) == 0
    assert Image.open(out).size == (
        SCALE * ct.gsps.DisplayedAreaSelectionSequence[0].DisplayedAreaBottomRightHandCorner[0],
        SCALE * ct.gsps.DisplayedAreaSelectionSequence[0].DisplayedAreaBottomRightHandCorner[1],
    )
    assert main(["render", str(ct.gsps_path), "--images", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
