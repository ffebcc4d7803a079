"""Parametric Map of the lesion head's probability: where the model looked, on the source images.

Why a Parametric Map and not a FRACTIONAL SEG: both are highdicom IODs, but OHIF 3.12 (the viewer
the README shows) refuses fractional segmentations ("Fractional segmentations are not yet
supported") and draws Parametric Maps as a colour overlay (its ``dicom-pmap`` extension).

Stored values are the probability x 255 (the model's confidence has that resolution; the IOD
wants 16 bits allocated), with
a Real World Value Mapping back to 0..1. Frames: the slices where the probability reaches
:data:`MIN_SHOWN` somewhere (the slice of the highest probability when it never does), so a map of
a clean series stays small; RLE Lossless keeps the mostly-zero frames at a few kB each.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import RLELossless

from node.analysis.findings import Findings
from node.writers import uids
from node.writers.seg import slice_sources

MIN_SHOWN = 13  # of 255: 5 %


def write_probability_map(findings: Findings) -> hd.pm.ParametricMap:
    series, model = findings.series, findings.model
    p = findings.lesion_probability
    if p is None or p.shape != tuple(series.volume.spatial_shape) or p.dtype != np.uint8:
        raise ValueError("Findings.lesion_probability must be a uint8 array on the volume's grid.")
    sources = slice_sources(series)
    if sources[0].frame is not None:  # a multi-frame source: the map has every frame of it
        chosen, images = sources, [sources[0].dataset]
    else:
        chosen = [s for s in sources if p[s.index].max() >= MIN_SHOWN] or [
            max(sources, key=lambda s: int(p[s.index].max()))
        ]
        images = [s.dataset for s in chosen]
    pixels = np.stack([s.plane_to_source(p[s.index]) for s in chosen]).astype(np.uint16)  # PS3.3: 16 bits
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="P_LESION",
        lut_explanation="Lesion probability",
        unit=codes.UCUM.NoUnits,
        value_range=(0, 255),
        slope=1 / 255,
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
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=127.5, window_width=255.0)],
        transfer_syntax_uid=RLELossless,
        content_label="AI_PROBABILITY",
        content_description=f"{model.name} {model.version} lesion probability"[:64],
        **identity,
    )
    pm.Laterality = ""  # Type 2C in General Series; the node does not know it
    return pm
