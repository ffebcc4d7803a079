"""Beyond one machine (issue 18): the node on a queue in PostgreSQL, with a real server from Debian's
packages started by the test, a real Orthanc and DCMTK's storescu.

What runs here: ``pacs-node serve`` with ``queue_url``: the plugin inside Orthanc (Debian's
``python3-psycopg``) queues the job in PostgreSQL, the worker leases it there, delivers exactly
once, and a PostgreSQL restart mid-stream loses nothing; and ``--role ingest`` with two ``--role
worker`` hosts on one queue; two receivers on one Orthanc index in PostgreSQL. Not yet here:
the fault tests under load, KServe (see the README's "Scaling out").
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from orthanc_fixture import Node, free_port, orthanc_missing, wait_for

from node.service.queue import JobQueue
from node.synthetic.dicom import write_axial_series
from node.synthetic.phantom import Phantom

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(orthanc_missing()), reason=orthanc_missing() or "ok")]


def _plugin_has_psycopg() -> bool:
    import subprocess

    return subprocess.run(["/usr/bin/python3", "-c", "import psycopg"], capture_output=True).returncode == 0


def _cts(folder, seed: int, n: int) -> list:
    """``n`` small CT phantoms (one lesion each), written under ``folder``."""
    return [
        write_axial_series(
            Phantom.random(seed + k, n_lesions=1), folder / f"ct{k}", shape=(12, 64, 64),
            pixel_spacing=5.0, slice_spacing=15.0, seed=seed + k,
        )
        for k in range(n)
    ]  # fmt: skip


def _host(tmp_path, name: str, pacs, queue: str, role: str | None = None, http: int | None = None, **extra) -> Node:
    """One host of the cluster: ``pacs-node serve`` on the queue ``queue``, delivering to ``pacs``;
    ``role`` its ``--role``, ``http`` Orthanc's port (a worker host's: the receiver's), ``extra``
    keys over the defaults."""
    config = {
        "ae_title": "PACSNODE",
        "dicom_port": free_port(),
        "http_port": http or free_port(),
        "metrics_port": free_port(),
        "data_dir": str(tmp_path / name / "data"),
        "queue_url": queue,
        "stable_age_s": 1,
        "worker": {"poll_s": 0.2},
        # the PACS answers from the test's own process, which shares two cores with several workers
        # and Orthancs: a response late by more than the default 30 s would be taken for lost, and the
        # object sent again (a real PACS replaces it by its UID; this one counts it twice)
        "destinations": [
            {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.port, "ae_title": "PACS", "timeout_s": 120}
        ],
        **extra,
    }
    return Node(tmp_path / name, config, args=("--role", role) if role else ())


def test_node_on_a_postgresql_queue_processes_and_delivers_once(postgres, pacs, tmp_path) -> None:
    if not _plugin_has_psycopg():
        pytest.skip("Orthanc's Python has no psycopg (Debian python3-psycopg)")
    url = postgres.database()
    node = _host(tmp_path, "node", pacs, url)
    cts = _cts(tmp_path, seed=60, n=2)
    try:
        node.start()
        node.store_scu(list(cts[0].files))
        first = node.wait_job(cts[0].series_uid, ("done",), timeout=120)
        postgres.restart()  # under a running node: plugin and worker reconnect
        node.store_scu(list(cts[1].files))
        node.wait_job(cts[1].series_uid, ("done",), timeout=120)
    finally:
        node.stop()
    assert not (tmp_path / "node" / "data" / "queue.sqlite").exists()  # the queue is in PostgreSQL
    jobs = JobQueue(url).jobs.recent()
    assert sorted(j.state for j in jobs) == ["done", "done"]
    for ct in cts:
        wait_for(lambda ct=ct: len(pacs.of_study(ct.study_uid)) >= 3, 30, "deliveries at the PACS")
        assert sorted(pacs.counts(ct.study_uid).values()) == [1, 1, 1]  # seg, sr, gsps: each once
    assert first["outputs"] and {o["kind"] for o in first["outputs"]} >= {"seg", "sr", "gsps"}


@pytest.mark.parametrize("index", ["sqlite", "postgresql"])
def test_a_series_stable_while_postgresql_is_down_is_queued_once_it_is_back(postgres, pacs, tmp_path, index) -> None:
    """The series' only stable event comes while the queue's database is down: the plugin tries
    again (1, 2, 4 ... s) until PostgreSQL answers; the series is processed and delivered once.
    With Orthanc's index in that database too, Orthanc cannot log the event and never passes it on:
    the plugin's periodic pick-up finds the series in the change log once the database is back."""
    if not _plugin_has_psycopg():
        pytest.skip("Orthanc's Python has no psycopg (Debian python3-psycopg)")
    shared = _shared_index(postgres, tmp_path) if index == "postgresql" else {"stable_age_s": 3}
    node = _host(tmp_path, "node", pacs, postgres.database(), **shared)
    # the PACS is the session's: a study of its own
    ct = _cts(tmp_path, seed=130 if index == "sqlite" else 131, n=1)[0]
    orthanc_log = tmp_path / "node" / "data" / "orthanc.log"
    met = "queue unreachable" if index == "sqlite" else "Cannot log a change about a stable resource"
    try:
        node.start()
        node.store_scu(list(ct.files))
        postgres.stop()  # before the series is stable
        try:
            wait_for(lambda: met in orthanc_log.read_text(), 30, "the stable event to meet the database down")
            time.sleep(3)  # a retry or two fail too
        finally:
            postgres.resume()
        job = node.wait_job(ct.series_uid, ("done",), timeout=120)
    finally:
        node.stop()
    assert job["attempts"] == 1 and len(JobQueue(node.config["queue_url"]).jobs.recent()) == 1
    wait_for(lambda: len(pacs.of_study(ct.study_uid)) >= 3, 30, "deliveries at the PACS")
    assert sorted(pacs.counts(ct.study_uid).values()) == [1, 1, 1]


