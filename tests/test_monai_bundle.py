"""MONAI bundles by path, judged against MONAI itself.

A bundle in MONAI's exact format is made here (``node.tools.monai_phantom``: the spleen bundle's
inference.json around a small UNet, metadata.json, ``models/model.pt`` trained briefly on phantoms).
It is imported, the node runs it on a CT phantom series, and the SEG, read back by the independent
reader into patient space, is compared with what the bundle's own preprocessing, inferer and
postprocessing (MONAI's classes, built by its ConfigParser from inference.json) give for the same
DICOM series written to NIfTI by SimpleITK.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from node.errors import ModelError
from node.model.manifest import Patch3DSpec, Resampling, load_model
from node.synthetic.dicom import write_variant
from node.synthetic.phantom import Phantom
from tests.framework_compare import (
    LABELS,
    SERIES,
    assert_lands_where_the_framework_does,
)
from tests.seg_readback import read_segments

torch = pytest.importorskip("torch")
monai = pytest.importorskip("monai")
sitk = pytest.importorskip("SimpleITK")
nib = pytest.importorskip("nibabel")

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from node.tools.monai_phantom import write_bundle

    return write_bundle(tmp_path_factory.mktemp("monai") / "phantom_ct_seg")


@pytest.fixture(scope="module")
def imported(bundle, tmp_path_factory) -> tuple[Path, list[str]]:
    from node.model.importers.monai_bundle import import_monai_bundle

    warnings: list[str] = []
    out = tmp_path_factory.mktemp("models") / "phantom-monai"
    import_monai_bundle(bundle, out, warn=warnings.append)
    return out, warnings


def _monai_points(bundle: Path, series_dir: Path, tmp: Path) -> dict[str, np.ndarray]:
    """MONAI's own answer for a DICOM series: LPS points (mm) of every voxel of each label."""
    from monai.bundle import ConfigParser

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series_dir)))
    path = tmp / "image.nii.gz"
    sitk.WriteImage(reader.Execute(), str(path))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    parser["output_dir"] = str(tmp / "eval")
    net = parser.get_parsed_content("network")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    net.eval()
    data = parser.get_parsed_content("preprocessing")({"image": str(path)})
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], net)[0]
    seg = np.asarray(parser.get_parsed_content("postprocessing")(data)["pred"])[0]
    affine = nib.load(str(path)).affine  # voxel -> RAS mm, the grid SimpleITK read from the DICOM
    assert seg.shape == nib.load(str(path)).shape, "Invertd puts the labels back on the source grid"
    out = {}
    for index, name in enumerate(LABELS, start=1):
        ijk = np.argwhere(seg == index)
        ras = ijk @ affine[:3, :3].T + affine[:3, 3]
        out[name] = ras * [-1, -1, 1]  # RAS -> LPS
    return out


def test_import_states_what_the_bundle_does(bundle, imported):
    out, warnings = imported
    model = load_model(out)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    spacingd = config["preprocessing"]["transforms"][3]
    scale = config["preprocessing"]["transforms"][4]
    v = model.input.volume
    assert model.input.kind == "patch3d" and model.backbone is None and model.modalities == ("CT",)
    # MONAI's (x, y, z) become the node's (Z, Y, X)
    assert v.axes == "RAS" and list(v.spacing) == spacingd["pixdim"][::-1]
    assert list(v.patch) == config["inferer"]["roi_size"][::-1]
    assert v.step == 1 - config["inferer"]["overlap"] and v.gaussian and v.sigma_scale == 0.125
    assert (v.tiling, v.crop_nonzero, v.normalise_first, v.mirror_axes) == ("monai", False, False, ())
    assert v.resampling.grid == "monai" and v.resampling.data_order == 1
    # Activationsd(softmax) before Invertd: the probabilities are interpolated back
    assert (v.resampling.interpolate, v.resampling.logits_order) == ("probabilities", 1)
    i = model.input.intensity
    assert i.kind == "range" and (i.scale.a_min, i.scale.a_max, i.scale.clip) == (
        scale["a_min"],
        scale["a_max"],
        True,
    )
    (head,) = model.heads
    labels = {lab.name: lab for lab in head.labels}
    assert list(labels) == list(LABELS) and [lab.index for lab in head.labels] == [1, 2, 3, 4]
    assert (labels["spleen"].type.value, labels["spleen"].type.scheme) == ("78961009", "SCT")
    assert labels["lung"].type.scheme == "99PACSNODE" and any("'lung'" in w for w in warnings)
    provenance = json.loads((out / "import.json").read_text())
    assert provenance["format"] == "monai-bundle" and "models/model.pt" in provenance["files"]


