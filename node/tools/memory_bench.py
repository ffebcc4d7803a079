"""``pacs-node bench --suite memory3d``: the peak memory of one many-class 3D network on a large CT.

What the node holds besides the network itself: the volume, the resampled input, the tiles' sums
and the way back to the source grid. The network here is a 1x1x1 convolution to ``classes``
outputs (an ONNX graph written here, no weights to download), so its own activations are nothing
and the figure is the node's; a real network adds its activations for one patch (TotalSegmentator's
3d_fullres at 128^3: about 1-2 GB in ONNX Runtime, not measured here). Each run is a fresh process,
so its peak RSS is its own.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from node.tools import in_fresh_process, peak_rss_mib

SPACING = 1.5  # mm: TotalSegmentator's 3d_fullres grid
PATCH = 128


def write_model(folder: Path, classes: int) -> Path:
    """A patch3d model of ``classes`` outputs (background included): per voxel, ``w_k x + b_k``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(classes, 1, 1, 1, 1)).astype(np.float32)
    b = rng.normal(size=(classes,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["logits"])],
        "classes",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, PATCH, PATCH, PATCH])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes, PATCH, PATCH, PATCH])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "net.onnx")
    structure = {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"}
    manifest = {
        "name": f"classes-{classes}",
        "version": "1.0.0",
        "description": "memory benchmark: a 1x1x1 convolution, not a model",
        "modalities": ["CT"],
        "input": {
            "kind": "patch3d",
            "volume": {"axes": "RAS", "spacing": [SPACING] * 3, "patch": [PATCH] * 3, "step": 0.5},
            "intensity": {"kind": "dataset", "clip": [-1000.0, 1500.0], "mean": 50.0, "std": 300.0},
        },
        "heads": [
            {
                "name": "net",
                "kind": "segmentation",
                "graph": "net.onnx",
                "inputs": ["image"],
                "outputs": ["seg"],
                "labels": [
                    {"index": k, "name": f"class {k}", "category": structure, "type": structure}
                    for k in range(1, classes)
                ],
            }
        ],
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return folder


def _run(model_dir: str, series_dir: str, out) -> None:
    from node.identity import Stage
    from node.ingest.series import find_series
    from node.ingest.volume import load_volume
    from node.model.inference import predict
    from node.model.manifest import load_model
    from node.model.runtimes.onnxruntime import OnnxRuntime
    from node.timing import Stopwatch

    model = load_model(model_dir)
    volume = load_volume(find_series([Path(series_dir)])[0][0])
    loaded = _current_rss_gb()  # the volume and what reading the series left behind
    clock = Stopwatch()
    t0 = time.perf_counter()
    pred = predict(volume, model, OnnxRuntime(model), clock)
    seconds = time.perf_counter() - t0
    labels = next(iter(pred.labels.values()))
    out.put(
        {
            "seconds": round(seconds, 1),
            "stages": {s.value: round(clock.seconds.get(s, 0.0), 1) for s in (Stage.PREPROCESS, Stage.INFERENCE, Stage.POSTPROCESS)},
            "rss_gb_after_reading": loaded,
            "peak_rss_gb": round(peak_rss_mib() / 1024, 2),  # reading the series included
            "classes_found": int(len(np.unique(labels))),
        }
    )


def _current_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 2**20, 2)  # kB
    return float("nan")




def bench_memory3d(classes: int, slices: int, size: int, output: Path | None) -> int:
    from node.synthetic.dicom import write_axial_series
    from node.synthetic.phantom import Phantom

    with tempfile.TemporaryDirectory(prefix="pacs-node-bench-") as tmp:
        model = write_model(Path(tmp) / "model", classes)
        series = Path(tmp) / "ct"
        fov = 400.0  # mm, a body CT's field of view; slices 1 mm apart
        write_axial_series(
            Phantom.random(11, n_lesions=0), series, shape=(slices, size, size),
            pixel_spacing=fov / size, slice_spacing=1.0, z_center=-20.0,
        )  # fmt: skip
        result = in_fresh_process(_run, str(model), str(series))
    grid = [round(slices * 1.0 / SPACING), round(size * fov / size / SPACING), round(size * fov / size / SPACING)]
    report = {
        "series": f"{size}x{size}x{slices} CT, {fov / size:.2f} mm pixels, 1 mm slices",
        "classes": classes,
        "network_grid": grid,
        # what holding the whole grid's float16 sums would take (before: held, with their weights)
        "whole_grid_sums_gb": round(classes * int(np.prod(grid)) * 2 / 2**30, 2),
        **result,
    }
    print(json.dumps(report, indent=2))
    if output:
        output.write_text(json.dumps(report, indent=2) + "\n")
    return 0
