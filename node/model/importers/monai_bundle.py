"""MONAI bundles -> a 3D model folder (``patch3d``).

The source is a bundle as MONAI's model zoo ships it: ``configs/metadata.json``,
``configs/inference.json`` (or ``.yaml``) and ``models/model.pt`` (a state dict) or
``models/model.ts`` (TorchScript). MONAI's own ``ConfigParser`` builds the network from its
``network_def`` (import time only) and the weights are loaded into it; the ONNX graph takes the
node's (Z, Y, X) patch and gives MONAI's network its (X, Y, Z) order. The manifest states what the
bundle's transforms do, in the order they do it:

- ``Orientationd`` (the network's axes), ``Spacingd`` (its grid, MONAI's: ``resampling.grid:
  monai``), ``ScaleIntensityRanged`` or ``NormalizeIntensityd`` (before or after ``Spacingd``);
- ``SlidingWindowInferer``'s ROI, overlap, mode and sigma (``tiling: monai``);
- the post-processing: softmax, ``Invertd`` (what is interpolated back to the source grid), arg-max;
- the labels from the metadata's ``channel_def``, coded as the nnU-Net importer codes them.

A transform the node does not implement is refused by name, never skipped; ``LoadImaged``,
``EnsureChannelFirstd``, ``EnsureTyped``/``ToTensord`` and ``SaveImaged`` do nothing the node must copy.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from node.errors import ModelError
from node.model.engine_cache import file_sha256
from node.model.importers import staged_model_folder
from node.model.importers.huggingface import OPSET, _read_json, read_codes
from node.model.importers.nnunet import _head_name, label_manifest, totalsegmentator_codes
from node.model.manifest import axes_valid

WEIGHTS = ("models/model.pt", "models/model.ts")
CONFIGS = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
# transforms that change nothing the node must reproduce: reading the file, the channel axis, types
PASSIVE = {
    "LoadImaged",
    "LoadImage",
    "EnsureChannelFirstd",
    "EnsureChannelFirst",
    "AddChanneld",
    "EnsureTyped",
    "EnsureType",
    "ToTensord",
    "ToTensor",
}
SPACING_MODES = {"bilinear": 1, "nearest": 0}
SPACING_DEFAULTS = {  # Spacingd's arguments the node supports: their defaults only
    "padding_mode": ("border",),
    "align_corners": (False,),
    "scale_extent": (False,),
    "min_pixdim": (None,),
    "max_pixdim": (None,),
}


def is_monai_bundle(src: Path) -> bool:
    src = Path(src)
    return (src / "configs" / "metadata.json").exists() and any((src / c).exists() for c in CONFIGS)


@dataclass(frozen=True)
class Bundle:
    """One MONAI bundle, its network restored by MONAI itself."""

    src: Path
    name: str
    network: object  # the torch module, weights loaded, in eval mode
    weights: Path
    labels: dict[int, str]  # output channel -> channel_def name (background left out)
    input: dict  # the manifest's input section
    modality: str


def _need_monai():
    try:
        import torch
        from monai.bundle import ConfigParser
    except ImportError as e:
        raise ModelError(
            f"models import of a MONAI bundle needs PyTorch and monai ({e.name} is missing): pip install 'pacs-node[import]'"
        ) from None
    return torch, ConfigParser


class _Transforms:
    """One Compose of the bundle's config: each transform's name and its arguments, resolved by
    MONAI's parser (references and expressions included) only when read."""

    def __init__(self, parser, key: str, src: Path):
        self.parser, self.src = parser, src
        item = parser.get(key)
        if isinstance(item, str) and item.startswith("@"):
            key, item = item[1:], parser.get(item[1:])
        if isinstance(item, dict) and str(item.get("_target_", "")).endswith("Compose"):
            key, item = f"{key}#transforms", item.get("transforms")
        if not isinstance(item, list):
            raise ModelError(f"{src}: {key} is not a list of transforms (or a Compose of them)")
        self.key = key
        self.items = [
            (i, _name(t)) for i, t in enumerate(item) if not (isinstance(t, dict) and t.get("_disabled_"))
        ]
        self.raw = item

    def arg(self, i: int, name: str, default=None):
        if not isinstance(self.raw[i], dict) or name not in self.raw[i]:
            return default
        return self.parser.get_parsed_content(f"{self.key}#{i}#{name}")


