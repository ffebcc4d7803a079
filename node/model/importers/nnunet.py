"""nnU-Net v2 results folders (TotalSegmentator's among them) -> a 3D model folder (``patch3d``).

The source is a trained model folder as nnU-Net writes it and TotalSegmentator downloads it:
``plans.json``, ``dataset.json`` and ``fold_*/checkpoint_final.pth``. nnU-Net's own
``nnUNetPredictor`` restores the network (import time only), so the weights are loaded exactly as
the framework loads them; the folds are averaged inside one ONNX graph (nnU-Net averages their
logits). The manifest states what nnU-Net does implicitly:

- the network's spacing, patch, tile step and mirroring axes (from the plans and the checkpoint);
- its normalisation with the dataset's statistics (``CTNormalization``: the foreground's 0.5 and
  99.5 percentiles, mean and standard deviation; ``ZScoreNormalization``: the image's own);
- its resampling (spline orders, the separate anisotropic axis);
- the axes of the images it was trained on (``--axes``; nnU-Net reads images with SimpleITK and
  never reorients, so the node must give the network the orientation it learnt; TotalSegmentator
  trains on nibabel-canonical, RAS, images), folded with the plans' ``transpose_forward``;
- the labels from ``dataset.json``, coded from TotalSegmentator's SNOMED CT mapping shipped in
  ``models/codes`` or ``--codes``; a label neither knows gets a clearly local code and a warning.

Several sources go into one model folder, one head each (TotalSegmentator's five "total" parts:
one SEG, one SR), when they share their preprocessing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from node.errors import ModelError
from node.model.engine_cache import file_sha256
from node.model.importers import staged_model_folder
from node.model.importers.huggingface import LOCAL_SCHEME, OPSET, _read_json, read_codes
from node.model.manifest import axes_valid

CODES_DIR = Path(__file__).resolve().parents[3] / "models" / "codes"
TOTALSEGMENTATOR_CODES = CODES_DIR / "totalsegmentator_snomed_mapping.csv"
CHECKPOINT = "checkpoint_final.pth"
_RESAMPLING = "resample_data_or_seg_to_shape"


def is_nnunet(src: Path) -> bool:
    return (src / "plans.json").exists() and (src / "dataset.json").exists()


@dataclass(frozen=True)
class Network:
    """One nnU-Net results folder, restored by nnU-Net itself."""

    src: Path
    name: str
    predictor: object  # nnunetv2's nnUNetPredictor, initialised with every fold
    folds: tuple[str, ...]
    labels: dict[int, str]  # output channel -> dataset.json label name (background left out)
    input: dict  # the manifest's input section; equal across the sources of one model


def _need_nnunet():
    try:
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    except ImportError as e:
        raise ModelError(
            f"models import of nnU-Net needs PyTorch and nnunetv2 ({e.name} is missing): pip install 'pacs-node[import]'"
        ) from None
    return torch, nnUNetPredictor


def _folds(src: Path) -> tuple[str, ...]:
    folds = tuple(sorted(p.parent.name.removeprefix("fold_") for p in src.glob(f"fold_*/{CHECKPOINT}")))
    if not folds:
        present = sorted(p.name for p in src.glob("fold_*"))
        raise ModelError(
            f"{src}: no fold_*/{CHECKPOINT}"
            + (f" (fold folders {', '.join(present)} hold no final checkpoint)" if present else "")
        )
    return folds


def read_network(src: Path, axes: str, name: str | None = None) -> Network:
    """Restore ``src`` with nnU-Net and translate its plans into the manifest's terms."""
    src = Path(src)
    _read_json(src / "plans.json", "nnU-Net plans")  # readable, or one line saying so
    dataset = _read_json(src / "dataset.json", "nnU-Net dataset description")
    folds = _folds(src)
    channels = dataset.get("channel_names") or dataset.get("modality") or {}
    if len(channels) != 1:
        raise ModelError(
            f"{src}: the network takes {len(channels)} input channels; the node feeds one series"
        )
    labels = dataset.get("labels") or {}
    regions = [k for k, v in labels.items() if isinstance(v, list | tuple)]
    if regions:
        raise ModelError(f"{src}: region-based labels ({regions[0]}...) are not supported")
    torch, nnUNetPredictor = _need_nnunet()
    quiet = contextlib.redirect_stdout(io.StringIO())  # nnU-Net prints its CPU notice and fold list
    with quiet:
        predictor = nnUNetPredictor(
            tile_step_size=0.5,
            use_gaussian=True,
            use_mirroring=True,
            perform_everything_on_device=False,
            device=torch.device("cpu"),
            allow_tqdm=False,
        )
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            predictor.initialize_from_trained_model_folder(str(src), use_folds=[_fold(f) for f in folds])
        for params in predictor.list_of_parameters:
            predictor.network.load_state_dict(params)
    except RuntimeError as e:  # load_state_dict: the checkpoint is not the network its plans describe
        first = (str(e).splitlines() or [""])[0]
        raise ModelError(
            f"{src}: the checkpoint does not match the network its plans describe ({first})"
        ) from None
    except (KeyError, ValueError, AttributeError, TypeError, OSError) as e:
        raise ModelError(f"{src}: nnU-Net cannot restore it ({type(e).__name__}: {e})") from None
    cm = predictor.configuration_manager
    if len(cm.patch_size) != 3:
        raise ModelError(f"{src}: a {len(cm.patch_size)}D configuration; the node runs nnU-Net's 3D ones")
    scheme = cm.normalization_schemes[0]
    stats = predictor.plans_manager.foreground_intensity_properties_per_channel.get("0", {})
    if scheme == "CTNormalization":
        intensity = {
            "kind": "dataset",
            "clip": [float(stats["percentile_00_5"]), float(stats["percentile_99_5"])],
            "mean": float(stats["mean"]),
            "std": float(max(stats["std"], 1e-8)),
        }
    elif scheme == "ZScoreNormalization" and not cm.use_mask_for_norm[0]:
        intensity = {"kind": "volume_zscore"}
    else:
        masked = " with use_mask_for_norm" if scheme == "ZScoreNormalization" else ""
        raise ModelError(
            f"{src}: normalisation {scheme}{masked} is not supported (CTNormalization, ZScoreNormalization)"
        )
    plan = cm.configuration
    for what in ("data", "probabilities"):
        fn = plan.get(f"resampling_fn_{what}")
        if fn != _RESAMPLING:
            raise ModelError(f"{src}: resampling {fn} is not supported ({_RESAMPLING})")
    data_kw, logits_kw = plan["resampling_fn_data_kwargs"], plan["resampling_fn_probabilities_kwargs"]
    mirror = predictor.allowed_mirroring_axes or ()
    modality = next(iter(channels.values()))
    modalities = ["CT"] if str(modality).upper() == "CT" else ["MR"]
    return Network(
        src=src,
        name=_head_name(name or dataset.get("name") or src.parent.name or src.name),
        predictor=predictor,
        folds=folds,
        labels={int(v): k for k, v in labels.items() if int(v) > 0 and k != "ignore"},
        input={
            "kind": "patch3d",
            "volume": {
                "axes": network_axes(axes, predictor.plans_manager.transpose_forward),
                "spacing": [float(s) for s in cm.spacing],
                "patch": [int(p) for p in cm.patch_size],
                "step": 0.5,
                "mirror_axes": [int(a) for a in mirror],
                "gaussian": True,
                "resampling": {
                    "data_order": int(data_kw.get("order", 3)),
                    "logits_order": int(logits_kw.get("order", 1)),
                    "order_z": int(data_kw.get("order_z", 0)),
                    "force_separate_z": data_kw.get("force_separate_z"),
                },
            },
            "intensity": intensity,
            "modalities": modalities,
        },
    )


