"""Remote inference on a server speaking the KServe v2 protocol (NVIDIA Triton), over gRPC or HTTP.

The server holds the repository ``pacs-node models export-triton`` wrote from the same model folder
(:mod:`node.model.triton_repository`). Preprocessing, pooling and everything after inference stay
on the node, so the results are those of the local runtime: a batch of slices is one request to the
model's ensemble (backbone once, every per-slice head on its features, on the server); a series
head or a 3D patch is one request to its own Triton model.

Before its first request, and again after any failure, the runtime checks that the server serves
every graph of the model folder, by the SHA-256 the export wrote into each model's config: a server
serving another version is refused rather than used. A server that cannot answer is a
:class:`~node.errors.ServiceUnavailable`: the worker gives the job back and retries it later.

tritonclient is imported here only (the ``kserve`` extra).
"""

from __future__ import annotations

import importlib.util

import numpy as np

from node.errors import ModelError, ServiceUnavailable
from node.model.engine_cache import file_sha256
from node.model.manifest import HeadSpec, ModelSpec
from node.model.runtimes import BatchOutput, Runtime
from node.model.triton_repository import DIGEST_KEY, ensemble_outputs, triton_names
from node.timing import Stopwatch

_NUMPY = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16", np.dtype(np.int64): "INT64"}


def unavailable() -> str | None:
    if importlib.util.find_spec("tritonclient") is None:
        return "tritonclient is not installed (pip install 'pacs-node[kserve]')"
    return None


class KServeRuntime(Runtime):
    def __init__(self, model: ModelSpec, url: str, timeout_s: float = 120.0):
        super().__init__(model)
        if reason := unavailable():
            raise ModelError(f"runtime kserve: {reason}")
        protocol, _, address = url.partition("://")
        if protocol == "grpc":
            import tritonclient.grpc as client
        elif protocol == "http":
            import tritonclient.http as client
        else:
            raise ModelError(f"runtime kserve: {url!r} is neither grpc://host:port nor http://host:port")
        self._client_module = client
        if protocol == "grpc":  # gRPC takes its timeout per call and answers messages unless asked for JSON
            self._client = client.InferenceServerClient(address)
            self._timeout, self._json = {"client_timeout": timeout_s}, {"as_json": True}
        else:
            self._client = client.InferenceServerClient(
                address, connection_timeout=timeout_s, network_timeout=timeout_s
            )
            self._timeout, self._json = {}, {}
        self.url = url
        self.name, self.device = f"kserve-{protocol}", address
        self._names = triton_names(model)
        self._slice_outputs, self._features = ensemble_outputs(model) if model.backbone else ([], [])
        self._verified = False

    # --- the Runtime interface ---------------------------------------------------------------
    def infer(self, images: np.ndarray, clock: Stopwatch | None = None) -> BatchOutput:
        clock = clock or Stopwatch()
        with clock.part("remote"):  # backbone and heads run on the server, in one request
            out = self._request(self.model.name, {"image": images}, [*self._slice_outputs, *self._features])
        heads = {h.name: out[f"head_{h.name}"] for h in self.slice_heads}
        features = {k: out[k] for k in self._features}
        if "image" in self.series_inputs:
            features["image"] = images
        return BatchOutput(heads=heads, features=features)

    def classify(self, head: HeadSpec, features: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {k: features[k].astype(np.float32, copy=False) for k in head.graph_inputs}
        (out,) = self._request(self._names[head.graph], feeds).values()
        return out.ravel().astype(np.float64)

    def run_network(self, head: HeadSpec, patch: np.ndarray) -> np.ndarray:
        (out,) = self._request(self._names[head.graph], {"image": patch}).values()
        return out

    def encode(self, images: np.ndarray) -> None:
        self._request(self._names[self.model.backbone.graph], {"image": images})

    def warmup(self, batch: int | None = None) -> None:
        """Nothing to set up here; the server warms its own models (a worker must start while it is down)."""

    # --- the wire ------------------------------------------------------------------------------
    def _request(self, name: str, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict:
        """One inference request -> {output name: array}; the server unusable is ServiceUnavailable."""
        c = self._client_module
        if not self._verified:
            self._verify()
        inputs = []
        for k, v in feeds.items():
            v = np.ascontiguousarray(v)
            i = c.InferInput(k, list(v.shape), _NUMPY[v.dtype])
            i.set_data_from_numpy(v)
            inputs.append(i)
        asked = [c.InferRequestedOutput(o) for o in outputs] if outputs else None
        try:
            result = self._client.infer(name, inputs, outputs=asked, **self._timeout)
        except Exception as e:  # tritonclient's own exceptions, and the socket's
            self._verified = False
            raise ServiceUnavailable(f"kserve server {self.url}: model {name}: {_line(e)}") from None
        wanted = outputs or [o["name"] for o in result.get_response(**self._json)["outputs"]]
        return {o: result.as_numpy(o) for o in wanted}

    def _verify(self) -> None:
        """Every graph of the model folder is served, built from the same file (its SHA-256)."""
        for graph, name in self._names.items():
            try:
                config = self._client.get_model_config(name, **self._json)
            except Exception as e:  # tritonclient's own exceptions, and the socket's
                raise ServiceUnavailable(f"kserve server {self.url}: model {name}: {_line(e)}") from None
            served = (
                config.get("config", config).get("parameters", {}).get(DIGEST_KEY, {}).get("string_value")
            )
            if served != file_sha256(self.model.graph(graph)):
                raise ServiceUnavailable(
                    f"kserve server {self.url}: model {name} is not built from {self.model.graph(graph)}"
                    " (another version?): write the repository again with `pacs-node models export-triton`"
                )
        self._verified = True


def _line(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]
