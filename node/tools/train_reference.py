"""Train and export the reference foundation model, ``phantom-fm`` (needs the ``train`` extra).

Its interface follows the public radiology foundation models (Raidium's Curia
in particular): a ViT backbone over 2D axial slices that yields patch tokens
and a CLS token, frozen after pre-training, and light task heads trained on
the frozen features. Only the sizes are small, so the CPU path stays usable.

Training is two stages, both on synthetic phantoms sampled directly on the
model grid:
1. pre-training: backbone + throw-away linear decoders on organ and lesion
   labels (a supervised stand-in for the self-supervised pre-training of a
   real foundation model);
2. the backbone is frozen; the shipped heads (organ decoder, lesion decoder,
   lesion-presence classifier) are trained from scratch on its features.

Export writes one ONNX graph for the backbone and one per head, so a head
can be retrained or added without touching the backbone.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.model.preprocess import normalise
from node.synthetic.phantom import ORGANS, Phantom, axial_affine

log = logging.getLogger(__name__)

try:
    import torch
    from torch import nn
    from torch.nn import functional as F
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "training needs PyTorch: pip install 'pacs-node[train]' (or torch==2.13.0 on CPU)"
    ) from e


@dataclass(frozen=True)
class Config:
    size: int = 128  # in-plane input size (pixels)
    patch: int = 8
    dim: int = 96
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2  # MLP width / dim (ViT-B uses 4)
    channels: int = 2  # wide window + soft-tissue window (CT); MR uses one normalisation twice
    n_train: int = 72  # phantoms
    slices_per_phantom: int = 24
    pretrain_steps: int = 900
    head_steps: int = 900
    cls_steps: int = 1500
    batch: int = 16
    seed: int = 7


# -- architecture ---------------------------------------------------------------


class Backbone(nn.Module):
    """ViT slice encoder: (N, C, S, S) -> patch tokens (N, T, D) and CLS (N, D)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.embed = nn.Conv2d(cfg.channels, cfg.dim, cfg.patch, stride=cfg.patch)
        n_tokens = (cfg.size // cfg.patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos = nn.Parameter(torch.randn(1, n_tokens + 1, cfg.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.dim,
            cfg.heads,
            cfg.dim * cfg.mlp_ratio,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, image):
        x = self.embed(image).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.norm(self.encoder(x))
        return x[:, 1:], x[:, 0]


