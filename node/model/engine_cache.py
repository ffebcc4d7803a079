"""On-disk cache of TensorRT engines.

An engine is only valid for the exact graph, GPU architecture, TensorRT
version, precision and optimisation profile it was built for, so all of them
form its key: ``sha256`` over the ONNX file's bytes, the GPU name and compute
capability, the TensorRT version, the precision and the profile (batch
sizes, in-plane size). A lookup with any field changed misses, and the
engine is rebuilt; nothing stale is ever deserialised.

Layout: ``<root>/<graph stem>-<precision>-<digest16>.engine`` with a JSON
sidecar holding the full key (and, once checked, the numerical gate's
result), written atomically (temp file + rename) so a crash mid-build never
leaves a truncated engine under a valid name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

DEFAULT_ROOT = Path(
    os.environ.get("PACS_NODE_ENGINE_CACHE", Path.home() / ".cache" / "pacs-node" / "engines")
)
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")


@dataclass(frozen=True)
class Profile:
    """A TensorRT optimisation profile: batch sizes (min, opt, max) at a fixed in-plane size."""

    min_batch: int
    opt_batch: int
    max_batch: int
    size: int  # in-plane pixels (fixed)

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"Profile batch sizes must satisfy 1 <= min <= opt <= max, got "
                f"{self.min_batch}, {self.opt_batch}, {self.max_batch}."
            )
        if self.size <= 0:
            raise ValueError(f"Profile.size must be positive, got {self.size}.")

    def __str__(self) -> str:
        return f"b{self.min_batch}-{self.opt_batch}-{self.max_batch}@{self.size}"


@dataclass(frozen=True)
class EngineKey:
    graph: str  # file name of the ONNX graph (for humans; the hash is what counts)
    onnx_sha256: str
    gpu_name: str
    compute_capability: str  # e.g. "9.0"
    tensorrt: str  # TensorRT version
    precision: str
    profile: str  # str(Profile)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"EngineKey.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}."
            )
        if len(self.onnx_sha256) != 64:
            raise ValueError(f"EngineKey.onnx_sha256 must be a sha256 hex digest, got {self.onnx_sha256!r}.")

    @property
    def digest(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()

    @property
    def filename(self) -> str:
        return f"{Path(self.graph).stem}-{self.precision}-{self.digest[:16]}.engine"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, memoised on (path, size, mtime) so a warm start does not re-read graphs."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class EngineCache:
    """Serialised engines on disk, looked up by :class:`EngineKey`."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else DEFAULT_ROOT

    def path(self, key: EngineKey) -> Path:
        return self.root / key.filename

    def _meta(self, key: EngineKey) -> Path:
        return self.path(key).with_suffix(".json")

    def get(self, key: EngineKey) -> bytes | None:
        """The engine's bytes, or None when absent or when its sidecar does not hold exactly this key."""
        path, meta = self.path(key), self._meta(key)
        if not (path.exists() and meta.exists()):
            return None
        try:
            stored = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if stored.get("key") != asdict(key) or stored.get("bytes") != path.stat().st_size:
            return None
        return path.read_bytes()

    def put(self, key: EngineKey, engine: bytes, **extra) -> Path:
        """Store atomically (engine first, then the sidecar that makes it valid)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        atomic_write(path, engine)
        atomic_write(
            self._meta(key), json.dumps({"key": asdict(key), "bytes": len(engine), **extra}).encode()
        )
        return path

    def metadata(self, key: EngineKey) -> dict | None:
        meta = self._meta(key)
        if self.get(key) is None:
            return None
        return json.loads(meta.read_text())

    def entries(self) -> list[dict]:
        out = []
        for meta in sorted(self.root.glob("*.json")):
            try:
                out.append(json.loads(meta.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        return out


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """``path`` holds the old bytes or the new, never half (a reader may be another process);
    ``mode``: its permissions (default: the owner's only)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
