"""The ``pacs-node`` command line."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from node import __version__
from node.errors import InputError, ModelError, ServiceUnavailable
from node.identity import Role, RuntimeChoice, Stage

EXIT_OK, EXIT_INPUT, EXIT_PARTIAL = 0, 2, 3
log = logging.getLogger("node")

RUN_EPILOG = """exit status:
  0  every series was processed
  2  bad input or model: nothing was processed (one 'error:' line per problem on stderr)
  3  partial failure: some series were processed, others failed (each failure has an 'error:' line)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pacs-node", description="PACS inference node: CT/MR in, SEG + SR + GSPS (+ Parametric Map) out"
    )
    parser.add_argument("--version", action="version", version=f"pacs-node {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, with tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="process DICOM series from disk (offline, no server)",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "inputs", nargs="+", type=Path, metavar="INPUT", help="DICOM files or folders (any number of series)"
    )
    run.add_argument(
        "--out",
        required=True,
        type=Path,
        help="folder for the SEG/SR/GSPS/Parametric Map (.dcm), one subfolder per series",
    )
    run.add_argument(
        "--prior",
        action="append",
        type=Path,
        default=[],
        metavar="PRIOR",
        help="an earlier series of the same patient (repeatable): lesions are matched and tracked across them",
    )
    run.add_argument(
        "--report",
        type=Path,
        metavar="FILE",
        help="the study's text report: statements the image contradicts are flagged in the SR",
    )
    _model_args(run, several=True)
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    ph = sub.add_parser("phantom", help="write a synthetic CT or MR phantom series (with known ground truth)")
    ph.add_argument("out", type=Path)
    ph.add_argument("--modality", choices=("CT", "MR"), default="CT")
    ph.add_argument("--slices", type=int, default=120)
    ph.add_argument("--size", type=int, default=256, help="rows and columns")
    ph.add_argument("--lesions", type=int, default=3)
    ph.add_argument("--seed", type=int, default=1)
    ph.add_argument("--variant", default="axial", help="storage variant (see node.synthetic.dicom.VARIANTS)")

    demo = sub.add_parser("demo", help="write a CT and an MR phantom and run the pipeline on them")
    demo.add_argument("--out", type=Path, default=Path("results"))
    demo.add_argument("--slices", type=int, default=120, help="slices of each phantom")
    demo.add_argument("--size", type=int, default=256, help="rows and columns of each phantom")
    _model_args(demo)

    bench = sub.add_parser(
        "bench", help="model throughput vs the measured matmul peak, and every pipeline stage's time"
    )
    bench.add_argument(
        "--slices", type=int, nargs="*", default=[300], help="pipeline series lengths (none: throughput only)"
    )
    bench.add_argument("--size", type=int, default=512, help="rows and columns of the pipeline phantoms")
    bench.add_argument("--repeat", type=int, default=3, help="pipeline repeats (medians)")
    bench.add_argument("--seconds", type=float, default=3.0, help="time per throughput measurement")
    bench.add_argument("--batch", type=int, help="throughput batch (default: the model's batch)")
    bench.add_argument("--output", type=Path, help="also write the results here (JSON)")
    _model_args(bench)
    bench.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    bench.add_argument(
        "--suite", default="model", choices=("model", "queue", "latency", "nnunet", "seg", "memory3d"),
        help="model: throughput and pipeline stages; queue: jobs/s the queue sustains, SQLite vs PostgreSQL; "
        "nnunet: an imported nnU-Net model (--model) against nnUNetPredictor on its source (--nnunet); "
        "seg: the SEG encoder against highdicom's at --segments counts; "
        "memory3d: peak RAM of a --classes 3D network on a --size x --size x --slices CT; "
        "latency: a real node (serve) sent --series CTs at once, end-to-end latency for each --workers count",
    )  # fmt: skip
    bench.add_argument("--classes", type=int, default=105, help="memory3d suite: the network's outputs")
    bench.add_argument("--nnunet", type=Path, help="nnunet suite: the nnU-Net results folder --model was imported from")
    bench.add_argument("--segments", type=int, nargs="*", default=[10, 117], help="seg suite: segment counts")
    bench.add_argument("--queue-url", help="queue suite: a scratch PostgreSQL database (emptied first)")
    bench.add_argument("--workers", type=int, nargs="*", default=[1, 4, 16], help="queue suite: processes")
    bench.add_argument("--jobs", type=int, default=400, help="queue suite: jobs per run")
    bench.add_argument("--series", type=int, default=20, help="latency suite: CT series sent at once")

    rd = sub.add_parser(
        "render", help="draw a presentation state (GSPS) over its image into a PNG, as a viewer shows it"
    )
    rd.add_argument("gsps", type=Path, help="the GSPS file (gsps.dcm from pacs-node run)")
    rd.add_argument("--images", required=True, type=Path, help="folder with the source series")
    rd.add_argument("--out", required=True, type=Path, help="the PNG to write")
    rd.add_argument("--sop", help="SOP Instance UID of the image to show (default: the labelled slice)")

    labels = sub.add_parser(
        "labels", help="label sets: radiologists' SEGs sent to the node, and coded findings, to train heads on"
    )
    lsub = labels.add_subparsers(dest="labels_command", required=True)
    for name, text in (("list", "the label sets, oldest first"), ("add", "classification labels from a CSV"),
                       ("remove", "forget one label set")):  # fmt: skip
        lp = lsub.add_parser(name, help=text)
        lp.add_argument("--config", type=Path, help="node config (YAML): its queue; default: the embedded default")
        if name == "list":
            lp.add_argument("--series", help="only this series' (its Series Instance UID)")
        elif name == "add":
            lp.add_argument(
                "--csv", type=Path, required=True,
                help="columns series_uid,label[,code]: one row per finding, e.g. 1.2.3,Lesion present,SCT:52101004",
            )  # fmt: skip
        else:
            lp.add_argument("id", type=int, help="the label set's ID (labels list)")

    heads = sub.add_parser(
        "heads", help="heads learned from the department's labels: train, status, activate, shadow, rollback"
    )
    hsub = heads.add_subparsers(dest="heads_command", required=True)
    for name, text in (
        ("train", "train a new version of a head from the label sets (needs the train extra)"),
        ("status", "each learned head's versions: active, shadow, cross-validated quality"),
        ("activate", "judge a version on the golden set and activate it if it passes"),
        ("shadow", "run a version on every series without sending its results (no version: stop)"),
        ("rollback", "back to the version active before"),
        ("calibrate", "calibrate a classification head on fresh phantoms (temperature or isotonic)"),
    ):
        hp = hsub.add_parser(name, help=text)
        hp.add_argument("--model", required=True, type=Path, help="the model folder (its heads/ folder changes)")
        if name == "status":
            hp.add_argument("--json", action="store_true", help="as JSON (GET /inference/heads)")
            continue
        hp.add_argument("head", help="the head's name, e.g. aorta")
        if name in ("train", "activate"):
            hp.add_argument("--config", type=Path, help="node config (YAML): queue, Orthanc, learning")
        if name == "train":
            hp.add_argument("--kind", choices=["segmentation", "classification"], default="segmentation")
            hp.add_argument(
                "--label", required=True,
                help="segmentation: the segment label to learn (Aorta); classification: the positive class "
                "(a CSV label), every other label of the same label sets negative",
            )  # fmt: skip
            hp.add_argument("--code", default="", help="its coded concept (the finding), e.g. SCT:15825003")
            hp.add_argument("--sender", help="only label sets from this calling AE title")
            hp.add_argument("--steps", type=int, default=300)
            hp.add_argument("--folds", type=int, default=3, help="k-fold cross-validation over series")
        elif name in ("activate", "shadow"):
            hp.add_argument("version", nargs="?" if name == "shadow" else None, help="the version (heads status)")
        elif name == "calibrate":
            hp.add_argument("--series", type=int, default=40, help="fresh phantom series to fit on")
            hp.add_argument("--kind", choices=["temperature", "isotonic"], default="temperature")

    serve = sub.add_parser("serve", help="run the node: Orthanc with the plugin, and the worker (foreground)")
    serve.add_argument("--config", type=Path, help="node config (YAML); default: the embedded default")
    serve.add_argument(
        "--role", type=Role, choices=list(Role), default=Role.ALL,
        help="all: Orthanc, plugin and worker; ingest: Orthanc and plugin; worker: the worker only "
        "(a cluster: one PostgreSQL queue_url, the worker's orthanc_host an ingest host)",
    )  # fmt: skip

    models = sub.add_parser("models", help="train, evaluate and inspect models")
    msub = models.add_subparsers(dest="models_command", required=True)
    tr = msub.add_parser(
        "train",
        help="train the reference model phantom-fm (a Hugging Face DINOv2 checkpoint and its heads, in "
        "OUT/source) and import it into OUT (needs the train and import extras)",
    )
    tr.add_argument("--out", type=Path, default=None, help="model folder (default: models/phantom-fm)")
    tr.add_argument(
        "--head",
        choices=("organs", "lesions", "lesion_presence"),
        help="retrain only this head on the model folder's exported (frozen) backbone (organs: stage 2's, "
        "from its weights, with CT numbers found again; lesions: stage 3, with the organ head's CT numbers, "
        "and the presence head, which reads it)",
    )
    bd = msub.add_parser(
        "build", help="build (or find in the cache) the TensorRT engines of a model (GPU only)"
    )
    bd.add_argument("--model", default="phantom-fm")
    bd.add_argument(
        "--precision", nargs="+", default=["bf16", "fp16", "fp32"], choices=("bf16", "fp16", "fp32")
    )
    im = msub.add_parser(
        "import",
        help="import a model held in its owners' format (a Hugging Face DINOv2/ViT folder such as Curia, "
        "nnU-Net v2 results folders such as TotalSegmentator's, a MONAI bundle) into a model folder "
        "(needs the import extra)",
    )
    im.add_argument(
        "src",
        type=Path,
        nargs="+",
        help="the model folder (hf: config.json, model.safetensors, preprocessor_config.json; nnunet: plans.json, "
        "dataset.json, fold_*/checkpoint_final.pth; several nnU-Net folders become one model, a head each; "
        "monai-bundle: configs/metadata.json, configs/inference.json, models/model.pt or model.ts)",
    )
    im.add_argument("--out", required=True, type=Path, help="the model folder to write (new or empty)")
    im.add_argument(
        "--format",
        default="auto",
        choices=("auto", "hf", "nnunet", "monai-bundle"),
        help="source format (auto: detect)",
    )
    im.add_argument(
        "--axes",
        default="RAS",
        help="nnunet: where the training images' x, y, z axes pointed (TotalSegmentator: RAS, nibabel's canonical)",
    )
    im.add_argument(
        "--head",
        action="append",
        type=Path,
        default=[],
        metavar="HEAD_DIR",
        help="a head folder: a classifier (config.json with id2label; model.safetensors or head.pt) or one of "
        "pacs-node's own heads (config.json with pacs_node_head; model.safetensors), repeatable",
    )
    im.add_argument("--codes", type=Path, help="YAML: coded concepts for labels and heads' findings (SR)")
    im.add_argument("--name", help="model name (default: the source folder's name)")
    im.add_argument("--version", default="1.0.0", help="model version (new UIDs for a new version)")
    tx = msub.add_parser(
        "export-triton",
        help="write a model as a Triton model repository (backbone, heads, the ensemble) for runtime kserve",
    )
    tx.add_argument("model", help="model name in models/ or a model folder")
    tx.add_argument("--out", required=True, type=Path, help="the repository (its other models are kept)")
    tx.add_argument(
        "--backend",
        default="onnxruntime",
        choices=("onnxruntime", "python"),
        help="onnxruntime: Triton's ONNX Runtime backend (production, GPU); python: ONNX Runtime inside"
        " Triton's Python backend, for a Triton without the onnxruntime backend",
    )
    tx.add_argument("--cpu", action="store_true", help="instances on the CPU (default: the GPU)")
    dr = msub.add_parser(
        "drift-reference", help="write the model's drift.json: its signals on fresh phantom series (drift watch)"
    )
    dr.add_argument("model", type=Path, help="the model folder")
    dr.add_argument("--series", type=int, default=24)
    dr.add_argument("--seed", type=int, default=7000)
    ev = msub.add_parser("evaluate", help="measure a model on freshly generated held-out phantoms")
    ev.add_argument("--model", default="phantom-fm")
    ev.add_argument("--cases", type=int, default=8)
    ev.add_argument("--seed", type=int, default=50_000)
    ev.add_argument(
        "--write-card", action="store_true", help="record the figures in the model's quality.json"
    )

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _COMMANDS[args.command](args)
    except (InputError, ModelError, ServiceUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _model_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    if several:
        p.add_argument(
            "--model",
            action="append",
            help="model name in models/ or a model folder (default phantom-fm); give it again for"
            " several models: every series goes through each, into one SEG, SR and GSPS",
        )
    else:
        p.add_argument("--model", default="phantom-fm", help="model name in models/ or a model folder")
    p.add_argument("--runtime", default="auto", choices=[r.value for r in RuntimeChoice])
    p.add_argument(
        "--kserve",
        metavar="URL",
        help="with --runtime kserve: the Triton (KServe v2) server holding the model's repository"
        " (pacs-node models export-triton), grpc://host:8001 or http://host:8000",
    )


def _load(models: str | list[str], runtime_name: str, kserve: str | None = None):
    from node.config import KServeConfig
    from node.model.manifest import load_model
    from node.model.select import select_runtime
    from node.pipeline import Engine, Pipeline

    try:
        remote = KServeConfig(url=kserve) if kserve else None
    except ValueError:
        raise ModelError(f"--kserve {kserve!r}: give grpc://host:port or http://host:port") from None
    engines, whys = [], []
    for name in [models] if isinstance(models, str) else models:
        model = load_model(name)
        runtime, why = select_runtime(model, runtime_name, kserve=remote)
        engines.append(Engine(model, runtime))
        whys.append(why)
    return Pipeline.of(engines), whys


def cmd_run(args) -> int:
    report = None
    if args.report:
        try:
            report = args.report.read_text(errors="replace")
        except OSError as e:
            print(f"error: {args.report}: cannot read the report ({e.strerror})", file=sys.stderr)
            return EXIT_INPUT
    return run_offline(
        args.inputs,
        args.out,
        args.prior,
        report,
        args.model or ["phantom-fm"],
        args.runtime,
        not args.no_progress,
        args.verbose,
        args.kserve,
    )


def run_offline(
    inputs: list[Path],
    out: Path,
    prior_inputs: list[Path],
    report: str | None,
    model: str | list[str],
    runtime: str,
    progress: bool = True,
    verbose: bool = False,
    kserve: str | None = None,
) -> int:
    """``pacs-node run`` (and ``demo``): every series in ``inputs`` through the pipeline into ``out``;
    the series in ``prior_inputs``, oldest first, are processed before them and compared in turn."""
    from datetime import datetime

    from node.analysis.longitudinal import acquired
    from node.ingest.series import find_series

    console = Console()  # stdout: info and summary; stderr carries only progress and 'error:' lines
    series, errors = find_series(inputs)
    priors, prior_errors = find_series(prior_inputs) if prior_inputs else ([], [])
    errors += prior_errors
    # oldest first: each series is compared with the one before it, so a lesion keeps its UID throughout
    priors.sort(key=lambda s: acquired(s.datasets[0]) or datetime.min)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if not series:
        if not errors:
            print(f"error: no CT or MR series found in {', '.join(map(str, inputs))}", file=sys.stderr)
        return EXIT_INPUT
    pipeline, whys = _load(model, runtime, kserve)
    for e, why in zip(pipeline.engines, whys, strict=True):
        console.print(f"model {e.model.name} {e.model.version}, runtime {e.runtime.name} ({why})")
    results = []
    show = progress and sys.stderr.isatty()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not show,
    ) as bar:
        prior = None
        for i, s in enumerate(priors + series):
            task = bar.add_task(f"{s.modality} series …{s.series_uid[-12:]}", total=None)
            result = _process_one(
                pipeline, s, out, verbose, bar, task, prior, None if i < len(priors) else report
            )
            results.append(result)
            if not result.ok:
                print(f"error: {result.error}", file=sys.stderr)
            for m in result.models:
                if m.error:  # the others' results are written; the SR says which model failed
                    print(f"error: series {s.series_uid}: model {m.model} failed: {m.error}", file=sys.stderr)
            if result.ok and i < len(priors):
                prior = result.time_point
    _print_summary(console, results, out)
    done = sum(r.ok for r in results)
    if done == len(results) and not errors and not any(m.error for r in results for m in r.models):
        return EXIT_OK
    return EXIT_PARTIAL if done else EXIT_INPUT