def _name(t) -> str:
    target = t.get("_target_", "") if isinstance(t, dict) else ""
    return str(target).split("(")[0].rsplit(".", 1)[-1] or repr(t)[:40]


def _refuse(src: Path, where: str, name: str, why: str = "") -> ModelError:
    return ModelError(
        f"{src}: {where} transform {name} is not supported{f' ({why})' if why else ''}; the node does not skip it"
    )


def _three(src: Path, what: str, value, kind=float) -> list:
    values = list(value) if isinstance(value, list | tuple) else [value] * 3
    if len(values) != 3 or any(v is None or kind(v) <= 0 for v in values):
        raise ModelError(f"{src}: {what} {value}: three positive values (x, y, z) expected")
    return [kind(v) for v in values]


def _one(src: Path, what: str, value) -> float:
    """One value for all three axes (the node's spec has one)."""
    values = set(value) if isinstance(value, list | tuple) else {value}
    if len(values) != 1:
        raise ModelError(f"{src}: {what} {value}: different values per axis are not supported")
    return float(values.pop())


def _preprocessing(parser, src: Path) -> dict:
    """Orientation, grid and intensity from the ``preprocessing`` transforms."""
    t = _Transforms(parser, "preprocessing", src)
    found: dict = {}
    for i, name in t.items:
        if name in PASSIVE:
            continue
        if name == "Orientationd":
            axcodes = str(t.arg(i, "axcodes", "")).upper()
            if not axes_valid(axcodes) or t.arg(i, "as_closest_canonical", False):
                raise _refuse(src, "preprocessing", name, f"axcodes {axcodes or 'none'}: three of RAS/LPI")
            if "spacing" in found:
                raise _refuse(
                    src, "preprocessing", name, "after Spacingd: pixdim would follow the file's axes"
                )
            found["axes"] = axcodes
        elif name == "Spacingd":
            mode = t.arg(i, "mode", "bilinear")
            mode = mode[0] if isinstance(mode, list | tuple) else mode
            bad = [] if mode in SPACING_MODES else [f"mode {mode}"]
            for key, allowed in SPACING_DEFAULTS.items():  # what would move the grid or its values
                value = t.arg(i, key, allowed[0])
                per_key = key in ("padding_mode", "align_corners")  # one per key: the image's is the first
                value = value[0] if per_key and isinstance(value, list | tuple) else value
                if value not in allowed:
                    bad.append(f"{key} {value}")
            if bad:
                raise _refuse(src, "preprocessing", name, ", ".join(bad))
            found["spacing"] = _three(src, "Spacingd pixdim", t.arg(i, "pixdim"))
            found["data_order"] = SPACING_MODES[mode]
        elif name in ("ScaleIntensityRanged", "NormalizeIntensityd"):
            if "intensity" in found:
                raise _refuse(src, "preprocessing", name, "a second intensity transform")
            found["normalise_first"] = "spacing" not in found
            if name == "ScaleIntensityRanged":
                scale = {k: t.arg(i, k) for k in ("a_min", "a_max", "b_min", "b_max")}
                if any(v is None for v in scale.values()) or scale["a_min"] == scale["a_max"]:
                    raise _refuse(
                        src,
                        "preprocessing",
                        name,
                        "a_min, a_max, b_min and b_max must be set, a_min != a_max",
                    )
                scale = {k: float(v) for k, v in scale.items()}
                found["intensity"] = {
                    "kind": "range",
                    "scale": {**scale, "clip": bool(t.arg(i, "clip", False))},
                }
            else:
                if t.arg(i, "subtrahend") is not None or t.arg(i, "divisor") is not None:
                    raise _refuse(src, "preprocessing", name, "fixed subtrahend/divisor")
                # channel_wise: one channel, so the same statistics either way
                found["intensity"] = {"kind": "volume_zscore", "nonzero": bool(t.arg(i, "nonzero", False))}
        elif name == "CropForegroundd":
            raise _refuse(
                src, "preprocessing", name, "the network's grid would depend on a foreground threshold"
            )
        else:
            raise _refuse(src, "preprocessing", name)
    for key, what in (
        ("axes", "Orientationd"),
        ("spacing", "Spacingd"),
        ("intensity", "an intensity transform"),
    ):
        if key not in found:
            raise ModelError(
                f"{src}: preprocessing has no {what} (ScaleIntensityRanged or NormalizeIntensityd)"
                if key == "intensity"
                else f"{src}: preprocessing has no {what}: the network's "
                + ("axes would be the file's" if key == "axes" else "grid would be the series' own")
            )
    return found


