"""ONNX Runtime backend: CUDA execution provider when present (features stay on the GPU), else CPU."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from node.errors import ModelError
from node.model.manifest import HeadSpec, ModelSpec
from node.model.runtimes import BatchOutput, Runtime
from node.timing import Stopwatch


def cuda_unavailable() -> str | None:
    """Why the CUDA execution provider cannot be used here, or None."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDA execution provider (install onnxruntime-gpu)"
    return None


class OnnxRuntime(Runtime):
    def __init__(self, model: ModelSpec, threads: int = 0, cuda: bool = True):
        super().__init__(model)
        providers = ["CPUExecutionProvider"]
        if cuda and cuda_unavailable() is None:
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3

        def session(graph: str) -> ort.InferenceSession:
            try:
                return ort.InferenceSession(str(model.graph(graph)), opts, providers=providers)
            except Exception as e:  # onnxruntime raises its own untyped errors
                raise ModelError(f"model {model.name}: cannot load {graph}: {e}") from None

        self.heads = {h.name: session(h.graph) for h in model.heads}
        self.backbone = session(model.backbone.graph) if model.backbone else None  # None: 3D networks
        # onnxruntime-gpu lists the CUDA provider even on a machine without a GPU, then falls back
        on_gpu = "CUDAExecutionProvider" in next(iter(self.heads.values())).get_providers()
        self.name = "onnxruntime-cuda" if on_gpu else "onnxruntime-cpu"
        self.device = "cuda:0" if on_gpu else "cpu"
        self.overlap = on_gpu
        self._outputs = [o.name for o in self.backbone.get_outputs()] if self.backbone else []

    def run_network(self, head: HeadSpec, patch: np.ndarray) -> np.ndarray:
        sess = self.heads[head.name]
        return sess.run(None, {sess.get_inputs()[0].name: patch})[0]

    def infer(self, images: np.ndarray, clock: Stopwatch | None = None) -> BatchOutput:
        clock = clock or Stopwatch()
        if self.device != "cpu":
            return self._infer_bound(images, clock)
        with clock.part("backbone"):
            feats = dict(zip(self._outputs, self.backbone.run(None, {"image": images}), strict=True))
        feats["image"] = images
        out = {}
        for h in self.slice_heads:
            with clock.part(f"head_{h.name}"):
                out[h.name] = self.heads[h.name].run(None, {k: feats[k] for k in h.inputs})[0]
        return BatchOutput(heads=out, features={k: feats[k] for k in self.series_inputs})

    def _infer_bound(
        self, images: np.ndarray, clock: Stopwatch
    ) -> BatchOutput:  # pragma: no cover - needs a GPU
        """IO binding: the image goes up once, backbone features stay on the GPU for every head.

        ``run_with_iobinding`` returns when the GPU is done, so each part's time is its own.
        """
        with clock.part("backbone"):
            on_gpu = {"image": ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(images), "cuda", 0)}
            bb = self.backbone.io_binding()
            bb.bind_ortvalue_input("image", on_gpu["image"])
            for name in self._outputs:
                bb.bind_output(name, "cuda", 0)
            self.backbone.run_with_iobinding(bb)
            on_gpu.update(zip(self._outputs, bb.get_outputs(), strict=True))
        out = {}
        for h in self.slice_heads:
            with clock.part(f"head_{h.name}"):
                sess = self.heads[h.name]
                hb = sess.io_binding()
                for k in h.inputs:
                    hb.bind_ortvalue_input(k, on_gpu[k])
                hb.bind_output(sess.get_outputs()[0].name, "cpu")
                sess.run_with_iobinding(hb)
                out[h.name] = hb.copy_outputs_to_cpu()[0]
        return BatchOutput(heads=out, features={k: on_gpu[k].numpy() for k in self.series_inputs})

    def encode(self, images: np.ndarray) -> None:
        if self.device == "cpu":
            self.backbone.run(None, {"image": images})
            return
        bb = self.backbone.io_binding()  # pragma: no cover - needs a GPU
        bb.bind_cpu_input("image", np.ascontiguousarray(images))
        for name in self._outputs:
            bb.bind_output(name, "cuda", 0)
        self.backbone.run_with_iobinding(bb)

    def classify(self, head: HeadSpec, features: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {k: features[k].astype(np.float32, copy=False) for k in head.graph_inputs}
        return self.heads[head.name].run(None, feeds)[0].ravel().astype(np.float64)