def _fold(f: str) -> int | str:
    return int(f) if f.isdigit() else f


def _head_name(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:48] or "network"


def network_axes(image_axes: str, transpose_forward) -> str:
    """The directions of the network array's x, y, z, from the training images' (SimpleITK order) and
    nnU-Net's ``transpose_forward`` (a permutation of the numpy axes (z, y, x))."""
    image_axes = image_axes.upper()
    if not axes_valid(image_axes):
        raise ModelError(f"--axes {image_axes}: three of L/R, A/P, S/I, one of each pair (e.g. RAS, LPS)")
    numpy_dirs = image_axes[::-1]  # numpy's (z, y, x)
    return "".join(numpy_dirs[t] for t in transpose_forward)[::-1]


def export_network(net: Network, out: Path) -> None:
    """The folds' networks, averaged, as one ONNX graph: image (1, 1, *patch) -> logits (1, K, *patch)."""
    torch, _ = _need_nnunet()
    import copy

    modules = []
    for params in net.predictor.list_of_parameters:
        m = copy.deepcopy(net.predictor.network)
        m.load_state_dict(params)
        modules.append(m.eval())

    class Folds(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.folds = torch.nn.ModuleList(modules)

        def forward(self, image):
            out = self.folds[0](image)
            for m in self.folds[1:]:
                out = out + m(image)
            return out / len(self.folds) if len(self.folds) > 1 else out

    x = torch.zeros(1, 1, *net.input["volume"]["patch"])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Folds(),
            (x,),
            str(out),
            input_names=["image"],
            output_names=["logits"],
            opset_version=OPSET,
            dynamo=False,
        )


