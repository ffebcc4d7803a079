"""The node's configuration: one YAML file, validated at start.

A wrong config must stop the node before anything starts, with one line that
names the offending key (``destinations[1].port: ...``), never a traceback.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from node.analysis.urgency import Category, TriageRules
from node.identity import DEFAULT_ACCEPTS, ROUTED_MODALITIES, OutputKind, RuntimeChoice
from node.service.retrieve import QueryRetrieveSource

if TYPE_CHECKING:
    from node.model.feature_cache import FeatureCache

# what a DICOM destination may accept: every DICOM output kind; pmap (the lesion probability
# Parametric Map) is opt-in, not every PACS stores that SOP class
DicomKind = Literal[tuple(k.value for k in OutputKind if k.is_dicom)]
_AE_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _-.")


class ConfigError(ValueError):
    """A config problem the user can fix; ``str()`` is one line naming the key."""


def _ae_title(value: str) -> str:
    if not value or len(value) > 16 or not set(value) <= _AE_CHARS or value.strip() != value:
        raise ValueError(f"must be 1-16 characters (letters, digits, space, _ - .), got {value!r}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DicomDestination(_Strict):
    name: str
    kind: Literal["dicom"]
    host: str
    port: int = Field(ge=1, le=65535)
    ae_title: str
    accepts: list[DicomKind] = [k.value for k in DEFAULT_ACCEPTS]
    timeout_s: float = Field(default=30.0, gt=0)

    _check_ae = field_validator("ae_title")(_ae_title)


class DicomWebDestination(_Strict):
    name: str
    kind: Literal["dicomweb"]
    url: str
    accepts: list[DicomKind] = [k.value for k in DEFAULT_ACCEPTS]
    username: str | None = None
    password: str | None = None
    timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {v!r}")
        return v.rstrip("/")


class WebhookDestination(_Strict):
    """Triage notifications: one JSON POST per processed series whose urgency reaches
    ``min_category``, retried with the deliveries' backoff like any other destination."""

    name: str
    kind: Literal["webhook"]
    url: str
    min_category: Literal[tuple(c.value for c in Category)] = "priority"
    # beyond the documented minimum (UIDs, score, category, findings summary): opt-in fields
    include: list[Literal["reasons", "discrepancies"]] = []
    headers: dict[str, str] = {}  # e.g. Authorization: "Bearer ${env:RIS_TOKEN}"
    timeout_s: float = Field(default=10.0, gt=0)

    _http = field_validator("url")(DicomWebDestination._http.__func__)


Destination = Annotated[
    DicomDestination | DicomWebDestination | WebhookDestination, Field(discriminator="kind")
]


class Rule(_Strict):
    """One routing rule: a series is eligible when every condition given here holds.

    ``tags`` maps a DICOM keyword (as Orthanc names it, e.g. ``SeriesDescription``) to a
    regular expression that must match the whole value (case-insensitive).
    """

    modalities: list[str] = list(ROUTED_MODALITIES)
    tags: dict[str, str] = {}
    exclude_tags: dict[str, str] = {}
    min_instances: int = Field(default=1, ge=1)
    max_instances: int | None = Field(default=None, ge=1)
    sop_classes: list[str] = []  # empty: any image SOP class


class ModelRoute(_Strict):
    """One model the node runs, and the series it runs on: a series goes through every model one of
    whose rules it matches (its volume built once, each model's backbone once)."""

    model: str  # a model name in models/ or a model folder
    runtime: RuntimeChoice | None = None  # None: the node's ``runtime``
    routing: list[Rule] = [Rule()]


class PriorsConfig(_Strict):
    """Where and how far back the worker looks for a series' prior (see node/service/priors.py)."""

    enabled: bool = True
    lookback_days: int = Field(default=1825, ge=1)  # five years: follow-up intervals rarely exceed it
    sources: list[QueryRetrieveSource] = []  # PACSs to query when Orthanc has no prior
    # the AE title C-MOVE sends to: the node's own (Orthanc's) unless the PACS knows it by another
    move_destination: str | None = None

    @field_validator("move_destination")
    @classmethod
    def _check_move_ae(cls, v: str | None) -> str | None:
        return v if v is None else _ae_title(v)


