"""The delivery outbox: one row per (job, destination, output kind), retried with backoff until the
destination acknowledges it or the attempts run out; a job is ``done`` when its last delivery is.

Rows are created in the same transaction that completes the job (:meth:`Jobs.complete`), so an
output is never stored without its deliveries, nor delivered twice.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from node.identity import DeliveryState, JobEvent, JobState, OutputKind
from node.service.queue.counters import Counter, bump
from node.service.queue.store import Store, journal
from node.service.queue.wakeup import Channel

CLAIM_S = 300.0  # how long a deliverer holds what it claimed: longer than one attempt (a large SEG)
_DUE = (  # pending deliveries whose time has come, the most urgent job's first
    "SELECT d.* FROM deliveries d JOIN jobs j ON j.id = d.job_id WHERE d.state = ? AND d.next_try <= ?"
    " ORDER BY COALESCE(j.urgency_score, j.priority) DESC, d.id LIMIT ?"
)


@dataclass(frozen=True)
class Output:
    """One result of a job: a stored DICOM object, or (``TRIAGE``) a webhook body kept in ``payload``."""

    kind: OutputKind
    sop_uid: str
    orthanc_id: str
    payload: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", OutputKind(self.kind))


@dataclass(frozen=True)
class Route:
    """Deliver the job's output of ``kind`` to the destination named ``destination``."""

    destination: str
    kind: OutputKind


@dataclass
class Delivery:
    id: int
    job_id: int
    destination: str
    kind: OutputKind
    sop_uid: str
    orthanc_id: str
    state: DeliveryState
    attempts: int
    next_try: float
    last_error: str | None
    created: float
    updated: float
    delivered: float | None
    payload: str = ""

    def __post_init__(self) -> None:
        self.kind, self.state = OutputKind(self.kind), DeliveryState(self.state)


