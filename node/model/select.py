"""Pick the runtime for a model: the one asked for, or under ``auto`` the best that works here.

``auto`` tries, in order: TensorRT, ONNX Runtime on CUDA, PyTorch on CUDA, ONNX Runtime on the
CPU, and says why each better one was not taken (:attr:`Runtime.selection`, logged, and exported
by the worker's ``info`` metric). Reduced precisions (FP16/BF16) pass the numerical gate
(:mod:`node.model.gate`) before they are used.
"""

from __future__ import annotations

import logging
from typing import Protocol

from node.errors import ModelError
from node.model import gate
from node.model.manifest import ModelSpec
from node.model.runtimes import PRECISIONS, RUNTIMES, Runtime, Selection

log = logging.getLogger(__name__)


class RemoteServer(Protocol):
    """Where ``runtime: kserve`` sends its batches (the config's ``kserve``)."""

    url: str  # grpc://host:port or http://host:port
    timeout_s: float

# auto's order: backend-device candidates, best first
AUTO_ORDER = ("tensorrt", "onnxruntime-cuda", "torch-cuda", "onnxruntime-cpu")


def select_runtime(
    model: ModelSpec,
    requested: str = "auto",
    precision: str = "auto",
    kserve: RemoteServer | None = None,
    threads: int = 0,
) -> tuple[Runtime, str]:
    """The runtime to use and a one-line reason. ``auto`` takes the best one that works here;
    ``kserve`` (never picked by ``auto``) sends the batches to the server ``kserve`` names.
    ``threads``: the CPU threads a runtime computes with on the CPU (0: the runtime's own choice,
    every core).

    An explicitly requested backend that cannot run here is a :class:`ModelError` with one line
    saying why. Under ``auto`` each unavailable candidate's reason is logged and kept in
    ``runtime.selection.skipped``.
    """
    if requested not in RUNTIMES:
        raise ModelError(f"unknown runtime {requested!r} (choose from {', '.join(RUNTIMES)})")
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if requested == "kserve":
        rt = _remote(model, precision, kserve)
        sel = Selection(rt.name, f"requested: the KServe v2 server at {kserve.url}")
    elif requested != "auto":
        rt = _build(requested, model, precision, explicit=True, threads=threads)
        sel = Selection(rt.name, "requested")
    else:
        skipped: dict[str, str] = {}
        rt = None
        for cand in AUTO_ORDER:
            try:
                rt = _build(cand, model, precision, explicit=False, threads=threads)
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


def _remote(model: ModelSpec, precision: str, kserve: RemoteServer | None) -> Runtime:
    from node.model.runtimes.kserve import KServeRuntime

    if kserve is None:
        raise ModelError("runtime kserve needs the server's address (kserve: {url: grpc://host:port})")
    if precision not in ("auto", "fp32"):
        raise ModelError(f"runtime kserve runs the exported graphs as they are (fp32), not {precision}")
    return KServeRuntime(model, kserve.url, kserve.timeout_s)


class _NotTaken(Exception):
    """A candidate that cannot run here (auto goes on to the next one)."""


def _build(candidate: str, model: ModelSpec, precision: str, explicit: bool, threads: int = 0) -> Runtime:
    """Construct one backend, or raise _NotTaken (auto) / ModelError (explicit request) with the reason."""

    def unavailable(reason: str):
        if explicit:
            return ModelError(f"runtime {candidate.split('-')[0]} is not available here: {reason}")
        return _NotTaken(reason)

    if model.input.kind == "patch3d" and not candidate.startswith("onnxruntime"):
        raise unavailable("3D sliding-window networks (patch3d) run on ONNX Runtime in this version")
    if candidate == "tensorrt":
        from node.model.runtimes import tensorrt

        if reason := tensorrt.unavailable():
            raise unavailable(reason)
        return _gated(
            lambda p: tensorrt.TensorRTRuntime(model, precision=p), candidate, model, precision, explicit
        )
    if candidate in ("onnxruntime", "onnxruntime-cuda", "onnxruntime-cpu"):
        from node.model.runtimes import onnxruntime

        if candidate == "onnxruntime-cuda" and (reason := onnxruntime.cuda_unavailable()):
            raise _NotTaken(reason)
        if precision not in ("auto", "fp32"):
            reason = f"ONNX Runtime runs the graphs as exported (fp32), not {precision}"
            if candidate != "onnxruntime-cpu" or explicit:
                raise unavailable(reason)
        rt = onnxruntime.OnnxRuntime(model, threads, cuda=candidate != "onnxruntime-cpu")
        if candidate == "onnxruntime-cuda" and rt.device == "cpu":
            raise _NotTaken("the CUDA execution provider did not initialise (no usable GPU)")
        return rt
    if candidate in ("torch", "torch-cuda"):
        from node.model.runtimes import torch as torch_backend

        if reason := torch_backend.unavailable(model, need_cuda=candidate == "torch-cuda"):
            raise unavailable(reason)
        return _gated(
            lambda p: torch_backend.TorchRuntime(model, precision=p, threads=threads),
            candidate,
            model,
            precision,
            explicit,
        )
    raise ModelError(f"unknown runtime {candidate!r}")


# reduced precisions auto tries, best first; FP32 is the fallback that needs no gate
GATED_ORDER = {"tensorrt": ("bf16", "fp16", "fp32"), "torch-cuda": ("bf16", "fp32"), "torch": ("fp32",)}


def _gated(make, candidate: str, model: ModelSpec, precision: str, explicit: bool) -> Runtime:
    """Build at the requested precision (or each of auto's, best first); a reduced one must pass the gate."""
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
