"""Unit tests of the node's config and durable job queue (no Orthanc needed)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from node.analysis.urgency import Urgency
from node.config import ConfigError, load_config, parse_config
from node.service.queue import JobQueue, Output, Route


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path: Path) -> str:
    """Where the queue lives: the embedded SQLite file, or a fresh database on a real PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "queue.sqlite")
    return request.getfixturevalue("postgres").database()


@pytest.fixture
def q(location: str, clock: Clock) -> JobQueue:
    """The queue semantics tests run against both backends."""
    return JobQueue(location, clock=clock)


OUTS = [Output("seg", "1.2.3.1", "o1"), Output("sr", "1.2.3.2", "o2"), Output("gsps", "1.2.3.3", "o3")]
ROUTES = [Route("pacs", "seg"), Route("pacs", "sr"), Route("pacs", "gsps"), Route("archive", "sr")]


# --- config -------------------------------------------------------------------------------------
def test_config_issue_example(tmp_path: Path) -> None:
    p = tmp_path / "node.yaml"
    p.write_text(
        """
ae_title: PACSNODE
dicom_port: 4242
http_port: 8042
metrics_port: 9464
data_dir: ./data
destinations:
  - {name: pacs, kind: dicom, host: 127.0.0.1, port: 11112, ae_title: PACS}
  - {name: archive, kind: dicomweb, url: http://127.0.0.1:8080/dicom-web}
"""
    )
    cfg = load_config(p)
    assert cfg.data_dir == (tmp_path / "data").resolve()
    assert [d.kind for d in cfg.destinations] == ["dicom", "dicomweb"]
    assert cfg.destination("pacs").accepts == ["seg", "sr", "gsps"]
    assert not cfg.http_remote_access


def test_config_default() -> None:
    cfg = load_config(None)
    assert cfg.ae_title == "PACSNODE" and cfg.routing[0].modalities == ["CT", "MR"]


