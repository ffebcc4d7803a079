"""Helpers for the node's integration tests: a running node (real Orthanc + worker), a PACS, a modality."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydicom import Dataset, dcmread

from node.service.orthanc import OrthancClient

ORTHANC = Path("/usr/sbin/Orthanc")


def orthanc_missing() -> str:
    """Why the node cannot run here ('' when it can)."""
    if not ORTHANC.exists():
        return "Orthanc is not installed (apt-get install orthanc orthanc-python orthanc-dicomweb)"
    for p in ("libOrthancPython.so", "libOrthancDicomWeb.so"):
        if not (Path("/usr/share/orthanc/plugins") / p).exists():
            return f"Orthanc plugin {p} is not installed"
    if not shutil.which("storescu"):
        return "DCMTK storescu is not installed"
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Received:
    called_ae: str
    sop_uid: str
    sop_class: str
    study_uid: str
    path: Path


@dataclass
class Pacs:
    """A pynetdicom storage SCP that records every C-STORE it accepts (so duplicates are visible)."""

    port: int
    folder: Path
    received: list[Received] = field(default_factory=list)
    _server: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.sop_class import (
            Comprehensive3DSRStorage,
            CTImageStorage,
            GrayscaleSoftcopyPresentationStateStorage,
            MRImageStorage,
            SegmentationStorage,
        )

        ae = AE(ae_title="PACS")
        for uid in (
            SegmentationStorage,
            Comprehensive3DSRStorage,
            GrayscaleSoftcopyPresentationStateStorage,
            CTImageStorage,
            MRImageStorage,
        ):
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        self.folder.mkdir(parents=True, exist_ok=True)

        def on_store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            called = event.assoc.requestor.primitive.called_ae_title
            called = called.decode() if isinstance(called, bytes) else str(called)
            path = self.folder / f"{called.strip()}-{ds.SOPInstanceUID}-{len(self.received)}.dcm"
            ds.save_as(path, enforce_file_format=True)
            with self._lock:
                self.received.append(
                    Received(called.strip(), ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, path)
                )
            return 0x0000

        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def of_study(self, study_uid: str, called_ae: str = "PACS") -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.study_uid == study_uid and r.called_ae == called_ae]

    def counts(self, study_uid: str, called_ae: str = "PACS") -> Counter:
        return Counter(r.sop_uid for r in self.of_study(study_uid, called_ae))


@dataclass
class Node:
    """``pacs-node serve`` running in a subprocess, with its config and an Orthanc client."""

    folder: Path
    config: dict
    proc: subprocess.Popen | None = None
    auth: tuple[str, str] | None = None  # Orthanc's REST user when the config sets http_users
    args: tuple[str, ...] = ()  # more serve arguments, e.g. ("--role", "worker")

    @property
    def client(self) -> OrthancClient:
        return OrthancClient(f"http://127.0.0.1:{self.config['http_port']}", self.auth)

    @property
    def log(self) -> Path:
        return self.folder / "serve.log"

    def start(self, timeout: float = 90, wait_worker: bool = True) -> None:
        # a shared test machine's disk may be fuller than production's default watermark allows; the
        # watermark test sets its own on a small file system
        self.config.setdefault("disk", {"refuse_above_percent": 99.9, "resume_below_percent": 99.8})
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = self.folder / "node.yaml"
        cfg.write_text(yaml.safe_dump(self.config))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(cfg), *self.args],
            stdout=open(self.log, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        client = self.client

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"pacs-node serve exited {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            if not wait_worker:
                return client.ready()
            return client.ready() and re.search(r"worker \S+ ready", self.log.read_text())

        wait_for(up, timeout, "the node to start")

    def orthanc_pid(self) -> int:
        """The running Orthanc's process ID (the supervisor's child)."""
        found = re.findall(r"orthanc started \(pid (\d+)\)", self.log.read_text())
        return int(found[-1])

    def get(self, path: str) -> tuple[int, str]:
        """GET on the node's health endpoint (metrics_port): status and body."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.config['metrics_port']}{path}", timeout=10
            ) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    # --- talking to it --------------------------------------------------------------------
    def store_scu(self, files: list[Path], calling_ae: str = "MODALITY") -> None:
        r = subprocess.run(
            [
                "storescu",
                "-R",
                "-aet",
                calling_ae,
                "-aec",
                self.config["ae_title"],
                "127.0.0.1",
                str(self.config["dicom_port"]),
                *map(str, files),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr[-2000:]

    def jobs(self) -> list[dict]:
        return self.client.get_json("/inference/jobs")

    def job(self, job_id: int) -> dict:
        return self.client.get_json(f"/inference/jobs/{job_id}")

    def series_id(self, series_uid: str) -> str | None:
        found = self.client.post_json(
            "/tools/find", {"Level": "Series", "Query": {"SeriesInstanceUID": series_uid}}
        )
        return found[0] if found else None

    def jobs_of(self, series_uid: str) -> list[dict]:
        sid = self.series_id(series_uid)
        return sorted((j for j in self.jobs() if j["series_id"] == sid), key=lambda j: j["id"])

    def wait_stable(self, series_uid: str, timeout: float = 30) -> str:
        """Wait until Orthanc calls the series stable (the plugin has then decided); return its ID."""
        sid = wait_for(lambda: self.series_id(series_uid), timeout, f"series {series_uid} in Orthanc")
        wait_for(lambda: self.client.series(sid).get("IsStable"), timeout, "the series to become stable")
        time.sleep(0.5)  # the change callback runs right after the stable flag
        return sid

    def wait_job(self, series_uid: str, states: tuple[str, ...], timeout: float = 60, n: int = 1) -> dict:
        def done():
            jobs = self.jobs_of(series_uid)
            if len(jobs) >= n and jobs[n - 1]["state"] in states:
                return jobs[n - 1]
            return None

        try:
            job = wait_for(done, timeout, f"job of {series_uid} in {states}", interval=0.2)
        except AssertionError:
            raise AssertionError(f"{self.jobs_of(series_uid)}\n{self.log.read_text()[-3000:]}") from None
        return self.job(job["id"])


class QrScp:
    """A Study Root C-FIND/C-MOVE SCP over a few files; ``ignore`` lists keys it does not match on (lax PACSs)."""

    def __init__(self, files: list[Path], destinations: dict[str, int], ignore: frozenset[str] = frozenset()):
        self.datasets = [dcmread(f) for f in files]
        self.destinations = destinations  # move destination AE -> port on 127.0.0.1
        self.ignore = ignore
        self.queries: list[Dataset] = []
        self.port = free_port()

    def start(self) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import (
            CTImageStorage,
            MRImageStorage,
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelMove,
        )

        ae = AE(ae_title="QRSCP")
        ae.require_called_aet = True
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_requested_context(CTImageStorage)  # the move's C-STORE sub-operations
        ae.add_requested_context(MRImageStorage)
        handlers = [(evt.EVT_C_FIND, self._find), (evt.EVT_C_MOVE, self._move)]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def stop(self) -> None:
        self._server.shutdown()

    def _matches(self, q: Dataset, ds: Dataset) -> bool:
        for elem in q:
            key, want = elem.keyword, str(elem.value or "")
            if not want or key in ("QueryRetrieveLevel", "SpecificCharacterSet") or key in self.ignore:
                continue
            if key == "ModalitiesInStudy":
                if want not in {
                    d.Modality for d in self.datasets if d.StudyInstanceUID == ds.StudyInstanceUID
                }:
                    return False
            elif key.endswith("Date") and "-" in want:
                lo, hi = want.split("-")
                if (lo and ds.get(key, "") < lo) or (hi and ds.get(key, "") > hi):
                    return False
            elif str(ds.get(key, "")) != want:
                return False
        return True

    def _answer(self, q: Dataset, ds: Dataset) -> Dataset:
        r = Dataset()
        for elem in q:
            if elem.keyword == "ModalitiesInStudy":
                value = sorted(
                    {d.Modality for d in self.datasets if d.StudyInstanceUID == ds.StudyInstanceUID}
                )
            elif elem.keyword == "NumberOfSeriesRelatedInstances":
                value = sum(d.SeriesInstanceUID == ds.SeriesInstanceUID for d in self.datasets)
            else:
                value = ds.get(elem.keyword, q.get(elem.keyword))
            setattr(r, elem.keyword, value)
        return r

    def _find(self, event):
        q = event.identifier
        self.queries.append(q)
        key = "StudyInstanceUID" if q.QueryRetrieveLevel == "STUDY" else "SeriesInstanceUID"
        for ds in {d[key].value: d for d in self.datasets}.values():  # one answer per study / series
            if self._matches(q, ds):
                yield 0xFF00, self._answer(q, ds)

    def _move(self, event):
        q = event.identifier
        port = self.destinations.get(event.move_destination)
        if port is None:
            yield None, None  # pynetdicom answers 0xA801 move destination unknown
            return
        yield "127.0.0.1", port
        found = [d for d in self.datasets if d.SeriesInstanceUID == q.SeriesInstanceUID]
        yield len(found)
        for ds in found:
            yield 0xFF00, ds
