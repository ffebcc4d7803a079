"""Make a model's drift reference (``drift.json``) by running it on fresh phantom series.

The reference stands for the series the node is expected to see. For the phantom models that is the
node's own phantom protocol (``pacs-node phantom``: a 400 x 400 x 300 mm field of view on the
abdomen, CT noise 12 HU, MR noise 2 % at gain 1) with a site's usual spread around it (CT noise 9 to
15 HU, MR noise 1.5 to 2.5 %, MR gain 0.8 to 1.25, the table +-10 mm), sampled coarsely (30 x 128 x 128:
the field of view, so organ volumes in ml are the demo's, in a few seconds a series). Not the training
distribution: training augments the MR gain over 0.3 to 4, a range no scanner drifts across, which would
hide the shift the watch is for. A model for patients takes its reference from the site's commissioning
series instead (:func:`node.analysis.drift.reference_from` over their signals).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from node.analysis.drift import SeriesSignals, reference_from, series_signals
from node.errors import ModelError
from node.ingest.series import find_series
from node.model.manifest import ModelSpec, load_model
from node.model.select import select_runtime
from node.pipeline import Pipeline
from node.synthetic.dicom import Patient, write_grid
from node.synthetic.phantom import Phantom, axial_affine

SHAPE = (30, 128, 128)  # slices, rows, columns
FOV_MM = (300.0, 400.0)  # along z, in-plane


def phantom_series(
    out: Path,
    k: int,
    modality: str,
    seed: int = 7000,
    *,
    mr_gain: float | None = None,
    noise: float | None = None,
) -> Path:
    """The ``k``-th reference series of ``modality`` as DICOM in ``out``; ``mr_gain`` and ``noise``
    (HU for CT, % for MR) replace the protocol's, for a shifted series."""
    rng = np.random.default_rng([seed, k])
    sigma = float(rng.uniform(9, 15) if modality == "CT" else rng.uniform(1.5, 2.5))
    gain = float(rng.uniform(0.8, 1.25))
    z_center = -20.0 + float(rng.uniform(-10, 10))
    affine = axial_affine(SHAPE, FOV_MM[1] / SHAPE[1], FOV_MM[0] / SHAPE[0], z_center)
    truth = Phantom.random(seed + k).sample(
        affine,
        SHAPE,
        modality,
        noise=sigma if noise is None else noise,
        seed=seed + k,
        mr_gain=gain if mr_gain is None else mr_gain,
    )
    patient = Patient(name=f"PHANTOM^{modality}", id=f"PH{seed + k:05d}")
    write_grid(truth, affine, out, modality=modality, seed=seed + k, patient=patient)
    return Path(out)


def series_signals_of(pipeline: Pipeline, folder: Path, out: Path) -> SeriesSignals:
    """The signals of the one series in ``folder``, run through ``pipeline``'s model as the worker runs it."""
    series, errors = find_series([folder])
    if errors:
        raise errors[0]
    result = pipeline.process(series[0], out)
    return series_signals(result.findings, pipeline.model)


def make_reference(model_dir: Path, n_series: int = 24, seed: int = 7000) -> Path:
    """Run the model in ``model_dir`` on ``n_series`` phantom series (CT and MR in turn, of those it
    takes) and write their reference into ``model_dir/drift.json``; returns its path."""
    model: ModelSpec = load_model(model_dir)
    takes = [m for m in ("CT", "MR") if m in {t.upper() for t in model.modalities}]
    if not takes:
        raise ModelError(f"model {model.name}: takes {', '.join(model.modalities)}; phantoms are CT or MR")
    runtime, _ = select_runtime(model, "auto")
    pipeline = Pipeline(model, runtime)
    signals = []
    with tempfile.TemporaryDirectory(prefix="pacs-node-drift-") as tmp:
        root = Path(tmp)
        for k in range(n_series):
            src = phantom_series(root / f"in-{k}", k, takes[k % len(takes)], seed)
            signals.append(series_signals_of(pipeline, src, root / f"out-{k}"))
    return reference_from(signals, f"{model.name} {model.version}").save(model.path)
