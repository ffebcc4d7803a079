"""``pacs-node bench --suite seg``: the node's SEG encoder against highdicom's ``Segmentation``
constructor, on the same segments of the same CT, in the same run.

TotalSegmentator-like content: ``n`` non-overlapping structures (ellipsoids of organ sizes) on a
CT phantom, so highdicom gets them in its fastest input form (a label map, one array for all
segments) and the node gets its own (one bounding box per segment). Each side is timed from
segments to the bytes of the file (constructor, then ``save_as``): medians of ``repeat`` runs.
"""

from __future__ import annotations

import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import highdicom as hd
import numpy as np
from scipy import ndimage


def label_map(shape: tuple[int, int, int], n: int, seed: int = 0) -> np.ndarray:
    """``n`` ellipsoids of 3 to 20 % of the field in each direction, later ones over earlier ones."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8 if n < 256 else np.uint16)
    dims = np.asarray(shape, float)
    for k in range(1, n + 1):
        c, r = rng.uniform(0.1 * dims, 0.9 * dims), rng.uniform(0.03 * dims, 0.2 * dims)
        box = tuple(
            slice(max(int(ci - ri), 0), min(int(ci + ri) + 1, d))
            for ci, ri, d in zip(c, r, shape, strict=True)
        )
        grid = np.ogrid[box]
        inside = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r, strict=True)) <= 1
        labels[box][inside] = k
    return labels


def _seconds(fn, repeat: int) -> tuple[float, int, int]:
    """Median seconds of ``fn`` (returning a dataset) to bytes; its frames and file size."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ds = fn()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), int(ds.NumberOfFrames), buf.tell()


def bench_seg(slices: int, size: int, counts: list[int], repeat: int, output: Path | None) -> int:
    from node.analysis.findings import BoxMask, Concept, Findings, ModelRef, Segment
    from node.ingest.series import find_series
    from node.ingest.volume import load_volume
    from node.synthetic.dicom import write_axial_series
    from node.synthetic.phantom import Phantom
    from node.writers.seg import write_seg

    organ = Concept("123037004", "SCT", "Anatomical Structure")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pacs-node-bench-") as tmp:
        write_axial_series(
            Phantom.random(5, n_lesions=0), Path(tmp), shape=(slices, size, size),
            pixel_spacing=400.0 / size, slice_spacing=1.25,
        )  # fmt: skip
        series = load_volume(find_series([Path(tmp)])[0][0])
        sources = [f.dataset for f in series.frames]
        for n in counts:
            labels = label_map(series.volume.spatial_shape, n)
            boxes = ndimage.find_objects(labels)
            segments = [
                Segment(
                    k, f"Structure {k}", "organ", organ, organ, BoxMask(labels.shape, box, labels[box] == k)
                )
                for k, box in enumerate(boxes, start=1)
                if box is not None
            ]
            for i, s in enumerate(segments, start=1):
                s.number = i
            findings = Findings(series, ModelRef("bench", "1"), segments)
            ours = write_seg(findings)
            kept = np.zeros_like(labels)  # the same segments, renumbered as the node numbers them
            for s in segments:
                kept[s.mask.box][s.mask.crop] = s.number

            def theirs(ours=ours, kept=kept):
                return hd.seg.Segmentation(
                    source_images=sources, pixel_array=kept,
                    segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                    segment_descriptions=ours.SegmentSequence, series_instance_uid=hd.UID(), series_number=99,
                    sop_instance_uid=hd.UID(), instance_number=1, manufacturer="pacs-node",
                    manufacturer_model_name="bench", software_versions="1", device_serial_number="1",
                    omit_empty_frames=True,
                )  # fmt: skip

            node_s, frames, node_bytes = _seconds(lambda findings=findings: write_seg(findings), repeat)
            hd_s, hd_frames, hd_bytes = _seconds(theirs, repeat)
            if frames != hd_frames:
                raise RuntimeError(f"{n} segments: the node wrote {frames} frames, highdicom {hd_frames}")
            rows.append(
                {
                    "segments": len(segments),
                    "frames": frames,
                    "mb": round(node_bytes / 1e6, 1),
                    "node_seconds_median": round(node_s, 2),
                    "highdicom_seconds_median": round(hd_s, 2),
                    "speedup": round(hd_s / node_s, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    report = {
        "series": f"{size}x{size}x{slices} CT phantom",
        "highdicom": hd.__version__,
        "repeat": repeat,
        "timed": "segments to file bytes: constructor + save_as",
        "results": rows,
    }
    if output:
        Path(output).write_text(json.dumps(report, indent=2))
    return 0
