"""Runtime backends, selection and fallbacks, engine cache keys, the numerical gate, the benchmark.

Everything here runs on the CPU; GPU-only checks skip with the reason when no CUDA device or
no TensorRT is present.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from node.config import WorkerConfig
from node.errors import ModelError
from node.model.engine_cache import EngineCache, EngineKey, Profile
from node.model.manifest import MODELS_DIR, load_model
from node.model.preprocess import PlaneMap, _lerp
from node.model.runtimes import BatchOutput, Runtime
from node.model.runtimes import tensorrt as trt_backend
from node.model.select import select_runtime

HAS_TORCH = importlib.util.find_spec("torch") is not None
TRT_MISSING = trt_backend.unavailable()


def _cuda() -> bool:
    if not HAS_TORCH:
        return False
    import torch

    return torch.cuda.is_available()


# -- selection and fallbacks -------------------------------------------------------


def test_auto_falls_back_to_onnxruntime_cpu_and_says_why():
    model = load_model("phantom-fm")
    rt, why = select_runtime(model, "auto")
    if _cuda() or TRT_MISSING is None:
        pytest.skip("a GPU is present: auto does not fall back to the CPU here")
    assert rt.name == "onnxruntime-cpu" and rt.precision == "fp32"
    assert list(rt.selection.skipped) == ["tensorrt", "onnxruntime-cuda", "torch-cuda"]
    assert all(rt.selection.skipped.values())
    assert "\n" not in why and "not taken" in why and "tensorrt" in why


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT is usable here")
def test_tensorrt_requested_without_it_is_one_clear_line():
    with pytest.raises(ModelError, match=r"^runtime tensorrt is not available here: ") as e:
        select_runtime(load_model("phantom-fm"), "tensorrt")
    assert "\n" not in str(e.value)


def test_torch_requested_for_a_model_without_a_torch_export(tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(MODELS_DIR / "phantom-fm", dst, ignore=shutil.ignore_patterns("*.pt2"))
    with pytest.raises(
        ModelError, match="runtime torch is not available here: .*(no PyTorch export|not installed)"
    ):
        select_runtime(load_model(dst), "torch")


def test_workers_share_the_cores_between_their_runtimes():
    cores = len(os.sched_getaffinity(0))
    assert WorkerConfig().threads() == 0  # the runtime's own choice, as before the setting
    assert WorkerConfig(processes=2).threads() == max(1, cores // 2)
    assert WorkerConfig(processes=64).threads() == 1
    assert WorkerConfig(processes=2, inference_threads=3).threads() == 3
    rt, _ = select_runtime(load_model("phantom-fm"), "onnxruntime", threads=1)
    sessions = [rt.backbone, *rt.heads.values()]
    assert [s.get_session_options().intra_op_num_threads for s in sessions] == [1] * len(sessions)


def test_unknown_runtime_and_precision():
    model = load_model("phantom-fm")
    with pytest.raises(ModelError, match="unknown runtime"):
        select_runtime(model, "tpu")
    with pytest.raises(ModelError, match="unknown precision"):
        select_runtime(model, "auto", "int4")
    with pytest.raises(ModelError, match="as exported \\(fp32\\)"):
        select_runtime(model, "onnxruntime", "fp16")


# -- a tiny model exported both to ONNX and torch.export ---------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A Curia-format DINOv2 at toy size with our heads (random weights), via the same one-command export."""
    if not HAS_TORCH or any(importlib.util.find_spec(m) is None for m in ("onnx", "transformers")):
        pytest.skip("needs the train and import extras (torch, onnx, transformers)")
    from node.tools.curia_shaped import ViTConfig, export

    out = tmp_path_factory.mktemp("tiny") / "tiny-vit"
    export(out, ViTConfig(size=64, patch=16, dim=32, depth=2, heads=2, mlp=64, batch=4), name="tiny-vit")
    return out


