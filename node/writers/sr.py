"""Comprehensive 3D SRs, TID 1500 Measurement Reports, of a :class:`~node.analysis.findings.Findings`.

Two documents, because OHIF (3.12) takes every measurement group of an "Imaging Measurement
Report" as something to draw and fails on a group without an image-referenced SCOORD:

- :func:`write_sr`, the complete report, titled "Oncology Measurement Report" (CID 7021), which
  OHIF lists as a structured document; validators and dcmqi read it as TID 1500 like any other.
- :func:`write_outlines`, titled "Imaging Measurement Report": only what is drawn on an image,
  every group geometric (below), so OHIF draws each and opens on the first lesion.

The complete report's content tree (codes in :data:`CODES`):

- observer context: the node as a Device (name "pacs-node", deterministic device UID);
  procedure reported: CT or MR from the source modality.
- one TID 1411 Volumetric ROI group per segment, referencing its SEG segment
  (Referenced Segment + Source Series for Segmentation), with tracking
  identifier/UID (the UID is the SEG segment's Tracking UID), finding type =
  segmented property type, finding category, algorithm identification, and
  the measurements volume, mean and maximum intensity, mean model probability
  and, for lesions, the long axis.
- per lesion, a TID 1501 group with the long axis again as a NUM that is
  INFERRED FROM an SCOORD POLYLINE (the two end points on the source image),
  so viewers that draw SCOORDs show the diameter as a length.
- one TID 1501 group per :class:`~node.analysis.findings.Classification`: a qualitative
  evaluation (name = value) and its probability as a NUM.
- ``Findings.notes`` as TEXT items (DCM 121106 "Comment") in every group:
  they qualify every measurement (e.g. interpolated slices).

The outlines document, lesions first, only TID 1501 groups whose first NUM is INFERRED FROM an
SCOORD on a source image (TID 300, the layout OHIF reads and hydrates into its own tools): per
segment its largest outline on its key slice (a lesion's long-axis slice, an organ's largest
cross-section) with its area, under the segment's Tracking UID, then its volume (and long axis)
as NUMs of their own; per lesion the long axis line, and an outline on every other slice it crosses.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node.analysis.change import Comparison, LesionChange
from node.analysis.findings import Classification, Findings, Segment
from node.analysis.measure import outline
from node.analysis.report_text import Discrepancy
from node.analysis.urgency import Urgency
from node.identity import NODE_NAME, OutputKind
from node.writers import uids
from node.writers.seg import SliceSource, closed, frame_geometry, slice_sources

CODES = {
    "volume": codes.SCT.Volume,  # 118565006
    "long_axis": codes.SCT.LongAxis,  # 103339001
    "mean": codes.SCT.Mean,  # 373098007 (derivation)
    "maximum": codes.SCT.Maximum,  # 56851009 (derivation)
    "ct_intensity": codes.DCM.AttenuationCoefficient,  # 112031
    "mr_intensity": codes.DCM.MRSignalIntensity,  # 110852
    "probability": codes.DCM.Probability,  # 122157
    "comment": codes.DCM.Comment,  # 121106
    # Procedure reported: CID 100 "Quantitative Diagnostic Imaging Procedures"
    "ct": Code("25045-6", "LN", "CT unspecified body region"),
    # change since a prior (TID 1411/1501 qualitative evaluation, values as in CID 6134)
    "change": codes.DCM.DescriptionOfChange,  # 111021
    "interval": codes.SCT.Interval,  # 385673002
    "response": codes.DCM.CurrentResponse,  # 112048, values from CID 6144
    "comparison_done": codes.DCM.ComparisonWithPriorStudyDone,  # 122140
    "yes": codes.SCT.Yes,
    "no": codes.SCT.No,
    # concepts DICOM has no code for: our local scheme, declared in the SR and the conformance statement
    "prior_long_axis": Code("PN0001", "99PACSNODE", "Long axis at prior time point"),
    "prior_volume": Code("PN0002", "99PACSNODE", "Volume at prior time point"),
    "long_axis_change": Code("PN0003", "99PACSNODE", "Change in long axis since prior"),
    "volume_change": Code("PN0004", "99PACSNODE", "Change in volume since prior"),
    "new_lesions": Code("PN0005", "99PACSNODE", "Number of new lesions"),
    "sum_long_axes": Code("PN0006", "99PACSNODE", "Sum of long axes"),
    "prior_sum_long_axes": Code("PN0007", "99PACSNODE", "Sum of long axes at prior time point"),
    "disagreement": codes.DCM.DisagreementWithPriorFindings,  # 122776: with the report's findings
    "urgency": Code("PN0008", "99PACSNODE", "Urgency category"),
    "urgency_score": Code("PN0009", "99PACSNODE", "Urgency score"),
    "mr": Code("25056-3", "LN", "MRI unspecified body region"),
    "area": codes.SCT.Area,  # 42798000
}
# CID 7021 document titles: see the module docstring for why the complete report is not 126000
REPORT_TITLE = codes.DCM.OncologyMeasurementReport  # 126001
OUTLINES_TITLE = codes.DCM.ImagingMeasurementReport  # 126000
# Tracking Identifiers of the outlines document: the ones OHIF's SR loader maps to its Length and
# freehand ROI tools, which is what lets it list the groups as measurements; the name is a Comment
OHIF_LENGTH = "Cornerstone3DTools@^0.1.0:Length"
OHIF_OUTLINE = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"
STATUS = {
    "new": codes.SCT.NewFinding,  # 129721008
    "increased": codes.SCT.IncreaseInSize,  # 15454001
    "decreased": codes.SCT.DecreaseInSize,  # 19776001
    "stable": codes.SCT.NoSignificantChangesInTheFinding,  # 129723006
    "resolved": codes.SCT.ProblemResolved,  # 413322009
}
RESPONSE = {  # CID 6144, RECIST-like overall assessment on the sum of long axes
    "progression": codes.DCM.TargetLesionProgressiveDisease,
    "stable disease": codes.DCM.TargetLesionStableDisease,
    "partial response": codes.DCM.TargetLesionPartialResponse,
    "complete response": codes.DCM.TargetLesionCompleteResponse,
}
URGENCY = {
    "routine": Code("PN0010", "99PACSNODE", "Routine"),
    "priority": Code("PN0011", "99PACSNODE", "Priority"),
    "urgent": Code("PN0012", "99PACSNODE", "Urgent"),
}
LOCAL_SCHEME = "99PACSNODE"
UNITS = {
    "ml": Code("ml", "UCUM", "milliliter"),
    "mm": Code("mm", "UCUM", "millimeter"),
    "hu": Code("[hnsf'U]", "UCUM", "Hounsfield unit"),
    # MR signal has no physical unit and an arbitrary scale: UCUM unity, as DICOM CID 7181 does
    "unity": Code("1", "UCUM", "no units"),
    "percent": Code("%", "UCUM", "Percent"),
    "mm2": Code("mm2", "UCUM", "square millimeter"),
    "days": Code("d", "UCUM", "day"),
    "lesions": Code("{lesions}", "UCUM", "lesions"),
    "points": Code("{points}", "UCUM", "points"),
}


def write_sr(findings: Findings, seg: Dataset | None) -> hd.sr.Comprehensive3DSR:
    """The complete measurement report; ``seg`` is the SEG written by :func:`node.writers.seg.write_seg`,
    or None for a model without segmentation heads (then there are no segments to report)."""
    _check(findings, seg)
    uid = _uids(findings)
    algorithm = _algorithm(findings)
    sources = {s.index: s for s in slice_sources(findings.series)}
    groups = []
    for segment in findings.segments:
        made_by = _algorithm(findings, segment)
        groups.append(_segment_group(findings, segment, seg, made_by, uid))
        if segment.longest_diameter_mm is not None and segment.diameter_slice in sources:
            groups.append(_diameter_group(segment, sources[segment.diameter_slice], made_by, uid))
    for k, c in enumerate(findings.classifications, start=1):
        groups.append(_classification_group(c, k, _algorithm(findings, c), uid))
    if findings.comparison is not None:
        groups += _comparison_groups(findings, algorithm, uid)
    elif findings.prior_unavailable:
        groups.append(_no_prior_group(findings.prior_unavailable, algorithm, uid))
    for k, d in enumerate(findings.discrepancies, start=1):
        groups.append(_discrepancy_group(d, k, findings, seg, algorithm, uid))
    if findings.urgency is not None:
        groups.append(_urgency_group(findings.urgency, algorithm, uid))
    local = findings.comparison is not None or findings.urgency is not None
    return _document(findings, seg, groups, REPORT_TITLE, OutputKind.SR, local)


def write_outlines(findings: Findings, seg: Dataset) -> hd.sr.Comprehensive3DSR:
    """The measurements viewers draw: every group has an outline or a line on a source image."""
    if not findings.segments:
        raise ValueError("Findings.segments is empty: there is nothing to outline.")
    _check(findings, seg)
    uid = _uids(findings)
    sources = {s.index: s for s in slice_sources(findings.series)}
    groups = []
    for segment in sorted(findings.segments, key=lambda s: s.kind != "lesion"):  # lesions first
        algorithm = _algorithm(findings, segment)
        key = _key_slice(segment, sources)
        if key is None:  # only on interpolated slices: nothing a viewer can draw it on
            continue
        whole = [hd.sr.Measurement(name=CODES["volume"], value=segment.volume_ml, unit=UNITS["ml"])]
        if segment.longest_diameter_mm is not None:
            whole.append(
                hd.sr.Measurement(name=CODES["long_axis"], value=segment.longest_diameter_mm, unit=UNITS["mm"])
            )
        groups.append(
            _outline_group(findings, segment, sources[key], findings.tracking_uid(segment), algorithm, whole)
        )
        if segment.kind != "lesion":
            continue
        if segment.longest_diameter_mm is not None and segment.diameter_slice in sources:
            groups.append(_diameter_group(segment, sources[segment.diameter_slice], algorithm, uid, OHIF_LENGTH))
        for index in segment.slices:
            if index != key and index in sources:  # interpolated slices have no image
                tracking = uid(f"tracking-{segment.number}-outline-{index}")
                groups.append(_outline_group(findings, segment, sources[index], tracking, algorithm))
    return _document(findings, seg, groups, OUTLINES_TITLE, OutputKind.OUTLINES, local=False)


def _check(findings: Findings, seg: Dataset | None) -> None:
    if findings.series.modality not in ("CT", "MR"):
        raise ValueError(f"SeriesVolume.modality must be 'CT' or 'MR', got {findings.series.modality!r}.")
    if seg is None:
        if findings.segments:
            raise ValueError("seg is None but Findings.segments is not empty.")
        return
    if getattr(seg, "Modality", None) != "SEG" or "SegmentSequence" not in seg:
        raise ValueError("seg must be a DICOM Segmentation instance (Modality SEG with a SegmentSequence).")
    described = {int(item.SegmentNumber) for item in seg.SegmentSequence}
    missing = [s.number for s in findings.segments if s.number not in described]
    if missing:
        raise ValueError(f"seg has no SegmentSequence item for Segment.number {missing}.")


def _uids(findings: Findings):
    """``kind`` -> a deterministic UID of this series, model and kind (see :mod:`node.writers.uids`)."""
    series, model = findings.series, findings.model
    return lambda kind: uids.output_uid(series.series_uid, model.name, model.version, kind)


def _algorithm(findings: Findings, of: Segment | Classification | None = None) -> hd.sr.AlgorithmIdentification:
    """The model that made ``of`` (a series may go through several), or the document's models."""
    model = (of.model if of is not None else None) or findings.model
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version)