@pytest.mark.parametrize(
    "data, key",
    [
        ({"dicom_port": 70000}, "dicom_port:"),
        ({"ae_title": "THIS-AE-TITLE-IS-TOO-LONG"}, "ae_title:"),
        (
            {"destinations": [{"name": "p", "kind": "dicom", "host": "h", "port": "x", "ae_title": "A"}]},
            "destinations[0].port:",
        ),
        ({"destinations": [{"name": "p", "kind": "ftp"}]}, "destinations[0].kind:"),
        ({"destinations": [{"name": "a", "kind": "dicomweb", "url": "ftp://x"}]}, "destinations[0].url:"),
        (
            {"destinations": [{"name": "a", "kind": "dicomweb", "url": "http://x", "accepts": ["pdf"]}]},
            "destinations[0].accepts[0]:",
        ),
        ({"http_porrt": 1}, "http_porrt: unknown key"),
        ({"http_remote_access": True}, "http_users:"),
    ],
)
def test_config_errors_name_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_config_bad_yaml(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("ae_title: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


# --- queue ----------------------------------------------------------------------------------------
def test_submit_lease_complete_deliver(q: JobQueue) -> None:
    s = q.jobs.submit("ser1", modality="CT", instances=24, fingerprint="f1")
    assert s.job_id == 1
    job = q.jobs.lease("w1", 10)
    assert job and job.id == 1 and job.state == "running" and job.attempts == 1
    assert q.jobs.lease("w2", 10) is None
    assert q.jobs.complete(1, "w1", OUTS, ROUTES) == "delivering"
    due = q.outbox.due()
    assert {Route(d.destination, d.kind) for d in due} == set(ROUTES)
    for d in due:
        q.outbox.delivered(d.id)
    assert q.jobs.get(1).state == "done"
    assert [h.event for h in q.jobs.history(1)][-1] == "delivered"


def test_resubmit_same_instances_makes_no_job(q: JobQueue) -> None:
    q.jobs.submit("ser1", fingerprint="f1")
    assert q.jobs.submit("ser1", fingerprint="f1").job_id is None
    q.jobs.lease("w", 10)
    q.jobs.complete(1, "w", OUTS, [])
    assert q.jobs.get(1).state == "done"
    assert q.jobs.submit("ser1", fingerprint="f1").job_id is None
    assert len(q.jobs.recent()) == 1


def test_late_instances_supersede(q: JobQueue) -> None:
    q.jobs.submit("ser1", instances=24, fingerprint="f1")
    q.jobs.lease("w", 10)
    q.jobs.complete(1, "w", OUTS, ROUTES)
    s = q.jobs.submit("ser1", instances=25, fingerprint="f2")
    assert s.job_id == 2 and "late instances: 24 -> 25" in s.reason
    old = q.jobs.describe(1)
    assert old["state"] == "superseded" and old["superseded_by"] == 2
    assert {d["state"] for d in old["deliveries"]} == {"cancelled"}
    assert q.jobs.get(2).supersedes == 1
    assert not q.outbox.due()


def test_superseded_while_running_delivers_nothing(q: JobQueue) -> None:
    q.jobs.submit("ser1", instances=24, fingerprint="f1")
    q.jobs.lease("w", 10)
    q.jobs.submit("ser1", instances=25, fingerprint="f2")
    assert q.jobs.complete(1, "w", OUTS, ROUTES) == "superseded"
    assert not q.outbox.due()
    assert q.jobs.lease("w", 10).id == 2


def test_expired_lease_is_taken_again_then_fails(q: JobQueue, clock: Clock) -> None:
    q.jobs.submit("ser1", fingerprint="f1", max_attempts=2)
    assert q.jobs.lease("dead1", 5).attempts == 1
    clock.now += 6
    job = q.jobs.lease("w2", 5)
    assert job.id == 1 and job.attempts == 2 and job.lease_owner == "w2"
    assert not q.jobs.heartbeat(1, "dead1", 5)  # the old owner lost it
    assert q.jobs.complete(1, "dead1", OUTS, ROUTES) == "running"  # and cannot complete it
    clock.now += 6
    assert q.jobs.lease("w3", 5) is None
    j = q.jobs.get(1)
    assert j.state == "failed" and "lease expired" in j.error


def test_fail_retry_and_operator_retry(q: JobQueue) -> None:
    q.jobs.submit("ser1", fingerprint="f1", max_attempts=2)
    q.jobs.lease("w", 10)
    assert q.jobs.fail(1, "w", "orthanc unreachable", retry=True) == "queued"
    q.jobs.lease("w", 10)
    assert q.jobs.fail(1, "w", "series 1.2: no CT or MR image", retry=False) == "failed"
    assert q.jobs.get(1).error == "series 1.2: no CT or MR image"
    q.jobs.submit("ser2", fingerprint="f2")
    with pytest.raises(ValueError, match="only a failed job"):
        q.jobs.retry(2)
    with pytest.raises(KeyError):
        q.jobs.retry(999)
    assert q.jobs.retry(1) == "queued"
    assert q.jobs.lease("w", 10).id == 1


def test_delivery_backoff_and_give_up(q: JobQueue, clock: Clock) -> None:
    q.jobs.submit("ser1", fingerprint="f1")
    q.jobs.lease("w", 10)
    q.jobs.complete(1, "w", OUTS, [Route("pacs", "seg")])
    (d,) = q.outbox.due()
    assert q.outbox.failed(d.id, "connection refused", 2, 5, 4) == "pending"
    assert not q.outbox.due()
    clock.now += 2
    assert q.outbox.failed(d.id, "connection refused", 2, 5, 4) == "pending"
    clock.now += 3.9
    assert not q.outbox.due()  # 4 s backoff
    clock.now += 0.1
    q.outbox.failed(d.id, "connection refused", 2, 5, 4)
    clock.now += 5  # capped at 5
    assert q.outbox.failed(d.id, "connection refused", 2, 5, 4) == "failed"
    job = q.jobs.get(1)
    assert job.state == "failed" and job.error == "delivery to pacs failed: connection refused"
    assert q.outbox.status() == {"pacs": {"failed": 1}}
    assert q.jobs.retry(1) == "delivering"
    (d,) = q.outbox.due()
    q.outbox.delivered(d.id)
    assert q.jobs.get(1).state == "done"


def _lease_many(path: str, owner: str, out) -> None:
    q = JobQueue(path)
    got = []
    while (job := q.jobs.lease(owner, 60)) is not None:
        got.append(job.id)
    out.put(got)


def test_two_processes_never_lease_the_same_job(location: str) -> None:
    path = location
    q = JobQueue(path)
    for i in range(60):
        q.jobs.submit(f"s{i}", fingerprint=str(i))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_lease_many, args=(path, f"w{i}", out)) for i in range(3)]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    ids = [i for g in got for i in g]
    assert sorted(ids) == list(range(1, 61))


