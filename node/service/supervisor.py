"""``pacs-node serve``: Orthanc (with our plugin) and the worker(s), as supervised child processes.

Orthanc receives and stores; the worker infers in its own process so that a model crash or an
out-of-memory never stops the DICOM receiver. This process writes the configuration (credentials
in files only its user can read), starts them (``worker.processes`` workers, each on its own), and
keeps them up: a process that dies is restarted after 1, 2, 4 ... s; one that dies at once every
time (a broken model, a broken config) is not restarted again and ``/readyz`` says why. A dead worker's job is given back at once, not after its
lease. It serves ``/metrics``, ``/healthz`` and ``/readyz`` on ``metrics_port`` itself, so they
answer while the worker is down, and stops everything cleanly on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

import node
from node.config import ConfigError, NodeConfig, RestartConfig, load_config
from node.identity import Role, StrEnum
from node.model.manifest import model_dir
from node.service.metrics import (
    WORKER_EXIT_ENV,
    WORKER_METRICS_ENV,
    Check,
    ComponentStatus,
    MetricsServer,
    SupervisorMetrics,
)
from node.service.orthanc import OrthancClient, OrthancError
from node.service.queue import JobQueue

log = logging.getLogger("node.service.supervisor")

SRC_DIR = Path(node.__file__).resolve().parent.parent
PLUGIN = SRC_DIR / "plugins" / "pacs_node_plugin.py"
ORTHANC_PLUGINS = ("libOrthancPython.so", "libOrthancDicomWeb.so", "libOrthancGdcm.so")
REQUIRED_PLUGINS = ORTHANC_PLUGINS[:2]
INDEX_PLUGIN = "libOrthancPostgreSQLIndex.so"  # Debian orthanc-postgresql: the index shared by receivers
STOP_GRACE_S = 15.0

# Transfer syntaxes Orthanc accepts as Storage SCP: the ones the worker can decode (pydicom + pylibjpeg).
# conformance/statement.md lists exactly these (tests/test_conformance.py checks both against a live node).
SCP_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14 SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)


def orthanc_config(cfg: NodeConfig, raw_users: dict | None = None, config_path: Path | None = None) -> dict:
    """Orthanc's JSON configuration for this node. A password the node's config gave as
    ``${env:NAME}`` (``raw_users``, as written) stays a reference: Orthanc reads ``${NAME}`` itself."""
    data = cfg.data_dir
    plugins = [
        str(cfg.orthanc_plugins_dir / p) for p in ORTHANC_PLUGINS if (cfg.orthanc_plugins_dir / p).exists()
    ]
    if cfg.orthanc_index_url:
        plugins.append(str(cfg.orthanc_plugins_dir / INDEX_PLUGIN))
    oc: dict = {
        "Name": cfg.ae_title,
        "DicomAet": cfg.ae_title,
        "DicomPort": cfg.dicom_port,
        "HttpPort": cfg.http_port,
        "RemoteAccessAllowed": cfg.http_remote_access,
        "AuthenticationEnabled": bool(cfg.http_users),
        "RegisteredUsers": {
            user: _env_reference((raw_users or {}).get(user)) or password
            for user, password in cfg.http_users.items()
        },
        "StorageDirectory": str(cfg.storage_dir or data / "orthanc-storage"),
        "IndexDirectory": str(data / "orthanc-index"),
        "Plugins": plugins,
        "PythonScript": str(PLUGIN),
        "PythonVerbose": False,
        "StableAge": cfg.stable_age_s,
        # a re-run writes the same output UIDs: the new object must replace the old one
        "OverwriteInstances": True,
        "StorageCompression": False,
        "ExecuteLuaEnabled": False,
        "RestApiWriteToFileSystemEnabled": False,
        "AcceptedTransferSyntaxes": list(SCP_TRANSFER_SYNTAXES),
        "UnknownSopClassAccepted": False,
        # with an allow-list, any other calling AE is rejected at association (A-ASSOCIATE-RJ, calling
        # AE title not recognized): Orthanc admits every caller as soon as one "always allow" is on
        "DicomAlwaysAllowEcho": not cfg.allowed_aes,
        "DicomAlwaysAllowStore": not cfg.allowed_aes,
        "DicomCheckModalityHost": False,
        "DicomCheckCalledAet": cfg.check_called_ae,
        "DicomModalities": {
            ae: {
                "AET": ae,
                "Host": "127.0.0.1",
                "Port": 104,
                "AllowStore": True,
                "AllowEcho": True,
                "AllowFind": False,
                "AllowMove": False,
                "AllowGet": False,
            }
            for ae in cfg.allowed_aes
        },
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        "PacsNode": {
            "Queue": str(cfg.queue_location),
            "Src": str(SRC_DIR),
            "Routing": [r.model_dump(mode="json") for r in cfg.all_rules],
            "MaxAttempts": cfg.worker.max_attempts,
            # /inference/heads runs `pacs-node heads` (the gate needs numpy and ONNX Runtime, not
            # Orthanc's interpreter): the node's Python, its config, and each model's folder
            "Heads": {
                "Command": [sys.executable, "-m", "node.cli", "heads"],
                "Config": str(config_path.resolve()) if config_path else None,
                "Models": {Path(r.model).name: str(model_dir(r.model).resolve()) for r in cfg.model_routes},
            },
            "Triage": cfg.model_dump(mode="json")["triage"],
            "Watermarks": {
                "Path": str(data),
                "High": cfg.disk.refuse_above_percent,
                "Low": cfg.disk.resume_below_percent,
            },
        },
    }
    if cfg.orthanc_index_url:
        # several Orthancs on one index (Orthanc >= 1.9.2, plugin >= 4.0): no exclusive lock; the
        # password from PGPASSWORD or .pgpass (libpq), like the queue's
        oc["PostgreSQL"] = {
            "EnableIndex": True,
            "EnableStorage": False,
            "ConnectionUri": cfg.orthanc_index_url,
            "Lock": False,
            "EnableSsl": False,
            "MaximumConnectionRetries": 10,
            "ConnectionRetryInterval": 2,
        }
    return oc


def _env_reference(raw) -> str | None:
    m = re.fullmatch(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}", raw or "") if isinstance(raw, str) else None
    return f"${{{m.group(1)}}}" if m else None


def write_private(path: Path, text: str) -> None:
    """Write a file only this user can read (it may hold credentials)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an older file keeps its mode through O_CREAT


