"""A model folder as a Triton model repository, for the ``kserve`` runtime (``pacs-node models export-triton``).

Each graph becomes one Triton model and the backbone with its per-slice heads one ensemble, so a
batch of slices is one request and the backbone's features never leave the server::

    REPO/<model>__backbone/   the backbone graph            image -> tokens, cls, ...
    REPO/<model>__<head>/     each head graph               as in the model folder
    REPO/<model>/             the ensemble (slice2d models)  image -> head_<name> per slice head,
                                                             and the features series heads read

``backend`` is ``onnxruntime`` (a production Triton: the graphs run on its ONNX Runtime backend,
on the GPU) or ``python`` (each graph run by ONNX Runtime inside Triton's Python backend: for a
Triton built without the ONNX Runtime backend, such as the one in the ``nvidia-pytriton`` wheel the
tests start). Both write the same inputs, outputs and ensemble; only the backend differs.

Every model's config carries the SHA-256 of its graph (parameter ``pacs_node_graph_sha256``): the
``kserve`` runtime refuses a server whose graphs are not those of its model folder.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import onnxruntime as ort

from node.errors import ModelError
from node.model.engine_cache import file_sha256
from node.model.manifest import ModelSpec

DIGEST_KEY = "pacs_node_graph_sha256"
_TYPES = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
}


class TritonBackend(StrEnum):
    ONNXRUNTIME = "onnxruntime"
    PYTHON = "python"


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton's: FP32, INT64...
    dims: tuple[int, ...]  # -1 where the graph's axis is dynamic

    def pbtxt(self) -> str:
        return f'{{ name: "{self.name}" data_type: TYPE_{self.dtype} dims: [ {", ".join(map(str, self.dims))} ] }}'


@dataclass(frozen=True)
class Graph:
    """One ONNX graph of the model folder as Triton sees it."""

    file: Path
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    @classmethod
    def read(cls, file: Path) -> Graph:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # metadata only
        try:
            sess = ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise ModelError(f"cannot read {file}: {' '.join(str(e).split())}") from None

        def tensors(args) -> tuple[Tensor, ...]:
            out = []
            for a in args:
                if a.type not in _TYPES:
                    raise ModelError(f"{file}: {a.name} is {a.type}, which this export does not map")
                out.append(
                    Tensor(a.name, _TYPES[a.type], tuple(d if isinstance(d, int) else -1 for d in a.shape))
                )
            return tuple(out)

        return cls(file, tensors(sess.get_inputs()), tensors(sess.get_outputs()))


def triton_names(model: ModelSpec) -> dict[str, str]:
    """Graph file -> the Triton model that serves it; and the ensemble under the model's name."""
    names = {model.backbone.graph: f"{model.name}__backbone"} if model.backbone else {}
    names.update({h.graph: f"{model.name}__{h.name}" for h in model.heads})
    return names


def ensemble_outputs(model: ModelSpec) -> tuple[list[str], list[str]]:
    """What the ensemble answers: ``head_<name>`` for each per-slice head, and the backbone outputs
    the series-level heads read (the image they may also read is the client's own)."""
    slice_heads = [f"head_{h.name}" for h in model.heads if h.kind != "classification"]
    wanted = {i for h in model.heads if h.kind == "classification" for i in h.inputs}
    return slice_heads, [o for o in model.backbone.outputs if o in wanted]