def totalsegmentator_codes() -> dict[str, dict]:
    """TotalSegmentator's class -> SNOMED CT category, type and modifier (its own mapping, shipped)."""
    out = {}
    with open(TOTALSEGMENTATOR_CODES, newline="") as f:
        for row in csv.DictReader(f):

            def code(prefix: str, row=row) -> dict | None:
                value = row.get(f"{prefix}.CodeValue")
                if not value:
                    return None
                return {
                    "value": value,
                    "scheme": row[f"{prefix}.CodingSchemeDesignator"],
                    "meaning": row[f"{prefix}.CodeMeaning"],
                }

            out[row["Structure"]] = {
                "category": code("SegmentedPropertyCategoryCodeSequence"),
                "type": code("SegmentedPropertyTypeCodeSequence"),
                "modifier": code("SegmentedPropertyTypeModifierCodeSequence"),
            }
    return out


_ANATOMY = {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}


def label_manifest(net: Network, codes: dict, shipped: dict, warn) -> list[dict]:
    labels = []
    for index, name in sorted(net.labels.items()):
        entry = codes["labels"].get(name)
        if entry is not None:
            if not isinstance(entry, dict) or not {"value", "meaning"} <= set(entry):
                raise ModelError(f"--codes: label {name!r} needs value and meaning (and scheme, default SCT)")
            known = {
                "category": entry.get("category") or _ANATOMY,
                "type": {
                    k: str(entry.get(k, "SCT" if k == "scheme" else ""))
                    for k in ("value", "scheme", "meaning")
                },
                "modifier": entry.get("modifier"),
            }
        elif name in shipped:
            known = shipped[name]
        else:
            warn(
                f"head {net.name}: label {name!r} has no code (shipped mapping or --codes): a local code ({LOCAL_SCHEME})"
            )
            known = {
                "category": _ANATOMY,
                "type": {
                    "value": f"L-{net.name[:6]}-{index}"[:16],
                    "scheme": LOCAL_SCHEME,
                    "meaning": name[:64],
                },
                "modifier": None,
            }
        label = {"index": index, "name": name, "category": known["category"], "type": known["type"]}
        if known.get("modifier"):
            label["modifier"] = known["modifier"]
        labels.append(label)
    return labels


def import_nnunet(
    sources: list[Path],
    out: Path,
    axes: str = "RAS",
    codes: Path | None = None,
    name: str | None = None,
    version: str = "1.0.0",
    warn=print,
) -> Path:
    """Import one or more nnU-Net results folders into the model folder ``out`` (one head each)."""
    out = Path(out)
    nets = [read_network(Path(s), axes) for s in sources]
    first = nets[0]
    for n in nets[1:]:
        if n.input["modalities"] != first.input["modalities"]:
            raise ModelError(
                f"{n.src}: a {n.input['modalities'][0]} network; {first.src} is {first.input['modalities'][0]}"
            )
    names = [n.name for n in nets]
    if len(set(names)) != len(names):
        raise ModelError(f"the sources must have distinct dataset names, got {names}")
    code_map, shipped = read_codes(codes), totalsegmentator_codes()
    heads = []
    for n in nets:
        head = {
            "name": n.name,
            "kind": "segmentation",
            "graph": f"{n.name}.onnx",
            "inputs": ["image"],
            "labels": label_manifest(n, code_map, shipped, warn),
            "outputs": ["seg", "sr"],
        }
        for key in ("volume", "intensity"):  # what differs from the first network's, per head
            if n.input[key] != first.input[key]:
                head[key] = n.input[key]
        heads.append(head)
    with staged_model_folder(out) as tmp:
        for n in nets:
            export_network(n, tmp / f"{n.name}.onnx")
        spec_input = {k: v for k, v in first.input.items() if k != "modalities"}
        folds = "; ".join(f"{n.name}: folds {', '.join(n.folds)}" for n in nets)
        manifest = {
            "name": name or (first.name if len(nets) == 1 else out.name),
            "version": version,
            "description": f"imported from nnU-Net v2 ({folds})",
            "modalities": first.input["modalities"],
            "input": spec_input,
            "heads": heads,
        }
        (tmp / "model.yaml").write_text(
            "# written by `pacs-node models import` from nnU-Net plans: what nnU-Net does, said explicitly\n"
            + yaml.safe_dump(manifest, sort_keys=False)
        )
        provenance = {
            "format": "nnunet",
            "sources": {
                n.name: {
                    "path": str(n.src.resolve()),
                    "folds": list(n.folds),
                    "files": {
                        str(p.relative_to(n.src)): file_sha256(p)
                        for p in (
                            n.src / "plans.json",
                            n.src / "dataset.json",
                            *sorted(n.src.glob(f"fold_*/{CHECKPOINT}")),
                        )
                    },
                }
                for n in nets
            },
            "axes": axes,
        }
        (tmp / "import.json").write_text(json.dumps(provenance, indent=2))
    return out
