"""A small client for the Orthanc REST API and its DICOMweb plugin, as the worker needs it."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests

log = logging.getLogger(__name__)


class OrthancError(RuntimeError):
    """Orthanc could not be reached or refused a request (usually transient: retry the job)."""


@dataclass(frozen=True)
class Stored:
    orthanc_id: str
    status: str  # Success, AlreadyStored


class OrthancClient:
    def __init__(self, url: str, auth: tuple[str, str] | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.auth = auth
        # Orthanc gzips answers when asked; on loopback that costs 5x the transfer (measured, 300 x 512^2 CT)
        self.session.headers["Accept-Encoding"] = "identity"

    def _request(self, method: str, path: str, **kw) -> requests.Response:
        try:
            r = self.session.request(method, self.url + path, **{"timeout": self.timeout, **kw})
        except requests.RequestException as e:
            raise OrthancError(f"Orthanc {method} {path}: {type(e).__name__}") from e
        if r.status_code >= 400:
            raise OrthancError(f"Orthanc {method} {path}: HTTP {r.status_code} {r.text[:200].strip()}")
        return r

    def get_json(self, path: str, **kw):
        return self._request("GET", path, **kw).json()

    def post_json(self, path: str, body=None, **kw):
        return self._request("POST", path, json=body, **kw).json()

    def ready(self) -> bool:
        try:
            self.session.get(self.url + "/system", timeout=2).raise_for_status()
            return True
        except requests.RequestException:
            return False

    # --- reading ---------------------------------------------------------------------------
    def series(self, series_id: str) -> dict:
        return self.get_json(f"/series/{series_id}")

    def lookup(self, uid: str, level: str) -> str | None:
        """Orthanc's ID of the DICOM UID at ``level`` ("Series", "Instance"...), or None."""
        found = self._request("POST", "/tools/lookup", data=uid).json()
        return next((x["ID"] for x in found if x["Type"] == level), None)

    def instance_file(self, instance_id: str) -> bytes:
        return self._request("GET", f"/instances/{instance_id}/file").content

    def fetch_series(self, series_id: str, out_dir: Path, threads: int = 8) -> list[Path]:
        """Download every instance of a series as ``out_dir/<orthanc id>.dcm`` (parallel GETs).

        Measured on Orthanc 1.10 (300 x 512x512 CT, 2 cores): parallel ``/instances/{id}/file`` with
        ``Accept-Encoding: identity`` beats ``/series/{id}/archive`` (zip) and WADO-RS multipart (which
        parses every dataset); with gzip allowed it was 5x slower than WADO-RS.
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        ids = self.series(series_id)["Instances"]

        def one(instance_id: str) -> Path:
            path = out_dir / f"{instance_id}.dcm"
            path.write_bytes(self.instance_file(instance_id))
            return path

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            return list(pool.map(one, ids))

    # --- writing ---------------------------------------------------------------------------
    def store(self, data: bytes) -> Stored:
        r = self._request("POST", "/instances", data=data, headers={"Content-Type": "application/dicom"})
        body = r.json()
        return Stored(body["ID"], body.get("Status", ""))
