"""``pacs-node bench``: per-stage times of the offline pipeline on phantom series (medians over repeats)."""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime
from rich.console import Console
from rich.table import Table

from node import __version__
from node.phantom import Phantom
from node.phantom_dicom import write_axial_series
from node.pipeline import Pipeline
from node.series import find_series

STAGES = (
    "load",
    "preprocess",
    "inference",
    "postprocess",
    "measure",
    "encode_seg",
    "encode_sr",
    "encode_gsps",
    "write",
)


def bench(
    pipeline: Pipeline, why: str, slice_counts: list[int], size: int, repeat: int, output: Path | None
) -> int:
    console = Console()
    env = {
        "pacs_node": __version__,
        "model": f"{pipeline.model.name} {pipeline.model.version}",
        "runtime": pipeline.runtime.name,
        "device": pipeline.runtime.device,
        "onnxruntime": onnxruntime.__version__,
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    console.print(f"runtime {pipeline.runtime.name} ({why}); {repeat} repeats, medians")
    runs = []
    for n in slice_counts:
        with tempfile.TemporaryDirectory(prefix="pacs-node-bench-") as tmp:
            src, out = Path(tmp) / "in", Path(tmp) / "out"
            write_axial_series(
                Phantom.random(11, n_lesions=3),
                src,
                shape=(n, size, size),
                pixel_spacing=400.0 / size,
                slice_spacing=max(0.6, 300.0 / n),
                z_center=0.0,
            )
            series, _ = find_series([src])
            samples = []
            for _ in range(repeat):
                result = pipeline.process(series[0], out)
                if not result.ok:
                    raise RuntimeError(result.error)
                samples.append(result.seconds)
        med = {s: statistics.median(x.get(s, 0.0) for x in samples) for s in STAGES}
        total = statistics.median(sum(x.values()) for x in samples)
        runs.append(
            {
                "slices": n,
                "size": size,
                "total_s": round(total, 3),
                "stages_s": {k: round(v, 3) for k, v in med.items()},
            }
        )
    table = Table(title=f"offline pipeline, {size}x{size} CT phantom, {env['runtime']} on {env['device']}")
    table.add_column("stage")
    for r in runs:
        table.add_column(f"{r['slices']} slices (s)", justify="right")
    for s in STAGES:
        table.add_row(s, *(f"{r['stages_s'][s]:.2f}" for r in runs))
    table.add_row("total", *(f"{r['total_s']:.2f}" for r in runs))
    table.add_row("slices/s", *(f"{r['slices'] / r['total_s']:.1f}" for r in runs))
    console.print(table)
    if output:
        output.write_text(json.dumps({"environment": env, "runs": runs}, indent=2) + "\n")
        console.print(f"written to {output}")
    return 0
