"""Compare a series with a prior of the same patient: match lesions, say what changed.

Lesions are points in patient space (their mask's centroid, LPS mm) with a longest in-plane
diameter and a volume. Prior points are brought into the current series' space by a rigid
transform (identity when both share a Frame of Reference, else :mod:`node.registration`),
then matched one-to-one (Hungarian assignment on distance, gated), and each lesion is
classified with RECIST 1.1-like thresholds on the longest diameter:

- increased: at least +20 % **and** at least +5 mm;
- decreased: at least -30 %;
- stable: anything in between;
- new: no prior lesion within reach; resolved: a prior lesion with no current match.

A matched lesion keeps the prior's Tracking UID, so the same lesion has the same UID in every
report of that patient; a new lesion keeps the UID its own series gave it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal

import highdicom as hd
import numpy as np
from scipy.optimize import linear_sum_assignment

from node.findings import Findings

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


def time_point(findings: Findings) -> TimePoint:
    """The lesions of ``findings`` as points in its patient space, with their tracking UIDs."""
    from node.writers.seg import tracking_uid

    vol = findings.series.volume
    lesions = []
    for s in findings.lesions:
        ijk = np.argwhere(s.mask).mean(axis=0)
        centroid = (vol.affine @ np.append(ijk, 1.0))[:3]
        lesions.append(
            TrackedLesion(
                tracking_uid(findings, s), s.label, centroid, s.longest_diameter_mm or 0.0, s.volume_ml
            )
        )
    return TimePoint(
        findings.series.series_uid,
        vol.frame_of_reference_uid,
        acquired(findings.series.datasets[0]),
        lesions,
        vol,
        findings.series.modality,
    )


def track(findings: Findings, prior: TimePoint, current: TimePoint) -> TimePoint:
    """Compare ``findings`` (whose time point is ``current``) with ``prior``; matched lesions take
    the prior's Tracking UID. Sets ``findings.comparison`` and returns ``current`` with the UIDs the
    lesions now carry (for the next time point).
    """
    if prior.frame_of_reference == current.frame_of_reference:
        transform, how = np.eye(4), "same frame of reference"
    else:
        from node.registration import register_rigid

        transform, _ = register_rigid(prior.volume, current.volume, current.modality)
        how = "rigid registration"
    comparison = compare(prior, current, transform, how)
    uid = {c.label: c.tracking_uid for c in comparison.changes if c.status != "resolved"}
    for s in findings.lesions:
        s.tracking_uid = uid[s.label]
    findings.comparison = comparison
    lesions = [replace(t, tracking_uid=uid[t.label]) for t in current.lesions]
    return replace(current, lesions=lesions, order=comparison.order)


def acquired(ds) -> datetime | None:
    """Series (else study, else content) date and time of a source instance header."""
    for date, time in (
        ("SeriesDate", "SeriesTime"),
        ("StudyDate", "StudyTime"),
        ("ContentDate", "ContentTime"),
    ):
        d = str(ds.get(date, "") or "")
        if len(d) == 8:
            t = (str(ds.get(time, "") or "").split(".")[0] + "000000")[:6]
            try:
                return datetime.strptime(d + t, "%Y%m%d%H%M%S")
            except ValueError:
                continue
    return None


def compare(prior: TimePoint, current: TimePoint, prior_to_current: np.ndarray, how: str) -> Comparison:
    """Match ``current``'s lesions to ``prior``'s (mapped by the 4x4 ``prior_to_current``)."""
    interval = None
    if prior.acquired and current.acquired:
        interval = (current.acquired - prior.acquired).days
    moved = [(prior_to_current @ np.append(p.centroid, 1.0))[:3] for p in prior.lesions]
    pairs: dict[int, int] = {}  # current index -> prior index
    if moved and current.lesions:
        dist = np.array([[np.linalg.norm(c.centroid - m) for m in moved] for c in current.lesions])
        reach = np.array(
            [
                [max(MIN_REACH_MM, (c.diameter_mm + p.diameter_mm) / 4) for p in prior.lesions]
                for c in current.lesions
            ]
        )
        cost = np.where(dist <= reach, dist, 1e6)
        for i, j in zip(*linear_sum_assignment(cost), strict=True):
            if cost[i, j] < 1e6:
                pairs[int(i)] = int(j)
    changes = []
    for i, c in enumerate(current.lesions):
        if i not in pairs:
            changes.append(LesionChange("new", c.tracking_uid, c.label, c.diameter_mm, None, c.volume_ml))
            continue
        p = prior.lesions[pairs[i]]
        changes.append(
            LesionChange(
                classify(p.diameter_mm, c.diameter_mm),
                p.tracking_uid,  # the lesion keeps its identity across time points
                c.label,
                c.diameter_mm,
                p.diameter_mm,
                c.volume_ml,
                p.volume_ml,
            )
        )
    matched = set(pairs.values())
    for j, p in enumerate(prior.lesions):
        if j not in matched:
            changes.append(
                LesionChange("resolved", p.tracking_uid, p.label, None, p.diameter_mm, None, p.volume_ml)
            )
    return Comparison(prior.series_uid, interval, changes, how, prior.order + 1)


def classify(before_mm: float, now_mm: float) -> Status:
    """RECIST 1.1-like: +20 % and +5 mm is increased, -30 % decreased, else stable."""
    if now_mm - before_mm >= INCREASE_MM and now_mm >= before_mm * (1 + INCREASE_FRACTION):
        return "increased"
    if now_mm <= before_mm * (1 - DECREASE_FRACTION):
        return "decreased"
    return "stable"