def _document(findings: Findings, seg: Dataset | None, groups: list, title: Code, kind: OutputKind, local: bool):
    series, model = findings.series, findings.model
    notes = [_comment(n) for n in findings.notes]
    for group in groups:
        group[0].ContentSequence.extend(notes)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.device_uid(),
            name=NODE_NAME,
            manufacturer_name=NODE_NAME,
            model_name=f"{model.name} {model.version}"[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CODES["ct"] if series.modality == "CT" else CODES["mr"],
        imaging_measurements=groups,
        title=title,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*([seg] if seg is not None else []), *series.datasets],
        content=report[0],
        **uids.instance_identity(
            series.series_uid, series.first_dataset.get("SeriesNumber"), model.name, model.version, kind
        ),
        is_complete=True,
    )
    if local:
        sr.CodingSchemeIdentificationSequence = [_local_scheme()]
    _standard_meanings(sr.ContentSequence)
    return sr


# code meanings as PS3.16 spells them, where highdicom's differ (validators compare them to the template)
STANDARD_MEANINGS = {("121232", "DCM"): "Source series for segmentation"}


def _standard_meanings(items) -> None:
    for item in items:
        for seq in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            for code in item.get(seq, []):
                meaning = STANDARD_MEANINGS.get((code.CodeValue, code.CodingSchemeDesignator))
                if meaning:
                    code.CodeMeaning = meaning
        _standard_meanings(item.get("ContentSequence", []))


