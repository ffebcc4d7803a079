"""Train the reference foundation model, ``phantom-fm``, in Curia's format (needs the ``train`` and
``import`` extras).

What is written is what a department would download for a real model: a Hugging Face
``Dinov2Model`` with one input channel (``save_pretrained``: ``config.json``,
``model.safetensors``, ``preprocessor_config.json``) and one folder per head. The model folder the
node runs is then made from them by the importer (:mod:`node.model.importers.huggingface`), so the
default model goes through the same path as Curia every time.

The data are synthetic phantoms (:mod:`node.synthetic.phantom`) sampled the ways a series reaches
the model: axial stacks with square or stretched slices (a sagittal or coronal acquisition seen
axially), and oblique stacks resampled by the node's own :func:`~node.model.preprocess.to_canonical`;
then Curia's preprocessing (the whole slice resized to S x S, antialiased bicubic, z-score per
slice). Labels are the phantom's truth at the centre of each model pixel; where an oblique stack's
axial grid lies outside the acquired slab they are ignored.

Training has three stages. 1: the backbone and its two decoders together (organs, lesions; each
sees the slice and its patch tokens), a supervised stand-in for the self-supervised pre-training of
a real foundation model. 2: the backbone frozen, both decoders on new phantoms from head to pelvis,
the organ decoder now finding each CT slice's CT numbers again (:func:`with_context`,
:func:`fit_calibration`). 3: the lesion head anew on the frozen backbone, two decoders on crops of
many phantoms, averaged
(:func:`retrain_lesions`). The lesion-presence head is stage 2's lesion decoder read as a
series-level finding (its most probable slice). Each head is saved on its own, so a head can be
retrained or added on the frozen backbone without touching it (:func:`retrain_organs`,
:func:`retrain_lesions`, :func:`retrain_presence`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from node.errors import ModelError
from node.learn.fast_cpu import fast_cpu, flush_denormals
from node.model.manifest import IntensitySpec
from node.model.preprocess import ResizeMap, normalise, to_canonical
from node.synthetic.phantom import ORGANS, Phantom, axial_affine, rotated

log = logging.getLogger(__name__)

try:
    import torch
    from torch.nn import functional as F
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("training needs PyTorch: pip install 'pacs-node[train,import]' (or torch==2.13.0 on CPU)") from e

IGNORE = 255  # label of model pixels outside the acquired slab (oblique stacks)
ZSCORE = IntensitySpec(kind="zscore", clip_below=-1000.0)  # Curia's processor with clip_below_air


@dataclass(frozen=True)
class Config:
    size: int = 128  # in-plane input size (pixels)
    patch: int = 8
    dim: int = 96
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    n_train: int = 120  # phantoms
    slices_per_phantom: int = 16
    steps: int = 2400  # stage 1: backbone and decoders together
    head_steps: int = 800  # stage 2: the decoders on the frozen backbone, on new phantoms
    # stage 3: the lesion decoder anew on the frozen backbone, on crops of many phantoms' slices
    lesion_phantoms: int = 600
    lesion_slices: int = 4
    lesion_steps: int = 2000
    lesion_batch: int = 32
    crop: int = 64  # pixels, a multiple of the patch
    batch: int = 16
    lr: float = 1e-3
    seed: int = 7
    # the decoders' convolutions in bf16 (autocast; their windows stay fp32): a stage-1 step 0.49 s
    # -> 0.38 s on this project's CPU (AMX). The backbone stays fp32: no faster at this size.
    bf16: bool = True


LABELS = {
    "organs": [
        {"index": 1, "name": "Liver", "type": {"value": "10200004", "meaning": "Liver"}},
        {"index": 2, "name": "Spleen", "type": {"value": "78961009", "meaning": "Spleen"}},
        {"index": 3, "name": "Kidney", "type": {"value": "64033007", "meaning": "Kidney"}},
        {"index": 4, "name": "Lung", "type": {"value": "39607008", "meaning": "Lung"}},
        {"index": 5, "name": "Bone", "type": {"value": "272673000", "meaning": "Bone structure"}},
    ],
    "lesions": [
        {
            "index": 1,
            "name": "Lesion",
            "kind": "lesion",
            "instances": True,
            "category": {"value": "49755003", "meaning": "Morphologically Abnormal Structure"},
            "type": {"value": "52988006", "meaning": "Lesion"},
        }
    ],
}
ANATOMY = {"value": "91723000", "meaning": "Anatomical Structure"}
PRESENCE = {
    "finding": {"value": "52988006", "meaning": "Lesion"},
    "positive": {"value": "52101004", "meaning": "Present"},
    "negative": {"value": "2667000", "meaning": "Absent"},
    "threshold": 0.5,
}


# -- data -------------------------------------------------------------------------


@dataclass
class Stack:
    """Model-plane slices of one phantom, with their labels."""

    image: np.ndarray  # (n, 1, S, S) float32, the backbone's input
    organs: np.ndarray  # (n, S, S) uint8, IGNORE outside the slab
    lesion: np.ndarray  # (n, S, S) uint8 0/1, IGNORE outside the slab
    fat: np.ndarray  # (n,) float32: fat's height above air in z-units; NaN unless CT with air, body


def sample_stack(seed: int, size: int, n_slices: int, rng: np.random.Generator, whole_body: bool = False) -> Stack:
    """One training phantom, acquired at random and brought to the model plane as the node does;
    ``whole_body``: half the stacks anywhere from the lung apices to the pelvis, not only around
    the organs and lesions."""
    import highdicom as hd
    from scipy.ndimage import gaussian_filter

    phantom = Phantom.random(seed, n_lesions=0 if rng.random() < 0.2 else int(rng.integers(1, 6)))
    modality = "CT" if rng.random() < 0.6 else "MR"
    fov = rng.uniform(300, 500)
    matrix = int(rng.integers(64, 289))
    spacing = (fov / matrix, fov / matrix)
    z = rng.uniform(-40, 40)
    if whole_body and rng.random() < 0.5:
        z = rng.uniform(-150, 150)
    elif phantom.lesions and rng.random() < 0.6:  # most stacks through a lesion: they are small and rare
        z += phantom.lesions[int(rng.integers(len(phantom.lesions)))].center[2]
    acquisition = rng.choice(["axial", "axial", "stretched", "oblique"])
    if acquisition == "stretched":  # a sagittal/coronal acquisition: its slice axis is in-plane here
        coarse = rng.uniform(2.5, 7.0)
        cols = int(fov / coarse)
        shape, spacing = (n_slices, matrix, cols), (spacing[0], coarse)
        if rng.random() < 0.5:
            shape, spacing = (n_slices, cols, matrix), (coarse, spacing[1])
    elif acquisition == "oblique":  # a thicker slab, so that its middle fills whole axial slices
        shape = (3 * n_slices, matrix, matrix)
    else:
        shape = (n_slices, matrix, matrix)
    thickness = float(rng.uniform(2.0, 8.0))
    affine = axial_affine(shape, 1.0, thickness, z)
    affine[:3, 1] *= spacing[0]
    affine[:3, 2] *= spacing[1]
    affine[:3, 3] = (-spacing[1] * (shape[2] - 1) / 2, -spacing[0] * (shape[1] - 1) / 2, affine[2, 3])
    if acquisition == "oblique":  # tilt the source, then let the node resample it to an axial grid
        affine = rotated(affine, shape, *rng.uniform(-25, 25, 2))
    noise = float(rng.uniform(5, 25)) if modality == "CT" else float(rng.uniform(0.5, 4))
    s = phantom.sample(affine, shape, modality, noise=noise, seed=seed, mr_gain=float(rng.uniform(0.3, 4.0)))
    image = s.image
    if rng.random() < 0.4:  # partial-volume blur, as in thick or reconstructed slices
        image = gaussian_filter(image, (0, rng.uniform(0.3, 1.2), rng.uniform(0.3, 1.2)))
    canonical = to_canonical(hd.Volume(image, affine, "PATIENT", "1.2.3"))
    pick = np.arange(canonical.shape[0])
    if len(pick) > n_slices:  # an oblique stack: the middle of its axial grid, where the slab is
        start = (len(pick) - n_slices) // 2
        pick = pick[start : start + n_slices]
    plane = ResizeMap(canonical.shape[1:], tuple(canonical.spacing[1:]), size)
    hu = plane.to_model(canonical.array[pick], -1000.0)
    x = normalise(hu, modality, ZSCORE)
    # what the organ head's calibration learns: -100 HU above -1000 in units of the slice's spread,
    # where the slice holds air (its lowest value is -1000 HU) and a body (a spread of 100 HU or more)
    clipped = np.maximum(hu, -1000.0)
    spread = clipped.std(axis=(1, 2))
    calibrated = (modality == "CT") & (clipped.min(axis=(1, 2)) == -1000.0) & (spread >= 100)
    fat = np.where(calibrated, 900 / spread, np.nan)
    # truth at the centre of each model pixel
    u = plane.model_to_canonical(0)
    v = plane.model_to_canonical(1)
    ii, uu, vv = np.meshgrid(pick, u, v, indexing="ij")
    index = np.stack([ii.ravel(), uu.ravel(), vv.ravel(), np.ones(ii.size)])
    lps = canonical.affine @ index
    tissue, lesion = phantom.labels(lps[:3].T)
    organs = np.where(tissue <= max(ORGANS), tissue, 0).astype(np.uint8)
    lesion = (lesion > 0).astype(np.uint8)
    src = np.linalg.inv(affine) @ lps
    outside = np.any((src[:3].T < -0.5) | (np.array(shape) - 0.5 < src[:3].T), axis=1)
    organs[outside], lesion[outside] = IGNORE, IGNORE
    grid = (len(pick), size, size)
    return Stack(x, organs.reshape(grid), lesion.reshape(grid), fat.astype(np.float32))


def make_dataset(
    cfg: Config, seeds: range, rng: np.random.Generator, whole_body: bool = False
) -> tuple[Stack, np.ndarray]:
    stacks = [sample_stack(seed, cfg.size, cfg.slices_per_phantom, rng, whole_body) for seed in seeds]
    ids = np.concatenate([np.full(len(s.image), k) for k, s in enumerate(stacks)])
    fields = ("image", "organs", "lesion", "fat")
    return Stack(*(np.concatenate([getattr(s, f) for s in stacks]) for f in fields)), ids


# -- losses -------------------------------------------------------------------------


def _logits(decoder, tokens, x, cfg: Config, hounsfield=None):
    """A decoder's logits (fp32), computed in bf16 where ``cfg.bf16``."""
    with torch.autocast("cpu", torch.bfloat16, enabled=cfg.bf16):
        return decoder.logits(tokens, x, hounsfield).float()


