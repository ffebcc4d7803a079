"""Phantom series the tests share, with what the reference model is known to find in them."""

from __future__ import annotations

from pathlib import Path

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