def test_ingest_and_worker_roles_share_one_queue(postgres, pacs, tmp_path) -> None:
    """`serve --role ingest` (Orthanc and plugin, no worker) and two `serve --role worker` (no
    Orthanc: they lease from the PostgreSQL queue and work through the ingest host's Orthanc):
    every series processed once, by a worker host, every output delivered once."""
    if not _plugin_has_psycopg():
        pytest.skip("Orthanc's Python has no psycopg (Debian python3-psycopg)")
    url, http = postgres.database(), free_port()  # workers: the ingest host's Orthanc (here the same machine)
    ingest = _host(tmp_path, "ingest", pacs, url, "ingest", http)
    workers = [_host(tmp_path, f"worker{k}", pacs, url, "worker", http) for k in range(2)]
    cts = _cts(tmp_path, seed=70, n=3)
    try:
        ingest.start(wait_worker=False)
        for w in workers:
            w.start()
        for ct in cts:
            ingest.store_scu(list(ct.files))
        done = [ingest.wait_job(ct.series_uid, ("done",), timeout=180) for ct in cts]
    finally:
        for n in (*workers, ingest):
            n.stop()
    assert not re.search(r"worker \S+ ready", ingest.log.read_text())  # the ingest host infers nothing
    owners = {m for w in workers for m in re.findall(r"worker (\S+) ready", w.log.read_text())}
    assert len(owners) == 2
    for job in done:
        leased = [h["detail"] for h in job["history"] if h["event"] == "leased"]
        assert len(leased) == 1 and leased[0].split(" by ")[1] in owners, leased
    for ct in cts:
        wait_for(lambda ct=ct: len(pacs.of_study(ct.study_uid)) >= 3, 30, "deliveries at the PACS")
        assert sorted(pacs.counts(ct.study_uid).values()) == [1, 1, 1]


def _resent_until_accepted(node: Node, files: list[Path], tries: int = 10) -> None:
    for _ in range(tries - 1):
        try:
            return node.store_scu(files)
        except AssertionError:  # a failure status: nothing was acknowledged
            time.sleep(2)
    node.store_scu(files)


def _shared_index(postgres, tmp_path) -> dict:
    """The config keys of receivers sharing one Orthanc index and one storage folder."""
    if not Path("/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so").exists():
        pytest.skip("Orthanc's PostgreSQL index plugin is not installed (Debian orthanc-postgresql)")
    storage = str(tmp_path / "storage")
    return {"orthanc_index_url": postgres.database(), "storage_dir": storage, "stable_age_s": 3}


