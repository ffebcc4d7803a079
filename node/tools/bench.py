"""``pacs-node bench``: model throughput against the measured hardware limit, and per-stage pipeline times.

1. *throughput*: slices/s of the backbone alone and of backbone + every head, on full
   batches of the model's batch size, the FLOPs of one slice counted from the ONNX graphs
   (MatMul/Gemm/Conv; shapes from ONNX shape inference, unresolved ones from one ONNX
   Runtime pass), achieved TFLOP/s and its fraction of the matrix-product peak measured
   in the same run (numpy and, if importable, torch FP32 on the CPU; torch BF16 on CUDA);
   peak memory (process RSS; CUDA: torch's peak allocation).
2. *pipeline*: the offline pipeline on CT phantoms of the given slice counts, every stage
   timed (medians over repeats).
Results go to the terminal and, with ``--output``, to a JSON file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
from rich.console import Console
from rich.table import Table

from node import __version__
from node.identity import Stage
from node.ingest.series import find_series
from node.pipeline import Pipeline
from node.synthetic.dicom import write_axial_series
from node.synthetic.phantom import Phantom
from node.tools import peak_rss_mib

# the pipeline's stages, in order (fetch, context, store and deliver are the node's; the bench has no prior)
STAGES = tuple(
    s for s in Stage if s not in (Stage.FETCH, Stage.CONTEXT, Stage.COMPARE, Stage.STORE, Stage.DELIVER)
)
FLOP_OPS = ("MatMul", "Gemm", "Conv")


def graph_flops(path: Path, batch: int = 1) -> float | None:
    """FLOPs (2 per multiply-add) of one sample through an ONNX graph's MatMul/Gemm/Conv nodes.

    None when the ``onnx`` package is missing (it is in the train extra, not a runtime dependency).
    """
    if importlib.util.find_spec("onnx") is None:
        return None
    import onnx
    from onnx import TensorProto, helper, shape_inference

    m = onnx.load(str(path))
    for inp in m.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    m = shape_inference.infer_shapes(m, data_prop=True)

    def dims(vi) -> list:
        return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]

    shapes = {vi.name: dims(vi) for vi in [*m.graph.value_info, *m.graph.input, *m.graph.output]}
    shapes.update({i.name: list(i.dims) for i in m.graph.initializer})
    nodes = [n for n in m.graph.node if n.op_type in FLOP_OPS]
    missing = {
        x
        for n in nodes
        for x in (n.input[0], n.input[1], n.output[0])
        if not shapes.get(x) or None in shapes[x]
    }
    if missing:  # shapes behind computed Reshapes (attention): read them off one real pass
        have = {o.name for o in m.graph.output}
        for name in sorted(missing - have):
            m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        opts = onnxruntime.SessionOptions()
        opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        sess = onnxruntime.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        feeds = {
            i.name: np.zeros([d if isinstance(d, int) else batch for d in i.shape], np.float32)
            for i in sess.get_inputs()
        }
        names = [o.name for o in sess.get_outputs()]
        for name, v in zip(names, sess.run(None, feeds), strict=True):
            if name in missing:
                shapes[name] = list(v.shape)
    total = 0
    for n in nodes:
        a, w, o = shapes[n.input[0]], shapes[n.input[1]], shapes[n.output[0]]
        if n.op_type == "MatMul":
            total += 2 * int(np.prod(o)) * a[-1]
        elif n.op_type == "Gemm":
            trans_a = any(x.name == "transA" and x.i for x in n.attribute)
            total += 2 * int(np.prod(o)) * (a[0] if trans_a else a[-1])
        else:  # Conv: weight (M, C/group, k...)
            total += 2 * int(np.prod(o)) * w[1] * int(np.prod(w[2:]))
    return float(total) / batch


def matmul_peak(device: str, seconds: float = 1.0) -> dict[str, float]:
    """Best measured matrix-product rate (TFLOP/s) per method on ``device``."""
    out = {}
    if device == "cpu":
        n = 2048
        a = np.random.default_rng(0).random((n, n), np.float32)
        out["numpy_fp32"] = _best(lambda: a @ a, 2 * n**3, seconds)
        if importlib.util.find_spec("torch"):
            import torch

            t = torch.from_numpy(a)
            out["torch_fp32"] = _best(lambda: t @ t, 2 * n**3, seconds)
    elif importlib.util.find_spec("torch"):  # pragma: no cover - needs a GPU
        import torch

        n = 8192
        for name, dt in (("torch_bf16", torch.bfloat16), ("torch_fp16", torch.float16)):
            a = torch.randn(n, n, device=device, dtype=dt)
            out[name] = _best(lambda a=a: (a @ a, torch.cuda.synchronize()), 2 * n**3, seconds)
    return out


def _best(fn, flop: float, seconds: float) -> float:
    fn()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flop / best / 1e12


def _rate(fn, n: int, seconds: float) -> float:
    """Slices/s: one warm-up call, then as many calls as fit in ``seconds`` (at least 2)."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    return n * calls / (time.perf_counter() - t0)


def throughput(runtime, model, seconds: float, batch: int | None = None) -> dict:
    b = batch or model.backbone.batch
    size = model.input.size
    chans = model.input.intensity.channels
    x = np.random.default_rng(0).standard_normal((b, chans, size, size), np.float32)
    backbone = _rate(lambda: runtime.encode(x), b, seconds)
    full = _rate(lambda: runtime.infer(x), b, seconds)
    flops = graph_flops(model.graph(model.backbone.graph))
    heads = [graph_flops(model.graph(h.graph)) for h in runtime.slice_heads]
    head_flops = None if flops is None or None in heads else sum(heads)
    res = {"batch": b, "backbone_slices_per_s": round(backbone, 2), "all_heads_slices_per_s": round(full, 2)}
    if flops is not None:
        res["backbone_gflop_per_slice"] = round(flops / 1e9, 3)
        res["backbone_tflops"] = round(flops * backbone / 1e12, 4)
    if head_flops is not None:
        res["heads_gflop_per_slice"] = round(head_flops / 1e9, 3)
        res["all_heads_tflops"] = round((flops + head_flops) * full / 1e12, 4)
    return res


