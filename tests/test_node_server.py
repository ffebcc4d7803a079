"""The node in a department, with the real parts: Orthanc + plugin + worker, storescu, a pynetdicom PACS.

One node per test session (Orthanc on free loopback ports in a temp folder); each test sends its own
phantom (its own seed, so its own study) and looks only at what belongs to that study.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from orthanc_fixture import Node, Pacs, QrScp, free_port, orthanc_missing, wait_for
from phantoms import aorta_drawn_in_slicer, confident_lesion_ct
from pydicom import dcmread
from pydicom.uid import generate_uid

from node.synthetic.dicom import Patient, write_axial_series
from node.synthetic.phantom import Phantom

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(orthanc_missing()), reason=orthanc_missing() or "ok")]

KINDS = {
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",
    "1.2.840.10008.5.1.4.1.1.11.1": "gsps",
}


class Hooks:
    """A RIS's webhook endpoint: a local HTTP server that keeps every JSON body it receives."""

    def __init__(self) -> None:
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of_series(self, series_uid: str) -> list[dict]:
        return [b for b in self.received if b.get("series_instance_uid") == series_uid]


@pytest.fixture(scope="session")
def hooks() -> Hooks:
    h = Hooks()
    yield h
    h.server.shutdown()


@pytest.fixture(scope="session")
def qr() -> QrScp:
    """The department's PACS as a query/retrieve SCP: it holds the priors tests put in it."""
    q = QrScp([], {})
    q.start()
    yield q
    q.stop()


@pytest.fixture(scope="session")
def node(tmp_path_factory, pacs: Pacs, hooks: Hooks, qr: QrScp) -> Node:
    folder = tmp_path_factory.mktemp("node")
    http, dicom = free_port(), free_port()
    qr.destinations["PACSNODE"] = dicom  # the PACS knows the node's AE for C-MOVE
    n = Node(
        folder,
        {
            "ae_title": "PACSNODE",
            "dicom_port": dicom,
            "http_port": http,
            "metrics_port": free_port(),
            "data_dir": str(folder / "data"),
            "stable_age_s": 2,
            "destinations": [
                {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.port, "ae_title": "PACS"},
                # a viewer that cannot store SEG
                {
                    "name": "viewer",
                    "kind": "dicom",
                    "host": "127.0.0.1",
                    "port": pacs.port,
                    "ae_title": "VIEWER",
                    "accepts": ["sr", "gsps"],
                },
                # STOW-RS back into the node's own DICOMweb: a real STOW-RS server, and no loop
                {
                    "name": "archive",
                    "kind": "dicomweb",
                    "url": f"http://127.0.0.1:{http}/dicom-web",
                    "accepts": ["sr"],
                },
                # the RIS worklist: every series' triage (routine included, so each test can see it)
                {"name": "ris", "kind": "webhook", "url": hooks.url, "min_category": "routine"},
            ],
            "priors": {
                "sources": [
                    {"name": "qr", "kind": "dicom", "host": "127.0.0.1", "port": qr.port, "ae_title": "QRSCP"}
                ]
            },
            "worker": {"lease_s": 4, "heartbeat_s": 1, "poll_s": 0.2, "max_attempts": 3},
            "delivery": {"backoff_s": 0.5, "backoff_max_s": 2},
        },
    )
    n.start()
    yield n
    assert n.stop() == 0


def phantom(tmp_path: Path, seed: int, modality: str = "CT", slices: int = 24, size: int = 96):
    return write_axial_series(
        Phantom.random(seed, n_lesions=2),
        tmp_path / f"{modality}-{seed}",
        modality=modality,
        shape=(slices, size, size),
        pixel_spacing=round(380.0 / size, 3),
        slice_spacing=round(240.0 / slices, 3),
        seed=seed,
        patient=Patient(name=f"SECRET^NAME{seed}", id=f"SECRETID{seed}", accession=f"SECRETACC{seed}"),
    )