@pytest.mark.parametrize("variant", ["axial", "sagittal"])
def test_node_segments_where_monai_does(bundle, imported, tmp_path, variant):
    """Dice >= 0.98 per label in patient space, against the bundle's own transforms and inferer; the
    sagittal storage of the same voxels must land where MONAI's answer for the axial series is."""
    assert_lands_where_the_framework_does(
        imported[0], lambda axial: _monai_points(bundle, axial, tmp_path), tmp_path, variant
    )


@pytest.mark.parametrize(
    "size,roi,overlap",
    [((40, 23, 61), (16, 16, 24), 0.25), ((33, 10, 20), (16, 16, 16), 0.5), ((30, 17, 9), (30, 8, 9), 0.6)],
)
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_sliding_window_is_monais(size, roi, overlap, mode):
    """Tile positions, importance map, padding of a volume smaller than the ROI, blending: the node's
    port against ``sliding_window_inference`` with the same (linear, per-voxel) network."""
    from monai.data.utils import compute_importance_map, dense_patch_slices
    from monai.inferers import sliding_window_inference
    from monai.inferers.utils import _get_scan_interval

    from node.model.sliding_window import importance_map_monai, sliding_window, tile_starts_monai

    padded = tuple(max(n, p) for n, p in zip(size, roi, strict=True))
    interval = _get_scan_interval(padded, roi, 3, (overlap,) * 3)
    theirs = {tuple(s.start for s in w) for w in dense_patch_slices(padded, roi, interval)}
    starts = tile_starts_monai(padded, roi, 1 - overlap)
    assert {(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]} == theirs
    sigma = 0.2 if mode == "gaussian" else 0.125
    ref = compute_importance_map(roi, mode="gaussian", sigma_scale=sigma).numpy()
    assert np.allclose(importance_map_monai(roi, sigma), ref, rtol=1e-6, atol=0)  # but for exp()'s last bit

    x = np.random.default_rng(0).normal(size=(1, *size)).astype(np.float32)
    # a network whose answer depends on where the tile lies (a ramp), so misplaced tiles show
    ramp = np.linspace(-1, 1, int(np.prod(roi)), dtype=np.float32).reshape(roi)

    def net(tile: np.ndarray) -> np.ndarray:
        return np.concatenate([tile, 2 * tile + ramp, tile * ramp], axis=1)

    spec = Patch3DSpec(
        axes="RAS", spacing=(1, 1, 1), patch=roi, step=1 - overlap, gaussian=mode == "gaussian",
        tiling="monai", sigma_scale=sigma,
    )  # fmt: skip
    ours, tiles = sliding_window(x, spec, net)
    expected = sliding_window_inference(
        torch.from_numpy(x[None]),
        roi,
        2,
        lambda t: torch.from_numpy(net(t.numpy())),
        overlap=overlap,
        mode=mode,
        sigma_scale=sigma,
    )[0].numpy()
    assert tiles == len(theirs) and ours.shape == expected.shape
    assert np.allclose(ours.astype(np.float32), expected, atol=2e-2, rtol=2e-3)  # float16 sums


def test_spacing_and_its_inverse_are_monais():
    """``Spacingd``'s grid and linear interpolation, and ``Invertd``'s way back of the softmax
    probabilities then the arg-max, against MONAI's transforms on the same array."""
    from monai.data import MetaTensor
    from monai.transforms import Spacing, SpatialResample
    from scipy import ndimage

    from node.model.sliding_window import logits_to_labels, monai_shape, resample_monai

    rng = np.random.default_rng(2)
    xyz, old, new = (23, 31, 17), (0.8, 1.3, 2.5), (1.5, 1.5, 2.0)
    image = rng.normal(size=xyz).astype(np.float32)
    affine = np.diag([*old, 1.0])
    spaced = Spacing(pixdim=new, mode="bilinear")(MetaTensor(torch.from_numpy(image[None]), affine=affine))
    # the node's arrays are MONAI's transposed: (Z, Y, X)
    zyx = image.T
    ours = resample_monai(zyx[None], monai_shape(zyx.shape, old[::-1], new[::-1]), old[::-1], new[::-1], 1)[0]
    assert ours.shape == spaced.shape[1:][::-1]
    assert np.allclose(ours, spaced.numpy()[0].T, atol=1e-5)

    k = 6
    logits = np.stack(
        [ndimage.gaussian_filter(rng.normal(size=spaced.shape[1:]), 1.5) * 30 for _ in range(k)]
    )
    probs = torch.softmax(torch.from_numpy(logits).float(), 0)
    back = SpatialResample(mode="bilinear")(
        MetaTensor(probs, affine=spaced.affine), dst_affine=torch.from_numpy(affine), spatial_size=xyz
    )
    ref = back.numpy().argmax(0).T
    r = Resampling(grid="monai", data_order=1, logits_order=1, interpolate="probabilities")
    labels, _ = logits_to_labels(
        logits.transpose(0, 3, 2, 1).astype(np.float16), xyz[::-1], new[::-1], old[::-1], r
    )
    assert len(np.unique(ref)) == k
    assert np.mean(labels == ref) > 0.999  # equal but for float16 logits at ties


