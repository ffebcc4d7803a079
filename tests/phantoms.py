"""Phantom series the tests share, with what the reference model is known to find in them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmread

from node.synthetic.dicom import Patient, WrittenSeries, write_variant
from node.synthetic.phantom import Phantom


def confident_lesion_ct(out: Path, patient: Patient | None = None) -> WrittenSeries:
    """A small CT (24 x 112 x 112) in which phantom-fm finds a kidney lesion with p ~ 0.9: enough
    to contradict a report that says there is none."""
    return write_variant(
        Phantom.random(4242, n_lesions=3),
        out,
        "axial",
        "CT",
        seed=1,
        shape=(24, 112, 112),
        pixel_spacing=3.4,
        slice_spacing=6.0,
        patient=patient or Patient(),
    )


def aorta_drawn_in_slicer(source_files: list[Path], mask: np.ndarray, out: Path) -> Path:
    """An Aorta segment drawn in a viewer (3D Slicer's manufacturer, a manual segment) on a series'
    images, ``mask`` in the order of ``source_files``: a label set once the node holds the series."""
    import highdicom as hd

    aorta = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Aorta",
        segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept("15825003", "SCT", "Aorta"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )  # fmt: skip
    seg = hd.seg.Segmentation(
        source_images=[dcmread(f) for f in source_files], pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[aorta],
        series_instance_uid=hd.UID(), series_number=90, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="3D Slicer", manufacturer_model_name="Slicer", software_versions="5.6", device_serial_number="1",
    )  # fmt: skip
    seg.save_as(out)
    return out
