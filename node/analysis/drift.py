"""Drift watch: how far a series lies from the distribution a model's reference series had.

Per series, PHI-free signals computed from the :class:`~node.analysis.findings.Findings` and the
model's manifest (signal names are head and label names of the manifest, never anything of the
patient):

- ``input.median``, ``input.std``: the body's intensity in modality units, its median (where a
  calibration offset or a gain shows) and its standard deviation (contrast: another weighting or
  phase). Not the inter-quartile range: the body is a mixture of fat and soft tissue, and a quartile
  jumps from one to the other with a patient's fat fraction. The body is, on CT, every voxel above
  -500 HU: HU is an absolute scale on which air (-1000) and lung (about -850) lie below and fat
  (-100) and every soft tissue above. MR has no absolute scale, so a fixed cut would move with the
  scanner's gain; the body is every voxel above a tenth of the 99th percentile, a cut that scales
  with the gain (a gain change moves the statistics, what is watched, and not the mask) and lies
  above the background's noise and aerated lung and below every soft tissue;
- ``input.noise``: the body's noise, from the differences of neighbouring voxels along a row
  (1.4826 x their median absolute deviation / sqrt 2: robust to the few differences that cross an
  organ's edge). A reconstruction kernel changes it more than any anatomy does;
- ``<head>.probability``: per classification head, its probability;
- ``<head>.<label>.ml``: per segmentation label, its volume in ml (all instances of a lesion label
  together; 0 when none was found, as a missed organ is drift too).

A :class:`DriftReference` holds, per modality and signal, the mean, standard deviation and count
over reference series (``drift.json`` in the model folder; none: the model has no drift watch).
A series' score per signal is ``|x - mean| / std`` (the std floored: :data:`STD_FLOOR_RELATIVE`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from node.analysis.findings import Findings
from node.errors import ModelError
from node.model.manifest import ModelSpec

DRIFT_FILE = "drift.json"
CT_BODY_HU = -500.0
MR_BODY_FRACTION = 0.1  # of the 99th percentile
# a signal that barely varied over the reference series (a probability always near 1, a constant
# organ) would score thousands for any change: its std is taken as at least 5 % of its mean and at
# least 0.05 in its unit, so a change that small scores 1
STD_FLOOR_RELATIVE = 0.05
STD_FLOOR_ABSOLUTE = 0.05
SAMPLE_VOXELS = 2_000_000  # the intensity statistics of a large CT read a regular subsample


@dataclass(frozen=True)
class SeriesSignals:
    """One series' signals for one model: what a reference is built from and scores are taken of."""

    modality: str
    values: dict[str, float]


@dataclass(frozen=True)
class SignalStats:
    mean: float
    std: float
    n: int  # reference series that had the signal

    def score(self, x: float) -> float:
        floor = max(STD_FLOOR_RELATIVE * abs(self.mean), STD_FLOOR_ABSOLUTE)
        return abs(x - self.mean) / max(self.std, floor)


@dataclass(frozen=True)
class DriftReference:
    """Per modality, per signal: the reference series' statistics (``drift.json``)."""

    model: str  # name and version it was made with
    modalities: dict[str, dict[str, SignalStats]]

    def save(self, model_dir: Path) -> Path:
        path = Path(model_dir) / DRIFT_FILE
        body = {
            "model": self.model,
            "modalities": {
                m: {k: asdict(s) for k, s in sorted(stats.items())}
                for m, stats in sorted(self.modalities.items())
            },
        }
        path.write_text(json.dumps(body, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, model_dir: Path) -> DriftReference | None:
        """The model's reference; None when it has none (no drift watch); ModelError when unreadable."""
        path = Path(model_dir) / DRIFT_FILE
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_text())
            modalities = {
                str(m): {str(k): _stats(s) for k, s in signals.items()}
                for m, signals in raw["modalities"].items()
            }
            return cls(str(raw["model"]), modalities)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            why = " ".join(str(e).split()) or type(e).__name__
            raise ModelError(f"{path}: not a valid drift reference ({type(e).__name__}: {why})") from None


