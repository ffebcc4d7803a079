"""Numerical gate: a reduced precision is used only if every head still agrees with FP32.

For a runtime at a reduced precision (FP16, BF16), every head's output on
held-out phantoms (never used in training: seeds from 60 000) is compared
with the FP32 ONNX Runtime reference, through the product's own inference
path (:func:`node.model.inference.predict`, so resampling and arg-max are included):

- segmentation heads: Dice of each label's mask, candidate vs reference, per
  case, wherever either has at least ``min_voxels`` of it; the worst Dice must
  reach ``dice_min``;
- classification heads: the same decision at the head's threshold in every
  case, and ``|p - p_ref| <= prob_abs``.

A precision that fails is refused with one line naming the head, the label,
the measured value and the limit (:class:`GateError`); it is never used
silently. Verdicts are cached beside the engine cache, keyed by the graphs'
hashes, runtime, device, precision and tolerance.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np

from node.errors import ModelError
from node.ingest.volume import SeriesVolume
from node.model.engine_cache import DEFAULT_ROOT, atomic_write, file_sha256
from node.model.inference import Prediction, predict
from node.model.manifest import ModelSpec
from node.model.runtimes import Runtime
from node.timing import Stopwatch

log = logging.getLogger(__name__)
HELD_OUT_SEED = 60_000


class GateError(ModelError):
    """A precision drifted beyond the tolerance: refused."""


@dataclass(frozen=True)
class Tolerance:
    dice_min: float = 0.97  # worst per-label, per-case Dice vs FP32
    prob_abs: float = 0.05  # largest |p - p_ref| of a classification head
    min_voxels: int = 50  # labels smaller than this in both maps are not judged (a few voxels flip)


@dataclass
class Check:
    head: str
    what: str  # label name, or "probability" / "decision"
    value: float
    limit: float
    ok: bool
    case: int


@dataclass
class GateReport:
    model: str
    runtime: str
    precision: str
    cases: int
    tolerance: Tolerance
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def worst(self) -> list[Check]:
        """Per (head, what): the worst case (a failing one first, then the lowest Dice / largest drift)."""
        out: dict[tuple[str, str], Check] = {}
        for c in self.checks:
            k = (c.head, c.what)
            sign = 1 if c.what == "probability" else -1
            if k not in out or (not c.ok, sign * c.value) > (not out[k].ok, sign * out[k].value):
                out[k] = c
        return list(out.values())

    def message(self) -> str:
        where = f"{self.precision} on {self.runtime} for model {self.model}"
        if self.ok:
            return f"{where} passed the numerical gate vs FP32 ONNX Runtime on {self.cases} held-out phantoms"
        bad = [c for c in self.worst() if not c.ok]
        what = "; ".join(
            f"head {c.head} {c.what} {'|dp|' if c.what == 'probability' else 'Dice'} {c.value:.3f} "
            f"{'>' if c.what == 'probability' else '<'} {c.limit} (case {c.case})"
            if c.what != "decision"
            else f"head {c.head} decision differs (case {c.case})"
            for c in bad
        )
        return f"{where} refused: {what}, vs FP32 ONNX Runtime on {self.cases} held-out phantoms"


def held_out(k: int, slices: int = 24, size: int = 192, seed: int = HELD_OUT_SEED) -> SeriesVolume:
    """Held-out case k: CT for even k, MR for odd, lesions in two of three, a slab through the lesions.

    The phantoms are the gate's calibration set; imported here only, so a worker whose verdicts are
    cached never loads the generator."""
    from node.synthetic.phantom import Phantom, axial_affine

    rng = np.random.default_rng(seed + k)
    modality = "CT" if k % 2 == 0 else "MR"
    phantom = Phantom.random(seed + k, n_lesions=0 if k % 3 == 2 else int(rng.integers(1, 5)))
    z = phantom.lesions[0].center[2] if phantom.lesions else float(rng.uniform(-30, 10))
    shape = (slices, size, size)
    affine = axial_affine(shape, float(rng.uniform(360, 460)) / size, 4.0, z)
    s = phantom.sample(affine, shape, modality, noise=12.0 if modality == "CT" else 2.0, seed=seed + k)
    return SeriesVolume(f"gate-{k}", modality, hd.Volume(s.image, affine, "PATIENT", "1.2.3"), [], [])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return float(2 * np.logical_and(a, b).sum() / s) if s else 1.0


def compare_predictions(
    model: ModelSpec, ref: Prediction, cand: Prediction, case: int, tol: Tolerance
) -> list[Check]:
    checks = []
    for h in model.heads:
        if h.kind == "classification":
            p, q = ref.probabilities[h.name], cand.probabilities[h.name]
            drift = float(np.max(np.abs(p - q)))
            checks.append(Check(h.name, "probability", drift, tol.prob_abs, drift <= tol.prob_abs, case))
            if h.classes:
                same = bool(np.argmax(p) == np.argmax(q))
            else:
                same = bool((p[0] >= h.threshold) == (q[0] >= h.threshold))
            checks.append(Check(h.name, "decision", float(same), 1.0, same, case))
            continue
        a, b = ref.labels[h.name], cand.labels[h.name]
        for label in h.labels:
            ma, mb = a == label.index, b == label.index
            if max(int(ma.sum()), int(mb.sum())) < tol.min_voxels:
                continue
            d = dice(ma, mb)
            checks.append(Check(h.name, label.name, d, tol.dice_min, d >= tol.dice_min, case))
    return checks


def reference_runtime(model: ModelSpec) -> Runtime:
    """FP32 ONNX Runtime (CUDA provider when present, else CPU)."""
    from node.model.runtimes.onnxruntime import OnnxRuntime

    return OnnxRuntime(model)


def check(
    model: ModelSpec,
    candidate: Runtime,
    reference: Runtime | None = None,
    cases: int = 3,
    tol: Tolerance = Tolerance(),
    slices: int = 24,
) -> GateReport:
    """Compare ``candidate`` with the FP32 reference on ``cases`` held-out phantoms."""
    reference = reference or reference_runtime(model)
    report = GateReport(f"{model.name} {model.version}", candidate.name, candidate.precision, cases, tol)
    for k in range(cases):
        series = held_out(k, slices=slices)
        ref = predict(series, model, reference, Stopwatch())
        cand = predict(series, model, candidate, Stopwatch())
        report.checks += compare_predictions(model, ref, cand, k, tol)
    log.info(report.message())
    return report


def require(report: GateReport) -> GateReport:
    if not report.ok:
        raise GateError(report.message())
    return report


def check_cached(model: ModelSpec, candidate: Runtime, cache_dir: Path | None = None, **kw) -> GateReport:
    """:func:`check`, remembered on disk per (graphs, runtime, device, precision, tolerance, cases)."""
    graphs = model.graphs
    key = {
        "graphs": {g: file_sha256(model.graph(g)) for g in graphs},
        "runtime": candidate.name,
        "device": _device_name(candidate),
        "precision": candidate.precision,
        "tolerance": asdict(kw.get("tol", Tolerance())),
        "cases": kw.get("cases", 3),
        "slices": kw.get("slices", 24),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = (cache_dir or DEFAULT_ROOT) / "gate" / f"{digest}.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
            report = GateReport(**{**data, "tolerance": Tolerance(**data["tolerance"]), "checks": []})
            report.checks = [Check(**c) for c in data["checks"]]
            return report
        except (OSError, ValueError, TypeError, KeyError):
            pass
    report = check(model, candidate, **kw)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(asdict(report)).encode(), mode=0o644)  # workers on one host share it
    except OSError as e:  # a read-only cache only costs a re-check next start
        log.warning("cannot record the gate verdict in %s: %s", path, e)
    return report


def _device_name(rt: Runtime) -> str:
    gpu = getattr(rt, "gpu", None)
    return f"{gpu[0]} sm{gpu[1]}" if gpu else rt.device
