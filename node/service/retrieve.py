"""Query/Retrieve SCU for prior exams: find a patient's earlier series at a PACS and retrieve one.

Two kinds of source: a DICOM Q/R SCP (Study Root C-FIND, then C-MOVE to an AE the PACS
knows, normally our own Orthanc) or a DICOMweb server (QIDO-RS, then WADO-RS into a folder).
Every failure, an unreachable PACS included, is a :class:`RetrieveError` with a one-line
message naming the source and the operation, never the patient: the caller reports it as
"no prior available: <reason>" and carries on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, time
from pathlib import Path
from typing import Literal

import requests
from pydicom import Dataset
from pydicom.uid import UID
from pydicom.valuerep import DA, TM

from node.service.association import associate

log = logging.getLogger(__name__)

# a WADO-RS answer's SOP Instance UID names a file: it must not name a path outside `into`
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_PENDING = {0xFF00, 0xFF01}

Query = Callable[[str, dict[str, str]], list[Dataset]]  # (level, keys) -> matches


class RetrieveError(Exception):
    """A query or retrieve failed; the message is one line: source, operation, status or reason."""


@dataclass(frozen=True)
class PriorCandidate:
    study_uid: str
    series_uid: str
    modality: str
    body_part: str  # BodyPartExamined, "" if unknown
    acquired: datetime | None  # SeriesDate/SeriesTime, else StudyDate/StudyTime (naive, PACS local time)
    description: str  # SeriesDescription
    instances: int | None  # NumberOfSeriesRelatedInstances when the PACS says it
    source: str  # name of the Q/R source it was found at


@dataclass(frozen=True)
class QueryRetrieveSource:
    """A configured PACS to query: a DICOM Q/R SCP or a DICOMweb server."""

    name: str
    kind: Literal["dicom", "dicomweb"]
    host: str = ""  # dicom
    port: int = 104
    ae_title: str = ""
    url: str = ""  # dicomweb
    username: str | None = None
    password: str | None = None
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.kind == "dicom" and not (self.host and self.ae_title):
            raise ValueError(f"Q/R source {self.name}: a dicom source needs host and ae_title")
        if self.kind == "dicomweb" and not self.url:
            raise ValueError(f"Q/R source {self.name}: a dicomweb source needs url")
        if self.kind not in ("dicom", "dicomweb"):
            raise ValueError(f"Q/R source {self.name}: kind must be dicom or dicomweb, not {self.kind!r}")


def find_series(
    source: QueryRetrieveSource,
    calling_ae: str,
    patient_id: str,
    modality: str,
    before: datetime | None = None,
    not_before: datetime | None = None,
) -> list[PriorCandidate]:
    """The patient's series of ``modality`` acquired in [not_before, before), newest first.

    ``before``/``not_before`` are naive datetimes in the PACS's local time (as DICOM dates are);
    with either given, series of unknown date are left out. The study query is narrowed by date
    and ModalitiesInStudy, but modality and patient are checked again on every answer: PACSs
    may ignore ModalitiesInStudy or match PatientID loosely.
    """
    if not patient_id or any(c in patient_id for c in "*?\\"):
        # an empty key or a wildcard would match other patients
        raise ValueError("patient_id: empty or containing a wildcard / multi-value character")
    study_keys = {
        "PatientID": patient_id,
        "StudyInstanceUID": "",
        "StudyDate": _date_range(not_before, before),
        "StudyTime": "",
        "ModalitiesInStudy": modality,
    }
    found: dict[str, PriorCandidate] = {}
    with (
        _failures(source, "C-FIND" if source.kind == "dicom" else "QIDO-RS", patient_id),
        _querier(source, calling_ae) as query,
    ):
        for study in query("STUDY", study_keys):
            if str(study.get("PatientID", patient_id)) != patient_id or "StudyInstanceUID" not in study:
                continue
            series_keys = {
                "StudyInstanceUID": str(study.StudyInstanceUID),
                "SeriesInstanceUID": "",
                "Modality": modality,
                "SeriesDate": "",
                "SeriesTime": "",
                "BodyPartExamined": "",
                "SeriesDescription": "",
                "NumberOfSeriesRelatedInstances": "",
            }
            for series in query("SERIES", series_keys):
                c = _candidate(source.name, study, series)
                if (
                    c.series_uid
                    and c.modality.upper() == modality.upper()
                    and _within(c.acquired, before, not_before)
                ):
                    found[c.series_uid] = c
    out = sorted(
        found.values(), key=lambda c: (c.acquired is not None, c.acquired or datetime.min), reverse=True
    )
    log.info("%s: %d %s series found", source.name, len(out), modality)
    return out


def retrieve_series(
    source: QueryRetrieveSource,
    calling_ae: str,
    candidate: PriorCandidate,
    move_destination: str | None = None,
    into: Path | None = None,
) -> int:
    """Retrieve one series; the number of instances retrieved (> 0, else RetrieveError).

    dicom: C-MOVE to ``move_destination`` (default ``calling_ae``), an AE title the PACS must
    know; the instances arrive there, and the count is the PACS's completed (+ warning)
    sub-operations. A partial move (some sub-operations failed) returns the count and logs a warning.
    dicomweb: WADO-RS, each instance written as ``<into>/<SOPInstanceUID>.dcm``.
    """
    if source.kind == "dicom":
        destination = move_destination or calling_ae
        with _failures(source, f"C-MOVE of series {candidate.series_uid} to {destination}"):
            return _c_move(source, calling_ae, candidate, destination)
    if into is None:
        raise ValueError("into: a folder is needed to retrieve from a dicomweb source")
    with _failures(source, f"WADO-RS of series {candidate.series_uid}"):
        return _wado(source, candidate, Path(into))


# -- shared ---------------------------------------------------------------------------------------


@contextmanager
def _failures(source: QueryRetrieveSource, operation: str, patient_id: str = "") -> Iterator[None]:
    """Any failure as one line, "<source>: <operation>: <reason>", never naming the patient."""
    try:
        yield
    except RetrieveError as e:
        raise RetrieveError(f"{source.name}: {operation}: {e}") from None
    except Exception as e:
        log.debug("%s: %s failed", source.name, operation, exc_info=True)
        if isinstance(e, requests.HTTPError) and e.response is not None:
            reason = f"HTTP {e.response.status_code} {e.response.reason}"
        elif isinstance(e, requests.Timeout):  # a requests error's text holds the URL: PatientID included
            reason = f"no answer in {source.timeout_s:g} s"
        elif isinstance(e, requests.ConnectionError):
            reason = "connection failed (refused, or server down)"
        elif isinstance(e, requests.RequestException):
            reason = type(e).__name__
        else:
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            if patient_id:
                reason = reason.replace(patient_id, "<PatientID>")
        raise RetrieveError(f"{source.name}: {operation}: {reason}") from None


def _date_range(not_before: datetime | None, before: datetime | None) -> str:
    # inclusive whole days: the exact times are checked on each series
    if not_before is None and before is None:
        return ""
    lo = f"{not_before:%Y%m%d}" if not_before else ""
    hi = f"{before:%Y%m%d}" if before else ""
    return f"{lo}-{hi}"


def _when(date: str, clock: str) -> datetime | None:
    def parse(kind: type, value: str):
        try:
            return kind(value) if value else None
        except ValueError:  # a malformed value is an unknown one
            return None

    day = parse(DA, date)
    return datetime.combine(day, parse(TM, clock) or time()) if day else None


def _within(acquired: datetime | None, before: datetime | None, not_before: datetime | None) -> bool:
    if before is None and not_before is None:
        return True
    if acquired is None:
        return False
    return (before is None or acquired < before) and (not_before is None or acquired >= not_before)


def _candidate(source: str, study: Dataset, series: Dataset) -> PriorCandidate:
    def s(ds: Dataset, keyword: str) -> str:
        return str(ds.get(keyword, "") or "").strip()

    try:
        instances: int | None = int(series.get("NumberOfSeriesRelatedInstances", None))
    except (TypeError, ValueError):
        instances = None
    return PriorCandidate(
        study_uid=s(study, "StudyInstanceUID"),
        series_uid=s(series, "SeriesInstanceUID"),
        modality=s(series, "Modality"),
        body_part=s(series, "BodyPartExamined"),
        acquired=_when(s(series, "SeriesDate"), s(series, "SeriesTime"))
        or _when(s(study, "StudyDate"), s(study, "StudyTime")),
        description=s(series, "SeriesDescription"),
        instances=instances,
        source=source,
    )


@contextmanager
def _querier(source: QueryRetrieveSource, calling_ae: str) -> Iterator[Query]:
    if source.kind == "dicom":
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        with _association(source, calling_ae, FIND) as assoc:
            yield lambda level, keys: _c_find(source, assoc, FIND, level, keys)
    else:
        client = _dicomweb(source)
        yield lambda level, keys: _qido(client, level, keys)


# -- DIMSE (pynetdicom) ---------------------------------------------------------------------------


@contextmanager
def _association(source: QueryRetrieveSource, calling_ae: str, sop_class: UID) -> Iterator:
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = source.timeout_s
    ae.add_requested_context(sop_class)
    assoc, why = associate(ae, source.host, source.port, source.ae_title)
    if why:
        raise RetrieveError(f"{source.ae_title}@{source.host}:{source.port}: {why}")
    try:
        if not assoc.accepted_contexts:
            raise RetrieveError(f"{source.ae_title} does not accept {sop_class.name}")
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _status(code: int) -> str:
    from pynetdicom.status import QR_FIND_SERVICE_CLASS_STATUS, QR_MOVE_SERVICE_CLASS_STATUS, code_to_category

    meaning = {**QR_FIND_SERVICE_CLASS_STATUS, **QR_MOVE_SERVICE_CLASS_STATUS}.get(code, ("", ""))[1]
    return f"status 0x{code:04X} ({meaning or code_to_category(code)})"


def _c_find(
    source: QueryRetrieveSource, assoc, model: UID, level: str, keys: dict[str, str]
) -> list[Dataset]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    out = []
    for status, match in assoc.send_c_find(identifier, model):
        code = getattr(status, "Status", None)
        if code is None:
            raise RetrieveError(f"{level} level: no response (connection lost or timeout)")
        if code in _PENDING:
            if match is not None:
                out.append(match)
        elif code == 0xB001:
            log.warning(
                "%s: C-FIND %s hit the PACS's response limit: matches may be missing", source.name, level
            )
        elif code != 0x0000:
            raise RetrieveError(f"{level} level: {_status(code)}")
    return out


def _c_move(source: QueryRetrieveSource, calling_ae: str, c: PriorCandidate, destination: str) -> int:
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = c.study_uid
    identifier.SeriesInstanceUID = c.series_uid
    last = final = None
    with _association(source, calling_ae, MOVE) as assoc:
        for status, _ in assoc.send_c_move(identifier, destination, MOVE):
            if getattr(status, "Status", None) is None:
                raise RetrieveError("no response (connection lost or timeout)")
            if status.Status in _PENDING:
                last = status
            else:
                final = status
    if final is None or final.Status not in (0x0000, 0xB000):
        raise RetrieveError(_status(final.Status) if final is not None else "no final response")

    def n(ds: Dataset | None, what: str) -> int:
        return int(ds.get(f"NumberOf{what}Suboperations", 0) or 0) if ds is not None else 0

    if "NumberOfCompletedSuboperations" in final:
        done = n(final, "Completed") + n(final, "Warning")
    elif final.Status == 0x0000:  # counts are optional on success: then all that the last pending announced
        done = n(last, "Completed") + n(last, "Warning") + n(last, "Remaining")
    else:
        done = 0
    failed = n(final, "Failed")
    if done == 0:
        raise RetrieveError(f"0 instances completed ({failed} failed)")
    if failed:
        log.warning(
            "%s: C-MOVE of series %s: %d instances failed, %d moved", source.name, c.series_uid, failed, done
        )
    log.info("%s: moved %d instances of series %s to %s", source.name, done, c.series_uid, destination)
    return done


# -- DICOMweb (dicomweb-client) -------------------------------------------------------------------


def _dicomweb(source: QueryRetrieveSource):
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if source.username:
        session.auth = (source.username, source.password or "")
    client = DICOMwebClient(source.url, session=session, timeout=source.timeout_s)
    client.set_http_retry_params(retry=False)  # fail fast: the caller goes on without the prior
    return client


def _qido(client, level: str, keys: dict[str, str]) -> list[Dataset]:
    filters = {k: v for k, v in keys.items() if v}
    fields = [k for k, v in keys.items() if not v]
    if level == "STUDY":
        found = client.search_for_studies(search_filters=filters, fields=fields)
    else:
        study = filters.pop("StudyInstanceUID")
        found = client.search_for_series(study, search_filters=filters, fields=fields)
    return [Dataset.from_json(d) for d in found]


def _wado(source: QueryRetrieveSource, c: PriorCandidate, into: Path) -> int:
    into.mkdir(parents=True, exist_ok=True)
    n = 0
    for ds in _dicomweb(source).iter_series(c.study_uid, c.series_uid):
        uid = str(ds.get("SOPInstanceUID", ""))
        if not _UID.fullmatch(uid) or str(ds.get("SeriesInstanceUID", "")) != c.series_uid:
            raise RetrieveError("the server sent an instance not of that series")
        part = into / f"{uid}.part"  # complete files only: a reader never sees half an instance
        ds.save_as(part, enforce_file_format=True)
        part.replace(into / f"{uid}.dcm")
        n += 1
    if n == 0:
        raise RetrieveError("no instances")
    log.info("%s: retrieved %d instances of series %s", source.name, n, c.series_uid)
    return n
