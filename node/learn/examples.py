"""Label sets -> training examples: each labelled series' backbone features (from the feature cache,
computed once if missing) and its label in the model's plane, on the same pixels as the features.

A label set's SEG and series are read from the node's Orthanc, where the radiologist's viewer sent
them; the SEG's frames are placed on the series' slices by their referenced SOP Instance UIDs, the
mask then takes the image's own way into the model's plane (canonical stack, the model's resize).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.errors import InputError
from node.identity import LabelKind
from node.ingest.series import find_series
from node.ingest.volume import SeriesVolume, load_volume
from node.model.feature_cache import KEPT, FeatureCache, SeriesFeatures
from node.model.inference import predict
from node.model.manifest import ModelSpec
from node.model.preprocess import PLANES, plane_map, to_canonical
from node.model.runtimes import Runtime
from node.service.orthanc import OrthancClient, OrthancError
from node.service.queue.labels import LabelSet
from node.timing import Stopwatch

log = logging.getLogger(__name__)


def hashed(series_uid: str) -> str:
    """How a card names a series it was trained or judged on: no UID leaves the node."""
    return hashlib.sha256(series_uid.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Example:
    series: str  # hashed series UID
    features: SeriesFeatures
    # segmentation: (N, S, S) uint8, 1 inside the labelled structure in the model's plane;
    # classification: 0-d, 1 where the series shows the finding
    target: np.ndarray
    modality: str = ""  # where read (a segmentation's series always is): cross-validation folds keep kinds apart


def features_of(
    volume: SeriesVolume, model: ModelSpec, runtime: Runtime, cache: FeatureCache | None
) -> SeriesFeatures:
    """The series' features from the cache, or the backbone run once and the result kept."""
    found = cache.get(model.name, model.base_version, volume.series_uid) if cache else None
    if found is not None:
        return found
    runtime.keep(*KEPT, max_bytes=runtime.keep_bytes)  # the worker's own runtime keeps its bound
    features = predict(volume, model, runtime, Stopwatch()).features
    if features is None:
        raise InputError(f"model {model.name}: runtime {runtime.name} does not return the backbone's tokens")
    if cache:
        cache.put(model.name, model.base_version, volume.series_uid, features)
    return features


def to_model_plane(volume: SeriesVolume, model: ModelSpec, mask: np.ndarray) -> np.ndarray:
    """A mask on the source grid -> (N, S, S) uint8 in the model's plane, as the image gets there."""
    canonical = to_canonical(volume.volume.with_array(mask.astype(np.float32)))
    axes = PLANES[model.input.orientation]
    stack = canonical.array.transpose(axes)
    spacing = np.asarray(canonical.spacing)[list(axes)]
    plane = plane_map(stack.shape[1:], tuple(spacing[1:]), model.input)
    return (plane.to_model(stack, 0.0) > 0.5).astype(np.uint8)


def seg_mask(seg_path: Path, volume: SeriesVolume, label: str) -> np.ndarray:
    """The segment labelled ``label`` (case-insensitive) of a SEG, on the series' grid (bool)."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    numbers = [
        int(s.SegmentNumber)
        for s in seg.SegmentSequence
        if str(s.SegmentLabel).strip().lower() == label.lower()
    ]
    if not numbers:
        raise InputError(f"its SEG has no segment labelled {label}")
    uids = [f.dataset.SOPInstanceUID if f else None for f in volume.frames]
    present = [u for u in uids if u]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=present,
        segment_numbers=numbers,
        combine_segments=True,
        skip_overlap_checks=True,
    )
    by_uid = dict(zip(present, pixels, strict=True))
    shape = volume.volume.shape[1:]
    return np.stack([by_uid[u] > 0 if u else np.zeros(shape, bool) for u in uids])


def from_node(
    orthanc: OrthancClient,
    label_sets: Iterable[LabelSet],
    label: str,
    model: ModelSpec,
    runtime: Runtime,
    cache: FeatureCache | None,
    kind: LabelKind = LabelKind.SEGMENTATION,
) -> list[Example]:
    """Examples from the node's label sets, their series (and SEGs) read from Orthanc where the cache
    lacks them. Segmentation: one per label set with a segment ``label``. Classification: one per
    series with a classification label set, positive (1) where one of its labels is ``label``. A
    label set that cannot be used is named (hashed) with why, and left out."""
    wanted = label.lower()
    if kind is LabelKind.CLASSIFICATION:
        positive: dict[str, bool] = {}
        for ls in label_sets:
            if ls.kind is LabelKind.CLASSIFICATION:
                hit = any(x.name.lower() == wanted for x in ls.labels)
                positive[ls.series_uid] = positive.get(ls.series_uid, False) or hit
        chosen = [(uid, None, np.array(int(hit), np.uint8)) for uid, hit in positive.items()]
    else:  # one example per series, from its newest label set of the structure (a corrected SEG replaces)
        newest = {
            ls.series_uid: ls
            for ls in sorted(label_sets, key=lambda s: s.id)
            if ls.kind is LabelKind.SEGMENTATION and any(x.name.lower() == wanted for x in ls.labels)
        }
        chosen = [(uid, ls, None) for uid, ls in newest.items()]
    out = []
    for uid, ls, target in chosen:
        try:
            out.append(_example(orthanc, uid, ls, target, label, model, runtime, cache))
        except (InputError, OrthancError, OSError, ValueError) as e:  # named by its hash, no UID in the log
            log.warning("series %s: left out: %s", hashed(uid), str(e).replace(uid, hashed(uid)))
    return out


def _example(
    orthanc, series_uid: str, ls: LabelSet | None, target, label: str, model, runtime, cache
) -> Example:
    """A segmentation label set (``ls``: its SEG read) or a classification ``target`` on one series."""
    cached = cache.get(model.name, model.base_version, series_uid) if cache else None
    if ls is None and cached is not None:  # a classification needs only the features
        return Example(hashed(series_uid), cached, target)
    with tempfile.TemporaryDirectory(prefix="pacs-node-labels-") as tmp:
        tmp = Path(tmp)
        orthanc.fetch_series(_lookup(orthanc, series_uid, "Series"), tmp / "series")
        found, errors = find_series([tmp / "series"])
        if len(found) != 1:
            raise InputError(errors[0] if errors else f"{len(found)} series where one was expected")
        volume = load_volume(found[0], model.modalities, model_name=model.name)
        if ls is not None:
            seg_path = tmp / "seg.dcm"
            seg_path.write_bytes(orthanc.instance_file(_lookup(orthanc, ls.source, "Instance")))
            target = to_model_plane(volume, model, seg_mask(seg_path, volume, label))
        features = cached or features_of(volume, model, runtime, cache)
        return Example(hashed(series_uid), features, target, volume.modality)


def _lookup(orthanc: OrthancClient, uid: str, level: str) -> str:
    found = orthanc.lookup(uid, level)
    if found is None:
        raise InputError(f"{level.lower()} no longer in Orthanc")
    return found
