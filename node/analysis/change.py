"""What a comparison with a prior says: time points, lesion changes, and the RECIST 1.1-like rules.

Plain data (no inference, no writer): :class:`~node.analysis.findings.Findings` carries a
:class:`Comparison`, the queue keeps a :class:`TimePoint` per processed series, and
:mod:`node.analysis.longitudinal` computes both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import highdicom as hd
import numpy as np

INCREASE_FRACTION, INCREASE_MM = 0.20, 5.0
DECREASE_FRACTION = 0.30
# two lesions are the same when their centroids are this close after alignment: half their mean
# diameter, but never less than MIN_REACH_MM (registration error, centroid shift as lesions grow)
MIN_REACH_MM = 15.0

Status = Literal["new", "increased", "stable", "decreased", "resolved"]


@dataclass(frozen=True)
class TrackedLesion:
    tracking_uid: str
    label: str
    centroid: np.ndarray  # LPS mm, in its own series' patient space
    diameter_mm: float
    volume_ml: float


@dataclass
class TimePoint:
    """What one series showed: enough to compare a later series with it."""

    series_uid: str
    frame_of_reference: str
    acquired: datetime | None
    lesions: list[TrackedLesion]
    volume: hd.Volume | None = None  # for registration when a later series has another frame of reference
    modality: str = "CT"
    order: int = 1  # 1 for the first exam of the patient we compared, then 2, 3, ...

    def to_json(self) -> str:
        """What the node keeps of a processed series (no image, no patient data): enough to compare a
        later series with it without inferring it again."""
        return json.dumps(
            {
                "series_uid": self.series_uid,
                "frame_of_reference": self.frame_of_reference,
                "acquired": self.acquired.isoformat() if self.acquired else None,
                "modality": self.modality,
                "order": self.order,
                "lesions": [
                    {
                        "tracking_uid": t.tracking_uid,
                        "label": t.label,
                        "centroid": [float(v) for v in t.centroid],
                        "diameter_mm": t.diameter_mm,
                        "volume_ml": t.volume_ml,
                    }
                    for t in self.lesions
                ],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> TimePoint:
        d = json.loads(text)
        lesions = [
            TrackedLesion(
                t["tracking_uid"], t["label"], np.asarray(t["centroid"]), t["diameter_mm"], t["volume_ml"]
            )
            for t in d["lesions"]
        ]
        acquired = datetime.fromisoformat(d["acquired"]) if d["acquired"] else None
        return cls(
            d["series_uid"], d["frame_of_reference"], acquired, lesions, None, d["modality"], d["order"]
        )


@dataclass(frozen=True)
class LesionChange:
    status: Status
    tracking_uid: str
    label: str  # the current label ("Lesion 2"); the prior's for a resolved lesion
    diameter_mm: float | None  # now (None when resolved)
    prior_diameter_mm: float | None  # before (None when new)
    volume_ml: float | None = None
    prior_volume_ml: float | None = None

    @property
    def diameter_change(self) -> float | None:
        """Relative change of the longest diameter (0.35 = +35 %)."""
        if not self.diameter_mm or not self.prior_diameter_mm:
            return None
        return self.diameter_mm / self.prior_diameter_mm - 1.0

    @property
    def volume_change(self) -> float | None:
        if not self.volume_ml or not self.prior_volume_ml:
            return None
        return self.volume_ml / self.prior_volume_ml - 1.0

    def tag(self) -> str:
        """The short label a radiologist reads on the image: NEW, +35%, -40%, stable, GONE."""
        if self.status == "new":
            return "NEW"
        if self.status == "resolved":
            return "GONE"
        change = self.diameter_change
        return "stable" if self.status == "stable" or change is None else f"{change:+.0%}"

    def sentence(self, interval_days: int | None) -> str:
        when = f" in {interval_days} days" if interval_days is not None else ""
        if self.status == "new":
            return f"{self.label}: new, {self.diameter_mm:.0f} mm"
        if self.status == "resolved":
            return f"prior {self.label}: resolved (was {self.prior_diameter_mm:.0f} mm)"
        vol = f", volume {self.volume_change:+.0%}" if self.volume_change is not None else ""
        return (
            f"{self.label}: {self.status}, {self.prior_diameter_mm:.0f} -> {self.diameter_mm:.0f} mm "
            f"({self.diameter_change:+.0%}{vol}){when}"
        )


@dataclass
class Comparison:
    """The current series against one prior."""

    prior_series_uid: str
    interval_days: int | None
    changes: list[LesionChange] = field(default_factory=list)
    how: str = ""  # how the two were aligned, for the report
    order: int = 2  # the current series' time point order (the prior's + 1)

    def by_uid(self) -> dict[str, LesionChange]:
        return {c.tracking_uid: c for c in self.changes}

    @property
    def new(self) -> int:
        return sum(c.status == "new" for c in self.changes)

    @property
    def sum_now_mm(self) -> float:
        return sum(c.diameter_mm or 0.0 for c in self.changes)

    @property
    def sum_before_mm(self) -> float:
        return sum(c.prior_diameter_mm or 0.0 for c in self.changes)

    @property
    def overall(self) -> str:
        """RECIST-like overall assessment on the sum of diameters and new lesions."""
        now, before = self.sum_now_mm, self.sum_before_mm
        if self.new or (now - before >= INCREASE_MM and now >= before * (1 + INCREASE_FRACTION)):
            return "progression"
        if before and now == 0:
            return "complete response"
        if before and now <= before * (1 - DECREASE_FRACTION):
            return "partial response"
        return "stable disease"

    def summary(self) -> str:
        return (
            f"compared with prior series ({self.how}, {self.interval_days} days earlier): "
            f"{self.new} new lesion(s), sum of diameters {self.sum_now_mm:.0f} mm "
            f"(was {self.sum_before_mm:.0f} mm): {self.overall}"
        )


def classify(before_mm: float, now_mm: float) -> Status:
    """RECIST 1.1-like: +20 % and +5 mm is increased, -30 % decreased, else stable."""
    if now_mm - before_mm >= INCREASE_MM and now_mm >= before_mm * (1 + INCREASE_FRACTION):
        return "increased"
    if now_mm <= before_mm * (1 - DECREASE_FRACTION):
        return "decreased"
    return "stable"
