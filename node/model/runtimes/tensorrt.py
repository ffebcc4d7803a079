"""TensorRT backend: one engine per graph, built from the ONNX graphs and cached on disk.

- Engines are built with the TensorRT Python API at a fixed in-plane size with one
  optimisation profile over the batch sizes the pipeline uses (1 .. the model's batch),
  in FP32 (TF32 off), FP16 or BF16; reduced precisions pass :mod:`node.model.gate` before use.
- The cache (:mod:`node.model.engine_cache`) is keyed by the ONNX hash, GPU name and compute
  capability, TensorRT version, precision and profile; a warm start only deserialises.
- Per batch the image is copied to the GPU once (from pinned host memory); the backbone's
  output buffers are bound directly as the heads' inputs, so features never leave the
  device; only head outputs (and the features series-level heads pool) come back.
- Series-level heads (one call per series over every slice's features) run on ONNX Runtime:
  their input length varies with the series and they cost microseconds.

Device memory and streams come from ``cuda-python`` (``pip install cuda-python``; part of
the ``gpu`` extra). NOTE: this module has not yet run on a GPU with TensorRT (none was
available while it was written); its CPU-side logic (selection, cache keys, refusals) is
tested, the build/execute path is owed a GPU test (see BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging

import numpy as np

from node.errors import ModelError
from node.model.engine_cache import EngineCache, EngineKey, Profile, file_sha256
from node.model.manifest import HeadSpec, ModelSpec
from node.model.runtimes import BatchOutput, Runtime
from node.timing import Stopwatch

log = logging.getLogger(__name__)
WORKSPACE_BYTES = 8 << 30


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def unavailable() -> str | None:
    """Why TensorRT cannot be used here, or None."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install tensorrt, GPU machines only)"
    if importlib.util.find_spec("cuda") is None:
        return "cuda-python is not installed (pip install cuda-python; TensorRT needs it for device memory)"
    try:
        err, count = _cudart().cudaGetDeviceCount()
    except Exception as e:  # pragma: no cover - needs the CUDA runtime
        return f"the CUDA runtime did not load ({e})"
    if int(err) != 0 or count == 0:  # pragma: no cover - needs the CUDA runtime
        return "no CUDA device"
    return None  # pragma: no cover - needs a GPU


