"""The node's SEG against a framework's own answer (nnU-Net, MONAI), both as points in patient space."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from node.ingest.series import find_series
from node.model.manifest import load_model
from node.model.runtimes.onnxruntime import OnnxRuntime
from node.pipeline import Pipeline
from tests.seg_readback import read_segments


def points_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two sets of voxel centres (N, 3), in mm, equal to 0.1 mm."""
    sa, sb = ({tuple(p) for p in np.round(pts, 1)} for pts in (a, b))
    return 2 * len(sa & sb) / max(len(sa) + len(sb), 1)


def node_points(model_dir: Path, series_dir: Path, out: Path) -> dict[str, np.ndarray]:
    """Each segment of the SEG the node writes for the series, read back by the independent reader."""
    model = load_model(model_dir)
    series = find_series([series_dir])[0][0]
    result = Pipeline(model, OnnxRuntime(model)).process(series, out)
    assert result.ok, result.error
    seg = next(w.path for w in result.outputs if w.kind == "seg")
    return {name: s.points for name, s in read_segments(seg).items()}
