"""Inference runtimes behind one small interface.

A runtime loads a model's graphs once and, per slice batch, runs the
backbone **once** and every per-slice head on its features
(:meth:`Runtime.infer`); series-level heads then consume the pooled
features (:meth:`Runtime.classify`). Backends keep features wherever is
cheapest for them (a GPU backend keeps them on the device).

``auto`` tries, in order: TensorRT, ONNX Runtime on CUDA, PyTorch on CUDA,
ONNX Runtime on the CPU, and says why each better one was not taken
(:attr:`Runtime.selection`, logged, and exported by the worker's ``info``
metric). Reduced precisions (FP16/BF16) pass the numerical gate
(:mod:`node.gate`) before they are used.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from node.errors import ModelError
from node.model_repo import HeadSpec, ModelSpec
from node.timing import Stopwatch

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "onnxruntime", "tensorrt", "torch")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# auto's order; each entry is (candidate name, backend, device kind)
AUTO_ORDER = ("tensorrt", "onnxruntime-cuda", "torch-cuda", "onnxruntime-cpu")


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
    gate = None  # node.gate.GateReport when a reduced precision was checked

    def __init__(self, model: ModelSpec):
        self.model = model
        self.slice_heads = [h for h in model.heads if h.kind != "classification"]
        self.series_heads = [h for h in model.heads if h.kind == "classification"]
        self.series_inputs = sorted({i for h in self.series_heads for i in h.inputs})

    @abstractmethod
    def infer(self, images: np.ndarray, clock: Stopwatch | None = None) -> BatchOutput:
        """(N, C, S, S) normalised slices -> backbone once, then every per-slice head.

        ``clock.part("backbone")`` and ``clock.part("head_<name>")`` get each one's time.
        """

    @abstractmethod
    def classify(self, head: HeadSpec, features: dict[str, np.ndarray]) -> float:
        """A series-level head over all slices' features -> probability of the positive class."""

    @abstractmethod
    def encode(self, images: np.ndarray) -> None:
        """The backbone alone, results left where the backend keeps them (benchmarks; synchronous)."""

    def warmup(self, batch: int | None = None) -> None:
        """One full batch through backbone and heads, so the first series does not pay for lazy set-up."""
        n = batch or self.model.backbone.batch
        size = self.model.input.size
        self.infer(np.zeros((n, len(self.model.input.intensity.ct_windows), size, size), np.float32))


def select_runtime(model: ModelSpec, requested: str = "auto", precision: str = "auto") -> tuple[Runtime, str]:
    """The runtime to use and a one-line reason. ``auto`` takes the best one that works here.

    An explicitly requested backend that cannot run here is a :class:`ModelError` with one line
    saying why. Under ``auto`` each unavailable candidate's reason is logged and kept in
    ``runtime.selection.skipped``.
    """
    if requested not in RUNTIMES:
        raise ModelError(f"unknown runtime {requested!r} (choose from {', '.join(RUNTIMES)})")
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if requested != "auto":
        rt = _build(requested, model, precision, explicit=True)
        sel = Selection(rt.name, "requested")
    else:
        skipped: dict[str, str] = {}
        rt = None
        for cand in AUTO_ORDER:
            try:
                rt = _build(cand, model, precision, explicit=False)
                break
            except _NotTaken as e:
                skipped[cand] = str(e)
                log.info("runtime %s not taken: %s", cand, e)
        assert rt is not None  # onnxruntime-cpu always builds or raises ModelError
        sel = Selection(rt.name, f"picked by auto: {rt.name} on {rt.device}, {rt.precision}", skipped)
    rt.selection = sel
    why = sel.line()
    log.info("runtime %s on %s, %s (%s)", rt.name, rt.device, rt.precision, why)
    return rt, why


class _NotTaken(Exception):
    """A candidate that cannot run here (auto goes on to the next one)."""


def _build(candidate: str, model: ModelSpec, precision: str, explicit: bool) -> Runtime:
    """Construct one backend, or raise _NotTaken (auto) / ModelError (explicit request) with the reason."""

    def unavailable(reason: str):
        if explicit:
            return ModelError(f"runtime {candidate.split('-')[0]} is not available here: {reason}")
        return _NotTaken(reason)

    if candidate == "tensorrt":
        from node.runtimes import tensorrt

        if reason := tensorrt.unavailable():
            raise unavailable(reason)
        return _gated(
            lambda p: tensorrt.TensorRTRuntime(model, precision=p), candidate, model, precision, explicit
        )
    if candidate in ("onnxruntime", "onnxruntime-cuda", "onnxruntime-cpu"):
        from node.runtimes import onnxruntime

        if candidate == "onnxruntime-cuda" and (reason := onnxruntime.cuda_unavailable()):
            raise _NotTaken(reason)
        if precision not in ("auto", "fp32"):
            reason = f"ONNX Runtime runs the graphs as exported (fp32), not {precision}"
            if candidate != "onnxruntime-cpu" or explicit:
                raise unavailable(reason)
        rt = onnxruntime.OnnxRuntime(model, cuda=candidate != "onnxruntime-cpu")
        if candidate == "onnxruntime-cuda" and rt.device == "cpu":
            raise _NotTaken("the CUDA execution provider did not initialise (no usable GPU)")
        return rt
    if candidate in ("torch", "torch-cuda"):
        from node.runtimes import torch as torch_backend

        if reason := torch_backend.unavailable(model, need_cuda=candidate == "torch-cuda"):
            raise unavailable(reason)
        return _gated(
            lambda p: torch_backend.TorchRuntime(model, precision=p), candidate, model, precision, explicit
        )
    raise ModelError(f"unknown runtime {candidate!r}")


# reduced precisions auto tries, best first; FP32 is the fallback that needs no gate
GATED_ORDER = {"tensorrt": ("bf16", "fp16", "fp32"), "torch-cuda": ("bf16", "fp32"), "torch": ("fp32",)}


def _gated(make, candidate: str, model: ModelSpec, precision: str, explicit: bool) -> Runtime:
    """Build at the requested precision (or each of auto's, best first); a reduced one must pass the gate."""
    from node import gate

    order = GATED_ORDER[candidate] if precision == "auto" else (precision,)
    refused = []
    for p in order:
        try:
            rt = make(p)
        except ModelError as e:
            if explicit:
                raise
            raise _NotTaken(str(e)) from None
        if rt.precision == "fp32":
            return rt
        report = gate.check_cached(model, rt)
        rt.gate = report
        if report.ok:
            return rt
        log.warning("%s", report.message())
        refused.append(report.message())
    if explicit:
        raise gate.GateError(refused[-1])
    raise _NotTaken("; ".join(refused))