def _inferer(parser, src: Path) -> dict:
    item = parser.get("inferer")
    if item is None:
        raise ModelError(f"{src}: inference config has no inferer")
    name = _name(item)
    if name != "SlidingWindowInferer":
        raise ModelError(f"{src}: inferer {name} is not supported (SlidingWindowInferer)")

    def arg(k, default=None):
        return parser.get_parsed_content(f"inferer#{k}") if k in item else default

    mode = str(arg("mode", "constant"))
    if mode not in ("constant", "gaussian"):
        raise ModelError(f"{src}: SlidingWindowInferer mode {mode} is not supported (constant, gaussian)")
    if str(arg("padding_mode", "constant")) != "constant" or float(arg("cval", 0.0)) != 0.0:
        raise ModelError(f"{src}: SlidingWindowInferer padding other than constant 0 is not supported")
    overlap = _one(src, "SlidingWindowInferer overlap", arg("overlap", 0.25))
    if not 0 <= overlap < 1:
        raise ModelError(f"{src}: SlidingWindowInferer overlap {overlap}: 0 <= overlap < 1")
    return {
        "roi": _three(src, "SlidingWindowInferer roi_size", arg("roi_size"), int),
        "step": 1.0 - overlap,
        "gaussian": mode == "gaussian",
        "sigma_scale": _one(src, "SlidingWindowInferer sigma_scale", arg("sigma_scale", 0.125)),
    }


def _postprocessing(parser, src: Path, data_order: int) -> dict:
    """What comes back to the source grid, and how: Invertd's interpolation of logits, probabilities
    (after a softmax) or labels (after the arg-max, or nearest)."""
    if parser.get("postprocessing") is None:
        raise ModelError(f"{src}: inference config has no postprocessing (the arg-max to labels)")
    t = _Transforms(parser, "postprocessing", src)
    state, back = "logits", None
    for i, name in t.items:
        if name in PASSIVE or name == "SaveImaged":
            continue
        if name == "Activationsd":
            if not t.arg(i, "softmax", False) or t.arg(i, "sigmoid", False) or t.arg(i, "other") is not None:
                raise _refuse(src, "postprocessing", name, "softmax only")
            state = "probabilities" if state == "logits" else state
        elif name == "AsDiscreted":
            extra = [k for k in ("to_onehot", "threshold", "rounding") if t.arg(i, k) not in (None, False)]
            if not t.arg(i, "argmax", False) or extra:
                raise _refuse(src, "postprocessing", name, "argmax only")
            state = "labels"
        elif name == "Invertd":
            nearest = bool(t.arg(i, "nearest_interp", True)) or data_order == 0
            if state == "labels" and not nearest:
                raise _refuse(src, "postprocessing", name, "interpolating label indices linearly")
            back = (state, 0 if nearest or state == "labels" else 1)
        else:
            raise _refuse(src, "postprocessing", name)
    if state != "labels":
        raise ModelError(f"{src}: postprocessing has no AsDiscreted(argmax): its output is not a label map")
    # no Invertd: MONAI's labels stay on its own grid; the node puts them on the source's, nearest
    state, order = back or ("labels", 0)
    return {"interpolate": "probabilities" if state == "probabilities" else "logits", "logits_order": order}


