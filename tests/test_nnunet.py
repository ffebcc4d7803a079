"""nnU-Net v2 models by path, judged against nnU-Net itself.

A results folder in nnU-Net's exact format is made here (``node.tools.nnunet_phantom``: plans of a
small 3d_fullres PlainConvUNet, dataset.json, a checkpoint trained briefly on phantoms in RAS, as
TotalSegmentator trains). It is imported, the node runs it on a CT phantom series, and the SEG,
read back by the independent reader into patient space, is compared with what ``nnUNetPredictor``
predicts for the same series read the way nnU-Net's ``SimpleITKIO`` reads it (the DICOM series
through SimpleITK, oriented to RAS as TotalSegmentator's preprocessing does).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from node.errors import ModelError
from node.ingest.series import find_series
from node.model.manifest import load_model
from node.model.runtimes.onnxruntime import OnnxRuntime
from node.pipeline import Pipeline
from node.synthetic.dicom import write_variant
from node.synthetic.phantom import Phantom
from tests.framework_compare import (
    LABELS,
    SERIES,
    assert_lands_where_the_framework_does,
)
from tests.seg_readback import read_segments

torch = pytest.importorskip("torch")
nnunetv2 = pytest.importorskip("nnunetv2")
sitk = pytest.importorskip("SimpleITK")

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def results_folder(tmp_path_factory) -> Path:
    from node.tools.nnunet_phantom import write_results_folder

    return write_results_folder(
        tmp_path_factory.mktemp("nnunet") / "Dataset901_Phantom" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    )


@pytest.fixture(scope="module")
def imported(results_folder, tmp_path_factory) -> tuple[Path, list[str]]:
    from node.model.importers.nnunet import import_nnunet

    warnings: list[str] = []
    out = tmp_path_factory.mktemp("models") / "phantom-nnunet"
    import_nnunet([results_folder], out, "RAS", warn=warnings.append)
    return out, warnings


def _predictor(folder: Path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with contextlib.redirect_stdout(io.StringIO()):
        p = nnUNetPredictor(
            tile_step_size=0.5,
            use_gaussian=True,
            use_mirroring=True,
            perform_everything_on_device=False,
            device=torch.device("cpu"),
            allow_tqdm=False,
        )
        p.initialize_from_trained_model_folder(str(folder), use_folds=None)
    return p


def _nnunet_points(folder: Path, series_dir: Path, tmp: Path) -> dict[str, np.ndarray]:
    """nnU-Net's own answer for a DICOM series: LPS points (mm) of every voxel of each label."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series_dir)))
    image = sitk.DICOMOrient(reader.Execute(), "RAS")  # x towards R, y towards A, z towards S
    assert np.allclose(np.reshape(image.GetDirection(), (3, 3)), np.diag([-1, -1, 1]))
    path = tmp / "image_0000.nii.gz"
    sitk.WriteImage(image, str(path))
    data, props = SimpleITKIO().read_images([str(path)])
    with contextlib.redirect_stdout(io.StringIO()):
        seg = _predictor(folder).predict_single_npy_array(data, props)
    out = {}
    for index, name in enumerate(LABELS, start=1):
        zyx = np.argwhere(seg == index)
        out[name] = np.array([image.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in zyx])
    return out


