"""Parametric Map of the lesion head's probability: where the model looked, on the source images.

Why a Parametric Map and not a FRACTIONAL SEG: both are highdicom IODs, but OHIF 3.12 (the viewer
the README shows) refuses fractional segmentations ("Fractional segmentations are not yet
supported") and draws Parametric Maps as a colour overlay (its ``dicom-pmap`` extension).

Stored values are the probability itself (0..1, the model's confidence has 1/255 resolution) as
32-bit floats, the form dcmqi reads, with an identity Real World Value Mapping. Frames: one per
source image, the whole stack: readers that rebuild a volume (dcmqi's ``paramap2itkimage``, 3D
Slicer) refuse gaps, and OHIF's adapter places each frame at its source image's index in a buffer
as long as the map, so a partial stack makes it fail. Explicit VR Little Endian, the transfer
syntax every reader has (dcmqi cannot read RLE). At 4 bytes a voxel the map is as large as the
CT twice over, which is why destinations receive it only when they ask (``accepts: [pmap]``).
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
    chosen = slice_sources(series)
    # a multi-frame source is one image; single-frame sources are one image each
    images = [chosen[0].dataset] if chosen[0].frame is not None else [s.dataset for s in chosen]
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