def memory(device: str) -> dict:
    out = {"peak_rss_mib": round(peak_rss_mib(), 1)}
    if device.startswith("cuda") and importlib.util.find_spec("torch"):  # pragma: no cover - needs a GPU
        import torch

        out["cuda_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        free, total = torch.cuda.mem_get_info()
        out["cuda_used_mib"] = round((total - free) / 2**20, 1)
    return out


def environment(pipeline: Pipeline) -> dict:
    rt = pipeline.runtime
    env = {
        "pacs_node": __version__,
        "model": f"{pipeline.model.name} {pipeline.model.version}",
        "runtime": rt.name,
        "device": rt.device,
        "precision": rt.precision,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "cpu": _cpu_name(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    for mod in ("torch", "tensorrt"):
        if importlib.util.find_spec(mod):
            env[mod] = __import__(mod).__version__
    if rt.device.startswith("cuda") and importlib.util.find_spec("torch"):  # pragma: no cover - needs a GPU
        import torch

        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pipeline_runs(pipeline: Pipeline, slice_counts: list[int], size: int, repeat: int) -> list[dict]:
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
                samples.append((result.seconds, result.parts))
        med = {s: statistics.median(x.get(s, 0.0) for x, _ in samples) for s in STAGES}
        parts = {p: statistics.median(x[p] for _, x in samples) for p in samples[0][1]}
        total = statistics.median(sum(x.values()) for x, _ in samples)
        runs.append(
            {
                "slices": n,
                "size": size,
                "total_s": round(total, 3),
                "stages_s": {k: round(v, 3) for k, v in med.items()},
                "inference_parts_s": {k: round(v, 3) for k, v in parts.items()},
            }
        )
    return runs


def bench(
    pipeline: Pipeline,
    why: str,
    slice_counts: list[int],
    size: int,
    repeat: int,
    output: Path | None,
    seconds: float = 3.0,
    batch: int | None = None,
) -> int:
    console = Console()
    rt = pipeline.runtime
    env = environment(pipeline)
    console.print(f"runtime {rt.name} on {rt.device}, {rt.precision} ({why})")
    peak = matmul_peak(rt.device)
    best_peak = max(peak.values()) if peak else None
    tp = throughput(rt, pipeline.model, seconds, batch)
    if best_peak and "backbone_tflops" in tp:
        tp["backbone_fraction_of_peak"] = round(tp["backbone_tflops"] / best_peak, 4)
    if best_peak and "all_heads_tflops" in tp:
        tp["all_heads_fraction_of_peak"] = round(tp["all_heads_tflops"] / best_peak, 4)
    t = Table(
        title=f"throughput: {env['model']} on {rt.name} ({rt.device}, {rt.precision}), batch {tp['batch']}"
    )
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row("backbone alone (slices/s)", f"{tp['backbone_slices_per_s']:.2f}")
    t.add_row("backbone + all heads (slices/s)", f"{tp['all_heads_slices_per_s']:.2f}")
    if "backbone_gflop_per_slice" in tp:
        t.add_row("backbone GFLOP/slice (ONNX graph)", f"{tp['backbone_gflop_per_slice']:.2f}")
        t.add_row("backbone achieved TFLOP/s", f"{tp['backbone_tflops']:.3f}")
    if "all_heads_tflops" in tp:
        t.add_row("heads GFLOP/slice", f"{tp['heads_gflop_per_slice']:.2f}")
        t.add_row("backbone + heads achieved TFLOP/s", f"{tp['all_heads_tflops']:.3f}")
    for k, v in peak.items():
        t.add_row(f"measured matmul peak, {k} (TFLOP/s)", f"{v:.3f}")
    if "backbone_fraction_of_peak" in tp:
        t.add_row("backbone fraction of peak", f"{tp['backbone_fraction_of_peak']:.1%}")
        t.add_row("backbone + heads fraction of peak", f"{tp.get('all_heads_fraction_of_peak', 0):.1%}")
    console.print(t)
    runs = pipeline_runs(pipeline, slice_counts, size, repeat) if slice_counts else []
    if runs:
        table = Table(
            title=f"offline pipeline, {size}x{size} CT phantom, {rt.name} on {rt.device}, medians of {repeat}"
        )
        table.add_column("stage")
        for r in runs:
            table.add_column(f"{r['slices']} slices (s)", justify="right")
        for s in STAGES:
            table.add_row(s, *(f"{r['stages_s'][s]:.2f}" for r in runs))
            if s == "inference":  # its breakdown: the backbone once, then each head
                for p in runs[0]["inference_parts_s"]:
                    table.add_row(f"  {p}", *(f"{r['inference_parts_s'].get(p, 0):.2f}" for r in runs))
        table.add_row("total", *(f"{r['total_s']:.2f}" for r in runs))
        table.add_row("slices/s", *(f"{r['slices'] / r['total_s']:.1f}" for r in runs))
        console.print(table)
    mem = memory(rt.device)
    console.print("memory: " + ", ".join(f"{k} {v}" for k, v in mem.items()))
    if output:
        result = {
            "environment": env,
            "selection": why,
            "matmul_peak_tflops": {k: round(v, 4) for k, v in peak.items()},
            "throughput": tp,
            "memory": mem,
            "runs": runs,
        }
        output.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"written to {output}")
    return 0
