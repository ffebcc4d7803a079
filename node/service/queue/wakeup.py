"""Waking idle workers and deliverers when the queue has something for them.

A write that makes a job leasable (queued, retried, released, its lease expired) or a delivery due
(a job completed, an operator's retry) calls ``store.notify(db, channel)`` inside its transaction.
On PostgreSQL that is ``pg_notify``, which reaches every listener on every host at commit
(:class:`node.service.queue.postgres.PgWaker`); the SQLite file is polled (:class:`Sleeper`).
Either way a waiter returns at the latest after its timeout (the worker's ``poll_s``), so a lost
notification costs one poll interval, never a job. Notifications carry no payload: no patient data.
"""

from __future__ import annotations

import time
from typing import Protocol

from node.identity import StrEnum


class Channel(StrEnum):
    JOBS = "pacs_node_jobs"  # a job may be leasable
    DELIVERIES = "pacs_node_deliveries"  # a delivery may be due


class Waker(Protocol):
    def wait(self, timeout: float) -> bool:
        """Block until the channel is notified (True: look at the queue) or ``timeout`` s pass (False)."""
        ...


class Sleeper:
    """The SQLite file's waker: nothing notifies across processes, so it sleeps out the timeout."""

    def wait(self, timeout: float) -> bool:
        time.sleep(timeout)
        return False