def export(
    model: ModelSpec, out: Path, backend: TritonBackend = TritonBackend.ONNXRUNTIME, gpu: bool = True
) -> list[str]:
    """Write ``model``'s Triton repository into ``out`` (its models replaced, others kept); the
    names of the Triton models written."""
    names = triton_names(model)
    graphs = {g: Graph.read(model.graph(g)) for g in names}
    written = []
    for file, name in names.items():
        graph = graphs[file]
        folder = _fresh(out / name)
        shutil.copyfile(graph.file, folder / "1" / "model.onnx")
        if backend is TritonBackend.PYTHON:
            (folder / "1" / "model.py").write_text(PYTHON_MODEL)
        kind = "KIND_GPU" if gpu and backend is TritonBackend.ONNXRUNTIME else "KIND_CPU"
        (folder / "config.pbtxt").write_text(
            "\n".join([
                f'name: "{name}"',
                f'backend: "{backend}"',
                "max_batch_size: 0  # every request is already a batch: slices, a series or a 3D patch",
                _list("input", [t.pbtxt() for t in graph.inputs]),
                _list("output", [t.pbtxt() for t in graph.outputs]),
                f"instance_group [ {{ kind: {kind} count: 1 }} ]",
                _parameters({DIGEST_KEY: file_sha256(graph.file), "pacs_node_model": f"{model.name} {model.version}"}),
            ]) + "\n"
        )  # fmt: skip
        written.append(name)
    if model.backbone is not None:
        written.append(_ensemble(model, names, graphs, out))
    return written


def _ensemble(model: ModelSpec, names: dict[str, str], graphs: dict[str, Graph], out: Path) -> str:
    backbone = graphs[model.backbone.graph]
    by_name = {t.name: t for t in backbone.outputs}
    slice_heads, features = ensemble_outputs(model)
    heads = [h for h in model.heads if h.kind != "classification"]
    clash = {f"head_{h.name}" for h in heads} & set(by_name)
    if clash:
        raise ModelError(f"model {model.name}: backbone output {sorted(clash)[0]} clashes with a head's name")
    outputs = [Tensor(f"head_{h.name}", *_only(graphs[h.graph], h.name)) for h in heads]
    outputs += [by_name[f] for f in features]
    used = {i for h in heads for i in h.inputs} | set(features)
    steps = [_step(names[model.backbone.graph], {"image": "image"}, {o: o for o in by_name if o in used})]
    steps += [
        _step(names[h.graph], {i: i for i in h.inputs}, {graphs[h.graph].outputs[0].name: f"head_{h.name}"})
        for h in heads
    ]
    image = next(t for t in backbone.inputs if t.name == "image")
    folder = _fresh(out / model.name)  # an ensemble's version folder stays empty, but must exist
    (folder / "config.pbtxt").write_text(
        "\n".join([
            f'name: "{model.name}"',
            'platform: "ensemble"',
            "max_batch_size: 0",
            f"input [ {image.pbtxt()} ]",
            _list("output", [t.pbtxt() for t in outputs]),
            f"ensemble_scheduling {{ {_list('step', steps)} }}",
            _parameters({"pacs_node_model": f"{model.name} {model.version}"}),
        ]) + "\n"
    )  # fmt: skip
    return model.name


def _fresh(folder: Path) -> Path:
    """A Triton model's folder, emptied, with its version folder ``1``."""
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "1").mkdir(parents=True)
    return folder


def _only(graph: Graph, head: str) -> tuple[str, tuple[int, ...]]:
    if len(graph.outputs) != 1:
        raise ModelError(
            f"head {head}: a per-slice head graph has one output, {graph.file.name} has {len(graph.outputs)}"
        )
    return graph.outputs[0].dtype, graph.outputs[0].dims


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    maps = [f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items()]
    maps += [f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items()]
    return f'{{ model_name: "{model}" model_version: -1 {" ".join(maps)} }}'


def _list(key: str, items: list[str]) -> str:
    sep = ",\n  "
    return f"{key} [\n  {sep.join(items)}\n]"


def _parameters(values: dict[str, str]) -> str:
    return "\n".join(
        f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in values.items()
    )


# Triton's Python backend running the version folder's model.onnx with ONNX Runtime (CPU, or CUDA
# where onnxruntime-gpu is installed in the backend's Python)
PYTHON_MODEL = '''"""Written by pacs-node models export-triton: this folder's model.onnx on ONNX Runtime."""

from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.session = ort.InferenceSession(str(Path(__file__).with_name("model.onnx")), providers=ort.get_available_providers())
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
            results = self.session.run(self.outputs, feeds)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, r) for n, r in zip(self.outputs, results)]))
        return responses
'''
