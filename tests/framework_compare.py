"""The node's SEG against a framework's own answer (nnU-Net, MONAI), both as points in patient space."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from node.ingest.series import find_series
from node.model.manifest import load_model
from node.model.runtimes.onnxruntime import OnnxRuntime
from node.pipeline import Pipeline
from node.synthetic.dicom import write_variant
from node.synthetic.phantom import Phantom
from tests.seg_readback import read_segments

# the organs both phantom models (node/tools/nnunet_phantom.py, monai_phantom.py) learn, and the
# series they are compared on
LABELS = ("liver", "spleen", "kidney", "lung")
SERIES = dict(shape=(40, 96, 96), pixel_spacing=3.5, slice_spacing=5.0)


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


def assert_lands_where_the_framework_does(
    model_dir: Path, framework_points: Callable[[Path], dict[str, np.ndarray]], tmp_path: Path, variant: str
) -> None:
    """Dice >= 0.98 per label in patient space between the node's SEG of the series stored as
    ``variant`` and the framework's answer for the same voxels stored axially."""
    phantom = Phantom.random(4242, n_lesions=0)
    stored = tmp_path / variant
    write_variant(phantom, stored, variant, "CT", seed=3, **SERIES)
    axial = tmp_path / "axial-reference"
    write_variant(phantom, axial, "axial", "CT", seed=3, **SERIES)
    ours = node_points(model_dir, stored, tmp_path / "out")
    theirs = framework_points(axial)
    for name in LABELS:
        assert len(theirs[name]) > 500, f"{name}: the trained network should find it"
        dice = points_dice(ours.get(name, np.zeros((0, 3))), theirs[name])
        assert dice >= 0.98, (name, dice)
