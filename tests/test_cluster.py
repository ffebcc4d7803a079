"""Beyond one machine (issue 18): the node on a queue in PostgreSQL, with a real server from Debian's
packages started by the test, a real Orthanc and DCMTK's storescu.

What runs here: ``pacs-node serve`` with ``queue_url``: the plugin inside Orthanc (Debian's
``python3-psycopg``) queues the job in PostgreSQL, the worker leases it there, delivers exactly
once, and a PostgreSQL restart mid-stream loses nothing. Not yet here: receivers on a shared
Orthanc index, worker-only hosts, KServe (see the README's "scaling out").
"""

from __future__ import annotations

import pytest
from orthanc_fixture import Node, free_port, orthanc_missing, wait_for

from node.service.queue import JobQueue
from node.synthetic.dicom import write_axial_series
from node.synthetic.phantom import Phantom

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(orthanc_missing()), reason=orthanc_missing() or "ok")]


def _plugin_has_psycopg() -> bool:
    import subprocess

    return subprocess.run(["/usr/bin/python3", "-c", "import psycopg"], capture_output=True).returncode == 0


def test_node_on_a_postgresql_queue_processes_and_delivers_once(postgres, pacs, tmp_path) -> None:
    if not _plugin_has_psycopg():
        pytest.skip("Orthanc's Python has no psycopg (Debian python3-psycopg)")
    url = postgres.database()
    node = Node(
        tmp_path / "node",
        {
            "ae_title": "PACSNODE",
            "dicom_port": free_port(),
            "http_port": free_port(),
            "metrics_port": free_port(),
            "data_dir": str(tmp_path / "node" / "data"),
            "queue_url": url,
            "stable_age_s": 1,
            "worker": {"poll_s": 0.2},
            "destinations": [
                {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.port, "ae_title": "PACS"}
            ],
        },
    )
    cts = [
        write_axial_series(
            Phantom.random(60 + k, n_lesions=1), tmp_path / f"ct{k}", shape=(12, 64, 64),
            pixel_spacing=5.0, slice_spacing=15.0, seed=60 + k,
        )
        for k in range(2)
    ]  # fmt: skip
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
