"""A shadow version judged on the labels that arrive after it started: each new label set of a
structure a shadow head segments is scored (Dice) for the shadow and the active version alike, so
the department sees, before activating it, how the shadow does on its radiologists' corrections.

The worker makes one when it first runs a shadow head and calls :meth:`LabelWatch.check` while it
waits for work; only label sets that arrive from then on count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from node.identity import LabelKind
from node.learn.examples import from_node
from node.learn.head_gate import judge
from node.model import head_versions
from node.model.feature_cache import FeatureCache
from node.model.manifest import ModelSpec
from node.model.runtimes import Runtime
from node.service.orthanc import OrthancClient
from node.service.queue.labels import Labels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelScore:
    model: str
    head: str
    role: str  # "shadow" or "active"
    version: str
    dice: float


class LabelWatch:
    def __init__(self, labels: Labels, orthanc: OrthancClient, cache: FeatureCache | None):
        self.labels, self.orthanc, self.cache = labels, orthanc, cache
        self.seen = max((s.id for s in labels.list()), default=0)  # only what arrives from now on

    def check(self, engines: list[tuple[ModelSpec, Runtime]]) -> list[LabelScore]:
        """Score every new segmentation label set against each shadow head that segments its label
        (``engines``: the models with a shadow head; label sets that arrive while there is none are
        passed over, never judged later)."""
        new = [s for s in self.labels.list() if s.id > self.seen]
        if not new:
            return []
        self.seen = max(s.id for s in new)
        scores = []
        for model, runtime in engines:
            for head in (h for h in model.heads if h.shadow):
                name = head.name.removesuffix(head_versions.SHADOW_SUFFIX)
                for label in head.labels:
                    sets = [s for s in new if any(x.name.lower() == label.name.lower() for x in s.labels)]
                    examples = from_node(self.orthanc, sets, label.name, model, runtime, self.cache, LabelKind.SEGMENTATION)
                    if not examples:
                        continue
                    active = next((h.version for h in model.heads if h.name == name), None)
                    for role, version in (("shadow", head.version), ("active", active)):
                        if version is None:
                            continue
                        dice = judge(model, name, version, examples).get(f"dice {label.name}")
                        if dice is not None:
                            scores.append(LabelScore(model.name, name, role, version, dice))
        return scores