class WorkerConfig(_Strict):
    lease_s: float = Field(
        default=120.0, gt=0
    )  # a job whose worker stopped heartbeating is leased again after this
    heartbeat_s: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    poll_s: float = Field(default=1.0, gt=0)
    fetch_threads: int = Field(default=8, ge=1, le=64)
    # worker processes on this host, each leasing its own jobs from the one queue; with ``gpus``
    # (CUDA device indices or UUIDs), worker i sees only gpus[i % len(gpus)]: one worker per GPU
    processes: int = Field(default=1, ge=1, le=64)
    gpus: list[str] = []
    # CPU threads each worker's runtime computes with; 0: one worker leaves it to the runtime (every
    # core), several share this host's cores out (each runtime would otherwise take every core)
    inference_threads: int = Field(default=0, ge=0, le=256)

    def threads(self) -> int:
        if self.inference_threads or self.processes == 1:
            return self.inference_threads
        return max(1, len(os.sched_getaffinity(0)) // self.processes)


class DiskConfig(_Strict):
    """Watermarks on the data folder's file system (percent used). Above ``refuse_above_percent`` new
    instances are refused (C-STORE status A700 Out of Resources, STOW-RS 403) while running jobs and
    deliveries go on; acceptance resumes below ``resume_below_percent``."""

    refuse_above_percent: float = Field(default=90.0, gt=0, le=100)
    resume_below_percent: float = Field(default=85.0, gt=0, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> DiskConfig:
        if self.resume_below_percent > self.refuse_above_percent:
            raise ValueError("resume_below_percent: must not exceed refuse_above_percent")
        return self


class RestartConfig(_Strict):
    """How ``pacs-node serve`` restarts Orthanc and the worker when they die: after 1, 2, 4 ... s up to
    ``backoff_max_s``; a process that dies within ``quick_exit_s`` of its start ``give_up_after`` times
    in a row is not restarted again (a broken model or config: /readyz and the metrics say why)."""

    backoff_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=60.0, gt=0)
    quick_exit_s: float = Field(default=30.0, gt=0)
    give_up_after: int = Field(default=5, ge=1)


class KServeConfig(_Strict):
    """The remote inference server of ``runtime: kserve`` (Triton, or any KServe v2 server), serving
    the repository ``pacs-node models export-triton`` wrote: ``grpc://host:8001`` or ``http://host:8000``."""

    url: str = Field(pattern=r"^(grpc|http)://[^/\s]+:\d+$")
    timeout_s: float = Field(default=120.0, gt=0)  # one request (a batch of slices, a 3D patch)


class LearningConfig(_Strict):
    """Heads trained on the department's labels (``pacs-node heads``): the feature cache the worker
    fills, and the gate a new head version must pass."""

    feature_cache: bool = True  # keep each processed series' backbone features (data_dir/features)
    feature_cache_gb: float = Field(default=5.0, gt=0)  # least recently used entries go above it
    golden: list[str] = []  # Series Instance UIDs of labelled series the gate judges on; never trained on
    tolerance: float = Field(default=0.02, ge=0, le=1)  # how much worse than the active version a metric may be
    # what a head's first version must reach on the golden set: segmentation, classification
    min_dice: float = Field(default=0.5, ge=0, le=1)
    min_auc: float = Field(default=0.7, ge=0, le=1)


class DeliveryConfig(_Strict):
    backoff_s: float = Field(default=5.0, gt=0)  # first retry; doubles each time up to backoff_max_s
    backoff_max_s: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=100, ge=1)


