"""Grayscale Softcopy Presentation State with lesion outlines of a :class:`~node.analysis.findings.Findings`.

One graphic layer ``AI_LESIONS``; per lesion and acquired slice it crosses, its
closed outline (POLYLINE, PIXEL units, the mask's 0.5 iso-contour as in
:mod:`node.analysis.measure`), and on the slice of its longest diameter the diameter
line and a label "Lesion 1, 23 mm". Graphic objects carry the lesion's
Tracking ID/UID (the SEG segment's), so outline, segment and SR group can be
matched. Every source image of the series is referenced; annotations on a
multi-frame source name their frame.
"""

from __future__ import annotations

from collections import defaultdict

import highdicom as hd
import numpy as np

from node.analysis.findings import Findings, Segment
from node.analysis.measure import outline
from node.writers import uids
from node.writers.seg import SliceSource, closed, slice_sources

LAYER = "AI_LESIONS"
CT_WINDOW = (40.0, 400.0)  # soft tissue (center, width) in HU
_YELLOW = hd.color.CIELabColor(97.1, -21.6, 94.5)


def write_gsps(findings: Findings) -> hd.pr.GrayscaleSoftcopyPresentationState:
    series, model = findings.series, findings.model
    if not series.datasets:
        raise ValueError("SeriesVolume.datasets is empty; a presentation state must reference images.")
    sources = slice_sources(series)
    layer = hd.pr.GraphicLayer(
        layer_name=LAYER, order=1, description="AI lesion outlines", display_color=_YELLOW
    )

    # (SOP Instance UID, frame) -> graphic and text objects on that image/frame
    graphics: dict[tuple[str, int | None], list] = defaultdict(list)
    texts: dict[tuple[str, int | None], list] = defaultdict(list)
    where: dict[tuple[str, int | None], SliceSource] = {}
    groups = []
    for k, lesion in enumerate(findings.lesions, start=1):
        group = hd.pr.GraphicGroup(graphic_group_id=k, label=lesion.label[:64], description="AI lesion")
        tracking = {"tracking_id": lesion.label[:64], "tracking_uid": findings.tracking_uid(lesion)}
        drawn = False
        for src in sources:
            plane = lesion.mask.plane(src.index)
            if not plane.any():
                continue
            key = (src.dataset.SOPInstanceUID, src.frame)
            where[key] = src
            for contour in outline(plane):
                graphics[key].append(
                    hd.pr.GraphicObject(
                        graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                        graphic_data=closed(src.graphic_data(contour)),
                        units=hd.pr.AnnotationUnitsValues.PIXEL,
                        graphic_group=group,
                        **tracking,
                    )
                )
                drawn = True
            if src.index == lesion.diameter_slice and lesion.diameter_endpoints is not None:
                line = src.graphic_data(np.asarray(lesion.diameter_endpoints, float))
                graphics[key].append(
                    hd.pr.GraphicObject(
                        graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                        graphic_data=line,
                        units=hd.pr.AnnotationUnitsValues.PIXEL,
                        graphic_group=group,
                        **tracking,
                    )
                )
                texts[key].append(
                    hd.pr.TextObject(
                        text_value=label_text(lesion, findings),
                        units=hd.pr.AnnotationUnitsValues.PIXEL,
                        anchor_point=tuple(float(v) for v in line[np.argmin(line[:, 1])]),  # upper end
                        anchor_point_visible=True,
                        graphic_group=group,
                        **tracking,
                    )
                )
        if drawn:
            groups.append(group)

    annotations = [
        hd.pr.GraphicAnnotation(
            referenced_images=[where[key].dataset],
            graphic_layer=layer,
            referenced_frame_number=key[1],
            graphic_objects=graphics[key] or None,
            text_objects=texts[key] or None,
        )
        for key in sorted(where, key=lambda k: where[k].index)
    ]

    center, width = window(findings)
    pr = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=series.datasets,
        **uids.instance_identity(
            series.series_uid, series.datasets[0].get("SeriesNumber"), model.name, model.version, "gsps"
        ),
        content_label="AI_ANNOTATIONS",
        content_description=f"Lesion outlines ({model.name} {model.version})"[:64],
        graphic_annotations=annotations or None,
        graphic_layers=[layer],
        graphic_groups=groups or None,
        **_windowing(series.datasets, center, width, "SOFT TISSUE" if series.modality == "CT" else "P1-P99"),
    )
    # General Series: Laterality is required for a paired body part; validators decide that from
    # Body Part Examined, so carry both over from the source, or say "unknown" (empty) without them.
    src0 = series.datasets[0]
    if "BodyPartExamined" in src0:
        pr.BodyPartExamined = src0.BodyPartExamined
    if "Laterality" in src0:
        pr.Laterality = src0.Laterality
    elif "BodyPartExamined" not in src0:
        pr.Laterality = ""
    return pr


def _windowing(datasets, center: float, width: float, explanation: str) -> dict:
    """The window for every referenced image.

    Center, width and explanation go in as one-item lists: highdicom 0.28 splits a plain string
    explanation into characters.

    A presentation state has one Modality LUT for all its images. When the
    source's Rescale Slope/Intercept vary per slice (legal, and common after
    some reconstructions), the GSPS keeps an identity Modality LUT and gives
    each group of images with the same rescale its own window in stored values.
    """
    groups: dict[tuple[float, float], list] = defaultdict(list)
    for ds in datasets:
        groups[(float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0))].append(ds)
    if len(groups) == 1:
        return {
            "voi_lut_transformations": [
                hd.pr.SoftcopyVOILUTTransformation(
                    window_center=[center], window_width=[width], window_explanation=[explanation]
                )
            ]
        }
    return {
        "modality_lut_transformation": hd.ModalityLUTTransformation(
            rescale_intercept=0.0, rescale_slope=1.0, rescale_type="US"
        ),
        "voi_lut_transformations": [
            hd.pr.SoftcopyVOILUTTransformation(
                window_center=[(center - intercept) / slope],
                window_width=[width / slope],
                window_explanation=[explanation],
                referenced_images=hd.ReferencedImageSequence(referenced_images=group),
            )
            for (slope, intercept), group in groups.items()
        ],
    }


def label_text(lesion: Segment, findings: Findings) -> str:
    """e.g. "Lesion 1, 23 mm", and with a prior "Lesion 1, 23 mm NEW" or "Lesion 2, 16 mm +35%"."""
    text = lesion.label
    if lesion.longest_diameter_mm is not None:
        text += f", {lesion.longest_diameter_mm:.0f} mm"
    if findings.comparison is not None:
        change = findings.comparison.by_uid().get(findings.tracking_uid(lesion))
        if change is not None:
            text += f" {change.tag()}"
    return text[:64]


def window(findings: Findings) -> tuple[float, float]:
    """(center, width) in modality units: CT soft tissue; MR the 1st-99th percentile of the body."""
    if findings.series.modality == "CT":
        return CT_WINDOW
    array = findings.series.volume.array
    acquired = np.array([f is not None for f in findings.series.frames], bool)
    values = array[acquired] if acquired.any() else array
    values = values[values > 0]  # background air would pull the low end to zero
    if values.size == 0:
        return 0.5, 1.0
    lo, hi = np.percentile(values, [1.0, 99.0])
    width = max(float(hi - lo), 1.0)
    return float(lo + hi) / 2.0, width

