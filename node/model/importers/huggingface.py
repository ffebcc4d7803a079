"""Hugging Face DINOv2 / ViT backbones (Curia) and their classification heads -> a model folder.

The source is what a department downloads: ``config.json``, ``model.safetensors`` and
``preprocessor_config.json`` of a ``Dinov2Model`` (or ``ViTModel``), and one folder per head with
``config.json`` (``id2label``) and the classifier's weights, either ``model.safetensors``
(``classifier.weight``, ``classifier.bias``, as transformers saves ``Dinov2ForImageClassification``)
or ``head.pt`` as Curia's trainer writes it (``{"classifier": state_dict, "attention": ...}``).

What is written:

- ``backbone.onnx``: one-channel slices (N, 1, S, S) -> ``tokens`` (N, T, D), the patch tokens,
  and ``cls`` (N, D), the CLS token (``last_hidden_state[:, 0]``); dynamic batch;
- ``head_<name>.onnx`` per head: the series' mean feature (1, F) -> softmax over its classes;
- the ``torch.export`` twin (``.pt2``) of each graph, for the PyTorch backend;
  F = D reads the CLS token; F = 2 D reads the CLS token and the mean patch token side by side,
  as transformers' own ``Dinov2ForImageClassification`` does;
- ``model.yaml`` saying how the authors' processor prepares a slice (axial, rows P and columns L;
  raw HU or MR values; the whole slice resized to S x S with PyTorch's antialiased bicubic; CT
  optionally clipped below air; then a z-score per slice), and each head's coded classes;
- ``import.json``: where it came from (paths, file hashes), for the model card.

Everything is written into a temporary folder next to ``out`` and moved into place at the end, so a
failed import leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from node.errors import ModelError
from node.model.engine_cache import file_sha256
from node.model.importers import staged_model_folder
from node.model.importers.heads import SEGMENTATION, OwnHead, read_own_head

log = logging.getLogger(__name__)

BACKBONES = ("dinov2", "vit")
LOCAL_SCHEME = "99PACSNODE"  # labels without a code from --codes: clearly local, and said so
OPSET = 17


@dataclass(frozen=True)
class ImportedHead:
    name: str
    labels: tuple[str, ...]  # id2label, in index order
    reads: str  # cls | cls_meanpatch
    weight: np.ndarray  # (K, F)
    bias: np.ndarray  # (K,)


def _need_framework():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ModelError(
            f"models import needs PyTorch and transformers ({e.name} is missing): pip install 'pacs-node[import]'"
        ) from None
    return torch, transformers


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path.parent}: no {path.name} ({what})") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: unreadable {what} ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: {what} is not a JSON object")
    return data


def check_backbone(src: Path) -> dict:
    """The source's config.json, if it is a one-channel DINOv2/ViT folder with its weights."""
    if not src.is_dir():
        raise ModelError(f"{src}: not a folder")
    config = _read_json(src / "config.json", "the model's config")
    kind = config.get("model_type")
    if kind not in BACKBONES:
        raise ModelError(f"{src}: not a DINOv2/ViT model (config.json model_type {kind!r})")
    if not (src / "model.safetensors").exists():
        raise ModelError(f"{src}: no model.safetensors (the backbone's weights)")
    channels = int(config.get("num_channels", 3))
    if channels != 1:
        raise ModelError(
            f"{src}: the backbone takes {channels} input channels; the manifest feeds 1 (raw values, "
            "z-scored per slice): not supported"
        )
    return config


def read_head(folder: Path, hidden: int) -> ImportedHead | OwnHead:
    """One head folder: a Hugging Face classifier (its labels, the feature it reads, the linear
    weights), or one of pacs-node's own heads (``pacs_node_head`` in its config)."""
    config = _read_json(folder / "config.json", "the head's config with id2label")
    if "pacs_node_head" in config:
        return read_own_head(folder, config, hidden)
    id2label = config.get("id2label") or {}
    try:
        labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    except (ValueError, TypeError):
        raise ModelError(f"{folder / 'config.json'}: id2label keys must be class indices") from None
    if len(labels) < 2:
        raise ModelError(
            f"{folder / 'config.json'}: a classification head needs at least 2 labels in id2label"
        )
    weights = _head_weights(folder)
    w, b = weights["classifier.weight"], weights["classifier.bias"]
    if w.ndim != 2 or w.shape[0] != len(labels) or b.shape != (len(labels),):
        raise ModelError(
            f"{folder}: classifier weights {tuple(w.shape)} do not match {len(labels)} labels in id2label"
        )
    reads = {hidden: "cls", 2 * hidden: "cls_meanpatch"}.get(int(w.shape[1]))
    if reads is None:
        raise ModelError(
            f"{folder}: the classifier reads {w.shape[1]} features; the backbone gives {hidden} (CLS) "
            f"or {2 * hidden} (CLS and mean patch token)"
        )
    name = folder.name.removeprefix("head_").removeprefix("head-") or folder.name
    return ImportedHead(name, labels, reads, w.astype(np.float32), b.astype(np.float32))


