"""A Curia-shaped benchmark model: a ViT-B/16 ``Dinov2Model`` over 512x512 one-channel slices
with the reference model's heads, random weights.

A true Curia-format checkpoint (transformers' ``Dinov2Model``: patch 16, width 768, 12 layers,
12 heads, MLP 3072, 1024 patch tokens + CLS, about 213 GFLOP per slice) and the same head kinds
as ``phantom-fm`` (organ and lesion decoders, series-level lesion presence), imported by the
importer like a real download. Speed does not depend on the weights, so they are random
(seeded): its outputs mean nothing, only its throughput does.

One command writes a complete model folder (manifest, ONNX graphs, and the
``torch.export`` programs the PyTorch backend runs)::

    python -m node.tools.curia_shaped --out models/curia-vitb16      # needs the train extra (torch, onnx)
    pacs-node bench --model models/curia-vitb16 ...

:func:`vit_flops` counts its multiply-adds analytically (no torch needed).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViTConfig:
    size: int = 512
    patch: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp: int = 3072
    channels: int = 1
    batch: int = 16  # the manifest's slice batch

    @property
    def tokens(self) -> int:
        return (self.size // self.patch) ** 2


CURIA = ViTConfig()


def vit_flops(cfg: ViTConfig = CURIA) -> float:
    """FLOPs (2 per multiply-add) of one slice through the backbone: matrix products only.

    Patch embedding, then per layer QKV, attention scores and values, output projection and
    the MLP, over T+1 tokens. Softmax, norms and GELU are O(T*D) and left out (<0.5%).
    """
    t, d = cfg.tokens + 1, cfg.dim
    embed = 2 * cfg.tokens * d * cfg.channels * cfg.patch**2
    per_layer = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * cfg.mlp
    return float(embed + cfg.depth * per_layer)


def export(
    out: Path, cfg: ViTConfig = CURIA, torch_programs: bool = True, name: str = "curia-vitb16", seed: int = 0
) -> Path:
    """Write a model folder through the importer: a ``Dinov2Model`` checkpoint of ``cfg`` (Curia's
    format) and pacs-node's organ, lesion and presence heads, all with random (seeded) weights."""
    import tempfile

    import torch
    import transformers

    from node.model.importers.heads import segmentation_decoder
    from node.model.importers.huggingface import import_huggingface
    from node.tools.train_reference import write_heads

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="curia-shaped-") as tmp:
        src = Path(tmp) / name
        config = transformers.Dinov2Config(
            hidden_size=cfg.dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
            mlp_ratio=cfg.mlp // cfg.dim, patch_size=cfg.patch, image_size=cfg.size, num_channels=1,
        )  # fmt: skip
        transformers.Dinov2Model(config).save_pretrained(src)
        organs, lesions = (segmentation_decoder(cfg.dim, cfg.patch, k) for k in (6, 2))
        heads = write_heads(Path(tmp), cfg.dim, cfg.patch, organs, lesions)
        log.info("importing %s", name)
        import_huggingface(
            src, out, heads, name=name, version="0.0.0-bench", batch=cfg.batch,
            description=f"Curia-shaped benchmark backbone (DINOv2, patch {cfg.patch}, width {cfg.dim}, "
            f"depth {cfg.depth}, {cfg.size}x{cfg.size}) with RANDOM weights: for throughput measurements only, "
            "its outputs are noise",
        )  # fmt: skip
    if not torch_programs:
        for program in out.glob("*.pt2"):
            program.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m node.tools.curia_shaped", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--size", type=int, default=CURIA.size)
    p.add_argument("--patch", type=int, default=CURIA.patch)
    p.add_argument("--dim", type=int, default=CURIA.dim)
    p.add_argument("--depth", type=int, default=CURIA.depth)
    p.add_argument("--heads", type=int, default=CURIA.heads)
    p.add_argument("--mlp", type=int, default=CURIA.mlp)
    p.add_argument("--batch", type=int, default=CURIA.batch)
    p.add_argument("--no-torch", action="store_true", help="ONNX only (no .pt2 for the PyTorch backend)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = replace(
        CURIA, size=a.size, patch=a.patch, dim=a.dim, depth=a.depth, heads=a.heads, mlp=a.mlp, batch=a.batch
    )
    export(a.out, cfg, torch_programs=not a.no_torch)
    print(f"wrote {a.out} ({vit_flops(cfg) / 1e9:.1f} GFLOP per slice)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
