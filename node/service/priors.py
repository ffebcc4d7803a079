"""The most relevant prior of a series: find it, get it, and know what it showed.

Where the worker looks, in order:

1. Orthanc, the node's own archive (``/tools/find``): the same patient's series of the same modality.
2. The configured query/retrieve sources (``priors.sources``): C-FIND or QIDO-RS, then the chosen
   series is retrieved: C-MOVE into Orthanc (the source must know the node's AE title, host and
   port), or WADO-RS straight into the job's folder.

The choice (:func:`pick`): same modality, acquired before the current series and within the look-back,
not of the same study; the same body part when both say it; then the most recent.

What the prior showed comes from the node's own earlier result when there is one (the queue keeps
each processed series' :class:`~node.analysis.change.TimePoint`): it is never inferred twice. Its images
are fetched only when registration needs them (another frame of reference) or when it was never
processed (it is then run through the model, its outputs kept in the job folder only).

No prior is not an error: :class:`PriorLookup` then says why, and the report says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

from node.analysis.change import TimePoint
from node.analysis.longitudinal import acquired
from node.errors import InputError
from node.identity import NODE_NAME
from node.service.orthanc import OrthancClient, OrthancError
from node.service.queue.retrieved import RetrievedPriors
from node.service.queue.time_points import TimePoints
from node.service.retrieve import (
    PriorCandidate,
    QueryRetrieveSource,
    RetrieveError,
    find_series,
    retrieve_series,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PriorLookup:
    time_point: TimePoint | None
    why_not: str | None = None  # when there is no time point: the reason, for the report
    how: str = ""  # where it came from, for the log: "orthanc, earlier result" ...


def pick(
    candidates: list[PriorCandidate], current: PriorCandidate, lookback_days: int
) -> PriorCandidate | None:
    """The most relevant prior of ``current`` among ``candidates`` (rules in the module docstring)."""
    if current.acquired is None:
        return None
    oldest = current.acquired - timedelta(days=lookback_days)
    usable = [
        c
        for c in candidates
        if c.modality == current.modality
        and c.study_uid != current.study_uid
        and c.acquired is not None
        and oldest <= c.acquired < current.acquired
        and not (c.body_part and current.body_part and c.body_part.upper() != current.body_part.upper())
    ]
    return max(usable, key=lambda c: c.acquired, default=None)


def describe(ds, source: str = "current") -> PriorCandidate:
    """A source header as a candidate (the current series, to compare the others with)."""
    return PriorCandidate(
        str(ds.get("StudyInstanceUID", "")),
        str(ds.get("SeriesInstanceUID", "")),
        str(ds.get("Modality", "")),
        str(ds.get("BodyPartExamined", "") or ""),
        acquired(ds),
        str(ds.get("SeriesDescription", "") or ""),
        None,
        source,
    )


def in_orthanc(orthanc: OrthancClient, patient_id: str, modality: str) -> dict[str, PriorCandidate]:
    """The patient's series of ``modality`` in Orthanc, by Orthanc series ID."""
    found = orthanc.post_json(
        "/tools/find",
        {"Level": "Series", "Query": {"PatientID": patient_id, "Modality": modality}, "Expand": True},
    )
    studies: dict[str, dict] = {}
    out = {}
    for s in found:
        if s["ParentStudy"] not in studies:
            studies[s["ParentStudy"]] = orthanc.get_json(f"/studies/{s['ParentStudy']}")["MainDicomTags"]
        tags = {**studies[s["ParentStudy"]], **s["MainDicomTags"], "Modality": modality}
        out[s["ID"]] = describe(tags, "orthanc")  # a dict has the get() a pydicom header has
    return out


