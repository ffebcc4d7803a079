"""What ``pacs-node heads`` does: train a version from the node's label sets, show the heads, and
activate (through the gate), shadow or roll back a version. A running worker picks a change up
before its next series (:func:`node.model.head_versions.stamp`), keeping its loaded models where
the new state does not load."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from node.config import NodeConfig
from node.errors import InputError, ModelError
from node.identity import LabelKind
from node.learn.examples import Example, from_node
from node.learn.head_gate import Verdict, gate
from node.model import head_versions
from node.model.manifest import ModelSpec, load_model
from node.model.runtimes.onnxruntime import OnnxRuntime
from node.service.orthanc import OrthancClient
from node.service.queue import JobQueue


def examples(
    cfg: NodeConfig, model: ModelSpec, label: str, kind: LabelKind, golden: bool, sender: str | None = None
) -> list[Example]:
    """The examples of the node's label sets: the golden set's (``golden``), or every other series'
    (never the golden set's: it judges what was trained), optionally of one sender only."""
    where = cfg.queue_location
    if isinstance(where, Path) and not where.exists():
        raise InputError(f"no queue at {where}: the node has not run with this config (pacs-node serve)")
    if model.backbone is None or not {"tokens", "cls"} <= set(model.backbone.outputs):
        raise ModelError(f"model {model.name}: heads are trained on a backbone's tokens and CLS; it has none")
    uids = set(cfg.learning.golden)
    sets = [
        s
        for s in JobQueue(where).labels.list()
        if (s.series_uid in uids) == golden and (sender is None or s.sender == sender)
    ]
    orthanc = OrthancClient(cfg.orthanc_url, cfg.orthanc_auth)
    return from_node(orthanc, sets, label, model, OnnxRuntime(model, cuda=False), cfg.feature_cache(), kind)


def train(
    cfg: NodeConfig,
    model_path: Path,
    name: str,
    kind: str,
    label: str,
    code: str,
    sender: str | None,
    steps: int,
    folds: int,
):
    try:
        from node.learn.train import TrainConfig, train_classification_head, train_segmentation_head
    except ImportError as e:
        raise InputError(str(e)) from None
    model = load_model(model_path)
    if any(h.name == name and h.version is None for h in model.heads):
        raise ModelError(
            f"model {model.name}: head {name} is shipped with the model; name the new head otherwise"
        )
    kinds = {
        head_versions.head_entry(model.path, name, v)["kind"]
        for v in head_versions.versions(model.path, name)
    }
    if kinds - {kind}:
        raise ModelError(f"model {model.name}: head {name}'s versions are {kinds.pop()}, not {kind}")
    found = examples(cfg, model, label, LabelKind(kind), golden=False, sender=sender)
    if not found:
        raise InputError(f"no label set with {label} outside the golden set (pacs-node labels list)")
    fit = train_classification_head if kind == LabelKind.CLASSIFICATION else train_segmentation_head
    try:
        return fit(model, name, label, code, found, TrainConfig(steps=steps, folds=folds))
    except ValueError as e:  # e.g. one class only
        raise InputError(str(e)) from None


def activate(cfg: NodeConfig, model_path: Path, name: str, version: str) -> Verdict:
    """Judge ``version`` on the golden set; activate it only if it passes."""
    model = load_model(model_path)
    entry = head_versions.head_entry(model.path, name, version)
    kind = LabelKind(entry["kind"])
    label = entry["labels"][0]["name"] if kind is LabelKind.SEGMENTATION else entry["finding"]["meaning"]
    golden = examples(cfg, model, label, kind, golden=True)
    floors = {"dice": cfg.learning.min_dice, "auc": cfg.learning.min_auc}
    verdict = gate(model, name, version, golden, cfg.learning.tolerance, floors)
    if verdict.passed:
        head_versions.activate(model.path, name, version)
    return verdict


@dataclass(frozen=True)
class HeadStatus:
    name: str
    active: str | None
    shadow: str | None
    versions: dict[str, dict]  # version -> its cross-validated quality (metrics.json)

    def line(self) -> str:
        shown = []
        for v, cv in self.versions.items():
            mark = " (active)" if v == self.active else " (shadow)" if v == self.shadow else ""
            measure = "dice" if "dice" in cv else "auc"
            value = cv.get(measure)
            shown.append(
                f"{v}{mark} " + (f"cv {measure} {value:.3f}" if value is not None else "not cross-validated")
            )
        return f"{self.name}: " + ("; ".join(shown) or "no versions")


def status(model_path: Path) -> list[HeadStatus]:
    """Every learned head: its versions with their cross-validated quality, which is active, which in shadow."""
    states = head_versions.read_state(model_path)
    folder = Path(model_path) / head_versions.FOLDER
    names = sorted(
        {*states, *(p.name for p in folder.iterdir() if p.is_dir())} if folder.is_dir() else states
    )
    out = []
    for name in names:
        s = states.get(name, head_versions.HeadState())
        found = {v: _quality(folder / name / v) for v in head_versions.versions(model_path, name)}
        out.append(HeadStatus(name, s.active, s.shadow, found))
    return out


def _quality(version: Path) -> dict:
    """A version's cross-validated quality (empty where its metrics.json is missing or unreadable)."""
    try:
        return json.loads((version / "metrics.json").read_text())["cross_validated"]
    except (OSError, ValueError, KeyError):
        return {}