class NodeConfig(_Strict):
    ae_title: str = "PACSNODE"
    dicom_port: int = Field(default=4242, ge=1, le=65535)
    http_port: int = Field(default=8042, ge=1, le=65535)
    metrics_port: int = Field(default=9464, ge=0, le=65535)  # 0: no metrics endpoint
    # the worker's /metrics, /healthz, /readyz: loopback unless a scraper elsewhere needs them
    # (no patient data is ever in them; compose sets 0.0.0.0 inside its private network)
    metrics_host: str = "127.0.0.1"
    # where the worker finds Orthanc's REST API (compose: the orthanc service)
    orthanc_host: str = "127.0.0.1"
    data_dir: Path = Path("./data")
    # the queue in PostgreSQL (postgresql://user@host:5432/db; the password from PGPASSWORD or
    # ~/.pgpass, as libpq reads them), shared by a cluster's receivers and workers; unset: the
    # SQLite file in data_dir
    queue_url: str | None = Field(default=None, pattern=r"^postgres(ql)?://")
    # Orthanc's index in PostgreSQL (Debian orthanc-postgresql), shared by several receivers; their
    # DICOM files then go to storage_dir, a file system all of them mount (NFS, CephFS, ...)
    orthanc_index_url: str | None = Field(default=None, pattern=r"^postgres(ql)?://")
    storage_dir: Path | None = None  # default: data_dir/orthanc-storage
    destinations: list[Destination] = []

    # security: REST on loopback unless remote access is asked for, and then only with users
    http_remote_access: bool = False
    http_users: dict[str, str] = {}
    allowed_aes: list[str] = []  # empty: any calling AE may associate; else only these (others rejected)
    check_called_ae: bool = True  # reject an association whose called AE title is not ae_title

    routing: list[Rule] = [Rule()]
    # several models, each with its rules (see ModelRoute); unset: ``model`` with ``routing``
    models: list[ModelRoute] = []
    triage: TriageRules = (
        TriageRules()
    )  # urgency rules; defaults and their reasons in node/analysis/urgency.py
    priors: PriorsConfig = PriorsConfig()
    stable_age_s: int = Field(default=10, ge=1)
    model: str = "phantom-fm"
    runtime: RuntimeChoice = RuntimeChoice.AUTO
    kserve: KServeConfig | None = None  # where ``runtime: kserve`` sends its batches
    worker: WorkerConfig = WorkerConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    learning: LearningConfig = LearningConfig()
    disk: DiskConfig = DiskConfig()
    restart: RestartConfig = RestartConfig()
    orthanc_binary: Path = Path("/usr/sbin/Orthanc")
    orthanc_plugins_dir: Path = Path("/usr/share/orthanc/plugins")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    _check_ae = field_validator("ae_title")(_ae_title)

    @field_validator("allowed_aes")
    @classmethod
    def _check_aes(cls, v: list[str]) -> list[str]:
        for ae in v:
            _ae_title(ae)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> NodeConfig:
        if self.http_remote_access and not self.http_users:
            raise ValueError("http_users: must name at least one user when http_remote_access is true")
        names = [d.name for d in self.destinations]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"destinations: duplicate name {sorted(dup)[0]!r}")
        if self.models and {"model", "routing"} & self.model_fields_set:
            raise ValueError("models: give either models or model and routing, not both")
        paths = [m.model for m in self.models]
        if len(set(paths)) < len(paths):
            raise ValueError(f"models: {sorted(p for p in paths if paths.count(p) > 1)[0]!r} listed twice")
        if self.kserve is None and any(r.runtime is RuntimeChoice.KSERVE for r in self.model_routes):
            raise ValueError("runtime kserve needs kserve: {url: grpc://host:port}")
        ports = {"dicom_port": self.dicom_port, "http_port": self.http_port}
        if self.metrics_port:
            ports["metrics_port"] = self.metrics_port
        if len(set(ports.values())) < len(ports):
            raise ValueError(f"ports must differ, got {ports}")
        return self

    # --- derived ---------------------------------------------------------------------------
    @property
    def model_routes(self) -> list[ModelRoute]:
        """Every model with its rules and runtime: ``models``, or ``model`` with ``routing``."""
        routes = self.models or [ModelRoute(model=self.model, routing=self.routing)]
        return [r if r.runtime else r.model_copy(update={"runtime": self.runtime}) for r in routes]

    @property
    def all_rules(self) -> list[Rule]:
        """What makes a series a job: any model's rule."""
        return [rule for route in self.model_routes for rule in route.routing]

    @property
    def queue_location(self) -> Path | str:
        """The queue: ``queue_url`` (PostgreSQL, shared by a cluster) or the SQLite file in data_dir."""
        return self.queue_url or self.data_dir / "queue.sqlite"

    def feature_cache(self) -> FeatureCache:
        """Where the worker keeps each series' backbone features and ``heads train`` reads them: at most
        ``learning.feature_cache_gb``, and nothing written above the disk's refuse watermark."""
        from node.model.feature_cache import FeatureCache

        gb = self.learning.feature_cache_gb
        return FeatureCache(self.data_dir / "features", int(gb * 2**30), self.disk.refuse_above_percent)

    @property
    def orthanc_url(self) -> str:
        return f"http://{self.orthanc_host}:{self.http_port}"

    @property
    def orthanc_auth(self) -> tuple[str, str] | None:
        if not self.http_users:
            return None
        user = sorted(self.http_users)[0]
        return user, self.http_users[user]

    def destination(self, name: str) -> DicomDestination | DicomWebDestination | WebhookDestination:
        for d in self.destinations:
            if d.name == name:
                return d
        raise KeyError(name)


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("dicom", "dicomweb", "webhook"):
            continue  # pydantic's union branch, not a key the user wrote
        else:
            out += f".{part}" if out else str(part)
    return out or "config"


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    where = _where(tuple(err["loc"]))
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"{where}: unknown key"
    if err["type"] == "union_tag_invalid":
        return f"{where}.kind: must be 'dicom', 'dicomweb' or 'webhook'"
    if err["type"] == "union_tag_not_found":
        return f"{where}.kind: missing (must be 'dicom', 'dicomweb' or 'webhook')"
    return f"{where}: {msg}"