def _process_one(pipeline, series, out, verbose, bar, task, prior=None, report=None):
    from node.pipeline import SeriesResult
    from node.timing import Stopwatch

    clock = Stopwatch()
    try:
        volume = pipeline.load(series, clock)
        bar.update(task, total=volume.volume.shape[0])
        result = pipeline.process(
            series, out, lambda n: bar.advance(task, n), volume=volume, prior=prior, report=report
        )
    except InputError as e:
        return SeriesResult(series.series_uid, series.modality, error=str(e))
    except (ModelError, ServiceUnavailable) as e:  # the model or its server, not the series
        return SeriesResult(series.series_uid, series.modality, error=f"series {series.series_uid}: {e}")
    except Exception as e:  # a bug of ours: keep the traceback in the log, one line for the user
        log.debug("series %s failed", series.series_uid, exc_info=True)
        hint = "" if verbose else " (run with --verbose for the traceback)"
        return SeriesResult(
            series.series_uid,
            series.modality,
            error=f"series {series.series_uid}: internal error: {type(e).__name__}: {e}{hint}",
        )
    result.seconds = {Stage.LOAD: clock.seconds[Stage.LOAD], **result.seconds}
    return result


def _print_summary(console: Console, results, out: Path) -> None:
    table = Table(title=f"pacs-node results in {out}", show_lines=False)
    for col in ("series", "slices", "found", "seconds", "outputs"):
        table.add_column(col)
    stages: dict[str, float] = {}
    for r in results:
        if not r.ok:
            table.add_row(f"…{r.series_uid[-16:]}", "", "[red]failed[/red]", "", "")
            continue
        for k, v in r.seconds.items():
            stages[k] = stages.get(k, 0.0) + v
        files = r.files[0].parent if r.files else ""
        table.add_row(
            f"{r.modality} …{r.series_uid[-16:]}",
            str(r.slices),
            r.summary(),
            f"{sum(r.seconds.values()):.1f}",
            str(files),
        )
    console.print(table)
    for r in results:
        for d in r.findings.discrepancies if r.findings else []:
            console.print(f"[yellow]report discrepancy[/yellow] (series …{r.series_uid[-16:]}): {d.reason}")
    if stages:
        console.print("time per stage: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))


def cmd_phantom(args) -> int:
    w = _write_phantom(args.out, args.modality, args.slices, args.size, args.lesions, args.seed, args.variant)
    print(f"wrote {len(w.files)} files of series {w.series_uid} to {args.out}")
    return EXIT_OK


def _write_phantom(out: Path, modality: str, slices: int, size: int, lesions: int, seed: int, variant: str):
    from node.synthetic.dicom import Patient, write_variant
    from node.synthetic.phantom import Phantom

    return write_variant(
        Phantom.random(seed, n_lesions=lesions),
        out,
        variant,
        modality=modality,
        seed=seed,
        shape=(slices, size, size),
        pixel_spacing=round(400.0 / size, 4),
        slice_spacing=round(300.0 / slices, 3),
        patient=Patient(name=f"PHANTOM^{modality}", id=f"PH{seed:05d}"),
    )


def cmd_demo(args) -> int:
    with tempfile.TemporaryDirectory(prefix="pacs-node-demo-") as tmp:
        for modality, seed in (("CT", 1), ("MR", 2)):
            _write_phantom(Path(tmp) / modality, modality, args.slices, args.size, 3, seed, "axial")
        return run_offline([Path(tmp)], args.out, [], None, args.model, args.runtime, verbose=args.verbose)


def cmd_bench(args) -> int:
    if args.suite == "queue":
        from node.tools.queue_bench import bench_queue

        return bench_queue(args.queue_url, args.workers, args.jobs, args.output)
    if args.suite == "latency":
        from node.tools.latency_bench import bench_latency

        return bench_latency(args.workers, args.series, args.slices[0], args.size, args.queue_url, args.output)
    if args.suite == "nnunet":
        from node.tools.nnunet_bench import bench_nnunet

        if args.nnunet is None:
            raise ModelError("--suite nnunet needs --nnunet: the results folder the model was imported from")
        return bench_nnunet(args.model, args.nnunet, args.slices[0], args.size, args.repeat, args.output)
    if args.suite == "memory3d":
        from node.tools.memory_bench import bench_memory3d

        return bench_memory3d(args.classes, args.slices[0], args.size, args.output)
    if args.suite == "seg":
        from node.tools.seg_bench import bench_seg

        return bench_seg(args.slices[0], args.size, args.segments, args.repeat, args.output)
    from node.model.manifest import load_model
    from node.model.select import select_runtime
    from node.pipeline import Pipeline
    from node.tools.bench import bench

    model = load_model(args.model)
    runtime, why = select_runtime(model, args.runtime, args.precision)
    pipeline = Pipeline(model, runtime)
    return bench(pipeline, why, args.slices, args.size, args.repeat, args.output, args.seconds, args.batch)


def cmd_render(args) -> int:
    from node.tools.render import render_to_png

    print(f"wrote {render_to_png(args.gsps, args.images, args.out, args.sop)}")
    return EXIT_OK


def cmd_serve(args) -> int:
    from node.service.supervisor import serve

    return serve(args.config, args.role)


def cmd_labels(args) -> int:
    import csv

    from node.config import ConfigError, load_config
    from node.identity import LabelKind
    from node.service.queue import JobQueue, Label

    try:
        where = load_config(args.config).queue_location
    except ConfigError as e:
        raise InputError(str(e)) from None
    if isinstance(where, Path) and not where.exists():
        raise InputError(f"no queue at {where}: the node has not run with this config (pacs-node serve)")
    labels = JobQueue(where).labels
    if args.labels_command == "list":
        for s in labels.list(args.series):
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.received))
            names = ", ".join(x.name + (f" ({x.code})" if x.code else "") for x in s.labels)
            print(f"{s.id}  {s.series_uid}  {s.kind}  {names}  from {s.sender or '?'} {when}")
        return EXIT_OK
    if args.labels_command == "remove":
        if not labels.remove(args.id):
            raise InputError(f"no label set {args.id} (see pacs-node labels list)")
        print(f"removed label set {args.id}")
        return EXIT_OK
    by_series: dict[str, list[Label]] = {}
    try:
        with open(args.csv, newline="") as f:
            for n, row in enumerate(csv.DictReader(f), start=2):
                if not row.get("series_uid") or not row.get("label"):
                    raise InputError(f"{args.csv}: line {n}: needs series_uid and label")
                by_series.setdefault(row["series_uid"].strip(), []).append(
                    Label(row["label"].strip(), (row.get("code") or "").strip())
                )
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{args.csv}: {e}") from None
    for series, found in by_series.items():
        labels.add(series, LabelKind.CLASSIFICATION, args.csv.name, "cli", found)
    print(f"{len(by_series)} label set(s) from {args.csv}")
    return EXIT_OK


