"""The worker process: lease a job -> fetch the series from Orthanc -> context -> pipeline -> store.

Runs outside Orthanc (``python -m node.service.worker --config node.json``, started by
``pacs-node serve``). Inference runs in the main thread, holding its job's lease by a heartbeat;
deliveries run in a second thread (:mod:`node.service.delivery`) so that a slow or absent
destination never holds back inference and vice versa.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from node.analysis.drift import DriftReference, drift_scores, series_signals
from node.analysis.findings import ModelRef
from node.analysis.urgency import Category
from node.config import ConfigError, NodeConfig, WebhookDestination, load_config, read_resolved
from node.errors import InputError, ModelError, ServiceUnavailable
from node.identity import JobState, OutputKind, Stage
from node.ingest.series import SourceSeries, find_series
from node.learn.label_watch import LabelWatch
from node.model import head_versions
from node.model.manifest import load_model, model_dir
from node.model.select import select_runtime
from node.pipeline import Engine, Pipeline, SeriesResult
from node.service.delivery import Deliverer
from node.service.egress import TriageNotice
from node.service.metrics import WORKER_EXIT_ENV, WORKER_METRICS_ENV, MetricsServer, ModelInfo, NodeMetrics
from node.service.orthanc import OrthancClient, OrthancError
from node.service.priors import PriorLookup, Priors, study_report
from node.service.queue import Job, JobQueue, Output, Route
from node.service.queue.time_points import TimePoints
from node.service.routing import header_tags, rule_matches
from node.timing import Stopwatch

log = logging.getLogger("node.service.worker")
QUEUE_RETRY_S = 5
SERVICE_RETRY_S = 5  # a worker whose inference server did not answer waits this long before the next job
LABEL_WATCH_S = 5  # how often an idle worker looks for new label sets to judge shadow heads on


class Stopping(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT: give the job back and exit (a BaseException, so
    that no ``except Exception`` on the way, such as one model's failure, takes it for an error)."""


@dataclass
class JobOutcome:
    state: JobState | None
    seconds: float
    error: str | None = None


@dataclass
class JobRun:
    """One leased job on its way through the steps, and where it is (so an error says where it happened)."""

    job: Job
    folder: Path  # the job's scratch folder: fetched series, prior, outputs; removed afterwards
    step: Stage | None = Stage.FETCH  # the worker's own step; None while the pipeline runs
    clock: Stopwatch = field(default_factory=Stopwatch)  # the pipeline's stages

    @property
    def stage(self) -> str:
        return str(self.step or self.clock.current or Stage.LOAD)

    def public(self, message: str) -> str:
        """``message`` with the scratch folder's file names (gone after the job) told as what they
        were: Orthanc's instances."""
        return re.sub(re.escape(str(self.folder / "in")) + r"/([\w-]+)\.dcm", r"Orthanc instance \1", message)


