"""Deliver the node's outputs to configured destinations: C-STORE (pynetdicom), STOW-RS, or a
webhook (the triage notification, JSON).

Every send is checked (C-STORE status, STOW-RS response) and reports one
error line per object; the caller (the worker's delivery loop) persists the
outcome in the queue and retries with backoff. Output UIDs are deterministic,
so a repeated send replaces the object at the destination, never duplicates it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from io import BytesIO

import requests
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.config import DicomDestination, DicomWebDestination, WebhookDestination
from node.service.association import associate

log = logging.getLogger(__name__)

# C-STORE statuses that mean "stored": success and the three warnings (coercion, elements discarded...)
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


@dataclass
class Item:
    key: int  # the delivery's id in the queue
    data: bytes  # a DICOM file (Part 10), or for a webhook the JSON of a TriageNotice


@dataclass(frozen=True)
class TriageNotice:
    """What a webhook destination is told about one processed series: UIDs, urgency and the findings
    summary (PHI-free), plus ``reasons`` and ``discrepancies`` only where the destination's
    ``include`` asks for them. Kept in the queue as JSON until delivered."""

    study_instance_uid: str
    series_instance_uid: str
    score: int
    category: str
    summary: str
    reasons: tuple[str, ...] = ()
    discrepancies: tuple[str, ...] = ()
    event: str = "pacs-node.triage"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: str | bytes) -> TriageNotice:
        d = json.loads(data)
        return cls(**{**d, "reasons": tuple(d["reasons"]), "discrepancies": tuple(d["discrepancies"])})

    def body(self, include: Iterable[str] = ()) -> dict:
        """The JSON posted: the documented minimum, then each optional field ``include`` names."""
        keep = (
            "event",
            "study_instance_uid",
            "series_instance_uid",
            "score",
            "category",
            "summary",
            *include,
        )
        return {k: v if not isinstance(v, tuple) else list(v) for k, v in asdict(self).items() if k in keep}


@dataclass(frozen=True)
class Outcome:
    key: int
    error: str | None  # None: stored at the destination


def _datasets(items: list[Item]) -> list[tuple[Item, Dataset]]:
    return [(it, dcmread(BytesIO(it.data))) for it in items]


def send(
    dest: DicomDestination | DicomWebDestination | WebhookDestination, items: list[Item], calling_ae: str
) -> list[Outcome]:
    """Send ``items`` to ``dest`` in one association / one request; one Outcome per item."""
    if not items:
        return []
    try:
        if isinstance(dest, DicomDestination):
            return _c_store(dest, items, calling_ae)
        if isinstance(dest, WebhookDestination):
            return [_post(dest, it) for it in items]
        return _stow(dest, items)
    except Exception as e:  # a broken destination must not stop the delivery loop
        log.debug("delivery to %s failed", dest.name, exc_info=True)
        return [Outcome(it.key, f"{type(e).__name__}: {e}") for it in items]


def _c_store(dest: DicomDestination, items: list[Item], calling_ae: str) -> list[Outcome]:
    from pynetdicom import AE

    pairs = _datasets(items)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_s
    for sop_class in sorted({str(ds.SOPClassUID) for _, ds in pairs}):
        # the two uncompressed syntaxes every SCP accepts; an object written compressed proposes its own
        # syntax first and is decompressed for an SCP that refuses it
        written = sorted(
            {str(ds.file_meta.TransferSyntaxUID) for _, ds in pairs if ds.SOPClassUID == sop_class}
        )
        syntaxes = [ts for ts in written if ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)]
        ae.add_requested_context(sop_class, [*syntaxes, ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc, why = associate(ae, dest.host, dest.port, dest.ae_title)
    if why:
        return [Outcome(it.key, f"{dest.host}:{dest.port} {dest.ae_title}: {why}") for it in items]
    out = []
    try:
        for it, ds in pairs:
            accepted = [c for c in assoc.accepted_contexts if c.abstract_syntax == ds.SOPClassUID]
            if not accepted:
                out.append(Outcome(it.key, f"{dest.ae_title} does not accept SOP class {ds.SOPClassUID}"))
                continue
            ts = ds.file_meta.TransferSyntaxUID
            if ts.is_compressed and ts not in {c.transfer_syntax[0] for c in accepted}:
                ds.decompress()  # the destination takes this class uncompressed only
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code in _STORED:
                out.append(Outcome(it.key, None))
            elif code is None:
                out.append(Outcome(it.key, "no C-STORE response (connection lost or timeout)"))
            else:
                out.append(Outcome(it.key, f"C-STORE status 0x{code:04X}"))
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def _stow(dest: DicomWebDestination, items: list[Item]) -> list[Outcome]:
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if dest.username:
        session.auth = (dest.username, dest.password or "")
    client = DICOMwebClient(dest.url, session=session)
    client.set_http_retry_params(retry=False)  # our queue retries with backoff, persistently
    pairs = _datasets(items)
    response = client.store_instances([ds for _, ds in pairs])
    failed = {}
    for f in getattr(response, "FailedSOPSequence", []) or []:
        failed[str(f.ReferencedSOPInstanceUID)] = int(getattr(f, "FailureReason", 0) or 0)
    return [
        Outcome(it.key, f"STOW-RS failure reason 0x{failed[ds.SOPInstanceUID]:04X}")
        if ds.SOPInstanceUID in failed
        else Outcome(it.key, None)
        for it, ds in pairs
    ]


def _post(dest: WebhookDestination, item: Item) -> Outcome:
    """POST one triage notification as JSON; any 2xx is delivered."""
    try:
        r = requests.post(
            dest.url,
            json=TriageNotice.from_json(item.data).body(dest.include),
            headers=dest.headers,
            timeout=dest.timeout_s,
        )
    except requests.RequestException as e:
        return Outcome(item.key, f"{dest.name}: {type(e).__name__}")
    return Outcome(item.key, None if r.ok else f"{dest.name}: HTTP {r.status_code}")
