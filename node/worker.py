"""The worker process: lease a job -> fetch the series from Orthanc -> pipeline -> store -> deliver.

Runs outside Orthanc (``python -m node.worker --config node.json``, started by
``pacs-node serve``). Inference runs in the main thread, holding its job's
lease by a heartbeat; deliveries run in a second thread so that a slow or
absent destination never holds back inference and vice versa.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from node import egress
from node.config import ConfigError, NodeConfig, WebhookDestination, load_config, read_resolved
from node.errors import InputError, ModelError
from node.jobqueue import Job, JobQueue, Output
from node.metrics import MetricsServer, ModelInfo, NodeMetrics
from node.orthanc import OrthancClient, OrthancError
from node.priors import PriorLookup, Priors, study_report
from node.urgency import CATEGORIES

if TYPE_CHECKING:
    from node.pipeline import SeriesResult

log = logging.getLogger("node.worker")


class Stopping(Exception):
    """Raised in the main thread by SIGTERM/SIGINT: give the job back and exit."""


@dataclass
class JobOutcome:
    state: str
    seconds: float
    error: str | None = None


class Worker:
    def __init__(self, cfg: NodeConfig, pipeline=None):
        self.cfg = cfg
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.queue = JobQueue(cfg.queue_path)
        self.orthanc = OrthancClient(cfg.orthanc_url, cfg.orthanc_auth)
        self.work_dir = cfg.data_dir / "work"
        self._pipeline = pipeline
        self._stop = threading.Event()
        self.metrics = NodeMetrics(cfg.queue_path, [d.name for d in cfg.destinations])
        self.metrics_server: MetricsServer | None = None
        if pipeline is not None:
            self._model_info(pipeline)

    @property
    def pipeline(self):
        if self._pipeline is None:  # loaded once, lazily: a config-only start stays fast
            from node.model_repo import load_model
            from node.pipeline import Pipeline
            from node.runtimes import select_runtime

            model = load_model(self.cfg.model)
            runtime, why = select_runtime(model, self.cfg.runtime)
            log.info("model %s %s on %s (%s)", model.name, model.version, runtime.name, why)
            self._pipeline = Pipeline(model, runtime, self.cfg.triage)
            self._model_info(self._pipeline)
        return self._pipeline

    def _model_info(self, pipeline) -> None:
        model, runtime = getattr(pipeline, "model", None), getattr(pipeline, "runtime", None)
        self.metrics.set_model(
            ModelInfo(
                model=str(getattr(model, "name", "") or ""),
                version=str(getattr(model, "version", "") or ""),
                runtime=str(getattr(runtime, "name", "") or ""),
                device=str(getattr(runtime, "device", "") or ""),
                precision=str(getattr(runtime, "precision", "fp32") or "fp32"),
            )
        )

    # --- health ----------------------------------------------------------------------------------
    def start_metrics(self) -> MetricsServer | None:
        """Serve /metrics, /healthz and /readyz on ``metrics_port`` (0: not at all)."""
        if not self.cfg.metrics_port:
            return None
        checks = {
            "orthanc": lambda: (
                None if self.orthanc.ready() else f"Orthanc at {self.orthanc.url} not reachable"
            ),
            "model": lambda: (
                None if self._pipeline is not None else f"model {self.cfg.model} not loaded (yet)"
            ),
            "queue": self.metrics.queue_collector.queue.writable,
        }
        try:
            self.metrics_server = MetricsServer(
                self.cfg.metrics_host, self.cfg.metrics_port, self.metrics, checks
            ).start()
        except OSError as e:  # the port is taken: run without metrics rather than not at all
            log.error("metrics_port %d: cannot listen (%s): no metrics endpoint", self.cfg.metrics_port, e)
        return self.metrics_server

    # --- main loop ---------------------------------------------------------------------------
    def run(self) -> None:
        deliverer = threading.Thread(target=self._delivery_loop, name="delivery", daemon=True)
        deliverer.start()
        if self.metrics_server is None:
            self.start_metrics()  # before the model loads: /healthz answers, /readyz says "loading"
        self.pipeline  # noqa: B018  (load the model before taking a job)
        log.info("worker %s ready", self.owner)
        try:
            while not self._stop.is_set():
                job = self.queue.lease(self.owner, self.cfg.worker.lease_s)
                if job is None:
                    self._stop.wait(self.cfg.worker.poll_s)
                    continue
                self.process(job)
        except Stopping:
            log.info("worker stopping")
        finally:
            self._stop.set()
            deliverer.join(timeout=5)
            if self.metrics_server is not None:
                self.metrics_server.stop()

    def stop(self) -> None:
        self._stop.set()

    def process(self, job: Job) -> JobOutcome:
        """Run one leased job to a recorded outcome (done/delivering, queued again, or failed)."""
        t0 = time.monotonic()
        beat = threading.Event()
        hb = threading.Thread(target=self._heartbeat, args=(job.id, beat), daemon=True)
        hb.start()
        tmp = self.work_dir / f"job-{job.id}"
        try:
            outputs, result = self._run(job, tmp)
            f = result.findings
            state = self.queue.complete(
                job.id,
                self.owner,
                outputs + self._notifications(result),
                self._routes(f.urgency.category),
                (f.urgency.category, f.urgency.score),
                len(f.discrepancies),
            )
            seconds = time.monotonic() - t0
            self.metrics.observe_job("processed", seconds)
            log.info("job %d (series %s): %s in %.1f s", job.id, job.series_id, state, seconds)
            return JobOutcome(state, seconds)
        except InputError as e:  # the series itself is unusable: no point retrying
            return self._failed(job, str(e), False, t0)
        except (OrthancError, OSError) as e:  # transient: Orthanc restarting, disk full...
            return self._failed(job, str(e), True, t0)
        except Stopping:
            self.queue.fail(job.id, self.owner, "worker stopped during the job", retry=True)
            raise
        except Exception as e:  # a bug of ours: keep the traceback in the log, a line in the job
            log.exception("job %d: internal error", job.id)
            self.metrics.errors.labels("job").inc()
            return self._failed(job, f"internal error: {type(e).__name__}: {e}", True, t0)
        finally:
            beat.set()
            shutil.rmtree(tmp, ignore_errors=True)

    def _failed(self, job: Job, error: str, retry: bool, t0: float) -> JobOutcome:
        state = self.queue.fail(job.id, self.owner, error, retry=retry)
        self.metrics.observe_job("failed" if state == "failed" else "error", time.monotonic() - t0)
        log.warning("job %d (series %s): %s: %s", job.id, job.series_id, state, error)
        return JobOutcome(state, time.monotonic() - t0, error)

    def _run(self, job: Job, tmp: Path) -> tuple[list[Output], SeriesResult]:
        from node.series import find_series

        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.monotonic()
        files = self.orthanc.fetch_series(job.series_id, tmp / "in", self.cfg.worker.fetch_threads)
        self.metrics.observe_stage("fetch", time.monotonic() - t0)
        log.info("job %d: fetched %d instances in %.2f s", job.id, len(files), time.monotonic() - t0)
        series, errors = find_series([tmp / "in"])
        if errors:
            raise InputError(str(errors[0]))
        if len(series) != 1:
            raise InputError(f"Orthanc series {job.series_id}: no CT or MR image series in it")
        t_context = time.monotonic()
        prior = self._prior(series[0], tmp)
        report = study_report(self.orthanc, job.study_id) if job.study_id else None
        self.metrics.observe_stage("context", time.monotonic() - t_context)
        if prior.time_point is not None:
            log.info("job %d: prior found (%s)", job.id, prior.how)
        elif prior.why_not:
            log.info("job %d: no prior available: %s", job.id, prior.why_not)
        result = self.pipeline.process(
            series[0], tmp / "out", prior=prior.time_point, report=report, prior_unavailable=prior.why_not
        )
        if result.error:
            raise InputError(result.error)
        self.queue.save_time_point(result.series_uid, self._model_key, result.time_point.to_json())
        self.metrics.observe_stages(result.seconds | result.parts)
        t_store = time.monotonic()
        outputs = []
        for path in result.files:
            from pydicom import dcmread

            sop_uid = str(
                dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID
            )
            stored = self.orthanc.store(path.read_bytes())
            outputs.append(Output(path.stem, sop_uid, stored.orthanc_id))
        self.metrics.observe_stage("store", time.monotonic() - t_store)
        log.info(
            "job %d: %s; stages %s",
            job.id,
            result.summary(),
            ", ".join(f"{k} {v:.2f}" for k, v in result.seconds.items()),
        )
        return outputs, result

    @property
    def _model_key(self) -> str:
        return f"{self.pipeline.model.name} {self.pipeline.model.version}"

    def _prior(self, series, tmp: Path) -> PriorLookup:
        p = self.cfg.priors
        if not p.enabled:
            return PriorLookup(None)
        priors = Priors(
            self.queue,
            self.orthanc,
            p.sources,
            self.cfg.ae_title,
            p.move_destination or self.cfg.ae_title,
            p.lookback_days,
        )
        return priors.lookup(series.datasets[0], self._model_key, tmp, self.pipeline)

    def _routes(self, category: str) -> list[tuple[str, str]]:
        """(destination, kind) pairs to deliver: every DICOM destination's accepted kinds, and the
        webhooks whose ``min_category`` this series' urgency reaches."""
        routes = []
        for d in self.cfg.destinations:
            if not isinstance(d, WebhookDestination):
                routes += [(d.name, kind) for kind in d.accepts]
            elif CATEGORIES.index(category) >= CATEGORIES.index(d.min_category):
                routes.append((d.name, "triage"))
        return routes

    def _notifications(self, result: SeriesResult) -> list[Output]:
        """The webhook payload: everything a destination may be sent (egress keeps what it may see)."""
        if not any(isinstance(d, WebhookDestination) for d in self.cfg.destinations):
            return []
        f = result.findings
        payload = {
            "event": "pacs-node.triage",
            "study_instance_uid": str(f.series.first_dataset.StudyInstanceUID),
            "series_instance_uid": f.series.series_uid,
            "score": f.urgency.score,
            "category": f.urgency.category,
            "summary": result.summary(),
            "reasons": list(f.urgency.reasons),
            "discrepancies": [d.reason for d in f.discrepancies],
        }
        return [Output("triage", "", "", payload=json.dumps(payload))]

    def _heartbeat(self, job_id: int, done: threading.Event) -> None:
        while not done.wait(self.cfg.worker.heartbeat_s):
            try:
                if not self.queue.heartbeat(job_id, self.owner, self.cfg.worker.lease_s):
                    log.warning("job %d: lease lost (another worker may run it)", job_id)
                    return
            except Exception:
                log.exception("job %d: heartbeat failed", job_id)

    # --- deliveries --------------------------------------------------------------------------
    def _delivery_loop(self) -> None:
        # its own connection: sqlite3 connections are not for concurrent use across threads
        queue = JobQueue(self.cfg.queue_path)
        while not self._stop.is_set():
            try:
                n = self.deliver_due(queue)
            except Exception:
                log.exception("delivery loop error")
                self.metrics.errors.labels("delivery").inc()
                n = 0
            if not n:
                self._stop.wait(min(self.cfg.worker.poll_s, 1.0))

    def deliver_due(self, queue: JobQueue | None = None) -> int:
        """Try every due delivery once, grouped per destination; return how many were tried."""
        queue = queue or self.queue
        due = queue.due_deliveries()
        by_dest: dict[str, list] = defaultdict(list)
        for d in due:
            by_dest[d.destination].append(d)
        d_cfg = self.cfg.delivery
        for name, deliveries in by_dest.items():
            try:
                dest = self.cfg.destination(name)
            except KeyError:  # removed from the config since: nothing will ever deliver it
                for d in deliveries:
                    queue.delivery_failed(d.id, f"destination {name!r} is no longer configured", 1, 1, 1)
                continue
            items = []
            for d in deliveries:
                if d.payload:  # a notification: its body is in the queue, nothing to read from Orthanc
                    items.append(egress.Item(d.id, d.payload.encode()))
                    continue
                try:
                    items.append(egress.Item(d.id, self.orthanc.instance_file(d.orthanc_id)))
                except OrthancError as e:
                    queue.delivery_failed(
                        d.id, str(e), d_cfg.backoff_s, d_cfg.backoff_max_s, d_cfg.max_attempts
                    )
            ok = 0
            t_send = time.monotonic()
            outcomes = egress.send(dest, items, self.cfg.ae_title)
            if items:
                self.metrics.observe_stage("deliver", time.monotonic() - t_send)
            for o in outcomes:
                if o.error is None:
                    ok += 1
                    queue.delivered(o.key)
                else:
                    state = queue.delivery_failed(
                        o.key, o.error, d_cfg.backoff_s, d_cfg.backoff_max_s, d_cfg.max_attempts
                    )
                    log.warning("delivery %d to %s: %s (%s)", o.key, name, o.error, state)
            log.info("delivered to %s: %d of %d", name, ok, len(deliveries))
        return len(due)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pacs-node-worker")
    p.add_argument(
        "--config",
        type=Path,
        required=True,
        help="resolved node config (JSON, written by serve), or the node's YAML config (a worker on its own,"
        " e.g. in compose)",
    )
    args = p.parse_args(argv)
    try:
        if args.config.suffix in (".yaml", ".yml"):
            cfg = load_config(args.config)
        else:
            cfg = read_resolved(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
    try:
        worker = Worker(cfg)
        worker.run()
    except Stopping:
        pass
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