_SECRET = re.compile(r"\$\{(env|file):([^}]+)\}")


def expand_secrets(value, where: str = "config"):
    """Replace ``${env:NAME}`` and ``${file:/run/secrets/x}`` in string values, recursively.

    Secrets (Orthanc users, DICOMweb passwords) stay out of the config file and the repo: the file
    names where they are, the deployment (compose secrets, environment) provides them.
    """
    if isinstance(value, dict):
        return {
            k: expand_secrets(v, f"{where}.{k}" if where != "config" else str(k)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [expand_secrets(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        kind, ref = m.group(1), m.group(2).strip()
        if kind == "env":
            if ref not in os.environ:
                raise ConfigError(f"{where}: environment variable {ref} is not set")
            return os.environ[ref]
        try:
            return Path(ref).read_text().strip()
        except OSError as e:
            raise ConfigError(f"{where}: cannot read secret file {ref} ({e.strerror})") from None

    return _SECRET.sub(one, value)


def parse_config(data: dict | None, base_dir: Path | None = None) -> NodeConfig:
    """Validate a config mapping; relative ``data_dir`` is taken relative to ``base_dir``."""
    data = expand_secrets(dict(data or {}))
    try:
        cfg = NodeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_first_error(e)) from None
    if base_dir is not None and not cfg.data_dir.is_absolute():
        cfg = cfg.model_copy(update={"data_dir": (base_dir / cfg.data_dir).resolve()})
    return cfg


def load_config(path: Path | None) -> NodeConfig:
    """Read the YAML config at ``path``, or the embedded default when ``path`` is None."""
    if path is None:
        return parse_config({}, Path.cwd())
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} not valid YAML") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    # relative data_dir is relative to the config file, so the node starts the same from any folder
    return parse_config(data, Path(path).resolve().parent)


def dump_config(cfg: NodeConfig, path: Path) -> None:
    """Write the resolved config as JSON, for the worker child process to read."""
    path.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))


def read_resolved(path: Path) -> NodeConfig:
    return NodeConfig.model_validate(json.loads(Path(path).read_text()))
