"""The gate a head version passes before it goes live: the department's golden set.

The golden set is a configured list of labelled series (``learning.golden`` in the node's config),
never trained on. Each version is judged there the way it runs (its ONNX graph on the cached
features): Dice per label, or a classification's AUC, accuracy and sensitivity. A version is
activated only if it is no worse than the active version on every metric, within
``learning.tolerance``; the first version of a head must reach ``learning.min_dice`` or
``learning.min_auc``. A refusal names the metric and by how much it failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from node.learn.examples import Example
from node.learn.metrics import classification_metrics
from node.model import head_versions
from node.model.manifest import HeadSpec, ModelSpec


@dataclass(frozen=True)
class Verdict:
    version: str
    metrics: dict[str, float]  # e.g. {"dice Aorta": 0.91}
    against: str | None  # the active version it was compared with
    active_metrics: dict[str, float] = field(default_factory=dict)
    failures: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures

    def line(self) -> str:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in self.metrics.items())
        if self.passed:
            return f"version {self.version} passes the gate ({shown})"
        return f"version {self.version} refused by the gate: {'; '.join(self.failures)}"


def judge(model: ModelSpec, name: str, version: str, golden: list[Example]) -> dict[str, float]:
    """A version's metrics on the golden set: Dice of each label over all its series' pixels; for a
    classification, AUC, accuracy and sensitivity of its calibrated probability at its threshold."""
    folder = head_versions.version_dir(model.path, name, version)
    entry = head_versions.head_entry(model.path, name, version)
    session = ort.InferenceSession(str(folder / "head.onnx"), providers=["CPUExecutionProvider"])
    if entry["kind"] == "classification":
        head = HeadSpec(**entry)
        x = np.stack([e.features.cls.astype(np.float32).mean(axis=0) for e in golden])
        p = session.run(None, {"features": x})[0].ravel().astype(np.float64)
        if head.calibration:
            p = np.array([head.calibration.apply(np.atleast_1d(q))[0] for q in p])
        y = np.array([int(e.target) for e in golden])
        return classification_metrics(p, y, head.threshold)
    inter, total = {}, {}
    for e in golden:
        for s in range(0, e.features.slices, 32):
            feeds = {
                "tokens": e.features.tokens[s : s + 32].astype(np.float32),
                "image": e.features.image[s : s + 32].astype(np.float32),
            }
            pred = session.run(None, feeds)[0].argmax(1)
            truth = e.target[s : s + 32]
            for lab in entry["labels"]:
                a, b = pred == lab["index"], truth == lab["index"]
                key = f"dice {lab['name']}"
                inter[key] = inter.get(key, 0) + int((a & b).sum())
                total[key] = total.get(key, 0) + int(a.sum() + b.sum())
    return {k: round(2 * inter[k] / total[k], 4) if total[k] else 1.0 for k in inter}


def gate(
    model: ModelSpec, name: str, version: str, golden: list[Example], tolerance: float, floors: dict[str, float]
) -> Verdict:
    """``floors``: what a head's first version must reach, by measure ("dice", "auc")."""
    if not golden:
        return Verdict(version, {}, None, failures=("the golden set has no labelled series for this head",))
    metrics = judge(model, name, version, golden)
    active = head_versions.read_state(model.path).get(name, head_versions.HeadState()).active
    if active is None or active == version:
        failures = []
        for k, v in metrics.items():
            floor = floors.get(k.split()[0])
            if floor is not None and not v >= floor:  # NaN (one class only in the golden set) fails too
                failures.append(f"{k} {v:.3f} below the first version's floor {floor:.3f} (by {floor - v:.3f})")
        return Verdict(version, metrics, None, failures=tuple(failures))
    before = judge(model, name, active, golden)
    failures = tuple(
        f"{k} {metrics.get(k, 0.0):.3f} < active version {active}'s {v:.3f} - tolerance {tolerance:.3f} "
        f"(by {v - tolerance - metrics.get(k, 0.0):.3f})"
        for k, v in before.items()
        if not metrics.get(k, 0.0) >= v - tolerance
    )
    return Verdict(version, metrics, active, before, failures)