class Outbox:
    def __init__(self, store: Store):
        self.store = store

    def add(
        self,
        db: sqlite3.Connection,
        job_id: int,
        outputs: Iterable[Output],
        routes: Iterable[Route],
        now: float,
    ) -> int:
        """Inside the caller's transaction: one pending delivery per route whose kind was produced."""
        by_kind = {o.kind: o for o in outputs}
        n = 0
        for r in routes:
            o = by_kind.get(OutputKind(r.kind))
            if o is None:
                continue
            db.execute(
                "INSERT INTO deliveries (job_id, destination, kind, sop_uid, orthanc_id, state,"
                " next_try, created, updated, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (
                    job_id,
                    r.destination,
                    o.kind,
                    o.sop_uid,
                    o.orthanc_id,
                    DeliveryState.PENDING,
                    now,
                    now,
                    now,
                    o.payload,
                ),
            )
            n += 1
        if n:
            self.store.notify(db, Channel.DELIVERIES)
        return n

    def cancel(self, db: sqlite3.Connection, job_id: int, now: float) -> None:
        """Inside the caller's transaction: a superseded job's pending deliveries go nowhere."""
        db.execute(
            "UPDATE deliveries SET state = ?, updated = ? WHERE job_id = ? AND state = ?",
            (DeliveryState.CANCELLED, now, job_id, DeliveryState.PENDING),
        )

    def due(self, limit: int = 100) -> list[Delivery]:
        """Pending deliveries whose time has come, the most urgent job's first (a look: a
        deliverer :meth:`claim` s them)."""
        rows = self.store.read(_DUE, (DeliveryState.PENDING, self.store.clock(), limit))
        return [Delivery(**r) for r in rows]

    def claim(self, limit: int = 100, hold_s: float = CLAIM_S) -> list[Delivery]:
        """:meth:`due`, taken for ``hold_s`` seconds in one transaction: a deliverer of another
        worker (on this host or another) does not see them until then, so each goes out once. A
        deliverer that dies holding some leaves them due again after ``hold_s``."""
        now = self.store.clock()
        with self.store.tx() as db:
            rows = db.execute(_DUE, (DeliveryState.PENDING, now, limit)).fetchall()
            for r in rows:
                db.execute("UPDATE deliveries SET next_try = ? WHERE id = ?", (now + hold_s, r["id"]))
        return [Delivery(**r) for r in rows]

    def delivered(self, delivery_id: int) -> None:
        now = self.store.clock()
        with self.store.tx() as db:
            cur = db.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, last_error = NULL,"
                " updated = ?, delivered = ? WHERE id = ? AND state = ?",
                (DeliveryState.DELIVERED, now, now, delivery_id, DeliveryState.PENDING),
            )
            if cur.rowcount:
                dest = db.execute(
                    "SELECT destination FROM deliveries WHERE id = ?", (delivery_id,)
                ).fetchone()
                bump(db, Counter.DELIVERIES, dest[0], "delivered")
            self._settle(db, delivery_id, now)

    def failed(
        self, delivery_id: int, error: str, backoff_s: float, backoff_max_s: float, max_attempts: int
    ) -> DeliveryState | None:
        """Schedule the next try with exponential backoff, or give up after ``max_attempts``.
        Returns the delivery's state (None: no such delivery)."""
        now = self.store.clock()
        with self.store.tx() as db:
            row = db.execute("SELECT * FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
            if row is None or row["state"] != DeliveryState.PENDING:
                return DeliveryState(row["state"]) if row else None
            attempts = row["attempts"] + 1
            state = DeliveryState.FAILED if attempts >= max_attempts else DeliveryState.PENDING
            delay = min(backoff_max_s, backoff_s * 2 ** (attempts - 1))
            db.execute(
                "UPDATE deliveries SET state = ?, attempts = ?, last_error = ?, next_try = ?, updated = ? WHERE id = ?",
                (state, attempts, error, now + delay, now, delivery_id),
            )
            gave_up = state is DeliveryState.FAILED
            bump(db, Counter.DELIVERIES, row["destination"], "failed" if gave_up else "error")
            if not gave_up:
                bump(db, Counter.DELIVERY_RETRIES, row["destination"])
            if attempts == 1 or gave_up:  # the first error and the last; not one line per retry
                event = "delivery failed" if gave_up else "delivery pending"
                journal(db, row["job_id"], now, event, f"{row['destination']}/{row['kind']}: {error}")
            self._settle(db, delivery_id, now)
            return state

    def _settle(self, db: sqlite3.Connection, delivery_id: int, now: float) -> None:
        """Once no delivery of a job is pending, the job is done (or failed if one gave up)."""
        job_id = db.execute("SELECT job_id FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()[0]
        counts = dict(
            db.execute("SELECT state, COUNT(*) FROM deliveries WHERE job_id = ? GROUP BY state", (job_id,))
        )
        if counts.get(DeliveryState.PENDING):
            return
        job = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if job["state"] != JobState.DELIVERING:
            return
        if counts.get(DeliveryState.FAILED):
            err = db.execute(
                "SELECT destination, last_error FROM deliveries WHERE job_id = ? AND state = ? LIMIT 1",
                (job_id, DeliveryState.FAILED),
            ).fetchone()
            error = f"delivery to {err[0]} failed: {err[1]}"
            db.execute(
                "UPDATE jobs SET state = ?, error = ?, updated = ? WHERE id = ?",
                (JobState.FAILED, error, now, job_id),
            )
            journal(db, job_id, now, "failed", error)
            bump(db, Counter.JOBS, JobEvent.FAILED)
        else:
            db.execute("UPDATE jobs SET state = ?, updated = ? WHERE id = ?", (JobState.DONE, now, job_id))
            bump(db, Counter.JOBS, JobEvent.DONE)
            journal(db, job_id, now, "delivered", f"{counts.get(DeliveryState.DELIVERED, 0)} objects")

    def retry_failed(self, db: sqlite3.Connection, job_id: int, now: float) -> int:
        """Inside the caller's transaction (an operator's retry): failed deliveries are due again now."""
        n = db.execute(
            "UPDATE deliveries SET state = ?, attempts = 0, next_try = ?, updated = ? WHERE job_id = ? AND state = ?",
            (DeliveryState.PENDING, now, now, job_id, DeliveryState.FAILED),
        ).rowcount
        if n:
            self.store.notify(db, Channel.DELIVERIES)
        return n

    def of_job(self, job_id: int) -> list[Delivery]:
        rows = self.store.read("SELECT * FROM deliveries WHERE job_id = ? ORDER BY id", (job_id,))
        return [Delivery(**r) for r in rows]

    def status(self) -> dict[str, dict[str, int]]:
        """Per destination: how many deliveries are in each state."""
        out: dict[str, dict[str, int]] = {}
        for r in self.store.read("SELECT destination, state, COUNT(*) AS n FROM deliveries GROUP BY 1, 2"):
            out.setdefault(r["destination"], {})[r["state"]] = r["n"]
        return out