# --- what serve writes for Orthanc ------------------------------------------------------------------
def test_orthanc_config_security_defaults(tmp_path: Path) -> None:
    from node.service.supervisor import PLUGIN, orthanc_config

    oc = orthanc_config(parse_config({"data_dir": str(tmp_path)}))
    assert oc["RemoteAccessAllowed"] is False and oc["AuthenticationEnabled"] is False
    assert oc["DicomAlwaysAllowStore"] is True and oc["OverwriteInstances"] is True
    assert oc["PythonScript"] == str(PLUGIN) and PLUGIN.exists()
    assert oc["PacsNode"]["Queue"] == str(tmp_path / "queue.sqlite")
    oc = orthanc_config(
        parse_config({"http_remote_access": True, "http_users": {"ops": "pw"}, "allowed_aes": ["CT1", "MR2"]})
    )
    assert oc["RemoteAccessAllowed"] is True and oc["AuthenticationEnabled"] is True
    assert oc["RegisteredUsers"] == {"ops": "pw"}
    assert oc["DicomAlwaysAllowStore"] is False and sorted(oc["DicomModalities"]) == ["CT1", "MR2"]
    # a cluster: queue and Orthanc index in PostgreSQL, DICOM files on a shared folder
    oc = orthanc_config(
        parse_config(
            {
                "queue_url": "postgresql://pacs@db/queue",
                "orthanc_index_url": "postgresql://orthanc@db/index",
                "storage_dir": "/mnt/dicom",
            }
        )
    )
    assert oc["PacsNode"]["Queue"] == "postgresql://pacs@db/queue" and oc["StorageDirectory"] == "/mnt/dicom"
    assert oc["PostgreSQL"]["EnableIndex"] and not oc["PostgreSQL"]["EnableStorage"]
    assert oc["PostgreSQL"]["Lock"] is False and oc["PostgreSQL"]["ConnectionUri"] == "postgresql://orthanc@db/index"
    assert oc["Plugins"][-1].endswith("libOrthancPostgreSQLIndex.so")
    with pytest.raises(ConfigError, match="orthanc_index_url"):
        parse_config({"orthanc_index_url": "mysql://db/index"})


