"""PyTorch backend, for models shipped with a ``torch.export`` program beside each ONNX graph.

A graph ``backbone.onnx`` has its PyTorch twin in ``backbone.pt2`` (written by
:func:`export_program`; :mod:`node.tools.curia_shaped` writes both). On CUDA the programs
run under autocast (BF16 by default, gated by :mod:`node.model.gate`) and, unless
``PACS_NODE_TORCH_COMPILE=0``, through ``torch.compile`` in
``reduce-overhead`` mode (CUDA graphs; every batch is padded to the model's
batch size so the captured shapes never change). On the CPU it runs FP32
eager: useful for tests and for comparing with ONNX Runtime, never picked by
``auto`` there.

torch is imported lazily: the node's runtime dependencies do not include it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np

from node.errors import ModelError
from node.model.manifest import HeadSpec, ModelSpec
from node.model.runtimes import BatchOutput, Runtime
from node.timing import Stopwatch

log = logging.getLogger(__name__)


def program_path(model: ModelSpec, graph: str) -> Path:
    return model.graph(graph).with_suffix(".pt2")


def unavailable(model: ModelSpec, need_cuda: bool) -> str | None:
    """Why this backend cannot run ``model`` here, or None."""
    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed"
    import torch

    if need_cuda and not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} sees no CUDA device"
    graphs = model.graphs
    missing = [program_path(model, g).name for g in graphs if not program_path(model, g).exists()]
    if missing:
        return f"model {model.name} ships no PyTorch export ({', '.join(missing)})"
    return None


def export_program(module, example_inputs: tuple, path: Path, dynamic: dict | None = None) -> Path:
    """``torch.export`` ``module`` (eval mode) to ``path`` (.pt2); ``dynamic``: input name -> {axis: Dim}."""
    import torch

    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel has no export
    program = torch.export.export(module.eval(), example_inputs, dynamic_shapes=dynamic)
    torch.export.save(program, path)
    return path


class TorchRuntime(Runtime):
    def __init__(
        self, model: ModelSpec, precision: str = "auto", device: str | None = None, compile=None, threads: int = 0
    ):
        super().__init__(model)
        import torch

        self._torch = torch
        if reason := unavailable(model, need_cuda=False):
            raise ModelError(reason)
        cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
        self.device = device or ("cuda:0" if cuda else "cpu")
        if threads and not cuda:  # torch's thread pool is the process's: set once, by its one runtime
            torch.set_num_threads(threads)
        self.name = "torch-cuda" if cuda else "torch-cpu"
        if precision == "auto":
            precision = "bf16" if cuda else "fp32"
        if precision == "fp16" and not cuda:
            raise ModelError("runtime torch: fp16 needs a CUDA device (use fp32 or bf16 on the CPU)")
        self.precision = precision
        self._dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.overlap = cuda
        if compile is None:
            compile = cuda and os.environ.get("PACS_NODE_TORCH_COMPILE", "1") != "0"
        self._compiled = bool(compile)

        def load(graph: str):
            try:
                m = torch.export.load(program_path(model, graph)).module().to(self.device)
            except Exception as e:  # torch raises many types for a bad archive
                raise ModelError(
                    f"model {model.name}: cannot load {program_path(model, graph).name}: {e}"
                ) from None
            if self._compiled:  # pragma: no cover - needs a GPU
                m = torch.compile(m, mode="reduce-overhead", dynamic=False)
            return m

        self.backbone = load(model.backbone.graph)
        self.heads = {h.name: load(h.graph) for h in model.heads}

    def _autocast(self):
        torch = self._torch
        kind = "cuda" if self.device.startswith("cuda") else "cpu"
        return torch.autocast(kind, dtype=self._dtype or torch.float32, enabled=self._dtype is not None)

    def _upload(self, images: np.ndarray):
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(images))
        if self.device == "cpu":
            return x
        return x.pin_memory().to(self.device, non_blocking=True)  # pragma: no cover - needs a GPU

    def _pad(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        """With CUDA graphs every batch has the captured size: pad the last one with zeros."""
        n, b = len(images), self.model.backbone.batch
        if not self._compiled or n == b:
            return images, n
        if n > b:
            raise ValueError(f"batch of {n} slices exceeds the model's batch size {b}")
        pad = np.zeros((b - n, *images.shape[1:]), images.dtype)
        return np.concatenate([images, pad]), n

    def _features(self, x) -> dict:
        out = self.backbone(x)
        return dict(zip(self.model.backbone.outputs, out, strict=True))

    def infer(self, images: np.ndarray, clock: Stopwatch | None = None) -> BatchOutput:
        torch = self._torch
        clock = clock or Stopwatch()
        images, n = self._pad(images)
        with torch.inference_mode(), self._autocast():
            with clock.part("backbone"):
                x = self._upload(images)
                feats = self._features(x)  # stays on the device for every head
                self._sync()
            feats["image"] = x
            heads = {}
            for h in self.slice_heads:
                with clock.part(f"head_{h.name}"):
                    heads[h.name] = (
                        self.heads[h.name](*(feats[k] for k in h.inputs))[:n].float().cpu().numpy()
                    )
            features = {k: feats[k][:n].float().cpu().numpy() for k in self.series_inputs}
        return BatchOutput(heads=heads, features=features)

    def _sync(self) -> None:
        """Wait for the GPU, so a part's time is its own (one wait per batch part: cheap)."""
        if self.device != "cpu":  # pragma: no cover - needs a GPU
            self._torch.cuda.synchronize()

    def encode(self, images: np.ndarray) -> None:
        torch = self._torch
        images, _ = self._pad(images)
        with torch.inference_mode(), self._autocast():
            self._features(self._upload(images))
        self._sync()

    def classify(self, head: HeadSpec, features: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode(), self._autocast():
            args = [
                torch.from_numpy(np.ascontiguousarray(features[k], np.float32)).to(self.device)
                for k in head.graph_inputs
            ]
            m = self.heads[head.name]
            if self._compiled:  # pragma: no cover - needs a GPU; series length varies, so run it eager
                m = getattr(m, "_orig_mod", m)
            return m(*args).float().reshape(-1).cpu().numpy().astype(np.float64)
