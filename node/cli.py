"""The ``pacs-node`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from node import __version__
from node.errors import InputError, ModelError

EXIT_OK, EXIT_INPUT, EXIT_PARTIAL = 0, 2, 3
log = logging.getLogger("node")

RUN_EPILOG = """exit status:
  0  every series was processed
  2  bad input or model: nothing was processed (one 'error:' line per problem on stderr)
  3  partial failure: some series were processed, others failed (each failure has an 'error:' line)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pacs-node", description="PACS inference node: CT/MR in, SEG + SR + GSPS out"
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
        "--out", required=True, type=Path, help="folder for the SEG/SR/GSPS (.dcm), one subfolder per series"
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
    _model_args(run)
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    ph = sub.add_parser("phantom", help="write a synthetic CT or MR phantom series (with known ground truth)")
    ph.add_argument("out", type=Path)
    ph.add_argument("--modality", choices=("CT", "MR"), default="CT")
    ph.add_argument("--slices", type=int, default=120)
    ph.add_argument("--size", type=int, default=256, help="rows and columns")
    ph.add_argument("--lesions", type=int, default=3)
    ph.add_argument("--seed", type=int, default=1)
    ph.add_argument("--variant", default="axial", help="storage variant (see node.phantom_dicom.VARIANTS)")

    demo = sub.add_parser("demo", help="write a CT and an MR phantom and run the pipeline on them")
    demo.add_argument("--out", type=Path, default=Path("results"))
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

    rd = sub.add_parser(
        "render", help="draw a presentation state (GSPS) over its image into a PNG, as a viewer shows it"
    )
    rd.add_argument("gsps", type=Path, help="the GSPS file (gsps.dcm from pacs-node run)")
    rd.add_argument("--images", required=True, type=Path, help="folder with the source series")
    rd.add_argument("--out", required=True, type=Path, help="the PNG to write")
    rd.add_argument("--sop", help="SOP Instance UID of the image to show (default: the labelled slice)")

    serve = sub.add_parser("serve", help="run the node: Orthanc with the plugin, and the worker (foreground)")
    serve.add_argument("--config", type=Path, help="node config (YAML); default: the embedded default")

    models = sub.add_parser("models", help="train, evaluate and inspect models")
    msub = models.add_subparsers(dest="models_command", required=True)
    tr = msub.add_parser(
        "train", help="train the reference model phantom-fm and export ONNX (needs the train extra)"
    )
    tr.add_argument("--out", type=Path, default=None, help="model folder (default: models/phantom-fm)")
    tr.add_argument(
        "--head",
        choices=("lesion_presence",),
        help="retrain only this head on the model folder's exported (frozen) backbone",
    )
    bd = msub.add_parser(
        "build", help="build (or find in the cache) the TensorRT engines of a model (GPU only)"
    )
    bd.add_argument("--model", default="phantom-fm")
    bd.add_argument(
        "--precision", nargs="+", default=["bf16", "fp16", "fp32"], choices=("bf16", "fp16", "fp32")
    )
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
    except (InputError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="phantom-fm", help="model name in models/ or a model folder")
    p.add_argument("--runtime", default="auto", choices=("auto", "onnxruntime", "tensorrt", "torch"))


def _load(args):
    from node.model_repo import load_model
    from node.pipeline import Pipeline
    from node.runtimes import select_runtime

    model = load_model(args.model)
    runtime, why = select_runtime(model, args.runtime)
    return Pipeline(model, runtime), why


def cmd_run(args) -> int:
    from datetime import datetime

    from node.longitudinal import acquired
    from node.series import find_series

    console = Console()  # stdout: info and summary; stderr carries only progress and 'error:' lines
    report = None
    if args.report:
        try:
            report = args.report.read_text(errors="replace")
        except OSError as e:
            print(f"error: {args.report}: cannot read the report ({e.strerror})", file=sys.stderr)
            return EXIT_INPUT
    series, errors = find_series(args.inputs)
    priors, prior_errors = find_series(args.prior) if args.prior else ([], [])
    errors += prior_errors
    # oldest first: each series is compared with the one before it, so a lesion keeps its UID throughout
    priors.sort(key=lambda s: acquired(s.datasets[0]) or datetime.min)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if not series:
        if not errors:
            print(f"error: no CT or MR series found in {', '.join(map(str, args.inputs))}", file=sys.stderr)
        return EXIT_INPUT
    pipeline, why = _load(args)
    console.print(
        f"model {pipeline.model.name} {pipeline.model.version}, runtime {pipeline.runtime.name} ({why})"
    )
    results = []
    show = not args.no_progress and sys.stderr.isatty()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not show,
    ) as progress:
        prior = None
        for i, s in enumerate(priors + series):
            task = progress.add_task(f"{s.modality} series …{s.series_uid[-12:]}", total=None)
            result = _process_one(
                pipeline, s, args, progress, task, prior, None if i < len(priors) else report
            )
            results.append(result)
            if not result.ok:
                print(f"error: {result.error}", file=sys.stderr)
            elif i < len(priors):
                prior = result.time_point
    _print_summary(console, results, args.out)
    done = sum(r.ok for r in results)
    if done == len(results) and not errors:
        return EXIT_OK
    return EXIT_PARTIAL if done else EXIT_INPUT


