"""Who the node is and the words its parts share: the plugin, the queue, the writers and the metrics.

Stdlib only: the Orthanc plugin imports it inside Orthanc's interpreter. Each enum's values are
what is stored in the queue file, written in labels of the metrics and shown in the REST routes,
so they never change once released (add, never rename).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# Manufacturer and model name of every object the node writes; the plugin never processes them
NODE_NAME = "pacs-node"
# what the default routing rule sends to inference
ROUTED_MODALITIES = ("CT", "MR")


class StrEnum(str, Enum):
    """An enum whose members are their values wherever a string is needed (SQL, JSON, f-strings)."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__
    __hash__ = str.__hash__  # Enum hashes the name: a member and its value must be the same dict key


class OutputKind(StrEnum):
    """What a job produces; the file name of an offline output is ``<kind>.dcm``."""

    SEG = "seg"
    SR = "sr"  # the complete TID 1500 report
    OUTLINES = "outlines"  # the SR of what viewers draw (outlines, long axes), see node.writers.sr
    GSPS = "gsps"
    PMAP = "pmap"  # the lesion probability Parametric Map: opt-in per destination
    TRIAGE = "triage"  # the webhook notification: a JSON body, nothing stored in Orthanc

    @property
    def is_dicom(self) -> bool:
        return self is not OutputKind.TRIAGE


# what a DICOM destination receives unless its ``accepts`` says otherwise
DEFAULT_ACCEPTS = (OutputKind.SEG, OutputKind.SR, OutputKind.GSPS)  # outlines, pmap: opt-in


class Stage(StrEnum):
    """A step of one job, timed in ``pacs_node_stage_duration_seconds{stage}`` and named in errors."""

    FETCH = "fetch"  # series from Orthanc to the worker's disk
    CONTEXT = "context"  # prior lookup and the study's report
    LOAD = "load"  # files -> volume with geometry
    PREPROCESS = "preprocess"
    INFERENCE = "inference"
    POSTPROCESS = "postprocess"
    MEASURE = "measure"
    COMPARE = "compare"  # against the prior
    ENCODE_SEG = "encode_seg"
    ENCODE_SR = "encode_sr"
    ENCODE_GSPS = "encode_gsps"
    ENCODE_PMAP = "encode_pmap"
    WRITE = "write"  # the objects to disk, all or nothing
    STORE = "store"  # the objects into Orthanc
    DELIVER = "deliver"  # to a destination (the delivery thread)


class JobState(StrEnum):
    """``queued`` -> ``running`` -> ``delivering`` -> ``done``; ``failed`` after the last attempt;
    ``superseded`` when late instances of the series started a newer job."""

    QUEUED = "queued"
    RUNNING = "running"
    DELIVERING = "delivering"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # gave up after the last attempt
    CANCELLED = "cancelled"  # a newer job of the series delivers the same UIDs


class JobEvent(StrEnum):
    """What happened to jobs, counted durably: ``pacs_node_jobs_total{outcome}``."""

    QUEUED = "queued"
    RUNNING = "running"  # leased by a worker
    PROCESSED = "processed"
    DONE = "done"
    FAILED = "failed"
    RETRIED = "retried"
    LEASE_EXPIRED = "lease_expired"
    RELEASED = "released"  # its worker died: given back at once
    SUPERSEDED = "superseded"
    DEDUPLICATED = "deduplicated"
    SKIPPED = "skipped"  # no job: a routing rule (the ``rule`` label) kept the series out


class SkipRule(StrEnum):
    """Why a stable series got no job: the ``rule`` label of ``pacs_node_jobs_total{outcome="skipped"}``."""

    EXCLUDED_MODALITY = "excluded_modality"
    OWN_OUTPUT = "own_output"
    NOT_AN_IMAGE = "not_an_image"
    NO_INSTANCES = "no_instances"
    NO_RULE = "no_routing_rule_matched"
    RETRIEVED_PRIOR = "retrieved_prior"
    LABEL_SET = "label_set"  # a SEG from a department's viewer about a series here: labels, never a job


class LabelKind(StrEnum):
    """What a label set says of its series (node/service/queue/labels.py)."""

    SEGMENTATION = "segmentation"  # a SEG's segments, drawn or corrected by a radiologist
    CLASSIFICATION = "classification"  # a coded finding, e.g. from a CSV


class RuntimeChoice(StrEnum):
    """What ``--runtime`` and the config's ``runtime`` accept (``node.model.select`` picks)."""

    AUTO = "auto"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"
    TORCH = "torch"
    KSERVE = "kserve"  # a remote server speaking the KServe v2 protocol (Triton); the config's ``kserve``


class Role(StrEnum):
    """What ``pacs-node serve --role`` runs on this host; a cluster shares one PostgreSQL queue."""

    ALL = "all"  # Orthanc with the plugin, and the worker (one host, the default)
    INGEST = "ingest"  # Orthanc with the plugin: receives, queues, stores results
    WORKER = "worker"  # the worker only: leases from the queue, reads and writes through orthanc_host

    @property
    def receives(self) -> bool:
        return self is not Role.WORKER

    @property
    def infers(self) -> bool:
        return self is not Role.INGEST


class ModelOutcome(StrEnum):
    """A model's part in a job: ``pacs_node_model_runs_total{model, outcome}``."""

    RAN = "ran"
    FAILED = "failed"


@dataclass(frozen=True)
class ModelRun:
    """One model's part in a job: ``model`` is its name and version, ``error`` why it failed (one
    line, no patient data) or None. A failed model never loses the results of the others."""

    model: str
    error: str | None = None

    @property
    def outcome(self) -> ModelOutcome:
        return ModelOutcome.RAN if self.error is None else ModelOutcome.FAILED