def _local_scheme() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = "pacs-node local concepts"
    item.CodingSchemeResponsibleOrganization = "pacs-node (see conformance/statement.md)"
    return item


def _intensity(modality: str) -> tuple[Code, Code]:
    if modality == "CT":
        return CODES["ct_intensity"], UNITS["hu"]
    return CODES["mr_intensity"], UNITS["unity"]


def _segment_group(findings: Findings, segment: Segment, seg: Dataset, algorithm, uid):
    name, unit = _intensity(findings.series.modality)
    measurements = [
        hd.sr.Measurement(name=CODES["volume"], value=segment.volume_ml, unit=UNITS["ml"]),
        hd.sr.Measurement(name=name, value=segment.mean, unit=unit, derivation=CODES["mean"]),
        hd.sr.Measurement(name=name, value=segment.maximum, unit=unit, derivation=CODES["maximum"]),
    ]
    if segment.probability is not None:
        measurements.append(
            hd.sr.Measurement(
                name=CODES["probability"],
                value=float(segment.probability),
                unit=UNITS["unity"],
                derivation=CODES["mean"],
            )
        )
    if segment.kind == "lesion" and segment.longest_diameter_mm is not None:
        measurements.append(
            hd.sr.Measurement(name=CODES["long_axis"], value=segment.longest_diameter_mm, unit=UNITS["mm"])
        )
    evaluations = []
    change = findings.comparison and findings.comparison.by_uid().get(findings.tracking_uid(segment))
    if change:
        evaluations, more = _change_items(change, findings.comparison.interval_days)
        measurements += more
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(findings, segment),
        finding_sites=_finding_sites(findings, segment),
        time_point_context=_time_point(findings),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=segment.number,
            source_series=hd.sr.SourceSeriesForSegmentation(findings.series.series_uid),
        ),
        finding_type=segment.type.coded(),
        finding_category=segment.category.coded(),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
    )
    if change:  # and in words, for readers that show only text
        group[0].ContentSequence.append(_comment(change.sentence(findings.comparison.interval_days)))
    return group


