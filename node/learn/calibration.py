"""Fitting a classification head's calibration map on held-out data, and measuring what it buys.

A head trained to separate classes is usually over-confident; the map (:class:`Calibration`, applied at
run time) is fitted on labelled series the head never trained on. Its effect is measured by cross-fitting:
each fold's probabilities are calibrated by a map fitted on the other folds, so "ECE after" is what a new
series would see rather than the fit's own training error. The map that ships is fitted on all the data.

ECE and the reliability diagram use equal-width bins of [0, 1]. A one-output head (probabilities of shape
``(N,)``, labels 0/1) is binned on P(positive) against the observed frequency of positives: the standard
binary reliability, which also shows a bias towards "absent". A head with several outputs (``(N, K)``,
labels the class index) is binned on the predicted class's probability against how often it is right.

Both maps are fitted to Platt's targets, not to 0 and 1: a series of a class seen n times counts as
(n + 1) / (n + 2) sure. On a sample the head tells perfectly (common with a few dozen series) the
maximum-likelihood temperature is zero and isotonic's ends are 0 and 1, so either would state certainty;
with the targets both stay finite, and on hundreds of series they change almost nothing.

numpy and scipy only; matplotlib is imported when a diagram is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from node.model.calibration import _EPS, Calibration  # the clip the run-time map uses: fit what runs

T_BOUNDS = (1e-2, 1e2)  # temperatures searched; a head needing more is broken, not miscalibrated


@dataclass(frozen=True)
class CalibrationReport:
    calibration: Calibration  # fitted on all the data; carries ece_before and ece_after for the card
    ece_before: float
    ece_after: float  # cross-fitted: each fold calibrated by a map fitted on the other folds
    n: int
    held_out: np.ndarray = field(repr=False, compare=False)  # the cross-fitted calibrated probabilities

    @property
    def improves(self) -> bool:
        """Whether the map states the probabilities better than the head does (its cross-fitted ECE below
        the raw one's); where not, the head's own probabilities are the ones to state."""
        return self.ece_after < self.ece_before


def fit_temperature(probs, labels) -> float:
    """The temperature T minimising the negative log-likelihood of ``sigmoid(logit(p) / T)`` (one output)
    or ``softmax(log(p) / T)`` (several). NLL is convex in 1/T, so a bounded scalar search on log T is exact."""
    p, y = _checked(probs, labels)
    res = minimize_scalar(lambda u: _nll(p, y, float(np.exp(u))), bounds=np.log(T_BOUNDS), method="bounded")
    return float(np.exp(res.x))


def fit_isotonic(probs, labels) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Pool-adjacent-violators: the non-decreasing fit of the labels on the probabilities, as knots ``x -> y``
    (each pooled block's mean probability -> its frequency of positives, counted with Platt's targets,
    plus the ends 0 and 1, held flat)
    for a piecewise-linear map. One output only: several classes have no single order to keep."""
    p, y = _checked(probs, labels)
    if p.ndim != 1:
        raise ValueError(
            "isotonic calibration is for a one-output head (use temperature for several classes)"
        )
    values, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    positives = np.bincount(inverse, weights=_targets(y, 2)[:, 1], minlength=len(values))
    blocks: list[list[float]] = []  # [sum of p, positives, count]; equal probabilities start pooled
    for v, pos, c in zip(values, positives, counts, strict=True):
        blocks.append([v * c, pos, c])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] >= blocks[-1][1] / blocks[-1][2]:
            last = blocks.pop()
            blocks[-1] = [a + b for a, b in zip(blocks[-1], last, strict=True)]
    x = [round(s / c, 6) for s, _, c in blocks]
    f = [round(pos / c, 6) for _, pos, c in blocks]
    if x[0] > 0:
        x, f = [0.0, *x], [f[0], *f]
    if x[-1] < 1:
        x, f = [*x, 1.0], [*f, f[-1]]
    return tuple(x), tuple(f)


def ece(probs, labels, bins: int = 15) -> float:
    """Expected calibration error: the count-weighted mean gap between predicted and observed per bin
    (see the module's docstring for what is binned)."""
    p, y = _checked(probs, labels)
    predicted, observed, counts = _reliability(p, y, bins)
    return float(np.sum(counts * np.abs(predicted - observed)) / counts.sum())


