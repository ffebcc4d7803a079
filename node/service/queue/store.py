"""The queue file: one SQLite database in WAL mode, its schema, additive migrations and transactions.

Both the Orthanc plugin (producer) and the worker (consumer) open it; every state change is a
short ``BEGIN IMMEDIATE`` transaction, so a crash of either side loses nothing. Stdlib only on
purpose: the plugin imports the queue inside Orthanc's embedded Python, where neither the venv
nor pydantic exist.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from node.service.queue.wakeup import Channel, Sleeper, Waker

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_id TEXT NOT NULL,          -- Orthanc's series ID (a hash: no patient data)
    study_id TEXT NOT NULL DEFAULT '',
    modality TEXT NOT NULL DEFAULT '',
    instances INTEGER NOT NULL DEFAULT 0,
    fingerprint TEXT NOT NULL DEFAULT '',  -- hash of the instance IDs: what this job processes
    state TEXT NOT NULL,              -- node.identity.JobState
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
    discrepancies INTEGER,                -- report statements the image contradicts
    models TEXT NOT NULL DEFAULT ''       -- JSON: each model's part (node.identity.ModelRun)
);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs(series_id);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS outputs (
    job_id INTEGER NOT NULL,
    kind TEXT NOT NULL,               -- node.identity.OutputKind
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
    state TEXT NOT NULL,              -- node.identity.DeliveryState
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
-- what each processed series showed (node.analysis.change.TimePoint, JSON): a later series of the
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
-- stable series the plugin decided to keep from a job (routing rules, its own outputs): with the
-- jobs' fingerprints, every series it has decided on, so the pick-up at start handles only the others
CREATE TABLE IF NOT EXISTS skipped (
    series_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    rule TEXT NOT NULL,               -- node.identity.SkipRule
    ts REAL NOT NULL,
    PRIMARY KEY (series_id, fingerprint)
);
CREATE INDEX IF NOT EXISTS jobs_fingerprint ON jobs(series_id, fingerprint);
-- small durable facts: the last Orthanc change the pick-up has read (orthanc_change_seq)
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- what radiologists say series show, to train heads on (labels.py): never jobs
CREATE TABLE IF NOT EXISTS label_sets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL,         -- the labelled series
    kind TEXT NOT NULL,
    source TEXT NOT NULL,             -- the SEG's SOP Instance UID, or the CSV's name
    sender TEXT NOT NULL DEFAULT '',  -- the calling AE title, or cli
    received REAL NOT NULL,
    labels TEXT NOT NULL,             -- JSON: [{name, code}]
    UNIQUE (series_uid, source)
);
-- monotonic counts for the metrics (durable: they survive restarts of Orthanc and the worker);
-- labels are bounded enums or operator-chosen names (destinations), never patient data
CREATE TABLE IF NOT EXISTS counters (
    name TEXT NOT NULL,               -- node.service.queue.counters.Counter
    label TEXT NOT NULL DEFAULT '',   -- outcome, modality or destination
    sublabel TEXT NOT NULL DEFAULT '',  -- skip rule, delivery outcome
    value INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, label, sublabel)
);
"""

# columns added after the first release: a queue file written by an older node gains them at open
MIGRATIONS = {
    "jobs": {
        "priority": "INTEGER NOT NULL DEFAULT 0",
        "urgency": "TEXT",
        "urgency_score": "INTEGER",
        "discrepancies": "INTEGER",
        "models": "TEXT NOT NULL DEFAULT ''",
    },
    "deliveries": {"payload": "TEXT NOT NULL DEFAULT ''"},
}


class Store:
    """A connection to the queue file; safe to share between threads of one process."""

    def __init__(self, path: Path | str, clock: Callable[[], float] = time.time):
        self.path = str(path)
        self.clock = clock
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

    errors: tuple[type[Exception], ...] = (sqlite3.Error,)  # what a failing queue raises
    # row locks for PostgreSQL's concurrent leases (postgres.py); SQLite's one writer needs none
    FOR_UPDATE = ""
    SKIP_LOCKED = ""

    def tx(self, serialised: bool = True) -> _Tx:
        """``with store.tx() as db:`` one write transaction, committed on success, rolled back on error.
        ``serialised=False``: one that locks the rows it changes instead (PostgreSQL; SQLite has one writer)."""
        return _Tx(self)

    def read(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def snapshot(self) -> _Snapshot:
        """``with store.snapshot() as db:`` several reads that see one consistent state."""
        return _Snapshot(self)

    def notify(self, db: sqlite3.Connection, channel: Channel) -> None:
        """Inside a write transaction: ``channel``'s waiters may look (none to tell here: they poll)."""

    def waker(self, channel: Channel) -> Waker:
        return Sleeper()

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


class _Tx:
    def __init__(self, store: Store):
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.store._lock.acquire()
        self.store._db.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlocks
        return self.store._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.store._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.store._lock.release()


class _Snapshot(_Tx):
    def __enter__(self) -> sqlite3.Connection:
        self.store._lock.acquire()
        self.store._db.execute("BEGIN")
        return self.store._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.store._db.execute("COMMIT")
        finally:
            self.store._lock.release()


def journal(db: sqlite3.Connection, job_id: int, ts: float, event: str, detail: str = "") -> None:
    """Append to a job's history (what an operator reads at ``/inference/jobs/{id}``)."""
    db.execute(
        "INSERT INTO history (job_id, ts, event, detail) VALUES (?, ?, ?, ?)", (job_id, ts, event, detail)
    )
