"""``pacs-node serve``: Orthanc (with our plugin) and the worker, as supervised child processes.

Orthanc receives and stores; the worker infers in its own process so that a
model crash or an out-of-memory never stops the DICOM receiver. This process
only writes the configuration, starts both, restarts a worker that died,
forwards Ctrl-C/SIGTERM and stops everything cleanly.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import node
from node.config import ConfigError, NodeConfig, dump_config, load_config
from node.service.metrics import RESTARTS_ENV
from node.service.orthanc import OrthancClient, OrthancError
from node.service.queue import JobQueue

log = logging.getLogger("node.service.supervisor")

SRC_DIR = Path(node.__file__).resolve().parent.parent
PLUGIN = SRC_DIR / "plugins" / "pacs_node_plugin.py"
ORTHANC_PLUGINS = ("libOrthancPython.so", "libOrthancDicomWeb.so", "libOrthancGdcm.so")
REQUIRED_PLUGINS = ORTHANC_PLUGINS[:2]
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


def orthanc_config(cfg: NodeConfig) -> dict:
    """Orthanc's JSON configuration for this node."""
    data = cfg.data_dir
    plugins = [
        str(cfg.orthanc_plugins_dir / p) for p in ORTHANC_PLUGINS if (cfg.orthanc_plugins_dir / p).exists()
    ]
    oc: dict = {
        "Name": cfg.ae_title,
        "DicomAet": cfg.ae_title,
        "DicomPort": cfg.dicom_port,
        "HttpPort": cfg.http_port,
        "RemoteAccessAllowed": cfg.http_remote_access,
        "AuthenticationEnabled": bool(cfg.http_users),
        "RegisteredUsers": dict(cfg.http_users),
        "StorageDirectory": str(data / "orthanc-storage"),
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
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": not cfg.allowed_aes,
        "DicomCheckModalityHost": False,
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
            "Queue": str(cfg.queue_path),
            "Src": str(SRC_DIR),
            "Routing": [r.model_dump(mode="json") for r in cfg.routing],
            "MaxAttempts": cfg.worker.max_attempts,
            "Triage": cfg.model_dump(mode="json")["triage"],
        },
    }
    return oc


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path | None = None  # None: inherit our stderr
    proc: subprocess.Popen | None = None
    starts: list[float] = field(default_factory=list)

    def start(self) -> None:
        out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 (owned by the child)
        # the worker's pacs_node_worker_restarts_total: how many times it was started before this one
        env = {**os.environ, RESTARTS_ENV: str(len(self.starts))}
        # own session: a terminal's Ctrl-C reaches only us, and we stop the children in order
        self.proc = subprocess.Popen(
            self.argv,
            stdout=out or sys.stderr,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
            env=env,
        )
        if out:
            out.close()
        self.starts.append(time.monotonic())
        log.info("%s started (pid %d)", self.name, self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = STOP_GRACE_S) -> None:
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
    for p in REQUIRED_PLUGINS:
        if not (cfg.orthanc_plugins_dir / p).exists():
            raise ConfigError(f"orthanc_plugins_dir: {p} not in {cfg.orthanc_plugins_dir}")


def _tail(path: Path, n: int = 5) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith(("E", "F"))]
    return " | ".join((errors or lines)[-n:])


def serve(config_path: Path | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    try:
        cfg = load_config(config_path)
        _check_install(cfg)
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    JobQueue(cfg.queue_path).close()  # create the schema before either side opens it
    orthanc_json = cfg.data_dir / "orthanc.json"
    orthanc_json.write_text(json.dumps(orthanc_config(cfg), indent=2))
    node_json = cfg.data_dir / "node.json"
    dump_config(cfg, node_json)

    orthanc = Child("orthanc", [str(cfg.orthanc_binary), str(orthanc_json)], cfg.data_dir / "orthanc.log")
    worker = Child("worker", [sys.executable, "-m", "node.service.worker", "--config", str(node_json)])

    stop = {"signal": 0}

    def on_signal(signum, frame):
        stop["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    orthanc.start()
    client = OrthancClient(cfg.orthanc_url, cfg.orthanc_auth)
    deadline = time.monotonic() + 60
    while not client.ready():
        if not orthanc.alive() or stop["signal"] or time.monotonic() > deadline:
            orthanc.stop()
            if stop["signal"]:
                return 0
            print(
                f"error: Orthanc did not start ({_tail(cfg.data_dir / 'orthanc.log')}); see {cfg.data_dir}/orthanc.log",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.2)
    try:
        if client.get_json("/inference/jobs") is None:
            raise OrthancError("no answer")
    except OrthancError:
        orthanc.stop()
        print(f"error: the pacs-node plugin did not load; see {cfg.data_dir}/orthanc.log", file=sys.stderr)
        return 1
    log.info(
        "Orthanc up: DICOM %s on port %d, REST/DICOMweb %s (log %s)",
        cfg.ae_title,
        cfg.dicom_port,
        cfg.orthanc_url,
        cfg.data_dir / "orthanc.log",
    )
    worker.start()
    code = 0
    try:
        while not stop["signal"]:
            time.sleep(0.2)
            if not orthanc.alive():
                log.error(
                    "Orthanc exited (code %s): stopping; see %s", orthanc.proc.returncode, orthanc.log_path
                )
                code = 1
                break
            if not worker.alive():
                # a crash of the worker must not stop the receiver: restart it, slowly if it keeps dying
                recent = [t for t in worker.starts if time.monotonic() - t < 60]
                delay = 1.0 if len(recent) < 3 else 10.0
                if time.monotonic() - worker.starts[-1] >= delay:
                    log.warning("worker exited (code %s): restarting it", worker.proc.returncode)
                    worker.start()
    finally:
        log.info("stopping (%s)", signal.Signals(stop["signal"]).name if stop["signal"] else "error")
        worker.stop()
        orthanc.stop()
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(serve(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