def reliability_png(path: Path, before, after, labels, title: str, bins: int = 15) -> Path:
    """A reliability diagram of the raw and the calibrated probabilities of the same series, the diagonal
    (perfect calibration) for reference and each ECE in the legend; a marker's area is its bin's share."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    raw, y = _checked(before, labels)
    cal, _ = _checked(after, labels)
    if raw.shape != cal.shape:
        raise ValueError(f"before has shape {raw.shape} but after {cal.shape}")
    fig = Figure(figsize=(5.5, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for name, p, color in (("before", raw, "tab:red"), ("after (held-out folds)", cal, "tab:blue")):
        predicted, observed, counts = _reliability(p, y, bins)
        ax.plot(predicted, observed, color=color, lw=1.5, label=f"{name}: ECE {ece(p, y, bins):.3f}")
        ax.scatter(predicted, observed, s=12 + 300 * counts / len(y), color=color, alpha=0.6)
    one = raw.ndim == 1
    ax.set_xlabel("predicted probability of the finding" if one else "probability of the predicted class")
    ax.set_ylabel("observed frequency of the finding" if one else "fraction predicted right")
    ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def fit(
    probs, labels, kind: Literal["temperature", "isotonic"] = "temperature", folds: int = 5, seed: int = 0
) -> CalibrationReport:
    """Fit a calibration map and measure it honestly: ECE after on out-of-fold probabilities (folds
    stratified by label), the returned map fitted on all of the data."""
    p, y = _checked(probs, labels)
    if kind not in ("temperature", "isotonic"):
        raise ValueError(f"unknown calibration {kind!r} (temperature or isotonic)")
    if folds < 2 or len(p) < folds:
        raise ValueError(
            f"{folds}-fold cross-fitting needs folds >= 2 and at least {folds} series, got {len(p)}"
        )
    if len(np.unique(y)) < 2:
        raise ValueError("calibration needs both outcomes among the labels (all series have the same label)")
    rng = np.random.default_rng(seed)
    # dealt round-robin after grouping by label: every fold gets its share of each class
    order = np.concatenate([rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)])
    fold = np.empty(len(y), np.int64)
    fold[order] = np.arange(len(y)) % folds
    held_out = np.empty_like(p)
    for f in range(folds):
        test = fold == f
        held_out[test] = _apply(_fit_map(p[~test], y[~test], kind), p[test])
    before, after = round(ece(p, y), 4), round(ece(held_out, y), 4)
    calibration = _fit_map(p, y, kind, ece_before=before, ece_after=after)
    return CalibrationReport(calibration, before, after, len(p), held_out)


def _fit_map(p: np.ndarray, y: np.ndarray, kind: str, **measured: float) -> Calibration:
    if kind == "isotonic":
        x, f = fit_isotonic(p, y)
        return Calibration(kind="isotonic", x=x, y=f, **measured)
    return Calibration(kind="temperature", temperature=fit_temperature(p, y), **measured)


def _apply(calibration: Calibration, p: np.ndarray) -> np.ndarray:
    """The run-time map, one series at a time as inference applies it, so what is measured is what runs."""
    out = np.stack([calibration.apply(row) for row in (p[:, None] if p.ndim == 1 else p)])
    return out[:, 0] if p.ndim == 1 else out


def _nll(p: np.ndarray, y: np.ndarray, t: float) -> float:
    """Cross-entropy of the scaled probabilities against Platt's targets."""
    q = np.clip(p, _EPS, 1 - _EPS)
    if p.ndim == 1:
        z = np.log(q / (1 - q)) / t
        target = _targets(y, 2)[:, 1]
        return float(np.mean(target * np.logaddexp(0.0, -z) + (1 - target) * np.logaddexp(0.0, z)))
    z = np.log(q) / t
    return float(np.mean(np.sum(_targets(y, p.shape[1]) * (logsumexp(z, axis=1, keepdims=True) - z), axis=1)))


def _targets(y: np.ndarray, k: int) -> np.ndarray:
    """Platt's targets, (N, k): a series of a class seen n times holds (n + 1) / (n + 2) on its class and
    the rest, 1 / (n + 2), shared by the other classes (for two classes exactly Platt's 1999 rule)."""
    n = np.bincount(y, minlength=k)[y]
    sure = (n + 1) / (n + 2)
    out = np.repeat(((1 - sure) / (k - 1))[:, None], k, axis=1)
    out[np.arange(len(y)), y] = sure
    return out


def _reliability(p: np.ndarray, y: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty bin: the mean predicted probability, the observed frequency, the count."""
    if bins < 1:
        raise ValueError(f"bins must be 1 or more, not {bins}")
    predicted, observed = (p, y.astype(np.float64)) if p.ndim == 1 else (p.max(1), p.argmax(1) == y)
    idx = np.minimum((predicted * bins).astype(np.int64), bins - 1)
    counts = np.bincount(idx, minlength=bins)
    keep = counts > 0
    mean_predicted = np.bincount(idx, predicted, bins)[keep] / counts[keep]
    frequency = np.bincount(idx, observed.astype(np.float64), bins)[keep] / counts[keep]
    return mean_predicted, frequency, counts[keep]


def _checked(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities as (N,) for one output or (N, K); labels as int class indices; one-line ValueError."""
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels)
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    if p.ndim not in (1, 2):
        raise ValueError(f"probabilities must have shape (N,) or (N, K), not {p.shape}")
    if y.ndim != 1 or len(y) != len(p):
        raise ValueError(f"{len(p)} probabilities but {y.size} labels")
    if len(p) == 0:
        raise ValueError("no probabilities given")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ValueError("probabilities must lie in [0, 1]")
    k = 2 if p.ndim == 1 else p.shape[1]
    valid = y.dtype == bool or (np.issubdtype(y.dtype, np.number) and np.all(np.isin(y, np.arange(k))))
    if not valid:
        raise ValueError(
            "labels must be 0 or 1" if p.ndim == 1 else f"labels must be class indices 0..{k - 1}"
        )
    return p, y.astype(np.int64)