def _seg_loss(logits, target, weight=None):
    """Cross-entropy + soft Dice over the batch (small structures count as much as large ones)."""
    n_classes = logits.shape[1]
    ce = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE)
    valid = (target != IGNORE).unsqueeze(1)
    p = torch.softmax(logits, 1) * valid
    t = F.one_hot(torch.where(target == IGNORE, 0, target), n_classes).permute(0, 3, 1, 2) * valid
    inter = (p * t).sum((0, 2, 3))
    dice = (2 * inter + 1) / (p.sum((0, 2, 3)) + t.sum((0, 2, 3)) + 1)
    return ce + (1 - dice[1:]).mean()


# -- training ---------------------------------------------------------------------


def build(cfg: Config):
    import transformers

    from node.model.importers.heads import segmentation_decoder

    config = transformers.Dinov2Config(
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        patch_size=cfg.patch,
        image_size=cfg.size,
        num_channels=1,
    )
    backbone = transformers.Dinov2Model(config)
    return backbone, segmentation_decoder(cfg.dim, cfg.patch, len(ORGANS) + 1), segmentation_decoder(cfg.dim, cfg.patch, 2)


def train(out_dir: Path, cfg: Config = Config(), name: str = "phantom-fm", version: str = "2.5.0") -> dict:
    """Train, save the Hugging Face checkpoint and head folders under ``out_dir/source``, and import
    them into ``out_dir`` (a model folder). Returns training stats."""
    flush_denormals()
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    backbone, organs, lesions = modules = build(cfg)
    data, _ = make_dataset(cfg, range(1000, 1000 + cfg.n_train), np.random.default_rng(cfg.seed))
    log.info("stage 1 dataset: %d slices in %.0f s", len(data.image), time.perf_counter() - t0)

    def joint(x, y_org, y_les, fat):
        tokens = backbone(pixel_values=x).last_hidden_state[:, 1:]
        return _seg_loss(_logits(organs, tokens, x, cfg), y_org) + _seg_loss(_logits(lesions, tokens, x, cfg), y_les, LESION_WEIGHT)

    _fit(modules, joint, data, None, cfg.steps, cfg, t0)
    stage1 = time.perf_counter() - t0
    # stage 2: the backbone frozen, its features computed once; the heads on new phantoms from head
    # to pelvis (stage 1 saw mostly the organs' levels, and a head must also say "no organ")
    backbone.eval().requires_grad_(False)
    heads_data, _ = make_dataset(cfg, range(5000, 5000 + cfg.n_train), np.random.default_rng(cfg.seed + 2), True)
    with torch.no_grad():
        x = torch.from_numpy(heads_data.image)
        tokens = torch.cat([backbone(pixel_values=x[i : i + 64]).last_hidden_state[:, 1:] for i in range(0, len(x), 64)])

    organs = with_context(organs.state_dict(), cfg.dim, cfg.patch)
    fit_calibration(organs, heads_data)

    def heads(x, y_org, y_les, fat, t):
        return _organ_loss(organs, t, x, y_org, fat, cfg) + _seg_loss(_logits(lesions, t, x, cfg), y_les, LESION_WEIGHT)

    _fit((organs, lesions), heads, heads_data, tokens, cfg.head_steps, cfg, t0, lr=cfg.lr / 2)
    modules = backbone, organs, lesions
    stage2 = time.perf_counter() - t0
    stats = {
        "train_slices": len(data.image) + len(heads_data.image),
        "train_volumes": 2 * cfg.n_train,
        "lesion_slices": int((data.lesion == 1).any(axis=(1, 2)).sum() + (heads_data.lesion == 1).any(axis=(1, 2)).sum()),
        "stage1_seconds": round(stage1, 1),
        "stage2_seconds": round(stage2 - stage1, 1),
        "train_seconds": round(stage2, 1),  # stage 3 adds its own
        "parameters": {
            n: sum(p.numel() for p in m.parameters())
            for n, m in zip(("backbone", "organs", "lesions"), modules, strict=True)
        },
    }
    save(out_dir, cfg, modules, name, version)
    (out_dir / "training.json").write_text(json.dumps({"config": asdict(cfg), **stats}, indent=2) + "\n")
    retrain_lesions(out_dir, cfg)  # stage 3 adds its settings and time to training.json
    return json.loads((out_dir / "training.json").read_text())