class Priors:
    """Finds and prepares the prior of a series for the worker (one instance per worker)."""

    def __init__(
        self,
        retrieved: RetrievedPriors,
        time_points: TimePoints,
        orthanc: OrthancClient,
        sources: list[QueryRetrieveSource],
        calling_ae: str,
        move_destination: str,
        lookback_days: int,
    ):
        self.retrieved, self.time_points = retrieved, time_points
        self.orthanc, self.sources = orthanc, sources
        self.calling_ae, self.move_destination, self.lookback_days = (
            calling_ae,
            move_destination,
            lookback_days,
        )

    def lookup(self, header, model: str, work: Path, pipeline) -> PriorLookup:
        """The prior's time point for the series whose first header is ``header``; ``pipeline``
        infers a prior the node never processed."""
        current = describe(header)
        patient_id = str(header.get("PatientID", "") or "")
        if not patient_id:
            return PriorLookup(None, "the series has no Patient ID")
        if current.acquired is None:
            return PriorLookup(None, "the series has no acquisition date")
        where = ["Orthanc"]
        try:
            local = in_orthanc(self.orthanc, patient_id, current.modality)
        except OrthancError as e:
            log.warning("priors: Orthanc lookup failed: %s", e)
            local = {}
        best = pick(list(local.values()), current, self.lookback_days)
        orthanc_id = next((k for k, c in local.items() if c is best), None)
        files: list[Path] = []
        problems = []
        if best is None:
            for source in self.sources:
                where.append(source.name)
                try:
                    best = pick(
                        find_series(
                            source,
                            self.calling_ae,
                            patient_id,
                            current.modality,
                            before=current.acquired,
                            not_before=current.acquired - timedelta(days=self.lookback_days),
                        ),
                        current,
                        self.lookback_days,
                    )
                    if best is not None:
                        orthanc_id, files = self._retrieve(source, best, work / "prior")
                        break
                except (RetrieveError, OrthancError) as e:
                    problems.append(str(e))
                    best = None
        if best is None:
            why = (
                f"no earlier {current.modality} series of this patient in {' or '.join(where)}"
                f" within {self.lookback_days} days"
            )
            return PriorLookup(None, "; ".join([why, *problems]))
        return self._time_point(best, orthanc_id, files, header, model, work, pipeline)

    def _retrieve(
        self, source: QueryRetrieveSource, best: PriorCandidate, into: Path
    ) -> tuple[str | None, list[Path]]:
        if source.kind == "dicomweb":
            retrieve_series(source, self.calling_ae, best, into=into)
            return None, sorted(into.glob("*.dcm"))
        self.retrieved.mark(best.series_uid)  # before it arrives: the plugin must not queue it
        retrieve_series(source, self.calling_ae, best, move_destination=self.move_destination)
        found = self.orthanc.post_json(
            "/tools/find", {"Level": "Series", "Query": {"SeriesInstanceUID": best.series_uid}}
        )
        if not found:
            raise RetrieveError(f"{source.name}: C-MOVE reported success but the series is not in Orthanc")
        return found[0], []

    def _time_point(self, best, orthanc_id, files, header, model, work, pipeline) -> PriorLookup:
        from node.ingest.series import find_series as series_in
        from node.ingest.volume import load_volume

        tp = self.time_points.get(best.series_uid, model)
        if tp is not None and tp.frame_of_reference == str(header.get("FrameOfReferenceUID", "")):
            return PriorLookup(tp, how=f"{best.source}, earlier result")  # no image needed
        if not files:
            files = self.orthanc.fetch_series(orthanc_id, work / "prior")
        found, errors = series_in([files[0].parent])
        if errors or len(found) != 1:
            return PriorLookup(
                None, f"the prior series could not be read ({errors[0] if errors else 'not one series'})"
            )
        if tp is not None:  # another frame of reference: registration needs the prior's image, not the model
            return PriorLookup(
                replace(tp, volume=load_volume(found[0]).volume), how=f"{best.source}, earlier result"
            )
        try:
            result = pipeline.process(found[0], work / "prior-out")
        except InputError as e:
            return PriorLookup(None, f"the prior series could not be processed ({e})")
        self.time_points.save(model, result.time_point)
        return PriorLookup(result.time_point, how=f"{best.source}, inferred now")


def study_report(orthanc: OrthancClient, study_id: str) -> str | None:
    """The text of the study's report when Orthanc has one: every TEXT content item of the study's
    SR documents that the node did not write (ours are SRs too). None when there is none."""
    from io import BytesIO

    from pydicom import dcmread

    texts = []
    for series in orthanc.get_json(f"/studies/{study_id}/series"):
        if series["MainDicomTags"].get("Modality") != "SR":
            continue
        for instance_id in series["Instances"]:
            try:
                ds = dcmread(BytesIO(orthanc.instance_file(instance_id)))
            except Exception as e:  # an unreadable report is no report, never a failed job
                log.warning("priors: report instance %s unreadable: %s", instance_id, type(e).__name__)
                continue
            if str(ds.get("Manufacturer", "")) != NODE_NAME:
                texts += list(_text_items(ds))
    return "\n".join(texts) or None


def _text_items(item):
    for child in item.get("ContentSequence", []):
        if child.get("ValueType") == "TEXT":
            yield str(child.TextValue)
        yield from _text_items(child)
