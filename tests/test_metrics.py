"""The worker's /metrics, /healthz and /readyz: names, labels, values, and no patient data in them.

The unit tests use a queue file and an in-process server; the integration test runs a phantom with a
known patient name/ID/accession through a real node (Orthanc + plugin + worker) and reads /metrics.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from orthanc_fixture import Node, Pacs, free_port, orthanc_missing, wait_for
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.uid import generate_uid
from test_deploy import ORTHANC_METRICS_USED

from node.service.metrics import (
    ComponentStatus,
    MetricsServer,
    ModelInfo,
    NodeMetrics,
    SupervisorMetrics,
    exported_names,
)
from node.service.queue import JobQueue, Output, Route
from node.synthetic.dicom import Patient, write_axial_series
from node.synthetic.phantom import Phantom

SECRETS = Patient(name="SECRET^METRICS^PATIENT", id="SECRETPID4711", accession="SECRETACC4711")


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# --- unit: the queue is the source of the job and delivery counters ------------------------------
def test_queue_counters_and_gauges(tmp_path: Path) -> None:
    clock = [1000.0]
    q = JobQueue(tmp_path / "q.sqlite", clock=lambda: clock[0])
    j = q.intake.accept("s1", "a", "CT", modality="CT", instances=3).job_id
    q.intake.skip("s0", "z", "CR", "no_routing_rule_matched")
    q.jobs.submit("s1", modality="CT", instances=3, fingerprint="a")  # the same: deduplicated
    q.jobs.submit("s2", modality="MR", instances=3, fingerprint="b")
    job = q.jobs.lease("w", 60)
    assert job.id == j
    q.jobs.complete(
        j,
        "w",
        [Output("seg", "1.2", "o1"), Output("sr", "1.3", "o2")],
        [Route("pacs", "seg"), Route("pacs", "sr")],
    )
    d1, d2 = q.outbox.due()
    q.outbox.delivered(d1.id)
    q.outbox.failed(d2.id, "down", 1, 10, 5)
    clock[0] = 1030.0

    m = NodeMetrics(tmp_path / "q.sqlite", ["pacs", "archive"], clock=lambda: clock[0])
    m.set_model(ModelInfo("phantom-fm", "1.0", "onnxruntime-cpu", "cpu", "fp32"))
    m.observe_stages({"load": 0.1, "inference": 0.5})
    m.observe_job("processed", 1.2)
    text = m.exposition().decode()
    assert value(text, "pacs_node_series_received_total", modality="CT") == 1
    assert value(text, "pacs_node_jobs_total", outcome="skipped", rule="no_routing_rule_matched") == 1
    assert value(text, "pacs_node_jobs_total", outcome="queued", rule="") == 2
    assert value(text, "pacs_node_jobs_total", outcome="deduplicated", rule="") == 1
    assert value(text, "pacs_node_jobs_total", outcome="running", rule="") == 1
    assert value(text, "pacs_node_jobs_total", outcome="failed", rule="") == 0  # always exported
    assert value(text, "pacs_node_queue_depth") == 1
    assert value(text, "pacs_node_queue_oldest_job_age_seconds") == pytest.approx(30.0)
    assert value(text, "pacs_node_jobs_in_state", state="delivering") == 1
    assert value(text, "pacs_node_deliveries_total", destination="pacs", outcome="delivered") == 1
    assert value(text, "pacs_node_deliveries_total", destination="pacs", outcome="error") == 1
    assert value(text, "pacs_node_delivery_retries_total", destination="pacs") == 1
    assert value(text, "pacs_node_deliveries_pending", destination="pacs") == 1
    assert value(text, "pacs_node_deliveries_pending", destination="archive") == 0  # configured, idle
    assert value(text, "pacs_node_delivery_oldest_pending_age_seconds", destination="pacs") == pytest.approx(
        30.0
    )
    assert value(text, "pacs_node_worker_up") == 1
    info = dict(model="phantom-fm", version="1.0", runtime="onnxruntime-cpu", device="cpu", precision="fp32")
    assert value(text, "pacs_node_model_info", **info) == 1
    stage = dict(stage="inference", model="phantom-fm", runtime="onnxruntime-cpu")
    assert value(text, "pacs_node_stage_duration_seconds_count", **stage) == 1
    assert value(text, "pacs_node_stage_duration_seconds_sum", **stage) == pytest.approx(0.5)
    # every exported sample is one the catalogue announces (what the dashboard test checks against)
    names = exported_names(m.registry)
    assert {n for n, _ in samples(text)} <= names
    assert {"pacs_node_gpu_memory_used_bytes", "pacs_node_gpu_utilization_ratio"} <= names


def test_supervisor_metrics_add_processes_disk_intake_and_the_workers(tmp_path: Path) -> None:
    worker = NodeMetrics()
    worker_port = free_port()
    server = MetricsServer("127.0.0.1", worker_port, worker, {}).start()
    status = [
        ComponentStatus("orthanc", True, 1, False, None),
        ComponentStatus(
            "worker", False, 5, True, "not restarted after dying at once 5 times: exited (code 2)"
        ),
    ]
    intake = {"accepting": False, "reason": "disk 93% full"}
    m = SupervisorMetrics(tmp_path / "q.sqlite", ["pacs"], lambda: status, lambda: intake, tmp_path, [])
    try:
        m.worker_urls = [f"http://127.0.0.1:{worker_port}"]
        text = m.exposition().decode()
    finally:
        server.stop()
    assert value(text, "pacs_node_component_up", component="worker") == 0
    assert value(text, "pacs_node_component_gave_up", component="worker") == 1
    assert value(text, "pacs_node_component_restarts_total", component="orthanc") == 1
    assert value(text, "pacs_node_worker_restarts_total") == 5
    assert value(text, "pacs_node_intake_accepting") == 0
    assert 0 < value(text, "pacs_node_disk_used_ratio") <= 1
    assert value(text, "pacs_node_queue_depth") == 0  # the queue's families come from the supervisor
    assert value(text, "pacs_node_worker_up") == 1  # and the worker's from its own endpoint
    m.worker_urls = ["http://127.0.0.1:9"]  # the worker is down: the supervisor's families still answer
    assert value(m.exposition().decode(), "pacs_node_component_up", component="orthanc") == 1


def test_several_workers_are_one_scrape_each_sample_naming_its_worker(tmp_path: Path) -> None:
    workers, servers = [NodeMetrics(), NodeMetrics()], []
    workers[0].set_model(ModelInfo("phantom-fm", "1.0", "onnxruntime-cpu", "cpu", "fp32"))
    workers[1].observe_stage("inference", 0.5)
    try:
        for w in workers:
            servers.append(MetricsServer("127.0.0.1", free_port(), w, {}).start())
        urls = [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
        status = [ComponentStatus("worker-1", True, 2, False, None), ComponentStatus("worker-2", True, 1, False, None)]
        m = SupervisorMetrics(tmp_path / "q.sqlite", [], lambda: status, lambda: None, tmp_path, urls + ["http://127.0.0.1:9"])
        text = m.exposition().decode()
    finally:
        for s in servers:
            s.stop()
    assert value(text, "pacs_node_worker_up", worker="1") == 1
    assert value(text, "pacs_node_worker_up", worker="2") == 1
    assert not [k for k in samples(text) if ("worker", "3") in k[1]]  # the third is down: nothing of it
    assert value(text, "pacs_node_model_info", worker="1", model="phantom-fm", version="1.0",
                 runtime="onnxruntime-cpu", device="cpu", precision="fp32") == 1  # fmt: skip
    assert value(text, "pacs_node_stage_duration_seconds_count", worker="2", stage="inference", model="", runtime="") == 1
    assert text.count("# HELP pacs_node_worker_up ") == 1  # each family once: a valid exposition
    assert value(text, "pacs_node_worker_restarts_total") == 3  # the host's workers together


def test_health_endpoints_say_what_is_wrong(tmp_path: Path) -> None:
    m = NodeMetrics(tmp_path / "q.sqlite")
    state = {"model": False}
    checks = {
        "orthanc": lambda: "Orthanc at http://127.0.0.1:1 not reachable",
        "model": lambda: None if state["model"] else "model phantom-fm not loaded (yet)",
        "queue": m.queue_collector.queue.writable,
    }
    port = free_port()
    server = MetricsServer("127.0.0.1", port, m, checks).start()
    try:
        code, body = get(f"http://127.0.0.1:{port}/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok"
        code, body = get(f"http://127.0.0.1:{port}/readyz")
        ready = json.loads(body)
        assert code == 503 and ready["ready"] is False
        assert ready["checks"]["queue"] == "ok"
        assert ready["checks"]["orthanc"].startswith("Orthanc at")
        assert "model: model phantom-fm not loaded (yet)" in ready["problems"]
        checks["orthanc"] = lambda: None
        state["model"] = True
        code, body = get(f"http://127.0.0.1:{port}/readyz")
        assert code == 200 and json.loads(body) == {
            "ready": True,
            "checks": {"orthanc": "ok", "model": "ok", "queue": "ok"},
            "problems": [],
        }
        code, body = get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200 and value(body.decode(), "pacs_node_worker_ready") == 1
        assert get(f"http://127.0.0.1:{port}/nope")[0] == 404
    finally:
        server.stop()


# --- integration: a real node ---------------------------------------------------------------------
needs_orthanc = pytest.mark.skipif(bool(orthanc_missing()), reason=orthanc_missing() or "ok")


@pytest.fixture(scope="module")
def metrics_node(tmp_path_factory) -> tuple[Node, Pacs]:
    pacs = Pacs(free_port(), tmp_path_factory.mktemp("mpacs"))
    pacs.start()
    folder = tmp_path_factory.mktemp("mnode")
    n = Node(
        folder,
        {
            "ae_title": "PACSNODE",
            "dicom_port": free_port(),
            "http_port": free_port(),
            "metrics_port": free_port(),
            "data_dir": str(folder / "data"),
            "stable_age_s": 1,
            "destinations": [
                {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.port, "ae_title": "PACS"}
            ],
            "worker": {"poll_s": 0.2},
            "delivery": {"backoff_s": 0.5, "backoff_max_s": 2},
        },
    )
    n.start()
    yield n, pacs
    n.stop()
    pacs.stop()


@pytest.mark.slow
@needs_orthanc
def test_node_metrics_have_no_patient_data(metrics_node, tmp_path: Path) -> None:
    node, pacs = metrics_node
    base = f"http://127.0.0.1:{node.config['metrics_port']}"
    ct = write_axial_series(
        Phantom.random(4711, n_lesions=1),
        tmp_path / "ct",
        shape=(16, 96, 96),
        pixel_spacing=4.0,
        slice_spacing=15.0,
        seed=4711,
        patient=SECRETS,
    )
    # and a series the routing rules skip (CR), from the same patient
    cr_uid = generate_uid()
    cr_files = []
    for i, f in enumerate(ct.files[:2]):
        ds = dcmread(f)
        ds.Modality, ds.SeriesInstanceUID, ds.SOPInstanceUID = "CR", cr_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(tmp_path / f"cr{i}.dcm")
        cr_files.append(tmp_path / f"cr{i}.dcm")
    node.store_scu(ct.files + cr_files)
    wait_for(lambda: len(pacs.counts(ct.study_uid)) == 3, 90, "SEG, SR and GSPS at the PACS")
    node.wait_job(ct.series_uid, ("done",), timeout=30)
    node.wait_stable(cr_uid)

    code, body = get(f"{base}/metrics")
    assert code == 200
    text = body.decode()
    for secret in (SECRETS.name, SECRETS.id, SECRETS.accession, "SECRET"):
        assert secret not in text
    # nor a DICOM UID of the study or series (identifying too)
    for uid in (ct.study_uid, ct.series_uid, cr_uid):
        assert uid not in text

    assert value(text, "pacs_node_jobs_total", outcome="done", rule="") >= 1
    assert value(text, "pacs_node_jobs_total", outcome="skipped", rule="no_routing_rule_matched") >= 1
    assert value(text, "pacs_node_series_received_total", modality="CT") >= 1
    assert value(text, "pacs_node_series_received_total", modality="CR") >= 1
    assert value(text, "pacs_node_deliveries_total", destination="pacs", outcome="delivered") >= 3
    assert value(text, "pacs_node_queue_depth") == 0
    assert value(text, "pacs_node_worker_up") == 1
    assert value(text, "pacs_node_worker_restarts_total") == 0
    info = [k for k in samples(text) if k[0] == "pacs_node_model_info"]
    assert len(info) == 1 and dict(info[0][1])["model"] == "phantom-fm"
    model, runtime = dict(info[0][1])["model"], dict(info[0][1])["runtime"]
    stages = {
        dict(labels)["stage"]
        for (name, labels) in samples(text)
        if name == "pacs_node_stage_duration_seconds_count"
        and dict(labels)["model"] == model
        and dict(labels)["runtime"] == runtime
    }
    assert {"fetch", "load", "preprocess", "inference", "encode_seg", "encode_sr", "encode_gsps"} <= stages
    assert {"store", "deliver"} <= stages
    assert {"backbone", "head_organs", "head_lesions", "head_lesion_presence"} <= stages  # inference's parts
    assert (
        value(text, "pacs_node_job_duration_seconds_count", model=model, runtime=runtime, outcome="processed")
        >= 1
    )

    code, body = get(f"{base}/readyz")
    assert code == 200, body
    assert json.loads(body)["ready"] is True
    assert get(f"{base}/healthz")[0] == 200

    # Orthanc's own Prometheus endpoint, which compose scrapes too, answers with what the dashboard uses
    orthanc_text = node.client._request("GET", "/tools/metrics-prometheus").text
    orthanc_names = {ln.split()[0].split("{")[0] for ln in orthanc_text.splitlines() if ln and ln[0] != "#"}
    assert orthanc_names >= ORTHANC_METRICS_USED, ORTHANC_METRICS_USED - orthanc_names
    assert SECRETS.id not in orthanc_text
