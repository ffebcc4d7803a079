"""An independent SEG reader for tests: pydicom only, no highdicom.

It maps every SEG frame back to patient coordinates from the SEG's own
per-frame plane positions, so a test can compare segmentations across
storage geometries without trusting the writer's (or highdicom's) geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom


@dataclass
class SegmentPoints:
    label: str
    points: np.ndarray  # (N, 3) LPS mm of every pixel in the segment
    voxel_mm3: float

    @property
    def centroid(self) -> np.ndarray:
        return self.points.mean(axis=0)

    @property
    def volume_ml(self) -> float:
        return len(self.points) * self.voxel_mm3 / 1000.0


def read_segments(path: Path) -> dict[str, SegmentPoints]:
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    measures = shared.PixelMeasuresSequence[0]
    row_sp, col_sp = (float(v) for v in measures.PixelSpacing)
    thickness = float(getattr(measures, "SpacingBetweenSlices", None) or measures.SliceThickness)
    along_row, along_col = iop[:3], iop[3:]
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    pts: dict[int, list[np.ndarray]] = {n: [] for n in labels}
    for frame, fg in zip(frames, ds.PerFrameFunctionalGroupsSequence, strict=True):
        ident = fg if "SegmentIdentificationSequence" in fg else shared  # one segment: shared
        number = int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ipp = np.array(fg.PlanePositionSequence[0].ImagePositionPatient, float)
        r, c = np.nonzero(frame)
        pts[number].append(ipp + np.outer(c * col_sp, along_row) + np.outer(r * row_sp, along_col))
    return {
        labels[n]: SegmentPoints(
            labels[n], np.concatenate(p) if p else np.zeros((0, 3)), row_sp * col_sp * thickness
        )
        for n, p in pts.items()
    }
