"""Label sets: what a department's radiologists say a series shows, kept to train heads on.

A radiologist corrects the node's SEG, or draws a new structure, in their viewer and sends it to
the node like any object: a SEG the node did not write that references a series the node has is
recorded by the plugin as a label set for that series (never a job), with who sent it (the calling
AE title) and when. Classification labels come through ``pacs-node labels add --csv``. One label
set per series and source object: the same SEG sent again replaces its labels.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass

from node.identity import LabelKind
from node.service.queue.store import Store


@dataclass(frozen=True)
class Label:
    name: str  # the segment's label, or the finding's class
    code: str = ""  # the coded concept where one is given: "SCT:10200004"


@dataclass(frozen=True)
class LabelSet:
    id: int
    series_uid: str  # the labelled series
    kind: LabelKind
    source: str  # the SEG's SOP Instance UID, or the CSV file's name
    sender: str  # the calling AE title, or "cli"
    received: float
    labels: tuple[Label, ...]

    def as_json(self) -> dict:
        return {**asdict(self), "labels": [asdict(label) for label in self.labels]}


class Labels:
    def __init__(self, store: Store):
        self.store = store

    def add(self, series_uid: str, kind: LabelKind, source: str, sender: str, labels: list[Label]) -> int:
        with self.store.tx() as db:
            return self.add_in(db, series_uid, kind, source, sender, labels)

    def add_in(
        self, db: sqlite3.Connection, series_uid: str, kind: LabelKind, source: str, sender: str, labels: list[Label]
    ) -> int:
        """:meth:`add` inside the caller's transaction; the label set's ID."""
        row = db.execute(
            "INSERT INTO label_sets (series_uid, kind, source, sender, received, labels) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (series_uid, source) DO UPDATE SET kind = excluded.kind, sender = excluded.sender,"
            " received = excluded.received, labels = excluded.labels RETURNING id",
            (series_uid, kind, source, sender, self.store.clock(), json.dumps([asdict(x) for x in labels])),
        ).fetchone()
        return int(row["id"])

    def list(self, series_uid: str | None = None) -> list[LabelSet]:
        where, args = ("WHERE series_uid = ?", (series_uid,)) if series_uid else ("", ())
        rows = self.store.read(f"SELECT * FROM label_sets {where} ORDER BY id", args)
        return [
            LabelSet(**{**r, "kind": LabelKind(r["kind"]), "labels": tuple(Label(**x) for x in json.loads(r["labels"]))})
            for r in rows
        ]

    def remove(self, label_set_id: int) -> bool:
        with self.store.tx() as db:
            return db.execute("DELETE FROM label_sets WHERE id = ?", (label_set_id,)).rowcount > 0
