"""Learned heads: the versions of a head a department trained, kept in the model folder.

```
<model>/heads/<name>/<version>/   head.yaml (the head's manifest entry, its graph beside it),
                                  head.onnx, card.md, metrics.json (cross-validated quality, the
                                  training data by hashed series UID), source/ (a segmentation
                                  head's weights) or reliability.png (a classification head's)
<model>/heads/state.json          per head: the active version, the one in shadow, and the
                                  activations in order (what rollback goes back through)
```

:func:`node.model.manifest.load_model` adds each head's active version to the model, and its shadow
version as a head that runs on every series but whose output is never written (``shadow``). A new
version never touches the backbone or another head: each is its own graph. The model's version
names the learned heads' versions (``2.0.0+aorta.3``), so every output names what made it and a
result of another head version is another object (new UIDs).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from node.errors import ModelError
from node.model.engine_cache import atomic_write

FOLDER = "heads"
STATE = "state.json"
SHADOW_SUFFIX = ".shadow"  # a shadow version runs as head "<name>.shadow"


@dataclass(frozen=True)
class HeadState:
    active: str | None = None
    shadow: str | None = None
    history: tuple[str, ...] = field(default=())  # versions activated, in order; the last is active


def read_state(model_dir: Path) -> dict[str, HeadState]:
    path = Path(model_dir) / FOLDER / STATE
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {
            name: HeadState(s.get("active"), s.get("shadow"), tuple(s.get("history", ())))
            for name, s in raw.items()
        }
    except (ValueError, AttributeError, TypeError) as e:
        raise ModelError(f"{path}: not a head state file ({e})") from None


def write_state(model_dir: Path, states: dict[str, HeadState]) -> None:
    """Atomically: a worker reloading its model reads the old state or the new, never half."""
    folder = Path(model_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps({k: {**asdict(v), "history": list(v.history)} for k, v in states.items()}, indent=2)
    atomic_write(folder / STATE, text.encode(), mode=0o644)  # the worker may run as another user


def stamp(model_dir: Path) -> tuple[int, int]:
    """Changes whenever a head is activated, shadowed or rolled back (a worker then reloads): every
    write is a new file (a rename), so its inode changes even within one clock tick."""
    try:
        st = (Path(model_dir) / FOLDER / STATE).stat()
        return st.st_ino, st.st_mtime_ns
    except FileNotFoundError:
        return 0, 0


def versions(model_dir: Path, name: str) -> list[str]:
    folder = Path(model_dir) / FOLDER / name
    found = (
        [p.name for p in folder.iterdir() if not p.name.startswith(".") and (p / "head.yaml").exists()]
        if folder.is_dir()
        else []
    )
    return sorted(found, key=lambda v: (len(v), v))


def version_dir(model_dir: Path, name: str, version: str) -> Path:
    folder = Path(model_dir) / FOLDER / name / version
    if not (folder / "head.yaml").exists():
        known = ", ".join(versions(model_dir, name)) or "none"
        raise ModelError(
            f"head {name}: no version {version} in {Path(model_dir) / FOLDER / name} (versions: {known})"
        )
    return folder


def next_version(model_dir: Path, name: str) -> str:
    numbers = [int(v) for v in versions(model_dir, name) if v.isdigit()]
    return str(max(numbers, default=0) + 1)


def head_entry(model_dir: Path, name: str, version: str, shadow: bool = False) -> dict:
    """The manifest entry of one version, its graph path relative to the model folder."""
    folder = version_dir(model_dir, name, version)
    entry = yaml.safe_load((folder / "head.yaml").read_text())
    entry["graph"] = f"{FOLDER}/{name}/{version}/{entry['graph']}"
    entry["version"] = version
    if shadow:
        entry["name"] = f"{name}{SHADOW_SUFFIX}"
        entry["shadow"] = True
    return entry


def learned_entries(model_dir: Path) -> tuple[list[dict], str]:
    """The manifest entries of every learned head's active and shadow version, and what the model's
    version gains from them (``+aorta.3``)."""
    entries, suffix = [], ""
    for name, s in sorted(read_state(model_dir).items()):
        if s.active:
            entries.append(head_entry(model_dir, name, s.active))
            suffix += f"+{name}.{s.active}"
        if s.shadow:
            entries.append(head_entry(model_dir, name, s.shadow, shadow=True))
    return entries, suffix


def activate(model_dir: Path, name: str, version: str) -> HeadState:
    version_dir(model_dir, name, version)
    states = read_state(model_dir)
    s = states.get(name, HeadState())
    if s.active == version:
        return s  # already active: rollback must not land on the same version again
    new = HeadState(version, None if s.shadow == version else s.shadow, (*s.history, version))
    write_state(model_dir, {**states, name: new})
    return new


def shadow(model_dir: Path, name: str, version: str | None) -> HeadState:
    """Run ``version`` in shadow (None: stop the shadow)."""
    if version is not None:
        version_dir(model_dir, name, version)
    states = read_state(model_dir)
    s = states.get(name, HeadState())
    if version is not None and version == s.active:
        raise ModelError(f"head {name}: version {version} is the active one, not a shadow")
    new = HeadState(s.active, version, s.history)
    write_state(model_dir, {**states, name: new})
    return new


def rollback(model_dir: Path, name: str) -> HeadState:
    """Back to the version active before this one (none before it: the head is switched off)."""
    states = read_state(model_dir)
    s = states.get(name)
    if s is None or s.active is None:
        raise ModelError(f"head {name}: no active version to roll back")
    history = s.history[:-1]
    new = HeadState(history[-1] if history else None, s.shadow, history)
    write_state(model_dir, {**states, name: new})
    return new