def _finding_sites(findings: Findings, segment: Segment) -> list[hd.sr.FindingSite] | None:
    """A lesion's Finding Site: the organ segment it lies in, when there is one."""
    organ = next((o for o in findings.segments if o.kind == "organ" and o.label == segment.site), None)
    return [hd.sr.FindingSite(anatomic_location=organ.type.coded())] if organ else None


def _time_point(findings: Findings) -> hd.sr.TimePointContext | None:
    """TID 1502: which exam of the patient's series of exams this report is ("follow-up 1" is the second
    we saw). Without Time Point Order: pixelmed's validator takes that NUM for a TID 1419 measurement."""
    c = findings.comparison
    if c is None:
        return None
    return hd.sr.TimePointContext(time_point=f"follow-up {c.order - 1}")


def _change_items(change: LesionChange, interval_days: int | None):
    """Coded change since the prior: the category, prior values, relative changes and interval."""
    evaluations = [hd.sr.QualitativeEvaluation(name=CODES["change"], value=STATUS[change.status])]
    measurements = []
    for code, value, unit in (
        ("prior_long_axis", change.prior_diameter_mm, "mm"),
        ("prior_volume", change.prior_volume_ml, "ml"),
        ("long_axis_change", _percent(change.diameter_change), "percent"),
        ("volume_change", _percent(change.volume_change), "percent"),
        ("interval", interval_days if change.status != "new" else None, "days"),
    ):
        if value is not None:
            measurements.append(hd.sr.Measurement(name=CODES[code], value=float(value), unit=UNITS[unit]))
    return evaluations, measurements


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else round(100.0 * fraction, 1)


