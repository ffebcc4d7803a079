"""What the radiologist sees: OHIF 3.12 (the published ``@ohif/app`` build, ``make viewer``) in headless
Chromium on a study the node processed, sent by ``storescu``.

- the outlines SR: OHIF lists every measurement (lesions first, each by its name), draws them on
  the CT, opens on a lesion, and shows no error;
- the complete report: OHIF shows it as a structured document, without error;
- the Parametric Map: OHIF loads it (its partial stacks once made OHIF's adapter throw);
- then the SEG over the same CT: the README's picture (``make screenshot`` writes it to docs/).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from orthanc_fixture import Node, free_port, orthanc_missing, wait_for

from node.synthetic.dicom import write_axial_series
from node.synthetic.phantom import Phantom

ROOT = Path(__file__).resolve().parents[1]
OHIF = ROOT / ".cache/ohif/package/dist"
VIEWER = ROOT / "deploy/viewer"


def _missing() -> str | None:
    if orthanc_missing():
        return orthanc_missing()
    if not (OHIF / "index.html").is_file():
        return f"OHIF's build is not in {OHIF} (make viewer fetches it)"
    if not shutil.which("chromium"):
        return "Debian chromium is not installed"
    if importlib.util.find_spec("playwright") is None:
        return "playwright (PyPI) is not installed"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(_missing()), reason=_missing() or "ok")]


@functools.cache
def _ohif_steps():
    """deploy/viewer/ohif.py (a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location("viewer_ohif", VIEWER / "ohif.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@dataclass
class Study:
    viewer: str  # OHIF's URL
    orthanc: str  # the node's Orthanc REST API
    study_uid: str
    files: dict[str, Path]  # the node's SR outputs as stored: "sr", "outlines"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A CT phantom through the running node, its outputs in the node's Orthanc, OHIF in front."""
    root = tmp_path_factory.mktemp("viewer")
    ws = write_axial_series(
        Phantom.random(4242, n_lesions=3),
        root / "ct",
        modality="CT",
        shape=(24, 112, 112),
        pixel_spacing=3.4,
        slice_spacing=6.0,
        seed=3,
    )
    http = free_port()
    node = Node(
        root / "node",
        {
            "ae_title": "PACSNODE",
            "dicom_port": free_port(),
            "http_port": http,
            "metrics_port": free_port(),
            "data_dir": str(root / "node" / "data"),
            "stable_age_s": 1,
            "worker": {"poll_s": 0.2},
        },
    )
    port = free_port()
    viewer = None
    try:
        node.start()
        node.store_scu(list(ws.files))
        job = node.wait_job(ws.series_uid, ("done",), timeout=180)
        viewer = subprocess.Popen(
            [sys.executable, str(VIEWER / "serve.py"), "--ohif", str(OHIF), "--orthanc", f"http://127.0.0.1:{http}",
             "--port", str(port)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(lambda: _get(f"http://127.0.0.1:{port}/") is not None, 30, "the viewer to serve")
        outputs = {o["kind"]: o["orthanc_id"] for o in job["outputs"]}
        files = {}
        for kind in ("sr", "outlines"):
            files[kind] = root / f"{kind}.dcm"
            files[kind].write_bytes(_get(f"http://127.0.0.1:{http}/instances/{outputs[kind]}/file"))
        yield Study(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{http}", ws.study_uid, files)
    finally:
        if viewer:
            viewer.terminate()
        node.stop()


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.read()
    except OSError:
        return None


def _labels(outlines: Path) -> list[str]:
    """Each measurement group's first Comment: the name OHIF shows, in document order."""
    ds = pydicom.dcmread(outlines)
    imaging = next(i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    return [
        next(i.TextValue for i in g.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121106")
        for g in imaging.ContentSequence
    ]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = _ohif_steps().launch(p)
        yield b
        b.close()


def test_ohif_lists_and_draws_our_measurements_without_error(study, browser, tmp_path: Path) -> None:
    ohif = _ohif_steps()
    expected = _labels(study.files["outlines"])
    assert expected[0].startswith("Lesion"), expected  # the phantom's lesion was found: lesions first
    session = ohif.open_study(browser, study.viewer, study.study_uid)
    ohif.open_series(session, "AI measurements")
    rows = ohif.track_measurements(session)
    # one row per group, each named as in the SR (a row reads "1\nLesion 1\n..."); OHIF orders by tool
    names = [r.split("\n")[1] for r in rows]
    assert sorted(names) == sorted(expected) and names[0] == expected[0], rows
    assert ohif.drawn_annotations(session) > 0  # the viewport opened on a drawn measurement
    assert session.visible_failures() == []
    ohif.overlay_segmentation(session)
    ohif.jump_to_measurement(session, 0)  # back to the first lesion, now with the SEG over the CT
    assert ohif.drawn_annotations(session) > 0 and session.visible_failures() == []
    shot = tmp_path / "ohif-sr-ct.png"
    session.page.screenshot(path=str(shot))
    if os.environ.get("PACS_NODE_SCREENSHOTS"):  # make screenshot: the README's picture
        shutil.copy(shot, Path(os.environ["PACS_NODE_SCREENSHOTS"]) / shot.name)
    session.page.close()


def test_ohif_shows_the_complete_report_as_a_document(study, browser) -> None:
    ohif = _ohif_steps()
    session = ohif.open_study(browser, study.viewer, study.study_uid)
    ohif.open_series(session, "AI report")
    text = session.page.inner_text("body")
    assert "Oncology Measurement Report" in text
    report = pydicom.dcmread(study.files["sr"])
    imaging = next(i for i in report.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    names = {
        i.TextValue
        for g in imaging.ContentSequence
        for i in g.ContentSequence
        if i.ConceptNameCodeSequence[0].CodeValue == "112039"
    }
    assert "Triage" in names and all(n in text for n in names), names - {n for n in names if n in text}
    assert session.visible_failures() == []
    session.page.close()


def test_ohif_opens_the_parametric_map(study, browser) -> None:
    """OHIF's dicom-pmap extension loads the lesion probability map over the CT, without error."""
    ohif = _ohif_steps()
    session = ohif.open_study(browser, study.viewer, study.study_uid)
    ohif.open_series(session, "AI lesion probability")
    assert "Loading Parametric Map" not in session.page.inner_text("body")
    assert session.visible_failures() == []
    session.page.close()


def test_the_watch_sees_ohif_fail(study, browser) -> None:
    """The check can fail: the node's complete report retitled Imaging Measurement Report (as the
    node wrote it before OHIF was checked) makes OHIF's SR loader throw, and the watch sees it."""
    ohif = _ohif_steps()
    bad = pydicom.dcmread(study.files["sr"])
    bad.ConceptNameCodeSequence[0].CodeValue = "126000"
    bad.ConceptNameCodeSequence[0].CodeMeaning = "Imaging Measurement Report"
    bad.SeriesInstanceUID = pydicom.uid.generate_uid()
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    bad.SeriesDescription = "retitled report"
    path = study.files["sr"].with_name("retitled.dcm")
    bad.save_as(path)
    req = urllib.request.Request(f"{study.orthanc}/instances", data=path.read_bytes(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert json.loads(r.read())["Status"] == "Success"
    session = ohif.open_study(browser, study.viewer, study.study_uid)
    ohif.open_series(session, "retitled report")
    assert any("ReferencedSOPSequence" in f for f in session.visible_failures()), session.failures
    session.page.close()