def _process_one(pipeline, series, args, progress, task, prior=None, report=None):
    from node.pipeline import SeriesResult
    from node.timing import Stopwatch

    clock = Stopwatch()
    try:
        volume = pipeline.load(series, clock)
    except InputError as e:
        return SeriesResult(series.series_uid, series.modality, error=str(e))
    progress.update(task, total=volume.volume.shape[0])
    try:
        result = pipeline.process(
            series, args.out, lambda n: progress.advance(task, n), volume=volume, prior=prior, report=report
        )
    except Exception as e:  # a bug of ours: keep the traceback in the log, one line for the user
        log.debug("series %s failed", series.series_uid, exc_info=True)
        hint = "" if args.verbose else " (run with --verbose for the traceback)"
        return SeriesResult(
            series.series_uid,
            series.modality,
            error=f"series {series.series_uid}: internal error: {type(e).__name__}: {e}{hint}",
        )
    result.seconds = {"load": clock.seconds["load"], **result.seconds}
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
    from node.phantom import Phantom
    from node.phantom_dicom import Patient, write_variant

    w = write_variant(
        Phantom.random(args.seed, n_lesions=args.lesions),
        args.out,
        args.variant,
        modality=args.modality,
        seed=args.seed,
        shape=(args.slices, args.size, args.size),
        pixel_spacing=round(400.0 / args.size, 4),
        slice_spacing=round(300.0 / args.slices, 3),
        patient=Patient(name=f"PHANTOM^{args.modality}", id=f"PH{args.seed:05d}"),
    )
    print(f"wrote {len(w.files)} files of series {w.series_uid} to {args.out}")
    return EXIT_OK


def cmd_demo(args) -> int:
    with tempfile.TemporaryDirectory(prefix="pacs-node-demo-") as tmp:
        for modality, seed in (("CT", 1), ("MR", 2)):
            cmd_phantom(
                argparse.Namespace(
                    out=Path(tmp) / modality,
                    modality=modality,
                    slices=120,
                    size=256,
                    lesions=3,
                    seed=seed,
                    variant="axial",
                )
            )
        run_args = argparse.Namespace(
            inputs=[Path(tmp)],
            out=args.out,
            model=args.model,
            runtime=args.runtime,
            no_progress=False,
            verbose=False,
        )
        return cmd_run(run_args)


def cmd_bench(args) -> int:
    from node.bench import bench
    from node.model_repo import load_model
    from node.pipeline import Pipeline
    from node.runtimes import select_runtime

    model = load_model(args.model)
    runtime, why = select_runtime(model, args.runtime, args.precision)
    pipeline = Pipeline(model, runtime)
    return bench(pipeline, why, args.slices, args.size, args.repeat, args.output, args.seconds, args.batch)


def cmd_render(args) -> int:
    from node.render import render_to_png

    print(f"wrote {render_to_png(args.gsps, args.images, args.out, args.sop)}")
    return EXIT_OK


def cmd_serve(args) -> int:
    from node.server import serve

    return serve(args.config)


def cmd_models(args) -> int:
    if args.models_command == "train":
        from node.model_repo import MODELS_DIR
        from node.reference_model import train

        logging.getLogger("node").setLevel(logging.INFO)
        out = args.out or MODELS_DIR / "phantom-fm"
        if args.head:
            from node.reference_model import retrain_presence

            retrain_presence(out)
            print(f"retrained head {args.head} in {out} (backbone untouched)")
            return EXIT_OK
        stats = train(out)
        print(f"trained phantom-fm in {stats['train_seconds']} s; graphs in {out}")
        print(f"next: pacs-node models evaluate --model {out}")
        return EXIT_OK
    from node.evaluate import evaluate_model, format_report, write_quality
    from node.model_repo import load_model

    if args.models_command == "build":
        from node.runtimes.tensorrt import build_model

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
    "models": cmd_models,
}

if __name__ == "__main__":
    sys.exit(main())