def outputs_at(pacs: Pacs, study_uid: str, called_ae: str = "PACS") -> dict[str, list]:
    got: dict[str, list] = {}
    for r in pacs.of_study(study_uid, called_ae):
        got.setdefault(KINDS.get(r.sop_class, r.sop_class), []).append(r)
    return got


def wait_outputs(pacs: Pacs, study_uid: str, timeout: float = 60) -> dict[str, list]:
    wait_for(lambda: len(outputs_at(pacs, study_uid)) == 3, timeout, "SEG, SR and GSPS at the PACS")
    return outputs_at(pacs, study_uid)


def dciodvfy_errors(path: Path) -> list[str]:
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]


# --- the main path ---------------------------------------------------------------------------------
def test_cstore_ct_in_seg_sr_gsps_out(node: Node, pacs: Pacs, tmp_path: Path) -> None:
    ct = phantom(tmp_path, 101)
    t0 = time.monotonic()
    node.store_scu(ct.files)
    got = wait_outputs(pacs, ct.study_uid)
    latency = time.monotonic() - t0
    assert sorted(got) == ["gsps", "seg", "sr"]
    for kind, received in got.items():
        assert len(received) == 1, kind
        ds = dcmread(received[0].path)
        assert ds.StudyInstanceUID == ct.study_uid  # in the source study
        assert ds.Manufacturer == "pacs-node"
        if os.path.exists("/usr/bin/dciodvfy"):
            assert dciodvfy_errors(received[0].path) == [], kind
    job = node.wait_job(ct.series_uid, ("done",))
    assert job["attempts"] == 1 and job["error"] is None
    assert {(d["destination"], d["kind"]) for d in job["deliveries"]} == {
        ("pacs", "seg"),
        ("pacs", "sr"),
        ("pacs", "gsps"),
        ("viewer", "sr"),
        ("viewer", "gsps"),
        ("archive", "sr"),
        ("ris", "triage"),
    }
    assert all(d["state"] == "delivered" for d in job["deliveries"])
    # per-destination accepted kinds: the viewer got no SEG
    assert sorted(outputs_at(pacs, ct.study_uid, "VIEWER")) == ["gsps", "sr"]
    # the STOW-RS destination (the node's own DICOMweb) answered and has the SR
    sr_uid = got["sr"][0].sop_uid
    assert node.client.post_json("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sr_uid}})
    # no patient data in the node's INFO logs
    logs = node.log.read_text()
    for secret in ("SECRET^NAME101", "SECRETID101", "SECRETACC101"):
        assert secret not in logs
    print(
        f"end-to-end (storescu start -> 3 outputs at the PACS, 24x96x96 CT, StableAge 2 s): {latency:.1f} s"
    )


def test_stow_rs_mr_in_results_out(node: Node, pacs: Pacs, tmp_path: Path) -> None:
    from dicomweb_client.api import DICOMwebClient

    mr = phantom(tmp_path, 102, modality="MR")
    client = DICOMwebClient(f"{node.client.url}/dicom-web")
    client.store_instances([dcmread(f) for f in mr.files])
    got = wait_outputs(pacs, mr.study_uid)
    assert sorted(got) == ["gsps", "seg", "sr"]
    assert all(len(v) == 1 for v in got.values())


# --- what must not be processed ---------------------------------------------------------------------
def test_non_eligible_series_make_no_job(node: Node, pacs: Pacs, tmp_path: Path) -> None:
    cr = phantom(tmp_path, 103, slices=3)
    cr_uid = generate_uid()
    files = []
    for f in cr.files:
        ds = dcmread(f)
        ds.Modality = "CR"
        ds.SeriesInstanceUID = cr_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = tmp_path / f"cr-{f.name}"
        ds.save_as(out)
        files.append(out)
    node.store_scu(files)
    node.wait_stable(cr_uid)
    assert node.jobs_of(cr_uid) == []


def test_own_seg_sent_back_makes_no_job(node: Node, pacs: Pacs, tmp_path: Path) -> None:
    ct = phantom(tmp_path, 104)
    node.store_scu(ct.files)
    got = wait_outputs(pacs, ct.study_uid)
    n_jobs = len(node.jobs())
    for kind in ("seg", "sr", "gsps"):
        node.store_scu([got[kind][0].path], calling_ae="OTHERPACS")
        node.wait_stable(dcmread(got[kind][0].path).SeriesInstanceUID)
    time.sleep(0.5)
    assert len(node.jobs()) == n_jobs
    assert all(v == 1 for v in pacs.counts(ct.study_uid).values())


def _drawn_seg(source_files: list[Path], out: Path) -> Path:
    """A small box called Aorta, drawn on the series' images (sorted feet to head)."""
    files = sorted(source_files, key=lambda f: float(dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    rows, cols = (int(v) for v in (dcmread(files[0], stop_before_pixels=True)[k].value for k in ("Rows", "Columns")))
    mask = np.zeros((len(files), rows, cols), bool)
    mask[3:9, 40:52, 44:56] = True
    return aorta_drawn_in_slicer(files, mask, out)


def test_a_radiologists_seg_becomes_a_label_set_never_a_job(node: Node, pacs: Pacs, tmp_path: Path) -> None:
    """A SEG drawn in a viewer about a series the node has is a label set, with its sender, and never
    a job; one about a series the node never received is neither; the node's own SEG sent back is neither."""
    ct = phantom(tmp_path, 141)
    node.store_scu(ct.files)
    got = wait_outputs(pacs, ct.study_uid)
    n_jobs = len(node.jobs())
    drawn = _drawn_seg(ct.files, tmp_path / "drawn.dcm")
    elsewhere = _drawn_seg(phantom(tmp_path, 142).files, tmp_path / "elsewhere.dcm")  # never sent
    for seg, ae in ((drawn, "SLICER"), (elsewhere, "SLICER"), (got["seg"][0].path, "OTHERPACS")):
        node.store_scu([seg], calling_ae=ae)
        node.wait_stable(dcmread(seg).SeriesInstanceUID)
    time.sleep(0.5)
    assert len(node.jobs()) == n_jobs
    sets = node.client.get_json("/inference/labels")
    mine = [s for s in sets if s["series_uid"] == ct.series_uid]
    assert len(mine) == 1, sets
    (labels,) = mine
    assert labels["kind"] == "segmentation" and labels["sender"] == "SLICER"
    assert labels["source"] == dcmread(drawn).SOPInstanceUID
    assert labels["labels"] == [{"name": "Aorta", "code": "SCT:15825003"}]
    assert not [s for s in sets if s["source"] == dcmread(elsewhere).SOPInstanceUID]
    assert node.client.get_json(f"/inference/labels?series={ct.series_uid}") == mine
    # sent again (a corrected version with the same UID): replaced, not added
    node.store_scu([drawn], calling_ae="SLICER2")
    wait_for(
        lambda: [s["sender"] for s in node.client.get_json(f"/inference/labels?series={ct.series_uid}")] == ["SLICER2"],
        30, "the label set replaced",
    )  # fmt: skip
    _, metrics = node.get("/metrics")
    assert 'pacs_node_jobs_total{outcome="skipped",rule="label_set"}' in metrics


# --- bad input ----------------------------------------------------------------------------------------
def test_refused_series_fails_with_one_line_error(node: Node, tmp_path: Path) -> None:
    ct = phantom(tmp_path, 105, slices=6)
    ds = dcmread(ct.files[2])
    del ds.ImagePositionPatient
    ds.save_as(ct.files[2])
    node.store_scu(ct.files)
    job = node.wait_job(ct.series_uid, ("failed",))
    assert job["error"] and "\n" not in job["error"] and "ImagePositionPatient" in job["error"]
    assert "job-" not in job["error"]  # names the Orthanc instance, not a scratch file deleted since
    assert job["attempts"] == 1  # the series itself is bad: no retry
    assert node.client.ready()  # the receiver keeps running
    url = node.client.url
    r = node.client.session.post(f"{url}/inference/jobs/{job['id']}/retry")
    assert r.status_code == 200 and r.json()["state"] == "queued"
    assert node.wait_job(ct.series_uid, ("failed",))["attempts"] == 1
    # the job routes answer mistakes with a status and a reason
    assert node.client.session.get(f"{url}/inference/jobs/999999").status_code == 404
    r = node.client.session.get(f"{url}/inference/jobs", params={"state": "bogus"})
    assert r.status_code == 400 and "unknown state" in r.text
    first = min(j["id"] for j in node.jobs() if j["state"] == "done")
    r = node.client.session.post(f"{url}/inference/jobs/{first}/retry")
    assert r.status_code == 409 and "only a failed job can be retried" in r.text


# --- robustness ----------------------------------------------------------------------------------------
def test_pacs_down_then_delivered_exactly_once(node: Node, pacs: Pacs, tmp_path: Path) -> None:
    ct = phantom(tmp_path, 106)
    pacs.stop()
    try:
        node.store_scu(ct.files)

        def retried():
            jobs = node.jobs_of(ct.series_uid)
            if not jobs or jobs[0]["state"] != "delivering":
                return None
            job = node.job(jobs[0]["id"])
            pending = [d for d in job["deliveries"] if d["destination"] == "pacs" and d["state"] == "pending"]
            return job if len(pending) == 3 and all(d["attempts"] >= 2 for d in pending) else None

        job = wait_for(retried, 60, "deliveries to be retried while the PACS is down", interval=0.2)
        assert all(d["last_error"] for d in job["deliveries"] if d["destination"] == "pacs")
        assert node.client.get_json("/inference/destinations")["pacs"]["pending"] >= 3
    finally:
        pacs.start()
    node.wait_job(ct.series_uid, ("done",), timeout=30)
    counts = pacs.counts(ct.study_uid)
    assert len(counts) == 3 and set(counts.values()) == {1}, counts


def test_resend_same_series_no_duplicates(node: Node, pacs: Pacs, tmp_path: Path) -> None:
    ct = phantom(tmp_path, 108)
    node.store_scu(ct.files)
    wait_outputs(pacs, ct.study_uid)
    node.wait_job(ct.series_uid, ("done",))
    node.store_scu(ct.files)
    time.sleep(1.0)
    node.wait_stable(ct.series_uid)
    jobs = node.jobs_of(ct.series_uid)
    assert len(jobs) == 1
    assert any(h["event"] == "resubmitted" for h in node.job(jobs[0]["id"])["history"])
    counts = pacs.counts(ct.study_uid)
    assert len(counts) == 3 and set(counts.values()) == {1}, counts


def test_late_instance_supersedes(node: Node, pacs: Pacs, tmp_path: Path) -> None:
    ct = phantom(tmp_path, 109)
    node.store_scu(ct.files[:-1])
    first = node.wait_job(ct.series_uid, ("done",))
    node.store_scu(ct.files[-1:])
    second = node.wait_job(ct.series_uid, ("done",), n=2)
    assert second["supersedes"] == first["id"]
    assert node.job(first["id"])["state"] == "superseded"
    assert "late instances: 23 -> 24" in second["history"][0]["detail"]
    # same output UIDs: the PACS got each object again, replacing (not adding) it
    counts = pacs.counts(ct.study_uid)
    assert len(counts) == 3 and set(counts.values()) == {2}, counts
    seg = [r for r in pacs.of_study(ct.study_uid) if KINDS.get(r.sop_class) == "seg"][-1]
    assert len(dcmread(seg.path).ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 24


def test_urgent_series_overtakes_routine_ones_and_the_ris_hears_of_it(
    node: Node, pacs: Pacs, hooks: Hooks, tmp_path: Path
) -> None:
    """A routine series waits while a later STAT stroke series is processed first; the webhook gets
    the documented JSON and nothing more; the SR carries the triage as a coded finding."""
    busy = phantom(tmp_path, 111, slices=64, size=128)
    routine, urgent = phantom(tmp_path, 112), phantom(tmp_path, 113)
    for f in urgent.files:  # what a RIS order puts into the images' request attributes
        ds = dcmread(f)
        ds.RequestedProcedurePriority = "STAT"
        ds.RequestedProcedureDescription = "CT head, suspected acute stroke"
        ds.save_as(f)
    node.store_scu(busy.files)
    running = node.wait_job(busy.series_uid, ("running",), timeout=30)
    worker = int(running["lease_owner"].rsplit(":", 1)[1])
    os.kill(worker, signal.SIGSTOP)  # hold the worker while both series arrive, routine first
    try:
        node.store_scu(routine.files)
        node.wait_job(routine.series_uid, ("queued",))
        node.store_scu(urgent.files)
        queued = node.wait_job(urgent.series_uid, ("queued",))
        assert queued["priority"] == 70  # STAT 40 + urgent terms 30, known before inference
    finally:
        os.kill(worker, signal.SIGCONT)
    leased = {}
    for s in (routine, urgent):
        job = node.wait_job(s.series_uid, ("done",), timeout=120)
        leased[s.series_uid] = next(h["ts"] for h in job["history"] if h["event"] == "leased")
    assert leased[urgent.series_uid] < leased[routine.series_uid]
    job = node.wait_job(urgent.series_uid, ("done",))
    assert job["urgency"] == "urgent" and job["urgency_score"] >= 70
    (hook,) = wait_for(lambda: hooks.of_series(urgent.series_uid), 30, "the triage webhook")
    assert set(hook) == {"event", "study_instance_uid", "series_instance_uid", "score", "category", "summary"}
    assert (hook["study_instance_uid"], hook["category"], hook["score"]) == (
        urgent.study_uid,
        "urgent",
        job["urgency_score"],
    )
    assert not any("SECRET" in str(v) for v in hook.values())
    sr = dcmread(outputs_at(pacs, urgent.study_uid)["sr"][-1].path)
    groups = [g for item in sr.ContentSequence if "ContentSequence" in item for g in item.ContentSequence]
    triage = [
        c.ConceptCodeSequence[0].CodeMeaning
        for g in groups
        for c in g.get("ContentSequence", [])
        if c.ValueType == "CODE" and c.ConceptNameCodeSequence[0].CodeMeaning == "Urgency category"
    ]
    assert triage == ["Urgent"]
    metrics = requests.get(f"http://127.0.0.1:{node.config['metrics_port']}/metrics", timeout=10).text
    assert 'pacs_node_series_urgency_total{category="urgent"}' in metrics


def _sr_items(sr) -> dict[str, list[str]]:
    """Concept name -> values (code meanings, numbers, texts) of every content item of the SR."""
    out: dict[str, list[str]] = {}

    def walk(item):
        for c in item.get("ContentSequence", []):
            name = c.ConceptNameCodeSequence[0].CodeMeaning
            if c.ValueType == "CODE":
                out.setdefault(name, []).append(c.ConceptCodeSequence[0].CodeMeaning)
            elif c.ValueType == "NUM":
                out.setdefault(name, []).append(str(c.MeasuredValueSequence[0].NumericValue))
            elif c.ValueType == "TEXT":
                out.setdefault(name, []).append(str(c.TextValue))
            walk(c)

    walk(sr)
    return out


def test_prior_found_at_the_pacs_is_moved_in_and_compared(
    node: Node, pacs: Pacs, qr: QrScp, tmp_path: Path
) -> None:
    """The current CT's patient has nothing in Orthanc; the PACS has an earlier CT. The worker finds
    it by C-FIND, retrieves it by C-MOVE into Orthanc (which makes no job of it), infers it once,
    and the current SR reports the comparison. The next series of the patient reuses that result."""
    ph = Phantom.random(120, n_lesions=2)

    def exam(name: str, date: str):
        return write_axial_series(
            ph,
            tmp_path / name,
            shape=(24, 96, 96),
            pixel_spacing=3.96,
            slice_spacing=10.0,
            seed=120,
            patient=Patient(
                name="SECRET^PRIOR", id="SECRETID120", study_date=date, study_uid=f"1.2.3.120.{date}"
            ),
        )

    prior, current = exam("prior", "20250601"), exam("current", "20251201")
    qr.datasets += [dcmread(f) for f in prior.files]
    node.store_scu(current.files)
    job = node.wait_job(current.series_uid, ("done",), timeout=120)
    assert any(q.get("PatientID") == "SECRETID120" for q in qr.queries)  # C-FIND by patient
    assert node.series_id(prior.series_uid) is not None  # moved into Orthanc
    time.sleep(3)  # past stable_age: the plugin has seen the prior series by now
    assert node.jobs_of(prior.series_uid) == []  # context, not work
    sr = dcmread(outputs_at(pacs, current.study_uid)["sr"][-1].path)
    items = _sr_items(sr)
    assert items["Comparison with Prior Study Done"] == ["Yes"]
    assert items["Interval"][-1] == "183.0" and "Current Response" in items
    assert "prior found (qr, inferred now)" in node.log.read_text()
    assert job["error"] is None

    later = exam("later", "20260301")
    node.store_scu(later.files)
    node.wait_job(later.series_uid, ("done",), timeout=120)
    assert (
        "prior found (orthanc, earlier result)" in node.log.read_text()
    )  # the current one, not inferred again
    items = _sr_items(dcmread(outputs_at(pacs, later.study_uid)["sr"][-1].path))
    assert items["Interval"][-1] == "90.0"


def test_no_prior_is_said_and_why(node: Node, pacs: Pacs, tmp_path: Path) -> None:
    ct = phantom(tmp_path, 121)
    node.store_scu(ct.files)
    node.wait_job(ct.series_uid, ("done",))
    items = _sr_items(dcmread(outputs_at(pacs, ct.study_uid)["sr"][-1].path))
    assert items["Comparison with Prior Study Done"] == ["No"]
    assert any(
        t.startswith(
            "no prior available: no earlier CT series of this patient in Orthanc or qr within 1825 days"
        )
        for t in items["Comment"]
    ), items["Comment"]


def test_report_in_orthanc_contradicted_by_the_image_is_flagged(node: Node, tmp_path: Path) -> None:
    """A radiologist's text SR already in the study says "No focal lesion."; the phantom has a
    confident kidney lesion: the job, the SR and the metrics say so; the report is untouched."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    src = confident_lesion_ct(tmp_path / "ct", Patient(id="SECRETID130", study_uid="1.2.3.130"))
    image = dcmread(src.files[0])
    text = hd.sr.ContainerContentItem(name=codes.DCM.Finding, template_id=None)
    text.ContentSequence = [
        hd.sr.TextContentItem(
            name=codes.DCM.Finding,
            value="No focal lesion. No pleural effusion.",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    report = hd.sr.EnhancedSR(
        evidence=[image],
        content=text,
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="RIS",
    )
    report.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    node.store_scu([tmp_path / "report.dcm", *src.files])
    job = node.wait_job(src.series_uid, ("done",), timeout=120)
    assert job["discrepancies"] == 1
    metrics = requests.get(f"http://127.0.0.1:{node.config['metrics_port']}/metrics", timeout=10).text
    (total,) = re.findall(r"^pacs_node_report_discrepancies_total (\S+)$", metrics, re.M)
    assert float(total) >= 1
