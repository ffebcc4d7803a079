"""A small MONAI bundle trained on phantoms, exactly in MONAI's bundle format.

For the importer's tests (nothing is downloaded): ``configs/metadata.json`` and
``configs/inference.json`` shaped as MONAI's spleen_ct_segmentation bundle (a 3D ``UNet``,
``Orientationd`` RAS, ``Spacingd``, ``ScaleIntensityRanged``, ``SlidingWindowInferer``, softmax,
``Invertd``, arg-max, ``SaveImaged``) and ``models/model.pt``, its state dict trained for a few
hundred steps on phantom CTs laid out as MONAI's transforms give them (array axes x, y, z towards
R, A, S), so the network's output is spatially coherent. The loop is our own short one (MONAI's
trainer needs pytorch-ignite and a dataset on disk); the folder is what MONAI's ConfigParser reads.

    python -m node.tools.monai_phantom OUT [--steps 200] [--torchscript]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.synthetic.phantom import ORGANS, Phantom
from node.tools.nnunet_phantom import ras_affine

CHANNELS = {"0": "background", "1": "liver", "2": "spleen", "3": "kidney", "4": "lung"}


@dataclass(frozen=True)
class BundleConfig:
    pixdim: tuple[float, float, float] = (4.0, 4.0, 5.0)  # x, y, z mm (MONAI's array order)
    roi: tuple[int, int, int] = (48, 48, 32)
    channels: tuple[int, ...] = (8, 16, 32)
    window: tuple[float, float] = (-200.0, 250.0)  # ScaleIntensityRanged a_min, a_max (HU)
    overlap: float = 0.25
    steps: int = 200
    batch: int = 2
    lr: float = 1e-2
    seed: int = 0


def network_def(config: BundleConfig) -> dict:
    return {
        "_target_": "UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": len(CHANNELS),
        "channels": list(config.channels),
        "strides": [2] * (len(config.channels) - 1),
        "num_res_units": 1,
        "norm": "instance",
    }


def inference_json(config: BundleConfig) -> dict:
    """The spleen bundle's inference.json with this network, grid and window."""
    a_min, a_max = config.window
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data/phantom",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def(config),
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": list(config.pixdim), "mode": "bilinear"},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": a_min,
                    "a_max": a_max,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': i} for i in @datalist]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(config.roi),
            "sw_batch_size": 2,
            "overlap": config.overlap,
            "mode": "gaussian",
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "meta_key_postfix": "meta_dict",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "resample": False,
                    "squeeze_end_dims": True,
                },
            ],
        },
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$@bundle_root + '/models/model.pt'",
                "load_dict": {"model": "@network"},
            },
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": True,
        },
        "initialize": ["$monai.utils.set_determinism(seed=123)"],
        "run": ["$@evaluator.run()"],
    }


def metadata_json(config: BundleConfig) -> dict:
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "phantom bundle for pacs-node's tests"},
        "monai_version": "1.3.0",
        "pytorch_version": "2.2.0",
        "numpy_version": "1.26.0",
        "optional_packages_version": {"nibabel": "5.2.0"},
        "name": "Phantom CT organ segmentation",
        "task": "Segmentation of phantom organs in CT",
        "description": "A small UNet trained briefly on synthetic phantoms (not for clinical use)",
        "authors": "pacs-node",
        "copyright": "pacs-node",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": list(config.roi),
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": len(CHANNELS),
                    "spatial_shape": list(config.roi),
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": CHANNELS,
                }
            },
        },
    }


def _volumes(config: BundleConfig, n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Phantom CTs on the network's grid in MONAI's array order (x, y, z towards R, A, S), scaled as
    ScaleIntensityRanged scales them: (image, organ labels) pairs."""
    shape_xyz = (84, 84, 68)
    zyx = shape_xyz[::-1]
    a_min, a_max = config.window
    out = []
    for k in range(n):
        ph = Phantom.random(seed + k, n_lesions=0)
        s = ph.sample(ras_affine(zyx, config.pixdim[::-1]), zyx, "CT", noise=12.0, seed=seed + k)
        organs = np.where(s.tissue <= max(ORGANS), s.tissue, 0)
        labels = np.where(organs == 5, 0, organs).astype(np.int64)  # bone is not a label here
        image = np.clip((s.image - a_min) / (a_max - a_min), 0, 1).astype(np.float32)
        out.append((image.transpose(2, 1, 0).copy(), labels.transpose(2, 1, 0).copy()))
    return out


def _train(net, opt, volumes, config: BundleConfig, rng, torch) -> None:
    """Cross-entropy on random ROI-sized crops."""
    for _ in range(config.steps):
        xs, ys = [], []
        for _b in range(config.batch):
            image, labels = volumes[int(rng.integers(len(volumes)))]
            start = [int(rng.integers(0, n - p + 1)) for n, p in zip(image.shape, config.roi, strict=True)]
            win = tuple(slice(s, s + p) for s, p in zip(start, config.roi, strict=True))
            xs.append(image[win][None])
            ys.append(labels[win])
        loss = torch.nn.functional.cross_entropy(
            net(torch.from_numpy(np.stack(xs))), torch.from_numpy(np.stack(ys))
        )
        opt.zero_grad()
        loss.backward()
        opt.step()


def write_bundle(out: Path, config: BundleConfig = BundleConfig(), torchscript: bool = False) -> Path:
    """Train and write ``out/{configs/metadata.json,configs/inference.json,models/model.pt}`` (or
    ``models/model.ts``, the network as TorchScript); returns ``out``."""
    import torch
    from monai.bundle import ConfigParser

    from node.learn.fast_cpu import flush_denormals

    flush_denormals()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    parser = ConfigParser({"network_def": network_def(config)})
    net = parser.get_parsed_content("network_def")
    volumes = _volumes(config, 6, 8000 + config.seed)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    net.train()
    threads = torch.get_num_threads()
    # one thread: as fast for a network this small, and OpenMP's spinning threads make a busy
    # machine (tests running beside it) many times slower
    torch.set_num_threads(1)
    try:
        _train(net, opt, volumes, config, rng, torch)
    finally:
        torch.set_num_threads(threads)
    net.eval()
    out = Path(out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    (out / "configs" / "inference.json").write_text(json.dumps(inference_json(config), indent=4))
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata_json(config), indent=4))
    if torchscript:  # as MONAI's ckpt_export writes it
        torch.jit.save(torch.jit.script(net), str(out / "models" / "model.ts"))
    else:
        torch.save(net.state_dict(), out / "models" / "model.pt")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=BundleConfig.steps)
    ap.add_argument("--torchscript", action="store_true", help="models/model.ts instead of model.pt")
    a = ap.parse_args(argv)
    write_bundle(a.out, BundleConfig(steps=a.steps), a.torchscript)
    print(a.out)


if __name__ == "__main__":
    main()
