"""The durable job queue shared by the Orthanc plugin (producer) and the worker (consumer).

One SQLite file in WAL mode: both processes open it, every state change is a
short ``BEGIN IMMEDIATE`` transaction, so a crash of either side loses nothing.
Stdlib only on purpose: the plugin imports this module inside Orthanc's
embedded Python, where neither the venv nor pydantic exist.

Job states: ``queued`` -> ``running`` -> ``delivering`` -> ``done``; ``failed``
after ``max_attempts`` (its error kept); ``superseded`` when late instances of
the same series started a newer job. A running job whose worker stops
heartbeating is leased again once its lease has expired.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_id TEXT NOT NULL,          -- Orthanc's series ID (a hash: no patient data)
    study_id TEXT NOT NULL DEFAULT '',
    modality TEXT NOT NULL DEFAULT '',
    instances INTEGER NOT NULL DEFAULT 0,
    fingerprint TEXT NOT NULL DEFAULT '',  -- hash of the instance IDs: what this job processes
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 3,
    lease_owner TEXT,
    lease_until REAL,
    error TEXT,
    supersedes INTEGER,
    superseded_by INTEGER,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    finished REAL,
    priority INTEGER NOT NULL DEFAULT 0,  -- urgency points of the request: higher is leased first
    urgency TEXT,                         -- routine, priority, urgent (after inference)
    urgency_score INTEGER,
    discrepancies INTEGER                 -- report statements the image contradicts
);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs(series_id);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS outputs (
    job_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    orthanc_id TEXT NOT NULL,
    PRIMARY KEY (job_id, kind)
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    kind TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    orthanc_id TEXT NOT NULL,
    state TEXT NOT NULL,              -- pending, delivered, failed, cancelled
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL,
    last_error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    delivered REAL,
    payload TEXT NOT NULL DEFAULT '',   -- what a webhook delivery posts (DICOM objects come from Orthanc)
    UNIQUE (job_id, destination, kind)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_try);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    ts REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS history_job ON history(job_id);
-- what each processed series showed (node.longitudinal.TimePoint, JSON): a later series of the
-- patient is compared with it without inferring it again
CREATE TABLE IF NOT EXISTS time_points (
    series_uid TEXT NOT NULL,
    model TEXT NOT NULL,              -- name and version: another model's lesions are not comparable
    data TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (series_uid, model)
);
-- priors the worker retrieved from a PACS: the plugin makes no job of them when they arrive
CREATE TABLE IF NOT EXISTS retrieved (
    series_uid TEXT PRIMARY KEY,
    ts REAL NOT NULL
);
-- monotonic counts for the metrics (durable: they survive restarts of Orthanc and the worker);
-- labels are bounded enums or operator-chosen names (destinations), never patient data
CREATE TABLE IF NOT EXISTS counters (
    name TEXT NOT NULL,               -- jobs, series_received, deliveries, delivery_retries
    label TEXT NOT NULL DEFAULT '',   -- outcome, modality or destination
    sublabel TEXT NOT NULL DEFAULT '',  -- skip rule, delivery outcome
    value INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, label, sublabel)
);
"""

ACTIVE = ("queued", "running", "delivering", "done")
# columns added after the first release: a queue file written by an older node gains them at open
MIGRATIONS = {
    "jobs": {
        "priority": "INTEGER NOT NULL DEFAULT 0",
        "urgency": "TEXT",
        "urgency_score": "INTEGER",
        "discrepancies": "INTEGER",
    },
    "deliveries": {"payload": "TEXT NOT NULL DEFAULT ''"},
}


@dataclass
class Job:
    id: int
    series_id: str
    study_id: str
    modality: str
    instances: int
    fingerprint: str
    state: str
    attempts: int
    max_attempts: int
    lease_owner: str | None
    lease_until: float | None
    error: str | None
    supersedes: int | None
    superseded_by: int | None
    created: float
    updated: float
    finished: float | None
    priority: int = 0
    urgency: str | None = None
    urgency_score: int | None = None
    discrepancies: int | None = None