def test_curia_export_is_a_complete_model_and_flops_match_the_graph(tiny_model):
    from node.tools.bench import graph_flops
    from node.tools.curia_shaped import CURIA, ViTConfig, vit_flops

    model = load_model(tiny_model)
    assert model.input.size == 64 and model.backbone.batch == 4
    assert {p.name for p in tiny_model.glob("*.pt2")} == {
        "backbone.pt2", "head_organs.pt2", "head_lesions.pt2", "head_lesion_presence.pt2"
    }  # fmt: skip
    cfg = ViTConfig(size=64, patch=16, dim=32, depth=2, heads=2, mlp=64)
    assert graph_flops(tiny_model / "backbone.onnx") == pytest.approx(vit_flops(cfg), rel=1e-9)
    assert vit_flops(CURIA) / 1e9 == pytest.approx(213.2, abs=0.1)  # ViT-B/16 at 512x512, one channel


def test_torch_backend_matches_onnxruntime(tiny_model):
    model = load_model(tiny_model)
    ort_rt, _ = select_runtime(model, "onnxruntime")
    torch_rt, why = select_runtime(model, "torch")
    assert torch_rt.name in ("torch-cpu", "torch-cuda") and why == "requested"
    x = np.random.default_rng(1).standard_normal((3, 1, 64, 64)).astype(np.float32)
    a, b = ort_rt.infer(x), torch_rt.infer(x)
    for k in a.heads:
        assert b.heads[k].shape == a.heads[k].shape
        np.testing.assert_allclose(b.heads[k], a.heads[k], atol=2e-4)
    np.testing.assert_allclose(b.features["tokens"], a.features["tokens"], atol=2e-4)
    head = ort_rt.series_heads[0]
    assert torch_rt.classify(head, a.features) == pytest.approx(ort_rt.classify(head, a.features), abs=1e-5)


# -- engine cache ----------------------------------------------------------------------


def _key(**kw) -> EngineKey:
    base = EngineKey(
        "backbone.onnx", "a" * 64, "NVIDIA H100 80GB HBM3", "9.0", "10.3.0", "fp16", "b1-16-16@512"
    )
    return replace(base, **kw)


@pytest.mark.parametrize(
    "change",
    [
        {"onnx_sha256": "b" * 64},
        {"gpu_name": "NVIDIA H200"},
        {"compute_capability": "8.9"},
        {"tensorrt": "10.4.0"},
        {"precision": "bf16"},
        {"profile": str(Profile(1, 32, 32, 512))},
    ],
)
def test_engine_key_changes_with_every_field(change, tmp_path):
    cache = EngineCache(tmp_path)
    cache.put(_key(), b"engine-bytes")
    assert cache.get(_key()) == b"engine-bytes"
    other = _key(**change)
    assert other.digest != _key().digest and cache.get(other) is None


def test_engine_cache_rejects_tampered_or_partial_entries(tmp_path):
    cache = EngineCache(tmp_path)
    path = cache.put(_key(), b"x" * 100, gate="passed")
    assert cache.metadata(_key())["gate"] == "passed"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    path.write_bytes(b"x" * 50)  # truncated engine
    assert cache.get(_key()) is None
    path.unlink()
    assert cache.get(_key()) is None


def test_engine_key_and_profile_validate():
    with pytest.raises(ValueError, match="precision"):
        _key(precision="int3")
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Profile(4, 2, 8, 512)


@pytest.mark.skipif(TRT_MISSING is not None, reason=f"TensorRT not usable here: {TRT_MISSING}")
def test_tensorrt_builds_caches_and_matches_onnxruntime(tmp_path):  # pragma: no cover - GPU only
    from node.model.engine_cache import EngineCache as Cache

    model = load_model("phantom-fm")
    rt = trt_backend.TensorRTRuntime(model, precision="fp32", cache=Cache(tmp_path))
    assert len(list(tmp_path.glob("*.engine"))) == 3  # backbone + two per-slice heads
    ref, _ = select_runtime(model, "onnxruntime")
    x = np.random.default_rng(0).standard_normal((4, 1, 128, 128)).astype(np.float32)
    np.testing.assert_allclose(rt.infer(x).heads["organs"], ref.infer(x).heads["organs"], atol=1e-3)


