"""Every GPU figure the project owes, in one prepared run that cannot waste a lent GPU.

A GPU machine is lent only by chance and for about 15 minutes in all, with no network: this script
is what such a session runs, once (see BENCHMARKS.md, "Owed", for the command with the wheels it
carries). It measures, each part on its own clock and in its own ``try`` so a failing part costs
only itself, and writes ``gpu-bench.json`` and ``gpu-bench.log`` to ``--out`` as it goes:

1. the machine: GPU, driver, torch, memory;
2. the matmul peak, bf16 8192^3 (the yardstick every fraction below is taken against, same run);
3. the Curia-format backbone (transformers ``Dinov2Model``, the exact Curia config, random weights)
   at 512x512: slices/s, achieved TFLOP/s and fraction of the peak, bf16 and fp16, eager over
   batches 16-256 and ``torch.compile`` (CUDA graphs) at the batches that matter; peak GPU memory;
4. the same checkpoint imported by ``pacs-node models import`` and run by the node's PyTorch
   runtime: backbone and head throughput, then the whole offline pipeline on a 300-slice 512x512 CT
   phantom, each stage's time and the share that is not inference;
5. the precision gate's verdicts for bf16 and fp16 on that model against FP32;
6. the node's 3D sliding window (``node.model.sliding_window``, nnU-Net's predictor in numpy) with
   an nnU-Net-shaped network in torch on the device (TotalSegmentator's 3d_fullres layout, random
   weights) on a 300-slice 512x512 CT at 1.5 mm: seconds per series, tiles/s, each stage.

``--dry-run`` does all of it on the CPU at toy sizes (the test suite runs it so the script is known
to work before a GPU is lent).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from node.tools.curia_checkpoint import CURIA_CONFIG as CURIA
from node.tools.curia_checkpoint import write_checkpoint

log = logging.getLogger("gpu_bench")


TOY = dict(
    CURIA, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=64
)


def vit_flops(cfg: dict) -> float:
    """FLOPs (2 per multiply-add) of one slice through the backbone's matrix products."""
    from node.tools.curia_shaped import ViTConfig
    from node.tools.curia_shaped import vit_flops as count

    return count(
        ViTConfig(
            size=cfg["image_size"],
            patch=cfg["patch_size"],
            dim=cfg["hidden_size"],
            depth=cfg["num_hidden_layers"],
            heads=cfg["num_attention_heads"],
            mlp=cfg["intermediate_size"],
            channels=cfg["num_channels"],
        )
    )


