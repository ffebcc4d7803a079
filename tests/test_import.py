"""Importing a Curia-format model (Hugging Face DINOv2) and judging it against transformers itself.

The checkpoint is made here, in the exact format and configuration Raidium publishes (random
weights: nothing can be downloaded): ``Dinov2Model`` with hidden size 768, 12 layers, 12 heads,
patch 16, image 512, one channel, saved by ``save_pretrained``; classification heads as
``Dinov2ForImageClassification`` folders (``config.json`` with ``id2label``, classifier weights in
``model.safetensors``) and as Curia's trainer writes them (``head.pt``).

The reference is written out here from the published description, not from node's code: axial
slices (rows P, columns L, from highdicom's volume of the series), raw HU or MR values, resized to
512 x 512 with PyTorch's antialiased bicubic, CT clipped below -1000, a z-score per slice (eps
1e-6), ``Dinov2Model``, the CLS token (with the mean patch token for a 2 x 768 classifier),
mean-pooled over the series' slices, the linear classifier, softmax.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import yaml
from pydicom import dcmread

from node.synthetic.dicom import write_axial_series, write_variant
from node.synthetic.phantom import Phantom

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

CURIA = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    patch_size=16,
    image_size=512,
    num_channels=1,
)
TUMOR = {0: "normal", 1: "nodule", 2: "mass"}
PRESENCE = {0: "absent", 1: "present"}
CODES = {
    "labels": {
        "nodule": {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"},
        "mass": {"value": "4147007", "scheme": "SCT", "meaning": "Mass"},
        "absent": {"value": "2667000", "scheme": "SCT", "meaning": "Absent", "negative": True},
        "present": {"value": "52101004", "scheme": "SCT", "meaning": "Present"},
    },
    "findings": {"presence": {"value": "52988006", "scheme": "SCT", "meaning": "Lesion"}},
}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=900
    )


def save_backbone(folder: Path, seed: int = 0, **overrides) -> transformers.Dinov2Model:
    torch.manual_seed(seed)
    model = transformers.Dinov2Model(transformers.Dinov2Config(**{**CURIA, **overrides})).eval()
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "CuriaImageProcessor", "clip_below_air": True})
    )
    return model


def save_head(
    folder: Path, id2label: dict, width: int, as_head_pt: bool = False, seed: int = 1, backbone: dict = CURIA
) -> dict:
    """A classifier of ``width`` inputs; weights scaled so that the classes' probabilities differ."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(len(id2label), width, generator=g) * 0.08
    b = torch.randn(len(id2label), generator=g) * 0.1
    cfg = transformers.Dinov2Config(**backbone, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    cfg.to_json_file(folder / "config.json")
    if as_head_pt:
        torch.save({"classifier": {"weight": w, "bias": b}, "attention": None}, folder / "head.pt")
    else:
        save_file({"classifier.weight": w, "classifier.bias": b}, str(folder / "model.safetensors"))
    return {"weight": w, "bias": b}


def import_checkpoint(root: Path, **overrides) -> dict:
    """A checkpoint of Curia's format (``CURIA`` with ``overrides``) with two heads, one reading the CLS
    token and the mean patch token (model.safetensors), one the CLS token (Curia's head.pt), imported
    by the CLI with codes for all labels but one."""
    config = {**CURIA, **overrides}
    hidden = config["hidden_size"]
    backbone = save_backbone(root / "curia", **overrides)
    heads = {
        "tumor": save_head(root / "heads" / "tumor", TUMOR, 2 * hidden, backbone=config),
        "presence": save_head(root / "heads" / "presence", PRESENCE, hidden, as_head_pt=True, backbone=config),
    }
    (root / "codes.yaml").write_text(yaml.safe_dump(CODES))
    out = root / "imported"
    r = cli(
        "models", "import", str(root / "curia"), "--out", str(out),
        "--head", str(root / "heads" / "tumor"), "--head", str(root / "heads" / "presence"),
        "--codes", str(root / "codes.yaml"), "--name", "curia-test",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "label 'normal' has no code" in r.stderr  # the one label without a code is said, locally coded
    return {"root": root, "model": out, "backbone": backbone, "heads": heads}


@pytest.fixture(scope="module")
def curia(tmp_path_factory):
    return import_checkpoint(tmp_path_factory.mktemp("curia"))


def reference(curia, files: list[Path], modality: str) -> dict[str, np.ndarray]:
    """Class probabilities of every head, by transformers, from the published preprocessing."""
    vol = hd.get_volume_from_series([dcmread(f) for f in files], dtype=np.float32)
    axial = vol.to_patient_orientation("FPL").array  # slices head->feet, rows towards P, columns towards L
    x = torch.from_numpy(np.ascontiguousarray(axial, np.float32))[:, None]
    x = torch.nn.functional.interpolate(x, size=(512, 512), mode="bicubic", antialias=True, align_corners=False)
    if modality == "CT":
        x = x.clamp(min=-1000.0)
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True, unbiased=False)
    x = (x - mean) / (std + 1e-6)
    with torch.no_grad():
        h = torch.cat([curia["backbone"](pixel_values=b).last_hidden_state for b in x.split(4)])
    cls, meanpatch = h[:, 0], h[:, 1:].mean(dim=1)
    out = {}
    for name, weights in curia["heads"].items():
        feature = torch.cat([cls, meanpatch], dim=1) if weights["weight"].shape[1] == 2 * cls.shape[1] else cls
        logits = feature.double().mean(dim=0, keepdim=True) @ weights["weight"].double().T + weights["bias"].double()
        out[name] = torch.softmax(logits, dim=1)[0].numpy()
    return out


def sr_probabilities(sr_path: Path) -> dict[str, dict[str, float]]:
    """Per classification group (its tracking identifier): each class's NUM, by its code meaning."""
    groups: dict[str, dict[str, float]] = {}

    def walk(items, group=None):
        for it in items:
            meaning = it.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in it else ""
            if it.ValueType == "CONTAINER" and meaning == "Measurement Group":
                gid = next(
                    c.TextValue for c in it.ContentSequence if c.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"
                )
                groups[gid] = {}
                walk(it.ContentSequence, gid)
            elif it.ValueType == "NUM" and group is not None:
                groups[group][meaning] = float(it.MeasuredValueSequence[0].NumericValue)
            elif "ContentSequence" in it:
                walk(it.ContentSequence, group)

    walk(dcmread(sr_path).ContentSequence)
    return groups


SERIES = {
    "CT": lambda root: write_axial_series(
        Phantom.random(21, n_lesions=2), root / "ct", modality="CT", shape=(6, 96, 96), pixel_spacing=4.0,
        slice_spacing=20.0, seed=21,
    ),
    "MR": lambda root: write_axial_series(
        Phantom.random(22, n_lesions=1), root / "mr", modality="MR", shape=(5, 80, 96), pixel_spacing=4.5,
        slice_spacing=25.0, seed=22,
    ),
    # stored as sagittal slices: the model's axial slices are taken from the volume
    "sagittal CT": lambda root: write_variant(
        Phantom.random(23, n_lesions=1), root / "sag", "sagittal", modality="CT", shape=(5, 64, 80), seed=23
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SERIES))
def test_imported_heads_give_what_transformers_gives(curia, case, tmp_path):
    written = SERIES[case](tmp_path)
    out = tmp_path / "out"
    r = cli("run", str(written.files[0].parent), "--model", str(curia["model"]), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    folder = out / written.series_uid
    assert sorted(p.name for p in folder.glob("*.dcm")) == ["sr.dcm"]  # classification heads: an SR only
    got = sr_probabilities(folder / "sr.dcm")
    modality = "CT" if "CT" in case else "MR"
    want = reference(curia, written.files, modality)
    tumor = got["Classification tumor"]
    assert list(tumor) == ["normal", "Nodule", "Mass"]
    np.testing.assert_allclose(list(tumor.values()), want["tumor"], atol=0.01)
    presence = got["Classification presence"]
    np.testing.assert_allclose([presence["Absent"], presence["Present"]], want["presence"], atol=0.01)
    # the classes differ enough that a wrong feature or pooling would show beyond the tolerance
    assert np.ptp(want["tumor"]) > 0.05


def test_backbone_features_match_transformers(curia):
    """ONNX Runtime's CLS and patch tokens against transformers' on the same preprocessed slices."""
    import onnxruntime as ort

    from node.model.preprocess import normalise
    from node.model.resize import resize_bicubic_aa

    rng = np.random.default_rng(5)
    hu = rng.normal(-200, 400, (2, 150, 130)).astype(np.float32)
    x = normalise(resize_bicubic_aa(hu, (512, 512)), "MR", yaml_intensity(curia))
    sess = ort.InferenceSession(str(curia["model"] / "backbone.onnx"), providers=["CPUExecutionProvider"])
    tokens, cls = sess.run(["tokens", "cls"], {"image": x})
    with torch.no_grad():
        h = curia["backbone"](pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert tokens.shape == (2, 1024, 768) and cls.shape == (2, 768)
    # stated tolerance: fp32 through 12 layers, two implementations of the same arithmetic
    np.testing.assert_allclose(cls, h[:, 0], atol=2e-3)
    np.testing.assert_allclose(tokens, h[:, 1:], atol=2e-3)


def yaml_intensity(curia):
    from node.model.manifest import load_model

    return load_model(curia["model"]).input.intensity


@pytest.mark.parametrize("shape", [(300, 260), (96, 96), (512, 400), (77, 300)])
def test_preprocessing_matches_pytorch_resize_and_zscore(shape):
    from node.model.manifest import IntensitySpec
    from node.model.preprocess import normalise
    from node.model.resize import resize_bicubic_aa

    rng = np.random.default_rng(sum(shape))
    hu = rng.normal(-300, 500, (3, *shape)).astype(np.float32)
    spec = IntensitySpec(kind="zscore", clip_below=-1000.0)
    ours = normalise(resize_bicubic_aa(hu, (512, 512)), "CT", spec)[:, 0]
    x = torch.nn.functional.interpolate(
        torch.from_numpy(hu)[:, None], size=(512, 512), mode="bicubic", antialias=True, align_corners=False
    ).clamp(min=-1000.0)
    x = (x - x.mean(dim=(2, 3), keepdim=True)) / (x.std(dim=(2, 3), keepdim=True, unbiased=False) + 1e-6)
    np.testing.assert_allclose(ours, x[:, 0].numpy(), atol=1e-4)


# --- bad models: one clear line, nothing half-imported ----------------------------------------------
SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32)


def _refused(tmp_path: Path, src: Path, *heads: Path, match: str) -> None:
    out = tmp_path / "out"
    args = ["models", "import", str(src), "--out", str(out)]
    for h in heads:
        args += ["--head", str(h)]
    r = cli(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".import-*"))


def test_not_a_dinov2_folder(tmp_path):
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    (src / "model.safetensors").write_bytes(b"")
    _refused(tmp_path, src, match="not a DINOv2/ViT model (config.json model_type 'bert')")


def test_a_format_we_cannot_import_is_named(tmp_path):
    src = tmp_path / "bundle"
    (src / "configs").mkdir(parents=True)
    (src / "configs" / "metadata.json").write_text("{}")  # half a MONAI bundle: no inference.json
    _refused(tmp_path, src, match="cannot tell its format: neither a Hugging Face model (config.json)")
    _refused(tmp_path, src, match="nor a MONAI bundle (configs/metadata.json, configs/inference.json)")


def test_an_nnunet_folder_without_weights_is_named(tmp_path):
    src = tmp_path / "nnunet"
    src.mkdir()
    (src / "dataset.json").write_text("{}")
    (src / "plans.json").write_text("{}")
    _refused(tmp_path, src, match="no fold_*/checkpoint_final.pth")


def test_missing_weights(tmp_path):
    save_backbone(tmp_path / "m", **SMALL)
    (tmp_path / "m" / "model.safetensors").unlink()
    _refused(tmp_path, tmp_path / "m", match="no model.safetensors")


def test_three_channel_backbone_cannot_be_fed(tmp_path):
    save_backbone(tmp_path / "m", **{**SMALL, "num_channels": 3})
    _refused(tmp_path, tmp_path / "m", match="takes 3 input channels; the manifest feeds 1")


def test_head_width_must_match_the_backbone(tmp_path):
    save_backbone(tmp_path / "m", **SMALL)
    save_head(tmp_path / "h", TUMOR, 50)
    _refused(tmp_path, tmp_path / "m", tmp_path / "h", match="reads 50 features; the backbone gives 32")


def test_attention_pooled_head_is_refused(tmp_path):
    save_backbone(tmp_path / "m", **SMALL)
    (tmp_path / "h").mkdir()
    transformers.Dinov2Config(**SMALL, id2label=TUMOR).to_json_file(tmp_path / "h" / "config.json")
    torch.save(
        {"classifier": {"weight": torch.zeros(3, 32), "bias": torch.zeros(3)}, "attention": {"q": torch.zeros(4)}},
        tmp_path / "h" / "head.pt",
    )
    _refused(tmp_path, tmp_path / "m", tmp_path / "h", match="attention-pooled head")


LESION = {"index": 1, "name": "Lesion", "category": {"value": "49755003", "meaning": "Morphologically Abnormal Structure"},
          "type": {"value": "52988006", "meaning": "Lesion"}}  # fmt: skip


def _own_segmentation_head(folder: Path, hidden: int) -> None:
    from node.model.importers.heads import SEGMENTATION, segmentation_decoder, write_own_head

    write_own_head(folder, segmentation_decoder(hidden, 16, 2), {"pacs_node_head": SEGMENTATION, "hidden_size": hidden, "labels": [LESION]})


def _own_ensemble_head(folder: Path, weights: list[float]):
    from node.model.importers.heads import SEGMENTATION, decoder_ensemble, write_own_head

    torch.manual_seed(3)
    ensemble = decoder_ensemble(32, 16, 2, (0.7, 0.3)).eval()
    config = {"pacs_node_head": SEGMENTATION, "hidden_size": 32, "labels": [LESION], "ensemble": weights}
    write_own_head(folder, ensemble, config)
    return ensemble


def test_own_ensemble_head_gives_the_weighted_mean_of_its_decoders(tmp_path):
    import onnxruntime as ort

    save_backbone(tmp_path / "m", **SMALL)
    ensemble = _own_ensemble_head(tmp_path / "h", [0.7, 0.3])
    assert cli("models", "import", str(tmp_path / "m"), "--out", str(tmp_path / "out"), "--head", str(tmp_path / "h")).returncode == 0
    tokens, image = torch.randn(3, 4, 32), torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        a, b = (m(tokens, image).numpy() for m in ensemble.members)
    session = ort.InferenceSession(str(tmp_path / "out" / "head_h.onnx"), providers=["CPUExecutionProvider"])
    (ours,) = session.run(None, {"tokens": tokens.numpy(), "image": image.numpy()})
    assert np.abs(a - b).max() > 0.01  # two different decoders, so the weights matter
    np.testing.assert_allclose(ours, 0.7 * a + 0.3 * b, atol=1e-5)


def test_own_ensemble_head_whose_weights_do_not_sum_to_one_is_refused(tmp_path):
    save_backbone(tmp_path / "m", **SMALL)
    _own_ensemble_head(tmp_path / "h", [0.7, 0.7])
    _refused(tmp_path, tmp_path / "m", tmp_path / "h", match="ensemble [0.7, 0.7] is not two or more positive weights summing to 1")


def test_own_head_of_another_width_is_refused(tmp_path):
    save_backbone(tmp_path / "m", **SMALL)
    _own_segmentation_head(tmp_path / "h", 48)
    _refused(tmp_path, tmp_path / "m", tmp_path / "h", match="reads tokens of width 48; the backbone gives 32")


def test_own_head_whose_weights_are_not_its_architecture_is_refused(tmp_path):
    save_backbone(tmp_path / "m", **SMALL)
    _own_segmentation_head(tmp_path / "h", 32)
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    (tmp_path / "h" / "config.json").write_text(json.dumps({**config, "widths": [4, 8, 16]}))
    _refused(tmp_path, tmp_path / "m", tmp_path / "h", match="not the weights of a segmentation_decoder head")


def test_a_head_folder_is_not_a_backbone(tmp_path):
    save_backbone(tmp_path / "m", **SMALL)
    save_head(tmp_path / "h", TUMOR, 64)
    (tmp_path / "h" / "config.json").write_text(
        json.dumps({**transformers.Dinov2Config(**SMALL).to_dict(), "num_channels": 1, "model_type": "dinov2"})
    )
    _refused(tmp_path, tmp_path / "h", match="lacks")


def test_torch_backend_runs_the_imported_model(tmp_path):
    """The importer writes each graph's torch.export twin: the PyTorch backend (the GPU path) gives
    what ONNX Runtime gives. A small backbone of Curia's format (the backends are under test here, not
    the size: the full one's figures are in the tests above), both kinds of head."""
    from node.ingest.series import find_series
    from node.ingest.volume import load_volume
    from node.model.inference import predict
    from node.model.manifest import load_model
    from node.model.select import select_runtime
    from node.timing import Stopwatch

    model = load_model(import_checkpoint(tmp_path, **{**SMALL, "image_size": 64})["model"])
    written = SERIES["CT"](tmp_path)
    (series,), _ = find_series([written.files[0].parent])
    volume = load_volume(series)
    ort_rt, _ = select_runtime(model, "onnxruntime")
    torch_rt, why = select_runtime(model, "torch")
    assert torch_rt.name.startswith("torch") and why == "requested"
    a, b = predict(volume, model, ort_rt, Stopwatch()), predict(volume, model, torch_rt, Stopwatch())
    for head in ("tumor", "presence"):
        assert np.ptp(a.probabilities[head]) > 0.01  # classes that differ: a comparison that can fail
        np.testing.assert_allclose(b.probabilities[head], a.probabilities[head], atol=1e-3)


def test_curia_format_benchmark_checkpoint_is_made_and_imported_by_one_command(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "node.tools.curia_checkpoint", "--out", str(tmp_path), "--layers", "1", "--size", "64"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "hidden_size", "num_attention_heads", "patch_size", "num_channels")} == {
        "model_type": "dinov2", "hidden_size": 768, "num_attention_heads": 12, "patch_size": 16, "num_channels": 1
    }  # fmt: skip
    from node.model.manifest import load_model

    model = load_model(tmp_path / "model")
    assert model.input.geometry == "resize" and [h.reads for h in model.heads] == ["cls_meanpatch"]


