"""A Curia-shaped benchmark backbone: ViT-B/16 over 512x512 slices, random weights.

Same interface as the reference backbone (``image (N, 2, S, S)`` -> ``tokens
(N, T, D)``, ``cls (N, D)``) and the same head kinds (organ and lesion
decoders, series-level lesion presence), at the size of Raidium's Curia:
patch 16, width 768, 12 layers, 12 heads, MLP 3072, 1024 patch tokens + CLS,
about 214 GFLOP per slice. Speed does not depend on the weights, so they are
random (seeded): its outputs mean nothing, only its throughput does.

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

import yaml

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViTConfig:
    size: int = 512
    patch: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp: int = 3072
    channels: int = 2
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


def build(cfg: ViTConfig = CURIA, seed: int = 0):
    """(backbone, organs head, lesions head, presence head) torch modules with random weights."""
    import torch

    from node.tools.train_reference import Backbone, Config, PresenceHead, SegHead, SegProbs

    torch.manual_seed(seed)
    head_cfg = Config(size=cfg.size, patch=cfg.patch, dim=cfg.dim, channels=cfg.channels)
    vit_cfg = replace(head_cfg, depth=cfg.depth, heads=cfg.heads, mlp_ratio=cfg.mlp // cfg.dim)
    return (
        Backbone(vit_cfg).eval(),
        SegProbs(SegHead(head_cfg, 6)).eval(),
        SegProbs(SegHead(head_cfg, 2)).eval(),
        PresenceHead(head_cfg).eval(),
    )


def export(
    out: Path, cfg: ViTConfig = CURIA, torch_programs: bool = True, name: str = "curia-vitb16"
) -> Path:
    """Write a model folder: model.yaml, backbone + head ONNX graphs, and (optionally) .pt2 programs."""
    import torch

    from node.model.manifest import MODELS_DIR
    from node.model.runtimes.torch import export_program

    out.mkdir(parents=True, exist_ok=True)
    backbone, organs, lesions, presence = build(cfg)
    torch.backends.mha.set_fastpath_enabled(False)
    image = torch.zeros(2, cfg.channels, cfg.size, cfg.size)
    with torch.no_grad():
        tokens, _ = backbone(image)
    common = {"opset_version": 17, "dynamo": False}
    n = {0: "n"}
    graphs = [
        (backbone, (image,), "backbone", ["image"], ["tokens", "cls"], {"image": n, "tokens": n, "cls": n}),
        (organs, (tokens, image), "head_organs", ["tokens", "image"], ["probabilities"], None),
        (lesions, (tokens, image), "head_lesions", ["tokens", "image"], ["probabilities"], None),
        (presence, (tokens,), "head_lesion_presence", ["tokens"], ["probability"], {"tokens": {0: "slices"}}),
    ]
    for module, args, stem, ins, outs, dyn in graphs:
        dyn = dyn or {"tokens": n, "image": n, "probabilities": n}
        log.info("exporting %s", stem)
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                out / f"{stem}.onnx",
                input_names=ins,
                output_names=outs,
                dynamic_axes=dyn,
                **common,
            )
        if torch_programs:
            batch = torch.export.Dim("slices" if stem.endswith("presence") else "n", min=1, max=4096)
            export_program(module, args, out / f"{stem}.pt2", {k: {0: batch} for k in ins})
    manifest = yaml.safe_load((MODELS_DIR / "phantom-fm" / "model.yaml").read_text())
    manifest.update(
        name=name,
        version="0.0.0-bench",
        description=(
            f"Curia-shaped benchmark backbone (ViT, patch {cfg.patch}, width {cfg.dim}, depth {cfg.depth}, "
            f"{cfg.size}x{cfg.size}) with RANDOM weights: for throughput measurements only, its outputs are noise"
        ),
    )
    manifest["input"]["size"] = cfg.size
    manifest["backbone"]["batch"] = cfg.batch
    (out / "model.yaml").write_text(
        "# written by `python -m node.tools.curia_shaped`: a benchmark model, random weights, never for patients\n"
        + yaml.safe_dump(manifest, sort_keys=False)
    )
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