LESION_WEIGHT = torch.tensor([1.0, 5.0])  # lesion pixels are rare


def _fit(modules, loss_of, data: Stack, tokens, steps: int, cfg: Config, t0: float, lr: float | None = None) -> None:
    """AdamW with a one-cycle schedule; half of every batch from slices with a lesion (rare, small).
    ``loss_of(x, y_organs, y_lesion, fat[, tokens])``: tokens given when the backbone is frozen."""
    x = torch.from_numpy(data.image)
    y_org = torch.from_numpy(data.organs.astype(np.int64))
    y_les = torch.from_numpy(data.lesion.astype(np.int64))
    fat = torch.from_numpy(data.fat)
    positive = torch.nonzero((y_les == 1).flatten(1).any(1)).ravel()
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    lr = lr or cfg.lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    for m in modules:
        m.train()
    with fast_cpu(*modules):
        for step in range(steps):
            half = cfg.batch // 2 if len(positive) else 0
            pos = positive[torch.randint(max(1, len(positive)), (half,))]
            idx = torch.cat([pos, torch.randint(len(x), (cfg.batch - half,))])
            args = (_augment(x[idx]) if tokens is None else x[idx], y_org[idx], y_les[idx], fat[idx])
            loss = loss_of(*args) if tokens is None else loss_of(*args, tokens[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if step % 100 == 0:
                log.info("step %d/%d loss %.3f (%.0f s)", step, steps, loss.item(), time.perf_counter() - t0)


def write_heads(folder: Path, hidden: int, patch: int, organs, lesions) -> list[Path]:
    """The three head folders (organs, lesions, lesion presence) in pacs-node's format under ``folder``."""
    from node.model.importers.heads import PRESENCE as PRESENCE_ARCH
    from node.model.importers.heads import SEGMENTATION, decoder_presence, write_own_head

    heads = []
    for head, module in (("organs", organs), ("lesions", lesions)):
        labels = [{"category": ANATOMY, **label} for label in LABELS[head]]
        config = {"pacs_node_head": SEGMENTATION, "hidden_size": hidden, "labels": labels}
        if head == "lesions":  # one slice cannot tell an organ's end from a lesion; the organ head can
            config["organ_ends"] = "organs"
        if hasattr(module, "probes"):  # CT numbers found again (with_context)
            config["context"] = True
        heads.append(write_own_head(folder / f"head_{head}", module, config))
    presence = decoder_presence(hidden, patch)  # the lesion decoder, read as a series-level finding
    presence.decoder.load_state_dict(lesions.state_dict())
    config = {"pacs_node_head": PRESENCE_ARCH, "hidden_size": hidden, **PRESENCE}
    heads.append(write_own_head(folder / "head_lesion_presence", presence, config))
    return heads


def save(out_dir: Path, cfg: Config, modules, name: str, version: str) -> Path:
    """The checkpoint as its owners would publish it (``out_dir/source``), imported into ``out_dir``."""
    from node.model.importers.huggingface import import_huggingface

    backbone, organs, lesions = (m.eval() for m in modules)
    source = out_dir / "source"
    shutil.rmtree(source, ignore_errors=True)
    backbone.save_pretrained(source / name)
    (source / name / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "CuriaImageProcessor", "clip_below_air": True, "eps": ZSCORE.eps}) + "\n"
    )
    heads = write_heads(source, cfg.dim, cfg.patch, organs, lesions)
    for stale in out_dir.glob("*"):  # the previous import: everything but the source just written
        if stale.name != "source" and stale.suffix in (".onnx", ".pt2", ".yaml", ".json"):
            stale.unlink()
    tmp = out_dir.parent / f".{out_dir.name}-import"
    shutil.rmtree(tmp, ignore_errors=True)
    import_huggingface(
        source / name,
        tmp,
        heads,
        name=name,
        version=version,
        description="Reference DINOv2 slice encoder (Curia's format, small) with organ, lesion and "
        "lesion-presence heads; synthetic data only, not for clinical use",
    )
    provenance = json.loads((tmp / "import.json").read_text())  # paths inside the folder: relative
    provenance["source"] = f"source/{name}"
    provenance["heads"] = {h: f"source/head_{h}" for h in provenance["heads"]}
    (tmp / "import.json").write_text(json.dumps(provenance, indent=2))
    for f in tmp.iterdir():
        f.rename(out_dir / f.name)
    tmp.rmdir()
    return out_dir