def cmd_heads(args) -> int:
    import json
    from dataclasses import asdict

    from node.config import ConfigError, load_config
    from node.learn import manage
    from node.model import head_versions
    from node.model.manifest import model_dir

    folder = model_dir(args.model)  # a model's name, or its folder (not loaded: a broken state can be mended)
    if not (folder / "model.yaml").exists():
        raise InputError(f"model {args.model}: no model.yaml in {folder}")
    if getattr(args, "head", None) is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", args.head):
        raise InputError(f"head {args.head!r}: a head's name is letters, digits, - and _ only")
    if args.heads_command == "status":
        found = manage.status(folder)
        if args.json:
            print(json.dumps([asdict(h) for h in found]))
        else:
            print("\n".join(h.line() for h in found) or f"{args.model}: no learned heads")
        return EXIT_OK
    if args.heads_command == "rollback":
        s = head_versions.rollback(folder, args.head)
        print(f"head {args.head}: version {s.active} active" if s.active else f"head {args.head}: switched off")
        return EXIT_OK
    if args.heads_command == "calibrate":
        from node.learn.calibrate_shipped import calibrate_head

        r = calibrate_head(folder, args.head, n_series=args.series, kind=args.kind)
        ece = f"ECE {r.ece_before:.3f} -> {r.ece_after:.3f} on {r.n} series"
        print(f"head {args.head}: {args.kind} calibration, {ece}" if r.improves else
              f"head {args.head}: {args.kind} calibration would not lower the ECE ({ece}): not written, "
              "the head states its own probabilities")  # fmt: skip
        return EXIT_OK
    if args.heads_command == "shadow":
        head_versions.shadow(folder, args.head, args.version)
        print(f"head {args.head}: " + (f"version {args.version} in shadow (computed, never sent)" if args.version else "no shadow"))
        return EXIT_OK
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        raise InputError(str(e)) from None
    from node.service.orthanc import OrthancError

    try:
        return _heads_with_config(args, cfg, folder)
    except OrthancError as e:
        raise InputError(f"the node's Orthanc: {e}") from None


