"""Model label maps -> coded, measured segments and classifications (:class:`~node.findings.Findings`)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from node.findings import Classification, Concept, Findings, ModelRef, Segment
from node.inference import Prediction
from node.measure import measure
from node.model_repo import Code, ModelSpec
from node.volume import SeriesVolume

MIN_LESION_MM3 = 15.0  # smaller components are noise at the reference model's resolution (~3 mm pixels)


def _concept(c: Code) -> Concept:
    return Concept(c.value, c.scheme, c.meaning)


def to_findings(series: SeriesVolume, model: ModelSpec, prediction: Prediction, runtime: str) -> Findings:
    segments: list[Segment] = []
    voxel_mm3 = float(np.prod(series.volume.spacing))
    for head in model.heads:
        if head.kind != "segmentation" or "seg" not in head.outputs:
            continue
        labels, conf = prediction.labels[head.name], prediction.confidence[head.name]
        for label in head.labels:
            mask = labels == label.index
            if not mask.any():
                continue
            if label.instances:
                # one segment per connected lesion, largest first, so "Lesion 1" is the biggest
                comps, n = ndimage.label(mask)
                sizes = np.bincount(comps.ravel(), minlength=n + 1)[1:]
                keep = [
                    i + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] * voxel_mm3 >= MIN_LESION_MM3
                ]
                masks = [(f"{label.name} {k}", comps == c) for k, c in enumerate(keep, start=1)]
            else:
                masks = [(label.name, mask)]
            for name, m in masks:
                seg = Segment(
                    number=len(segments) + 1,
                    label=name,
                    kind=label.kind,
                    category=_concept(label.category),
                    type=_concept(label.type),
                    mask=m,
                    probability=round(float(conf[m].mean()) / 255, 3),
                )
                measure(seg, series)
                segments.append(seg)
    classifications = [
        Classification(
            head=h.name,
            name=_concept(h.finding),
            value=_concept(h.positive if prediction.probabilities[h.name] >= h.threshold else h.negative),
            probability=round(prediction.probabilities[h.name], 4),
        )
        for h in model.heads
        if h.kind == "classification"
    ]
    return Findings(
        series=series,
        model=ModelRef(model.name, model.version, runtime),
        segments=segments,
        classifications=classifications,
        notes=[*series.notes, *prediction.notes],
    )