@pytest.mark.skipif(not _cuda(), reason="no CUDA device (torch.cuda.is_available() is False)")
def test_torch_cuda_bf16_passes_the_gate(tiny_model):  # pragma: no cover - GPU only
    rt, _ = select_runtime(load_model(tiny_model), "torch", "bf16")
    assert rt.device.startswith("cuda") and rt.gate is not None


# -- numerical gate ----------------------------------------------------------------------


class Noisy(Runtime):
    """Another runtime's outputs with the segmentation probabilities perturbed (a drifting precision)."""

    name, device, precision = "noisy", "cpu", "fp16"

    def __init__(self, inner: Runtime, scale: float):
        super().__init__(inner.model)
        self.inner, self.scale, self.rng = inner, scale, np.random.default_rng(0)

    def infer(self, images, clock=None):
        out = self.inner.infer(images, clock)
        heads = {
            k: v + self.scale * self.rng.standard_normal(v.shape).astype(np.float32)
            for k, v in out.heads.items()
        }
        return BatchOutput(heads, out.features)

    def encode(self, images):
        self.inner.encode(images)

    def classify(self, head, features):
        return self.inner.classify(head, features)


def test_gate_passes_an_identical_runtime_and_refuses_a_drifting_one():
    from node.model.gate import GateError, check, require

    model = load_model("phantom-fm")
    ref, _ = select_runtime(model, "onnxruntime")
    same = check(model, Noisy(ref, 0.0), reference=ref, cases=2, slices=6)
    assert same.ok and same.checks and "passed the numerical gate" in same.message()
    assert require(same) is same
    drift = check(model, Noisy(ref, 0.5), reference=ref, cases=2, slices=6)
    assert not drift.ok
    with pytest.raises(
        GateError, match=r"^fp16 on noisy for model phantom-fm .* refused: head \w+ .*Dice 0\.\d+ < 0\.97"
    ):
        require(drift)


def test_gate_verdict_is_cached(tmp_path):
    from node.model.gate import check_cached

    model = load_model("phantom-fm")
    ref, _ = select_runtime(model, "onnxruntime")
    first = check_cached(model, Noisy(ref, 0.0), cache_dir=tmp_path, reference=ref, cases=1, slices=4)
    assert len(list((tmp_path / "gate").glob("*.json"))) == 1
    again = check_cached(model, Noisy(ref, 0.5), cache_dir=tmp_path, reference=ref, cases=1, slices=4)
    assert again.ok == first.ok and len(again.checks) == len(first.checks)  # same key: not re-run


def test_requested_reduced_precision_goes_through_the_gate(tiny_model, tmp_path, monkeypatch):
    """torch bf16 on the CPU: the gate decides; a refusal is one GateError line, never silent use."""
    import node.model.gate
    from node.model.gate import GateError

    monkeypatch.setattr(node.model.gate, "DEFAULT_ROOT", tmp_path)
    model = load_model(tiny_model)
    try:
        rt, _ = select_runtime(model, "torch", "bf16")
    except GateError as e:
        assert "refused" in str(e) and "\n" not in str(e)
    else:
        assert rt.precision == "bf16" and rt.gate is not None and rt.gate.ok


# -- pipeline numerics: the fast paths equal the straightforward ones ----------------------


def test_labels_to_canonical_equals_full_resize_then_argmax():
    rng = np.random.default_rng(3)
    logits = ndimage.gaussian_filter(rng.normal(0, 3, (3, 6, 32, 32)), (0, 0, 2, 2)) * 8
    p = np.exp(logits)
    probs = (p / p.sum(1, keepdims=True)).astype(np.float32)
    for shape, spacing in (((100, 90), (1.0, 1.2)), ((20, 50), (3.0, 1.0))):
        plane = PlaneMap(shape, spacing, 32)
        full = plane.to_canonical(probs)
        labels, conf = plane.labels_to_canonical(probs)
        assert np.array_equal(labels, full.argmax(1))
        assert np.abs(conf.astype(int) - np.round(full.max(1) * 255)).max() <= 1


