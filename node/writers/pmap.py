"""Parametric Map of the lesion head's probability: where the model looked, on the source images.

Why a Parametric Map and not a FRACTIONAL SEG: both are highdicom IODs, but OHIF 3.12 (the viewer
the README shows) refuses fractional segmentations ("Fractional segmentations are not yet
supported") and draws Parametric Maps as a colour overlay (its ``dicom-pmap`` extension).

Stored values are the probability itself (0..1, the model's confidence has 1/255 resolution) as
32-bit floats, the form dcmqi reads, with an identity Real World Value Mapping. Frames: every slice from the
first to the last where the probability reaches :data:`MIN_SHOWN` somewhere (the slice of the
highest probability when it never does): a contiguous stack, because readers that rebuild a volume
(dcmqi's ``paramap2itkimage``, 3D Slicer) refuse frames with gaps. Explicit VR Little Endian, the
transfer syntax every reader has (dcmqi cannot read RLE); the range keeps the map small.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from node.analysis.findings import Findings
from node.writers import uids
from node.writers.seg import slice_sources

MIN_SHOWN = 13  # of 255: 5 %
# BodyPartExamined -> SNOMED CT anatomic region (CID 4) for the Frame Anatomy functional group
REGIONS = {
    "HEAD": ("69536005", "Head"),
    "CHEST": ("51185008", "Thorax"),
    "ABDOMEN": ("818981001", "Abdomen"),
    "PELVIS": ("816092008", "Pelvis"),
}
WHOLE_BODY = ("38266002", "Entire body")


def _frame_anatomy(source) -> Dataset:
    """Frame Anatomy (mandatory in a Parametric Map, and read by dcmqi): the series' body part when it
    names one we know, else the entire body; laterality unpaired (U), as the node cannot know it."""
    value, meaning = REGIONS.get(str(source.get("BodyPartExamined", "")).upper(), WHOLE_BODY)
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = value, "SCT", meaning
    item = Dataset()
    item.AnatomicRegionSequence = [region]
    item.FrameLaterality = "U"
    return item


def write_probability_map(findings: Findings) -> hd.pm.ParametricMap:
    series, model = findings.series, findings.model
    p = findings.lesion_probability
    if p is None or p.shape != tuple(series.volume.spatial_shape) or p.dtype != np.uint8:
        raise ValueError("Findings.lesion_probability must be a uint8 array on the volume's grid.")
    sources = slice_sources(series)
    if sources[0].frame is not None:  # a multi-frame source: the map has every frame of it
        chosen, images = sources, [sources[0].dataset]
    else:
        # sources run along the slice axis: keep the contiguous range between the first and last shown
        shown = [k for k, s in enumerate(sources) if p[s.index].max() >= MIN_SHOWN] or [
            max(range(len(sources)), key=lambda k: int(p[sources[k].index].max()))
        ]
        # at least two frames: a reader computes the slice spacing from them (dcmqi writes nothing for one)
        first, last = min(shown), max(shown)
        if first == last and len(sources) > 1:
            first, last = (first, first + 1) if first + 1 < len(sources) else (first - 1, first)
        chosen = sources[first : last + 1]
        images = [s.dataset for s in chosen]
    # the probability itself, as 32-bit floats (Float Pixel Data): what dcmqi reads (it has no integer path)
    pixels = (np.stack([s.plane_to_source(p[s.index]) for s in chosen]).astype(np.float32) / 255).astype(np.float32)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="P_LESION",
        lut_explanation="Lesion probability",
        unit=codes.UCUM.NoUnits,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=codes.DCM.Probability,
    )
    identity = uids.instance_identity(
        series.series_uid, series.first_dataset.get("SeriesNumber"), model.name, model.version, "pmap"
    )
    pm = hd.pm.ParametricMap(
        source_images=images,
        pixel_array=pixels,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_label="AI_PROBABILITY",
        content_description=f"{model.name} {model.version} lesion probability"[:64],
        **identity,
    )
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [_frame_anatomy(series.first_dataset)]
    pm.ContentCreatorName = ""  # Type 2 (Content Identification): an algorithm, named in Software Versions
    return pm
