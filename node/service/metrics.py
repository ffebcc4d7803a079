"""Prometheus metrics and health endpoints: ``/metrics``, ``/healthz``, ``/readyz``.

Under ``pacs-node serve`` the supervisor serves them on ``metrics_port`` (:class:`SupervisorMetrics`:
the queue, its processes and the disk, then the worker's families); a worker on its own (compose)
serves the queue's and its own. The sources:

- the durable queue (read at every scrape): jobs by outcome (including series the plugin skipped,
  with the routing rule as a label), queue depth and age, deliveries by destination and outcome,
  retries, pending deliveries. Those counters live in the queue file, so they survive restarts of
  Orthanc and the worker and count what the plugin (another process) did;
- the worker itself: job and per-stage duration histograms (labelled by model and runtime),
  model/runtime info, worker up, and GPU memory/utilisation when nvidia-ml-py finds a GPU;
- the supervisor: each process up, its restarts and whether restarts stopped; disk use; intake.

No patient data ever reaches a name or a label: labels are stage names, model/runtime names, bounded
enums (outcome, state, rule, modality) and operator-chosen destination names.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from node.analysis.urgency import CATEGORIES
from node.identity import DeliveryState, JobEvent, JobState, Stage
from node.service.queue import JobQueue
from node.service.queue.counters import Counter as Tally

log = logging.getLogger(__name__)

PREFIX = "pacs_node"
# set by `pacs-node serve` for the worker: where it serves its own metrics (the supervisor, on
# metrics_port, adds the queue's and its own), and where it writes why it could not start
WORKER_METRICS_ENV = "PACS_NODE_WORKER_METRICS"
WORKER_EXIT_ENV = "PACS_NODE_WORKER_EXIT_FILE"

# seconds: a stage of a small series takes milliseconds, a 600-slice CT on a CPU minutes
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
JOB_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
# the drift gauge: an exponentially weighted mean of the series' scores, the newest weighing 0.3 (about
# the last 5 series): one unusual patient moves it a little, a scanner or protocol change within a few
# series
DRIFT_WEIGHT = 0.3

# every state and outcome is always exported (0 when none), so alerts and dashboards never see a
# series vanish
JOB_STATES = tuple(JobState)
DELIVERY_STATES = tuple(DeliveryState)
JOB_OUTCOMES = tuple(JobEvent)


@dataclass(frozen=True)
class ModelInfo:
    model: str
    version: str
    runtime: str  # e.g. onnxruntime-cpu, tensorrt
    device: str  # cpu, cuda:0
    precision: str  # fp32, fp16, int8


class QueueCollector:
    """Reads the durable queue at each scrape (its own connection: the HTTP server's thread)."""

    def __init__(self, queue: JobQueue, destinations: Iterable[str] = ()):
        self.queue = queue
        self.destinations = tuple(destinations)  # configured ones are exported even before a delivery

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> tuple:
        p = PREFIX
        return (
            CounterMetricFamily(
                f"{p}_series_received", "Stable series seen by the Orthanc plugin.", labels=["modality"]
            ),
            CounterMetricFamily(
                f"{p}_jobs",
                f"Jobs by outcome ({', '.join(JOB_OUTCOMES)}; running = leased, skipped = no job by"
                " routing, the rule label says which).",
                labels=["outcome", "rule"],
            ),
            GaugeMetricFamily(f"{p}_jobs_in_state", "Jobs now in each state.", labels=["state"]),
            GaugeMetricFamily(f"{p}_queue_depth", "Jobs waiting for a worker (state queued)."),
            GaugeMetricFamily(
                f"{p}_queue_oldest_job_age_seconds", "Age of the oldest queued job (0 when none)."
            ),
            CounterMetricFamily(
                f"{p}_deliveries",
                "Delivery attempts by destination and outcome (delivered; error = will retry;"
                " failed = gave up after the last attempt).",
                labels=["destination", "outcome"],
            ),
            CounterMetricFamily(
                f"{p}_delivery_retries",
                "Failed delivery attempts that will be retried.",
                labels=["destination"],
            ),
            GaugeMetricFamily(
                f"{p}_deliveries_in_state", "Deliveries now in each state.", labels=["destination", "state"]
            ),
            GaugeMetricFamily(
                f"{p}_deliveries_pending", "Deliveries waiting to be (re)tried.", labels=["destination"]
            ),
            GaugeMetricFamily(
                f"{p}_delivery_oldest_pending_age_seconds",
                "Age of the oldest pending delivery (0 when none).",
                labels=["destination"],
            ),
            CounterMetricFamily(
                f"{p}_series_urgency",
                "Processed series by triage category (routine, priority, urgent).",
                labels=["category"],
            ),
            CounterMetricFamily(
                f"{p}_report_discrepancies",
                "Report statements the image contradicts (flagged in the SR, never changed).",
            ),
            CounterMetricFamily(
                f"{p}_model_runs",
                "Models run on series, by model (name and version) and outcome (ran; failed: the job"
                " names why, the other models' results were kept).",
                labels=["model", "outcome"],
            ),
        )

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        (received, jobs, in_state, depth, oldest, deliveries, retries, d_state, pending, d_oldest) = families[
            :10
        ]
        urgency, discrepancies, model_runs = families[10:]
        try:
            s = self.queue.counters.stats()
        except Exception:  # a locked or missing file must not break the scrape: report nothing from it
            log.exception("metrics: cannot read the queue")
            return
        seen_jobs = set()
        for (name, label, sub), value in sorted(s.counters.items()):
            if name == Tally.SERIES_RECEIVED:
                received.add_metric([label], value)
            elif name == Tally.JOBS:
                jobs.add_metric([label, sub], value)
                seen_jobs.add(label)
            elif name == Tally.DELIVERIES:
                deliveries.add_metric([label, sub], value)
            elif name == Tally.DELIVERY_RETRIES:
                retries.add_metric([label], value)
            elif name == Tally.URGENCY:
                urgency.add_metric([label], value)
            elif name == Tally.DISCREPANCIES:
                discrepancies.add_metric([], value)
            elif name == Tally.MODEL_RUNS:
                model_runs.add_metric([label, sub], value)
        for outcome in JOB_OUTCOMES:
            if outcome not in seen_jobs and outcome is not JobEvent.SKIPPED:
                jobs.add_metric([outcome, ""], 0)
        for state in JOB_STATES:
            in_state.add_metric([state], s.jobs_by_state.get(state, 0))
        depth.add_metric([], s.jobs_by_state.get(JobState.QUEUED, 0))
        oldest.add_metric([], s.oldest_queued_age_s)
        destinations = sorted({d for d, _ in s.deliveries} | set(self.destinations))
        for d in destinations:
            for state in DELIVERY_STATES:
                d_state.add_metric([d, state], s.deliveries.get((d, state), 0))
            pending.add_metric([d], s.deliveries.get((d, DeliveryState.PENDING), 0))
            d_oldest.add_metric([d], s.oldest_pending_age_s.get(d, 0.0))
        for category in CATEGORIES:
            if (Tally.URGENCY, category, "") not in s.counters:
                urgency.add_metric([category], 0)
        if (Tally.DISCREPANCIES, "", "") not in s.counters:
            discrepancies.add_metric([], 0)
        yield from families


class GpuCollector:
    """GPU memory and utilisation through nvidia-ml-py (``pynvml``); exports nothing without a GPU."""

    def __init__(self) -> None:
        self.nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.count = pynvml.nvmlDeviceGetCount()
            self.nvml = pynvml
        except Exception:  # not installed, no driver, no GPU: the CPU node has no GPU metrics
            self.count = 0

    @staticmethod
    def _families() -> tuple:
        p = PREFIX
        return (
            GaugeMetricFamily(f"{p}_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"]),
            GaugeMetricFamily(f"{p}_gpu_memory_total_bytes", "GPU memory in total.", labels=["gpu"]),
            GaugeMetricFamily(
                f"{p}_gpu_utilization_ratio", "GPU busy fraction over the last sample period.", labels=["gpu"]
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        if not self.nvml or not self.count:
            return
        used, total, util = self._families()
        for i in range(self.count):
            try:
                h = self.nvml.nvmlDeviceGetHandleByIndex(i)
                mem = self.nvml.nvmlDeviceGetMemoryInfo(h)
                rates = self.nvml.nvmlDeviceGetUtilizationRates(h)
            except Exception:
                log.debug("nvml: GPU %d unreadable", i, exc_info=True)
                continue
            used.add_metric([str(i)], float(mem.used))
            total.add_metric([str(i)], float(mem.total))
            util.add_metric([str(i)], rates.gpu / 100.0)
        yield from (used, total, util)


@dataclass(frozen=True)
class ComponentStatus:
    """One supervised process (Orthanc, the worker) as ``pacs-node serve`` sees it."""

    component: str
    up: bool
    restarts: int  # restarts after the first start
    gave_up: bool  # it kept dying at once: not restarted again
    problem: str | None  # None when fine; else one line (why it is down, or not ready)


class SupervisorCollector:
    """What only the supervisor knows: its processes, their restarts, and the data folder's disk."""

    def __init__(
        self, status: Callable[[], list[ComponentStatus]], intake: Callable[[], dict | None], data_dir
    ):
        self.status, self.intake, self.data_dir = status, intake, data_dir

    @staticmethod
    def _families() -> tuple:
        p = PREFIX
        return (
            GaugeMetricFamily(
                f"{p}_component_up", "1 while the process runs (orthanc, worker).", labels=["component"]
            ),
            CounterMetricFamily(
                f"{p}_component_restarts",
                "Restarts by pacs-node serve after a process died.",
                labels=["component"],
            ),
            GaugeMetricFamily(
                f"{p}_component_gave_up",
                "1 when a process kept dying at once and is no longer restarted (see /readyz for why).",
                labels=["component"],
            ),
            CounterMetricFamily(f"{p}_worker_restarts", "Worker restarts by pacs-node serve."),
            GaugeMetricFamily(f"{p}_disk_used_ratio", "Used fraction of the data folder's file system."),
            GaugeMetricFamily(
                f"{p}_intake_accepting",
                "1 while new instances are accepted; 0 above the disk's high watermark (C-STORE refused).",
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        up, restarts, gave_up, worker_restarts, disk, accepting = self._families()
        statuses = self.status()
        for c in statuses:
            up.add_metric([c.component], 1 if c.up else 0)
            restarts.add_metric([c.component], c.restarts)
            gave_up.add_metric([c.component], 1 if c.gave_up else 0)
        workers = [c.restarts for c in statuses if c.component.startswith("worker")]
        if workers:
            worker_restarts.add_metric([], sum(workers))  # all of this host's worker processes
        try:
            usage = shutil.disk_usage(self.data_dir)
            disk.add_metric([], (usage.total - usage.free) / usage.total)
        except OSError:
            pass
        state = self.intake()
        if state is not None:
            accepting.add_metric([], 1 if state.get("accepting") else 0)
        yield from (up, restarts, gave_up, worker_restarts, disk, accepting)


class SupervisorMetrics:
    """``pacs-node serve``'s endpoint on ``metrics_port``: its own families (queue, processes, disk),
    followed by the worker's (read from the worker's internal endpoint while it runs), so one scrape
    sees everything and ``/readyz`` answers even when the worker is down."""

    def __init__(
        self,
        queue_location,
        destinations: Iterable[str],
        status: Callable[[], list[ComponentStatus]],
        intake: Callable[[], dict | None],
        data_dir,
        worker_urls: list[str],  # none: this host runs no worker (role ingest)
    ):
        self.registry = CollectorRegistry()
        self.registry.register(QueueCollector(JobQueue(queue_location), destinations))
        self.registry.register(SupervisorCollector(status, intake, data_dir))
        self.ready = Gauge(f"{PREFIX}_ready", "1 when the node's /readyz passes.", registry=self.registry)
        self.worker_urls = worker_urls

    def exposition(self) -> bytes:
        own = generate_latest(self.registry)
        texts = []
        for url in self.worker_urls:
            try:
                r = requests.get(f"{url}/metrics", timeout=2)
                r.raise_for_status()
                texts.append(r.content)
            except requests.RequestException:  # down or starting: its families are absent
                texts.append(None)
        if len(texts) == 1:
            return own + (texts[0] or b"")
        return own + _labelled_by_worker(texts)


def _labelled_by_worker(texts: list[bytes | None]) -> bytes:
    """Several workers' expositions as one: each sample gains ``worker="1"``, ``"2"``... (the
    families are the same in every worker; Prometheus takes each family once)."""
    families: dict[str, Metric] = {}
    for i, text in enumerate(texts, start=1):
        for family in text_string_to_metric_families((text or b"").decode()):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            merged.samples += [s._replace(labels={**s.labels, "worker": str(i)}) for s in family.samples]

    class _Families:
        def collect(self):
            return families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families())
    return generate_latest(registry)


class NodeMetrics:
    """The worker's registry; the worker calls :meth:`observe_job`, :meth:`observe_stages`..."""

    def __init__(
        self,
        queue_location=None,
        destinations: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ):
        self.registry = CollectorRegistry()
        p = PREFIX
        r = self.registry
        self.job_seconds = Histogram(
            f"{p}_job_duration_seconds",
            "Wall time of one job in the worker (fetch to stored), by outcome.",
            ["model", "runtime", "outcome"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            f"{p}_stage_duration_seconds",
            f"Wall time per stage ({', '.join(Stage)}) and, inside inference, of the backbone and each"
            " head (backbone, head_<name>).",
            ["stage", "model", "runtime"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            f"{p}_model_info",
            "The loaded model and runtime (value 1).",
            ["model", "version", "runtime", "device", "precision"],
            registry=r,
        )
        self.up = Gauge(f"{p}_worker_up", "1 while the worker process runs.", registry=r)
        self.ready = Gauge(f"{p}_worker_ready", "1 when /readyz passes (Orthanc, model, queue).", registry=r)
        self.started = Gauge(f"{p}_worker_start_time_seconds", "Unix time the worker started.", registry=r)
        self.errors = Counter(
            f"{p}_worker_errors", "Internal errors in the worker loops.", ["loop"], registry=r
        )
        self.drift = Gauge(
            f"{p}_drift_score",
            "Drift of a model's series from its reference series (drift.json) per signal: |x - mean| / std,"
            " smoothed over the model's series of the modality (exponentially, the newest weighing"
            f" {DRIFT_WEIGHT}; the first sets it). Signals: input.median, input.std, input.noise (the body's"
            " intensity), <head>.probability, <head>.<label>.ml.",
            ["model", "modality", "signal"],
            registry=r,
        )
        self._drift: dict[tuple[str, str, str], float] = {}
        self.shadow_agreement = Histogram(
            f"{p}_shadow_agreement",
            "A head version in shadow against the active version, per series: Dice of their labels "
            "(1 - |p - p'| for a classification). Never sent; judged before it is activated.",
            ["model", "head"],
            buckets=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0),
            registry=r,
        )
        self.shadow_label_dice = Histogram(
            f"{p}_shadow_label_dice",
            "A head's shadow and active versions (role) against label sets that arrived while the shadow ran: "
            "Dice per batch of new label sets.",
            ["model", "head", "role"],
            buckets=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0),
            registry=r,
        )
        self.up.set(1)
        self.started.set(time.time())
        self.queue_collector = None  # under pacs-node serve the supervisor exports the queue
        if queue_location is not None:
            self.queue_collector = QueueCollector(JobQueue(queue_location, clock=clock), destinations)
            r.register(self.queue_collector)
        r.register(GpuCollector())
        self.model: ModelInfo | None = None

    # --- recording ---------------------------------------------------------------------------
    def set_model(self, *infos: ModelInfo) -> None:
        """The loaded models (one ``model_info`` row each); the stage and job histograms name them
        together (``a+b``), as the worker's configuration does not change while it runs."""
        self.model_info.clear()
        for info in infos:
            self.model_info.labels(info.model, info.version, info.runtime, info.device, info.precision).set(1)

        def joined(values) -> str:
            return "+".join(dict.fromkeys(values))

        self.model = ModelInfo(*(joined(getattr(i, f.name) for i in infos) for f in fields(ModelInfo)))

    def _labels(self) -> tuple[str, str]:
        return (self.model.model, self.model.runtime) if self.model else ("", "")

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage, *self._labels()).observe(seconds)

    def observe_stages(self, seconds: dict[str, float]) -> None:
        for stage, s in seconds.items():
            self.observe_stage(stage, s)

    def observe_job(self, outcome: str, seconds: float) -> None:
        self.job_seconds.labels(*self._labels(), outcome).observe(seconds)

    def observe_drift(self, model: str, modality: str, scores: dict[str, float]) -> None:
        """One series' drift scores (:func:`node.analysis.drift.drift_scores`) into the smoothed gauge."""
        for signal, score in scores.items():
            key = (model, modality, signal)
            last = self._drift.get(key)
            self._drift[key] = score if last is None else DRIFT_WEIGHT * score + (1 - DRIFT_WEIGHT) * last
            self.drift.labels(*key).set(self._drift[key])

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry can export (described families, with their type suffixes)."""
    names: set[str] = set()
    collectors = list(registry._collector_to_names)  # noqa: SLF001 (prometheus_client has no public list)
    for c in collectors:
        families = c.describe() if hasattr(c, "describe") else c.collect()
        for fam in families:
            if fam.type == "counter":
                names |= {f"{fam.name}_total", f"{fam.name}_created"}
            elif fam.type == "histogram":
                names |= {f"{fam.name}_bucket", f"{fam.name}_count", f"{fam.name}_sum", f"{fam.name}_created"}
            elif fam.type == "info":
                names.add(f"{fam.name}_info")
            else:
                names.add(fam.name)
    return names


# --- the HTTP endpoint -----------------------------------------------------------------------------
Check = Callable[[], str | None]  # None: fine; else one line saying what is wrong


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body = self.server.metrics.exposition()
            except Exception as e:
                log.exception("metrics: exposition failed")
                self._send(500, f"{type(e).__name__}\n".encode(), "text/plain")
                return
            self._send(200, body, CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._json(200, {"status": "ok", "pid": os.getpid()})
        elif path == "/readyz":
            checks = self.server.run_checks()
            ok = all(v == "ok" for v in checks.values())
            self.server.metrics.ready.set(1 if ok else 0)
            problems = [f"{k}: {v}" for k, v in checks.items() if v != "ok"]
            self._json(200 if ok else 503, {"ready": ok, "checks": checks, "problems": problems})
        else:
            self._json(404, {"error": "not found", "endpoints": ["/metrics", "/healthz", "/readyz"]})

    def _json(self, code: int, obj: dict) -> None:
        self._send(code, (json.dumps(obj) + "\n").encode(), "application/json")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args) -> None:  # scrapes every 15 s: not worth a log line each
        log.debug("metrics http: " + fmt, *args)


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, metrics: NodeMetrics, checks: dict[str, Check]):
        super().__init__((host, port), _Handler)
        self.metrics = metrics
        self.checks = checks
        self._thread: threading.Thread | None = None

    def run_checks(self) -> dict[str, str]:
        out = {}
        for name, check in self.checks.items():
            try:
                problem = check()
            except Exception as e:
                problem = f"{type(e).__name__}: {e}"
            out[name] = problem or "ok"
        return out

    def start(self) -> MetricsServer:
        self._thread = threading.Thread(target=self.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", *self.server_address[:2])
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
