"""The node learns a structure it was never taught, from its radiologists' SEGs, with the real parts:
Orthanc + plugin + worker, storescu as the viewer that sends the corrections, the ``pacs-node heads``
commands, and a pynetdicom PACS that receives what the node sends.

The structure is the phantom's aorta (``Phantom.random(aorta=True)``), which phantom-fm does not
segment. SEGs of it (3D Slicer's manufacturer) become label sets; ``heads train`` makes a head on the
frozen backbone from the features the worker kept; the gate judges it on the golden set; once active,
the next series comes back with an Aorta segment named by the head's version. A version trained on a
careless reader's labels is refused and can run in shadow; rollback restores the outputs exactly;
no other head's output changes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from orthanc_fixture import Node, Pacs, free_port, orthanc_missing, wait_for
from phantoms import aorta_drawn_in_slicer
from pydicom import dcmread

from node.ingest.series import find_series
from node.model.manifest import MODELS_DIR, load_model
from node.model.runtimes.onnxruntime import OnnxRuntime
from node.pipeline import Pipeline
from node.synthetic.dicom import Patient, WrittenSeries, write_axial_series
from node.synthetic.phantom import AORTA, Phantom

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(orthanc_missing()), reason=orthanc_missing() or "ok")]
pytest.importorskip("torch")

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
TRAIN_SEEDS = (150, 151, 152, 153, 154, 155)
GOLDEN_SEEDS = (156, 157)
MIN_DICE = 0.7  # on a fresh phantom, on the source grid: what the learned head must reach


def aorta_series(tmp: Path, seed: int, modality: str = "CT") -> WrittenSeries:
    return write_axial_series(
        Phantom.random(seed, n_lesions=1, aorta=True),
        tmp / f"{modality}-{seed}",
        modality=modality,
        shape=(24, 96, 96),
        pixel_spacing=round(380.0 / 96, 3),
        slice_spacing=10.0,
        seed=seed,
        patient=Patient(name=f"AORTA^{seed}", id=f"AORTA{seed}", accession=f"ACC{seed}"),
    )


def drawn_aorta(series: WrittenSeries, out: Path, shift: int = 0) -> Path:
    """The aorta as a radiologist draws it in 3D Slicer; ``shift`` pixels off (a careless reader)."""
    return aorta_drawn_in_slicer(series.files, np.roll(series.truth.tissue == AORTA, shift, axis=1), out)


def segment_masks(seg_path: Path, series: WrittenSeries) -> dict[str, tuple[np.ndarray, str, str]]:
    """Each segment of a SEG: its mask in the series' file order, its algorithm's name and version."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    uids = [dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in series.files]
    out = {}
    for s in seg.SegmentSequence:
        pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[int(s.SegmentNumber)])[..., 0]
        algo = (
            s.SegmentationAlgorithmIdentificationSequence[0]
            if "SegmentationAlgorithmIdentificationSequence" in s
            else None
        )
        out[str(s.SegmentLabel)] = (
            pixels > 0,
            str(s.get("SegmentAlgorithmName", "")),
            str(algo.AlgorithmVersion) if algo else "",
        )
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def sample(text: str, name: str, label: str) -> float:
    """The value of a metric's sample for head aorta with ``label`` (0 if absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and 'head="aorta"' in line and label in line:
            return float(line.split()[-1])
    return 0.0


def heads(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "node.cli", "heads", *args], capture_output=True, text=True, timeout=900
    )
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


@dataclass
class Department:
    node: Node
    pacs: Pacs
    model: Path
    config: Path
    tmp: Path
    train: list[WrittenSeries]

    def send_and_wait(self, series: WrittenSeries, sent: bool = False) -> dict[str, Path]:
        if not sent:
            self.node.store_scu(series.files)
        self.node.wait_job(series.series_uid, ("done",), timeout=180)

        def outputs():
            got = {r.sop_class: r.path for r in self.pacs.of_study(series.study_uid)}
            return got if len(got) == 3 else None

        return wait_for(outputs, 90, "SEG, SR and GSPS at the PACS")

    def offline(self, series: WrittenSeries):
        """The model folder as it is now, run on the series in this process (what the worker runs)."""
        model = load_model(self.model)
        (source,), _ = find_series(series.files)
        return Pipeline(model, OnnxRuntime(model)).process(source, self.tmp / f"offline-{model.version}")


@pytest.fixture(scope="module")
def department(tmp_path_factory, pacs: Pacs) -> Department:
    tmp = tmp_path_factory.mktemp("learning")
    model = tmp / "phantom-fm"
    shutil.copytree(MODELS_DIR / "phantom-fm", model, ignore=shutil.ignore_patterns("*.pt2", "source"))
    train = [aorta_series(tmp, s, "MR" if s % 3 == 0 else "CT") for s in TRAIN_SEEDS]
    golden = [aorta_series(tmp, s) for s in GOLDEN_SEEDS]
    config = {
        "ae_title": "PACSNODE", "dicom_port": free_port(), "http_port": free_port(), "metrics_port": free_port(),
        "data_dir": str(tmp / "data"), "stable_age_s": 2, "model": str(model),
        "worker": {"lease_s": 120, "heartbeat_s": 1, "poll_s": 0.2},
        "delivery": {"backoff_s": 0.5, "backoff_max_s": 2}, "priors": {"enabled": False},
        "destinations": [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.port, "ae_title": "PACS"}],
        "learning": {"golden": [str(g.series_uid) for g in golden], "min_dice": 0.6, "tolerance": 0.02},
    }  # fmt: skip
    node = Node(tmp / "node", config)
    node.start()
    dept = Department(node, pacs, model, node.folder / "node.yaml", tmp, train)
    for s in train + golden:  # all sent first: the worker runs one while the next settles
        node.store_scu(s.files)
    for s in train + golden:
        dept.send_and_wait(s, sent=True)
    for i, s in enumerate(train + golden):
        node.store_scu([drawn_aorta(s, tmp / f"aorta-{i}.dcm")], calling_ae="SLICER")
    wait_for(
        lambda: len(node.client.get_json("/inference/labels")) >= len(train + golden), 60, "the label sets"
    )
    yield dept
    node.stop()


def test_a_structure_learned_from_corrected_segs_is_gated_activated_and_delivered(
    department: Department,
) -> None:
    d = department
    before = d.offline(aorta_series(d.tmp, 160))  # no learned head yet
    assert not any(s.label == "Aorta" for s in before.findings.segments)

    out = heads("train", "aorta", "--model", str(d.model), "--config", str(d.config), "--label", "Aorta",
                "--code", "SCT:15825003", "--folds", "2").stdout  # fmt: skip
    assert "version 1" in out
    version = d.model / "heads" / "aorta" / "1"
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["cross_validated"]["dice"] >= 0.6, metrics
    assert len(metrics["training"]["series"]) == len(TRAIN_SEEDS)  # the golden series never trained on
    assert not any(uid in (version / "metrics.json").read_text() for uid in (s.series_uid for s in d.train))
    assert "(active)" not in heads("status", "--model", str(d.model)).stdout  # trained is not live

    verdict = heads("activate", "aorta", "1", "--model", str(d.model), "--config", str(d.config)).stdout
    assert "passes the gate" in verdict and "dice Aorta" in verdict
    assert "1 (active)" in heads("status", "--model", str(d.model)).stdout

    fresh = aorta_series(d.tmp, 161)
    got = d.send_and_wait(fresh)
    segments = segment_masks(got[SEG_CLASS], fresh)
    mask, name, version_named = segments["Aorta"]
    assert (name, version_named) == ("phantom-fm aorta", "1")
    assert dice(mask, fresh.truth.tissue == AORTA) >= MIN_DICE
    assert "Liver" in segments  # the shipped heads are still there
    sr = dcmread(next(p for c, p in got.items() if c == "1.2.840.10008.5.1.4.1.1.88.34"))
    assert "phantom-fm aorta" in str(sr.ContentSequence)


def test_activating_or_rolling_back_a_head_changes_no_other_heads_output(department: Department) -> None:
    d = department
    series = aorta_series(d.tmp, 162)
    with_head = d.offline(series)
    client = d.node.client  # Orthanc's REST API, as an administrator's script would use it
    (listed,) = client.get_json("/inference/heads")
    assert listed["model"] == "phantom-fm" and [(h["name"], h["active"]) for h in listed["heads"]] == [
        ("aorta", "1")
    ]
    assert client.post_json("/inference/heads/aorta/rollback", {})["ok"]
    without = d.offline(series)
    answer = client.post_json("/inference/heads/aorta/activate", {"version": "1"})
    assert answer["ok"] and "passes the gate" in answer["message"], answer
    again = d.offline(series)

    def masks(result):
        return {s.label: np.asarray(s.mask) for s in result.findings.segments}

    a, b, c = masks(with_head), masks(without), masks(again)
    assert "Aorta" in a and "Aorta" not in b
    for label in b:  # forgetting: every other head's output bit-identical
        assert np.array_equal(a[label], b[label]), label
    assert a.keys() == c.keys() and all(np.array_equal(a[k], c[k]) for k in a)  # rollback and back: exact
    uid = {r.kind: r.sop_uid for r in with_head.outputs}
    assert uid == {r.kind: r.sop_uid for r in again.outputs}  # the same version: the same objects
    assert uid != {r.kind: r.sop_uid for r in without.outputs}  # another version: other objects


def test_a_worse_version_is_refused_by_the_gate_and_runs_in_shadow_unsent(department: Department) -> None:
    d = department
    for i, s in enumerate(d.train):  # a careless reader: every aorta 12 pixels off
        d.node.store_scu([drawn_aorta(s, d.tmp / f"careless-{i}.dcm", shift=12)], calling_ae="RESIDENT")
    wait_for(
        lambda: sum(x["sender"] == "RESIDENT" for x in d.node.client.get_json("/inference/labels")) == len(d.train),
        60, "the careless label sets",
    )  # fmt: skip
    # a third of the default steps: a head trained on wrong labels needs no more to be refused
    heads("train", "aorta", "--model", str(d.model), "--config", str(d.config), "--label", "Aorta",
          "--sender", "RESIDENT", "--folds", "0", "--steps", "100")  # fmt: skip
    refused = heads("activate", "aorta", "2", "--model", str(d.model), "--config", str(d.config), check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert (
        "refused by the gate" in refused.stdout and "dice Aorta" in refused.stdout and "by " in refused.stdout
    )
    assert "1 (active)" in heads("status", "--model", str(d.model)).stdout

    heads("shadow", "aorta", "2", "--model", str(d.model))
    fresh = aorta_series(d.tmp, 163)
    got = d.send_and_wait(fresh)
    segments = segment_masks(got[SEG_CLASS], fresh)
    assert [k for k in segments if k.startswith("Aorta")] == ["Aorta"]
    assert segments["Aorta"][2] == "1"  # the active version's, the shadow's never sent
    _, text = d.node.get("/metrics")
    assert sample(text, "pacs_node_shadow_agreement_count", 'head="aorta"') >= 1, text[-2000:]

    # a radiologist's label arriving later: both versions are judged on it, counted, nothing sent
    d.node.store_scu([drawn_aorta(fresh, d.tmp / "later.dcm")], calling_ae="SLICER")

    def judged():  # both versions' scores (the worker records one after the other)
        text = d.node.get("/metrics")[1]
        done = all(sample(text, "pacs_node_shadow_label_dice_count", f'role="{r}"') >= 1 for r in ("shadow", "active"))
        return text if done else None

    text = wait_for(judged, 60, "the shadow judged on the new label")
    mean = {
        role: sample(text, "pacs_node_shadow_label_dice_sum", f'role="{role}"')
        / sample(text, "pacs_node_shadow_label_dice_count", f'role="{role}"')
        for role in ("shadow", "active")
    }
    assert mean["active"] >= MIN_DICE > mean["shadow"], mean
    assert len(d.pacs.of_study(fresh.study_uid)) == 3  # still only the first SEG, SR and GSPS
    heads("shadow", "aorta", "--model", str(d.model))
    assert "(shadow)" not in heads("status", "--model", str(d.model)).stdout
