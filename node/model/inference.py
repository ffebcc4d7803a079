"""Run a model over one series: canonical volume -> slices in the model's plane -> batches ->
heads -> source grid.

The backbone runs once per slice batch (inside :meth:`Runtime.infer`); every per-slice head
consumes those features. Series-level heads see the whole series: a head that ``reads`` a token
keeps one vector per slice (never every patch token of a long series) and gets their mean.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from node.identity import Stage
from node.ingest.volume import SeriesVolume
from node.model.feature_cache import KEPT, SeriesFeatures
from node.model.manifest import HeadSpec, ModelSpec
from node.model.organ_ends import drop_organ_ends
from node.model.preprocess import (
    PLANES,
    acquired,
    air_value,
    is_axis_aligned,
    labels_to_source,
    mr_range,
    normalise,
    plane_map,
    to_canonical,
)
from node.model.runtimes import Runtime
from node.model.sliding_window import segment
from node.timing import Stopwatch


@dataclass
class Prediction:
    """Model outputs for one series, on the source volume's grid."""

    labels: dict[str, np.ndarray]  # segmentation head -> uint8 class map (slices, rows, cols)
    confidence: dict[str, np.ndarray]  # segmentation head -> uint8 probability of the chosen class x 255
    # classification head -> (1,) probability of the positive class, or (K,) one per class
    probabilities: dict[str, np.ndarray]
    model_spacing_mm: float = 0.0  # in-plane pixel size the model saw
    notes: list[str] = field(default_factory=list)
    features: SeriesFeatures | None = None  # when the runtime keeps them (Runtime.keep): for the cache


def predict(
    series: SeriesVolume,
    model: ModelSpec,
    runtime: Runtime,
    clock: Stopwatch,
    progress: Callable[[int], None] | None = None,
) -> Prediction:
    """Infer every head on ``series``; stage times go to ``clock``; ``progress(n)`` after each batch."""
    if model.input.kind == "patch3d":
        return predict_volume(series, model, runtime, clock, progress)
    with clock(Stage.PREPROCESS):
        canonical = to_canonical(series.volume)
        axes = PLANES[model.input.orientation]
        stack = canonical.array.transpose(axes)  # slices in the model's plane along the first axis
        spacing = np.asarray(canonical.spacing)[list(axes)]
        plane = plane_map(stack.shape[1:], tuple(spacing[1:]), model.input)
        spec = model.input.intensity
        scale = mr_range(stack, spec) if series.modality != "CT" and spec.kind == "windows" else None
        fill = air_value(series.modality)
    n = stack.shape[0]
    seg_heads = runtime.slice_heads
    labels = {h.name: np.zeros(stack.shape, np.uint8) for h in seg_heads}
    conf = {h.name: np.zeros(stack.shape, np.uint8) for h in seg_heads}
    # series heads: what each needs of every slice; a head that reads a token keeps one vector per
    # slice, a head that reads slices one probability per slice
    whole = sorted({i for h in runtime.series_heads if not h.reads for i in h.inputs})
    pooled: dict[str, list[np.ndarray]] = {k: [] for k in whole}
    per_slice: dict[str, list[np.ndarray]] = {h.name: [] for h in runtime.series_heads if h.reads}
    kept = {k: [] for k in KEPT} if set(KEPT) <= set(runtime.series_inputs) else None  # for the feature cache
    batches = [slice(s, min(n, s + model.backbone.batch)) for s in range(0, n, model.backbone.batch)]
    prep_clock = Stopwatch()

    def prepare(sl: slice) -> np.ndarray:
        with prep_clock(Stage.PREPROCESS):
            return normalise(plane.to_model(stack[sl], fill), series.modality, spec, scale)

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
        for k in whole:
            pooled[k].append(out.features[k])
        if kept is not None and b == 0:  # decided once, on the first batch: what the series' features weigh
            weight = n * 2 * sum(out.features[k][0].size for k in KEPT if k in out.features)  # float16
            if not set(KEPT) <= set(out.features):
                kept = None  # a runtime that does not return them (a remote server's ensemble)
            elif runtime.keep_bytes is not None and weight > runtime.keep_bytes:
                kept = None  # too large to keep (a long series of a big backbone): computed again if needed
        if kept is not None:
            for k in KEPT:
                kept[k].append(np.asarray(out.features[k], np.float16))
        for h in runtime.series_heads:
            if h.reads == "slices":
                with clock(Stage.INFERENCE), clock.part(f"head_{h.name}"):
                    per_slice[h.name].append(runtime.classify(h, out.features))
            elif h.reads:
                per_slice[h.name].append(slice_feature(h, out.features))
        with clock(Stage.POSTPROCESS):
            for h in seg_heads:  # per-class probabilities -> canonical labels, resizing only near boundaries
                labels[h.name][sl], conf[h.name][sl] = plane.labels_to_canonical(out.heads[h.name])
        if progress:
            progress(sl.stop - sl.start)
    if pool:
        pool.shutdown()
    with clock(Stage.POSTPROCESS):
        for h in seg_heads:
            # in the model's plane: "one slice on" is the model's next slice
            if h.organ_ends in labels and labels[h.name].any():
                inside = None if is_axis_aligned(series.volume) else acquired(series.volume, canonical).transpose(axes)
                drop_organ_ends(labels[h.name], conf[h.name], labels[h.organ_ends], inside)
    # overlapped with inference on a GPU
    clock.seconds[Stage.PREPROCESS] += prep_clock.seconds[Stage.PREPROCESS]
    with clock(Stage.INFERENCE):
        features = {k: np.concatenate(v) for k, v in pooled.items()}
        probabilities = {}
        for h in runtime.series_heads:
            with clock.part(f"head_{h.name}"):
                if h.reads == "slices":  # the series' probability: its most probable slice's
                    probabilities[h.name] = np.concatenate(per_slice[h.name]).max(keepdims=True)
                elif h.reads:  # mean over the series' slices: one feature vector per series
                    pooled_h = np.concatenate(per_slice[h.name]).mean(axis=0, keepdims=True)
                    probabilities[h.name] = runtime.classify(h, {"features": pooled_h})
                else:
                    probabilities[h.name] = runtime.classify(h, features)
                if h.calibration:  # the probability the SR states is the calibrated one
                    probabilities[h.name] = h.calibration.apply(probabilities[h.name])
    with clock(Stage.POSTPROCESS):
        src = series.volume
        back = np.argsort(axes)  # the model's plane back to the canonical axes
        labels = {k: labels_to_source(v.transpose(back), canonical, src) for k, v in labels.items()}
        conf = {k: labels_to_source(v.transpose(back), canonical, src) for k, v in conf.items()}
    notes = [] if is_axis_aligned(src) else ["oblique acquisition resampled to an axial grid for inference"]
    to_cache = SeriesFeatures(*(np.concatenate(kept[k]) for k in KEPT)) if kept and n else None
    return Prediction(labels, conf, probabilities, plane.model_spacing, notes, to_cache)


