"""The durable queue shared by the Orthanc plugin (producer) and the worker (consumer).

One SQLite file (:mod:`.store`), or a PostgreSQL database for a cluster (:mod:`.postgres`, the
same tables and SQL), and a class per responsibility, all on the same connection:
:class:`~.jobs.Jobs` (the job state machine), :class:`~.outbox.Outbox` (deliveries, exactly once),
:class:`~.counters.Counters` (durable counts for the metrics), :class:`~.intake.Intake` (what the plugin decided for each
series, and the pick-up's place in Orthanc's change log), :class:`~.retrieved.RetrievedPriors`
(priors that must not become jobs); idle workers wait for work through :mod:`.wakeup`
(LISTEN/NOTIFY on PostgreSQL, polling on SQLite). What each processed series showed is kept by
:class:`node.service.queue.time_points.TimePoints`, which the plugin never imports (numpy).
Stdlib only on SQLite: the plugin runs inside Orthanc's embedded Python (psycopg, for PostgreSQL,
comes from Debian's python3-psycopg there).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from node.service.queue.counters import Counter, Counters, QueueStats
from node.service.queue.intake import Intake
from node.service.queue.jobs import Job, Jobs, Submitted
from node.service.queue.labels import Label, Labels, LabelSet
from node.service.queue.outbox import Delivery, Outbox, Output, Route
from node.service.queue.retrieved import RetrievedPriors
from node.service.queue.store import Store
from node.service.queue.wakeup import Channel, Waker

__all__ = [
    "Counter",
    "Delivery",
    "Job",
    "JobQueue",
    "Label",
    "LabelSet",
    "Output",
    "QueueStats",
    "Route",
    "Submitted",
    "to_json",
]


def open_store(location: Path | str, clock: Callable[[], float] = time.time):
    """The SQLite file at a path, or PostgreSQL at a ``postgresql://`` URL (psycopg needed only then)."""
    if str(location).startswith(("postgresql://", "postgres://")):
        from node.service.queue.postgres import PgStore

        return PgStore(str(location), clock)
    return Store(location, clock)


class JobQueue:
    """One connection to the queue (its file, or its PostgreSQL database) and its parts; safe to
    share between threads of one process."""

    def __init__(self, path: Path | str, clock: Callable[[], float] = time.time):
        self.store = open_store(path, clock)
        self.outbox = Outbox(self.store)
        self.jobs = Jobs(self.store, self.outbox)
        self.counters = Counters(self.store)
        self.labels = Labels(self.store)
        self.intake = Intake(self.store, self.jobs, self.labels)
        self.retrieved = RetrievedPriors(self.store)
        self._wakers: dict[Channel, Waker] = {}  # opened at the first wait: the plugin never waits

    @property
    def path(self) -> str:
        return self.store.path

    @property
    def errors(self) -> tuple[type[Exception], ...]:
        """What the queue raises when its storage fails (a full disk, a database gone)."""
        return self.store.errors

    def writable(self) -> str | None:
        return self.store.writable()

    def wait_for_work(self, timeout: float) -> bool:
        """Block until a job may have become leasable (True) or ``timeout`` s pass (False); for the
        one thread that leases through this queue."""
        return self._waker(Channel.JOBS).wait(timeout)

    def wait_for_deliveries(self, timeout: float) -> bool:
        """Block until a delivery may have become due (True) or ``timeout`` s pass (False)."""
        return self._waker(Channel.DELIVERIES).wait(timeout)

    def _waker(self, channel: Channel) -> Waker:
        if channel not in self._wakers:
            self._wakers[channel] = self.store.waker(channel)
        return self._wakers[channel]


def to_json(obj) -> str:
    return json.dumps(obj, indent=1, default=str)
