"""What the plugin decided for each stable series, and where the pick-up at start resumes.

Every stable series ends in one transaction as a job (:meth:`Intake.accept`) or as a skip with its
rule (:meth:`Intake.skip`), counted with it. At every start the plugin reads Orthanc's change log
from the last position it read (kept here) and gives every series it never decided on the same
treatment, so a series whose stable event was lost to a crash or a stop is still processed, once.
"""

from __future__ import annotations

from node.identity import JobEvent
from node.service.queue.counters import Counter, bump
from node.service.queue.jobs import Jobs, Submitted
from node.service.queue.labels import Labels
from node.service.queue.store import Store

CHANGE_SEQ = "orthanc_change_seq"


class Intake:
    def __init__(self, store: Store, jobs: Jobs, labels: Labels):
        self.store = store
        self.jobs = jobs
        self.labels = labels

    def decided(self, series_id: str, fingerprint: str) -> bool:
        """A job or a skip already stands for exactly these instances of the series."""
        args = (series_id, fingerprint)
        return bool(
            self.store.read("SELECT 1 FROM jobs WHERE series_id = ? AND fingerprint = ? LIMIT 1", args)
            or self.store.read("SELECT 1 FROM skipped WHERE series_id = ? AND fingerprint = ?", args)
        )

    def skip(self, series_id: str, fingerprint: str, label: str, rule: str, label_sets: tuple = ()) -> None:
        """``label``: the series' modality as a metric label (bounded, PHI-free); ``label_sets``: the
        :meth:`Labels.add` arguments of the label sets the series holds, recorded with the skip."""
        with self.store.tx() as db:
            for args in label_sets:
                self.labels.add_in(db, *args)
            db.execute(
                "INSERT INTO skipped (series_id, fingerprint, rule, ts) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (series_id, fingerprint) DO UPDATE SET rule = excluded.rule, ts = excluded.ts",
                (series_id, fingerprint, rule, self.store.clock()),
            )
            bump(db, Counter.SERIES_RECEIVED, label)
            bump(db, Counter.JOBS, JobEvent.SKIPPED, rule)

    def accept(self, series_id: str, fingerprint: str, label: str, **job) -> Submitted:
        """``job``: :meth:`Jobs.submit_in`'s keywords (study_id, modality, instances, priority...)."""
        with self.store.tx() as db:
            bump(db, Counter.SERIES_RECEIVED, label)
            return self.jobs.submit_in(db, series_id, fingerprint=fingerprint, **job)

    def change_seq(self) -> int:
        rows = self.store.read("SELECT value FROM meta WHERE key = ?", (CHANGE_SEQ,))
        return int(rows[0]["value"]) if rows else 0

    def set_change_seq(self, seq: int) -> None:
        with self.store.tx() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (CHANGE_SEQ, str(seq)),
            )
