"""The job state machine: one job per stable series the routing rules accept.

``queued`` -> ``running`` (leased by a worker, kept by its heartbeat) -> ``delivering`` ->
``done``; ``failed`` after ``max_attempts`` (its error kept); ``superseded`` when late instances
of the same series started a newer job. A running job whose worker stops heartbeating is leased
again once its lease has expired. Every transition is one transaction with its history line and
counter, so what operators read and what the metrics count never disagree.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from node.analysis.urgency import Urgency
from node.identity import JobEvent, JobState, ModelRun
from node.service.queue.counters import Counter, bump
from node.service.queue.outbox import Outbox, Output, Route
from node.service.queue.store import Store, journal
from node.service.queue.wakeup import Channel

# states in which a job still stands for its instances (a resubmission of them makes no new job)
ACTIVE = (JobState.QUEUED, JobState.RUNNING, JobState.DELIVERING, JobState.DONE)


@dataclass
class Job:
    id: int
    series_id: str
    study_id: str
    modality: str
    instances: int
    fingerprint: str
    state: JobState
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
    models: tuple[ModelRun, ...] | str = ()  # each model's part (the column holds them as JSON)

    def __post_init__(self) -> None:
        self.state = JobState(self.state)
        if isinstance(self.models, str):
            self.models = tuple(ModelRun(**m) for m in json.loads(self.models or "[]"))


@dataclass(frozen=True)
class HistoryEntry:
    ts: float
    event: str
    detail: str


@dataclass(frozen=True)
class Submitted:
    job_id: int | None  # None: no new job (the same instances were already processed or queued)
    reason: str


class Jobs:
    def __init__(self, store: Store, outbox: Outbox):
        self.store = store
        self.outbox = outbox

    def _get(self, db: sqlite3.Connection, job_id: int) -> Job | None:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job(**row) if row else None

    # --- producer (the plugin) --------------------------------------------------------------
    def submit(self, series_id: str, **kw) -> Submitted:
        """Record that ``series_id`` is stable and eligible; decide whether it needs a (new) job.

        ``priority``: the request's urgency points (:func:`node.analysis.urgency.request_points`);
        the queue leases the highest first, then the oldest."""
        with self.store.tx() as db:
            return self.submit_in(db, series_id, **kw)

    def submit_in(
        self,
        db: sqlite3.Connection,
        series_id: str,
        *,
        study_id: str = "",
        modality: str = "",
        instances: int = 0,
        fingerprint: str = "",
        max_attempts: int = 3,
        priority: int = 0,
    ) -> Submitted:
        """:meth:`submit` inside the caller's transaction."""
        now = self.store.clock()
        row = db.execute(  # FOR UPDATE: a queued job being leased now is seen as leased
            "SELECT * FROM jobs WHERE series_id = ? AND state != ? ORDER BY id DESC LIMIT 1" + self.store.FOR_UPDATE,
            (series_id, JobState.SUPERSEDED),
        ).fetchone()
        latest = Job(**row) if row else None
        if latest and fingerprint and latest.fingerprint == fingerprint and latest.state in ACTIVE:
            journal(db, latest.id, now, "resubmitted", "same instances as this job: no new job")
            bump(db, Counter.JOBS, JobEvent.DEDUPLICATED)
            return Submitted(None, f"same instances already in job {latest.id} ({latest.state})")
        if latest and latest.state is JobState.QUEUED:
            db.execute(
                "UPDATE jobs SET instances = ?, fingerprint = ?, updated = ? WHERE id = ?",
                (instances, fingerprint, now, latest.id),
            )
            journal(db, latest.id, now, "updated", f"more instances before start: {instances}")
            return Submitted(latest.id, "queued job updated")
        cur = db.execute(
            "INSERT INTO jobs (series_id, study_id, modality, instances, fingerprint, state, max_attempts,"
            " supersedes, created, updated, priority) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                series_id,
                study_id,
                modality,
                instances,
                fingerprint,
                JobState.QUEUED,
                max_attempts,
                latest.id if latest else None,
                now,
                now,
                priority,
            ),
        )
        job_id = int(cur.fetchone()["id"])
        bump(db, Counter.JOBS, JobEvent.QUEUED)
        self.store.notify(db, Channel.JOBS)
        if latest is None:
            journal(
                db,
                job_id,
                now,
                "queued",
                f"{modality} series, {instances} instances, priority {priority}",
            )
            return Submitted(job_id, "new series")
        why = (
            f"re-sent after job {latest.id} failed"
            if latest.state is JobState.FAILED
            else f"late instances: {latest.instances} -> {instances}"
        )
        journal(db, job_id, now, "queued", f"{why}; supersedes job {latest.id}")
        db.execute("UPDATE jobs SET superseded_by = ?, updated = ? WHERE id = ?", (job_id, now, latest.id))
        if latest.state in (JobState.DELIVERING, JobState.DONE):
            # results of the old run are replaced (same output UIDs): stop delivering them
            db.execute("UPDATE jobs SET state = ? WHERE id = ?", (JobState.SUPERSEDED, latest.id))
            bump(db, Counter.JOBS, JobEvent.SUPERSEDED)
            self.outbox.cancel(db, latest.id, now)
        journal(db, latest.id, now, "superseded", f"by job {job_id} ({why})")
        return Submitted(job_id, why)

    # --- consumer (the worker) --------------------------------------------------------------
    def lease(self, owner: str, lease_s: float) -> Job | None:
        """Take the most urgent, then oldest, queued job (or one whose lease expired) for ``lease_s`` s."""
        now = self.store.clock()
        expired = self.store.read(
            "SELECT id FROM jobs WHERE state = ? AND lease_until < ? LIMIT 1", (JobState.RUNNING, now)
        )
        if expired:
            with self.store.tx() as db:
                self._expire(db, now)
        # on PostgreSQL leases run side by side: each locks the job it takes and passes over those
        # other leases hold (SKIP LOCKED), so urgency order holds among the jobs not being leased
        with self.store.tx(serialised=False) as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE state = ? ORDER BY priority DESC, id LIMIT 1" + self.store.SKIP_LOCKED,
                (JobState.QUEUED,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, lease_owner = ?, lease_until = ?,"
                " updated = ? WHERE id = ?",
                (JobState.RUNNING, owner, now + lease_s, now, row["id"]),
            )
            journal(db, row["id"], now, "leased", f"attempt {row['attempts'] + 1} by {owner}")
            bump(db, Counter.JOBS, JobEvent.RUNNING)  # last: the row every lease bumps, held until commit
            return self._get(db, row["id"])

    def _expire(self, db: sqlite3.Connection, now: float) -> None:
        rows = db.execute(
            "SELECT * FROM jobs WHERE state = ? AND lease_until < ?", (JobState.RUNNING, now)
        ).fetchall()
        if any(r["attempts"] < r["max_attempts"] for r in rows):  # queued again: other workers may take them
            self.store.notify(db, Channel.JOBS)
        for row in rows:
            if row["attempts"] >= row["max_attempts"]:
                error = f"worker stopped during the job {row['attempts']} times (lease expired)"
                db.execute(
                    "UPDATE jobs SET state = ?, error = ?, lease_owner = NULL, updated = ?, finished = ? WHERE id = ?",
                    (JobState.FAILED, error, now, now, row["id"]),
                )
                journal(db, row["id"], now, "failed", error)
                bump(db, Counter.JOBS, JobEvent.FAILED)
            else:
                db.execute(
                    "UPDATE jobs SET state = ?, lease_owner = NULL, updated = ? WHERE id = ?",
                    (JobState.QUEUED, now, row["id"]),
                )
                journal(db, row["id"], now, "lease expired", f"{row['lease_owner']} stopped heartbeating")
                bump(db, Counter.JOBS, JobEvent.LEASE_EXPIRED)

    def release(self, owner: str, why: str) -> list[int]:
        """Give back at once every job ``owner`` runs (its process is known to be dead), rather than
        after its lease: queued again, or failed when that was its last attempt."""
        now = self.store.clock()
        with self.store.tx() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE state = ? AND lease_owner = ?", (JobState.RUNNING, owner)
            ).fetchall()
            if any(r["attempts"] < r["max_attempts"] for r in rows):
                self.store.notify(db, Channel.JOBS)
            for row in rows:
                last = row["attempts"] >= row["max_attempts"]
                state = JobState.FAILED if last else JobState.QUEUED
                error = f"{why} during the job {row['attempts']} times" if last else row["error"]
                db.execute(
                    "UPDATE jobs SET state = ?, error = ?, lease_owner = NULL, updated = ?, finished = ?"
                    " WHERE id = ?",
                    (state, error, now, now if last else None, row["id"]),
                )
                journal(db, row["id"], now, "failed" if last else "released", f"{owner}: {why}")
                bump(db, Counter.JOBS, JobEvent.FAILED if last else JobEvent.RELEASED)
            return [r["id"] for r in rows]

    def heartbeat(self, job_id: int, owner: str, lease_s: float) -> bool:
        """Extend the lease; False when this worker lost it (expired and taken by another)."""
        now = self.store.clock()
        with self.store.tx() as db:
            cur = db.execute(
                "UPDATE jobs SET lease_until = ?, updated = ? WHERE id = ? AND state = ? AND lease_owner = ?",
                (now + lease_s, now, job_id, JobState.RUNNING, owner),
            )
            return cur.rowcount == 1

    def complete(
        self,
        job_id: int,
        owner: str,
        outputs: Iterable[Output],
        routes: Iterable[Route],
        urgency: Urgency | None = None,
        discrepancies: int | None = None,
        models: Iterable[ModelRun] = (),
    ) -> JobState | None:
        """Record the stored outputs and create one pending delivery per route, in one transaction.

        ``urgency`` and ``discrepancies`` are kept on the job for operators and metrics; the job's
        deliveries go out in order of its score. ``models``: each model's part; the job's error names
        those that failed (its results are those of the others). Returns the job's new state (None:
        no such job).
        A job superseded while it ran keeps its outputs but delivers nothing: the newer job delivers
        the same UIDs. A job this worker no longer holds is left as it is.
        """
        now = self.store.clock()
        outputs = list(outputs)
        with self.store.tx() as db:
            job = self._get(db, job_id)
            if job is None or job.state is not JobState.RUNNING or job.lease_owner != owner:
                return job.state if job else None
            for o in outputs:
                if o.kind.is_dicom:
                    db.execute(
                        "INSERT INTO outputs (job_id, kind, sop_uid, orthanc_id) VALUES (?, ?, ?, ?) ON CONFLICT (job_id, kind)"
                        " DO UPDATE SET sop_uid = excluded.sop_uid, orthanc_id = excluded.orthanc_id",
                        (job_id, o.kind, o.sop_uid, o.orthanc_id),
                    )
            superseded = job.superseded_by is not None
            n = 0 if superseded else self.outbox.add(db, job_id, outputs, routes, now)
            state = JobState.SUPERSEDED if superseded else JobState.DELIVERING if n else JobState.DONE
            category, score = (urgency.category, urgency.score) if urgency else (None, None)
            models = list(models)
            failed = "; ".join(f"model {m.model} failed: {m.error}" for m in models if m.error) or None
            db.execute(
                "UPDATE jobs SET state = ?, error = ?, lease_owner = NULL, updated = ?, finished = ?,"
                " urgency = ?, urgency_score = ?, discrepancies = ?, models = ? WHERE id = ?",
                (state, failed, now, now, category, score, discrepancies, json.dumps([asdict(m) for m in models]), job_id),
            )
            for m in models:
                bump(db, Counter.MODEL_RUNS, m.model, m.outcome)
                if m.error:
                    journal(db, job_id, now, "model_failed", f"{m.model}: {m.error}")
            if category:
                bump(db, Counter.URGENCY, category)
            if discrepancies:
                bump(db, Counter.DISCREPANCIES, "", "", discrepancies)
            journal(db, job_id, now, "processed", f"{len(outputs)} outputs stored, {n} deliveries queued")
            bump(db, Counter.JOBS, JobEvent.PROCESSED)
            if state is not JobState.DELIVERING:
                bump(db, Counter.JOBS, JobEvent(state.value))
            return state

    def fail(
        self, job_id: int, owner: str, error: str, retry: bool = False, counted: bool = True
    ) -> JobState | None:
        """Record an error. ``retry``: try again (a transient problem) until ``max_attempts``;
        ``counted=False``: the attempt does not count (a server the job needs was down), so the job
        waits for it however long it takes."""
        now = self.store.clock()
        with self.store.tx() as db:
            job = self._get(db, job_id)
            if job is None or job.state is not JobState.RUNNING or job.lease_owner != owner:
                return job.state if job else None
            again = retry and (job.attempts < job.max_attempts or not counted)
            state = JobState.QUEUED if again else JobState.FAILED
            db.execute(
                "UPDATE jobs SET state = ?, error = ?, lease_owner = NULL, updated = ?, finished = ?,"
                " attempts = attempts - ? WHERE id = ?",
                (state, error, now, None if again else now, 0 if counted else 1, job_id),
            )
            journal(db, job_id, now, "error, will retry" if again else "failed", error)
            bump(db, Counter.JOBS, JobEvent.RETRIED if again else JobEvent.FAILED)
            if again:
                self.store.notify(db, Channel.JOBS)
            return state

    # --- operator -----------------------------------------------------------------------------
    def retry(self, job_id: int) -> JobState:
        """Operator retry: a failed job runs again; a job with failed deliveries retries them now."""
        now = self.store.clock()
        with self.store.tx() as db:
            job = self._get(db, job_id)
            if job is None:
                raise KeyError(job_id)
            if job.state is not JobState.FAILED:
                raise ValueError(f"job {job_id} is {job.state}, only a failed job can be retried")
            failed = self.outbox.retry_failed(db, job_id, now)
            state = JobState.DELIVERING if failed else JobState.QUEUED
            db.execute(
                "UPDATE jobs SET state = ?, attempts = 0, error = NULL, updated = ?, finished = NULL WHERE id = ?",
                (state, now, job_id),
            )
            journal(db, job_id, now, "retry", f"by operator ({'deliveries' if failed else 'whole job'})")
            if not failed:
                self.store.notify(db, Channel.JOBS)
            return state

    # --- reading --------------------------------------------------------------------------------
    def get(self, job_id: int) -> Job | None:
        rows = self.store.read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return Job(**rows[0]) if rows else None

    def recent(self, state: JobState | None = None, limit: int = 100) -> list[Job]:
        """The newest jobs first, all or those in ``state``."""
        if state:
            rows = self.store.read(
                "SELECT * FROM jobs WHERE state = ? ORDER BY id DESC LIMIT ?", (JobState(state), limit)
            )
        else:
            rows = self.store.read("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
        return [Job(**r) for r in rows]

    def history(self, job_id: int) -> list[HistoryEntry]:
        rows = self.store.read(
            "SELECT ts, event, detail FROM history WHERE job_id = ? ORDER BY id", (job_id,)
        )
        return [HistoryEntry(**r) for r in rows]

    def outputs(self, job_id: int) -> list[Output]:
        rows = self.store.read("SELECT kind, sop_uid, orthanc_id FROM outputs WHERE job_id = ?", (job_id,))
        return [Output(**r) for r in rows]

    def describe(self, job_id: int) -> dict | None:
        """Everything an operator sees about one job (JSON-ready, no patient data)."""
        job = self.get(job_id)
        if job is None:
            return None
        out = asdict(job)
        out["history"] = [asdict(h) for h in self.history(job_id)]
        out["outputs"] = [asdict(o) for o in self.outputs(job_id)]
        out["deliveries"] = [asdict(d) for d in self.outbox.of_job(job_id)]
        return out
