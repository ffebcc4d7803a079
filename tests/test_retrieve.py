"""Query/Retrieve SCU for priors, on loopback against a pynetdicom Q/R SCP and a real Orthanc."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests
from orthanc_fixture import ORTHANC, Pacs, QrScp, free_port, orthanc_missing, wait_for
from pydicom import dcmread

from node.service.retrieve import (
    PriorCandidate,
    QueryRetrieveSource,
    RetrieveError,
    find_series,
    retrieve_series,
)
from node.synthetic.dicom import Patient, WrittenSeries, write_axial_series
from node.synthetic.phantom import Phantom

CALLING = "PACSNODE"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> dict[str, WrittenSeries]:
    """PAT1: CT on 2025-01-10 and MR on 2025-06-01; PAT2: a CT in between (3 slices 32x32 each)."""
    out = tmp_path_factory.mktemp("archive")

    def series(key: str, modality: str, pid: str, date: str, seed: int) -> WrittenSeries:
        patient = Patient(name=f"SECRET^{pid}", id=pid, accession=f"ACC{seed}", study_date=date)
        return write_axial_series(
            Phantom.random(seed, n_lesions=0),
            out / key,
            modality=modality,
            shape=(3, 32, 32),
            pixel_spacing=12.0,
            seed=seed,
            patient=patient,
        )

    return {
        "ct": series("ct", "CT", "PAT1", "20250110", 1),
        "mr": series("mr", "MR", "PAT1", "20250601", 2),
        "other": series("other", "CT", "PAT2", "20250301", 3),
    }


@pytest.fixture
def store(tmp_path: Path) -> Pacs:
    """The move destination: a storage SCP that records what it receives (any called AE)."""
    p = Pacs(free_port(), tmp_path / "store")
    p.start()
    yield p
    p.stop()


@pytest.fixture
def full_store() -> int:
    """A move destination that refuses every C-STORE (out of resources); its port."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage

    ae = AE(ae_title="FULL")
    ae.add_supported_context(CTImageStorage)
    ae.add_supported_context(MRImageStorage)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xA700)]
    )
    yield port
    server.shutdown()


def _qr(archive: dict[str, WrittenSeries], destinations: dict[str, int], ignore=frozenset()) -> QrScp:
    scp = QrScp([f for s in archive.values() for f in s.files], destinations, ignore)
    scp.start()
    return scp


@pytest.fixture
def qr(archive, store: Pacs, full_store: int) -> QrScp:
    scp = _qr(archive, {"NODE_STORE": store.port, "FULL_STORE": full_store})
    yield scp
    scp.stop()


def _source(port: int, **kw) -> QueryRetrieveSource:
    return QueryRetrieveSource(
        "pacs", "dicom", host="127.0.0.1", port=port, ae_title=kw.pop("ae_title", "QRSCP"), **kw
    )


def test_find_returns_the_patients_series_of_that_modality(qr: QrScp, archive, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="node.service.retrieve")
    ct, mr = archive["ct"], archive["mr"]
    found = find_series(_source(qr.port), CALLING, "PAT1", "CT")
    assert found == [
        PriorCandidate(
            study_uid=ct.study_uid,
            series_uid=ct.series_uid,
            modality="CT",
            body_part="CHEST",
            acquired=datetime(2025, 1, 10, 12, 0),
            description="CT phantom",
            instances=3,
            source="pacs",
        )
    ]
    assert [c.series_uid for c in find_series(_source(qr.port), CALLING, "PAT1", "MR")] == [mr.series_uid]
    assert find_series(_source(qr.port), CALLING, "PAT1", "US") == []
    assert find_series(_source(qr.port), CALLING, "NOBODY", "CT") == []
    ours = [r.getMessage() for r in caplog.records if r.name == "node.service.retrieve"]
    assert ours and not [m for m in ours if "PAT1" in m]