def _head_weights(folder: Path) -> dict[str, np.ndarray]:
    torch, _ = _need_framework()
    if (folder / "model.safetensors").exists():
        from safetensors.numpy import load_file

        tensors = load_file(str(folder / "model.safetensors"))
        if not {"classifier.weight", "classifier.bias"} <= set(tensors):
            raise ModelError(f"{folder / 'model.safetensors'}: no classifier.weight and classifier.bias")
        return {k: tensors[k] for k in ("classifier.weight", "classifier.bias")}
    if (folder / "head.pt").exists():
        try:
            state = torch.load(folder / "head.pt", map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelError(f"{folder / 'head.pt'}: unreadable ({type(e).__name__})") from None
        if not isinstance(state, dict) or "classifier" not in state:
            raise ModelError(f"{folder / 'head.pt'}: no 'classifier' state dict")
        if state.get("attention"):
            raise ModelError(
                f"{folder / 'head.pt'}: an attention-pooled head; only mean-pooled linear heads are supported"
            )
        clf = state["classifier"]
        try:
            return {f"classifier.{k}": clf[k].detach().float().numpy() for k in ("weight", "bias")}
        except (KeyError, AttributeError):
            raise ModelError(f"{folder / 'head.pt'}: the classifier has no weight and bias tensors") from None
    raise ModelError(f"{folder}: no model.safetensors or head.pt (the classifier's weights)")


def read_codes(path: Path | None) -> dict:
    """``--codes`` YAML/JSON: ``{labels: {label: {value, scheme, meaning[, negative]}},
    findings: {head: {value, scheme, meaning}}}``."""
    if path is None:
        return {"labels": {}, "findings": {}}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ModelError(f"{path}: unreadable codes file ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: the codes file must map 'labels' and 'findings'")
    return {"labels": data.get("labels") or {}, "findings": data.get("findings") or {}}


def _code(entry, what: str) -> dict:
    if not isinstance(entry, dict) or not {"value", "meaning"} <= set(entry):
        raise ModelError(f"--codes: {what} needs value and meaning (and scheme, default SCT)")
    return {
        "value": str(entry["value"]),
        "scheme": str(entry.get("scheme", "SCT")),
        "meaning": str(entry["meaning"]),
    }


def _local(value: str, meaning: str) -> dict:
    return {"value": value[:16], "scheme": LOCAL_SCHEME, "meaning": meaning[:64]}


def head_manifest(head: ImportedHead, codes: dict, warn) -> dict:
    classes = []
    for i, label in enumerate(head.labels):
        entry = codes["labels"].get(label)
        if entry is None:
            warn(f"head {head.name}: label {label!r} has no code in --codes: a local code ({LOCAL_SCHEME})")
            code = _local(f"L-{head.name[:6]}-{i}", label)
            negative = False
        else:
            code = _code(entry, f"label {label!r}")
            negative = bool(entry.get("negative", False))
        classes.append({"index": i, "name": label, "code": code, "negative": negative})
    finding = codes["findings"].get(head.name)
    return {
        "name": head.name,
        "kind": "classification",
        "graph": f"head_{head.name}.onnx",
        "inputs": ["cls", "tokens"] if head.reads == "cls_meanpatch" else ["cls"],
        "reads": head.reads,
        "finding": _code(finding, f"finding of head {head.name!r}")
        if finding
        else _local(f"F-{head.name[:14]}", head.name.replace("_", " ")),
        "classes": classes,
        "outputs": ["sr"],
    }


def export_backbone(src: Path, out: Path, size: int) -> None:
    """The transformers model -> ONNX: (N, 1, S, S) -> tokens (N, T, D), cls (N, D), and its
    ``torch.export`` twin (``.pt2``) for the PyTorch backend (CUDA, bf16/fp16 behind the gate)."""
    torch, transformers = _need_framework()
    transformers.logging.set_verbosity_error()  # its load report and progress bars are not for ops
    transformers.logging.disable_progress_bar()
    try:
        model, info = transformers.AutoModel.from_pretrained(
            str(src), attn_implementation="eager", output_loading_info=True
        )
    except Exception as e:  # a corrupt or truncated checkpoint
        first = (str(e).splitlines() or [""])[0]
        raise ModelError(f"{src}: transformers cannot load it ({type(e).__name__}: {first})") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would initialise them at random: an import of noise
        raise ModelError(
            f"{src}: model.safetensors lacks {len(missing)} of the backbone's weights (e.g. {missing[0]}): "
            "not a backbone checkpoint"
        )
    model.eval()

    class Features(torch.nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def forward(self, image):
            h = self.backbone(pixel_values=image).last_hidden_state
            return h[:, 1:], h[:, 0]

    from node.model.runtimes.torch import export_program

    x = torch.zeros(2, 1, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks that are constant here
        torch.onnx.export(
            Features(model),
            (x,),
            str(out),
            input_names=["image"],
            output_names=["tokens", "cls"],
            dynamic_axes={"image": {0: "n"}, "tokens": {0: "n"}, "cls": {0: "n"}},
            opset_version=OPSET,
            dynamo=False,
        )
        n = torch.export.Dim("n", min=1, max=4096)
        export_program(Features(model), (x,), out.with_suffix(".pt2"), {"image": {0: n}})


def export_head(head: ImportedHead, out: Path) -> None:
    """The linear classifier + softmax as a two-node ONNX graph: features (1, F) -> probabilities (1, K)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, f = head.weight.shape
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["features", "W", "B"], ["logits"], transB=1),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        f"head_{head.name}",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, f])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, k])],
        [numpy_helper.from_array(head.weight, "W"), numpy_helper.from_array(head.bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    torch, _ = _need_framework()
    from node.model.runtimes.torch import export_program

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(f, k)
            self.linear.weight.data = torch.from_numpy(head.weight.copy())
            self.linear.bias.data = torch.from_numpy(head.bias.copy())

        def forward(self, features):
            return torch.softmax(self.linear(features), dim=1)

    export_program(Head(), (torch.zeros(1, f),), out.with_suffix(".pt2"))


def export_own_head(head: OwnHead, out: Path, hidden: int, patch: int, size: int) -> None:
    """One of pacs-node's heads -> ONNX and its ``.pt2`` twin: tokens (N, T, D) and slices (N, 1, S, S)
    -> class probabilities (N, K, S, S) (segmentation) or one probability per slice (N,) (presence)."""
    torch, _ = _need_framework()
    from node.model.runtimes.torch import export_program

    module = head.module(hidden, patch)
    args = (torch.zeros(2, (size // patch) ** 2, hidden), torch.zeros(2, 1, size, size))
    names, output = (
        ["tokens", "image"],
        "probabilities" if head.architecture == SEGMENTATION else "probability",
    )
    dynamic = {k: {0: "n"} for k in (*names, output)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(out), input_names=names, output_names=[output], dynamic_axes=dynamic,
            opset_version=OPSET, dynamo=False,
        )  # fmt: skip
        n = torch.export.Dim("n", min=1, max=4096)
        export_program(module, args, out.with_suffix(".pt2"), {k: {0: n} for k in names})


def import_huggingface(
    src: Path,
    out: Path,
    heads: list[Path] = (),
    codes: Path | None = None,
    name: str | None = None,
    version: str = "1.0.0",
    warn=log.warning,
    description: str | None = None,
    batch: int = 8,
) -> Path:
    """Import ``src`` (and ``heads``) into the model folder ``out``; returns ``out``."""
    src, out = Path(src), Path(out)
    config = check_backbone(src)
    hidden = int(config["hidden_size"])
    size = int(config.get("image_size", 224))
    processor = (
        _read_json(src / "preprocessor_config.json", "the image processor's config")
        if (src / "preprocessor_config.json").exists()
        else {}
    )
    code_map = read_codes(codes)
    imported = [read_head(Path(h), hidden) for h in heads]
    names = [h.name for h in imported]
    if len(set(names)) != len(names):
        raise ModelError(f"head folders must have distinct names, got {names}")
    with staged_model_folder(out) as tmp:
        export_backbone(src, tmp / "backbone.onnx", size)
        patch = int(config.get("patch_size", 16))
        for h in imported:
            if isinstance(h, OwnHead):
                export_own_head(h, tmp / f"head_{h.name}.onnx", hidden, patch, size)
            else:
                export_head(h, tmp / f"head_{h.name}.onnx")
        clip = processor.get("clip_below_air")
        manifest = {
            "name": name or src.name,
            "version": version,
            "description": description
            or f"imported from {src.name} ({config['model_type']}, hidden {hidden}, "
            f"patch {config.get('patch_size')}, {size}x{size}, one channel)",
            "modalities": ["CT", "MR"],
            "input": {
                "kind": "slice2d",
                "size": size,
                "orientation": "axial",
                "geometry": "resize",
                "interpolation": "bicubic_antialias",
                "channels": 1,
                "intensity": {
                    "kind": "zscore",
                    "clip_below": -1000.0 if clip else None,
                    "eps": float(processor.get("eps", 1e-6)),
                },
            },
            "backbone": {"graph": "backbone.onnx", "batch": batch, "outputs": ["tokens", "cls"]},
            "heads": [
                h.manifest() if isinstance(h, OwnHead) else head_manifest(h, code_map, warn) for h in imported
            ],
        }
        (tmp / "model.yaml").write_text(
            "# written by `pacs-node models import`: the authors' preprocessing, said explicitly\n"
            + yaml.safe_dump(manifest, sort_keys=False)
        )
        provenance = {
            "source": str(src.resolve()),
            "format": config["model_type"],
            "files": {p.name: file_sha256(p) for p in (src / "model.safetensors", src / "config.json")},
            "heads": {h.name: str(Path(p).resolve()) for h, p in zip(imported, heads, strict=True)},
            "preprocessor_config": processor,
        }
        (tmp / "import.json").write_text(json.dumps(provenance, indent=2))
    return out
