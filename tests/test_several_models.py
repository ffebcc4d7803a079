"""Several models per series: each with its routing rules, the volume built once, one SEG and one SR
naming the model of every result, and a model that fails never losing the others' results.

The second and third models are real model folders: the reference model's graphs under another
name, with fewer heads or other modalities (what a department's second model would change).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from orthanc_fixture import Node, Pacs, free_port, orthanc_missing, wait_for
from pydicom import dcmread
from pydicom.dataset import Dataset

from node.config import ConfigError, parse_config
from node.errors import InputError
from node.ingest.series import find_series
from node.ingest.volume import load_volume
from node.model.manifest import MODELS_DIR, load_model
from node.model.select import select_runtime
from node.pipeline import Engine, Pipeline
from node.service.routing import header_tags, rule_matches
from node.synthetic.dicom import Patient, write_axial_series, write_variant
from node.synthetic.phantom import Phantom

SHAPE = (24, 112, 112)


def model_copy(root: Path, name: str, heads: list[str], modalities: list[str]) -> Path:
    """The reference model's graphs as another model: ``heads`` of it, for ``modalities``."""
    src, dst = MODELS_DIR / "phantom-fm", root / name
    dst.mkdir(parents=True)
    for graph in src.glob("*.onnx"):
        (dst / graph.name).symlink_to(graph)
    spec = yaml.safe_load((src / "model.yaml").read_text())
    spec.update(name=name, modalities=modalities, heads=[h for h in spec["heads"] if h["name"] in heads])
    (dst / "model.yaml").write_text(yaml.safe_dump(spec))
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "chest-triage": model_copy(root, "chest-triage", ["lesion_presence"], ["CT"]),
        "mr-organs": model_copy(root, "mr-organs", ["organs"], ["MR"]),
    }


def engine(name_or_path) -> Engine:
    model = load_model(name_or_path)
    return Engine(model, select_runtime(model, "onnxruntime")[0])


def series_of(root: Path, modality: str = "CT", seed: int = 7):
    src = root / f"{modality}-{seed}"
    write_variant(
        Phantom.random(seed, n_lesions=2), src, "axial", modality, seed=seed, shape=SHAPE,
        pixel_spacing=3.4, slice_spacing=6.0,
    )  # fmt: skip
    found, errors = find_series([src])
    assert not errors and len(found) == 1
    return found[0]


def algorithms(ds: Dataset) -> list[str]:
    """Every Algorithm Name in a document's content tree (the SR's measurement groups)."""
    names = []
    for item in ds.get("ContentSequence", []):
        if item.ConceptNameCodeSequence[0].CodeValue == "111001":  # Algorithm Name
            names.append(str(item.TextValue))
        names += algorithms(item)
    return names


def dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        return []
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]


