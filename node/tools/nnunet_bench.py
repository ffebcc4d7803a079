"""``pacs-node bench --suite nnunet``: an imported nnU-Net model on the node against ``nnUNetPredictor``.

The same CT phantom series, the same weights, the same machine, in the same run: each side in its
own fresh process (so each peak RSS is its own), the series already read (the node's volume; for
nnU-Net, SimpleITK's reading oriented as the model's axes, as TotalSegmentator gives it), timed
from volume to label map. Medians of ``repeat`` runs, the ratio, the peak RSS of each, and the Dice
per label between the two answers (they must agree: the figure is speed at equal output).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import highdicom as hd
import numpy as np

from node.tools import in_fresh_process, peak_rss_mib


def _ours(model_dir: str, series_dir: str, repeat: int, out) -> None:
    from node.identity import Stage
    from node.ingest.series import find_series
    from node.ingest.volume import load_volume
    from node.model.inference import predict
    from node.model.manifest import load_model
    from node.model.runtimes.onnxruntime import OnnxRuntime
    from node.timing import Stopwatch

    model = load_model(model_dir)
    runtime = OnnxRuntime(model)
    volume = load_volume(find_series([Path(series_dir)])[0][0])
    times, stages = [], []
    for _ in range(repeat):
        clock = Stopwatch()
        t0 = time.perf_counter()
        pred = predict(volume, model, runtime, clock)
        times.append(time.perf_counter() - t0)
        stages.append(
            {
                s.value: clock.seconds.get(s, 0.0)
                for s in (Stage.PREPROCESS, Stage.INFERENCE, Stage.POSTPROCESS)
            }
        )
    labels = next(iter(pred.labels.values()))  # on the source grid
    out.put(
        {
            "seconds": times,
            "stages": stages,
            "rss_mb": peak_rss_mib(),
            "labels": labels,
            "affine": volume.volume.affine,
        }
    )


def _theirs(src: str, series_dir: str, axes: str, repeat: int, threads: int, out) -> None:
    import SimpleITK as sitk
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(threads)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(series_dir))
    image = sitk.DICOMOrient(reader.Execute(), axes)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "image_0000.nii.gz")
        sitk.WriteImage(image, path)
        data, props = SimpleITKIO().read_images([path])
    with contextlib.redirect_stdout(io.StringIO()):
        p = nnUNetPredictor(
            tile_step_size=0.5, use_gaussian=True, use_mirroring=True, perform_everything_on_device=False,
            device=torch.device("cpu"), allow_tqdm=False,
        )  # fmt: skip
        p.initialize_from_trained_model_folder(src, use_folds=None)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            seg = p.predict_single_npy_array(data, props)
        times.append(time.perf_counter() - t0)
    d = np.reshape(image.GetDirection(), (3, 3)) * np.asarray(image.GetSpacing())
    affine = np.eye(4)
    affine[:3, :3] = d[:, ::-1]  # numpy (z, y, x) index -> LPS
    affine[:3, 3] = image.GetOrigin()
    out.put({"seconds": times, "rss_mb": peak_rss_mib(), "labels": seg.astype(np.uint8), "affine": affine})


def bench_nnunet(model_dir: Path, src: Path, slices: int, size: int, repeat: int, output: Path | None) -> int:
    from node.model.manifest import load_model
    from node.synthetic.dicom import write_axial_series
    from node.synthetic.phantom import Phantom

    model = load_model(model_dir)
    axes = model.input.volume.axes
    with tempfile.TemporaryDirectory(prefix="pacs-node-bench-") as tmp:
        series = Path(tmp) / "ct"
        fov = 400.0  # mm, a body CT's field of view; slices 1.25 mm apart
        write_axial_series(
            Phantom.random(11, n_lesions=0), series, shape=(slices, size, size),
            pixel_spacing=fov / size, slice_spacing=1.25, z_center=-20.0,
        )  # fmt: skip
        threads = os.cpu_count() or 1
        ours = in_fresh_process(_ours, str(model_dir), str(series), repeat)
        theirs = in_fresh_process(_theirs, str(src), str(series), axes, repeat, threads)
    # nnU-Net's labels onto the source grid (a permutation of its RAS grid: no voxel moves)
    grid = hd.Volume(ours["labels"], ours["affine"], coordinate_system="PATIENT")
    mine = ours["labels"]
    other = (
        hd.Volume(theirs["labels"], theirs["affine"], coordinate_system="PATIENT").match_geometry(grid).array
    )
    dice = {}
    for k, label in ((lab.index, lab.name) for h in model.heads for lab in h.labels):
        a, b = mine == k, other == k
        both = float(a.sum() + b.sum())  # 0: the label is in neither answer (not in this phantom's slab)
        dice[label] = round(2 * float((a & b).sum()) / both, 4) if both else None
    med_ours, med_theirs = statistics.median(ours["seconds"]), statistics.median(theirs["seconds"])
    stages = {s: round(statistics.median(r[s] for r in ours["stages"]), 2) for s in ours["stages"][0]}
    report = {
        "series": f"{size}x{size}x{slices} CT phantom, {fov / size:.3f} mm pixels, 1.25 mm slices",
        "model": f"{model.name} {model.version}: {len(model.heads)} network(s), patch {list(model.input.volume.patch)}, "
        f"spacing {list(model.input.volume.spacing)} mm, mirroring {list(model.input.volume.mirror_axes)}",
        "cpu_threads": threads,
        "repeat": repeat,
        "node_seconds_median": round(med_ours, 2),
        "node_stages_median": stages,
        "nnunet_seconds_median": round(med_theirs, 2),
        "speedup": round(med_theirs / med_ours, 2),
        "node_peak_rss_mb": round(ours["rss_mb"]),
        "nnunet_peak_rss_mb": round(theirs["rss_mb"]),
        "dice_per_label": dice,
    }
    print(json.dumps(report, indent=2))
    if output:
        Path(output).write_text(json.dumps(report, indent=2))
    return 0