def test_date_window(qr: QrScp, archive) -> None:
    ct = archive["ct"].series_uid

    def uids(**window) -> list[str]:
        return [c.series_uid for c in find_series(_source(qr.port), CALLING, "PAT1", "CT", **window)]

    assert uids(before=datetime(2025, 1, 10, 12, 0)) == []  # strictly before: not the exam itself
    assert uids(before=datetime(2025, 1, 10, 12, 0, 1)) == [ct]
    assert uids(not_before=datetime(2025, 1, 10, 12, 0)) == [ct]
    assert uids(not_before=datetime(2025, 1, 10, 12, 0, 1)) == []  # same day, but later
    assert uids(not_before=datetime(2024, 1, 1), before=datetime(2025, 2, 1)) == [ct]
    assert uids(not_before=datetime(2025, 2, 1), before=datetime(2026, 1, 1)) == []
    # the study query narrows by whole days, inclusive
    assert [q.StudyDate for q in qr.queries if q.QueryRetrieveLevel == "STUDY"] == [
        "-20250110",
        "-20250110",
        "20250110-",
        "20250110-",
        "20240101-20250201",
        "20250201-20260101",
    ]
    both = find_series(_source(qr.port), CALLING, "PAT1", "MR", not_before=datetime(2025, 1, 1))
    assert [c.acquired for c in both] == [datetime(2025, 6, 1, 12, 0)]


def test_other_patient_never_returned_even_from_a_lax_pacs(archive, store: Pacs) -> None:
    # a PACS that ignores PatientID and modality answers every study and series
    lax = _qr(archive, {"NODE_STORE": store.port}, frozenset({"PatientID", "ModalitiesInStudy", "Modality"}))
    try:
        found = find_series(_source(lax.port), CALLING, "PAT1", "CT")
        assert [c.series_uid for c in found] == [archive["ct"].series_uid]
        assert {q.QueryRetrieveLevel for q in lax.queries} == {"STUDY", "SERIES"}
        with pytest.raises(ValueError, match="wildcard"):
            find_series(_source(lax.port), CALLING, "PAT*", "CT")
        with pytest.raises(ValueError):
            find_series(_source(lax.port), CALLING, "", "CT")
    finally:
        lax.stop()


def test_retrieve_moves_every_instance(qr: QrScp, store: Pacs, archive) -> None:
    ct = archive["ct"]
    (candidate,) = find_series(_source(qr.port), CALLING, "PAT1", "CT")
    n = retrieve_series(_source(qr.port), CALLING, candidate, move_destination="NODE_STORE")
    assert n == len(ct.files) == 3
    expected = {dcmread(f).SOPInstanceUID for f in ct.files}
    got = store.of_study(ct.study_uid, called_ae="NODE_STORE")
    assert sorted(r.sop_uid for r in got) == sorted(expected)
    assert all(dcmread(r.path).SeriesInstanceUID == ct.series_uid for r in got)


@pytest.mark.parametrize(
    ("destination", "gone", "why"),
    [
        ("UNKNOWN_AE", False, ": status 0xA801 (Move destination unknown)"),
        ("FULL_STORE", False, ": status 0xA702"),  # every C-STORE sub-operation refused
        ("NODE_STORE", True, ": 0 instances completed"),  # success, but the series is no longer there
    ],
)
def test_move_failure_raises(qr: QrScp, store: Pacs, archive, destination: str, gone: bool, why: str) -> None:
    (candidate,) = find_series(_source(qr.port), CALLING, "PAT1", "CT")
    if gone:
        qr.datasets = [d for d in qr.datasets if d.SeriesInstanceUID != candidate.series_uid]
    with pytest.raises(RetrieveError) as e:
        retrieve_series(_source(qr.port), CALLING, candidate, move_destination=destination)
    msg = str(e.value)
    assert msg.startswith(f"pacs: C-MOVE of series {candidate.series_uid} to {destination}{why}"), msg
    assert store.received == []


def test_unreachable_silent_or_refusing_source_raises_fast(qr: QrScp, tmp_path: Path) -> None:
    closed = free_port()
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections (backlog), never answers
    port = silent.getsockname()[1]
    candidate = PriorCandidate("1.2.3", "1.2.3.4", "CT", "", None, "", None, "pacs")

    def web(port: int) -> QueryRetrieveSource:
        return QueryRetrieveSource("pacs", "dicomweb", url=f"http://127.0.0.1:{port}/dicom-web", timeout_s=1)

    sources = {
        "closed": (_source(closed, timeout_s=1), "not reachable (connection refused"),
        "silent": (_source(port, timeout_s=1), "not reachable (connection refused or timed out)"),
        "wrong AE": (
            _source(qr.port, ae_title="NOT_QRSCP", timeout_s=1),
            "rejected (A-ASSOCIATE-RJ: Called AE title not recognised)",
        ),
        "closed web": (web(closed), "connection failed"),
        "silent web": (web(port), "no answer in 1 s"),
    }
    try:
        for what, (source, why) in sources.items():
            for call in (
                lambda s=source: find_series(s, CALLING, "PAT1", "CT"),
                lambda s=source: retrieve_series(s, CALLING, candidate, "NODE_STORE", into=tmp_path),
            ):
                t0 = time.monotonic()
                with pytest.raises(RetrieveError) as e:
                    call()
                msg = str(e.value)
                assert time.monotonic() - t0 < 4, what
                assert msg.startswith("pacs: ") and why in msg, (what, msg)
                assert "\n" not in msg and "PAT1" not in msg, (what, msg)
    finally:
        silent.close()