class Worker:
    """``metrics_at``: (host, port) of the worker's own metrics endpoint when ``pacs-node serve``
    supervises it (the supervisor exports the queue's families); None: ``metrics_port``, everything."""

    def __init__(self, cfg: NodeConfig, pipeline=None, metrics_at: tuple[str, int] | None = None):
        self.cfg = cfg
        self.metrics_at = metrics_at
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.queue = JobQueue(cfg.queue_location)
        self.time_points = TimePoints(self.queue.store)
        self.orthanc = OrthancClient(cfg.orthanc_url, cfg.orthanc_auth)
        p = cfg.priors
        self.priors = (
            Priors(
                self.queue.retrieved,
                self.time_points,
                self.orthanc,
                p.sources,
                cfg.ae_title,
                p.move_destination or cfg.ae_title,
                p.lookback_days,
            )
            if p.enabled
            else None
        )
        self.work_dir = cfg.data_dir / "work"
        self._pipeline = pipeline
        self._stamps = self._head_stamps()
        self._stop = threading.Event()
        self.metrics = NodeMetrics(None if metrics_at else cfg.queue_location, [d.name for d in cfg.destinations])
        self.metrics_server: MetricsServer | None = None
        self.deliverer = Deliverer(cfg, self.orthanc, self.metrics)
        self._drift: dict[str, DriftReference | None] = {}  # per model key, its drift.json read once
        self._labels: LabelWatch | None = None  # new label sets, for shadow heads (made when first idle)
        if pipeline is not None:
            self._model_info(pipeline)

    @property
    def pipeline(self) -> Pipeline:
        """Every configured model, loaded once, lazily (a config-only start stays fast), and again
        when a head version was activated, shadowed or rolled back (``pacs-node heads``)."""
        if self._pipeline is None:
            self._pipeline, self._stamps = self._load(), self._head_stamps()
        elif self._stamps != (stamps := self._head_stamps()):
            log.info("head versions changed: reloading the models")
            self._stamps = stamps  # taken before loading: a change made meanwhile is seen next time
            try:
                self._pipeline = self._load()
            except ModelError as e:  # keep serving with the models as they were
                log.error("head versions changed but the models do not load: %s: keeping the loaded ones", e)
        return self._pipeline

    def _load(self) -> Pipeline:
        engines = []
        for route in self.cfg.model_routes:
            model = load_model(route.model)
            runtime, why = select_runtime(
                model, route.runtime, kserve=self.cfg.kserve, threads=self.cfg.worker.threads()
            )
            log.info("model %s %s on %s (%s)", model.name, model.version, runtime.name, why)
            engines.append(Engine(model, runtime))
        cache = self.cfg.feature_cache() if self.cfg.learning.feature_cache else None
        pipeline = Pipeline.of(engines, self.cfg.triage, cache)
        self._model_info(pipeline)
        return pipeline

    def _head_stamps(self) -> list[tuple[int, int]]:
        return [head_versions.stamp(model_dir(r.model)) for r in self.cfg.model_routes]

    def _model_info(self, pipeline: Pipeline) -> None:
        infos = []
        for e in pipeline.engines:
            rt = e.runtime
            infos.append(ModelInfo(e.model.name, e.model.version, rt.name, rt.device, rt.precision or "fp32"))
        self.metrics.set_model(*infos)

    def route(self, series: SourceSeries) -> Pipeline:
        """The models whose routing rules the series matches (the plugin made a job of it because one
        of them did), as a pipeline of those only; an InputError if none does any more."""
        pipeline, routes = self.pipeline, self.cfg.model_routes
        if len(pipeline.engines) == 1:
            return pipeline
        keys = {"SOPClassUID"} | {k for r in self.cfg.all_rules for k in (*r.tags, *r.exclude_tags)}
        tags = header_tags(series.datasets[0], sorted(keys))
        n = len(series.datasets)
        chosen = [
            engine
            for route, engine in zip(routes, pipeline.engines, strict=True)
            if any(rule_matches(r.model_dump(), tags, series.modality, n) for r in route.routing)
        ]
        if not chosen:
            raise InputError(f"series {series.series_uid}: no model's routing rule matches it (any more)")
        return Pipeline.of(chosen, self.cfg.triage, pipeline.features)

    # --- health ----------------------------------------------------------------------------------
    def start_metrics(self) -> MetricsServer | None:
        """Serve /metrics, /healthz and /readyz on ``metrics_port`` (0: not at all), or where the
        supervisor said."""
        host, port = self.metrics_at or (self.cfg.metrics_host, self.cfg.metrics_port)
        if not port:
            return None
        checks = {
            "orthanc": lambda: (
                None if self.orthanc.ready() else f"Orthanc at {self.orthanc.url} not reachable"
            ),
            "model": lambda: (
                None
                if self._pipeline is not None
                else f"models {', '.join(r.model for r in self.cfg.model_routes)} not loaded (yet)"
            ),
            "queue": self.queue.writable,
        }
        try:
            self.metrics_server = MetricsServer(host, port, self.metrics, checks).start()
        except OSError as e:  # the port is taken: run without metrics rather than not at all
            log.error("metrics port %d: cannot listen (%s): no metrics endpoint", port, e)
        return self.metrics_server

    # --- main loop ---------------------------------------------------------------------------
    def run(self) -> None:
        deliverer = threading.Thread(
            target=self.deliverer.loop, args=(self._stop,), name="delivery", daemon=True
        )
        deliverer.start()
        if self.metrics_server is None:
            self.start_metrics()  # before the model loads: /healthz answers, /readyz says "loading"
        self.pipeline  # noqa: B018  (load the model before taking a job)
        log.info("worker %s ready", self.owner)
        next_watch = 0.0
        interrupted = False  # a job the queue failed under: given back once it answers, not at lease expiry
        try:
            while not self._stop.is_set():
                job = None
                try:
                    if interrupted:
                        self.queue.jobs.release(self.owner, "the queue failed")
                        interrupted = False
                    job = self.queue.jobs.lease(self.owner, self.cfg.worker.lease_s)
                    if job is None:
                        if time.monotonic() >= next_watch:
                            self._judge_shadows()
                            next_watch = time.monotonic() + LABEL_WATCH_S
                        self.queue.wait_for_work(self.cfg.worker.poll_s)  # NOTIFY on PostgreSQL, or poll_s
                        continue
                    self.process(job)
                except (*self.queue.errors, OSError) as e:  # the queue unwritable (full disk, database down): wait
                    log.error("queue %s: %s: waiting %d s", self.queue.path, e, QUEUE_RETRY_S)
                    self.metrics.errors.labels("queue").inc()
                    interrupted = interrupted or job is not None
                    self._stop.wait(QUEUE_RETRY_S)
        except Stopping:
            log.info("worker stopping")
        finally:
            self._stop.set()
            deliverer.join(timeout=5)
            if self.metrics_server is not None:
                self.metrics_server.stop()

    def stop(self) -> None:
        """Stop after the job or the wait in progress (at most ``poll_s``); a signal stops at once."""
        self._stop.set()

    def process(self, job: Job) -> JobOutcome:
        """Run one leased job to a recorded outcome (done/delivering, queued again, or failed)."""
        t0 = time.monotonic()
        beat = threading.Event()
        threading.Thread(target=self._heartbeat, args=(job.id, beat), daemon=True).start()
        run = JobRun(job, self.work_dir / f"job-{job.id}")
        try:
            state = self._run(run)
            seconds = time.monotonic() - t0
            self.metrics.observe_job("processed", seconds)
            log.info("job %d (series %s): %s in %.1f s", job.id, job.series_id, state, seconds)
            return JobOutcome(state, seconds)
        except InputError as e:  # the series itself is unusable: no point retrying
            return self._failed(run, run.public(str(e)), False, t0)
        except (OrthancError, OSError) as e:  # transient: Orthanc restarting, disk full...
            return self._failed(run, f"{run.stage}: {e}", True, t0)
        except ServiceUnavailable as e:  # the inference server down: not the job's fault, so no attempt
            outcome = self._failed(run, f"{run.stage}: {e}", True, t0, counted=False)
            self._stop.wait(SERVICE_RETRY_S)  # rather than lease the next job straight into it
            return outcome
        except Stopping:
            self.queue.jobs.fail(job.id, self.owner, "worker stopped during the job", retry=True)
            raise
        except self.queue.errors:  # the queue itself (its database restarting, a full disk): the loop
            raise  # waits it out, and the job runs again once its lease expires; not a bug of ours
        except Exception as e:  # a bug of ours: keep the traceback in the log, a line in the job
            log.exception("job %d: internal error in %s", job.id, run.stage)
            self.metrics.errors.labels("job").inc()
            return self._failed(run, f"internal error in {run.stage}: {type(e).__name__}: {e}", True, t0)
        finally:
            beat.set()
            shutil.rmtree(run.folder, ignore_errors=True)

    def _failed(self, run: JobRun, error: str, retry: bool, t0: float, counted: bool = True) -> JobOutcome:
        state = self.queue.jobs.fail(run.job.id, self.owner, error, retry=retry, counted=counted)
        outcome = "failed" if state is JobState.FAILED else "error"
        self.metrics.observe_job(outcome, time.monotonic() - t0)
        log.warning("job %d (series %s): %s: %s", run.job.id, run.job.series_id, state, error)
        return JobOutcome(state, time.monotonic() - t0, error)

    # --- the steps of one job ------------------------------------------------------------------
    def _run(self, run: JobRun) -> JobState | None:
        """fetch -> context (prior, report) -> pipeline -> store -> outbox."""
        shutil.rmtree(run.folder, ignore_errors=True)
        series = self._fetch(run)
        pipeline = self.route(series)
        prior, report = self._context(run, series, pipeline)
        run.step = None  # the pipeline's clock says where it is
        result = pipeline.process(
            series,
            run.folder / "out",
            prior=prior.time_point,
            report=report,
            prior_unavailable=prior.why_not,
            clock=run.clock,
        )
        self.time_points.save(_model_key(pipeline), result.time_point)
        self.metrics.observe_stages(result.seconds | result.parts)
        self._watch_drift(pipeline, result)
        for (model, head), agreement in result.findings.shadow_agreement.items():  # counted, never sent
            self.metrics.shadow_agreement.labels(model, head).observe(agreement)
        outputs = self._store(run, result)
        f = result.findings
        log.info(
            "job %d: models %s: %s; stages %s",
            run.job.id,
            ", ".join(f"{m.model} ({m.outcome})" for m in result.models),
            result.summary(),
            ", ".join(f"{k} {v:.2f}" for k, v in result.seconds.items()),
        )
        return self.queue.jobs.complete(
            run.job.id,
            self.owner,
            outputs + self._notifications(result),
            self._routes(f.urgency.category),
            f.urgency,
            len(f.discrepancies),
            result.models,
        )

    def _judge_shadows(self) -> None:
        """New label sets scored for each shadow head and its active version (while idle; a failure
        is one warning line, never a stopped worker)."""
        try:
            engines = [(e.model, e.runtime) for e in self.pipeline.engines if any(h.shadow for h in e.model.heads)]
            if not engines and self._labels is None:
                return
            if self._labels is None:
                self._labels = LabelWatch(self.queue.labels, self.orthanc, self.pipeline.features)
            for score in self._labels.check(engines):
                self.metrics.shadow_label_dice.labels(score.model, score.head, score.role).observe(score.dice)
                log.info("head %s %s version %s on new labels: Dice %.3f", score.head, score.role, score.version, score.dice)
        except Exception as e:
            log.warning("judging shadow heads on new labels: %s: %s", type(e).__name__, e)

    def _watch_drift(self, pipeline: Pipeline, result: SeriesResult) -> None:
        """Each model's drift scores of the series, against its drift.json (none: no watch). The watch
        never fails a job: a problem is one warning line (an unreadable drift.json, once). A model that
        failed on the series found nothing, which is not drift: it is left out."""
        failed = {m.model for m in result.models if m.error}
        for engine in pipeline.engines:
            if engine.key in failed:
                continue
            try:
                if engine.key not in self._drift:
                    self._drift[engine.key] = None
                    self._drift[engine.key] = DriftReference.load(engine.model.path)
                reference = self._drift[engine.key]
                if reference is not None:
                    signals = series_signals(result.findings, engine.model)
                    scores = drift_scores(reference, signals)
                    self.metrics.observe_drift(engine.model.name, signals.modality, scores)
            except Exception as e:
                log.warning("drift watch of model %s: %s: %s", engine.model.name, type(e).__name__, e)

    @contextmanager
    def _stage(self, run: JobRun, stage: Stage) -> Iterator[None]:
        run.step = stage
        t0 = time.monotonic()
        yield
        self.metrics.observe_stage(stage, time.monotonic() - t0)

    def _fetch(self, run: JobRun) -> SourceSeries:
        with self._stage(run, Stage.FETCH):
            files = self.orthanc.fetch_series(
                run.job.series_id, run.folder / "in", self.cfg.worker.fetch_threads
            )
            series, errors = find_series([run.folder / "in"])
        log.info("job %d: fetched %d instances", run.job.id, len(files))
        if errors:
            raise errors[0]
        if len(series) != 1:
            raise InputError(f"Orthanc series {run.job.series_id}: no CT or MR image series in it")
        return series[0]

    def _context(self, run: JobRun, series: SourceSeries, pipeline: Pipeline) -> tuple[PriorLookup, str | None]:
        """The prior to compare with (or why there is none; processed by the same models) and the
        study's report text."""
        with self._stage(run, Stage.CONTEXT):
            prior = (
                self.priors.lookup(series.datasets[0], _model_key(pipeline), run.folder, pipeline)
                if self.priors
                else PriorLookup(None)
            )
            report = study_report(self.orthanc, run.job.study_id) if run.job.study_id else None
        if prior.time_point is not None:
            log.info("job %d: prior found (%s)", run.job.id, prior.how)
        elif prior.why_not:
            log.info("job %d: no prior available: %s", run.job.id, prior.why_not)
        return prior, report

    def _store(self, run: JobRun, result: SeriesResult) -> list[Output]:
        """Every written object into Orthanc (a re-run replaces: same UIDs, OverwriteInstances)."""
        with self._stage(run, Stage.STORE):
            return [
                Output(w.kind, w.sop_uid, self.orthanc.store(w.path.read_bytes()).orthanc_id)
                for w in result.outputs
            ]

    def _routes(self, category: str) -> list[Route]:
        """Every DICOM destination's accepted kinds, and the webhooks whose ``min_category`` this
        series' urgency reaches."""
        routes = []
        for d in self.cfg.destinations:
            if not isinstance(d, WebhookDestination):
                routes += [Route(d.name, OutputKind(kind)) for kind in d.accepts]
            elif Category(category).reaches(d.min_category):
                routes.append(Route(d.name, OutputKind.TRIAGE))
        return routes

    def _notifications(self, result: SeriesResult) -> list[Output]:
        """The webhook notice: everything a destination may be sent (egress keeps what it may see)."""
        if not any(isinstance(d, WebhookDestination) for d in self.cfg.destinations):
            return []
        f = result.findings
        notice = TriageNotice(
            study_instance_uid=str(f.series.first_dataset.StudyInstanceUID),
            series_instance_uid=f.series.series_uid,
            score=f.urgency.score,
            category=f.urgency.category,
            summary=result.summary(),
            reasons=tuple(f.urgency.reasons),
            discrepancies=tuple(d.reason for d in f.discrepancies),
        )
        return [Output(OutputKind.TRIAGE, "", "", payload=notice.to_json())]

    def _heartbeat(self, job_id: int, done: threading.Event) -> None:
        while not done.wait(self.cfg.worker.heartbeat_s):
            try:
                if not self.queue.jobs.heartbeat(job_id, self.owner, self.cfg.worker.lease_s):
                    log.warning("job %d: lease lost (another worker may run it)", job_id)
                    return
            except self.queue.errors as e:  # the database restarting: the next beat tries again
                log.warning("job %d: heartbeat failed: queue %s: %s", job_id, self.queue.path, e)
            except Exception:
                log.exception("job %d: heartbeat failed", job_id)