def predict_volume(
    series: SeriesVolume,
    model: ModelSpec,
    runtime: Runtime,
    clock: Stopwatch,
    progress: Callable[[int], None] | None = None,
) -> Prediction:
    """A 3D model: each head a network slid over the volume in the network's own axes
    (:mod:`node.model.sliding_window`); its labels go back to the source grid as the 2D path's."""
    with clock(Stage.PREPROCESS):
        canonical = to_canonical(series.volume)
    labels, conf = {}, {}
    for h in runtime.slice_heads:
        spec, intensity = model.volume_of(h)
        with clock(Stage.PREPROCESS):
            # the network's (Z, Y, X) array: highdicom names each numpy axis by where it points (S is H, I is F)
            oriented = canonical.to_patient_orientation("".join(_TOWARDS[a] for a in reversed(spec.axes)))
        net = partial(runtime.run_network, h)
        seg = segment(oriented.array, tuple(oriented.spacing), spec, intensity, net, clock, f"head_{h.name}")
        with clock(Stage.POSTPROCESS):
            labels[h.name] = labels_to_source(seg.labels, oriented, series.volume)
            conf[h.name] = labels_to_source(seg.confidence, oriented, series.volume)
    if progress:
        progress(series.volume.shape[0])
    notes = (
        []
        if is_axis_aligned(series.volume)
        else ["oblique acquisition resampled to an axial grid for inference"]
    )
    finest = min(min(model.volume_of(h)[0].spacing[1:]) for h in runtime.slice_heads)
    return Prediction(labels, conf, {}, float(finest), notes)


_TOWARDS = {"L": "L", "R": "R", "A": "A", "P": "P", "S": "H", "I": "F"}


def slice_feature(head: HeadSpec, features: dict[str, np.ndarray]) -> np.ndarray:
    """(N, F) the feature ``head`` reads of each slice of a batch: the CLS token, or the CLS token and
    the mean patch token side by side (as transformers' ``Dinov2ForImageClassification``)."""
    cls = np.asarray(features["cls"], np.float64)
    if head.reads == "cls":
        return cls
    return np.concatenate([cls, np.asarray(features["tokens"], np.float64).mean(axis=1)], axis=1)