# --- config and routing ------------------------------------------------------------------------
def test_models_config_lists_models_with_their_rules():
    cfg = parse_config(
        {
            "runtime": "onnxruntime",
            "models": [
                {"model": "phantom-fm"},
                {"model": "/models/chest", "runtime": "auto", "routing": [{"modalities": ["CT"]}]},
            ],
        }
    )
    routes = cfg.model_routes
    assert [(r.model, r.runtime) for r in routes] == [("phantom-fm", "onnxruntime"), ("/models/chest", "auto")]
    assert [r.modalities for r in cfg.all_rules] == [["CT", "MR"], ["CT"]]
    # the single-model form is the same thing with one model
    one = parse_config({"model": "m", "routing": [{"modalities": ["MR"]}]}).model_routes
    assert [(r.model, r.routing[0].modalities) for r in one] == [("m", ["MR"])]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": "a", "models": [{"model": "b"}]}, "models: give either models or model and routing"),
        ({"models": [{"model": "b"}, {"model": "b"}]}, "models: 'b' listed twice"),
        ({"models": [{"model": "b", "rules": []}]}, "models[0].rules: unknown key"),
    ],
)
def test_models_config_errors_say_which_key(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(data)


def test_rules_read_a_header_as_orthanc_gives_it_to_the_plugin():
    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined = "CHEST"
    tags = header_tags(ds, ["ImageType", "BodyPartExamined", "SeriesDescription"])
    assert tags == {"ImageType": "ORIGINAL\\PRIMARY\\AXIAL", "BodyPartExamined": "CHEST", "SeriesDescription": ""}
    chest = {"modalities": ["CT"], "tags": {"BodyPartExamined": "chest|thorax"}}
    assert rule_matches(chest, tags, "CT", 100)
    assert not rule_matches(chest, tags, "MR", 100)
    assert not rule_matches({**chest, "exclude_tags": {"ImageType": r".*\\AXIAL"}}, tags, "CT", 100)
    assert not rule_matches({**chest, "min_instances": 101}, tags, "CT", 100)


# --- the pipeline ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return series_of(tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def alone(ct, tmp_path_factory):
    """The reference model on its own: what it finds must not change when others run beside it."""
    return Pipeline.of([engine("phantom-fm")]).process(ct, tmp_path_factory.mktemp("alone"))


def test_several_models_give_one_seg_and_one_sr_naming_each_result_s_model(ct, alone, folders, tmp_path):
    # mr-organs is routed a CT by mistake: it fails, with why, and the others' results are kept
    pipeline = Pipeline.of([engine("phantom-fm"), engine(folders["chest-triage"]), engine(folders["mr-organs"])])
    result = pipeline.process(ct, tmp_path)
    assert [(m.model, m.error) for m in result.models] == [
        ("phantom-fm 2.5.0", None),
        ("chest-triage 2.5.0", None),
        ("mr-organs 2.5.0", "it takes MR, not CT"),
    ]
    files = {w.kind.value: w.path for w in result.outputs}
    assert sorted(files) == ["gsps", "outlines", "pmap", "seg", "sr"]
    for kind, path in files.items():
        assert dciodvfy_errors(path) == [], kind

    # the SEG: the reference model's segments exactly as alone, each naming the model that made it
    seg, seg_alone = dcmread(files["seg"]), dcmread(alone.outputs[0].path)
    described = [
        (s.SegmentLabel, s.SegmentAlgorithmName, s.TrackingUID) for s in seg.SegmentSequence
    ]
    assert described == [
        (s.SegmentLabel, "phantom-fm", s.TrackingUID) for s in seg_alone.SegmentSequence
    ]
    assert seg.PixelData == seg_alone.PixelData

    # the SR: every model's findings, each group naming its model; the failure said
    sr = dcmread(files["sr"])
    names = algorithms(sr)
    assert {"phantom-fm", "chest-triage"} <= set(names)
    c = result.findings.classifications
    assert [(x.head, x.model.name) for x in c] == [("lesion_presence", "phantom-fm"), ("lesion_presence", "chest-triage")]
    assert c[0].probability == c[1].probability  # the same head on the same volume
    comments = [str(i.TextValue) for i in _items(sr) if i.get("ValueType") == "TEXT"]
    assert any("model mr-organs 2.5.0 failed: it takes MR, not CT" in t for t in comments)
    # what the node concludes from all of them (urgency) names them together
    assert set(names) == {"phantom-fm", "chest-triage", "phantom-fm+chest-triage"}
    if shutil.which("dsrdump"):
        dump = subprocess.run(["dsrdump", str(files["sr"])], capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0 and "chest-triage" in dump.stdout


def _items(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def test_a_series_fails_only_when_every_model_fails(ct, folders, tmp_path):
    mr = engine(folders["mr-organs"])
    with pytest.raises(InputError, match="it takes MR, not CT"):  # the first model's error
        Pipeline.of([mr, mr]).process(ct, tmp_path, volume=load_volume(ct))
    with pytest.raises(InputError, match="modality CT is not accepted"):  # none takes CT: not even read
        Pipeline.of([mr, mr]).process(ct, tmp_path)
    assert not any(tmp_path.iterdir()), "nothing written"


# --- the node ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(bool(orthanc_missing()), reason=orthanc_missing() or "ok")
def test_node_routes_each_series_to_its_models(folders, pacs: Pacs, tmp_path):
    n = Node(
        tmp_path / "node",
        {
            "ae_title": "PACSNODE",
            "dicom_port": free_port(),
            "http_port": free_port(),
            "metrics_port": free_port(),
            "data_dir": str(tmp_path / "node" / "data"),
            "stable_age_s": 2,
            "runtime": "onnxruntime",
            "models": [
                {"model": "phantom-fm"},
                {"model": str(folders["chest-triage"]), "routing": [{"modalities": ["CT"]}]},
                # sent CTs by mistake: it fails on them, the others' results go out
                {"model": str(folders["mr-organs"]), "routing": [{"modalities": ["CT", "MR"]}]},
            ],
            "destinations": [
                {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.port, "ae_title": "PACS"}
            ],
            "priors": {"enabled": False},
            "worker": {"lease_s": 4, "heartbeat_s": 1, "poll_s": 0.2},
        },
    )
    n.start()
    try:
        sent = {}
        for seed, modality in ((31, "CT"), (32, "MR")):
            s = write_axial_series(
                Phantom.random(seed, n_lesions=1), tmp_path / f"{modality}", modality=modality,
                shape=(16, 96, 96), pixel_spacing=4.0, slice_spacing=10.0, seed=seed,
                patient=Patient(name=f"SECRET^NAME{seed}", id=f"SECRETID{seed}", accession=f"ACC{seed}"),
            )  # fmt: skip
            n.store_scu(s.files)
            sent[modality] = s
        ct_job = n.wait_job(sent["CT"].series_uid, ("done",))
        mr_job = n.wait_job(sent["MR"].series_uid, ("done",))
        assert [(m["model"], m["error"]) for m in ct_job["models"]] == [
            ("phantom-fm 2.5.0", None),
            ("chest-triage 2.5.0", None),
            ("mr-organs 2.5.0", "it takes MR, not CT"),
        ]
        assert ct_job["error"] == "model mr-organs 2.5.0 failed: it takes MR, not CT"
        assert ("model_failed", "mr-organs 2.5.0: it takes MR, not CT") in [
            (h["event"], h["detail"]) for h in ct_job["history"]
        ]
        assert [(m["model"], m["error"]) for m in mr_job["models"]] == [
            ("phantom-fm 2.5.0", None),
            ("mr-organs 2.5.0", None),
        ]
        assert mr_job["error"] is None
        # one SEG and one SR per series at the PACS, the CT's SR naming both models that ran on it
        for modality, models in (("CT", ["phantom-fm", "chest-triage"]), ("MR", ["phantom-fm", "mr-organs"])):
            got = wait_for(lambda m=modality: _at(pacs, sent[m].study_uid), 30, f"{modality} outputs")
            assert sorted(got) == ["gsps", "seg", "sr"], modality
            assert set(algorithms(dcmread(got["sr"]))) == {*models, "+".join(models)}, modality
        listed = {j["id"]: j for j in n.jobs()}
        assert listed[ct_job["id"]]["models"] == ct_job["models"]
        _, metrics = n.get("/metrics")
        for model, outcome, count in (
            ("phantom-fm 2.5.0", "ran", 2), ("chest-triage 2.5.0", "ran", 1),
            ("mr-organs 2.5.0", "failed", 1), ("mr-organs 2.5.0", "ran", 1),
        ):  # fmt: skip
            assert f'pacs_node_model_runs_total{{model="{model}",outcome="{outcome}"}} {count}.0' in metrics
        assert 'pacs_node_model_info{device="cpu",model="chest-triage",precision="fp32"' in metrics
        assert "SECRET" not in n.log.read_text()
    finally:
        assert n.stop() == 0


def _at(pacs: Pacs, study_uid: str) -> dict[str, Path] | None:
    kinds = {"1.2.840.10008.5.1.4.1.1.66.4": "seg", "1.2.840.10008.5.1.4.1.1.88.34": "sr", "1.2.840.10008.5.1.4.1.1.11.1": "gsps"}
    got = {kinds[r.sop_class]: r.path for r in pacs.of_study(study_uid, "PACS") if r.sop_class in kinds}
    return got if len(got) == 3 else None


def test_cli_runs_several_models_and_says_which_failed(ct, folders, tmp_path):
    import sys

    def run(*models: str) -> subprocess.CompletedProcess:
        args = [a for m in models for a in ("--model", m)]
        return subprocess.run(
            [sys.executable, "-m", "node.cli", "run", str(ct.files[0].parent), "--out", str(tmp_path / "out"),
             "--no-progress", *args],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    ok = run("phantom-fm", str(folders["chest-triage"]))
    assert ok.returncode == 0, ok.stderr
    assert "model phantom-fm 2.5.0" in ok.stdout and "model chest-triage 2.5.0" in ok.stdout
    assert sorted(p.name for p in (tmp_path / "out" / ct.series_uid).iterdir()) == [
        "gsps.dcm", "outlines.dcm", "pmap.dcm", "seg.dcm", "sr.dcm",
    ]  # fmt: skip
    partial = run("phantom-fm", str(folders["mr-organs"]))
    assert partial.returncode == 3, partial.stderr  # some of the work failed: the others' is written
    assert partial.stderr.strip() == f"error: series {ct.series_uid}: model mr-organs 2.5.0 failed: it takes MR, not CT"
    assert "Traceback" not in partial.stderr
