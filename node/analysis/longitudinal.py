"""Compare a series with a prior of the same patient: match lesions, say what changed.

Lesions are points in patient space (their mask's centroid, LPS mm) with a longest in-plane
diameter and a volume. Prior points are brought into the current series' space by a rigid
transform (identity when both share a Frame of Reference, else :mod:`node.analysis.registration`),
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

from dataclasses import replace
from datetime import datetime

import numpy as np
from scipy.optimize import linear_sum_assignment

from node.analysis.change import MIN_REACH_MM, Comparison, LesionChange, TimePoint, TrackedLesion, classify
from node.analysis.findings import Findings


def time_point(findings: Findings) -> TimePoint:
    """The lesions of ``findings`` as points in its patient space, with their tracking UIDs."""
    vol = findings.series.volume
    lesions = []
    for s in findings.lesions:
        ijk = np.argwhere(s.mask.crop).mean(axis=0) + [b.start for b in s.mask.box]
        centroid = (vol.affine @ np.append(ijk, 1.0))[:3]
        lesions.append(
            TrackedLesion(
                findings.tracking_uid(s), s.label, centroid, s.longest_diameter_mm or 0.0, s.volume_ml
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
        from node.analysis.registration import register_rigid

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