def test_gpu_measurement_script_runs_dry_on_the_cpu(tmp_path):
    """The script a lent GPU runs (node.tools.gpu_bench) is known to work before one is lent."""
    r = subprocess.run(
        [sys.executable, "-m", "node.tools.gpu_bench", "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    parts = json.loads((tmp_path / "gpu-bench.json").read_text())["parts"]
    assert set(parts) == {"machine", "matmul_peak", "curia_backbone", "node_runtime_and_pipeline", "sliding_window_3d"}
    assert not [k for k, v in parts.items() if "error" in v]
    assert parts["matmul_peak"]["tflops"] > 0
    assert {(row["mode"], row["batch"]) for row in parts["curia_backbone"]["rows"]} == {("eager", 2), ("eager", 4)}
    run = parts["node_runtime_and_pipeline"]
    assert run["pipeline_runtime"].startswith("torch") and run["pipeline_stages_s"]["inference"] > 0
    assert parts["sliding_window_3d"]["tiles"] > 0 and parts["sliding_window_3d"]["stages_s"]["inference"] > 0
    assert (tmp_path / "gpu-bench.log").stat().st_size > 0


@pytest.mark.parametrize("plane, axis", [("axial", 0), ("coronal", 1), ("sagittal", 2)])
def test_slices_are_taken_in_the_models_plane(tmp_path, plane, axis):
    """orientation: the model's slices are the patient volume's axial, coronal or sagittal planes
    (rows I and columns L or P for the last two), whatever plane the series was acquired in."""
    from node.ingest.series import find_series
    from node.ingest.volume import load_volume
    from node.model.importers.huggingface import import_huggingface
    from node.model.inference import predict
    from node.model.manifest import load_model
    from node.model.preprocess import to_canonical
    from node.model.select import select_runtime
    from node.timing import Stopwatch

    save_backbone(tmp_path / "m", **SMALL)
    save_head(tmp_path / "heads" / "kind", TUMOR, 32)
    folder = import_huggingface(tmp_path / "m", tmp_path / "model", [tmp_path / "heads" / "kind"], warn=lambda m: None)
    manifest = yaml.safe_load((folder / "model.yaml").read_text())
    manifest["input"]["orientation"] = plane
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest))
    model = load_model(folder)
    written = write_axial_series(Phantom.random(5), tmp_path / "ct", shape=(6, 40, 48), pixel_spacing=8.0, seed=5)
    (series,), _ = find_series([written.files[0].parent])
    volume = load_volume(series)
    seen = []
    pred = predict(volume, model, select_runtime(model, "onnxruntime")[0], Stopwatch(), seen.append)
    assert sum(seen) == to_canonical(volume.volume).shape[axis]  # one model slice per plane of the volume
    probs = pred.probabilities["kind"]
    assert probs.shape == (3,) and abs(probs.sum() - 1) < 1e-5
