"""Model label maps -> coded, measured segments and classifications (:class:`~node.analysis.findings.Findings`)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from node.analysis.findings import BoxMask, Classification, Concept, Findings, ModelRef, Segment
from node.analysis.measure import measure
from node.errors import ModelError
from node.ingest.volume import SeriesVolume
from node.model.head_versions import SHADOW_SUFFIX
from node.model.inference import Prediction
from node.model.manifest import Code, HeadSpec, ModelSpec

MIN_LESION_MM3 = 15.0  # smaller components are noise at the reference model's resolution (~3 mm pixels)


def _concept(c: Code) -> Concept:
    return Concept(c.value, c.scheme, c.meaning)


def _offset(outer: tuple[slice, ...], inner: tuple[slice, ...]) -> tuple[slice, ...]:
    """A box inside a crop, in the coordinates of the whole volume."""
    return tuple(slice(o.start + i.start, o.start + i.stop) for o, i in zip(outer, inner, strict=True))


def lesion_components(
    mask: np.ndarray, voxel_mm3: float, affine: np.ndarray | None = None
) -> tuple[np.ndarray, list[int]]:
    """Connected components of a lesion mask, and the ids of those reported as lesions (at least
    :data:`MIN_LESION_MM3`), largest first. ``affine`` (the mask's indices -> patient mm) breaks ties
    in size by position in the patient, so the numbering does not depend on how slices were stored."""
    comps, n = ndimage.label(mask)
    sizes = np.bincount(comps.ravel(), minlength=n + 1)[1:]
    ids = [i for i in range(1, n + 1) if sizes[i - 1] * voxel_mm3 >= MIN_LESION_MM3]
    where = {i: () for i in ids}
    if affine is not None and ids:
        centres = np.asarray(ndimage.center_of_mass(mask, comps, ids), float).reshape(len(ids), 3)
        lps = centres @ affine[:3, :3].T + affine[:3, 3]
        where = {i: tuple(np.round(p, 1)) for i, p in zip(ids, lps, strict=True)}
    return comps, sorted(ids, key=lambda i: (-sizes[i - 1], where[i]))


def to_findings(series: SeriesVolume, model: ModelSpec, prediction: Prediction, runtime: str) -> Findings:
    segments: list[Segment] = []
    voxel_mm3 = float(np.prod(series.volume.spacing))
    for head in model.heads:
        if head.kind != "segmentation" or "seg" not in head.outputs or head.shadow:
            continue
        made_by = head_ref(model, head, runtime)
        labels, conf = prediction.labels[head.name], prediction.confidence[head.name]
        boxes = ndimage.find_objects(labels)  # one bounding box per class: work on crops, not whole volumes
        for label in head.labels:
            box = boxes[label.index - 1] if label.index <= len(boxes) else None
            if box is None:
                continue
            crop = labels[box] == label.index
            if label.instances:
                # one segment per connected lesion, largest first, so "Lesion 1" is the biggest
                corner = series.volume.affine.copy()  # the crop's indices -> patient mm
                corner[:3, 3] += corner[:3, :3] @ [b.start for b in box]
                comps, keep = lesion_components(crop, voxel_mm3, corner)
                sub = ndimage.find_objects(comps)
                parts = [
                    (f"{label.name} {k}", _offset(box, sub[i - 1]), comps[sub[i - 1]] == i)
                    for k, i in enumerate(keep, start=1)
                ]
            else:
                parts = [(label.name, box, crop)]
            for name, where, m in parts:
                seg = Segment(
                    number=len(segments) + 1,
                    label=name,
                    kind=label.kind,
                    category=_concept(label.category),
                    type=_concept(label.type),
                    modifier=_concept(label.modifier) if label.modifier else None,
                    mask=BoxMask(labels.shape, where, m),
                    probability=round(float(conf[where][m].mean()) / 255, 3),
                    model=made_by,
                )
                measure(seg, series)
                segments.append(seg)
    locate(segments)
    lesion_heads = [
        h
        for h in model.heads
        if h.kind == "segmentation" and not h.shadow and any(lab.kind == "lesion" for lab in h.labels)
    ]
    probability = None
    if lesion_heads:  # two classes (background, lesion): P(lesion) is the confidence or its complement
        h = lesion_heads[0].name
        conf = prediction.confidence[h]
        probability = np.where(prediction.labels[h] > 0, conf, 255 - conf).astype(np.uint8)
    classifications = []
    for h in model.heads:
        if h.kind == "classification" and not h.shadow:
            c = classification(h, prediction.probabilities[h.name])
            c.model = head_ref(model, h, runtime)
            classifications.append(c)
    return Findings(
        series=series,
        model=ModelRef(model.name, model.version, runtime),
        segments=segments,
        classifications=classifications,
        notes=[*series.notes, *prediction.notes],
        lesion_probability=probability,
        shadow_agreement=shadow_agreement(model, prediction),
    )


def head_ref(model: ModelSpec, head: HeadSpec, runtime: str) -> ModelRef | None:
    """What a learned head's outputs name as their algorithm: the model and the head, and the head's
    version (``phantom-fm aorta``, ``3``); None for a shipped head (the model names it)."""
    return ModelRef(f"{model.name} {head.name}"[:64], head.version, runtime) if head.version else None


def shadow_agreement(model: ModelSpec, prediction: Prediction) -> dict[tuple[str, str], float]:
    """Each shadow version against the active version of its head, on this series: Dice over the
    foreground labels (1 where both find nothing), or 1 - |p - p'| for a classification."""
    out = {}
    heads = {h.name: h for h in model.heads}
    for h in model.heads:
        active = heads.get(h.name.removesuffix(SHADOW_SUFFIX)) if h.shadow else None
        if active is None or active.kind != h.kind:  # nothing to compare with
            continue
        if h.kind == "classification":
            p, q = prediction.probabilities[h.name], prediction.probabilities[active.name]
            if p.shape == q.shape:
                out[model.name, active.name] = round(1.0 - float(np.abs(p - q).max()), 4)
        else:
            a, b = prediction.labels[h.name], prediction.labels[active.name]
            both, total = float(np.sum((a == b) & (a > 0))), float(np.sum(a > 0) + np.sum(b > 0))
            out[model.name, active.name] = round(2 * both / total, 4) if total else 1.0
    return out


def classification(head: HeadSpec, probs: np.ndarray) -> Classification:
    """A head's outputs as a coded result: P(positive) against its threshold, or every class's
    probability with the most probable one as the answer."""
    if not head.classes:
        p = float(probs[0])
        positive = p >= head.threshold
        return Classification(
            head.name,
            _concept(head.finding),
            _concept(head.positive if positive else head.negative),
            round(p, 4),
            positive,
        )
    if len(probs) != len(head.classes):
        raise ModelError(f"model head {head.name}: {len(probs)} outputs for {len(head.classes)} classes")
    by_index = sorted(head.classes, key=lambda c: c.index)
    best = by_index[int(np.argmax(probs))]
    return Classification(
        head.name,
        _concept(head.finding),
        _concept(best.code),
        round(float(np.max(probs)), 4),
        not best.negative,
        tuple((_concept(c.code), round(float(p), 4)) for c, p in zip(by_index, probs, strict=True)),
    )


def locate(segments: list[Segment]) -> None:
    """Set each lesion's ``site``: the organ segment that most of the lesion and its rim (2 voxels)
    lies in. The rim counts because an organ head may leave the lesion itself out of the organ."""
    organs = [s for s in segments if s.kind == "organ"]
    for lesion in (s for s in segments if s.kind == "lesion"):
        m = lesion.mask
        box = tuple(
            slice(max(0, b.start - 2), min(n, b.stop + 2)) for b, n in zip(m.box, m.shape, strict=True)
        )
        near = ndimage.binary_dilation(lesion.mask.within(box), iterations=2)
        overlap = {o.label: int(np.count_nonzero(o.mask.within(box) & near)) for o in organs}
        best = max(overlap, key=overlap.get, default=None)
        lesion.site = best if best and overlap[best] else None


def merge(parts: list[Findings]) -> Findings:
    """Several models' findings on one series as one: their segments numbered on in order (each
    keeping its model and the tracking UID its model gave it), every classification, the lesion
    probability of the first model that gives one, and each lesion's site among every model's organs
    (one model's lesion may lie in another's organ)."""
    if len(parts) == 1:
        return parts[0]
    segments, classifications = [], []
    for part in parts:
        for seg in part.segments:
            seg.tracking_uid = part.tracking_uid(seg)  # before renumbering: it depends on the number
            seg.model = seg.model or part.model
            seg.number = len(segments) + 1
            segments.append(seg)
        for c in part.classifications:
            c.model = c.model or part.model
            classifications.append(c)
    if any(s.kind == "lesion" and s.site is None for s in segments):
        unplaced = [s for s in segments if s.kind == "organ" or (s.kind == "lesion" and s.site is None)]
        locate(unplaced)
    probabilities = [p.lesion_probability for p in parts if p.lesion_probability is not None]
    return Findings(
        series=parts[0].series,
        model=ModelRef.combined([p.model for p in parts]),
        segments=segments,
        classifications=classifications,
        notes=list(dict.fromkeys(n for p in parts for n in p.notes)),
        lesion_probability=probabilities[0] if probabilities else None,
        shadow_agreement={k: v for p in parts for k, v in p.shadow_agreement.items()},
    )
