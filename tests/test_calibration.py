"""Calibration of classification heads: the fits, the error they are measured by, and the shipped model's."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from node.errors import InputError, ModelError
from node.learn.calibrate_shipped import calibrate_head, write_calibration
from node.learn.calibration import ece, fit, fit_isotonic, fit_temperature, reliability_png
from node.model.calibration import Calibration
from node.model.manifest import MODELS_DIR, HeadSpec, ModelSpec, load_model

N = 4000
# 4000 series: a perfectly calibrated map still shows ECE ~0.02 from bin noise (15 bins of ~270), so
# 0.05 is met by a fit that works and missed by one that does not (the raw ECE is ~0.16)
BOUND = 0.05


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def overconfident():
    """Labels drawn from a true P(positive); the raw output is that probability 3 times too sharp."""
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.5, N)
    labels = (rng.random(N) < sigmoid(z)).astype(int)
    return sigmoid(3 * z), labels


@pytest.fixture(scope="module")
def overconfident_classes():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 1.5, (N, 4))
    labels = np.array([rng.choice(4, p=p) for p in softmax(logits)])
    return softmax(2.5 * logits), labels


def test_temperature_recovers_a_known_temperature(overconfident):
    raw, labels = overconfident
    assert fit_temperature(raw, labels) == pytest.approx(3.0, rel=0.1)
    report = fit(raw, labels, kind="temperature")
    assert report.ece_before > 0.1, "the synthetic head must be miscalibrated for the test to mean anything"
    assert report.ece_after < BOUND and report.ece_after < report.ece_before
    assert report.n == N and report.calibration.ece_after == report.ece_after
    assert report.calibration.temperature == pytest.approx(3.0, rel=0.1)


def test_isotonic_calibrates_with_a_compact_monotone_map(overconfident):
    raw, labels = overconfident
    report = fit(raw, labels, kind="isotonic")
    assert report.ece_after < BOUND and report.ece_after < report.ece_before
    x, y = report.calibration.x, report.calibration.y
    assert x[0] == 0 and x[-1] == 1 and len(x) < N / 20
    assert np.all(np.diff(x) > 0) and np.all(np.diff(y) >= 0)
    # the knots are the pooled blocks' frequencies: the map at p is close to the true P(positive)
    grid = np.linspace(0.05, 0.95, 10)
    truth = sigmoid(np.log(grid / (1 - grid)) / 3)
    assert np.abs(np.interp(grid, x, y) - truth).max() < 0.1


def test_pool_adjacent_violators_on_a_small_case():
    # Platt's targets: the three positives count 4/5, the one negative 1/3. 0.1 and 0.2 violate the
    # order (positive then negative): one block, 0.15 -> (4/5 + 1/3) / 2; 0.3 and 0.4 are both positive:
    # one block too (equal neighbours pool, so the knots' y rise strictly); the ends are held flat
    x, y = fit_isotonic([0.4, 0.2, 0.3, 0.1], [1, 0, 1, 1])
    assert x == (0.0, 0.15, 0.35, 1.0)
    assert y == (0.566667, 0.566667, 0.8, 0.8)


def test_a_sample_told_perfectly_is_not_calibrated_to_certainty():
    # ten series the head tells right: with 0/1 targets the temperature would run to its bound (every
    # answer 0 or 1) and isotonic's ends would be 0 and 1; Platt's targets are 1/7 and 6/7 here
    p, y = [0.04, 0.1, 0.2, 0.3, 0.45, 0.84, 0.9, 0.95, 0.99, 0.999], [0] * 5 + [1] * 5
    t = fit_temperature(p, y)
    assert 1 < t < 10, t  # softened: 0.999 is surer than six in seven
    assert fit_isotonic(p, y)[1] == (0.142857, 0.142857, 0.857143, 0.857143)
    for kind in ("temperature", "isotonic"):
        cal = fit(p, y, kind=kind).calibration
        assert cal.apply(np.array([0.001]))[0] > 0.01 and cal.apply(np.array([0.999]))[0] < 0.99, kind


def test_the_maps_keep_the_order_and_temperature_the_winner(overconfident, overconfident_classes):
    raw, labels = overconfident
    grid = np.linspace(0, 1, 501)
    for kind in ("temperature", "isotonic"):
        cal = fit(raw, labels, kind=kind).calibration
        mapped = np.array([cal.apply(np.array([p]))[0] for p in grid])
        assert np.all(np.diff(mapped) >= 0), kind
    t = fit(raw, labels).calibration
    assert t.temperature != 1
    assert all((t.apply(np.array([p]))[0] >= 0.5) == (p >= 0.5) for p in grid)
    probs, labels = overconfident_classes
    t = fit(probs, labels).calibration
    assert all(t.apply(p).argmax() == p.argmax() for p in probs[:500])


def test_multiclass_temperature(overconfident_classes):
    probs, labels = overconfident_classes
    assert fit_temperature(probs, labels) == pytest.approx(2.5, rel=0.1)
    report = fit(probs, labels)
    assert report.ece_before > 0.1 and report.ece_after < BOUND
    calibrated = report.calibration.apply(probs[0])
    assert calibrated.shape == (4,) and calibrated.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="isotonic calibration is for a one-output head"):
        fit(probs, labels, kind="isotonic")


def test_ece_of_known_cases():
    assert ece([0.0, 1.0, 0.0, 1.0], [0, 1, 0, 1]) == 0.0
    assert ece([0.9] * 10, [1] * 5 + [0] * 5) == pytest.approx(0.4)
    assert ece([[0.8, 0.2], [0.3, 0.7]], [0, 0]) == pytest.approx((0.2 + 0.7) / 2)


def test_calibration_round_trips_through_the_manifest(overconfident):
    raw, labels = overconfident
    for kind in ("temperature", "isotonic"):
        cal = fit(raw, labels, kind=kind).calibration
        entry = yaml.safe_load(yaml.safe_dump(cal.model_dump(mode="json", exclude_defaults=True)))
        head = HeadSpec(
            name="presence",
            kind="classification",
            graph="h.onnx",
            inputs=("tokens",),
            finding={"value": "52988006", "meaning": "Lesion"},
            positive={"value": "52101004", "meaning": "Present"},
            negative={"value": "2667000", "meaning": "Absent"},
            calibration=entry,
        )
        assert head.calibration == cal
        assert head.calibration.apply(np.array([0.97]))[0] == cal.apply(np.array([0.97]))[0] != 0.97


def test_write_calibration_adds_one_key_and_keeps_the_rest(tmp_path):
    # the shipped manifest with no calibration, its classification head between the two others
    data = yaml.safe_load((MODELS_DIR / "phantom-fm" / "model.yaml").read_text())
    heads = {h["name"]: h for h in data["heads"]}
    heads["lesion_presence"].pop("calibration", None)
    data["heads"] = [heads["organs"], heads["lesion_presence"], heads["lesions"]]
    original = "# a comment that must stay\n" + yaml.safe_dump(data, sort_keys=False)
    manifest = tmp_path / "model.yaml"
    manifest.write_text(original)
    write_calibration(manifest, "lesion_presence", Calibration(kind="temperature", temperature=2.0, ece_before=0.2))
    block = "  calibration:\n    kind: temperature\n    temperature: 2.0\n    ece_before: 0.2\n"
    assert manifest.read_text() == original.replace("- name: lesions\n", block + "- name: lesions\n")
    # a second calibration replaces the first: still the original plus one key
    isotonic = Calibration(kind="isotonic", x=(0, 0.5, 1), y=(0.1, 0.4, 0.9))
    write_calibration(manifest, "lesion_presence", isotonic)
    text = manifest.read_text()
    assert text.count("calibration:") == 1 and text.startswith("# a comment that must stay\n")
    spec = ModelSpec(**yaml.safe_load(text), path=tmp_path)
    assert {h.name: h.calibration for h in spec.heads} == {"organs": None, "lesion_presence": isotonic, "lesions": None}
    block = yaml.safe_dump({"calibration": isotonic.model_dump(mode="json", exclude_defaults=True)}, sort_keys=False)
    indented = "".join("  " + line + "\n" for line in block.splitlines())
    assert text == original.replace("- name: lesions\n", indented + "- name: lesions\n")
    # taken away (a calibration that would not lower the ECE, or a retrained head's): the original again
    write_calibration(manifest, "lesion_presence", None)
    assert manifest.read_text() == original


def test_reliability_diagram_is_a_png(tmp_path, overconfident):
    raw, labels = overconfident
    report = fit(raw, labels)
    path = reliability_png(tmp_path / "r.png", raw, report.held_out, labels, "synthetic head")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with Image.open(path) as im:
        assert im.size == (550, 550)


@pytest.mark.parametrize(
    ("probs", "labels", "message"),
    [
        ([0.1, 0.2, 0.3], [0, 1], "3 probabilities but 2 labels"),
        ([0.1, 0.2], [0, 2], "labels must be 0 or 1"),
        ([0.1, 0.2], [0, 0.5], "labels must be 0 or 1"),
        ([0.1, 1.2], [0, 1], r"probabilities must lie in \[0, 1\]"),
        ([[0.5, 0.5], [0.2, 0.8]], [0, 3], r"labels must be class indices 0..1"),
    ],
)
def test_bad_input_is_one_clear_line(probs, labels, message):
    for call in (fit_temperature, ece, fit):
        with pytest.raises(ValueError, match=message) as e:
            call(probs, labels)
        assert "\n" not in str(e.value)


def test_fit_needs_both_outcomes_and_enough_series():
    with pytest.raises(ValueError, match="both outcomes"):
        fit([0.2, 0.9, 0.7, 0.4, 0.5], [1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="at least 5 series, got 3"):
        fit([0.2, 0.9, 0.7], [0, 1, 1])


@pytest.mark.slow  # runs the reference model on 36 phantom series (~70 s on 2 cores)
def test_shipped_head_calibrates_on_phantoms(tmp_path):
    copy = tmp_path / "phantom-fm"
    shutil.copytree(MODELS_DIR / "phantom-fm", copy, ignore=shutil.ignore_patterns("source", "*.pt2", "*.png"))
    before = yaml.safe_load((copy / "model.yaml").read_text())
    assert load_model(copy).heads[2].calibration is not None  # the committed isotonic map
    with pytest.raises(ModelError, match="no classification head 'organs'"):
        calibrate_head(copy, "organs", n_series=1)
    with pytest.raises(InputError, match="3 series: calibration needs at least 5"):
        calibrate_head(copy, "lesion_presence", n_series=3)

    # The series are fixed by their seeds, so the figures are too. Seeds 9000-9015: the head tells every
    # one right (raw 0.04-0.45 without a lesion, 0.84-1 with one; ECE 0.132). Platt's targets (1/7 and
    # 11/12 here) soften it (measured T 2.95), which raises the cross-fitted ECE (0.288): not written,
    # and the map written before is taken away.
    report = calibrate_head(copy, "lesion_presence", n_series=16)
    assert not report.improves and report.calibration.temperature > 1, report
    assert load_model(copy).heads[2].calibration is None
    # On 20 series from seed 9100 isotonic lowers the ECE (measured 0.158 -> 0.142) and is written; on
    # most samples this small it does not (five of six seeds tried), so calibrate on 80 or more.
    # The margin of 0.01 leaves room for floating-point differences between machines.
    report = calibrate_head(copy, "lesion_presence", n_series=20, seed=9100, kind="isotonic")
    assert report.ece_after < report.ece_before - 0.01, report
    assert load_model(copy).heads[2].calibration == report.calibration
    assert report.calibration.y[0] > 0 and report.calibration.y[-1] < 1  # never certain (Platt's targets)
    png = copy / "calibration_lesion_presence.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    after = yaml.safe_load((copy / "model.yaml").read_text())
    for manifest in (before, after):  # nothing else changed
        next(h for h in manifest["heads"] if h["name"] == "lesion_presence").pop("calibration", None)
    assert after == before