def test_two_receivers_on_one_orthanc_index(postgres, pacs, tmp_path) -> None:
    """Two `--role ingest` receivers on one Orthanc index in PostgreSQL (Debian orthanc-postgresql)
    and one shared storage folder, a `--role worker` host, one queue: a series sent to either, or
    split across both, becomes one job, processed and delivered once; either receiver lists the same
    jobs."""
    if not _plugin_has_psycopg():
        pytest.skip("Orthanc's Python has no psycopg (Debian python3-psycopg)")
    queue, shared = postgres.database(), _shared_index(postgres, tmp_path)
    receivers = [_host(tmp_path, f"receiver{k}", pacs, queue, "ingest", **shared) for k in range(2)]
    worker = _host(tmp_path, "worker", pacs, queue, "worker", receivers[0].config["http_port"], **shared)
    cts = _cts(tmp_path, seed=80, n=3)
    try:
        for r in receivers:
            r.start(wait_worker=False)
        worker.start()
        receivers[0].store_scu(list(cts[0].files))
        receivers[1].store_scu(list(cts[1].files))
        files = sorted(cts[2].files)
        receivers[0].store_scu(files[: len(files) // 2])  # one series, half to each receiver
        receivers[1].store_scu(files[len(files) // 2 :])
        for ct in cts:
            receivers[0].wait_job(ct.series_uid, ("done",), timeout=180)
        time.sleep(3)  # a late second submit of the split series would show now
        lists = [sorted((j["id"], j["series_id"], j["state"]) for j in r.jobs()) for r in receivers]
    finally:
        for n in (worker, *receivers):
            n.stop()
    assert lists[0] == lists[1]  # one queue, one index: the same jobs from either receiver
    assert len(lists[0]) == 3 and {state for _, _, state in lists[0]} == {"done"}, lists[0]
    for ct in cts:
        wait_for(lambda ct=ct: len(pacs.of_study(ct.study_uid)) >= 3, 30, "deliveries at the PACS")
        assert sorted(pacs.counts(ct.study_uid).values()) == [1, 1, 1]


def test_several_workers_on_one_host(postgres, pacs, tmp_path) -> None:
    """`worker.processes: 3` (a host with three GPUs, or cores to spare): three worker processes
    lease from one queue; six series sent at once are each processed once, by more than one
    worker, and delivered once; one worker killed mid-job gives its job back at once and is
    restarted while the others go on. One scrape names each worker."""
    import os
    import signal

    if not _plugin_has_psycopg():
        pytest.skip("Orthanc's Python has no psycopg (Debian python3-psycopg)")
    worker = {"poll_s": 0.2, "processes": 3, "lease_s": 60, "heartbeat_s": 1}
    node = _host(tmp_path, "node", pacs, postgres.database(), worker=worker)
    cts = _cts(tmp_path, seed=90, n=6)
    big = write_axial_series(
        Phantom.random(97, n_lesions=1), tmp_path / "big", shape=(64, 128, 128), pixel_spacing=3.0,
        slice_spacing=4.0, seed=97,
    )  # fmt: skip
    try:
        node.start()
        wait_for(lambda: len(re.findall(r"worker \S+ ready", node.log.read_text())) == 3, 60, "3 workers")
        node.store_scu([f for ct in cts for f in ct.files])  # one association: stable together
        done = [node.wait_job(ct.series_uid, ("done",), timeout=180) for ct in cts]
        node.store_scu(list(big.files))
        running = node.wait_job(big.series_uid, ("running",), timeout=60)
        t0 = time.monotonic()
        os.kill(int(running["lease_owner"].rsplit(":", 1)[1]), signal.SIGKILL)
        again = node.wait_job(big.series_uid, ("done",), timeout=120)
        given_back = time.monotonic() - t0
        wait_for(lambda: len(re.findall(r"worker \S+ ready", node.log.read_text())) == 4, 60, "the restart")
        _, metrics = node.get("/metrics")
        _, ready = node.get("/readyz")
    finally:
        node.stop()
    owners = {h["detail"].split(" by ")[1] for job in done for h in job["history"] if h["event"] == "leased"}
    assert len(owners) >= 2, owners  # the series were shared out
    assert all(len([h for h in j["history"] if h["event"] == "leased"]) == 1 for j in done)
    assert again["attempts"] == 2 and given_back < 60  # given back at once, not after the lease
    assert any("worker-" in h["detail"] and "killed by SIGKILL" in h["detail"] for h in again["history"])
    for ct in [*cts, big]:
        wait_for(lambda ct=ct: len(pacs.of_study(ct.study_uid)) >= 3, 30, "deliveries at the PACS")
        assert sorted(pacs.counts(ct.study_uid).values()) == [1, 1, 1]
    for k in (1, 2, 3):
        assert f'pacs_node_worker_up{{worker="{k}"}} 1.0' in metrics
    assert metrics.count("# HELP pacs_node_worker_up ") == 1
    assert re.search(r'pacs_node_component_restarts_total\{component="worker-\d"\} 1\.0', metrics)
    assert '"ready": true' in ready


def test_a_cluster_under_load_loses_and_repeats_nothing_when_a_worker_and_a_receiver_are_killed_and_postgresql_restarts(
    postgres, pacs, tmp_path
) -> None:
    """Two receivers on one Orthanc index, a worker host with three workers, two senders sending 20
    series at once (two of them split across the receivers); a worker is killed -9 mid-job, one
    receiver's Orthanc is killed -9 mid-stream (its serve restarts it; the sender goes on to the
    other receiver), then PostgreSQL (queue and index) restarts. Every series is one job, processed once, every output delivered
    once, and either receiver lists the same jobs."""
    import os
    import signal
    import threading

    if not _plugin_has_psycopg():
        pytest.skip("Orthanc's Python has no psycopg (Debian python3-psycopg)")
    queue, shared = postgres.database(), _shared_index(postgres, tmp_path)
    r0, r1 = (_host(tmp_path, f"receiver{k}", pacs, queue, "ingest", **shared) for k in range(2))
    three = {"poll_s": 0.2, "processes": 3}
    workers = _host(tmp_path, "workers", pacs, queue, "worker", r0.config["http_port"], worker=three, **shared)
    cts = _cts(tmp_path, seed=100, n=20)
    errors: list[BaseException] = []

    def sender(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 (reported by the test below)
                errors.append(e)

        return threading.Thread(target=run)

    def first_sender():
        for ct in cts[:10]:
            r0.store_scu(list(ct.files), calling_ae="CT1")

    def second_sender():
        for ct in cts[10:14]:
            r1.store_scu(list(ct.files), calling_ae="CT2")
        os.kill(r1.orthanc_pid(), signal.SIGKILL)  # acknowledged series may not be stable yet
        for ct in cts[14:18]:  # the modality goes on to the other receiver
            r0.store_scu(list(ct.files), calling_ae="CT2")

    try:
        for r in (r0, r1):
            r.start(wait_worker=False)
        workers.start()
        senders = [sender(first_sender), sender(second_sender)]
        for s in senders:
            s.start()
        # a worker killed -9 mid-job: its serve gives the job back at once, another worker finishes it
        running = wait_for(lambda: [j for j in r0.jobs() if j["state"] == "running"], 120, "a job running")[0]
        os.kill(int(running["lease_owner"].rsplit(":", 1)[1]), signal.SIGKILL)
        for s in senders:
            s.join(300)
        # the queue's and the index's PostgreSQL restarts while series become stable and jobs run:
        # Orthanc cannot log a stable event then, so only the plugin's periodic pick-up finds them
        postgres.restart()
        wait_for(lambda: r1.client.ready(), 60, "the killed receiver back")
        for ct in cts[18:]:  # split: half to each receiver
            files = sorted(ct.files)
            # as a modality does: what a receiver refused (its index reconnecting) is sent again
            _resent_until_accepted(r0, files[: len(files) // 2])
            _resent_until_accepted(r1, files[len(files) // 2 :])
        for ct in cts:
            r0.wait_job(ct.series_uid, ("done",), timeout=300)
        time.sleep(4)  # a late second job of any series would show now
        lists = [sorted((j["id"], j["series_id"], j["state"]) for j in r.jobs()) for r in (r0, r1)]
        killed = r0.job(running["id"])
    finally:
        for n in (workers, r0, r1):
            n.stop()
    assert not errors, errors
    assert "orthanc killed by SIGKILL" in r1.log.read_text()
    assert killed["state"] == "done" and any("killed by SIGKILL" in (h["detail"] or "") for h in killed["history"])
    assert lists[0] == lists[1]
    assert len(lists[0]) == 20 and {state for _, _, state in lists[0]} == {"done"}, lists[0]
    for ct in cts:
        wait_for(lambda ct=ct: len(pacs.of_study(ct.study_uid)) >= 3, 60, "deliveries at the PACS")
        assert sorted(pacs.counts(ct.study_uid).values()) == [1, 1, 1]