def test_serve_bad_config_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    p = tmp_path / "node.yaml"
    p.write_text("destinations:\n  - {name: pacs, kind: dicom, host: h, port: 0, ae_title: PACS}\n")
    r = subprocess.run(
        [sys.executable, "-m", "node.cli", "serve", "--config", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: destinations[0].port: Input should be greater than or equal to 1"
    ]


def test_serve_queue_database_unreachable_one_line(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = tmp_path / "node.yaml"
    p.write_text(f"data_dir: {tmp_path / 'data'}\nqueue_url: postgresql://pacs:secret@127.0.0.1:{port}/q\n")
    r = subprocess.run(
        [sys.executable, "-m", "node.cli", "serve", "--config", str(p), "--role", "worker"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    (line,) = r.stderr.strip().splitlines()
    assert r.returncode == 2 and line.startswith(f"error: queue postgresql://pacs:***@127.0.0.1:{port}/q: ")
    assert "secret" not in r.stderr


def test_urgent_job_is_leased_before_older_routine_ones_and_delivered_first(
    q: JobQueue, clock: Clock
) -> None:
    for k in (1, 2):
        q.jobs.submit(f"routine{k}", modality="CT", fingerprint=f"r{k}")
        clock.now += 1
    q.jobs.submit("stroke", modality="CT", fingerprint="s", priority=70)
    order = []
    while job := q.jobs.lease("w1", 10):
        order.append(job.series_id)
        urgency = Urgency(80, "urgent") if job.series_id == "stroke" else Urgency(0, "routine")
        q.jobs.complete(job.id, "w1", OUTS, [Route("pacs", "seg")], urgency=urgency, discrepancies=0)
    assert order == ["stroke", "routine1", "routine2"]
    # deliveries go out in order of urgency too, whatever order they were queued in
    assert [q.jobs.get(d.job_id).series_id for d in q.outbox.due()][0] == "stroke"
    assert q.jobs.get(3).urgency == "urgent" and q.jobs.get(3).urgency_score == 80
    assert q.counters.stats().counters[("urgency", "urgent", "")] == 1


def test_queue_written_by_an_older_node_gains_the_new_columns(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(  # the first release's tables, with one queued job
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, series_id TEXT NOT NULL, study_id TEXT NOT NULL"
        " DEFAULT '', modality TEXT NOT NULL DEFAULT '', instances INTEGER NOT NULL DEFAULT 0, fingerprint TEXT"
        " NOT NULL DEFAULT '', state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER"
        " NOT NULL DEFAULT 3, lease_owner TEXT, lease_until REAL, error TEXT, supersedes INTEGER, superseded_by"
        " INTEGER, created REAL NOT NULL, updated REAL NOT NULL, finished REAL);"
        "INSERT INTO jobs (series_id, state, created, updated) VALUES ('old', 'queued', 1, 1);"
    )
    db.close()
    q = JobQueue(path)
    job = q.jobs.lease("w1", 10)
    assert job.series_id == "old" and job.priority == 0 and job.urgency is None
    hook = Output("triage", "", "", payload='{"category": "urgent"}')
    assert (
        q.jobs.complete(job.id, "w1", [*OUTS, hook], [Route("ris", "triage")], Urgency(75, "urgent"))
        == "delivering"
    )
    (d,) = q.outbox.due()
    assert d.payload == '{"category": "urgent"}'
    assert set(q.jobs.outputs(job.id)) == set(OUTS)  # a notification is no stored output


def test_config_webhook_and_triage_rules() -> None:
    cfg = parse_config(
        {
            "destinations": [{"name": "ris", "kind": "webhook", "url": "https://ris.example/hook"}],
            "triage": {"urgent_at": 50, "age": {"under_years": 12}},
        }
    )
    assert cfg.destination("ris").min_category == "priority" and cfg.triage.age.points == 10
    for bad, key in (
        ({"triage": {"urgent_at": 10}}, "triage: need 0 < priority_at"),
        ({"triage": {"urgent_terms": "(("}}, "triage: urgent_terms is not a regular expression"),
        ({"destinations": [{"name": "r", "kind": "webhook", "url": "ftp://x"}]}, "destinations[0].url"),
        (
            {"destinations": [{"name": "r", "kind": "webhook", "url": "http://x", "min_category": "x"}]},
            "min_category",
        ),
    ):
        with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace("[", r"\[")):
            parse_config(bad)


# --- intake: what the plugin decided, and the pick-up at start ------------------------------------
def test_intake_remembers_every_decision_and_counts_it_once(q: JobQueue) -> None:
    assert not q.intake.decided("s1", "f1")
    job = q.intake.accept("s1", "f1", "CT", modality="CT", instances=3).job_id
    q.intake.skip("s2", "f2", "SR", "excluded_modality")
    assert q.intake.decided("s1", "f1") and q.intake.decided("s2", "f2")
    assert not q.intake.decided("s1", "f1-late")  # late instances: a new decision is due
    assert q.jobs.get(job).fingerprint == "f1"
    c = q.counters.stats().counters
    assert c[("series_received", "CT", "")] == 1 and c[("series_received", "SR", "")] == 1
    assert c[("jobs", "skipped", "excluded_modality")] == 1 and c[("jobs", "queued", "")] == 1
    assert q.intake.change_seq() == 0
    q.intake.set_change_seq(42)
    assert JobQueue(q.path).intake.change_seq() == 42  # durable


def test_dead_workers_job_is_released_at_once(q: JobQueue, clock: Clock) -> None:
    q.jobs.submit("s1", fingerprint="a", max_attempts=2)
    q.jobs.submit("s2", fingerprint="b", max_attempts=2)
    j1 = q.jobs.lease("host:1", 120)
    j2 = q.jobs.lease("host:2", 120)
    assert q.jobs.release("host:1", "worker killed by SIGKILL") == [j1.id]
    assert q.jobs.get(j1.id).state == "queued" and q.jobs.get(j2.id).state == "running"
    assert q.jobs.history(j1.id)[-1].event == "released"
    again = q.jobs.lease("host:3", 120)  # at once: no lease had to expire (the clock did not move)
    assert again.id == j1.id and again.attempts == 2
    assert q.jobs.release("host:3", "worker exited (code 1)") == [j1.id]  # the last attempt
    job = q.jobs.get(j1.id)
    assert job.state == "failed" and "worker exited (code 1) during the job 2 times" in job.error
    assert q.counters.stats().counters[("jobs", "released", "")] == 1


def test_postgres_restart_loses_nothing_and_the_queue_reconnects(postgres) -> None:
    """PostgreSQL restarted under a running queue: what was committed is there, the next call
    reconnects by itself, and no job is leased twice."""
    q = JobQueue(postgres.database())
    for i in range(3):
        q.jobs.submit(f"s{i}", fingerprint=str(i))
    first = q.jobs.lease("w1", 60)
    postgres.restart()
    assert q.writable() is None  # reconnected
    leased = [first.id]
    while (job := q.jobs.lease("w2", 60)) is not None:
        leased.append(job.id)
    assert sorted(leased) == [1, 2, 3]
    assert q.jobs.get(first.id).state == "running" and q.jobs.get(first.id).lease_owner == "w1"


def test_queue_bench_drains_every_job_once(location: str) -> None:
    """pacs-node bench --suite queue: workers in their own processes complete every job, once."""
    from node.tools.queue_bench import run

    result = run(location, workers=2, jobs=20)
    assert result["jobs"] == 20 and result["jobs_per_s"] > 0
    assert 0 < result["lease_ms_p50"] <= result["lease_ms_p95"]


def test_a_claimed_delivery_goes_to_one_deliverer(q: JobQueue, clock: Clock) -> None:
    """Two workers' deliverers on one queue: what one claims the other does not see, until the
    claim's hold passes (its deliverer died); what was delivered is never claimed again."""
    q.jobs.submit("s1", fingerprint="a")
    job = q.jobs.lease("w1", 10)
    q.jobs.complete(job.id, "w1", OUTS, ROUTES)
    first = q.outbox.claim(hold_s=60)
    assert len(first) == len(ROUTES) and q.outbox.claim(hold_s=60) == []
    q.outbox.delivered(first[0].id)
    clock.now += 61  # the other three were held by a deliverer that died
    again = q.outbox.claim(hold_s=60)
    assert sorted(d.id for d in again) == sorted(d.id for d in first[1:])


def test_a_delivery_sent_while_postgresql_restarts_is_not_sent_again(postgres, monkeypatch) -> None:
    """The database goes down while a C-STORE is in flight: the deliverer keeps the outcome and
    writes it once the queue is back, before claiming anything, so nothing goes out twice."""
    from node.service import egress
    from node.service.delivery import Deliverer
    from node.service.metrics import NodeMetrics

    location = postgres.database()
    cfg = parse_config(
        {"queue_url": location, "destinations": [
            {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": 104, "ae_title": "PACS"},
            {"name": "archive", "kind": "dicom", "host": "127.0.0.1", "port": 105, "ae_title": "ARCHIVE"},
        ]}
    )  # fmt: skip
    q = JobQueue(location)
    q.jobs.submit("s1", fingerprint="a")
    job = q.jobs.lease("w1", 10)
    q.jobs.complete(job.id, "w1", OUTS, ROUTES)
    sent: list[int] = []

    def send(dest, items, calling_ae):
        sent.extend(it.key for it in items)
        if len(sent) == len(items):  # the first send: the database goes down before it is recorded
            postgres.stop()
        return [egress.Outcome(it.key, None) for it in items]

    monkeypatch.setattr(egress, "send", send)

    class Orthanc:
        def instance_file(self, orthanc_id: str) -> bytes:
            return b"DICM"

    deliverer = Deliverer(cfg, Orthanc(), NodeMetrics(None, ["pacs", "archive"]))
    queue = JobQueue(location)
    with pytest.raises(queue.errors):
        deliverer.deliver_due(queue)
    postgres.resume()
    while deliverer.deliver_due(queue):
        pass
    assert sorted(sent) == sorted(d.id for d in q.outbox.of_job(job.id))  # each sent once
    assert {d.state for d in q.outbox.of_job(job.id)} == {"delivered"}
    assert q.jobs.get(job.id).state == "done"


def test_postgresql_leases_pass_over_a_job_being_leased_and_wait_for_no_writer(postgres) -> None:
    """SKIP LOCKED: a lease neither waits for another lease's job (it takes the next) nor for a
    writer holding the state machine's lock; a submit that finds its series' job being leased
    waits for that lease and then sees the job leased (a new job, not an update of a running one)."""
    import threading

    import psycopg

    from node.service.queue.postgres import LOCK_KEY

    url = postgres.database()
    q = JobQueue(url)
    for i in range(2):
        q.jobs.submit(f"s{i}", fingerprint=str(i))
    got: list = []
    w1, w2 = JobQueue(url), JobQueue(url)  # connected before: opening a queue takes the lock too
    with psycopg.connect(url) as other:  # one transaction, open until the end of the block
        other.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))  # a writer in flight
        other.execute("UPDATE jobs SET state = 'running', lease_owner = 'other' WHERE id = 1")  # a lease in flight
        lease = threading.Thread(target=lambda: got.append(w1.jobs.lease("w", 60)))
        lease.start()
        lease.join(10)
        assert not lease.is_alive(), "the lease waited for another transaction's locks"
        submit = threading.Thread(target=lambda: got.append(w2.jobs.submit("s0", fingerprint="more")))
        submit.start()
        submit.join(1)
        assert submit.is_alive()  # it waits for the lease in flight...
        other.commit()
    submit.join(10)
    leased, submitted = got
    assert leased.id == 2
    assert submitted.reason.startswith("late instances") and submitted.job_id == 3  # ...and sees job 1 leased
    assert q.jobs.get(1).fingerprint == "0"


def test_label_sets_are_kept_replaced_and_removed(q: JobQueue) -> None:
    """A SEG's label set is recorded with the skip that stands for its series, once per source object
    (sent again: replaced); label sets are listed per series and removed by ID."""
    from node.identity import LabelKind, SkipRule
    from node.service.queue import Label

    aorta = [Label("Aorta", "SCT:15825003")]
    q.intake.skip("seg1", "f", "SEG", SkipRule.LABEL_SET, [("1.2.3", LabelKind.SEGMENTATION, "9.9.1", "SLICER", aorta)])
    assert q.intake.decided("seg1", "f")
    q.labels.add("1.2.3", LabelKind.SEGMENTATION, "9.9.1", "SLICER2", [*aorta, Label("Liver")])  # the same SEG again
    q.labels.add("1.2.4", LabelKind.CLASSIFICATION, "findings.csv", "cli", [Label("Lesion present", "SCT:52101004")])
    (first,) = q.labels.list("1.2.3")
    assert first.sender == "SLICER2" and [x.name for x in first.labels] == ["Aorta", "Liver"]
    assert first.kind is LabelKind.SEGMENTATION
    assert [s.series_uid for s in q.labels.list()] == ["1.2.3", "1.2.4"]
    assert q.labels.remove(first.id) and not q.labels.remove(first.id)
    assert [s.series_uid for s in q.labels.list()] == ["1.2.4"]
    assert q.counters.stats().counters[("jobs", "skipped", "label_set")] == 1


def test_labels_cli_adds_lists_and_removes(tmp_path: Path, capsys) -> None:
    import yaml

    from node.cli import EXIT_INPUT, EXIT_OK, main

    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data")}))
    assert main(["labels", "list", "--config", str(cfg)]) == EXIT_INPUT
    assert "the node has not run with this config" in capsys.readouterr().err
    (tmp_path / "data").mkdir()
    JobQueue(parse_config({"data_dir": str(tmp_path / "data")}).queue_location)  # as serve makes it
    csv = tmp_path / "findings.csv"
    csv.write_text("series_uid,label,code\n1.2.3,Lesion present,SCT:52101004\n1.2.4,Lesion absent,SCT:2667000\n")
    assert main(["labels", "add", "--csv", str(csv), "--config", str(cfg)]) == EXIT_OK
    assert main(["labels", "list", "--config", str(cfg), "--series", "1.2.4"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "2 label set(s)" in out and "1.2.4  classification  Lesion absent (SCT:2667000)  from cli" in out
    assert "1.2.3  classification" not in out
    assert main(["labels", "remove", "1", "--config", str(cfg)]) == EXIT_OK
    assert main(["labels", "remove", "1", "--config", str(cfg)]) == EXIT_INPUT
    assert "error: no label set 1" in capsys.readouterr().err
    csv.write_text("series,label\n1.2.3,x\n")
    assert main(["labels", "add", "--csv", str(csv), "--config", str(cfg)]) == EXIT_INPUT
    assert "line 2: needs series_uid and label" in capsys.readouterr().err