def _frozen_tokens(model_dir: Path, images: np.ndarray):
    """The model folder's exported backbone's patch tokens of ``images``, and (hidden, patch)."""
    import onnxruntime as ort

    from node.model.manifest import load_model

    model = load_model(model_dir)
    session = ort.InferenceSession(str(model.graph(model.backbone.graph)), providers=["CPUExecutionProvider"])
    tokens = np.concatenate([session.run(["tokens"], {"image": images[i : i + 64]})[0] for i in range(0, len(images), 64)])
    flush_denormals()  # ONNX Runtime cleared it here; torch's threads, if they start next, take it from here
    return tokens, tokens.shape[-1], model.input.size // int(round(np.sqrt(tokens.shape[1])))


def _sized_for(model_dir: Path, cfg: Config) -> Config:
    """``cfg`` with the in-plane size of the model folder's backbone (a head is retrained at it)."""
    from node.model.manifest import load_model

    return replace(cfg, size=load_model(model_dir).input.size)


def _rewrite_head(model_dir: Path, head: str, module, hidden: int, patch: int, size: int, **config_update) -> None:
    """A retrained head's weights (and ``config_update`` to its config) into its source folder, and
    its graphs into the model folder."""
    from node.learn.calibrate_shipped import write_calibration
    from node.model.importers.heads import read_own_head, write_own_head
    from node.model.importers.huggingface import export_own_head

    folder = model_dir / "source" / f"head_{head}"
    config = json.loads((folder / "config.json").read_text())
    config.pop("ensemble", None)  # one plain decoder, unless said again
    config.pop("context", None)
    if config.pop("calibration", None) is not None:  # fitted to the old head's outputs
        write_calibration(model_dir / "model.yaml", head, None)
        log.warning("head %s retrained: its calibration no longer holds and is taken away (pacs-node heads calibrate %s)", head, head)
    config.update(config_update)
    write_own_head(folder, module.eval(), config)
    export_own_head(read_own_head(folder, config, hidden), model_dir / f"head_{head}.onnx", hidden, patch, size)