def _modality(meta: dict, src: Path) -> str:
    inputs = (meta.get("network_data_format") or {}).get("inputs") or {}
    if len(inputs) != 1:
        raise ModelError(
            f"{src}: the network takes {len(inputs)} inputs (metadata.json); the node feeds one series"
        )
    first = next(iter(inputs.values()))
    if int(first.get("num_channels", 1)) != 1:
        raise ModelError(
            f"{src}: the network takes {first.get('num_channels')} input channels; the node feeds one series"
        )
    modality = str(first.get("modality", "")).upper()
    if modality in ("CT", "MR", "MRI"):
        return modality[:2]
    if str(first.get("format", "")).lower() == "hounsfield":
        return "CT"
    raise ModelError(f"{src}: metadata.json does not say CT or MR (inputs modality or format hounsfield)")


def _labels(meta: dict, src: Path) -> dict[int, str]:
    outputs = (meta.get("network_data_format") or {}).get("outputs") or {}
    channels = (next(iter(outputs.values()), {}) or {}).get("channel_def") or {}
    try:
        labels = {int(k): str(v) for k, v in channels.items()}
    except (TypeError, ValueError):
        raise ModelError(
            f"{src}: metadata.json outputs channel_def must map channel numbers to names"
        ) from None
    if not labels or set(labels) != set(range(len(labels))):
        raise ModelError(
            f"{src}: metadata.json outputs channel_def must name channels 0..K-1, got {sorted(labels)}"
        )
    return {k: v for k, v in labels.items() if k > 0}


def _network(parser, src: Path, torch):
    """The network with its weights: network_def and model.pt, or model.ts whole."""
    weights = next((src / w for w in WEIGHTS if (src / w).exists()), None)
    if weights is None:
        raise ModelError(f"{src}: no weights ({' or '.join(WEIGHTS)})")
    try:
        if weights.suffix == ".ts":
            return torch.jit.load(str(weights), map_location="cpu").eval(), weights
        if parser.get("network_def") is None:
            raise ModelError(f"{src}: inference config has no network_def to load {weights.name} into")
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            net = parser.get_parsed_content("network_def")
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(
            state.get("model"), dict
        ):  # CheckpointSaver's {"model": ...}
            state = state["model"]
        net.load_state_dict(state)
    except ModelError:
        raise
    except RuntimeError as e:  # load_state_dict: not the network network_def describes
        first = (str(e).splitlines() or [""])[0]
        raise ModelError(f"{src}: {weights.name} does not match network_def ({first})") from None
    except Exception as e:  # the parser instantiates arbitrary classes: any failure is the bundle's
        raise ModelError(
            f"{src}: MONAI cannot build it ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    return net.eval(), weights


def read_bundle(src: Path, name: str | None = None) -> Bundle:
    """Restore ``src`` with MONAI and translate its inference config into the manifest's terms."""
    src = Path(src)
    if not is_monai_bundle(src):
        raise ModelError(f"{src}: not a MONAI bundle (configs/metadata.json and configs/inference.json)")
    meta = _read_json(src / "configs" / "metadata.json", "MONAI bundle metadata")
    modality, labels = _modality(meta, src), _labels(meta, src)
    torch, ConfigParser = _need_monai()
    config = next(src / c for c in CONFIGS if (src / c).exists())
    parser = ConfigParser()
    try:
        parser.read_config(str(config))
    except Exception as e:
        raise ModelError(
            f"{config}: MONAI cannot read it ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    parser["bundle_root"] = str(src)
    pre = _preprocessing(parser, src)
    inferer = _inferer(parser, src)
    post = _postprocessing(parser, src, pre["data_order"])
    net, weights = _network(parser, src, torch)
    roi = inferer["roi"]
    with torch.no_grad():  # the network answers a patch with one channel per channel_def entry
        try:
            out = net(torch.zeros(1, 1, *roi))
        except Exception as e:
            raise ModelError(f"{src}: the network cannot run a {roi} patch ({type(e).__name__})") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, len(labels) + 1, *roi):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"{src}: the network gives {shape} for a {roi} patch; metadata.json names {len(labels) + 1} channels"
        )
    return Bundle(
        src=src,
        name=_head_name(name or str(meta.get("name") or src.name)),
        network=net,
        weights=weights,
        labels=labels,
        modality=modality,
        input={
            "kind": "patch3d",
            "volume": {
                "axes": pre["axes"],
                "spacing": pre["spacing"][::-1],  # MONAI's (x, y, z) -> the node's (Z, Y, X)
                "patch": roi[::-1],
                "step": inferer["step"],
                "mirror_axes": [],
                "gaussian": inferer["gaussian"],
                "resampling": {"grid": "monai", "data_order": pre["data_order"], **post},
                "tiling": "monai",
                "sigma_scale": inferer["sigma_scale"],
                "crop_nonzero": False,
                "normalise_first": pre["normalise_first"],
            },
            "intensity": pre["intensity"],
        },
    )


