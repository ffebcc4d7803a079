"""Wake-ups: an idle worker or deliverer waits on PostgreSQL's LISTEN/NOTIFY rather than polling
(the SQLite file polls), against a real PostgreSQL server."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest

from node.config import parse_config
from node.service.queue import Job, JobQueue, Output, Route

LONG = 10.0  # a waiter's timeout: a wake-up must come well before it
SOON = LONG / 2
OUTS = [Output("seg", "1.2.3.1", "o1")]
ROUTES = [Route("pacs", "seg")]


@pytest.fixture
def url(postgres) -> str:
    return postgres.database()


def timed(wait: Callable[[float], bool], timeout: float = LONG) -> tuple[bool, float]:
    t0 = time.monotonic()
    woke = wait(timeout)
    return woke, time.monotonic() - t0


def later(action: Callable[[], object]) -> threading.Thread:
    """``action`` on another connection, once the waiter is surely blocked."""
    t = threading.Thread(target=lambda: (time.sleep(0.3), action()))
    t.start()
    return t


def listening(q: JobQueue) -> JobQueue:
    """The first wait connects the listener and returns at once: what came before it is unknown."""
    woke, seconds = timed(q.wait_for_work)
    assert woke and seconds < SOON
    return q


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_wait_times_out_when_nothing_is_committed(backend: str, tmp_path: Path, request) -> None:
    location = str(tmp_path / "q.sqlite") if backend == "sqlite" else request.getfixturevalue("url")
    waiter, producer = JobQueue(location), JobQueue(location)
    waiter.wait_for_work(0.1)

    def rolled_back() -> None:  # a job queued in a transaction that does not commit wakes nobody
        with pytest.raises(RuntimeError), producer.store.tx() as db:
            producer.jobs.submit_in(db, "ser1")
            raise RuntimeError

    t = later(rolled_back)
    woke, seconds = timed(waiter.wait_for_work, 1.0)
    t.join()
    assert not woke and 0.9 <= seconds < SOON
    assert waiter.jobs.lease("w", 10) is None


def _queued(q: JobQueue) -> None:
    q.jobs.submit("ser2")


def _retried(q: JobQueue) -> None:
    q.jobs.fail(1, "w1", "Orthanc restarting", retry=True)


def _released(q: JobQueue) -> None:
    q.jobs.release("w1", "worker process died")


def _operator_retry(q: JobQueue) -> None:
    q.jobs.fail(1, "w1", "bad series")
    q.jobs.retry(1)


def _late_instances(q: JobQueue) -> None:
    q.jobs.complete(1, "w1", OUTS, [])
    q.jobs.submit("ser1", fingerprint="f2")


@pytest.mark.parametrize(
    "action",
    [_queued, _retried, _released, _operator_retry, _late_instances],
    ids=lambda f: f.__name__.strip("_"),
)
def test_what_makes_a_job_leasable_wakes_a_waiter_on_another_connection(url: str, action) -> None:
    producer = JobQueue(url)
    producer.jobs.submit("ser1", fingerprint="f1")
    assert producer.jobs.lease("w1", 60)
    waiter = listening(JobQueue(url))
    t = later(lambda: action(producer))
    woke, seconds = timed(waiter.wait_for_work)
    t.join()
    assert woke and seconds < SOON
    assert waiter.jobs.lease("w2", 60) is not None


def test_a_completed_job_wakes_the_deliverers_not_the_workers(url: str) -> None:
    producer = JobQueue(url)
    producer.jobs.submit("ser1")
    assert producer.jobs.lease("w1", 60)
    waiter = listening(JobQueue(url))
    assert waiter.wait_for_deliveries(LONG)  # its own listener: connected, returns at once
    t = later(lambda: producer.jobs.complete(1, "w1", OUTS, ROUTES))
    woke, seconds = timed(waiter.wait_for_deliveries)
    t.join()
    assert woke and seconds < SOON and waiter.outbox.due()
    assert not waiter.wait_for_work(0.5)


def test_a_killed_listener_connects_again_and_still_wakes(url: str, caplog) -> None:
    waiter, producer = listening(JobQueue(url)), JobQueue(url)
    with psycopg.connect(url, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
        ).fetchall()
    assert killed == [(True,)]
    with caplog.at_level(logging.INFO, logger="node.service.queue.postgres"):
        woke, seconds = timed(waiter.wait_for_work)  # lost, connected again: look at the queue
    assert woke and seconds < SOON
    assert (
        "no wake-ups on pacs_node_jobs" in caplog.text and "listening on pacs_node_jobs again" in caplog.text
    )
    assert not waiter.wait_for_work(0.5)
    t = later(lambda: producer.jobs.submit("ser1"))
    woke, seconds = timed(waiter.wait_for_work)
    t.join()
    assert woke and seconds < SOON


def test_an_idle_worker_takes_a_job_at_once_despite_a_long_poll(url: str, tmp_path: Path) -> None:
    from node.pipeline import Pipeline
    from node.service.worker import Worker

    cfg = parse_config(
        {"data_dir": str(tmp_path), "queue_url": url, "metrics_port": 0, "worker": {"poll_s": 30}}
    )
    model = SimpleNamespace(name="stub", version="0", path=tmp_path, heads=())
    runtime = SimpleNamespace(name="none", device="cpu", precision=None)
    worker = Worker(cfg, pipeline=Pipeline(model, runtime))  # a stub model: it runs no job here
    taken: list[tuple[Job, float]] = []
    picked = threading.Event()

    def process(job: Job) -> None:
        taken.append((job, time.monotonic()))
        worker.stop()
        picked.set()

    waits: list[float] = []
    wait_for_work = worker.queue.wait_for_work

    def waiting(timeout: float) -> bool:
        waits.append(timeout)
        return wait_for_work(timeout)

    worker.process, worker.queue.wait_for_work = process, waiting
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + LONG
    while len(waits) < 2 and time.monotonic() < deadline:  # the first wait connects the listener
        time.sleep(0.05)
    time.sleep(0.3)  # idle: it leased nothing and waits for up to poll_s
    assert waits == [30, 30]
    queued = time.monotonic()
    JobQueue(url).jobs.submit("ser1")
    assert picked.wait(LONG)
    job, at = taken[0]
    assert job.series_id == "ser1" and at - queued < SOON
    thread.join(LONG)
    assert not thread.is_alive()
