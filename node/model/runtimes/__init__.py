"""Inference runtimes behind one small interface.

A runtime loads a model's graphs once and, per slice batch, runs the
backbone **once** and every per-slice head on its features
(:meth:`Runtime.infer`); series-level heads then consume the pooled
features (:meth:`Runtime.classify`). Backends keep features wherever is
cheapest for them (a GPU backend keeps them on the device).

One backend per module (``onnxruntime``, ``tensorrt``, ``torch``); :mod:`node.model.select`
picks one and says why.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from node.errors import ModelError
from node.identity import RuntimeChoice
from node.model.manifest import HeadSpec, ModelSpec
from node.timing import Stopwatch

RUNTIMES = tuple(r.value for r in RuntimeChoice)  # what --runtime and the config accept
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass
class BatchOutput:
    """One slice batch: every per-slice head's output and the pooled features for series heads."""

    heads: dict[str, np.ndarray]  # head name -> (N, C, S, S) probabilities
    features: dict[str, np.ndarray]  # backbone outputs the series-level heads need, e.g. tokens (N, T, D)


@dataclass
class Selection:
    """What ``select_runtime`` picked, and why each candidate before it was not taken."""

    picked: str
    why: str
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> reason it was not taken

    def line(self) -> str:
        skipped = "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
        return f"{self.why}" + (f" (not taken: {skipped})" if skipped else "")


class Runtime(ABC):
    name: str  # e.g. "onnxruntime-cpu"
    device: str  # e.g. "cpu", "cuda:0"
    precision: str = "fp32"
    overlap: bool = False  # True when preprocessing the next batch can overlap with inference (GPU)
    selection: Selection | None = None
    gate = None  # node.model.gate.GateReport when a reduced precision was checked

    def __init__(self, model: ModelSpec):
        self.model = model
        self.slice_heads = [h for h in model.heads if h.kind != "classification"]
        self.series_heads = [h for h in model.heads if h.kind == "classification"]
        self.series_inputs = sorted({i for h in self.series_heads for i in h.inputs})

    keep_bytes: int | None = None  # a series whose kept features would be larger is not kept

    def keep(self, *names: str, max_bytes: int | None = None) -> None:
        """Return these backbone outputs (and ``image``, the normalised input) of every batch in
        :attr:`BatchOutput.features` too: the feature cache keeps them (float16, at most ``max_bytes``
        per series) for training heads."""
        given = {"image", *self.model.backbone.outputs} if self.model.backbone else set()
        self.series_inputs = sorted({*self.series_inputs, *(set(names) & given)})
        self.keep_bytes = max_bytes

    @abstractmethod
    def infer(self, images: np.ndarray, clock: Stopwatch | None = None) -> BatchOutput:
        """(N, C, S, S) normalised slices -> backbone once, then every per-slice head.

        ``clock.part("backbone")`` and ``clock.part("head_<name>")`` get each one's time.
        """

    @abstractmethod
    def classify(self, head: HeadSpec, features: dict[str, np.ndarray]) -> np.ndarray:
        """A series-level head over the series' features (``head.graph_inputs``) -> its outputs: (1,)
        the probability of the positive class, or (K,) one probability per class."""

    @abstractmethod
    def encode(self, images: np.ndarray) -> None:
        """The backbone alone, results left where the backend keeps them (benchmarks; synchronous)."""

    def run_network(self, head: HeadSpec, patch: np.ndarray) -> np.ndarray:
        """A 3D head (``patch3d``): (1, C, *patch) normalised input -> (1, K, *patch) logits."""
        raise ModelError(f"runtime {self.name}: 3D networks run on ONNX Runtime in this version")

    def warmup(self, batch: int | None = None) -> None:
        """One full batch through backbone and heads, so the first series does not pay for lazy set-up."""
        if self.model.backbone is None:
            return  # 3D networks: every patch is a full batch already
        n = batch or self.model.backbone.batch
        size = self.model.input.size
        self.infer(np.zeros((n, self.model.input.intensity.channels, size, size), np.float32))