def export_bundle(bundle: Bundle, out: Path) -> None:
    """image (N, 1, Z, Y, X) -> logits (N, K, Z, Y, X): MONAI's network on its (X, Y, Z) arrays."""
    torch, _ = _need_monai()

    class ZYX(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.net(image.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)

    x = torch.zeros(1, 1, *bundle.input["volume"]["patch"])
    wrapped = ZYX(bundle.network).eval()
    if isinstance(bundle.network, torch.jit.ScriptModule):  # a trace cannot enter a scripted module
        wrapped = torch.jit.script(wrapped)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (x,),
            str(out),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


def import_monai_bundle(
    src: Path,
    out: Path,
    codes: Path | None = None,
    name: str | None = None,
    version: str = "1.0.0",
    warn=print,
) -> Path:
    """Import the MONAI bundle ``src`` into the model folder ``out`` (one 3D head)."""
    src, out = Path(src), Path(out)
    bundle = read_bundle(src)
    labels = label_manifest(bundle, read_codes(codes), totalsegmentator_codes(), warn)
    with staged_model_folder(out) as tmp:
        export_bundle(bundle, tmp / f"{bundle.name}.onnx")
        manifest = {
            "name": name or bundle.name,
            "version": version,
            "description": f"imported from the MONAI bundle {bundle.src.name} ({bundle.weights.name})",
            "modalities": [bundle.modality],
            "input": bundle.input,
            "heads": [
                {
                    "name": bundle.name,
                    "kind": "segmentation",
                    "graph": f"{bundle.name}.onnx",
                    "inputs": ["image"],
                    "labels": labels,
                    "outputs": ["seg", "sr"],
                }
            ],
        }
        (tmp / "model.yaml").write_text(
            "# written by `pacs-node models import` from a MONAI bundle: what its transforms and inferer do\n"
            + yaml.safe_dump(manifest, sort_keys=False)
        )
        files = [src / "configs" / "metadata.json", *(p for p in (src / c for c in CONFIGS) if p.exists())]
        provenance = {
            "format": "monai-bundle",
            "path": str(bundle.src.resolve()),
            "files": {str(p.relative_to(src)): file_sha256(p) for p in (*files, bundle.weights)},
        }
        (tmp / "import.json").write_text(json.dumps(provenance, indent=2))
    return out