def _comparison_groups(findings: Findings, algorithm, uid) -> list:
    """TID 1501 groups: one per resolved lesion (its tracking UID lives on) and the summary."""
    c: Comparison = findings.comparison
    groups = []
    for change in c.changes:
        if change.status != "resolved":
            continue
        evaluations, measurements = _change_items(change, c.interval_days)
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=change.tracking_uid, identifier=f"prior {change.label}"[:64]
                ),
                time_point_context=_time_point(findings),
                finding_type=codes.SCT.Lesion,
                algorithm_id=algorithm,
                qualitative_evaluations=evaluations,
                measurements=measurements,
            )
        )
    summary = [
        hd.sr.Measurement(name=CODES["new_lesions"], value=float(c.new), unit=UNITS["lesions"]),
        hd.sr.Measurement(name=CODES["sum_long_axes"], value=round(c.sum_now_mm, 1), unit=UNITS["mm"]),
        hd.sr.Measurement(
            name=CODES["prior_sum_long_axes"], value=round(c.sum_before_mm, 1), unit=UNITS["mm"]
        ),
    ]
    if c.interval_days is not None:
        summary.append(
            hd.sr.Measurement(name=CODES["interval"], value=float(c.interval_days), unit=UNITS["days"])
        )
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=uid("comparison"), identifier="Comparison with prior"
            ),
            time_point_context=_time_point(findings),
            algorithm_id=algorithm,
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(name=CODES["comparison_done"], value=CODES["yes"]),
                hd.sr.QualitativeEvaluation(name=CODES["response"], value=RESPONSE[c.overall]),
            ],
            measurements=summary,
        )
    )
    groups[-1][0].ContentSequence += [_comment(c.summary())] + [
        _comment(ch.sentence(None)) for ch in c.changes if ch.status == "resolved"
    ]
    return groups


