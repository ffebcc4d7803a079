"""Inference runtimes behind one small interface.

A runtime loads a model's graphs once and, per slice batch, runs the
backbone **once** and every per-slice head on its features
(:meth:`Runtime.infer`); series-level heads then consume the pooled
features (:meth:`Runtime.classify`). Backends keep features wherever is
cheapest for them (a GPU backend keeps them on the device).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from node.errors import ModelError
from node.model_repo import HeadSpec, ModelSpec

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "onnxruntime", "tensorrt", "torch")


@dataclass
class BatchOutput:
    """One slice batch: every per-slice head's output and the pooled features for series heads."""

    heads: dict[str, np.ndarray]  # head name -> (N, C, S, S) probabilities
    features: dict[str, np.ndarray]  # backbone outputs the series-level heads need, e.g. tokens (N, T, D)


class Runtime(ABC):
    name: str  # e.g. "onnxruntime-cpu"
    device: str  # e.g. "cpu", "cuda:0"

    def __init__(self, model: ModelSpec):
        self.model = model
        self.slice_heads = [h for h in model.heads if h.kind != "classification"]
        self.series_heads = [h for h in model.heads if h.kind == "classification"]
        self.series_inputs = sorted({i for h in self.series_heads for i in h.inputs})

    @abstractmethod
    def infer(self, images: np.ndarray) -> BatchOutput:
        """(N, C, S, S) normalised slices -> backbone once, then every per-slice head."""

    @abstractmethod
    def classify(self, head: HeadSpec, features: dict[str, np.ndarray]) -> float:
        """A series-level head over all slices' features -> probability of the positive class."""


def select_runtime(model: ModelSpec, requested: str = "auto") -> tuple[Runtime, str]:
    """The runtime to use and a one-line reason. ``auto`` takes the best one that works here."""
    if requested not in RUNTIMES:
        raise ModelError(f"unknown runtime {requested!r} (choose from {', '.join(RUNTIMES)})")
    if requested in ("tensorrt", "torch"):
        # Planned backends (GPU issue): the interface is ready, the implementations are not.
        raise ModelError(f"runtime {requested} is not implemented in this version; use onnxruntime or auto")
    from node.runtimes.onnxruntime import OnnxRuntime

    rt = OnnxRuntime(model)
    why = (
        "picked by auto: TensorRT and PyTorch backends are not implemented yet"
        if requested == "auto"
        else "requested"
    )
    log.info("runtime %s on %s (%s)", rt.name, rt.device, why)
    return rt, why