def _check(result):  # pragma: no cover - needs a GPU
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def device_identity() -> tuple[str, str]:  # pragma: no cover - needs a GPU
    """(GPU name, compute capability) of device 0."""
    props = _check(_cudart().cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.strip("\x00 "), f"{props.major}.{props.minor}"


def engine_key(
    model: ModelSpec, graph: str, precision: str, profile: Profile, gpu: tuple[str, str]
) -> EngineKey:
    import tensorrt as trt

    return EngineKey(
        graph, file_sha256(model.graph(graph)), gpu[0], gpu[1], trt.__version__, precision, str(profile)
    )


def build_engine(onnx_path, precision: str, profile: Profile) -> bytes:  # pragma: no cover - needs a GPU
    """Parse an ONNX graph and build a serialised engine (every input's axis 0 is the batch)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    elif precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    opt = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        rest = list(t.shape)[1:]
        if any(d < 0 for d in rest):
            raise ModelError(
                f"{onnx_path}: input {t.name} has a dynamic axis besides the batch: {list(t.shape)}"
            )
        opt.set_shape(
            t.name, [profile.min_batch, *rest], [profile.opt_batch, *rest], [profile.max_batch, *rest]
        )
    config.add_optimization_profile(opt)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ModelError(f"TensorRT could not build {onnx_path} in {precision}")
    return bytes(engine)


def load_or_build(
    model: ModelSpec, graph: str, precision: str, profile: Profile, cache: EngineCache, gpu
) -> tuple[bytes, EngineKey, bool]:  # pragma: no cover - needs a GPU
    """The engine for ``graph`` from the cache, building (and storing) it on a miss."""
    key = engine_key(model, graph, precision, profile, gpu)
    data = cache.get(key)
    if data is not None:
        return data, key, False
    log.info("building TensorRT engine %s (%s, %s) on %s", graph, precision, profile, gpu[0])
    data = build_engine(model.graph(graph), precision, profile)
    cache.put(key, data)
    return data, key, True


def build_model(
    model: ModelSpec, precisions=("bf16", "fp16", "fp32"), cache: EngineCache | None = None
) -> list:
    """Build every engine of ``model`` (``pacs-node models build``); returns the cache paths."""
    if reason := unavailable():
        raise ModelError(f"cannot build TensorRT engines here: {reason}")
    cache = cache or EngineCache()  # pragma: no cover - needs a GPU
    gpu = device_identity()  # pragma: no cover
    out = []  # pragma: no cover
    for p in precisions:  # pragma: no cover
        for g in (model.backbone.graph, *(h.graph for h in model.heads if h.kind != "classification")):
            _, key, _ = load_or_build(model, g, p, _profile(model), cache, gpu)
            out.append(cache.path(key))
    return out  # pragma: no cover


def _profile(model: ModelSpec) -> Profile:
    b = model.backbone.batch
    return Profile(1, b, b, model.input.size)


class _Engine:  # pragma: no cover - needs a GPU
    """A deserialised engine with one execution context."""

    def __init__(self, trt_runtime, data: bytes):
        import tensorrt as trt

        self.engine = trt_runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise ModelError("TensorRT could not deserialise a cached engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.dtype = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}


class _Device:  # pragma: no cover - needs a GPU
    """Device and pinned host buffers, grown on demand and reused across batches."""

    def __init__(self):
        self.cudart = _cudart()
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.dev: dict[str, tuple[int, int]] = {}
        self.host: dict[str, tuple[int, np.ndarray]] = {}

    def buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.dev.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self.cudart.cudaFree(ptr))
            ptr = int(_check(self.cudart.cudaMalloc(nbytes)))
            self.dev[name] = (ptr, nbytes)
        return ptr

    def pinned(self, name: str, shape, dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        ptr, arr = self.host.get(name, (0, np.empty(0, np.uint8)))
        if arr.nbytes < nbytes:
            if ptr:
                _check(self.cudart.cudaFreeHost(ptr))
            ptr = int(_check(self.cudart.cudaMallocHost(nbytes)))
            arr = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))
            self.host[name] = (ptr, arr)
        return arr[:nbytes].view(dtype).reshape(shape)

    def upload(self, dst: int, src: np.ndarray) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(self.cudart.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, self.stream))

    def download(self, dst: np.ndarray, src: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(self.cudart.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, self.stream))

    def sync(self) -> None:
        _check(self.cudart.cudaStreamSynchronize(self.stream))


class TensorRTRuntime(Runtime):  # pragma: no cover - needs a GPU with TensorRT
    name = "tensorrt"
    device = "cuda:0"
    overlap = True

    def __init__(self, model: ModelSpec, precision: str = "fp16", cache: EngineCache | None = None):
        super().__init__(model)
        if reason := unavailable():
            raise ModelError(reason)
        import tensorrt as trt

        if precision == "auto":
            precision = "fp16"
        self.precision = precision
        self.cache = cache or EngineCache()
        self.gpu = device_identity()
        self.profile = _profile(model)
        self.keys: dict[str, EngineKey] = {}
        rt = trt.Runtime(trt.Logger(trt.Logger.WARNING))

        def engine(graph: str) -> _Engine:
            data, key, built = load_or_build(model, graph, precision, self.profile, self.cache, self.gpu)
            self.keys[graph] = key
            return _Engine(rt, data)

        self.backbone = engine(model.backbone.graph)
        self.heads = {h.name: engine(h.graph) for h in self.slice_heads}
        self.mem = _Device()
        from node.model.runtimes.onnxruntime import OnnxRuntime

        self._series = OnnxRuntime(model) if self.series_heads else None
        self.warmup()

    def _run_backbone(self, images: np.ndarray) -> tuple[int, dict[str, int]]:
        n = len(images)
        if n > self.profile.max_batch:
            raise ValueError(f"batch of {n} slices exceeds the engine profile {self.profile}")
        host = self.mem.pinned("image", images.shape, np.float32)
        host[...] = images
        ptrs = {"image": self.mem.buffer("image", host.nbytes)}
        self.mem.upload(ptrs["image"], host)
        e = self.backbone
        e.context.set_input_shape("image", images.shape)
        e.context.set_tensor_address("image", ptrs["image"])
        for o in e.outputs:
            shape = tuple(e.context.get_tensor_shape(o))
            ptrs[o] = self.mem.buffer(o, int(np.prod(shape)) * e.dtype[o].itemsize)
            e.context.set_tensor_address(o, ptrs[o])
        e.context.execute_async_v3(self.mem.stream)
        return n, ptrs

    def encode(self, images: np.ndarray) -> None:
        self._run_backbone(images)
        self.mem.sync()

    def infer(self, images: np.ndarray, clock: Stopwatch | None = None) -> BatchOutput:
        clock = clock or Stopwatch()
        with clock.part("backbone"):  # one stream wait per part, so each part's time is its own
            n, ptrs = self._run_backbone(images)
            self.mem.sync()
        shapes = {o: tuple(self.backbone.context.get_tensor_shape(o)) for o in self.backbone.outputs}
        shapes["image"] = images.shape
        heads = {}
        for h in self.slice_heads:
            with clock.part(f"head_{h.name}"):
                e = self.heads[h.name]
                for k in h.inputs:  # the backbone's device buffers, bound as they are
                    e.context.set_input_shape(k, shapes[k])
                    e.context.set_tensor_address(k, ptrs[k])
                out = e.outputs[0]
                shape = tuple(e.context.get_tensor_shape(out))
                ptr = self.mem.buffer(f"{h.name}:{out}", int(np.prod(shape)) * e.dtype[out].itemsize)
                e.context.set_tensor_address(out, ptr)
                e.context.execute_async_v3(self.mem.stream)
                host = self.mem.pinned(f"{h.name}:{out}", shape, e.dtype[out])
                self.mem.download(host, ptr)
                self.mem.sync()
                heads[h.name] = host.astype(np.float32, copy=True)
        feats = {}
        for k in self.series_inputs:
            host = self.mem.pinned(f"feat:{k}", shapes[k], self.backbone.dtype[k])
            self.mem.download(host, ptrs[k])
            feats[k] = host
        self.mem.sync()
        return BatchOutput(
            heads=heads, features={k: v.astype(np.float32, copy=True) for k, v in feats.items()}
        )

    def classify(self, head: HeadSpec, features: dict[str, np.ndarray]) -> np.ndarray:
        return self._series.classify(head, features)