def _no_prior_group(reason: str, algorithm, uid):
    """A prior was looked for and none could be used: say so, and why, in the report."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid("comparison"), identifier="Comparison with prior"
        ),
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=CODES["comparison_done"], value=CODES["no"])
        ],
    )
    group[0].ContentSequence.append(_comment(f"no prior available: {reason}"))
    return group


def _discrepancy_group(d: Discrepancy, k: int, findings: Findings, seg: Dataset, algorithm, uid):
    """A report statement the image contradicts: coded, with the sentence and the evidence (the
    contradicting lesions' SEG segments, which carry their Tracking UIDs)."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid(f"discrepancy-{k}"), identifier=f"Report discrepancy {k}"
        ),
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=CODES["disagreement"], value=codes.SCT.Lesion)
        ],
    )
    by_label = {s.label: s for s in findings.lesions}
    group[0].ContentSequence += [
        _comment(f"report statement: {d.statement.sentence}"),
        _comment(d.reason),
        *(
            hd.sr.ImageContentItem(
                name=codes.DCM.ReferencedSegment,
                referenced_sop_class_uid=seg.SOPClassUID,
                referenced_sop_instance_uid=seg.SOPInstanceUID,
                referenced_segment_numbers=[by_label[label].number],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for label in d.lesions
        ),
    ]
    return group


def _urgency_group(urgency: Urgency, algorithm, uid):
    """Triage as a coded finding: category and score, the rules that fired as comments."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid("triage"), identifier="Triage"),
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=CODES["urgency"], value=URGENCY[urgency.category])
        ],
        measurements=[
            hd.sr.Measurement(name=CODES["urgency_score"], value=float(urgency.score), unit=UNITS["points"])
        ],
    )
    group[0].ContentSequence += [_comment(f"urgency: {r}") for r in urgency.reasons]
    return group


def _comment(text: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=CODES["comment"], value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _tracking(findings: Findings, segment: Segment) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=findings.tracking_uid(segment), identifier=segment.label[:64])


def _key_slice(segment: Segment, stored) -> int | None:
    """The slice a reader looks at first, among the ``stored`` ones (an interpolated slice has no
    image to draw on): a lesion's long-axis slice, else the largest cross-section; None if none."""
    if segment.diameter_slice in stored and segment.mask.plane(segment.diameter_slice).any():
        return segment.diameter_slice
    areas = segment.mask.areas()
    candidates = sorted(i for i in stored if areas[i])
    return max(candidates, key=lambda i: areas[i]) if candidates else None


def _outline_group(findings: Findings, segment: Segment, source: SliceSource, tracking_uid: str, algorithm, more=()):
    """The segment's outline on one slice (its largest contour there: holes and islands would each
    need a group of their own) as the SCOORD its area is inferred from, then ``more`` measurements
    of the whole segment; the segment's name first among the comments, which OHIF takes as label."""
    contours = [source.graphic_data(c) for c in outline(segment.mask.plane(source.index))]
    points = closed(max(contours, key=_polygon_area))
    _, _, _, (row_mm, col_mm) = frame_geometry(source.dataset, source.frame)
    area = hd.sr.Measurement(
        name=CODES["area"],
        value=round(_polygon_area(points) * float(row_mm) * float(col_mm), 1),
        unit=UNITS["mm2"],
        referenced_coordinates=[_coordinates(source, points)],
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=OHIF_OUTLINE),
        finding_type=segment.type.coded(),
        finding_sites=_finding_sites(findings, segment),
        algorithm_id=algorithm,
        measurements=[area, *more],
    )
    group[0].ContentSequence.append(_comment(segment.label))
    return group


def _coordinates(source: SliceSource, points: np.ndarray) -> hd.sr.CoordinatesForMeasurement:
    """An SCOORD POLYLINE of (column, row) image points on ``source``'s image (and frame)."""
    return hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=points,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=source.dataset.SOPClassUID,
            referenced_sop_instance_uid=source.dataset.SOPInstanceUID,
            referenced_frame_numbers=[source.frame] if source.frame is not None else None,
        ),
    )


def _polygon_area(points: np.ndarray) -> float:
    """Shoelace area of a closed (x, y) polygon, in squared pixel units."""
    x, y = points[:, 0].astype(float), points[:, 1].astype(float)
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _diameter_group(segment: Segment, source: SliceSource, algorithm, uid, identifier: str | None = None):
    """The long axis as a NUM inferred from its two end points on the source image."""
    (r0, c0), (r1, c1) = segment.diameter_endpoints
    name = f"{segment.label} long axis"
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid(f"tracking-{segment.number}-long-axis"), identifier=(identifier or name)[:64]
        ),
        finding_type=segment.type.coded(),
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=CODES["long_axis"],
                value=segment.longest_diameter_mm,
                unit=UNITS["mm"],
                referenced_coordinates=[_coordinates(source, source.graphic_data([[r0, c0], [r1, c1]]))],
            )
        ],
    )
    if identifier:  # the name, for OHIF's label (the identifier is OHIF's)
        group[0].ContentSequence.append(_comment(name))
    return group


def _classification_group(c: Classification, k: int, algorithm, uid):
    if not 0.0 <= c.probability <= 1.0:
        raise ValueError(
            f"Classification.probability of head {c.head!r} must lie in [0, 1], got {c.probability}."
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid(f"classification-{k}-{c.head}"), identifier=f"Classification {c.head}"[:64]
        ),
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=c.name.coded(), value=c.value.coded())],
        # one-output heads: P(positive); softmax heads: each class (the measurement's name) and its probability
        measurements=[
            hd.sr.Measurement(name=concept.coded(), value=float(p), unit=UNITS["unity"]) for concept, p in c.classes
        ]
        or [hd.sr.Measurement(name=CODES["probability"], value=float(c.probability), unit=UNITS["unity"])],
    )
