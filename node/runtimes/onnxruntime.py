"""ONNX Runtime backend: CUDA execution provider when present, else CPU."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from node.errors import ModelError
from node.model_repo import HeadSpec, ModelSpec
from node.runtimes import BatchOutput, Runtime


class OnnxRuntime(Runtime):
    def __init__(self, model: ModelSpec, threads: int = 0):
        super().__init__(model)
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        cuda = providers[0] == "CUDAExecutionProvider"
        self.name = "onnxruntime-cuda" if cuda else "onnxruntime-cpu"
        self.device = "cuda:0" if cuda else "cpu"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3

        def session(graph: str) -> ort.InferenceSession:
            try:
                return ort.InferenceSession(str(model.graph(graph)), opts, providers=providers)
            except Exception as e:  # onnxruntime raises its own untyped errors
                raise ModelError(f"model {model.name}: cannot load {graph}: {e}") from None

        self.backbone = session(model.backbone.graph)
        self.heads = {h.name: session(h.graph) for h in model.heads}

    def infer(self, images: np.ndarray) -> BatchOutput:
        names = [o.name for o in self.backbone.get_outputs()]
        feats = dict(zip(names, self.backbone.run(None, {"image": images}), strict=True))
        feats["image"] = images
        out = {}
        for h in self.slice_heads:
            out[h.name] = self.heads[h.name].run(None, {k: feats[k] for k in h.inputs})[0]
        return BatchOutput(heads=out, features={k: feats[k] for k in self.series_inputs})

    def classify(self, head: HeadSpec, features: dict[str, np.ndarray]) -> float:
        feeds = {k: features[k].astype(np.float32, copy=False) for k in head.inputs}
        return float(self.heads[head.name].run(None, feeds)[0].ravel()[0])