@pytest.mark.parametrize(
    "spec,transform",
    [
        (
            dict(kind="range", scale=dict(a_min=-57, a_max=164, b_min=0, b_max=1, clip=True)),
            lambda: monai.transforms.ScaleIntensityRange(a_min=-57, a_max=164, b_min=0, b_max=1, clip=True),
        ),
        (
            dict(kind="range", scale=dict(a_min=-1000, a_max=1000, b_min=-1, b_max=1)),
            lambda: monai.transforms.ScaleIntensityRange(a_min=-1000, a_max=1000, b_min=-1, b_max=1),
        ),
        (dict(kind="volume_zscore"), lambda: monai.transforms.NormalizeIntensity()),
        (dict(kind="volume_zscore", nonzero=True), lambda: monai.transforms.NormalizeIntensity(nonzero=True)),
    ],
)
def test_intensity_is_monais(spec, transform):
    from node.model.manifest import IntensitySpec
    from node.model.sliding_window import normalise_volume

    image = np.random.default_rng(3).normal(0, 300, size=(12, 20, 16)).astype(np.float32)
    image[:3] = 0  # air outside the body, for nonzero
    ours = normalise_volume(image.copy(), IntensitySpec(**spec))
    theirs = np.asarray(transform()(torch.from_numpy(image[None].copy())))[0]
    assert np.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def _copy(src: Path, tmp: Path) -> Path:
    dst = tmp / "copy" / src.name
    shutil.copytree(src, dst)
    return dst


def _refused(src: Path, tmp: Path, match: str) -> None:
    from node.model.importers.monai_bundle import import_monai_bundle

    out = tmp / "out"
    with pytest.raises(ModelError, match=match) as e:
        import_monai_bundle(src, out, warn=lambda m: None)
    assert "\n" not in str(e.value) and str(src) in str(e.value)
    assert not out.exists() and not list(tmp.glob(".import-*")), "nothing half-written"


def _insert(config: dict, where: str, index: int, transform: dict) -> None:
    config[where]["transforms"].insert(index, transform)


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda c, m: _insert(c, "preprocessing", 4, {"_target_": "CropForegroundd", "keys": "image"}),
            "preprocessing transform CropForegroundd is not supported",
        ),
        (
            lambda c, m: _insert(c, "preprocessing", 5, {"_target_": "RandGaussianNoised", "keys": "image"}),
            "preprocessing transform RandGaussianNoised is not supported; the node does not skip it",
        ),
        (
            lambda c, m: _insert(
                c, "postprocessing", 3, {"_target_": "KeepLargestConnectedComponentd", "keys": "pred"}
            ),
            "postprocessing transform KeepLargestConnectedComponentd is not supported",
        ),
        (
            lambda c, m: c["preprocessing"]["transforms"][3].update(mode="bicubic"),
            r"transform Spacingd is not supported \(mode bicubic\)",
        ),
        (lambda c, m: c["preprocessing"]["transforms"].pop(2), "preprocessing has no Orientationd"),
        (
            lambda c, m: c["inferer"].update(_target_="SimpleInferer"),
            "inferer SimpleInferer is not supported",
        ),
        (
            lambda c, m: m["network_data_format"]["inputs"]["image"].update(num_channels=2),
            "takes 2 input channels",
        ),
        (
            lambda c, m: m["network_data_format"]["outputs"]["pred"]["channel_def"].pop("4"),
            r"the network gives \(1, 5, 48, 48, 32\) for a \[48, 48, 32\] patch; metadata.json names 4 channels",
        ),
    ],
)
def test_what_the_node_cannot_run_is_refused_by_name(bundle, tmp_path, edit, match):
    src = _copy(bundle, tmp_path)
    config = json.loads((src / "configs" / "inference.json").read_text())
    meta = json.loads((src / "configs" / "metadata.json").read_text())
    edit(config, meta)
    (src / "configs" / "inference.json").write_text(json.dumps(config))
    (src / "configs" / "metadata.json").write_text(json.dumps(meta))
    _refused(src, tmp_path, match)


