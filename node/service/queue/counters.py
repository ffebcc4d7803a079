"""Durable counters for the metrics, and the one consistent snapshot a scrape reads.

The counters live in the queue file, so they survive restarts and count what the plugin (another
process) did. Labels are bounded enums or operator-chosen destination names, never patient data.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from node.identity import JobState, StrEnum
from node.service.queue.store import Store


class Counter(StrEnum):
    SERIES_RECEIVED = "series_received"  # label: modality
    JOBS = "jobs"  # label: JobEvent; sublabel: SkipRule for skipped
    DELIVERIES = "deliveries"  # label: destination; sublabel: delivered, error, failed
    DELIVERY_RETRIES = "delivery_retries"  # label: destination
    URGENCY = "urgency"  # label: triage category
    DISCREPANCIES = "discrepancies"
    MODEL_RUNS = "model_runs"  # label: the model's name and version; sublabel: ModelOutcome


def bump(db: sqlite3.Connection, name: Counter, label: str = "", sublabel: str = "", n: int = 1) -> None:
    """Add ``n`` inside the caller's transaction (the change it counts commits with it)."""
    if n:
        db.execute(
            "INSERT INTO counters (name, label, sublabel, value) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name, label, sublabel) DO UPDATE SET value = counters.value + excluded.value",
            (name, label, sublabel, n),
        )


@dataclass
class QueueStats:
    """A snapshot for the metrics: current states, ages and the durable counters."""

    jobs_by_state: dict[str, int]
    oldest_queued_age_s: float  # 0 when nothing is queued
    deliveries: dict[tuple[str, str], int]  # (destination, state) -> count
    oldest_pending_age_s: dict[str, float]  # destination -> age of its oldest pending delivery
    counters: dict[tuple[str, str, str], int]  # (name, label, sublabel) -> value


class Counters:
    def __init__(self, store: Store):
        self.store = store

    def stats(self) -> QueueStats:
        """Everything the metrics read from the queue, in one consistent read."""
        now = self.store.clock()
        with self.store.snapshot() as db:
            by_state = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
            oldest = db.execute(
                "SELECT MIN(created) FROM jobs WHERE state = ?", (JobState.QUEUED,)
            ).fetchone()[0]
            deliveries = {
                (r[0], r[1]): r[2]
                for r in db.execute("SELECT destination, state, COUNT(*) FROM deliveries GROUP BY 1, 2")
            }
            pending = dict(
                db.execute(
                    "SELECT destination, MIN(created) FROM deliveries WHERE state = 'pending' GROUP BY 1"
                ).fetchall()
            )
            counters = {
                (r[0], r[1], r[2]): r[3]
                for r in db.execute("SELECT name, label, sublabel, value FROM counters")
            }
        return QueueStats(
            jobs_by_state=by_state,
            oldest_queued_age_s=max(0.0, now - oldest) if oldest is not None else 0.0,
            deliveries=deliveries,
            oldest_pending_age_s={d: max(0.0, now - t) for d, t in pending.items()},
            counters=counters,
        )
