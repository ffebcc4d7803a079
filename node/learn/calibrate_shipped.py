"""Calibrate a shipped model's lesion-presence head on fresh phantoms whose truth is known, in place.

The series are :func:`node.tools.evaluate.held_out_case`'s (CT and MR, a third without lesions, some
acquired obliquely) on seeds that neither training nor the card's evaluation used, run through the
product's own inference path on ONNX Runtime's CPU provider. The truth of a series is whether a lesion
is in its voxels (a lesion between the slices is not in the series), as the evaluation counts it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

from node.errors import InputError, ModelError
from node.learn.calibration import CalibrationReport, fit, reliability_png
from node.model.calibration import Calibration
from node.model.inference import predict
from node.model.manifest import ModelSpec, load_model
from node.model.runtimes.onnxruntime import OnnxRuntime
from node.timing import Stopwatch
from node.tools.evaluate import held_out_case

log = logging.getLogger(__name__)

LESION = "52988006"  # SCT Lesion: the finding a phantom's truth says something about
FOLDS = 5


def calibrate_head(
    model_dir: Path,
    head: str,
    n_series: int = 40,
    seed: int = 9000,
    kind: Literal["temperature", "isotonic"] = "temperature",
) -> CalibrationReport:
    """Fit ``head``'s calibration on ``n_series`` phantoms (seeds ``seed`` ...), write it into the folder's
    ``model.yaml`` (that head's ``calibration:`` key only) and ``calibration_<head>.png`` beside it.
    Where it would not lower the cross-fitted ECE, the head's own probabilities are better stated:
    no calibration is written, and one written before is taken away (``report.improves``)."""
    model_dir = Path(model_dir)
    model = load_model(model_dir)
    spec = next((h for h in model.heads if h.name == head), None)
    if spec is None or spec.kind != "classification":
        heads = ", ".join(h.name for h in model.heads if h.kind == "classification") or "none"
        raise ModelError(
            f"model {model.name}: no classification head {head!r} (classification heads: {heads})"
        )
    if spec.classes or spec.finding.value != LESION:
        raise ModelError(f"head {head}: phantoms only know lesion presence, so only a one-output lesion head")
    if kind not in ("temperature", "isotonic"):  # checked before minutes of inference, as is the count
        raise InputError(f"unknown calibration {kind!r} (temperature or isotonic)")
    if n_series < FOLDS:
        raise InputError(
            f"{n_series} series: calibration needs at least {FOLDS} ({FOLDS}-fold cross-fitting)"
        )
    raw, truth = raw_probabilities(model, head, n_series, seed)
    report = fit(raw, truth, kind=kind, folds=FOLDS, seed=seed)
    calibration = report.calibration if report.improves else None
    write_calibration(model_dir / "model.yaml", head, calibration)
    source = model_dir / "source" / f"head_{head}" / "config.json"
    if source.exists():  # the head as trained: the importer carries its calibration into model.yaml again
        config = json.loads(source.read_text())
        config.pop("calibration", None)
        if calibration is not None:
            config["calibration"] = calibration.model_dump(exclude_defaults=True)
        source.write_text(json.dumps(config, indent=2) + "\n")
    title = (
        f"{model.name} {model.version}, {head}: {kind} calibration\n"
        f"{report.n} held-out phantom series ({int(truth.sum())} with a lesion), {FOLDS}-fold cross-fitted"
    )
    reliability_png(model_dir / f"calibration_{head}.png", raw, report.held_out, truth, title)
    return report


def raw_probabilities(model: ModelSpec, head: str, n_series: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The head's uncalibrated series probability and the truth (a lesion in the series) per phantom."""
    spec = next(h for h in model.heads if h.name == head)
    # that head alone (the others' work is not needed) with any calibration it has taken off
    alone = model.model_copy(update={"heads": (spec.model_copy(update={"calibration": None}),)})
    runtime = OnnxRuntime(alone, cuda=False)
    raw, truth = [], []
    for k in range(n_series):
        series, _, sampled = held_out_case(k, seed)
        raw.append(float(predict(series, alone, runtime, Stopwatch()).probabilities[head][0]))
        truth.append(int(sampled.lesion.any()))
        log.info(
            "series %d/%d (%s): raw %.4f, lesion %s", k + 1, n_series, series.modality, raw[-1], truth[-1]
        )
    return np.asarray(raw), np.asarray(truth)


def write_calibration(manifest: Path, head: str, calibration: Calibration | None) -> None:
    """Set ``head``'s ``calibration:`` in ``manifest`` (None: take it away), the rest of the file kept
    byte for byte (comments too) when its layout is block style; otherwise the whole file is
    rewritten from its parsed content."""
    text = manifest.read_text()
    data = yaml.safe_load(text)
    entry = None if calibration is None else calibration.model_dump(mode="json", exclude_defaults=True)
    for h in data["heads"]:
        if h["name"] == head:
            h.pop("calibration", None)
            if entry is not None:
                h["calibration"] = entry
    ModelSpec(**data, path=manifest.parent)  # never write a manifest that would not load
    new = _edited(text, head, "" if entry is None else yaml.safe_dump({"calibration": entry}, sort_keys=False))
    if new is None or yaml.safe_load(new) != data:
        comments = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
        new = comments + yaml.safe_dump(data, sort_keys=False)
    tmp = manifest.with_name(manifest.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(manifest)


def _edited(text: str, head: str, block: str) -> str | None:
    """``text`` with the head's list item's ``calibration:`` key replaced by (or ended with) ``block``;
    None where the head's item is not found as ``- name: <head>``."""
    lines = text.splitlines(keepends=True)
    item = re.compile(rf"^(\s*)- name: ['\"]?{re.escape(head)}['\"]?\s*$")
    start = next((i for i, line in enumerate(lines) if item.match(line)), None)
    if start is None:
        return None
    indent = len(item.match(lines[start]).group(1)) + 2  # the item's keys

    def depth(line: str) -> int:
        return len(line) - len(line.lstrip(" ")) if line.strip() else 1 << 30  # blank lines belong inside

    end = next((i for i in range(start + 1, len(lines)) if depth(lines[i]) < indent), len(lines))
    while end > start + 1 and not lines[end - 1].strip():  # trailing blank lines stay after the item
        end -= 1
    body = lines[start + 1 : end]
    key = next((i for i, line in enumerate(body) if line.startswith(" " * indent + "calibration:")), None)
    if key is not None:  # the old key and its nested lines go
        stop = next((i for i in range(key + 1, len(body)) if depth(body[i]) <= indent), len(body))
        body = body[:key] + body[stop:]
    if body and not body[-1].endswith("\n"):
        body[-1] += "\n"
    added = [" " * indent + line + "\n" for line in block.splitlines()]
    return "".join(lines[: start + 1] + body + added + lines[end:])