class ChildState(StrEnum):
    RUNNING = "running"
    WAITING = "waiting"  # died; restarted when its backoff has passed
    GAVE_UP = "gave_up"  # died at once too many times in a row: not restarted
    STOPPED = "stopped"


@dataclass
class Child:
    """One supervised process and its restart policy."""

    name: str
    argv: list[str]
    policy: RestartConfig
    log_path: Path | None = None  # None: inherit our stderr
    env: dict[str, str] = field(default_factory=dict)
    exit_file: Path | None = None  # where the process writes why it could not start
    proc: subprocess.Popen | None = None
    state: ChildState = ChildState.STOPPED
    starts: int = 0
    started_at: float = 0.0
    quick_exits: int = 0  # consecutive deaths within policy.quick_exit_s of the start
    next_start: float = 0.0
    last_exit: str | None = None  # one line: how it last ended

    def start(self) -> None:
        out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 (owned by the child)
        if self.exit_file is not None:
            self.exit_file.unlink(missing_ok=True)
        # own session: a terminal's Ctrl-C reaches only us, and we stop the children in order
        self.proc = subprocess.Popen(
            self.argv,
            stdout=out or sys.stderr,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
            env={**os.environ, **self.env},
        )
        if out:
            out.close()
        self.starts += 1
        self.started_at = time.monotonic()
        self.state = ChildState.RUNNING
        log.info("%s started (pid %d)", self.name, self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    def died(self, why: str) -> None:
        """Record the death and decide: restart after the backoff, or give up."""
        now = time.monotonic()
        self.last_exit = why
        quick = now - self.started_at < self.policy.quick_exit_s
        self.quick_exits = self.quick_exits + 1 if quick else 0
        if self.quick_exits >= self.policy.give_up_after:
            self.state = ChildState.GAVE_UP
            log.error(
                "%s is not restarted again: it died within %.0f s of its start %d times in a row; last: %s",
                self.name,
                self.policy.quick_exit_s,
                self.quick_exits,
                why,
            )
            return
        delay = min(self.policy.backoff_max_s, self.policy.backoff_s * 2 ** max(0, self.quick_exits - 1))
        self.state = ChildState.WAITING
        self.next_start = now + delay
        log.warning("%s %s: restarting it in %.0f s", self.name, why, delay)

    def status(self) -> ComponentStatus:
        problem = None
        if self.state is ChildState.GAVE_UP:
            problem = f"not restarted after dying at once {self.quick_exits} times: {self.last_exit}"
        elif self.state is ChildState.WAITING:
            problem = f"{self.last_exit}; restarting in {max(0.0, self.next_start - time.monotonic()):.0f} s"
        elif self.state is ChildState.STOPPED:
            problem = "not started"
        return ComponentStatus(
            self.name, self.alive(), self.restarts, self.state is ChildState.GAVE_UP, problem
        )

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        self.state = ChildState.STOPPED
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s: killing it", self.name, grace)
            self.proc.kill()
            self.proc.wait()


def _check_install(cfg: NodeConfig) -> None:
    if not cfg.orthanc_binary.exists():
        raise ConfigError(
            f"orthanc_binary: {cfg.orthanc_binary} not found (apt-get install orthanc orthanc-python orthanc-dicomweb)"
        )
    for p in (*REQUIRED_PLUGINS, *([INDEX_PLUGIN] if cfg.orthanc_index_url else [])):
        if not (cfg.orthanc_plugins_dir / p).exists():
            raise ConfigError(f"orthanc_plugins_dir: {p} not in {cfg.orthanc_plugins_dir}")


def _tail(path: Path, n: int = 5, errors_only: bool = False) -> str:
    """The last ``n`` error lines of an Orthanc log (else its last lines), joined on one line."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith(("E", "F"))]
    return " | ".join((errors if errors or errors_only else lines)[-n:])


def _raw_users(config_path: Path | None) -> dict:
    """The config's http_users as written (before ${env:...} is resolved)."""
    if config_path is None:
        return {}
    try:
        raw = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    users = raw.get("http_users") if isinstance(raw, dict) else None
    return users if isinstance(users, dict) else {}


class Supervisor:
    """Orthanc and the workers of this host's role, kept up; the node's health endpoint."""

    def __init__(self, cfg: NodeConfig, config_path: Path | None, role: Role = Role.ALL):
        self.cfg, self.role = cfg, role
        data = cfg.data_dir
        self.queue = JobQueue(cfg.queue_location)  # creates the schema before either child opens it
        self.client = OrthancClient(cfg.orthanc_url, cfg.orthanc_auth)
        self.orthanc: Child | None = None
        self.workers: list[Child] = []
        if role.receives:
            orthanc_json = data / "orthanc.json"
            write_private(orthanc_json, json.dumps(orthanc_config(cfg, _raw_users(config_path), config_path), indent=2))
            self.orthanc = Child(
                "orthanc", [str(cfg.orthanc_binary), str(orthanc_json)], cfg.restart, data / "orthanc.log"
            )
        self.worker_ports: list[int] = []
        if role.infers:
            n = cfg.worker.processes
            self.worker_ports = [_free_port() for _ in range(n)]
            self.workers = [self._worker_child(config_path, i, n) for i in range(n)]
        self.health: MetricsServer | None = None

    @property
    def children(self) -> list[Child]:
        """The processes this host's role runs, in start order."""
        return [c for c in (self.orthanc, *self.workers) if c is not None]

    def _worker_child(self, config_path: Path | None, i: int, n: int) -> Child:
        """Worker ``i`` of ``n``: its own internal metrics port and exit file (``worker``, or
        ``worker-1`` ... when there are several), and its GPU when ``worker.gpus`` lists them."""
        cfg, data = self.cfg, self.cfg.data_dir
        if config_path is not None:  # the worker reads the config itself: its secrets stay references
            worker_config = config_path.resolve()
        else:
            worker_config = data / "node.json"
            write_private(worker_config, json.dumps(cfg.model_dump(mode="json"), indent=2))
        name = "worker" if n == 1 else f"worker-{i + 1}"
        env = {
            WORKER_METRICS_ENV: f"127.0.0.1:{self.worker_ports[i]}",
            WORKER_EXIT_ENV: str(data / f"{name}-exit.txt"),
        }
        if cfg.worker.gpus:
            env["CUDA_VISIBLE_DEVICES"] = cfg.worker.gpus[i % len(cfg.worker.gpus)]
        return Child(
            name,
            [sys.executable, "-m", "node.service.worker", "--config", str(worker_config)],
            cfg.restart,
            env=env,
            exit_file=data / f"{name}-exit.txt",
        )

    # --- health ---------------------------------------------------------------------------------
    def _intake(self) -> dict | None:
        try:
            return self.client.get_json("/inference/intake", timeout=2)
        except OrthancError:
            return None

    @staticmethod
    def _worker_ready(port: int) -> str | None:
        try:
            r = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
        except requests.RequestException:
            return "starting (its endpoint does not answer yet)"
        return (
            None
            if r.status_code == 200
            else "; ".join(r.json().get("problems", [])) or f"HTTP {r.status_code}"
        )

    def checks(self) -> dict[str, Check]:
        def orthanc() -> str | None:  # this host's, or (role worker) the cluster's it works through
            st = self.orthanc.status() if self.orthanc else None
            if st and st.problem:
                return st.problem
            return None if self.client.ready() else f"Orthanc at {self.client.url} not reachable"

        def worker() -> str | None:  # every worker process must be ready
            problems = []
            for child, port in zip(self.workers, self.worker_ports, strict=True):
                if problem := child.status().problem or self._worker_ready(port):
                    problems.append(problem if len(self.workers) == 1 else f"{child.name}: {problem}")
            return "; ".join(problems) or None

        def intake() -> str | None:
            state = self._intake()
            if state is None:
                return None  # Orthanc's own check says why
            return None if state.get("accepting") else f"refusing new instances: {state.get('reason')}"

        checks = {"orthanc": orthanc, "worker": worker, "queue": self.queue.writable, "intake": intake}
        if not self.role.infers:
            del checks["worker"]
        if not self.role.receives:
            del checks["intake"]
        return checks

    def start_health(self) -> None:
        if not self.cfg.metrics_port:
            return
        metrics = SupervisorMetrics(
            self.cfg.queue_location,
            [d.name for d in self.cfg.destinations],
            lambda: [c.status() for c in self.children],
            self._intake,
            self.cfg.data_dir,
            [f"http://127.0.0.1:{port}" for port in self.worker_ports],
        )
        try:
            self.health = MetricsServer(
                self.cfg.metrics_host, self.cfg.metrics_port, metrics, self.checks()
            ).start()
        except OSError as e:  # the port is taken: run without the endpoint rather than not at all
            log.error("metrics_port %d: cannot listen (%s): no health endpoint", self.cfg.metrics_port, e)

    # --- keeping them up ------------------------------------------------------------------------
    def tend(self) -> None:
        """One look at every process: record deaths, give back a dead worker's jobs, restart."""
        for child in self.children:
            if child.state is ChildState.RUNNING and not child.alive():
                code = child.proc.returncode
                why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited (code {code})"
                if child.exit_file is not None and child.exit_file.exists():
                    why += ": " + child.exit_file.read_text().strip()
                elif child.log_path is not None and (errors := _tail(child.log_path, 2, errors_only=True)):
                    why += f": {errors}"
                if child in self.workers:
                    self._release(child.proc.pid, f"{child.name} {why}")
                child.died(why)
            if child.state is ChildState.WAITING and time.monotonic() >= child.next_start:
                child.start()

    def _release(self, pid: int, why: str) -> None:
        try:
            released = self.queue.jobs.release(f"{socket.gethostname()}:{pid}", why)
        except Exception as e:  # the queue unwritable (a full disk): the lease expires instead
            log.error("could not give back the dead worker's job: %s", e)
            return
        for job_id in released:
            log.warning("job %d given back: %s (it was running it)", job_id, why)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        if self.health is not None:
            self.health.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_orthanc(sup: Supervisor, cfg: NodeConfig, stop: dict) -> int | None:
    """Start Orthanc and wait for it and the plugin; an exit code when that fails."""
    sup.orthanc.start()
    deadline = time.monotonic() + 60
    while not sup.client.ready():
        if not sup.orthanc.alive() or stop["signal"] or time.monotonic() > deadline:
            sup.orthanc.stop()
            if stop["signal"]:
                return 0
            print(
                f"error: Orthanc did not start ({_tail(cfg.data_dir / 'orthanc.log')}); see {cfg.data_dir}/orthanc.log",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.2)
    try:
        if sup.client.get_json("/inference/jobs") is None:
            raise OrthancError("no answer")
    except OrthancError:
        sup.orthanc.stop()
        print(f"error: the pacs-node plugin did not load; see {cfg.data_dir}/orthanc.log", file=sys.stderr)
        return 1
    log.info(
        "Orthanc up: DICOM %s on port %d, REST/DICOMweb %s (log %s)",
        cfg.ae_title,
        cfg.dicom_port,
        cfg.orthanc_url,
        cfg.data_dir / "orthanc.log",
    )
    return None


def serve(config_path: Path | None, role: Role = Role.ALL) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    try:
        cfg = load_config(config_path)
        if role.receives:  # a worker-only host needs no Orthanc of its own
            _check_install(cfg)
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(cfg.data_dir, 0o700)  # the index, the images and the credentials files
        sup = Supervisor(cfg, config_path, role)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    stop = {"signal": 0}

    def on_signal(signum, frame):
        stop["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    if sup.orthanc is not None and (code := _start_orthanc(sup, cfg, stop)) is not None:
        return code
    if sup.orthanc is None:
        log.info("role %s: working through Orthanc at %s", role, cfg.orthanc_url)
    sup.start_health()
    for worker in sup.workers:
        worker.start()
    try:
        while not stop["signal"]:
            time.sleep(0.2)
            sup.tend()
    finally:
        log.info("stopping (%s)", signal.Signals(stop["signal"]).name if stop["signal"] else "error")
        sup.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(serve(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