# -- a real PACS: Orthanc as Q/R SCP and DICOMweb server ------------------------------------------


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, archive):
    if orthanc_missing():
        pytest.skip(orthanc_missing())
    folder = tmp_path_factory.mktemp("orthanc")
    store = Pacs(free_port(), folder / "store")
    store.start()
    http, dicom = free_port(), free_port()
    config = {
        "Name": "QR",
        "DicomAet": "ORTHANC",
        "DicomPort": dicom,
        "HttpPort": http,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomCheckModalityHost": False,
        "DicomModalities": {
            ae: {"AET": ae, "Host": "127.0.0.1", "Port": port}
            for ae, port in ((CALLING, 104), ("NODE_STORE", store.port))
        },
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 (owned by the process)
    proc = subprocess.Popen(
        [str(ORTHANC), str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{http}"

    def up() -> bool:
        assert proc.poll() is None, (folder / "orthanc.log").read_text()[-2000:]
        try:
            return requests.get(f"{url}/system", timeout=1).ok
        except requests.RequestException:
            return False

    try:
        wait_for(up, 30, "Orthanc to start")
        for f in (f for s in archive.values() for f in s.files):
            requests.post(f"{url}/instances", data=f.read_bytes(), timeout=10).raise_for_status()
        yield {"url": url, "dicom_port": dicom, "store": store}
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
        store.stop()


@pytest.mark.slow
def test_dicomweb_find_and_retrieve_from_orthanc(orthanc, archive, tmp_path: Path) -> None:
    ct = archive["ct"]
    web = QueryRetrieveSource("orthanc-web", "dicomweb", url=f"{orthanc['url']}/dicom-web", timeout_s=10)
    found = find_series(web, CALLING, "PAT1", "CT", before=datetime(2025, 6, 1))
    assert [(c.series_uid, c.study_uid, c.acquired, c.body_part, c.instances, c.source) for c in found] == [
        (ct.series_uid, ct.study_uid, datetime(2025, 1, 10, 12, 0), "CHEST", 3, "orthanc-web")
    ]
    assert find_series(web, CALLING, "PAT1", "CT", not_before=datetime(2025, 1, 11)) == []
    assert [c.modality for c in find_series(web, CALLING, "PAT1", "MR")] == ["MR"]
    n = retrieve_series(web, CALLING, found[0], into=tmp_path / "prior")
    expected = {dcmread(f).SOPInstanceUID for f in ct.files}
    assert n == 3
    assert sorted(p.name for p in (tmp_path / "prior").iterdir()) == sorted(f"{u}.dcm" for u in expected)
    assert {dcmread(p).SOPInstanceUID for p in (tmp_path / "prior").iterdir()} == expected
    missing = PriorCandidate(ct.study_uid, "1.2.3.999", "CT", "", None, "", None, "orthanc-web")
    with pytest.raises(RetrieveError, match=r"^orthanc-web: WADO-RS"):
        retrieve_series(web, CALLING, missing, into=tmp_path / "none")


@pytest.mark.slow
def test_dimse_find_and_move_from_orthanc(orthanc, archive) -> None:
    ct, store = archive["ct"], orthanc["store"]
    pacs = QueryRetrieveSource(
        "orthanc", "dicom", host="127.0.0.1", port=orthanc["dicom_port"], ae_title="ORTHANC"
    )
    found = find_series(
        pacs, CALLING, "PAT1", "CT", not_before=datetime(2025, 1, 1), before=datetime(2025, 12, 31)
    )
    assert [(c.series_uid, c.acquired, c.body_part, c.instances) for c in found] == [
        (ct.series_uid, datetime(2025, 1, 10, 12, 0), "CHEST", 3)
    ]
    assert retrieve_series(pacs, CALLING, found[0], move_destination="NODE_STORE") == 3
    expected = {dcmread(f).SOPInstanceUID for f in ct.files}
    assert {r.sop_uid for r in store.of_study(ct.study_uid, called_ae="NODE_STORE")} == expected
    with pytest.raises(RetrieveError, match=r"^orthanc: C-MOVE"):
        retrieve_series(pacs, CALLING, found[0], move_destination="UNKNOWN_AE")