def retrain_presence(model_dir: Path, cfg: Config = Config()) -> Path:
    """Retrain only the lesion-presence head on the model folder's exported (frozen) backbone, and
    re-export only that head: how a head is added or improved without touching the backbone."""
    flush_denormals()
    from node.model.importers.heads import decoder_presence

    cfg = _sized_for(model_dir, cfg)
    torch.manual_seed(cfg.seed + 1)
    data, _ = make_dataset(cfg, range(1000, 1000 + cfg.n_train), np.random.default_rng(cfg.seed + 1))
    tokens, hidden, patch = _frozen_tokens(model_dir, data.image)
    tokens, x = torch.from_numpy(tokens), torch.from_numpy(data.image)
    y = torch.from_numpy(data.lesion.astype(np.int64))
    presence = decoder_presence(hidden, patch)
    opt = torch.optim.AdamW(presence.parameters(), lr=cfg.lr, weight_decay=0.01)
    with fast_cpu(presence):
        for _ in range(cfg.steps):
            idx = torch.randint(len(tokens), (cfg.batch,))
            loss = _seg_loss(_logits(presence.decoder, tokens[idx], x[idx], cfg), y[idx], LESION_WEIGHT)
            opt.zero_grad()
            loss.backward()
            opt.step()
    _rewrite_head(model_dir, "lesion_presence", presence, hidden, patch, cfg.size)
    return model_dir