class Report:
    """The JSON written after every part, so a run cut short still leaves what it measured."""

    def __init__(self, out: Path):
        self.out = out
        self.data: dict = {"parts": {}}
        out.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(out / "gpu-bench.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logging.getLogger().addHandler(handler)

    def part(self, name: str, fn: Callable[[], dict]) -> dict | None:
        t0 = time.monotonic()
        log.info("== %s", name)
        try:
            result = fn()
            result["seconds"] = round(time.monotonic() - t0, 1)
            self.data["parts"][name] = result
            log.info("%s: %s", name, json.dumps(result))
        except Exception as e:  # one part failing must not cost the others
            self.data["parts"][name] = {
                "error": f"{type(e).__name__}: {e}",
                "seconds": round(time.monotonic() - t0, 1),
            }
            log.error("%s failed:\n%s", name, traceback.format_exc())
            result = None
        (self.out / "gpu-bench.json").write_text(json.dumps(self.data, indent=1))
        return result


def _timed(fn: Callable[[], None], sync: Callable[[], None], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine(torch, device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=p.name,
            memory_gib=round(p.total_memory / 2**30, 1),
            multiprocessors=p.multi_processor_count,
            capability=f"{p.major}.{p.minor}",
            cuda=torch.version.cuda,
        )
    return info


def matmul_peak(torch, device: str, n: int, sync) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    s = _timed(lambda: a @ b, sync, 10)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": round(2 * n**3 / s / 1e12, 3)}


def backbone_throughput(
    torch, transformers, device: str, cfg: dict, peak: float, batches, dtypes, compile_at, sync
) -> dict:
    torch.manual_seed(0)
    model = transformers.Dinov2Model(transformers.Dinov2Config(**cfg)).eval().to(device)
    flops = vit_flops(cfg)
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        m = model.to(dtype)
        variants = [("eager", m, batches)]
        if compile_at and dtype_name == "bfloat16":
            variants.append(("compile", torch.compile(m, mode="reduce-overhead"), compile_at))
        for mode, fn, sizes in variants:
            for b in sizes:
                x = torch.randn(b, 1, cfg["image_size"], cfg["image_size"], device=device, dtype=dtype)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                with torch.inference_mode():
                    for _ in range(3):  # warm-up (compilation, CUDA graph capture)
                        fn(pixel_values=x)
                    s = _timed(lambda fn=fn, x=x: fn(pixel_values=x), sync, 5)
                tflops = b * flops / s / 1e12
                row = {
                    "dtype": dtype_name,
                    "mode": mode,
                    "batch": b,
                    "slices_per_s": round(b / s, 1),
                    "tflops": round(tflops, 3),
                    "fraction_of_peak": round(tflops / peak, 3) if peak else None,
                }
                if device == "cuda":
                    row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                rows.append(row)
                log.info("%s", row)
    return {"gflop_per_slice": round(flops / 1e9, 2), "config": cfg, "rows": rows}


def node_runtime(work: Path, cfg: dict, slices: int, size: int, dry: bool) -> dict:
    """The checkpoint imported by the node's importer, through the node's PyTorch runtime and pipeline."""
    import numpy as np

    from node.ingest.series import find_series
    from node.model.importers.huggingface import import_huggingface
    from node.model.manifest import load_model
    from node.model.select import select_runtime
    from node.pipeline import Pipeline
    from node.synthetic.dicom import write_axial_series
    from node.synthetic.phantom import Phantom

    write_checkpoint(work, **cfg)
    model = load_model(
        import_huggingface(work / "checkpoint", work / "model", [work / "head_example"], warn=lambda m: None)
    )
    out: dict = {}
    for precision in ("fp32",) if dry else ("bf16", "fp16"):
        rt, why = select_runtime(model, "torch", precision)
        x = np.random.default_rng(0).standard_normal((model.backbone.batch, 1, size, size)).astype(np.float32)
        rt.infer(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(5):
            rt.infer(x)
        out[f"backbone_and_heads_{precision}_slices_per_s"] = round(
            5 * len(x) / (time.perf_counter() - t0), 1
        )
        out[f"runtime_{precision}"] = f"{rt.name} {rt.precision} ({why})"
        out[f"gate_{precision}"] = rt.gate.message() if rt.gate is not None else "not gated (fp32)"
    ct = write_axial_series(
        Phantom.random(1, n_lesions=3), work / "ct", modality="CT", shape=(slices, size, size),
        pixel_spacing=round(400.0 / size, 4), slice_spacing=round(300.0 / slices, 3), seed=1,
    )  # fmt: skip
    (series,), _ = find_series([ct.files[0].parent])
    rt, _ = select_runtime(model, "torch", "auto")
    pipeline = Pipeline(model, rt)
    pipeline.process(series, work / "warm")  # first series pays for lazy set-up; measure the second
    t0 = time.perf_counter()
    result = pipeline.process(series, work / "out")
    total = time.perf_counter() - t0
    stages = {str(k): round(v, 3) for k, v in result.seconds.items()}
    inference = result.seconds.get("inference", 0.0)
    out.update(
        pipeline_slices=slices,
        pipeline_size=size,
        pipeline_runtime=f"{rt.name} {rt.precision}",
        pipeline_seconds=round(total, 2),
        pipeline_stages_s=stages,
        pipeline_not_inference_share=round(1 - inference / total, 3) if total else None,
    )
    return out


def unet3d(torch, features: tuple[int, ...], classes: int):
    """nnU-Net's PlainConvUNet layout (two conv-norm-LeakyReLU per stage, strided-conv down,
    transposed-conv up, skips), built here so the GPU machine needs no nnunetv2."""
    nn = torch.nn

    def stage(cin: int, cout: int, stride: int):
        return nn.Sequential(
            nn.Conv3d(cin, cout, 3, stride, 1), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(inplace=True),
            nn.Conv3d(cout, cout, 3, 1, 1), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(inplace=True),
        )  # fmt: skip

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            chans = (1, *features)
            self.down = nn.ModuleList(
                stage(chans[i], chans[i + 1], 1 if i == 0 else 2) for i in range(len(features))
            )
            ups = range(len(features) - 1, 0, -1)
            self.up = nn.ModuleList(nn.ConvTranspose3d(features[i], features[i - 1], 2, 2) for i in ups)
            self.merge = nn.ModuleList(stage(2 * features[i - 1], features[i - 1], 1) for i in ups)
            self.head = nn.Conv3d(features[0], classes, 1)

        def forward(self, x):
            skips = []
            for d in self.down:
                x = d(x)
                skips.append(x)
            for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1]), strict=True):
                x = merge(torch.cat([up(x), skip], 1))
            return self.head(x)

    return UNet()


