"""``pacs-node bench --suite latency``: end-to-end latency of the whole node under a burst of studies.

A real node (``pacs-node serve``: Orthanc, the plugin, N worker processes, the queue in SQLite or
PostgreSQL with ``--queue-url``) receives ``--series`` CT phantoms from two senders at once
(C-STORE, pynetdicom) and delivers its outputs to a storage SCP started here. A series' latency
runs from the moment its last instance was acknowledged to the moment its last output reached the
SCP, so it includes Orthanc's stable age (stated in the result: it is a setting, not work), queueing
behind the other series, inference and delivery. Each worker count runs in the same invocation on
the same machine, the node started afresh for each.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

from node.synthetic.dicom import Patient, write_axial_series
from node.synthetic.phantom import Phantom

OUTPUTS = 3  # SEG, SR, GSPS per series at the destination (the default routes)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Destination:
    """A storage SCP recording when each study's objects arrive."""

    def __init__(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.sop_class import (
            Comprehensive3DSRStorage,
            GrayscaleSoftcopyPresentationStateStorage,
            ParametricMapStorage,
            SegmentationStorage,
        )

        self.port = _port()
        self.arrivals: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        for uid in (SegmentationStorage, Comprehensive3DSRStorage, GrayscaleSoftcopyPresentationStateStorage, ParametricMapStorage):  # fmt: skip
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)

        def on_store(event):
            with self._lock:
                self.arrivals.setdefault(str(event.dataset.StudyInstanceUID), []).append(time.monotonic())
            return 0x0000

        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )

    def complete(self, study_uid: str) -> float | None:
        with self._lock:
            got = self.arrivals.get(study_uid, [])
            return max(got) if len(got) >= OUTPUTS else None

    def stop(self) -> None:
        self._server.shutdown()


def _send(files: list[Path], port: int, calling_ae: str) -> None:
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    if not assoc.is_established:
        raise RuntimeError(f"the node refused the association on port {port}")
    try:
        for f in files:
            status = assoc.send_c_store(dcmread(f))
            if not status or status.Status != 0:
                raise RuntimeError(f"C-STORE of {f.name} answered {status}")
    finally:
        assoc.release()


def run(workers: int, studies: list, folder: Path, queue_url: str | None, stable_age_s: int) -> dict:
    """One node with ``workers`` worker processes, the studies sent by two senders at once."""
    dest = _Destination()
    cfg = {
        "ae_title": "PACSNODE", "dicom_port": _port(), "http_port": _port(), "metrics_port": _port(),
        "data_dir": str(folder / "data"), "stable_age_s": stable_age_s, "runtime": "onnxruntime",
        "destinations": [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": dest.port, "ae_title": "PACS"}],
        "priors": {"enabled": False}, "worker": {"processes": workers, "poll_s": 0.2},
        "disk": {"refuse_above_percent": 99.9, "resume_below_percent": 99.8},
    }  # fmt: skip
    if queue_url:
        cfg["queue_url"] = queue_url
    (folder / "node.yaml").write_text(yaml.safe_dump(cfg))
    log = open(folder / "serve.log", "ab")  # noqa: SIM115
    node = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(folder / "node.yaml")], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait(lambda: _ready(cfg["metrics_port"], node), 180, "the node to start")
        sent: dict[str, float] = {}

        def sender(part: list, ae: str) -> None:
            for s in part:
                _send(sorted(s.files), cfg["dicom_port"], ae)
                sent[s.study_uid] = time.monotonic()

        t0 = time.monotonic()
        senders = [threading.Thread(target=sender, args=(studies[k::2], f"CT{k + 1}")) for k in range(2)]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        received_s = time.monotonic() - t0
        _wait(lambda: all(dest.complete(s.study_uid) for s in studies), 1800, "every study's outputs")
        wall = max(dest.complete(s.study_uid) for s in studies) - t0
    finally:
        node.terminate()
        node.wait(60)
        log.close()
        dest.stop()
    latency = np.array([dest.complete(s.study_uid) - sent[s.study_uid] for s in studies])
    return {
        "workers": workers,
        "series": len(studies),
        "p50_s": round(float(np.percentile(latency, 50)), 1),
        "p95_s": round(float(np.percentile(latency, 95)), 1),
        "max_s": round(float(latency.max()), 1),
        "series_per_min": round(60 * len(studies) / wall, 1),
        # what the one receiver took in from the two senders (C-STORE acknowledged), beside the workers
        "instances_per_s_received": round(sum(len(s.files) for s in studies) / received_s, 1),
    }


def _ready(port: int, node: subprocess.Popen) -> bool:
    if node.poll() is not None:
        raise RuntimeError(f"pacs-node serve exited {node.returncode} (see its serve.log)")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _wait(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def bench_latency(
    workers: list[int], n: int, slices: int, size: int, queue_url: str | None, output: Path | None,
    stable_age_s: int = 2,
) -> int:  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory(prefix="pacs-node-latency-") as tmp:
        root = Path(tmp)
        for w in workers:
            # studies of their own for each run (the node dedupes what it has seen)
            studies = [
                write_axial_series(
                    Phantom.random(10_000 * w + i, n_lesions=1), root / f"w{w}" / f"ct{i}", modality="CT",
                    shape=(slices, size, size), pixel_spacing=360 / size, slice_spacing=5.0, seed=10_000 * w + i,
                    patient=Patient(name=f"BENCH^{i}", id=f"BENCH{i}"),
                )
                for i in range(n)
            ]  # fmt: skip
            if queue_url:
                from node.tools.queue_bench import empty

                empty(queue_url)
            result = run(w, studies, root / f"w{w}", queue_url, stable_age_s)
            results.append(result)
            print(
                f"{w} worker(s), {n} series of {slices}x{size}x{size}: latency p50 {result['p50_s']} s, "
                f"p95 {result['p95_s']} s, max {result['max_s']} s; {result['series_per_min']} series/min; "
                f"received {result['instances_per_s_received']} instances/s"
            )
    report = {"stable_age_s": stable_age_s, "queue": "postgresql" if queue_url else "sqlite", "runs": results}
    if output:
        output.write_text(json.dumps(report, indent=2))
    return 0