def _model_key(pipeline: Pipeline) -> str:
    """What a series' time point is kept under: the models that processed it (another model's
    lesions are not comparable)."""
    ref = ModelRef.combined([ModelRef(e.model.name, e.model.base_version) for e in pipeline.engines])
    return f"{ref.name} {ref.version}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pacs-node-worker")
    p.add_argument(
        "--config",
        type=Path,
        required=True,
        help="the node's YAML config, or the resolved config (JSON) that serve writes for the embedded default",
    )
    args = p.parse_args(argv)
    exit_file = os.environ.get(WORKER_EXIT_ENV)

    def fatal(message: str) -> int:
        """One line for the terminal, and for the supervisor (why restarting will not help)."""
        print(f"error: {message}", file=sys.stderr)
        if exit_file:
            Path(exit_file).write_text(message + "\n")
        return 2

    try:
        cfg = (
            load_config(args.config)
            if args.config.suffix in (".yaml", ".yml")
            else read_resolved(args.config)
        )
    except ConfigError as e:
        return fatal(str(e))
    logging.basicConfig(
        level=getattr(logging, cfg.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("pynetdicom", "highdicom"):  # a line per PDU / per copied module otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def on_signal(signum, frame):
        raise Stopping()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    internal = os.environ.get(WORKER_METRICS_ENV)  # host:port, set by pacs-node serve
    metrics_at = (internal.rsplit(":", 1)[0], int(internal.rsplit(":", 1)[1])) if internal else None
    try:
        Worker(cfg, metrics_at=metrics_at).run()
    except Stopping:
        pass
    except ModelError as e:
        return fatal(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
