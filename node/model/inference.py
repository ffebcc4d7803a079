"""Run a model over one series: canonical volume -> slice batches -> heads -> source grid.

The backbone runs once per slice batch (inside :meth:`Runtime.infer`); every
per-slice head consumes those features, and series-level heads pool the
CLS features of all slices at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from node.identity import Stage
from node.ingest.volume import SeriesVolume
from node.model.manifest import ModelSpec
from node.model.preprocess import (
    PlaneMap,
    air_value,
    is_axis_aligned,
    labels_to_source,
    mr_range,
    normalise,
    to_canonical,
)
from node.model.runtimes import Runtime
from node.timing import Stopwatch


@dataclass
class Prediction:
    """Model outputs for one series, on the source volume's grid."""

    labels: dict[str, np.ndarray]  # segmentation head -> uint8 class map (slices, rows, cols)
    confidence: dict[str, np.ndarray]  # segmentation head -> uint8 probability of the chosen class x 255
    probabilities: dict[str, float]  # classification head -> probability of the positive class
    model_spacing_mm: float = 0.0  # in-plane pixel size the model saw
    notes: list[str] = field(default_factory=list)


def predict(
    series: SeriesVolume,
    model: ModelSpec,
    runtime: Runtime,
    clock: Stopwatch,
    progress: Callable[[int], None] | None = None,
) -> Prediction:
    """Infer every head on ``series``; stage times go to ``clock``; ``progress(n)`` after each batch."""
    with clock(Stage.PREPROCESS):
        canonical = to_canonical(series.volume)
        plane = PlaneMap(canonical.shape[1:], tuple(canonical.pixel_spacing), model.input.size)
        spec = model.input.intensity
        scale = mr_range(canonical.array, spec) if series.modality != "CT" else None
        fill = air_value(series.modality)
    n = canonical.shape[0]
    seg_heads = runtime.slice_heads
    labels = {h.name: np.zeros(canonical.shape, np.uint8) for h in seg_heads}
    conf = {h.name: np.zeros(canonical.shape, np.uint8) for h in seg_heads}
    pooled: dict[str, list[np.ndarray]] = {k: [] for k in runtime.series_inputs}
    batches = [slice(s, min(n, s + model.backbone.batch)) for s in range(0, n, model.backbone.batch)]
    prep_clock = Stopwatch()

    def prepare(sl: slice) -> np.ndarray:
        with prep_clock(Stage.PREPROCESS):
            return normalise(plane.to_model(canonical.array[sl], fill), series.modality, spec, scale)

    # on a GPU, the next batch is resampled on the CPU while this one runs (a prefetch of one batch);
    # on the CPU both would compete for the same cores, so it stays sequential
    pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if runtime.overlap else None
    ahead = pool.submit(prepare, batches[0]) if pool and batches else None
    for b, sl in enumerate(batches):
        if ahead is not None:
            x = ahead.result()
            ahead = pool.submit(prepare, batches[b + 1]) if b + 1 < len(batches) else None
        else:
            x = prepare(sl)
        with clock(Stage.INFERENCE):
            out = runtime.infer(x, clock)
        for k, v in out.features.items():
            pooled[k].append(v)
        with clock(Stage.POSTPROCESS):
            for h in seg_heads:  # per-class probabilities -> canonical labels, resizing only near boundaries
                labels[h.name][sl], conf[h.name][sl] = plane.labels_to_canonical(out.heads[h.name])
        if progress:
            progress(sl.stop - sl.start)
    if pool:
        pool.shutdown()
    clock.seconds[Stage.PREPROCESS] += prep_clock.seconds[
        Stage.PREPROCESS
    ]  # overlapped with inference on a GPU
    with clock(Stage.INFERENCE):
        features = {k: np.concatenate(v) for k, v in pooled.items()}
        probabilities = {}
        for h in runtime.series_heads:
            with clock.part(f"head_{h.name}"):
                probabilities[h.name] = runtime.classify(h, features)
    with clock(Stage.POSTPROCESS):
        src = series.volume
        labels = {k: labels_to_source(v, canonical, src) for k, v in labels.items()}
        conf = {k: labels_to_source(v, canonical, src) for k, v in conf.items()}
    notes = [] if is_axis_aligned(src) else ["oblique acquisition resampled to an axial grid for inference"]
    return Prediction(labels, conf, probabilities, plane.model_spacing, notes)
