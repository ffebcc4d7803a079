"""The 3D sliding window's bounded memory: sums given back row by row as they become final, and the
way back to the source grid fed from them, equal to the whole-array computation (which
tests/test_nnunet.py and tests/test_monai_bundle.py compare with the frameworks themselves)."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from node.model.manifest import Patch3DSpec, Resampling
from node.model.sliding_window import SlidingWindow, labels_from_slabs, logits_to_labels, sliding_window

SPACING = (1.5, 1.5, 1.5)


def network(classes: int, seed: int = 0):
    """A per-voxel linear map with a term that varies along z: coherent classes, boundaries everywhere."""
    w = np.random.default_rng(seed).normal(size=(classes, 1, 1, 1)).astype(np.float32)

    def net(tile: np.ndarray) -> np.ndarray:
        x = tile[0, 0]
        out = w * x[None]
        out += np.float32(0.3) * np.sin(np.arange(x.shape[0], dtype=np.float32) / 3)[None, :, None, None]
        return out[None]

    return net


SPECS = {
    "nnunet": Patch3DSpec(axes="RAS", spacing=SPACING, patch=(16, 24, 24), step=0.5, mirror_axes=(0, 2)),
    "monai": Patch3DSpec(axes="RAS", spacing=SPACING, patch=(16, 24, 24), step=0.25, tiling="monai"),
}
RESAMPLINGS = {
    "linear": Resampling(),
    "nearest_z": Resampling(order_z=0, force_separate_z=True),
    "monai": Resampling(grid="monai", data_order=1),
    "monai_probabilities": Resampling(grid="monai", data_order=1, interpolate="probabilities"),
}


@pytest.mark.parametrize("tiling", list(SPECS))
@pytest.mark.parametrize("resampling", list(RESAMPLINGS))
@pytest.mark.parametrize("out", [(80, 60, 50), (20, 30, 40)])  # finer and coarser than the network's grid
def test_streamed_way_back_equals_the_whole(tiling, resampling, out):
    spec, r, net = SPECS[tiling], RESAMPLINGS[resampling], network(7)
    x = np.random.default_rng(1).normal(size=(1, 50, 40, 33)).astype(np.float32)
    target = tuple(s * n / o for s, n, o in zip(SPACING, x.shape[1:], out, strict=True))
    whole, tiles = sliding_window(x, spec, net)
    expected = logits_to_labels(whole, out, SPACING, target, r)
    window = SlidingWindow(x, spec, net, rows=3)  # small pieces: every way a piece can end is met
    got = labels_from_slabs(window, x.shape[1:], out, SPACING, target, r, slab=5)
    assert window.tiles == tiles
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(g, e)


def _peak_memory(classes: int, rows: int, depth: int = 16) -> int:
    """Bytes held at most while a series of ``rows`` network rows goes through, every row checked."""
    spec = Patch3DSpec(axes="RAS", spacing=SPACING, patch=(depth, 48, 48), step=0.5)
    x = np.random.default_rng(2).normal(size=(1, rows, 48, 48)).astype(np.float32)
    seen = []
    tracemalloc.start()
    try:
        for z, block in SlidingWindow(x, spec, network(classes)):
            assert block.shape[0] == classes and block.shape[2:] == (48, 48) and block.dtype == np.float16
            seen += range(z, z + block.shape[1])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == list(range(rows)), "every row once, in order"
    return peak


def test_memory_does_not_grow_with_the_series():
    """Four times the rows: the same memory (the whole grid's sums were held before: 4x)."""
    classes = 40
    short, long = _peak_memory(classes, 160), _peak_memory(classes, 640)
    whole_long = classes * 640 * 48 * 48 * 2  # float16 sums of the long series' whole grid
    assert long < 1.1 * short, f"{short / 2**20:.1f} MiB for 160 rows, {long / 2**20:.1f} MiB for 640"
    assert long < whole_long / 4, f"{long / 2**20:.1f} MiB against {whole_long / 2**20:.0f} MiB whole"


def test_the_memory_benchmark_runs_a_many_class_model(tmp_path):
    from node.tools.memory_bench import bench_memory3d

    out = tmp_path / "memory.json"
    assert bench_memory3d(classes=6, slices=24, size=64, output=out) == 0
    report = json.loads(out.read_text())
    assert report["network_grid"] == [16, 267, 267] and report["classes"] == 6
    assert 0 < report["rss_gb_after_reading"] <= report["peak_rss_gb"]
    assert report["classes_found"] >= 2  # the convolution's classes reach the source grid