def test_to_model_equals_blur_then_interpolate():
    rng = np.random.default_rng(4)
    x = ndimage.gaussian_filter(rng.normal(0, 300, (3, 96, 80)), (0, 2, 2)).astype(np.float32)
    plane = PlaneMap((96, 80), (0.8, 1.1), 32)
    sigma = [0.0] + [max(0.0, (plane.model_spacing / s - 1) / 2) for s in plane.spacing]
    blurred = ndimage.gaussian_filter(x, sigma, mode="nearest")
    ref = _lerp(
        _lerp(blurred, plane.model_to_canonical(0), -2, -1000.0), plane.model_to_canonical(1), -1, -1000.0
    )
    np.testing.assert_allclose(plane.to_model(x, -1000.0), ref, atol=1e-3)


# -- the benchmark command ----------------------------------------------------------------


def test_bench_command_writes_throughput_peak_and_stages(tmp_path, capsys):
    from node.cli import main

    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--slices",
        "6",
        "--size",
        "64",
        "--repeat",
        "1",
        "--seconds",
        "0.2",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    tp = data["throughput"]
    assert tp["backbone_slices_per_s"] > 0 and tp["all_heads_slices_per_s"] > 0
    assert data["matmul_peak_tflops"]["numpy_fp32"] > 0
    if importlib.util.find_spec("onnx"):
        assert 0 < tp["backbone_fraction_of_peak"] < 1.5 and tp["backbone_gflop_per_slice"] > 0
    assert data["runs"][0]["slices"] == 6 and set(data["runs"][0]["stages_s"]) >= {"inference", "encode_seg"}
    assert data["memory"]["peak_rss_mib"] > 0 and data["environment"]["runtime"] == "onnxruntime-cpu"
    assert "backbone alone" in capsys.readouterr().out


@pytest.mark.skipif(
    not HAS_TORCH, reason="without torch the torch runtime is refused before its files are read"
)
def test_model_copy_without_torch_export_is_not_picked_by_torch(tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(MODELS_DIR / "phantom-fm", dst, ignore=shutil.ignore_patterns("*.pt2"))
    (dst / "backbone.pt2").write_bytes(b"")  # only one of four programs
    with pytest.raises(ModelError, match="head_organs.pt2"):
        select_runtime(load_model(dst), "torch")


def test_prefetch_overlap_gives_the_same_prediction():
    """GPU runtimes prepare the next batch while one runs; the result must not change."""
    from node.model.gate import held_out
    from node.model.inference import predict
    from node.timing import Stopwatch

    model = load_model("phantom-fm")
    ref, _ = select_runtime(model, "onnxruntime")
    overlapped = Noisy(ref, 0.0)
    overlapped.overlap = True
    series = held_out(0, slices=2 * model.backbone.batch + 3, size=96)
    a, b = predict(series, model, ref, Stopwatch()), predict(series, model, overlapped, Stopwatch())
    for k in a.labels:
        assert np.array_equal(a.labels[k], b.labels[k]) and np.array_equal(a.confidence[k], b.confidence[k])
    assert a.probabilities.keys() == b.probabilities.keys()
    assert all(np.array_equal(a.probabilities[k], b.probabilities[k]) for k in a.probabilities)


def test_models_build_without_tensorrt_is_one_line():
    import subprocess
    import sys

    from node.model.runtimes.tensorrt import unavailable

    if not unavailable():
        pytest.skip("TensorRT is installed here: the build itself is a GPU test")
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "models", "build"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: cannot build TensorRT engines here: {unavailable()}"]