@dataclass
class Delivery:
    id: int
    job_id: int
    destination: str
    kind: str
    sop_uid: str
    orthanc_id: str
    state: str
    attempts: int
    next_try: float
    last_error: str | None
    created: float
    updated: float
    delivered: float | None
    payload: str = ""


@dataclass(frozen=True)
class Output:
    kind: str  # seg, sr, gsps; triage: a webhook notification (payload, nothing in Orthanc)
    sop_uid: str
    orthanc_id: str
    payload: str = ""


@dataclass
class QueueStats:
    """A snapshot for the metrics: current states, ages and the durable counters."""

    jobs_by_state: dict[str, int]
    oldest_queued_age_s: float  # 0 when nothing is queued
    deliveries: dict[tuple[str, str], int]  # (destination, state) -> count
    oldest_pending_age_s: dict[str, float]  # destination -> age of its oldest pending delivery
    counters: dict[tuple[str, str, str], int]  # (name, label, sublabel) -> value


@dataclass(frozen=True)
class Submitted:
    job_id: int | None  # None: no new job (the same instances were already processed or queued)
    reason: str


class JobQueue:
    """A connection to the queue file; safe to share between threads of one process."""

    def __init__(self, path: Path | str, clock=time.time):
        self.path = str(path)
        self._clock = clock
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        self._db.execute("PRAGMA busy_timeout=30000")
        for stmt in filter(str.strip, SCHEMA.split(";")):
            self._db.execute(stmt)
        for table, columns in MIGRATIONS.items():
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            for name, decl in columns.items():
                if name not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- transactions -----------------------------------------------------------------------
    class _Tx:
        def __init__(self, q: JobQueue):
            self.q = q

        def __enter__(self):
            self.q._lock.acquire()
            self.q._db.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlocks
            return self.q._db

        def __exit__(self, exc_type, exc, tb):
            try:
                self.q._db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.q._lock.release()

    def _tx(self) -> JobQueue._Tx:
        return JobQueue._Tx(self)

    @staticmethod
    def _bump(db, name: str, label: str = "", sublabel: str = "", n: int = 1) -> None:
        if n:
            db.execute(
                "INSERT INTO counters (name, label, sublabel, value) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name, label, sublabel) DO UPDATE SET value = value + excluded.value",
                (name, label, sublabel, n),
            )

    def count(self, name: str, label: str = "", sublabel: str = "", n: int = 1) -> None:
        """Add ``n`` to a durable counter (the plugin counts received and skipped series this way)."""
        with self._tx() as db:
            self._bump(db, name, label, sublabel, n)

    def record_series(self, modality: str, skipped_by: str | None = None) -> None:
        """The plugin saw a stable series; ``skipped_by``: the routing rule that kept it from a job."""
        with self._tx() as db:
            self._bump(db, "series_received", modality)
            if skipped_by:
                self._bump(db, "jobs", "skipped", skipped_by)

    def _log(self, db, job_id: int, event: str, detail: str = "") -> None:
        db.execute(
            "INSERT INTO history (job_id, ts, event, detail) VALUES (?, ?, ?, ?)",
            (job_id, self._clock(), event, detail),
        )

    # --- producer (the plugin) --------------------------------------------------------------
    def submit(
        self,
        series_id: str,
        *,
        study_id: str = "",
        modality: str = "",
        instances: int = 0,
        fingerprint: str = "",
        max_attempts: int = 3,
        priority: int = 0,
    ) -> Submitted:
        """Record that ``series_id`` is stable and eligible; decide whether it needs a (new) job.

        ``priority``: the request's urgency points (:func:`node.urgency.request_points`); the queue
        leases the highest first, then the oldest."""
        now = self._clock()
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE series_id = ? AND state != 'superseded' ORDER BY id DESC LIMIT 1",
                (series_id,),
            ).fetchone()
            latest = Job(**row) if row else None
            if latest and fingerprint and latest.fingerprint == fingerprint and latest.state in ACTIVE:
                self._log(db, latest.id, "resubmitted", "same instances as this job: no new job")
                self._bump(db, "jobs", "deduplicated")
                return Submitted(None, f"same instances already in job {latest.id} ({latest.state})")
            if latest and latest.state == "queued":
                db.execute(
                    "UPDATE jobs SET instances = ?, fingerprint = ?, updated = ? WHERE id = ?",
                    (instances, fingerprint, now, latest.id),
                )
                self._log(db, latest.id, "updated", f"more instances before start: {instances}")
                return Submitted(latest.id, "queued job updated")
            cur = db.execute(
                "INSERT INTO jobs (series_id, study_id, modality, instances, fingerprint, state, max_attempts,"
                " supersedes, created, updated, priority) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
                (
                    series_id,
                    study_id,
                    modality,
                    instances,
                    fingerprint,
                    max_attempts,
                    latest.id if latest else None,
                    now,
                    now,
                    priority,
                ),
            )
            job_id = int(cur.lastrowid)
            self._bump(db, "jobs", "queued")
            if latest is None:
                self._log(
                    db, job_id, "queued", f"{modality} series, {instances} instances, priority {priority}"
                )
                return Submitted(job_id, "new series")
            why = (
                f"re-sent after job {latest.id} failed"
                if latest.state == "failed"
                else f"late instances: {latest.instances} -> {instances}"
            )
            self._log(db, job_id, "queued", f"{why}; supersedes job {latest.id}")
            db.execute(
                "UPDATE jobs SET superseded_by = ?, updated = ? WHERE id = ?", (job_id, now, latest.id)
            )
            if latest.state in ("delivering", "done"):
                # results of the old run are replaced (same output UIDs): stop delivering them
                db.execute("UPDATE jobs SET state = 'superseded' WHERE id = ?", (latest.id,))
                self._bump(db, "jobs", "superseded")
                db.execute(
                    "UPDATE deliveries SET state = 'cancelled', updated = ? WHERE job_id = ? AND state = 'pending'",
                    (now, latest.id),
                )
            self._log(db, latest.id, "superseded", f"by job {job_id} ({why})")
            return Submitted(job_id, why)

    # --- consumer (the worker) --------------------------------------------------------------
    def lease(self, owner: str, lease_s: float) -> Job | None:
        """Take the most urgent, then oldest, queued job (or one whose lease expired) for ``lease_s`` s."""
        now = self._clock()
        with self._tx() as db:
            self._expire(db, now)
            row = db.execute(
                "SELECT * FROM jobs WHERE state = 'queued' ORDER BY priority DESC, id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = ?, lease_until = ?,"
                " updated = ? WHERE id = ?",
                (owner, now + lease_s, now, row["id"]),
            )
            self._log(db, row["id"], "leased", f"attempt {row['attempts'] + 1} by {owner}")
            self._bump(db, "jobs", "running")
            return Job(**db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def _expire(self, db, now: float) -> None:
        for row in db.execute(
            "SELECT * FROM jobs WHERE state = 'running' AND lease_until < ?", (now,)
        ).fetchall():
            if row["attempts"] >= row["max_attempts"]:
                error = f"worker stopped during the job {row['attempts']} times (lease expired)"
                db.execute(
                    "UPDATE jobs SET state = 'failed', error = ?, lease_owner = NULL, updated = ?, finished = ?"
                    " WHERE id = ?",
                    (error, now, now, row["id"]),
                )
                self._log(db, row["id"], "failed", error)
                self._bump(db, "jobs", "failed")
            else:
                db.execute(
                    "UPDATE jobs SET state = 'queued', lease_owner = NULL, updated = ? WHERE id = ?",
                    (now, row["id"]),
                )
                self._log(db, row["id"], "lease expired", f"{row['lease_owner']} stopped heartbeating")
                self._bump(db, "jobs", "lease_expired")

    def heartbeat(self, job_id: int, owner: str, lease_s: float) -> bool:
        """Extend the lease; False when this worker lost it (expired and taken by another)."""
        now = self._clock()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET lease_until = ?, updated = ? WHERE id = ? AND state = 'running' AND lease_owner = ?",
                (now + lease_s, now, job_id, owner),
            )
            return cur.rowcount == 1

    def complete(
        self,
        job_id: int,
        owner: str,
        outputs: Iterable[Output],
        routes: Iterable[tuple[str, str]],
        urgency: tuple[str, int] | None = None,
        discrepancies: int | None = None,
    ) -> str:
        """Record the stored outputs and create one pending delivery per (destination, kind) route.

        ``urgency`` (category, score) and ``discrepancies`` are kept on the job for operators and
        metrics; the job's deliveries go out in order of its score. Returns the job's new state. A job superseded while it ran keeps its outputs but delivers nothing:
        the newer job delivers the same UIDs.
        """
        now = self._clock()
        outputs = list(outputs)
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] != "running" or row["lease_owner"] != owner:
                return row["state"] if row else "missing"
            for o in outputs:
                if not o.orthanc_id:  # a notification, not a stored object
                    continue
                db.execute(
                    "INSERT OR REPLACE INTO outputs (job_id, kind, sop_uid, orthanc_id) VALUES (?, ?, ?, ?)",
                    (job_id, o.kind, o.sop_uid, o.orthanc_id),
                )
            by_kind = {o.kind: o for o in outputs}
            n = 0
            if row["superseded_by"] is None:
                for dest, kind in routes:
                    o = by_kind.get(kind)
                    if o is None:
                        continue
                    db.execute(
                        "INSERT OR IGNORE INTO deliveries (job_id, destination, kind, sop_uid, orthanc_id, state,"
                        " next_try, created, updated, payload) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
                        (job_id, dest, kind, o.sop_uid, o.orthanc_id, now, now, now, o.payload),
                    )
                    n += 1
            state = "superseded" if row["superseded_by"] is not None else ("delivering" if n else "done")
            category, score = urgency or (None, None)
            db.execute(
                "UPDATE jobs SET state = ?, error = NULL, lease_owner = NULL, updated = ?, finished = ?,"
                " urgency = ?, urgency_score = ?, discrepancies = ? WHERE id = ?",
                (state, now, now, category, score, discrepancies, job_id),
            )
            if category:
                self._bump(db, "urgency", category)
            if discrepancies:
                self._bump(db, "discrepancies", "", "", discrepancies)
            self._log(db, job_id, "processed", f"{len(outputs)} outputs stored, {n} deliveries queued")
            self._bump(db, "jobs", "processed")
            if state in ("done", "superseded"):
                self._bump(db, "jobs", state)
            return state

    def fail(self, job_id: int, owner: str, error: str, retry: bool = False) -> str:
        """Record an error. ``retry``: try again (a transient problem) until ``max_attempts``."""
        now = self._clock()
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] != "running" or row["lease_owner"] != owner:
                return row["state"] if row else "missing"
            state = "queued" if retry and row["attempts"] < row["max_attempts"] else "failed"
            db.execute(
                "UPDATE jobs SET state = ?, error = ?, lease_owner = NULL, updated = ?, finished = ? WHERE id = ?",
                (state, error, now, now if state == "failed" else None, job_id),
            )
            self._log(db, job_id, "failed" if state == "failed" else "error, will retry", error)
            self._bump(db, "jobs", "failed" if state == "failed" else "retried")
            return state

    # --- deliveries ---------------------------------------------------------------------------
    def due_deliveries(self, limit: int = 100) -> list[Delivery]:
        rows = self._db_read(
            "SELECT d.* FROM deliveries d JOIN jobs j ON j.id = d.job_id"
            " WHERE d.state = 'pending' AND d.next_try <= ?"
            " ORDER BY COALESCE(j.urgency_score, j.priority) DESC, d.id LIMIT ?",
            (self._clock(), limit),
        )
        return [Delivery(**r) for r in rows]

    def delivered(self, delivery_id: int) -> None:
        now = self._clock()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1, last_error = NULL,"
                " updated = ?, delivered = ? WHERE id = ? AND state = 'pending'",
                (now, now, delivery_id),
            )
            if cur.rowcount:
                dest = db.execute(
                    "SELECT destination FROM deliveries WHERE id = ?", (delivery_id,)
                ).fetchone()
                self._bump(db, "deliveries", dest[0], "delivered")
            self._settle(db, delivery_id, now)

    def delivery_failed(
        self, delivery_id: int, error: str, backoff_s: float, backoff_max_s: float, max_attempts: int
    ) -> str:
        """Schedule the next try with exponential backoff, or give up after ``max_attempts``."""
        now = self._clock()
        with self._tx() as db:
            row = db.execute("SELECT * FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
            if row is None or row["state"] != "pending":
                return row["state"] if row else "missing"
            attempts = row["attempts"] + 1
            state = "failed" if attempts >= max_attempts else "pending"
            delay = min(backoff_max_s, backoff_s * 2 ** (attempts - 1))
            db.execute(
                "UPDATE deliveries SET state = ?, attempts = ?, last_error = ?, next_try = ?, updated = ?"
                " WHERE id = ?",
                (state, attempts, error, now + delay, now, delivery_id),
            )
            self._bump(db, "deliveries", row["destination"], "failed" if state == "failed" else "error")
            if state == "pending":
                self._bump(db, "delivery_retries", row["destination"])
            if attempts == 1 or state == "failed":  # the first error and the last; not one line per retry
                self._log(
                    db,
                    row["job_id"],
                    "delivery failed" if state == "failed" else "delivery pending",
                    f"{row['destination']}/{row['kind']}: {error}",
                )
            self._settle(db, delivery_id, now)
            return state

    def _settle(self, db, delivery_id: int, now: float) -> None:
        """Once no delivery of a job is pending, the job is done (or failed if one gave up)."""
        job_id = db.execute("SELECT job_id FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()[0]
        counts = dict(
            db.execute("SELECT state, COUNT(*) FROM deliveries WHERE job_id = ? GROUP BY state", (job_id,))
        )
        if counts.get("pending"):
            return
        job = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if job["state"] != "delivering":
            return
        if counts.get("failed"):
            err = db.execute(
                "SELECT destination, last_error FROM deliveries WHERE job_id = ? AND state = 'failed' LIMIT 1",
                (job_id,),
            ).fetchone()
            error = f"delivery to {err[0]} failed: {err[1]}"
            db.execute(
                "UPDATE jobs SET state = 'failed', error = ?, updated = ? WHERE id = ?", (error, now, job_id)
            )
            self._log(db, job_id, "failed", error)
            self._bump(db, "jobs", "failed")
        else:
            db.execute("UPDATE jobs SET state = 'done', updated = ? WHERE id = ?", (now, job_id))
            self._bump(db, "jobs", "done")
            self._log(db, job_id, "delivered", f"{counts.get('delivered', 0)} objects")

    # --- operator -----------------------------------------------------------------------------
    def retry(self, job_id: int) -> str:
        """Operator retry: a failed job runs again; a job with failed deliveries retries them now."""
        now = self._clock()
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            if row["state"] != "failed":
                raise ValueError(f"job {job_id} is {row['state']}, only a failed job can be retried")
            failed = db.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_try = ?, updated = ?"
                " WHERE job_id = ? AND state = 'failed'",
                (now, now, job_id),
            ).rowcount
            state = "delivering" if failed else "queued"
            db.execute(
                "UPDATE jobs SET state = ?, attempts = 0, error = NULL, updated = ?, finished = NULL WHERE id = ?",
                (state, now, job_id),
            )
            self._log(db, job_id, "retry", f"by operator ({'deliveries' if failed else 'whole job'})")
            return state

    # --- priors -------------------------------------------------------------------------------
    def save_time_point(self, series_uid: str, model: str, data: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO time_points (series_uid, model, data, updated) VALUES (?, ?, ?, ?)",
                (series_uid, model, data, self._clock()),
            )

    def time_point(self, series_uid: str, model: str) -> str | None:
        rows = self._db_read(
            "SELECT data FROM time_points WHERE series_uid = ? AND model = ?", (series_uid, model)
        )
        return rows[0]["data"] if rows else None

    def mark_retrieved(self, series_uid: str) -> None:
        """A prior is about to arrive by C-MOVE: it is context, not work (see the plugin)."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO retrieved (series_uid, ts) VALUES (?, ?)", (series_uid, self._clock())
            )

    def was_retrieved(self, series_uid: str) -> bool:
        return bool(self._db_read("SELECT 1 FROM retrieved WHERE series_uid = ?", (series_uid,)))

    # --- reading --------------------------------------------------------------------------------
    def _db_read(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def job(self, job_id: int) -> Job | None:
        rows = self._db_read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return Job(**rows[0]) if rows else None

    def jobs(self, state: str | None = None, limit: int = 100) -> list[Job]:
        if state:
            rows = self._db_read(
                "SELECT * FROM jobs WHERE state = ? ORDER BY id DESC LIMIT ?", (state, limit)
            )
        else:
            rows = self._db_read("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
        return [Job(**r) for r in rows]

    def deliveries(self, job_id: int | None = None) -> list[Delivery]:
        if job_id is None:
            rows = self._db_read("SELECT * FROM deliveries ORDER BY id")
        else:
            rows = self._db_read("SELECT * FROM deliveries WHERE job_id = ? ORDER BY id", (job_id,))
        return [Delivery(**r) for r in rows]

    def history(self, job_id: int) -> list[dict]:
        return self._db_read("SELECT ts, event, detail FROM history WHERE job_id = ? ORDER BY id", (job_id,))

    def outputs(self, job_id: int) -> list[Output]:
        rows = self._db_read("SELECT kind, sop_uid, orthanc_id FROM outputs WHERE job_id = ?", (job_id,))
        return [Output(**r) for r in rows]

    def describe(self, job_id: int) -> dict | None:
        """Everything an operator sees about one job (JSON-ready, no patient data)."""
        job = self.job(job_id)
        if job is None:
            return None
        out = asdict(job)
        out["history"] = self.history(job_id)
        out["outputs"] = [asdict(o) for o in self.outputs(job_id)]
        out["deliveries"] = [asdict(d) for d in self.deliveries(job_id)]
        return out

    def stats(self) -> QueueStats:
        """Everything the metrics read from the queue, in one consistent read."""
        now = self._clock()
        with self._lock:
            db = self._db
            db.execute("BEGIN")  # one snapshot for all the reads below
            try:
                by_state = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
                oldest = db.execute("SELECT MIN(created) FROM jobs WHERE state = 'queued'").fetchone()[0]
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
            finally:
                db.execute("COMMIT")
        return QueueStats(
            jobs_by_state=by_state,
            oldest_queued_age_s=max(0.0, now - oldest) if oldest is not None else 0.0,
            deliveries=deliveries,
            oldest_pending_age_s={d: max(0.0, now - t) for d, t in pending.items()},
            counters=counters,
        )

    def writable(self) -> str | None:
        """None when a write transaction can be taken now; else why not (for /readyz)."""
        try:
            with self._lock:
                self._db.execute("PRAGMA busy_timeout=2000")  # a probe: answer in seconds, not 30
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    self._db.execute("ROLLBACK")
                finally:
                    self._db.execute("PRAGMA busy_timeout=30000")
        except sqlite3.Error as e:
            return f"queue {self.path}: {e}"
        return None

    def destination_status(self) -> dict[str, dict[str, int]]:
        """Per destination: how many deliveries are in each state."""
        out: dict[str, dict[str, int]] = {}
        for r in self._db_read("SELECT destination, state, COUNT(*) AS n FROM deliveries GROUP BY 1, 2"):
            out.setdefault(r["destination"], {})[r["state"]] = r["n"]
        return out


def to_json(obj) -> str:
    return json.dumps(obj, indent=1, default=str)