def _stats(raw: Mapping) -> SignalStats:
    s = SignalStats(float(raw["mean"]), float(raw["std"]), int(raw["n"]))
    if not (math.isfinite(s.mean) and math.isfinite(s.std) and s.std >= 0 and s.n > 0):
        raise ValueError(f"mean {s.mean}, std {s.std}, n {s.n}: a finite mean, std >= 0 and n > 0 expected")
    return s


def series_signals(findings: Findings, model: ModelSpec) -> SeriesSignals:
    """The series' signals for ``model`` (its own segments and classifications, its learned heads'
    included, where several models ran on the series)."""
    def of_model(ref) -> bool:  # the model's own, or one of its learned heads' ("phantom-fm aorta")
        return ref is None or ref.name == model.name or ref.name.startswith(f"{model.name} ")

    ours = [s for s in findings.segments if of_model(s.model)]
    values = input_signals(findings)
    for head in (h for h in model.heads if not h.shadow):  # a shadow's output is never written: not watched
        if head.kind == "classification":
            probs = [c.probability for c in findings.classifications if c.head == head.name and of_model(c.model)]
            if probs:
                values[f"{head.name}.probability"] = float(probs[0])
        elif head.kind == "segmentation" and "seg" in head.outputs:
            for label in head.labels:
                values[f"{head.name}.{label.name}.ml"] = float(
                    sum(s.volume_ml for s in ours if _is_of(s.label, label.name, label.instances))
                )
    return SeriesSignals(findings.series.modality.upper(), values)


def _is_of(segment_label: str, name: str, instances: bool) -> bool:
    """A segment of the manifest's label ``name`` (instances are named "Lesion 1", "Lesion 2"...)."""
    if segment_label == name:
        return True
    rest = segment_label[len(name) + 1 :]
    return instances and segment_label.startswith(f"{name} ") and rest.isdigit()


def input_signals(findings: Findings) -> dict[str, float]:
    """The body's intensity median, standard deviation and noise, on acquired slices (an interpolated one is smooth)."""
    series = findings.series
    array = np.asarray(series.volume.array)
    slices = [i for i, f in enumerate(series.frames) if f is not None]
    if not slices or len(series.frames) != array.shape[0]:
        slices = list(range(array.shape[0]))
    step = max(1, math.ceil(math.sqrt(len(slices) * array[0].size / SAMPLE_VOXELS)))
    # every step-th slice and row, whole rows (neighbours stay neighbours), never a copy of the volume
    array = array[slices[::step], ::step].astype(np.float32, copy=False)
    if series.modality.upper() == "CT":
        cut = CT_BODY_HU
    else:
        cut = MR_BODY_FRACTION * float(np.percentile(array, 99))
    body = array > cut
    voxels = array[body]
    if voxels.size == 0:
        return {}
    values = {"input.median": float(np.median(voxels)), "input.std": float(np.std(voxels, dtype=np.float64))}
    pairs = body[..., 1:] & body[..., :-1]
    if pairs.any():
        d = (array[..., 1:] - array[..., :-1])[pairs]
        values["input.noise"] = float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2))
    return values


def drift_scores(reference: DriftReference, signals: SeriesSignals) -> dict[str, float]:
    """Per signal the reference has for the series' modality, ``|x - mean| / max(std, floor)``; none
    for a modality the reference never saw."""
    stats = reference.modalities.get(signals.modality, {})
    return {k: stats[k].score(x) for k, x in signals.values.items() if k in stats}


def reference_from(signals_list: Iterable[SeriesSignals], model: str) -> DriftReference:
    """The reference of many series: per modality and signal, the mean and sample std (ddof 1)."""
    collected: dict[str, dict[str, list[float]]] = {}
    for s in signals_list:
        for k, x in s.values.items():
            collected.setdefault(s.modality, {}).setdefault(k, []).append(x)
    return DriftReference(
        model,
        {
            m: {
                k: SignalStats(float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0, len(xs))
                for k, xs in signals.items()
            }
            for m, signals in collected.items()
        },
    )
