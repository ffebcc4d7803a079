"""The backbone's features of processed series, kept so a head is trained without re-running it.

One ``.npz`` file per (model, series), named by ``sha256(model name, the manifest's own version,
Series Instance UID)``: no UID, name or date on disk; learned heads do not change the backbone, so
activating one keeps the entries. It holds, per slice in the model's plane, what a light head
reads: ``tokens`` (N, T, D) and ``cls`` (N, D) as float16, and ``image`` (N, C, S, S), the
normalised slice the decoder also sees. numpy alone reads it back (``np.load``), no model needed.
Writes are atomic (a temporary file renamed into place); above ``max_bytes`` the least recently
used entries (by modification time, refreshed on every read) are removed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KEPT = ("tokens", "cls", "image")  # what a cache entry holds


def series_key(model: str, version: str, series_uid: str) -> str:
    return hashlib.sha256(f"{model}\0{version}\0{series_uid}".encode()).hexdigest()


@dataclass(frozen=True)
class SeriesFeatures:
    """One series' features in the model's plane: ``tokens`` (N, T, D), ``cls`` (N, D), ``image``
    (N, C, S, S); float16 as kept."""

    tokens: np.ndarray
    cls: np.ndarray
    image: np.ndarray

    @property
    def slices(self) -> int:
        return int(self.image.shape[0])


class FeatureCache:
    def __init__(self, folder: Path, max_bytes: int, disk_percent: float = 100.0):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        # an optional cache never takes the space acknowledged studies need: above this much of its
        # file system used (the node's refuse watermark), nothing is written
        self.disk_percent = disk_percent
        # one series may take a tenth of the cache: a 300-slice CT through a ViT-B/16 at 512 pixels
        # (1,024 tokens of 768) is 0.6 GB, which would evict everything else and weigh on the worker
        self.max_entry_bytes = max_bytes // 10

    def path(self, model: str, version: str, series_uid: str) -> Path:
        return self.folder / f"{series_key(model, version, series_uid)}.npz"

    def get(self, model: str, version: str, series_uid: str) -> SeriesFeatures | None:
        path = self.path(model, version, series_uid)
        try:
            with np.load(path) as z:
                found = SeriesFeatures(*(z[k] for k in KEPT))
            os.utime(path)  # recently used: evicted last
            return found
        except (FileNotFoundError, KeyError, ValueError, OSError):  # absent, or not one of ours: recompute
            return None

    def put(self, model: str, version: str, series_uid: str, features: SeriesFeatures) -> Path | None:
        """Keep one series' features; None when the disk is above ``disk_percent`` (not kept)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        usage = shutil.disk_usage(self.folder)
        if 100.0 * (usage.total - usage.free) / usage.total >= self.disk_percent:
            return None
        path = self.path(model, version, series_uid)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".partial-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **{k: np.asarray(getattr(features, k), np.float16) for k in KEPT})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.evict()
        return path

    def evict(self) -> list[Path]:
        """Remove the least recently used entries until the cache fits ``max_bytes``."""
        entries = []
        for p in self.folder.glob("*.npz"):
            try:
                st = p.stat()
            except FileNotFoundError:  # another worker evicted it meanwhile
                continue
            entries.append((st.st_mtime, st.st_size, p))
        entries.sort()
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, p in entries:
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size
            removed.append(p)
        return removed