POSITIVE, ORGAN_CENTRED = 0.45, 0.4  # of stage 3's crops: on a lesion; on liver, spleen or a kidney
# the lesion head: stage 3's two decoders, each with its own draw of the phantoms, crops and
# lesion-pixel weight, their probabilities averaged. Trained apart, they rarely call the same spot
# a lesion wrongly. On 32 held-out phantoms (seeds 70000), against stage 3's first decoder averaged
# with stage 2's: 0.41 false positives per series became 0.28, sensitivity 0.898 became 0.918;
# with the second decoder on the first's draw, sensitivity stayed 0.898.
STAGE3_WEIGHTS = (LESION_WEIGHT, torch.tensor([1.0, 2.5]))
ENSEMBLE = (0.5, 0.5)


def retrain_lesions(model_dir: Path, cfg: Config = Config()) -> Path:
    """Stage 3: the lesion head anew on the model folder's exported (frozen) backbone: two decoders
    (:data:`STAGE3_WEIGHTS`), averaged (:data:`ENSEMBLE`), each given the slice's CT numbers as the
    organ head finds them (its calibration, as it is; of the whole slices, then cropped). The
    presence head is rewritten to read the same two, so it says what the lesion head finds; only
    these two heads are re-exported.

    Many phantoms with few slices each, on ``crop``-pixel crops of the slices and their tokens (4x
    faster than whole slices). Of the crops (:data:`POSITIVE`, :data:`ORGAN_CENTRED`), 45 % are
    centred on a lesion, drawn evenly from its kinds (its organ; brighter or darker than it: the
    bright ones and the kidneys' are the fewest and were the ones missed); 40 % on an organ a lesion
    could be in, each organ as often as the others (a kidney is small, and its edges were what was
    called a lesion); the rest anywhere."""
    flush_denormals()
    from safetensors.torch import load_file

    from node.model.importers.heads import decoder_ensemble, decoder_presence, segmentation_decoder

    t0 = time.perf_counter()
    cfg = _sized_for(model_dir, cfg)
    many = replace(cfg, slices_per_phantom=cfg.lesion_slices)
    organs = model_dir / "source" / "head_organs"
    if not json.loads((organs / "config.json").read_text()).get("context"):
        raise ModelError(f"{organs}: the lesion head takes its CT numbers from the organ head's calibration, and this "
                         "one has none: retrain it first (pacs-node models train --head organs)")  # fmt: skip
    calibration = {k: v for k, v in load_file(organs / "model.safetensors").items() if k.startswith(("probes.", "context."))}
    decoders = []
    for k, weight in enumerate(STAGE3_WEIGHTS):  # each with its own draw of the phantoms and its crops
        rng = np.random.default_rng(cfg.seed + 3 + k)
        torch.manual_seed(cfg.seed + 3 + k)
        data, _ = make_dataset(many, range(5000, 5000 + cfg.lesion_phantoms), rng, whole_body=True)
        tokens, hidden, patch = _frozen_tokens(model_dir, data.image)
        log.info("stage 3 dataset: %d slices and their tokens in %.0f s", len(tokens), time.perf_counter() - t0)
        grid = cfg.size // patch
        tokens = tokens.reshape(len(tokens), grid, grid, hidden)
        decoder = segmentation_decoder(hidden, patch, 2, context=True)
        decoder.load_state_dict(calibration, strict=False)  # the organ head's, as it is: fat found the same way
        decoder.context.requires_grad_(False)
        with torch.no_grad():  # of the whole slices, once: a crop may hold no air or fat to go by
            x = torch.from_numpy(data.image)
            parts = [decoder.hounsfield(x[i : i + 256]) for i in range(0, len(x), 256)]
            hounsfield = torch.cat([hu for hu, _ in parts]).numpy(), torch.cat([ct for _, ct in parts])
        _fit_on_crops(decoder, weight, tokens, data, hounsfield, _lesion_kinds(data), rng, cfg, patch, t0)
        decoders.append(decoder)
    ensemble = decoder_ensemble(hidden, patch, 2, ENSEMBLE, context=True)
    for member, decoder in zip(ensemble.members, decoders, strict=True):
        member.load_state_dict(decoder.state_dict())
    _rewrite_head(model_dir, "lesions", ensemble, hidden, patch, cfg.size, ensemble=list(ENSEMBLE), context=True)
    presence = decoder_presence(hidden, patch, weights=ENSEMBLE, context=True)  # says what the lesion head finds
    presence.decoder.load_state_dict(ensemble.state_dict())
    _rewrite_head(model_dir, "lesion_presence", presence, hidden, patch, cfg.size, ensemble=list(ENSEMBLE), context=True)
    _record_stage3(model_dir / "training.json", cfg, round(time.perf_counter() - t0, 1))
    return model_dir


