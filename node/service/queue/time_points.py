"""What each processed series showed (its lesions as tracked points), kept per series and model, so a
later series of the patient is compared with it without inferring it again. No image, no patient data.
"""

from __future__ import annotations

from node.analysis.change import TimePoint
from node.service.queue.store import Store


class TimePoints:
    def __init__(self, store: Store):
        self.store = store

    def save(self, model: str, tp: TimePoint) -> None:
        """``model``: name and version; another model's lesions are not comparable."""
        with self.store.tx() as db:
            db.execute(
                "INSERT INTO time_points (series_uid, model, data, updated) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (series_uid, model) DO UPDATE SET data = excluded.data, updated = excluded.updated",
                (tp.series_uid, model, tp.to_json(), self.store.clock()),
            )

    def get(self, series_uid: str, model: str) -> TimePoint | None:
        rows = self.store.read(
            "SELECT data FROM time_points WHERE series_uid = ? AND model = ?", (series_uid, model)
        )
        return TimePoint.from_json(rows[0]["data"]) if rows else None
