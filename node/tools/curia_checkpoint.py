"""A Curia-format checkpoint with random weights, imported like a real one: for benchmarks.

One command writes what a department downloads from Hugging Face (``raidium/curia``: a
``Dinov2Model`` with hidden size 768, 12 layers, 12 heads, patch 16, image 512, one channel, saved
by ``save_pretrained``; a ``preprocessor_config.json``) and one classification head in
transformers' format, then runs the importer on them, exactly as for the real model::

    python -m node.tools.curia_checkpoint --out /tmp/curia     # needs the import extra
    pacs-node bench --model /tmp/curia/model --slices          # backbone throughput vs the matmul peak

Speed does not depend on the weights, so they are random (seeded): its outputs mean nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# transformers' Dinov2Config of raidium/curia
CURIA_CONFIG = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    patch_size=16,
    image_size=512,
    num_channels=1,
)


def write_checkpoint(folder: Path, seed: int = 0, **overrides) -> Path:
    """``folder``/checkpoint (the backbone) and ``folder``/head_example (a 3-class head reading CLS +
    mean patch token), in transformers' own formats."""
    import torch
    import transformers
    from safetensors.torch import save_file

    cfg = {**CURIA_CONFIG, **overrides}
    torch.manual_seed(seed)
    backbone = folder / "checkpoint"
    transformers.Dinov2Model(transformers.Dinov2Config(**cfg)).save_pretrained(backbone)
    (backbone / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "CuriaImageProcessor", "clip_below_air": True})
    )
    head = folder / "head_example"
    head.mkdir(parents=True, exist_ok=True)
    labels = {0: "class 0", 1: "class 1", 2: "class 2"}
    transformers.Dinov2Config(**cfg, id2label=labels, label2id={v: k for k, v in labels.items()}).to_json_file(
        head / "config.json"
    )
    width = 2 * cfg["hidden_size"]
    save_file(
        {"classifier.weight": torch.randn(3, width) * 0.02, "classifier.bias": torch.zeros(3)},
        str(head / "model.safetensors"),
    )
    return folder


def main(argv: list[str] | None = None) -> int:
    from node.model.importers.huggingface import import_huggingface

    p = argparse.ArgumentParser(prog="python -m node.tools.curia_checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for checkpoint/, head_example/ and model/")
    p.add_argument("--layers", type=int, default=CURIA_CONFIG["num_hidden_layers"], help="fewer for a quick check")
    p.add_argument("--size", type=int, default=CURIA_CONFIG["image_size"])
    a = p.parse_args(argv)
    write_checkpoint(a.out, num_hidden_layers=a.layers, image_size=a.size)
    model = import_huggingface(
        a.out / "checkpoint",
        a.out / "model",
        [a.out / "head_example"],
        name="curia-format-bench",
        version="0.0.0-bench",
        warn=lambda message: None,  # its labels are placeholders: local codes are expected
    )
    print(f"wrote {a.out / 'checkpoint'} (Curia format, random weights) and imported it into {model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