def _post(config: dict, names: list[str]) -> None:
    """The postprocessing transforms of these names, in this order (Invertd with nearest_interp)."""
    by_name = {t["_target_"]: t for t in config["postprocessing"]["transforms"]}
    by_name["Invertd"]["nearest_interp"] = True
    config["postprocessing"]["transforms"] = [by_name[n] for n in names]


@pytest.mark.parametrize(
    "order,expected",
    [
        (["Activationsd", "Invertd", "AsDiscreted", "SaveImaged"], ("probabilities", 0)),  # nearest_interp
        (["Invertd", "AsDiscreted"], ("logits", 0)),
        (["Activationsd", "AsDiscreted", "Invertd"], ("logits", 0)),  # labels, nearest
        (["Activationsd", "AsDiscreted", "SaveImaged"], ("logits", 0)),  # no Invertd: MONAI's grid, nearest
    ],
)
def test_the_way_back_follows_the_postprocessing(bundle, tmp_path, order, expected):
    from node.model.importers.monai_bundle import read_bundle

    src = _copy(bundle, tmp_path)
    config = json.loads((src / "configs" / "inference.json").read_text())
    _post(config, order)
    (src / "configs" / "inference.json").write_text(json.dumps(config))
    r = read_bundle(src).input["volume"]["resampling"]
    assert (r["interpolate"], r["logits_order"]) == expected


def test_a_bundle_without_weights_or_with_others_is_refused(bundle, tmp_path):
    src = _copy(bundle, tmp_path)
    config = json.loads((src / "configs" / "inference.json").read_text())
    config["network_def"]["channels"] = [4, 8, 16]
    (src / "configs" / "inference.json").write_text(json.dumps(config))
    _refused(src, tmp_path, "model.pt does not match network_def")
    (src / "models" / "model.pt").unlink()
    _refused(src, tmp_path, r"no weights \(models/model.pt or models/model.ts\)")


def test_the_torchscript_variant_is_the_same_network(bundle, imported, tmp_path):
    import onnxruntime as ort

    from node.model.importers.monai_bundle import import_monai_bundle

    src = _copy(bundle, tmp_path)
    net = torch.jit.load(str(_scripted(src)))
    assert net is not None and not (src / "models" / "model.pt").exists()
    out = import_monai_bundle(src, tmp_path / "ts", warn=lambda m: None)
    x = np.random.default_rng(0).normal(size=(2, 1, *load_model(out).input.volume.patch)).astype(np.float32)
    runs = [
        ort.InferenceSession(str(d / f"{load_model(d).heads[0].name}.onnx")).run(None, {"image": x})[0]
        for d in (imported[0], out)
    ]
    assert runs[0].shape == (2, 5, *x.shape[2:])  # a batch of two: the batch axis is dynamic
    assert np.allclose(runs[0], runs[1], atol=1e-4)


def _scripted(src: Path) -> Path:
    """models/model.pt -> models/model.ts, as MONAI's ckpt_export writes it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(src / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(src / "models" / "model.pt", weights_only=True))
    ts = src / "models" / "model.ts"
    torch.jit.save(torch.jit.script(net.eval()), str(ts))
    (src / "models" / "model.pt").unlink()
    return ts


def test_cli_detects_the_bundle_and_runs_it(bundle, tmp_path):
    from node.cli import main

    out = tmp_path / "model"
    assert main(["models", "import", str(bundle), "--out", str(out)]) == 0
    assert json.loads((out / "import.json").read_text())["format"] == "monai-bundle"
    assert (
        main(["models", "import", str(bundle), "--format", "monai-bundle", "--out", str(tmp_path / "m2")])
        == 0
    )
    write_variant(Phantom.random(77, n_lesions=0), tmp_path / "ct", "bottom_up", "CT", seed=1, **SERIES)
    assert main(["run", str(tmp_path / "ct"), "--model", str(out), "--out", str(tmp_path / "results")]) == 0
    (seg,) = list((tmp_path / "results").glob("*/seg.dcm"))
    assert set(read_segments(seg)) <= set(LABELS) and len(read_segments(seg)) >= 3