def _fit_on_crops(
    lesions, weight, tokens: np.ndarray, data: Stack, hounsfield, kinds, rng: np.random.Generator, cfg: Config, patch: int, t0: float
) -> None:
    """One stage-3 decoder trained on crops of the slices, their tokens (``grid x grid x hidden``) and
    their CT numbers (``hounsfield``: the decoder's ``hounsfield`` of the whole slices)."""
    grid, hidden, g, px = tokens.shape[1], tokens.shape[-1], cfg.crop // patch, cfg.crop

    def corner(mask: np.ndarray) -> np.ndarray:  # a crop's corner (in tokens) near a random pixel of mask
        rows, cols = np.nonzero(mask)
        k = rng.integers(len(rows))
        return (np.array([rows[k], cols[k]]) // patch - g // 2 + rng.integers(-g // 4, g // 4 + 1, 2)).clip(0, grid - g)

    def crop(s: int) -> tuple[int, np.ndarray]:
        u = rng.random()
        if u < POSITIVE and kinds:
            pool = kinds[int(rng.integers(len(kinds)))]
            s = int(pool[rng.integers(len(pool))])
            return s, corner(data.lesion[s] == 1)
        present = [o for o in (1, 2, 3) if (data.organs[s] == o).any()]
        if u < POSITIVE + ORGAN_CENTRED and present:
            return s, corner(data.organs[s] == present[int(rng.integers(len(present)))])
        return s, rng.integers(0, grid - g + 1, 2)

    opt = torch.optim.AdamW(lesions.parameters(), lr=2 * cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2 * cfg.lr, total_steps=cfg.lesion_steps, pct_start=0.1)
    lesions.train()
    with fast_cpu(lesions):
        for step in range(cfg.lesion_steps):
            picks = [crop(int(s)) for s in rng.integers(0, len(tokens), cfg.lesion_batch)]
            t = np.stack([tokens[s, r : r + g, c : c + g].reshape(g * g, hidden) for s, (r, c) in picks])
            x, y, hu = (np.stack([a[s][..., r * patch : r * patch + px, c * patch : c * patch + px] for s, (r, c) in picks])
                        for a in (data.image, data.lesion, hounsfield[0]))  # fmt: skip
            ct = hounsfield[1][[s for s, _ in picks]]
            logits = _logits(lesions, torch.from_numpy(t), _augment(torch.from_numpy(x)), cfg, (torch.from_numpy(hu), ct))
            loss = _seg_loss(logits, torch.from_numpy(y.astype(np.int64)), weight)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lesions.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 250 == 0:
                log.info("stage 3 step %d/%d loss %.3f (%.0f s)", step, cfg.lesion_steps, loss.item(), time.perf_counter() - t0)


def _record_stage3(record: Path, cfg: Config, seconds: float) -> None:
    """Stage 3's settings and time into the recipe's record, beside stages 1 and 2 (if there is one)."""
    if not record.exists():
        return
    stats = json.loads(record.read_text())
    stats["config"].update({k: getattr(cfg, k) for k in ("lesion_phantoms", "lesion_slices", "lesion_steps", "lesion_batch", "crop")})
    stats["train_seconds"] = round(stats["train_seconds"] - stats.get("stage3_seconds", 0) + seconds, 1)
    stats["stage3_seconds"] = seconds
    record.write_text(json.dumps(stats, indent=2) + "\n")


def _lesion_kinds(data: Stack) -> list[np.ndarray]:
    """The slices that show a lesion, by kind: the organ around it (most of a ring 3 pixels wide)
    and, in a solid organ, brighter or darker than it (a nodule in the lung is always brighter).
    Kinds no slice shows are left out."""
    from scipy import ndimage

    kinds: dict[tuple[int, bool], list[int]] = {}
    for s in np.flatnonzero((data.lesion == 1).reshape(len(data.lesion), -1).any(axis=1)):
        m = data.lesion[s] == 1
        ring = ndimage.binary_dilation(m, iterations=3) & ~m & (data.lesion[s] != IGNORE)
        if not ring.any():
            continue
        host = int(np.bincount(data.organs[s][ring], minlength=IGNORE + 1)[: IGNORE].argmax())
        brighter = host == 4 or bool(data.image[s, 0][m].mean() > data.image[s, 0][ring].mean())
        kinds.setdefault((host, brighter), []).append(int(s))
    return [np.asarray(v) for _, v in sorted(kinds.items())]


def _augment(xb):
    """Intensity jitter only: flips are wrong for anatomy (left and right matter)."""
    scale = 1 + 0.1 * torch.randn(xb.shape[0], 1, 1, 1)
    shift = 0.05 * torch.randn(xb.shape[0], 1, 1, 1)
    return xb * scale + shift


def retrain_organs(model_dir: Path, cfg: Config = Config()) -> Path:
    """Stage 2's organ head again on the model folder's exported (frozen) backbone, from its current
    weights, with CT numbers found again (:func:`with_context`), and re-exported alone."""
    flush_denormals()
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    cfg = _sized_for(model_dir, cfg)
    torch.manual_seed(cfg.seed + 5)
    data, _ = make_dataset(cfg, range(5000, 5000 + cfg.n_train), np.random.default_rng(cfg.seed + 2), True)
    tokens, hidden, patch = _frozen_tokens(model_dir, data.image)
    organs = with_context(load_file(model_dir / "source" / "head_organs" / "model.safetensors"), hidden, patch)
    fit_calibration(organs, data)

    def loss(x, y_org, y_les, fat, t):
        return _organ_loss(organs, t, x, y_org, fat, cfg)

    _fit((organs,), loss, data, torch.from_numpy(tokens), cfg.head_steps, cfg, t0, lr=cfg.lr / 2)
    _rewrite_head(model_dir, "organs", organs, hidden, patch, cfg.size, context=True)
    log.info("organ head retrained in %.0f s", time.perf_counter() - t0)
    return model_dir


def with_context(state: dict, hidden: int, patch: int):
    """An organ decoder with CT numbers found again (``context``), from a decoder's weights with or
    without it: what it adds starts at zero weight, so it begins as the decoder it was given."""
    from node.model.importers.heads import segmentation_decoder

    organs = segmentation_decoder(hidden, patch, len(ORGANS) + 1, context=True)
    first, given = organs.enc1[0].weight, state["enc1.0.weight"]
    if given.shape != first.shape:  # the CT-number windows are new inputs of the first convolution
        new = given.new_zeros(first.shape[0], first.shape[1] - given.shape[1], *given.shape[2:])
        state = {**state, "enc1.0.weight": torch.cat([given, new], 1)}
    organs.load_state_dict(state, strict=False)
    return organs


def _organ_loss(organs, tokens, x, y_org, fat, cfg: Config):
    """The context organ decoder's loss: its segmentation, and its calibration."""
    return _seg_loss(_logits(organs, tokens, x, cfg), y_org) + _calibration_error(organs.calibration(organs.histogram(x)), fat)


def _calibration_error(calibration, fat):
    """What the context decoder's ``calibration`` of a batch is taught (``fat`` as :class:`Stack`
    has it): fat's height above air (relative error), and whether the slice can be calibrated."""
    predicted, gate = calibration
    known = ~torch.isnan(fat)
    height = ((predicted[known] / fat[known] - 1) ** 2).mean() if known.any() else predicted.sum() * 0
    return height + F.binary_cross_entropy_with_logits(gate, known.float())


def fit_calibration(decoder, data: Stack, steps: int = 3000) -> None:
    """The context decoder's calibration network alone, on every slice's histogram at once, before
    the decoder trains: the mean-shift finds fat only from a start near it (fat and soft tissue are
    140 HU apart), and the decoder's own loop shows it 16 slices a step."""
    x = torch.from_numpy(data.image)
    with torch.no_grad():
        stats = torch.cat([decoder.histogram(x[i : i + 256]) for i in range(0, len(x), 256)])
    fat = torch.from_numpy(data.fat)
    opt = torch.optim.Adam(decoder.context.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = _calibration_error(decoder.calibration(stats), fat)
        opt.zero_grad()
        loss.backward()
        opt.step()
    log.info("calibration fitted on %d slices: loss %.4f", len(x), loss.item())
