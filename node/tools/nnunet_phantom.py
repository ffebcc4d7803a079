"""A small nnU-Net v2 results folder trained on phantoms, exactly in nnU-Net's format.

For the importer's tests and benchmarks (nothing is downloaded): ``plans.json`` of a
``3d_fullres`` configuration with a small ``PlainConvUNet``, ``dataset.json`` with the phantom's
organs, and ``fold_<k>/checkpoint_final.pth`` as nnU-Net's trainer saves it, the weights trained
for a few hundred steps on phantoms in nibabel's RAS orientation (TotalSegmentator's), so the
network's output is spatially coherent. The training is our own short loop (nnU-Net's trainer
needs a preprocessed dataset on disk and hours); the folder it writes is what nnU-Net reads.

    python -m node.tools.nnunet_phantom OUT [--steps 300] [--folds 1]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.synthetic.phantom import ORGANS, Phantom

TRAINER = "nnUNetTrainer"
LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "lung": 4}


@dataclass(frozen=True)
class NetConfig:
    spacing: tuple[float, float, float] = (5.0, 4.0, 4.0)  # (z, y, x) mm
    patch: tuple[int, int, int] = (32, 48, 48)
    features: tuple[int, ...] = (8, 16, 32)
    steps: int = 300
    batch: int = 2
    lr: float = 1e-2
    seed: int = 0


def ras_affine(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], centre=(0.0, 0.0, -20.0)
) -> np.ndarray:
    """Index -> LPS affine of a (z, y, x) array whose x points R, y A, z S (nibabel's canonical, as
    SimpleITK reads it: TotalSegmentator's training images)."""
    a = np.eye(4)
    a[:3, 0] = (0, 0, spacing[0])  # z: towards S
    a[:3, 1] = (0, -spacing[1], 0)  # y: towards A (-y in LPS)
    a[:3, 2] = (-spacing[2], 0, 0)  # x: towards R (-x in LPS)
    half = (np.asarray(shape) - 1) / 2
    a[:3, 3] = np.asarray(centre) - a[:3, :3] @ half
    return a


def plans(config: NetConfig, stats: dict) -> dict:
    n = len(config.features)
    return {
        "dataset_name": "Dataset901_Phantom",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(config.spacing),
        "original_median_shape_after_transp": [68, 84, 84],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": config.batch,
                "patch_size": list(config.patch),
                "median_image_size_in_voxels": [68, 84, 84],
                "spacing": list(config.spacing),
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {
                    "is_seg": False,
                    "order": 3,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "resampling_fn_seg_kwargs": {
                    "is_seg": True,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {
                    "is_seg": False,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {
                        "n_stages": n,
                        "features_per_stage": list(config.features),
                        "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3]] * n,
                        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
                        "n_conv_per_stage": [2] * n,
                        "n_conv_per_stage_decoder": [2] * (n - 1),
                        "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True},
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": stats},
    }


def dataset_json(n_train: int) -> dict:
    return {
        "channel_names": {"0": "CT"},
        "labels": LABELS,
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "name": "Phantom",
    }


def _volumes(config: NetConfig, n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Phantom CTs on the network's grid in RAS: (image HU, organ labels) pairs."""
    shape = (68, 84, 84)
    out = []
    for k in range(n):
        ph = Phantom.random(seed + k, n_lesions=0)
        s = ph.sample(ras_affine(shape, config.spacing), shape, "CT", noise=12.0, seed=seed + k)
        organs = np.where(s.tissue <= max(ORGANS), s.tissue, 0)
        out.append((s.image, np.where(organs == 5, 0, organs).astype(np.int64)))  # bone is not a label here
    return out


def foreground_stats(volumes) -> dict:
    """nnU-Net's dataset fingerprint of the foreground (labelled) intensities."""
    fg = np.concatenate([img[lab > 0] for img, lab in volumes]).astype(np.float64)
    return {
        "max": float(fg.max()),
        "mean": float(fg.mean()),
        "median": float(np.median(fg)),
        "min": float(fg.min()),
        "percentile_00_5": float(np.percentile(fg, 0.5)),
        "percentile_99_5": float(np.percentile(fg, 99.5)),
        "std": float(fg.std()),
    }


def write_results_folder(out: Path, config: NetConfig = NetConfig(), folds: int = 1) -> Path:
    """Train and write ``out/{plans.json,dataset.json,fold_k/checkpoint_final.pth}``; returns ``out``."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from node.learn.fast_cpu import flush_denormals

    flush_denormals()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    volumes = _volumes(config, 6, 7000 + config.seed)
    stats = foreground_stats(volumes)
    p, d = plans(config, stats), dataset_json(len(volumes))
    arch = p["configurations"]["3d_fullres"]["architecture"]
    lo, hi = stats["percentile_00_5"], stats["percentile_99_5"]
    norm = [((np.clip(img, lo, hi) - stats["mean"]) / stats["std"]).astype(np.float32) for img, _ in volumes]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plans.json").write_text(json.dumps(p, indent=2))
    (out / "dataset.json").write_text(json.dumps(d, indent=2))
    for fold in range(folds):
        net = get_network_from_plans(
            arch["network_class_name"],
            arch["arch_kwargs"],
            arch["_kw_requires_import"],
            1,
            len(LABELS),
            deep_supervision=False,
        )
        opt = torch.optim.Adam(net.parameters(), lr=config.lr)
        net.train()
        for _ in range(config.steps):
            xs, ys = [], []
            for _b in range(config.batch):
                v = int(rng.integers(len(volumes)))
                start = [
                    int(rng.integers(0, n - p + 1)) for n, p in zip(norm[v].shape, config.patch, strict=True)
                ]
                win = tuple(slice(s, s + p) for s, p in zip(start, config.patch, strict=True))
                xs.append(norm[v][win][None])
                ys.append(volumes[v][1][win])
            x, y = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        (out / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(
            {
                "network_weights": net.state_dict(),
                "optimizer_state": None,
                "grad_scaler_state": None,
                "logging": {},
                "_best_ema": None,
                "current_epoch": 1,
                "init_args": {"plans": p, "configuration": "3d_fullres", "fold": fold, "dataset_json": d},
                "trainer_name": TRAINER,
                "inference_allowed_mirroring_axes": (0, 1, 2),
            },
            out / f"fold_{fold}" / "checkpoint_final.pth",
        )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=NetConfig.steps)
    ap.add_argument("--folds", type=int, default=1)
    a = ap.parse_args(argv)
    write_results_folder(a.out, NetConfig(steps=a.steps), a.folds)
    print(a.out)


if __name__ == "__main__":
    main()