def sliding_window_3d(torch, device: str, dry: bool, sync) -> dict:
    """The node's sliding window with an nnU-Net-shaped network on the device (bf16 autocast)."""
    import numpy as np

    from node.model.manifest import IntensitySpec, Patch3DSpec
    from node.model.sliding_window import segment
    from node.synthetic.dicom import axial_affine
    from node.synthetic.phantom import Phantom
    from node.timing import Stopwatch

    if dry:
        features, classes, patch, shape, spacing = (4, 8, 16), 5, (16, 16, 16), (16, 32, 32), (5.0, 4.0, 4.0)
    else:  # TotalSegmentator's parts: 6 stages 32-320, 25 classes (24 structures), patch 128^3 at 1.5 mm
        features, classes, patch, shape, spacing = (
            (32, 64, 128, 256, 320, 320),
            25,
            (128,) * 3,
            (300, 512, 512),
            (1.25, 0.78125, 0.78125),
        )
    net = unet3d(torch, features, classes).to(device).eval()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16

    @torch.inference_mode()
    def run(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x)
        t = t.pin_memory().to(device, non_blocking=True) if device == "cuda" else t
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            return net(t).float().cpu().numpy()

    affine = axial_affine(shape, spacing[1], spacing[0], -20.0)
    image = Phantom.random(1, n_lesions=0).sample(affine, shape, "CT", seed=1).image
    spec = Patch3DSpec(
        axes="RAS", spacing=(1.5,) * 3 if not dry else (5.0, 4.0, 4.0), patch=patch, mirror_axes=()
    )
    intensity = IntensitySpec(kind="dataset", mean=40.0, std=200.0, clip=(-1000.0, 1500.0))
    run(np.zeros((1, 1, *patch), np.float32))  # warm-up: cuDNN picks its kernels
    sync()
    times, seg, clock = [], None, None
    for _ in range(1 if dry else 3):
        clock = Stopwatch()
        t0 = time.perf_counter()
        seg = segment(image, spacing, spec, intensity, run, clock)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {
        "network": f"PlainConvUNet-shaped {list(features)}, {classes} classes, patch {list(patch)}, {dtype}",
        "series": f"{shape[2]}x{shape[1]}x{shape[0]} CT phantom -> {spec.spacing} mm",
        "seconds_median": round(med, 2),
        "tiles": seg.tiles,
        "tiles_per_s": round(seg.tiles / clock.seconds.get("inference", med), 1),
        "stages_s": {str(k): round(v, 2) for k, v in clock.seconds.items()},
    }
    if device == "cuda":
        out["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m node.tools.gpu_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where gpu-bench.json and gpu-bench.log go ($OUT)")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: check the script, measure nothing")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("highdicom", "pydicom", "pynetdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    device = "cpu" if a.dry_run or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not a.dry_run:
        print("error: no CUDA device: run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    report = Report(a.out)
    report.part("machine", lambda: machine(torch, device))
    peak = (
        report.part("matmul_peak", lambda: matmul_peak(torch, device, 256 if a.dry_run else 8192, sync)) or {}
    )
    if a.dry_run:
        cfg, batches, dtypes, compile_at, slices, size = TOY, (2, 4), ("float32",), (), 6, 64
    else:
        # torch.compile takes about a minute per shape and dtype: once, where the node runs (bf16, batch 128)
        cfg, batches, dtypes, compile_at, slices, size = (
            CURIA,
            (16, 32, 64, 128, 256),
            ("bfloat16", "float16"),
            (128,),
            300,
            512,
        )
    report.part(
        "curia_backbone",
        lambda: backbone_throughput(
            torch, transformers, device, cfg, peak.get("tflops", 0.0), batches, dtypes, compile_at, sync
        ),
    )
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        report.part(
            "node_runtime_and_pipeline", lambda: node_runtime(Path(tmp), cfg, slices, size, a.dry_run)
        )
    report.part("sliding_window_3d", lambda: sliding_window_3d(torch, device, a.dry_run, sync))
    failed = [k for k, v in report.data["parts"].items() if "error" in v]
    print(f"wrote {a.out / 'gpu-bench.json'}; failed parts: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
