"""Priors the worker retrieved from a PACS for comparison: context, never work of their own.

The worker marks a series before its C-MOVE starts; the plugin skips it when it turns stable.
"""

from __future__ import annotations

from node.service.queue.store import Store


class RetrievedPriors:
    def __init__(self, store: Store):
        self.store = store

    def mark(self, series_uid: str) -> None:
        """A prior is about to arrive by C-MOVE: it is context, not work (see the plugin)."""
        with self.store.tx() as db:
            db.execute(
                "INSERT INTO retrieved (series_uid, ts) VALUES (?, ?) ON CONFLICT (series_uid) DO UPDATE SET ts = excluded.ts",
                (series_uid, self.store.clock()),
            )

    def __contains__(self, series_uid: str) -> bool:
        return bool(self.store.read("SELECT 1 FROM retrieved WHERE series_uid = ?", (series_uid,)))