class SegHead(nn.Module):
    """Light decoder: tokens fused with the slice at half resolution, refined at full resolution.

    Looking at the slice itself (not only the 8x8-pixel tokens) is what lets
    small lesions survive; the heavy fusion runs at half resolution to keep
    the CPU path cheap (~0.1 GFLOP per slice).
    """

    def __init__(self, cfg: Config, n_classes: int, width: int = 16):
        super().__init__()
        self.grid = cfg.size // cfg.patch
        self.proj = nn.Conv2d(cfg.dim, width, 1)
        self.down = nn.Sequential(nn.Conv2d(cfg.channels, width, 3, stride=2, padding=1), nn.GELU())
        self.fuse = nn.Sequential(
            nn.Conv2d(2 * width, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, 8, 3, padding=1),
            nn.GELU(),
        )
        self.refine = nn.Sequential(
            nn.Conv2d(8 + cfg.channels, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, n_classes, 1)
        )

    def forward(self, tokens, image):
        n, t, d = tokens.shape
        size = image.shape[-1]
        f = tokens.transpose(1, 2).reshape(n, d, self.grid, self.grid)
        f = F.interpolate(self.proj(f), size=(size // 2, size // 2), mode="bilinear", align_corners=False)
        f = self.fuse(torch.cat([f, self.down(image)], dim=1))
        f = F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False)
        return self.refine(torch.cat([f, image], dim=1))


class SegProbs(nn.Module):
    """Export wrapper: a segmentation head that outputs softmax probabilities."""

    def __init__(self, head: SegHead):
        super().__init__()
        self.head = head

    def forward(self, tokens, image):
        return torch.softmax(self.head(tokens, image), dim=1)


class PresenceHead(nn.Module):
    """Series-level classifier: a score per patch token, max-pooled over every slice (a 3D task from 2D features).

    Patch tokens rather than CLS: a 5 mm lesion is a few tokens of one slice,
    which a global CLS summary dilutes.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, 64), nn.GELU(), nn.Linear(64, 1))

    def forward(self, tokens):  # (S, T, D) -> (1,) probability
        return torch.sigmoid(self.mlp(tokens).amax(dim=(0, 1)))


# -- data -------------------------------------------------------------------------


def make_dataset(cfg: Config, seeds: range, rng: np.random.Generator):
    """Phantom slices on the model grid: images (N,C,S,S), organ labels, lesion masks, volume ids."""
    images, organs, lesions, vol_ids = [], [], [], []
    for vid, seed in enumerate(seeds):
        ph = Phantom.random(seed, n_lesions=0 if rng.random() < 0.15 else int(rng.integers(1, 6)))
        modality = "CT" if rng.random() < 0.6 else "MR"
        fov = rng.uniform(330, 500)
        spacing = fov / cfg.size
        # half the volumes centred on a lesion so the lesion decoder sees enough positives
        z = (
            ph.lesions[int(rng.integers(len(ph.lesions)))].center[2]
            if ph.lesions and rng.random() < 0.5
            else 0.0
        )
        z += rng.uniform(-40, 40)
        shape = (cfg.slices_per_phantom, cfg.size, cfg.size)
        affine = axial_affine(shape, spacing, float(rng.uniform(2.5, 10.0)), z)
        noise = float(rng.uniform(0, 25)) if modality == "CT" else float(rng.uniform(0.5, 4))
        s = ph.sample(affine, shape, modality, noise=noise, seed=seed, mr_gain=float(rng.uniform(0.3, 4.0)))
        image = s.image
        if rng.random() < 0.5:  # partial-volume blur, as when a fine slice is resized down
            from scipy.ndimage import gaussian_filter

            image = gaussian_filter(image, (0, rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0)))
        images.append(normalise(image, modality))
        organs.append(s.organs)
        lesions.append((s.lesion > 0).astype(np.uint8))
        vol_ids.append(np.full(shape[0], vid))
    return (
        torch.from_numpy(np.concatenate(images)),
        torch.from_numpy(np.concatenate(organs).astype(np.int64)),
        torch.from_numpy(np.concatenate(lesions).astype(np.int64)),
        np.concatenate(vol_ids),
    )


def _dice_loss(logits, target, n_classes):
    p = torch.softmax(logits, 1)
    t = F.one_hot(target, n_classes).permute(0, 3, 1, 2).float()
    inter = (p * t).sum((0, 2, 3))
    return 1 - ((2 * inter + 1) / (p.sum((0, 2, 3)) + t.sum((0, 2, 3)) + 1))[1:].mean()


def _seg_loss(logits, target, n_classes, weight=None):
    return F.cross_entropy(logits, target, weight=weight) + _dice_loss(logits, target, n_classes)


# -- training ---------------------------------------------------------------------


def train(out_dir: Path, cfg: Config = Config()) -> dict:
    """Train both stages and export the ONNX graphs into ``out_dir``. Returns training stats."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    x, y_org, y_les, vol_ids = make_dataset(cfg, range(1000, 1000 + cfg.n_train), rng)
    log.info("dataset: %d slices in %.0f s", len(x), time.perf_counter() - t0)
    n_org = len(ORGANS) + 1
    les_w = torch.tensor([1.0, 8.0])
    lesion_slices = torch.nonzero(y_les.flatten(1).any(1)).ravel()

    def draw() -> torch.Tensor:
        """Half of every batch from slices with a lesion: they are rare, and small."""
        half = cfg.batch // 2 if len(lesion_slices) else 0
        pos = lesion_slices[torch.randint(max(1, len(lesion_slices)), (half,))]
        return torch.cat([pos, torch.randint(len(x), (cfg.batch - half,))])

    backbone = Backbone(cfg)
    aux_org = nn.Conv2d(cfg.dim, n_org, 1)
    aux_les = nn.Conv2d(cfg.dim, 2, 1)
    grid = cfg.size // cfg.patch

    def aux_logits(tokens, conv):
        f = tokens.transpose(1, 2).reshape(tokens.shape[0], cfg.dim, grid, grid)
        return F.interpolate(conv(f), size=(cfg.size, cfg.size), mode="bilinear", align_corners=False)

    params = [*backbone.parameters(), *aux_org.parameters(), *aux_les.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=cfg.pretrain_steps, pct_start=0.1)
    for step in range(cfg.pretrain_steps):
        idx = draw()
        xb = _augment(x[idx])
        tokens, _ = backbone(xb)
        loss = _seg_loss(aux_logits(tokens, aux_org), y_org[idx], n_org) + _seg_loss(
            aux_logits(tokens, aux_les), y_les[idx], 2, les_w
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0:
            log.info("pretrain %d/%d loss %.3f", step, cfg.pretrain_steps, loss.item())

    # stage 2: frozen backbone, shipped heads trained on its features
    backbone.eval().requires_grad_(False)
    organs_head, lesions_head, presence = SegHead(cfg, n_org), SegHead(cfg, 2), PresenceHead(cfg)
    with torch.no_grad():
        feats = [backbone(x[i : i + 64]) for i in range(0, len(x), 64)]
    tokens_all = torch.cat([f[0] for f in feats])
    params = [*organs_head.parameters(), *lesions_head.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=cfg.head_steps, pct_start=0.1)
    for step in range(cfg.head_steps):
        idx = draw()
        loss = _seg_loss(organs_head(tokens_all[idx], x[idx]), y_org[idx], n_org) + _seg_loss(
            lesions_head(tokens_all[idx], x[idx]), y_les[idx], 2, les_w
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0:
            log.info("heads %d/%d loss %.3f", step, cfg.head_steps, loss.item())

    # series-level presence: each training volume is a bag of slices
    bags = [np.flatnonzero(vol_ids == v) for v in np.unique(vol_ids)]
    labels = torch.tensor([float(y_les[b].any()) for b in bags])
    train_presence(presence, tokens_all, y_les, bags, cfg.cls_steps, rng)
    stats = {
        "train_slices": len(x),
        "train_volumes": len(bags),
        "positive_volumes": int(labels.sum()),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "parameters": {
            "backbone": sum(p.numel() for p in backbone.parameters()),
            "organs": sum(p.numel() for p in organs_head.parameters()),
            "lesions": sum(p.numel() for p in lesions_head.parameters()),
            "lesion_presence": sum(p.numel() for p in presence.parameters()),
        },
    }
    export(out_dir, cfg, backbone, organs_head, lesions_head, presence)
    (out_dir / "training.json").write_text(json.dumps({"config": cfg.__dict__, **stats}, indent=2) + "\n")
    return stats


def train_presence(presence, tokens_all, y_les, bags, steps: int, rng: np.random.Generator) -> None:
    """Train the series-level head on bags of consecutive slices, as many without a lesion as with.

    Bags vary in length, so the max-pooled score learns not to fire more often on long series.
    """
    has = y_les.flatten(1).any(1).numpy()
    opt = torch.optim.AdamW(presence.parameters(), lr=1e-3, weight_decay=0.01)

    def bag(positive: bool) -> np.ndarray:
        for _ in range(50):
            b = bags[int(rng.integers(len(bags)))]
            start = int(rng.integers(len(b)))
            sub = b[start : start + int(rng.integers(4, len(b) + 1))]
            if has[sub].any() == positive:
                return sub
        return sub

    for step in range(steps):
        loss = sum(
            F.binary_cross_entropy(
                presence(tokens_all[sub]).clamp(1e-6, 1 - 1e-6), torch.tensor([float(has[sub].any())])
            )
            for sub in (bag(True), bag(False), bag(True), bag(False))
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0:
            log.info("presence %d/%d loss %.3f", step, steps, loss.item() / 4)


def retrain_presence(model_dir: Path, cfg: Config = Config()) -> None:
    """Retrain only the lesion-presence head on the *exported* frozen backbone, and export only that head.

    This is how a head is added or improved without re-exporting the backbone.
    """
    import onnxruntime as ort

    torch.manual_seed(cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed)
    x, _, y_les, vol_ids = make_dataset(cfg, range(1000, 1000 + cfg.n_train), rng)
    session = ort.InferenceSession(str(model_dir / "backbone.onnx"), providers=["CPUExecutionProvider"])
    tokens = np.concatenate(
        [session.run(["tokens"], {"image": x[i : i + 64].numpy()})[0] for i in range(0, len(x), 64)]
    )
    presence = PresenceHead(cfg)
    bags = [np.flatnonzero(vol_ids == v) for v in np.unique(vol_ids)]
    train_presence(presence, torch.from_numpy(tokens), y_les, bags, cfg.cls_steps, rng)
    torch.backends.mha.set_fastpath_enabled(False)
    torch.onnx.export(
        presence.eval(),
        (torch.from_numpy(tokens[:2]),),
        model_dir / "head_lesion_presence.onnx",
        input_names=["tokens"],
        output_names=["probability"],
        dynamic_axes={"tokens": {0: "slices"}},
        opset_version=17,
        dynamo=False,
    )


def _augment(xb):
    """Random flips are wrong for anatomy (left/right matters); use intensity jitter only."""
    scale = 1 + 0.1 * torch.randn(xb.shape[0], 1, 1, 1)
    shift = 0.05 * torch.randn(xb.shape[0], 1, 1, 1)
    return xb * scale + shift


def export(out_dir: Path, cfg: Config, backbone, organs_head, lesions_head, presence) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # the fused "fast path" kernel of nn.TransformerEncoderLayer has no ONNX export
    torch.backends.mha.set_fastpath_enabled(False)
    image = torch.zeros(2, cfg.channels, cfg.size, cfg.size)
    tokens, _ = backbone(image)
    common = {"opset_version": 17, "dynamo": False}
    torch.onnx.export(
        backbone,
        (image,),
        out_dir / "backbone.onnx",
        input_names=["image"],
        output_names=["tokens", "cls"],
        dynamic_axes={"image": {0: "n"}, "tokens": {0: "n"}, "cls": {0: "n"}},
        **common,
    )
    for name, head in (("organs", organs_head), ("lesions", lesions_head)):
        torch.onnx.export(
            SegProbs(head).eval(),
            (tokens, image),
            out_dir / f"head_{name}.onnx",
            input_names=["tokens", "image"],
            output_names=["probabilities"],
            dynamic_axes={"tokens": {0: "n"}, "image": {0: "n"}, "probabilities": {0: "n"}},
            **common,
        )
    torch.onnx.export(
        presence.eval(),
        (tokens,),
        out_dir / "head_lesion_presence.onnx",
        input_names=["tokens"],
        output_names=["probability"],
        dynamic_axes={"tokens": {0: "slices"}},
        **common,
    )