def test_import_states_what_nnunet_does(results_folder, imported):
    out, warnings = imported
    model = load_model(out)
    plans = json.loads((results_folder / "plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    stats = plans["foreground_intensity_properties_per_channel"]["0"]
    v = model.input.volume
    assert model.input.kind == "patch3d" and model.backbone is None
    assert v.axes == "RAS" and list(v.spacing) == config["spacing"] and list(v.patch) == config["patch_size"]
    assert v.mirror_axes == (0, 1, 2) and v.step == 0.5 and v.resampling.data_order == 3
    i = model.input.intensity
    assert i.kind == "dataset" and i.clip == (stats["percentile_00_5"], stats["percentile_99_5"])
    assert (i.mean, i.std) == (stats["mean"], stats["std"])
    (head,) = model.heads
    labels = {lab.name: lab for lab in head.labels}
    assert list(labels) == list(LABELS)
    # TotalSegmentator's own SNOMED CT mapping, shipped: liver is SCT 10200004
    assert (labels["liver"].type.value, labels["liver"].type.scheme) == ("10200004", "SCT")
    # a label it does not know: a clearly local code, and a warning naming it
    assert labels["lung"].type.scheme == "99PACSNODE"
    assert any("'lung'" in w for w in warnings)
    provenance = json.loads((out / "import.json").read_text())
    assert (
        provenance["format"] == "nnunet"
        and "fold_0/checkpoint_final.pth" in provenance["sources"][head.name]["files"]
    )


@pytest.mark.parametrize("variant", ["axial", "sagittal"])
def test_node_segments_where_nnunet_does(results_folder, imported, tmp_path, variant):
    """Dice >= 0.98 per label in patient space; the sagittal storage of the same voxels must land where
    nnU-Net's answer for the axial series is."""
    assert_lands_where_the_framework_does(
        imported[0], lambda axial: _nnunet_points(results_folder, axial, tmp_path), tmp_path, variant
    )


def test_sliding_window_steps_and_weights_are_nnunets():
    from nnunetv2.inference.sliding_window_prediction import (
        compute_gaussian,
        compute_steps_for_sliding_window,
    )

    from node.model.sliding_window import importance_map, tile_starts

    for size, patch, step in [((110, 64, 40), (64, 64, 32), 0.5), ((200, 97, 33), (48, 32, 33), 0.25)]:
        assert tile_starts(size, patch, step) == compute_steps_for_sliding_window(size, patch, step)
    ref = compute_gaussian(
        (32, 48, 40), sigma_scale=1 / 8, value_scaling_factor=10, device=torch.device("cpu")
    )
    assert np.array_equal(importance_map((32, 48, 40)), ref.numpy())


@pytest.mark.parametrize(
    "shape,spacing,target,order",
    [
        ((20, 30, 30), (5.0, 1.5, 1.5), (2.0, 2.0, 2.0), 3),
        ((16, 24, 20), (1.0, 1.2, 0.9), (1.5, 1.5, 1.5), 1),
    ],
)
def test_resampling_is_nnunets(shape, spacing, target, order):
    """Anisotropic input (the slice axis on its own, nearest) and isotropic, cubic and linear."""
    from nnunetv2.preprocessing.resampling.default_resampling import (
        compute_new_shape,
        resample_data_or_seg_to_shape,
    )

    from node.model.sliding_window import new_shape, resample

    data = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    new = new_shape(shape, spacing, target)
    assert tuple(compute_new_shape(shape, spacing, target)) == new
    ref = resample_data_or_seg_to_shape(
        data, new, spacing, target, is_seg=False, order=order, order_z=0, force_separate_z=None
    )
    ours = resample(data, new, spacing, target, order, 0, None, 3.0)
    assert ours.dtype == ref.dtype and np.array_equal(ours, ref)


@pytest.mark.parametrize(
    "classes,shape_in,shape_out,spacing_in,spacing_out",
    [
        (5, (30, 40, 36), (50, 70, 64), (1.5, 1.5, 1.5), (0.9, 0.86, 0.84)),  # finer: the usual way back
        (12, (20, 30, 30), (8, 45, 45), (2.0, 2.0, 2.0), (5.0, 1.33, 1.33)),  # thick slices: z on its own, nearest
    ],
)
def test_labels_come_back_as_nnunets_without_resampling_every_class(
    classes, shape_in, shape_out, spacing_in, spacing_out
):
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
    from scipy import ndimage

    from node.model.manifest import Resampling
    from node.model.sliding_window import logits_to_labels

    rng = np.random.default_rng(1)
    logits = np.stack([ndimage.gaussian_filter(rng.normal(size=shape_in), 2.5) * 30 for _ in range(classes)])
    logits = logits.astype(np.float16)
    ref = resample_data_or_seg_to_shape(
        logits, shape_out, spacing_in, spacing_out, is_seg=False, order=1, order_z=0, force_separate_z=None
    ).argmax(0)
    labels, _ = logits_to_labels(logits, shape_out, spacing_in, spacing_out, Resampling())
    assert len(np.unique(ref)) == classes  # every class present: boundaries everywhere
    assert np.mean(labels == ref) > 0.9999  # equal but for float16 ties


def _copy(src: Path, tmp: Path) -> Path:
    dst = tmp / "copy" / src.name
    shutil.copytree(src, dst)
    return dst


def _refused(src: Path, tmp: Path, match: str) -> None:
    from node.model.importers.nnunet import import_nnunet

    out = tmp / "out"
    with pytest.raises(ModelError, match=match) as e:
        import_nnunet([src], out, "RAS", warn=lambda m: None)
    assert "\n" not in str(e.value)
    assert not out.exists() and not list(tmp.glob(".import-*")), "nothing half-written"


def test_a_missing_fold_is_refused_in_one_line(results_folder, tmp_path):
    src = _copy(results_folder, tmp_path)
    (src / "fold_0" / "checkpoint_final.pth").unlink()
    _refused(
        src, tmp_path, r"no fold_\*/checkpoint_final.pth \(fold folders fold_0 hold no final checkpoint\)"
    )


def test_a_checkpoint_that_is_not_its_plans_network_is_refused(results_folder, tmp_path):
    src = _copy(results_folder, tmp_path)
    plans = json.loads((src / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [4, 8, 16]
    (src / "plans.json").write_text(json.dumps(plans))
    _refused(src, tmp_path, "the checkpoint does not match the network its plans describe")


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda p, d: d.update(labels={"background": 0, "tumour": [1, 2], "core": 2}), "region-based labels"),
        (
            lambda p, d: p["configurations"]["3d_fullres"].update(
                normalization_schemes=["RescaleTo01Normalization"]
            ),
            "normalisation RescaleTo01Normalization is not supported",
        ),
        (lambda p, d: d.update(channel_names={"0": "T1", "1": "T2"}), "takes 2 input channels"),
    ],
)
def test_what_the_node_cannot_run_is_refused_by_name(results_folder, tmp_path, edit, match):
    src = _copy(results_folder, tmp_path)
    plans = json.loads((src / "plans.json").read_text())
    dataset = json.loads((src / "dataset.json").read_text())
    edit(plans, dataset)
    (src / "plans.json").write_text(json.dumps(plans))
    (src / "dataset.json").write_text(json.dumps(dataset))
    _refused(src, tmp_path, match)


def test_the_manifest_holds_a_3d_model_to_its_terms(imported, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(imported[0], model_dir)
    raw = yaml.safe_load((model_dir / "model.yaml").read_text())
    for change, match in [
        (lambda m: m["input"]["volume"].update(axes="RRS"), "one of L/R, one of A/P and one of S/I"),
        (lambda m: m["input"]["intensity"].update(kind="windows"), "intensity windows is for 2D slices"),
        (lambda m: m.update(backbone={"graph": "x.onnx"}), "a patch3d model has no backbone"),
    ]:
        m = json.loads(json.dumps(raw))
        change(m)
        (model_dir / "model.yaml").write_text(yaml.safe_dump(m))
        with pytest.raises(ModelError, match=match):
            load_model(model_dir)


def test_cli_imports_and_runs_it(results_folder, tmp_path):
    from node.cli import main

    out = tmp_path / "model"
    assert main(["models", "import", str(results_folder), "--out", str(out)]) == 0
    phantom = Phantom.random(77, n_lesions=0)
    write_variant(phantom, tmp_path / "ct", "bottom_up", "CT", seed=1, **SERIES)
    assert main(["run", str(tmp_path / "ct"), "--model", str(out), "--out", str(tmp_path / "results")]) == 0
    (seg,) = list((tmp_path / "results").glob("*/seg.dcm"))
    assert set(read_segments(seg)) <= set(LABELS) and len(read_segments(seg)) >= 3


def test_the_benchmark_compares_like_with_like(results_folder, imported, tmp_path):
    """``bench --suite nnunet`` at a tiny size: both sides ran and agree (its figures are in BENCHMARKS.md)."""
    from node.cli import main

    out = tmp_path / "bench.json"
    args = ["bench", "--suite", "nnunet", "--model", str(imported[0]), "--nnunet", str(results_folder)]
    assert main([*args, "--slices", "40", "--size", "128", "--repeat", "1", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["node_seconds_median"] > 0 and report["nnunet_seconds_median"] > 0
    assert report["node_peak_rss_mb"] > 0 and report["nnunet_peak_rss_mb"] > 0
    assert set(report["dice_per_label"]) == set(LABELS)
    present = [d for d in report["dice_per_label"].values() if d is not None]
    assert len(present) >= 2 and min(present) >= 0.98, report["dice_per_label"]


def test_several_networks_become_one_model_each_with_its_own_statistics(results_folder, tmp_path):
    """TotalSegmentator's parts: one model folder, one head each, one SEG; a part whose foreground
    statistics differ keeps its own normalisation."""
    from node.model.importers.nnunet import import_nnunet

    part2 = _copy(results_folder, tmp_path)
    dataset = json.loads((part2 / "dataset.json").read_text())
    dataset["name"] = "Phantom part 2"
    (part2 / "dataset.json").write_text(json.dumps(dataset))
    plans = json.loads((part2 / "plans.json").read_text())
    plans["foreground_intensity_properties_per_channel"]["0"]["mean"] += 25.0
    (part2 / "plans.json").write_text(json.dumps(plans))
    out = import_nnunet([results_folder, part2], tmp_path / "both", "RAS", name="two-parts", warn=lambda m: None)
    model = load_model(out)
    first, second = model.heads
    assert (first.name, second.name) == ("phantom", "phantom_part_2")
    assert first.intensity is None and second.intensity.mean == model.input.intensity.mean + 25.0
    assert model.volume_of(second)[0] == model.input.volume
    write_variant(Phantom.random(5, n_lesions=0), tmp_path / "ct", "axial", "CT", seed=2, **SERIES)
    result = Pipeline(model, OnnxRuntime(model)).process(find_series([tmp_path / "ct"])[0][0], tmp_path / "r")
    assert result.ok, result.error
    labels = [s.label for s in result.findings.segments]
    assert len(labels) >= 6 and labels.count("liver") == 2  # one segment per network and label, one SEG
