"""The model repository, the runtime interface and the committed reference model's quality."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from node.errors import ModelError
from node.model.manifest import MODELS_DIR, load_model
from node.model.runtimes.onnxruntime import OnnxRuntime
from node.model.select import select_runtime
from node.synthetic.dicom import write_axial_series
from node.synthetic.phantom import Phantom
from node.tools.evaluate import evaluate_model

CARD = MODELS_DIR / "phantom-fm" / "quality.json"


def test_committed_model_reaches_the_quality_in_its_card():
    """Fresh held-out phantoms (seeds never used in training or in the card) through the product's inference."""
    card = json.loads(CARD.read_text())
    report = evaluate_model(load_model("phantom-fm"), cases=6, seed=90_000)
    for structure, minimum in card["minimum"]["dice"].items():
        assert report.dice[structure] >= minimum, f"{structure}: Dice {report.dice[structure]} < {minimum}"
    for figure, minimum in card["minimum"].items():
        if figure != "dice":
            assert getattr(report, figure) >= minimum, f"{figure}: {getattr(report, figure)} < {minimum}"
    for figure, maximum in card["maximum"].items():
        assert getattr(report, figure) <= maximum, f"{figure}: {getattr(report, figure)} > {maximum}"


def test_backbone_runs_once_per_batch_for_all_heads():
    model = load_model("phantom-fm")
    rt = OnnxRuntime(model)
    calls = []
    real = rt.backbone

    class Counting:
        def __getattr__(self, name):
            return getattr(real, name)

        def run(self, *a, **kw):
            calls.append(1)
            return real.run(*a, **kw)

    rt.backbone = Counting()
    out = rt.infer(np.zeros((3, 1, model.input.size, model.input.size), np.float32))
    assert len(calls) == 1
    assert set(out.heads) == {"organs", "lesions"}
    assert out.heads["organs"].shape == (3, 6, model.input.size, model.input.size)
    assert np.allclose(out.heads["organs"].sum(axis=1), 1.0, atol=1e-4)  # probabilities
    assert out.features["tokens"].shape[:2] == (3, (model.input.size // 8) ** 2)


def test_runtime_selection():
    from node.model.runtimes import tensorrt

    model = load_model("phantom-fm")
    rt, why = select_runtime(model, "auto")
    assert "auto" in why and rt.selection.picked == rt.name
    with pytest.raises(ModelError, match="unknown runtime"):
        select_runtime(model, "tpu")
    if tensorrt.unavailable() is None:
        pytest.skip("TensorRT is usable here: requesting it does not fail")
    with pytest.raises(ModelError, match="tensorrt is not available here"):
        select_runtime(model, "tensorrt")


@pytest.fixture
def model_copy(tmp_path) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(MODELS_DIR / "phantom-fm", dst)
    return dst


def test_manifest_error_names_the_key(model_copy):
    text = (model_copy / "model.yaml").read_text().replace("size: 128", "size: -4")
    (model_copy / "model.yaml").write_text(text)
    with pytest.raises(ModelError, match=r"input\.size"):
        load_model(model_copy)


def test_missing_graph_is_named(model_copy):
    (model_copy / "head_lesions.onnx").unlink()
    with pytest.raises(ModelError, match="head_lesions.onnx"):
        load_model(model_copy)


def test_unknown_model():
    with pytest.raises(ModelError, match="no model.yaml"):
        load_model("no-such-model")


def test_training_writes_a_hugging_face_checkpoint_the_importer_turns_into_the_model(tmp_path):
    """A few steps of the real training code: the source is a Dinov2Model folder and head folders,
    the model folder is the importer's, and it infers through the runtime."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from node.tools.train_reference import Config, train

    out = tmp_path / "tiny"
    train(out, Config(n_train=3, slices_per_phantom=4, steps=2, head_steps=2, lesion_phantoms=3, lesion_steps=2))
    source = json.loads((out / "source" / "phantom-fm" / "config.json").read_text())
    assert source["model_type"] == "dinov2" and source["num_channels"] == 1
    assert json.loads((out / "import.json").read_text())["heads"].keys() == {"organs", "lesions", "lesion_presence"}
    model = load_model(out)
    assert model.input.geometry == "resize" and model.input.intensity.kind == "zscore"
    rt = OnnxRuntime(model)
    out_batch = rt.infer(np.zeros((2, 1, 128, 128), np.float32))
    assert out_batch.heads["lesions"].shape == (2, 2, 128, 128)
    per_slice = rt.classify(model.heads[2], out_batch.features)  # reads: slices
    assert per_slice.shape == (2,) and np.all((per_slice >= 0) & (per_slice <= 1))
    assert json.loads((out / "training.json").read_text())["train_volumes"] == 6  # 3 per stage


def test_committed_model_is_the_import_of_its_committed_source(tmp_path):
    """models/phantom-fm is what the importer makes of models/phantom-fm/source, not a hand-made folder."""
    pytest.importorskip("transformers")
    from node.model.importers.huggingface import import_huggingface

    committed = MODELS_DIR / "phantom-fm"
    source = committed / "source"
    heads = [source / f"head_{h}" for h in ("organs", "lesions", "lesion_presence")]
    spec = load_model(committed)
    again = load_model(import_huggingface(source / "phantom-fm", tmp_path / "m", heads, name=spec.name,
                                          version=spec.version, description=spec.description))  # fmt: skip
    assert again.model_dump() == spec.model_dump()
    x = np.random.default_rng(3).standard_normal((2, 1, 128, 128)).astype(np.float32)
    a, b = OnnxRuntime(spec).infer(x), OnnxRuntime(again).infer(x)
    for head in a.heads:
        np.testing.assert_allclose(b.heads[head], a.heads[head], atol=1e-5)


def test_a_3d_manifest_without_its_grid_is_refused_with_one_line(model_copy, tmp_path):
    text = (model_copy / "model.yaml").read_text().replace("kind: slice2d", "kind: patch3d")
    (model_copy / "model.yaml").write_text(text)
    src = tmp_path / "ct"
    write_axial_series(Phantom.random(1), src, shape=(4, 64, 64), pixel_spacing=6.0)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.cli",
            "run",
            str(src),
            "--out",
            str(tmp_path / "o"),
            "--model",
            str(model_copy),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and line.endswith(
        "model.yaml: input: Value error, patch3d needs volume (the network's axes, spacing and patch)"
    )


def test_a_head_is_retrained_without_touching_the_backbone(model_copy):
    pytest.importorskip("torch")
    from node.learn.calibrate_shipped import write_calibration
    from node.model.calibration import Calibration
    from node.tools.train_reference import Config, retrain_lesions, retrain_organs, retrain_presence

    graphs = {f.name: f.read_bytes() for f in model_copy.glob("*.onnx")}
    retrain_presence(model_copy, Config(n_train=3, slices_per_phantom=4, steps=2))
    # a calibration fitted to the presence head's old outputs goes when the head is retrained
    calibration = Calibration(kind="temperature", temperature=2.0)
    write_calibration(model_copy / "model.yaml", "lesion_presence", calibration)
    source = model_copy / "source" / "head_lesion_presence" / "config.json"
    source.write_text(json.dumps({**json.loads(source.read_text()), "calibration": calibration.model_dump()}))
    assert load_model(model_copy).heads[2].calibration == calibration
    retrain_lesions(model_copy, Config(lesion_phantoms=3, lesion_steps=2))
    assert load_model(model_copy).heads[2].calibration is None and "calibration" not in json.loads(source.read_text())
    changed = {f.name for f in model_copy.glob("*.onnx") if f.read_bytes() != graphs[f.name]}
    assert changed == {"head_lesion_presence.onnx", "head_lesions.onnx"}  # the backbone and organs untouched
    retrain_organs(model_copy, Config(n_train=2, slices_per_phantom=4, head_steps=2))
    changed = {f.name for f in model_copy.glob("*.onnx") if f.read_bytes() != graphs[f.name]}
    assert changed == {"head_lesion_presence.onnx", "head_lesions.onnx", "head_organs.onnx"}
    assert json.loads((model_copy / "source" / "head_organs" / "config.json").read_text())["context"] is True
    # the lesion head: stage 3's two decoders, averaged, with the CT numbers; the presence head reads them
    for head in ("lesions", "lesion_presence"):
        config = json.loads((model_copy / "source" / f"head_{head}" / "config.json").read_text())
        assert config["ensemble"] == [0.5, 0.5] and config["context"] is True, head
    model = load_model(model_copy)
    rt = OnnxRuntime(model)
    out = rt.infer(np.zeros((2, 1, 128, 128), np.float32))
    assert rt.classify(model.heads[2], out.features).shape == (2,)


def test_the_lesion_head_is_not_retrained_without_the_organ_heads_calibration(model_copy):
    pytest.importorskip("torch")
    from node.tools.train_reference import Config, retrain_lesions

    config = model_copy / "source" / "head_organs" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "context": False}))
    graphs = {f.name: f.read_bytes() for f in model_copy.glob("*.onnx")}
    with pytest.raises(ModelError, match="head_organs: the lesion head takes its CT numbers from the organ head's"):
        retrain_lesions(model_copy, Config(lesion_phantoms=3, lesion_steps=2))
    assert {f.name: f.read_bytes() for f in model_copy.glob("*.onnx")} == graphs


def test_the_organ_head_finds_ct_numbers_again():
    """Curia's per-slice z-score hides CT numbers (liver and soft tissue end up hundredths of a unit
    apart); the reference organ head finds them again from air and fat. On fresh phantom slices
    through the liver, acquired every way training saw, its liver reads 60 HU, and it says which
    slices cannot be calibrated (MR; CT without air in the field of view)."""
    pytest.importorskip("torch")
    import torch

    from node.model.importers.heads import read_own_head
    from node.tools.train_reference import Config, make_dataset

    folder = MODELS_DIR / "phantom-fm" / "source" / "head_organs"
    organs = read_own_head(folder, json.loads((folder / "config.json").read_text()), 96).module(96, 8)
    data, _ = make_dataset(Config(slices_per_phantom=4), range(91000, 91024), np.random.default_rng(91000), True)
    with torch.no_grad():
        hu, calibrated = organs.hounsfield(torch.from_numpy(data.image))
    known = ~np.isnan(data.fat)  # CT slices with air and a body
    liver = np.array([np.median(hu[i, 0].numpy()[data.organs[i] == 1]) for i in np.flatnonzero(known)
                      if (data.organs[i] == 1).sum() > 100])  # fmt: skip
    assert len(liver) >= 10
    assert abs(np.median(liver) - 60) < 8 and np.percentile(np.abs(liver - 60), 75) < 15, liver
    assert calibrated[known].mean() > 0.8 and calibrated[~known].mean() < 0.3
    # the lesion head's two decoders find the same CT numbers (the organ head's calibration, as it is)
    folder = folder.parent / "head_lesions"
    lesions = read_own_head(folder, json.loads((folder / "config.json").read_text()), 96).module(96, 8)
    with torch.no_grad():
        for member in lesions.members:
            np.testing.assert_array_equal(member.hounsfield(torch.from_numpy(data.image))[0], hu)


def test_training_loops_flush_denormals_even_after_onnxruntime_cleared_them():
    """Denormals made training 2-3x slower. ONNX Runtime clears the flush in the thread that opens
    its first session (stage 3 opens one for its frozen tokens), so every training loop flushes
    again. In a fresh process: only a process's first session clears it."""
    pytest.importorskip("torch")
    check = """
import torch
from node.learn.fast_cpu import fast_cpu, flush_denormals
from node.model.importers.heads import segmentation_decoder
from node.model.manifest import load_model
from node.model.runtimes.onnxruntime import OnnxRuntime

denormal = torch.tensor([1e-39])
decoder = segmentation_decoder(16, 8, 2)
flush_denormals()
assert (denormal * 1.0).item() == 0.0
OnnxRuntime(load_model("phantom-fm"))
assert (denormal * 1.0).item() != 0.0, "ONNX Runtime no longer clears the flush: fast_cpu's comment is stale"
with fast_cpu(decoder):
    assert (denormal * 1.0).item() == 0.0
    assert decoder.enc1[0].weight.is_contiguous(memory_format=torch.channels_last)
assert decoder.enc1[0].weight.is_contiguous()  # safetensors and the ONNX export expect it
"""
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_model_yaml_error_is_one_line(tmp_path):
    (tmp_path / "model.yaml").write_text("name: x\nversion: [1\nfoo: : :\n")
    with pytest.raises(ModelError) as e:
        load_model(tmp_path)
    assert "\n" not in str(e.value) and "model.yaml: line 3: not valid YAML" in str(e.value)