def _heads_with_config(args, cfg, folder) -> int:
    from node.learn import manage

    if args.heads_command == "train":
        t = manage.train(cfg, folder, args.head, args.kind, args.label, args.code, args.sender, args.steps, args.folds)
        print(f"head {args.head}: {t.line()}; pacs-node heads activate to judge it on the golden set")
        return EXIT_OK
    verdict = manage.activate(cfg, folder, args.head, args.version)
    print(f"head {args.head}: {verdict.line()}")
    return EXIT_OK if verdict.passed else EXIT_INPUT


def cmd_models(args) -> int:
    if args.models_command == "train":
        from node.model.manifest import MODELS_DIR
        from node.tools.train_reference import train

        logging.getLogger("node").setLevel(logging.INFO)
        out = args.out or MODELS_DIR / "phantom-fm"
        if args.head:
            from node.tools.train_reference import retrain_lesions, retrain_organs, retrain_presence

            retrain = {"organs": retrain_organs, "lesions": retrain_lesions, "lesion_presence": retrain_presence}[args.head]
            retrain(out)
            print(f"retrained head {args.head} in {out} (backbone untouched)")
            return EXIT_OK
        stats = train(out)
        print(
            f"trained phantom-fm in {stats['train_seconds']} s; checkpoint in {out / 'source'}, imported into {out}"
        )
        print(f"next: pacs-node models evaluate --model {out}")
        return EXIT_OK
    from node.model.manifest import load_model
    from node.tools.evaluate import evaluate_model, format_report, write_quality

    if args.models_command == "import":
        from node.model.importers.huggingface import import_huggingface
        from node.model.importers.monai_bundle import import_monai_bundle, is_monai_bundle
        from node.model.importers.nnunet import import_nnunet, is_nnunet

        def warn(message: str) -> None:
            print(f"warning: {message}", file=sys.stderr)

        src = args.src[0]
        fmt = args.format
        if fmt == "auto":
            fmt = (
                "nnunet"
                if is_nnunet(src)
                else "monai-bundle"
                if is_monai_bundle(src)
                else "hf"
                if (src / "config.json").exists()
                else None
            )
        if fmt is None:
            raise ModelError(
                f"{src}: cannot tell its format: neither a Hugging Face model (config.json), an nnU-Net "
                "results folder (plans.json, dataset.json) nor a MONAI bundle (configs/metadata.json, "
                "configs/inference.json)"
            )
        if fmt == "monai-bundle":
            if len(args.src) > 1:
                raise ModelError("a MONAI bundle is imported one at a time (one folder)")
            out = import_monai_bundle(src, args.out, args.codes, args.name, args.version, warn)
            model = load_model(out)
            (head,) = model.heads
            v = model.input.volume
            print(
                f"imported {model.name} {model.version} into {out}: a MONAI 3D network, {len(head.labels)} labels, "
                f"axes {v.axes}, spacing {v.spacing} mm, ROI {v.patch}"
            )
            print(f"next: pacs-node run SERIES --model {out} --out results/")
            return EXIT_OK
        if fmt == "nnunet":
            out = import_nnunet(args.src, args.out, args.axes, args.codes, args.name, args.version, warn)
            model = load_model(out)
            labels = sum(len(h.labels) for h in model.heads)
            print(
                f"imported {model.name} {model.version} into {out}: {len(model.heads)} 3D network(s), {labels} labels, "
                f"axes {model.input.volume.axes}, spacing {model.input.volume.spacing} mm"
            )
            print(f"next: pacs-node run SERIES --model {out} --out results/")
            return EXIT_OK
        if len(args.src) > 1:
            raise ModelError("a Hugging Face model is one folder (its heads come with --head)")
        out = import_huggingface(src, args.out, args.head, args.codes, args.name, args.version, warn)
        model = load_model(out)
        print(f"imported {model.name} {model.version} into {out}: backbone and {len(model.heads)} head(s)")
        print(f"next: pacs-node run SERIES --model {out} --out results/")
        return EXIT_OK
    if args.models_command == "export-triton":
        from node.model.triton_repository import TritonBackend, export

        model = load_model(args.model)
        names = export(model, args.out, TritonBackend(args.backend), gpu=not args.cpu)
        print(f"wrote {', '.join(names)} into {args.out} ({args.backend} backend)")
        print(f"next: tritonserver --model-repository {args.out}, then runtime: kserve with kserve: {{url: grpc://HOST:8001}}")
        return EXIT_OK
    if args.models_command == "drift-reference":
        from node.tools.drift_reference import make_reference

        print(f"wrote {make_reference(args.model, args.series, args.seed)}")
        return EXIT_OK
    if args.models_command == "build":
        from node.model.runtimes.tensorrt import build_model

        for path in build_model(load_model(args.model), tuple(args.precision)):
            print(path)
        return EXIT_OK

    model = load_model(args.model)
    report = evaluate_model(model, cases=args.cases, seed=args.seed)
    print(format_report(report))
    if args.write_card:
        path = write_quality(model, report, args.seed)
        print(f"written to {path}")
    return EXIT_OK


_COMMANDS = {
    "run": cmd_run,
    "phantom": cmd_phantom,
    "demo": cmd_demo,
    "bench": cmd_bench,
    "render": cmd_render,
    "serve": cmd_serve,
    "labels": cmd_labels,
    "heads": cmd_heads,
    "models": cmd_models,
}

if __name__ == "__main__":
    sys.exit(main())
