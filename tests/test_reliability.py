"""Nothing acknowledged is lost, tried as an operator would: crashes and restarts of Orthanc and of
``pacs-node serve``, a broken model, a full disk, callers the node must refuse, credentials on disk.

Real parts only: ``pacs-node serve`` (Orthanc + plugin + worker, supervised), storescu as the
modality, a pynetdicom PACS that records every object it receives (so a duplicate shows).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from orthanc_fixture import Node, Pacs, free_port, orthanc_missing, wait_for
from pydicom import dcmread
from test_metrics import value
from test_node_server import phantom

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(orthanc_missing()), reason=orthanc_missing() or "ok")]

FAST_RESTARTS = {"backoff_s": 0.5, "backoff_max_s": 2, "quick_exit_s": 15, "give_up_after": 2}


def node_config(folder: Path, pacs: Pacs | None = None, **extra) -> dict:
    cfg = {
        "ae_title": "PACSNODE",
        "dicom_port": free_port(),
        "http_port": free_port(),
        "metrics_port": free_port(),
        "data_dir": str(folder / "data"),
        "stable_age_s": 2,
        "worker": {"lease_s": 60, "heartbeat_s": 1, "poll_s": 0.2},
        "delivery": {"backoff_s": 0.5, "backoff_max_s": 2},
        "restart": FAST_RESTARTS,
        "priors": {"enabled": False},
    }
    if pacs is not None:
        cfg["destinations"] = [
            {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.port, "ae_title": "PACS"}
        ]
    return cfg | extra


@pytest.fixture(scope="module")
def node(tmp_path_factory, pacs: Pacs) -> Node:
    folder = tmp_path_factory.mktemp("node")
    n = Node(folder, node_config(folder, pacs))
    n.start()
    yield n
    n.stop()


def delivered_once(pacs: Pacs, study_uid: str, timeout: float = 90) -> None:
    """SEG, SR and GSPS at the PACS, each exactly once (and still once a moment later)."""
    wait_for(lambda: len(pacs.counts(study_uid)) == 3, timeout, "SEG, SR and GSPS at the PACS")
    time.sleep(2)
    counts = pacs.counts(study_uid)
    assert len(counts) == 3 and set(counts.values()) == {1}, counts


def kill_orthanc(node: Node) -> int:
    pid = node.orthanc_pid()
    os.kill(pid, signal.SIGKILL)
    return pid


def orthanc_restarted(node: Node, old_pid: int) -> None:
    wait_for(lambda: node.orthanc_pid() != old_pid and node.client.ready(), 90, "serve to restart Orthanc")


# --- pick-up: a series whose stable event was lost is still processed, once ---------------------
def test_orthanc_killed_within_the_stable_window_loses_nothing(
    node: Node, pacs: Pacs, tmp_path: Path
) -> None:
    ct = phantom(tmp_path, 301, slices=16)
    node.store_scu(ct.files)  # every C-STORE answered Success: the node owes this series a result
    old = kill_orthanc(node)  # before stable_age_s: Orthanc never calls the series stable
    orthanc_restarted(node, old)
    node.wait_job(ct.series_uid, ("done",), timeout=90)
    sid = node.series_id(ct.series_uid)
    orthanc_log = (Path(node.config["data_dir"]) / "orthanc.log").read_text()
    assert f"series {sid} had no job (its stable event was lost)" in orthanc_log
    delivered_once(pacs, ct.study_uid)
    assert len(node.jobs_of(ct.series_uid)) == 1
    assert "orthanc killed by SIGKILL: restarting it" in node.log.read_text()
    assert value(node.get("/metrics")[1], "pacs_node_component_restarts_total", component="orthanc") >= 1


def test_clean_stop_within_the_stable_window_loses_nothing(node: Node, pacs: Pacs, tmp_path: Path) -> None:
    ct = phantom(tmp_path, 302, slices=16)
    node.store_scu(ct.files)
    assert node.stop() == 0  # Ctrl-C / SIGTERM before the series became stable
    node.start()
    node.wait_job(ct.series_uid, ("done",), timeout=90)
    delivered_once(pacs, ct.study_uid)
    node.stop()  # and a restart after it was processed picks nothing up again
    node.start()
    time.sleep(3)
    assert len(node.jobs_of(ct.series_uid)) == 1
    assert len(pacs.counts(ct.study_uid)) == 3 and set(pacs.counts(ct.study_uid).values()) == {1}


def test_orthanc_killed_while_receiving_then_resent(node: Node, pacs: Pacs, tmp_path: Path) -> None:
    ct = phantom(tmp_path, 303, slices=160)
    sender = subprocess.Popen(
        ["storescu", "-aet", "MODALITY", "-aec", "PACSNODE", "127.0.0.1", str(node.config["dicom_port"])]
        + [str(f) for f in ct.files],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: node.series_id(ct.series_uid), 30, "the first instances in Orthanc", interval=0.05)
    old = kill_orthanc(node)
    sender.wait(60)
    orthanc_restarted(node, old)
    node.store_scu(ct.files)  # the modality resends what was not acknowledged (here: everything)

    def complete():
        jobs = node.jobs_of(ct.series_uid)
        return jobs and jobs[-1]["state"] == "done" and jobs[-1]["instances"] == 160

    wait_for(complete, 120, "a job over all 160 instances, done")
    # the PACS holds each object once (same UIDs replace), and the last SEG covers the whole series
    wait_for(lambda: len(pacs.counts(ct.study_uid)) == 3, 60, "SEG, SR and GSPS at the PACS")
    time.sleep(2)
    assert len(pacs.counts(ct.study_uid)) == 3
    seg = dcmread([r for r in pacs.of_study(ct.study_uid) if r.sop_class.endswith("66.4")][-1].path)
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 160


def test_dead_workers_job_is_given_back_at_once(node: Node, pacs: Pacs, tmp_path: Path) -> None:
    ct = phantom(tmp_path, 304, slices=64, size=128)  # big enough to be caught running
    node.store_scu(ct.files)
    running = node.wait_job(ct.series_uid, ("running",), timeout=30)
    pid = int(running["lease_owner"].rsplit(":", 1)[1])
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    job = node.wait_job(ct.series_uid, ("done",), timeout=90)
    assert time.monotonic() - t0 < node.config["worker"]["lease_s"]  # not after the 60 s lease
    assert job["attempts"] == 2
    released = [h for h in job["history"] if h["event"] == "released"]
    assert released and "worker killed by SIGKILL" in released[0]["detail"]
    delivered_once(pacs, ct.study_uid)


# --- a broken model: the receiver stays up, the reason is told, restarts stop ---------------------
def test_broken_model_keeps_the_receiver_up_and_says_why(tmp_path: Path, pacs: Pacs) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.yaml").write_text("name: broken\nversion: [1\n")
    n = Node(tmp_path / "node", node_config(tmp_path / "node", pacs, model=str(model)))
    n.start(wait_worker=False)
    try:
        ct = phantom(tmp_path, 305, slices=16)
        n.store_scu(ct.files)  # accepted and queued while no worker can run
        n.wait_job(ct.series_uid, ("queued",), timeout=30)

        def gave_up():
            code, body = n.get("/readyz")
            return code == 503 and "not restarted after dying at once 2 times" in body and body

        why = json.loads(wait_for(gave_up, 60, "serve to stop restarting the worker"))["checks"]["worker"]
        assert "model.yaml: line 3: not valid YAML" in why and "\n" not in why
        metrics = n.get("/metrics")[1]
        assert value(metrics, "pacs_node_component_gave_up", component="worker") == 1
        assert value(metrics, "pacs_node_component_up", component="orthanc") == 1
        assert value(metrics, "pacs_node_queue_depth") == 1
        assert n.proc.poll() is None  # serve itself stays up
        # the operator fixes the model and restarts the node: the queued series is processed
        shutil.rmtree(model)
        shutil.copytree(Path(__file__).resolve().parent.parent / "models" / "phantom-fm", model)
        assert n.stop() == 0
        n.start()
        n.wait_job(ct.series_uid, ("done",), timeout=90)
        delivered_once(pacs, ct.study_uid)
        assert n.get("/readyz")[0] == 200
    finally:
        n.stop()


# --- a full disk: refused with a status above the watermark, accepted again below ------------------
@pytest.fixture
def small_disk(tmp_path: Path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip()[:80]})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_to(folder: Path, percent: float) -> Path:
    """A ballast file that brings the file system to ``percent`` used."""
    usage = shutil.disk_usage(folder)
    need = int(usage.total * percent / 100) - (usage.total - usage.free)
    ballast = folder / "ballast"
    with open(ballast, "ab") as f:
        f.write(b"\0" * max(0, need))
    return ballast


def test_disk_above_the_watermark_refuses_with_a_status_and_resumes(
    small_disk: Path, pacs: Pacs, tmp_path: Path
) -> None:
    from pynetdicom import AE

    folder = small_disk / "node"
    cfg = node_config(folder, pacs, disk={"refuse_above_percent": 60, "resume_below_percent": 40})
    n = Node(tmp_path / "node", cfg)
    n.start()
    try:
        first = phantom(tmp_path, 306, slices=16)
        n.store_scu(first.files)
        n.wait_job(first.series_uid, ("queued", "running", "delivering", "done"), timeout=30)
        ballast = fill_to(small_disk, 75)

        second = phantom(tmp_path, 307, slices=4)
        ds = dcmread(second.files[0])
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ds.SOPClassUID)
        assoc = ae.associate("127.0.0.1", cfg["dicom_port"], ae_title="PACSNODE")
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == 0xA700  # Refused: Out of Resources
        ready = n.get("/readyz")
        assert ready[0] == 503 and "refusing new instances" in ready[1] and "high watermark 60%" in ready[1]
        assert value(n.get("/metrics")[1], "pacs_node_intake_accepting") == 0
        # what was acknowledged before goes on: processed and delivered
        n.wait_job(first.series_uid, ("done",), timeout=90)
        delivered_once(pacs, first.study_uid)
        assert n.proc.poll() is None

        # the disk quite full: the queue cannot be written; nothing crashes, nothing restarts
        with open(ballast, "ab", buffering=0) as f:  # to the last block (unbuffered: nothing left to flush)
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        time.sleep(4)  # a few worker polls and scrapes on a full disk
        metrics = n.get("/metrics")[1]
        assert n.proc.poll() is None and n.get("/healthz")[0] == 200
        assert value(metrics, "pacs_node_component_up", component="worker") == 1
        assert value(metrics, "pacs_node_component_restarts_total", component="worker") == 0
        assert value(metrics, "pacs_node_component_restarts_total", component="orthanc") == 0

        ballast.unlink()  # below the low watermark: accepted again
        n.store_scu(second.files)
        n.wait_job(second.series_uid, ("done",), timeout=90)
        assert n.get("/readyz")[0] == 200
        assert value(n.get("/metrics")[1], "pacs_node_intake_accepting") == 1
    finally:
        n.stop()


# --- association checks and credentials ------------------------------------------------------------
def test_foreign_callers_are_rejected_and_credentials_stay_private(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PACS_NODE_TEST_PW", "s3cret-from-env")
    cfg = node_config(
        tmp_path / "node",
        allowed_aes=["MODALITY"],
        http_users={"ops": "${env:PACS_NODE_TEST_PW}"},
    )
    n = Node(tmp_path / "node", cfg, auth=("ops", "s3cret-from-env"))
    try:
        n.start()

        # DCMTK's echoscu as the modality: it prints the A-ASSOCIATE-RJ's reason. (pynetdicom's
        # requestor may miss a reject on a loaded machine: the peer closes the socket right after it,
        # and pynetdicom then reports an abort.)
        def echo(calling: str, called: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                ["echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(cfg["dicom_port"])],
                capture_output=True,
                text=True,
                timeout=60,
            )

        stranger = echo("STRANGER", "PACSNODE")
        assert stranger.returncode != 0 and "Calling AE Title Not Recognized" in stranger.stderr, stranger
        wrong_called = echo("MODALITY", "WRONGAE")
        assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in wrong_called.stderr, (
            wrong_called
        )
        known = echo("MODALITY", "PACSNODE")
        assert known.returncode == 0, known

        data = Path(cfg["data_dir"])
        assert data.stat().st_mode & 0o777 == 0o700
        orthanc_json = data / "orthanc.json"
        assert orthanc_json.stat().st_mode & 0o777 == 0o600
        assert "s3cret-from-env" not in orthanc_json.read_text()  # a reference, resolved by Orthanc
        assert n.client.ready()
    finally:
        n.stop()
