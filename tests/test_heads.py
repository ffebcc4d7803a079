"""Learned heads without a running node: the feature cache, head versions (activate, shadow,
rollback) and what load_model makes of them, and a classification head trained, calibrated and
judged. ``tests/test_learning.py`` does the whole way through a running node."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from node.errors import ModelError
from node.learn.examples import Example
from node.model import head_versions
from node.model.feature_cache import FeatureCache, SeriesFeatures
from node.model.manifest import MODELS_DIR, load_model

SERIES_UID = "1.2.826.0.1.3680043.8.498.424242"


def features(n: int = 4, seed: int = 0, signal: float = 0.0) -> SeriesFeatures:
    rng = np.random.default_rng(seed)
    cls = rng.normal(size=(n, 96)).astype(np.float16)
    cls[:, 0] += signal
    return SeriesFeatures(
        rng.normal(size=(n, 256, 96)).astype(np.float16), cls, rng.normal(size=(n, 1, 128, 128)).astype(np.float16)
    )


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    out = tmp_path / "phantom-fm"
    shutil.copytree(MODELS_DIR / "phantom-fm", out, ignore=shutil.ignore_patterns("*.pt2", "source"))
    return out


def test_feature_cache_round_trip_names_no_uid_and_evicts_least_recently_used(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "features", max_bytes=10**9)
    f = features()
    path = cache.put("phantom-fm", "2.0.0", SERIES_UID, f)
    assert SERIES_UID not in path.name and "phantom" not in path.name  # a hash, nothing readable
    with np.load(path) as z:  # numpy alone reads it back
        assert z["tokens"].dtype == np.float16 and z["tokens"].shape == (4, 256, 96)
    got = cache.get("phantom-fm", "2.0.0", SERIES_UID)
    assert got is not None and np.array_equal(got.cls, f.cls)
    assert cache.get("phantom-fm", "2.0.1", SERIES_UID) is None  # another backbone: other features
    assert not list((tmp_path / "features").glob(".partial-*"))  # written atomically

    full = FeatureCache(tmp_path / "full", max_bytes=10**9, disk_percent=0.0)  # any disk is "above" 0 %
    assert full.put("m", "1", "1.2.9", f) is None and not list((tmp_path / "full").iterdir())

    small = FeatureCache(tmp_path / "small", max_bytes=int(path.stat().st_size * 3.5))
    paths = [small.put("m", "1", f"1.2.{i}", f) for i in range(3)]
    os.utime(paths[0], (1, 1))  # the oldest use
    os.utime(paths[1], (2, 2))
    small.get("m", "1", "1.2.0")  # read: now the most recent
    small.put("m", "1", "1.2.3", f)
    assert small.get("m", "1", "1.2.1") is None and small.get("m", "1", "1.2.0") is not None


def test_head_versions_activate_shadow_rollback(model_dir: Path) -> None:
    for v in ("1", "2"):
        folder = model_dir / "heads" / "organs2" / v
        folder.mkdir(parents=True)
        shutil.copy(model_dir / "head_organs.onnx", folder / "head.onnx")
        entry = next(h for h in load_model(MODELS_DIR / "phantom-fm").heads if h.name == "organs")
        (folder / "head.yaml").write_text(
            json.dumps({**entry.model_dump(mode="json", exclude_defaults=True), "name": "organs2", "graph": "head.onnx"})
        )
    assert head_versions.next_version(model_dir, "organs2") == "3"
    assert load_model(model_dir).version == "2.5.0"  # nothing active yet
    head_versions.activate(model_dir, "organs2", "1")
    model = load_model(model_dir)
    assert model.version == "2.5.0+organs2.1" and model.base_version == "2.5.0"
    (learned,) = [h for h in model.heads if h.version]
    assert (learned.name, learned.version, learned.graph) == ("organs2", "1", "heads/organs2/1/head.onnx")

    head_versions.shadow(model_dir, "organs2", "2")
    shadow = [h for h in load_model(model_dir).heads if h.shadow]
    assert [(h.name, h.version) for h in shadow] == [("organs2.shadow", "2")]
    with pytest.raises(ModelError, match="active one"):
        head_versions.shadow(model_dir, "organs2", "1")

    head_versions.activate(model_dir, "organs2", "2")  # the shadow becomes the active version
    s = head_versions.read_state(model_dir)["organs2"]
    assert (s.active, s.shadow, s.history) == ("2", None, ("1", "2"))
    assert head_versions.rollback(model_dir, "organs2").active == "1"
    assert head_versions.rollback(model_dir, "organs2").active is None
    assert load_model(model_dir).version == "2.5.0"
    with pytest.raises(ModelError, match="no active version"):
        head_versions.rollback(model_dir, "organs2")
    with pytest.raises(ModelError, match=r"no version 9 .*versions: 1, 2"):
        head_versions.activate(model_dir, "organs2", "9")


def test_a_learned_head_may_not_take_a_shipped_heads_name(model_dir: Path) -> None:
    folder = model_dir / "heads" / "organs" / "1"
    folder.mkdir(parents=True)
    shutil.copy(model_dir / "head_organs.onnx", folder / "head.onnx")
    (folder / "head.yaml").write_text("name: organs\nkind: segmentation\ngraph: head.onnx\ninputs: [tokens, image]\n")
    head_versions.write_state(model_dir, {"organs": head_versions.HeadState("1", None, ("1",))})
    with pytest.raises(ModelError, match="shipped head's name"):
        load_model(model_dir)


def test_a_classification_head_is_trained_calibrated_and_judged(model_dir: Path) -> None:
    """On features whose first CLS dimension carries the finding (the backbone is not what is tested
    here): cross-validated quality, a calibration that lowers ECE below a bound, the reliability
    diagram in the card, and the gate's metrics on a golden set."""
    pytest.importorskip("torch")
    from node.learn.head_gate import gate
    from node.learn.train import TrainConfig, train_classification_head

    def examples(n: int, seed: int) -> list[Example]:
        rng = np.random.default_rng(seed)
        out = []
        for i in range(n):
            y = int(rng.random() < 0.5)
            signal = rng.normal(1.2 if y else -1.2, 1.0)  # overlapping classes: a probe can be over-confident
            out.append(Example(f"s{seed}-{i}", features(3, seed * 1000 + i, signal), np.array(y, np.uint8)))
        return out

    trained = train_classification_head(
        load_model(model_dir), "finding", "Finding present", "SCT:404684003", examples(400, 1), TrainConfig(steps=400, folds=5)
    )
    cv = json.loads((trained.folder / "metrics.json").read_text())["cross_validated"]
    assert cv["auc"] >= 0.75, cv
    assert cv["ece_after"] < cv["ece_before"] and cv["ece_after"] <= 0.1, cv
    assert (trained.folder / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reliability.png" in (trained.folder / "card.md").read_text()

    head_versions.activate(model_dir, "finding", trained.version)
    model = load_model(model_dir)
    (head,) = [h for h in model.heads if h.name == "finding"]
    assert head.reads == "cls" and head.calibration is not None and head.calibration.temperature != 1.0

    verdict = gate(model, "finding", trained.version, examples(40, 2), 0.02, {"auc": 0.7})
    assert set(verdict.metrics) == {"auc", "accuracy", "sensitivity"} and verdict.metrics["auc"] >= 0.75


def test_a_head_told_perfectly_on_few_series_keeps_its_own_probabilities(model_dir: Path) -> None:
    """Twelve series the probe tells apart: Platt's targets (6/7 sure with six of a class) would soften
    what it says, which raises the cross-fitted ECE, so no calibration is written and the card says so."""
    pytest.importorskip("torch")
    import yaml

    from node.learn.train import TrainConfig, train_classification_head

    examples = [
        Example(f"s{i}", features(3, 500 + i, 20.0 if i % 2 else -20.0), np.array(i % 2, np.uint8)) for i in range(12)
    ]
    trained = train_classification_head(
        load_model(model_dir), "clear", "Clear finding", "SCT:404684003", examples, TrainConfig(steps=200, folds=3)
    )
    cv = json.loads((trained.folder / "metrics.json").read_text())["cross_validated"]
    assert cv["auc"] == 1.0 and cv["ece_after"] >= cv["ece_before"], cv
    assert "calibration" not in yaml.safe_load((trained.folder / "head.yaml").read_text())
    assert "not applied: it would not lower the ECE" in (trained.folder / "card.md").read_text()
