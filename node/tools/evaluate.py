"""Measure a model's quality on freshly generated held-out phantoms, through the product's own inference path."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np

from node.analysis.postprocess import lesion_components
from node.ingest.volume import SeriesVolume
from node.model.inference import predict
from node.model.manifest import ModelSpec
from node.model.select import select_runtime
from node.synthetic.phantom import ORGANS, Phantom, axial_affine, rotated
from node.timing import Stopwatch


@dataclass
class EvalReport:
    model: str
    cases: int
    dice: dict[str, float]  # structure -> mean Dice over the cases where it is present
    classifier_accuracy: float
    classifier_auc: float | None
    lesion_sensitivity: float  # truth lesions >= 10 mm hit by a reported lesion
    lesion_false_positives: float  # reported lesions touching no truth lesion, per series
    per_case: list[dict] = field(default_factory=list)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / s) if s else 1.0


def auc(scores: list[float], labels: list[bool]) -> float | None:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return None
    return float(np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg]))


def held_out_case(k: int, seed: int) -> tuple[SeriesVolume, Phantom, object]:
    """Case k: CT for even k, MR for odd; every third case has no lesion (classifier negatives);
    cases 4-5, 10-11, ... are acquired obliquely (tilted 10-25 degrees about two axes), which the
    node resamples. The other storage variants hold the axial case's very voxels (the geometry
    tests prove they give the same labels), so axial stands for them."""
    rng = np.random.default_rng(seed + k)
    modality = "CT" if k % 2 == 0 else "MR"
    phantom = Phantom.random(seed + k, n_lesions=0 if k % 3 == 2 else int(rng.integers(1, 5)))
    shape = (56, 256, 256)
    affine = axial_affine(shape, float(rng.uniform(1.35, 1.8)), 5.0, float(rng.uniform(-30, 10)))
    if oblique(k):
        affine = rotated(affine, shape, *(rng.uniform(10, 25, 2) * rng.choice([-1, 1], 2)))
    truth = phantom.sample(
        affine,
        shape,
        modality,
        noise=12.0 if modality == "CT" else 2.0,
        seed=seed + k,
        mr_gain=float(rng.uniform(0.5, 3)),
    )
    volume = hd.Volume(truth.image, affine, "PATIENT", "1.2.3")
    return SeriesVolume(f"held-out-{k}", modality, volume, [], []), phantom, truth


def oblique(k: int) -> bool:
    return (k // 2) % 3 == 2


def evaluate_model(model: ModelSpec, cases: int = 8, seed: int = 50_000) -> EvalReport:
    runtime, _ = select_runtime(model, "auto")
    scores: dict[str, list[float]] = {name: [] for name in [*ORGANS.values(), "lesion"]}
    probs, present, hits, lesions_total, false_positives = [], [], 0, 0, 0
    per_case = []
    for k in range(cases):
        series, phantom, truth = held_out_case(k, seed)
        pred = predict(series, model, runtime, Stopwatch())
        organs, lesion = pred.labels["organs"], pred.labels["lesions"] > 0
        # the lesions the node reports: connected components big enough to be written as segments
        comps, kept = lesion_components(lesion, float(np.prod(series.volume.spacing)))
        reported = np.isin(comps, kept)
        case = {"case": k, "modality": series.modality, "oblique": oblique(k)}
        for idx, name in ORGANS.items():
            t = truth.organs == idx
            if t.sum() > 50:
                scores[name].append(dice(organs == idx, t))
                case[name] = round(scores[name][-1], 3)
        if truth.lesion.any():
            scores["lesion"].append(dice(lesion, truth.lesion > 0))
            case["lesion"] = round(scores["lesion"][-1], 3)
        for i, les in enumerate(phantom.lesions, start=1):
            voxels = truth.lesion == i
            if les.diameter_mm >= 10 and voxels.sum() > 0:
                lesions_total += 1
                hits += bool(reported[voxels].any())
        touched = set(np.unique(comps[truth.lesion > 0]).tolist())
        case["false_positives"] = sum(1 for c in kept if c not in touched)
        false_positives += case["false_positives"]
        p = float(pred.probabilities["lesion_presence"][0]) if "lesion_presence" in pred.probabilities else 0.0
        probs.append(p)
        present.append(bool(truth.lesion.any()))
        case["lesion_probability"] = round(p, 3)
        per_case.append(case)
    accuracy = float(np.mean([(p >= 0.5) == y for p, y in zip(probs, present, strict=True)]))
    return EvalReport(
        model=f"{model.name} {model.version}",
        cases=cases,
        dice={k: round(float(np.mean(v)), 3) for k, v in scores.items() if v},
        classifier_accuracy=round(accuracy, 3),
        classifier_auc=None if (a := auc(probs, present)) is None else round(a, 3),
        lesion_sensitivity=round(hits / lesions_total, 3) if lesions_total else 1.0,
        lesion_false_positives=round(false_positives / cases, 3),
        per_case=per_case,
    )


def format_report(r: EvalReport) -> str:
    lines = [
        f"model {r.model}, {r.cases} held-out phantoms (CT and MR)",
        "| structure | Dice |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in r.dice.items()]
    lines.append(f"lesion presence: accuracy {r.classifier_accuracy:.3f}, AUC {r.classifier_auc}")
    lines.append(
        f"lesion sensitivity (truth lesions >= 10 mm found): {r.lesion_sensitivity:.3f}, "
        f"false-positive lesions per series: {r.lesion_false_positives:.2f}"
    )
    return "\n".join(lines)


def write_quality(model: ModelSpec, report: EvalReport, seed: int) -> Path:
    """Record measured quality and the minimums the tests hold the model to (margin for small samples)."""

    def floor(v: float, margin: float) -> float:
        return max(0.0, math.floor((v - margin) * 100) / 100)

    data = {
        "model": report.model,
        "measured": {k: v for k, v in asdict(report).items() if k != "per_case"},
        "seed": seed,
        "date": time.strftime("%Y-%m-%d"),
        "minimum": {
            # lesions are few and small per case, so their figures vary more between samples
            "dice": {k: floor(v, 0.25 if k == "lesion" else 0.07) for k, v in report.dice.items()},
            "classifier_accuracy": floor(report.classifier_accuracy, 0.3),
            "classifier_auc": floor(report.classifier_auc or 0.0, 0.2),
            "lesion_sensitivity": floor(report.lesion_sensitivity, 0.3),
        },
        "maximum": {"lesion_false_positives": math.ceil((report.lesion_false_positives + 1.0) * 10) / 10},
    }
    path = model.path / "quality.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
