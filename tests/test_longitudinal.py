"""Priors and lesion tracking: RECIST-like categories, matching under a rigid motion, tracking UIDs
kept across time points, registration of a prior in another frame of reference (SimpleITK), and
`pacs-node run CURRENT --prior PRIOR` end to end."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from phantoms import confident_lesion_ct

from node.analysis.change import TimePoint, TrackedLesion, classify
from node.analysis.findings import Concept, Findings, ModelRef, Segment
from node.analysis.longitudinal import compare, time_point, track
from node.analysis.measure import measure
from node.synthetic.dicom import Patient, axial_affine, write_axial_series, write_grid
from node.synthetic.phantom import Lesion, Phantom

ORGAN = Concept("123037004", "SCT", "Anatomical Structure")
LIVER = Concept("10200004", "SCT", "Liver")
ALTERED = Concept("49755003", "SCT", "Morphologically Altered Structure")
LESION = Concept("52988006", "SCT", "Lesion")


@pytest.mark.parametrize(
    "before, now, status",
    [
        (10.0, 12.0, "stable"),  # +20 % but only +2 mm
        (20.0, 25.0, "increased"),  # +25 % and +5 mm
        (30.0, 34.0, "stable"),  # +4 mm, +13 %
        (10.0, 14.0, "stable"),  # +40 % but only +4 mm: the +5 mm rule
        (10.0, 15.0, "increased"),  # +50 % and +5 mm
        (20.0, 14.0, "decreased"),  # -30 %
        (20.0, 15.0, "stable"),  # -25 %
    ],
)
def test_recist_like_thresholds(before, now, status):
    assert classify(before, now) == status


def rigid(deg: float, shift) -> np.ndarray:
    a = np.deg2rad(deg)
    m = np.eye(4)
    m[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    m[:3, 3] = shift
    return m


def point(uid, label, xyz, d):
    return TrackedLesion(uid, label, np.asarray(xyz, float), d, d**3 / 2000)


def test_matching_under_motion_gives_each_category_and_keeps_the_uid():
    prior = TimePoint(
        "prior",
        "for-1",
        datetime(2025, 1, 10),
        [
            point("uid-stable", "Lesion 1", (-40, 0, 10), 16),
            point("uid-grown", "Lesion 2", (0, 0, 10), 12),
            point("uid-gone", "Lesion 3", (40, 0, 10), 14),
            point("uid-shrunk", "Lesion 4", (0, 40, -30), 20),
        ],
    )
    motion = rigid(8, (12, -20, 30))  # the patient lies elsewhere in the later exam's frame
    moved = lambda xyz: (motion @ np.append(xyz, 1))[:3]  # noqa: E731
    current = TimePoint(
        "current",
        "for-2",
        datetime(2025, 4, 10),
        [
            point("c-1", "Lesion 1", moved((-40, 1, 10)), 17),
            point("c-2", "Lesion 2", moved((1, 0, 11)), 18),
            point("c-3", "Lesion 3", moved((0, -45, 40)), 9),
            point("c-4", "Lesion 4", moved((0, 40, -30)), 12),
        ],
    )
    comp = compare(prior, current, motion, "test")
    by_uid = {c.tracking_uid: c.status for c in comp.changes}
    assert by_uid == {
        "uid-stable": "stable",
        "uid-grown": "increased",
        "uid-gone": "resolved",
        "uid-shrunk": "decreased",
        "c-3": "new",
    }
    assert comp.interval_days == 90 and comp.new == 1
    assert comp.overall == "progression"  # a new lesion
    tags = {c.tracking_uid: c.tag() for c in comp.changes}
    assert tags["c-3"] == "NEW" and tags["uid-grown"] == "+50%" and tags["uid-gone"] == "GONE"
    # without the motion the same lesions do not line up: the transform is what matches them
    wrong = compare(prior, current, np.eye(4), "test")
    assert {c.status for c in wrong.changes} <= {"new", "resolved"}


def test_three_time_points_keep_one_uid():
    t = [datetime(2025, 1, 1), datetime(2025, 3, 1), datetime(2025, 6, 1)]
    one = TimePoint("s1", "f", t[0], [point("uid-a", "Lesion 1", (0, 0, 0), 10)])
    two_raw = TimePoint("s2", "f", t[1], [point("s2-a", "Lesion 1", (2, 0, 0), 13)])
    c12 = compare(one, two_raw, np.eye(4), "same frame of reference")
    two = dataclasses.replace(
        two_raw, lesions=[dataclasses.replace(two_raw.lesions[0], tracking_uid=c12.changes[0].tracking_uid)]
    )
    three = TimePoint("s3", "f", t[2], [point("s3-a", "Lesion 1", (3, 1, 0), 19)])
    c23 = compare(two, three, np.eye(4), "same frame of reference")
    assert [c.tracking_uid for c in c12.changes] == ["uid-a"]
    assert [(c.tracking_uid, c.status) for c in c23.changes] == [("uid-a", "increased")]


# -- registration and the CLI, on phantoms ------------------------------------------------------


def lesion_in(phantom: Phantom, host: int, offset, radius: float) -> Lesion:
    centre = np.asarray(next(e.center for k, e in phantom.organs if k == host)) + np.asarray(offset)
    return Lesion(tuple(float(v) for v in centre), radius, host, 100.0, 1400.0)


def test_registration_recovers_a_prior_in_another_frame_of_reference(tmp_path: Path):
    from node.analysis.registration import register_rigid
    from node.ingest.series import find_series
    from node.ingest.volume import load_volume
    from node.synthetic.dicom import axial_affine

    ph = Phantom.random(5, n_lesions=0)
    shape = (60, 160, 160)
    a = axial_affine(shape, 2.5, 5.0, -20.0)
    truth = ph.sample(a, shape, "CT", noise=12.0, seed=1)
    motion = rigid(7, (15, -25, 40))  # where the same anatomy sits in the prior exam's frame
    write_grid(truth, a, tmp_path / "cur", patient=Patient(study_uid="1.2.3.9.1"))
    write_grid(truth, motion @ a, tmp_path / "pri", patient=Patient(study_uid="1.2.3.9.2"))
    cur = load_volume(find_series([tmp_path / "cur"])[0][0]).volume
    pri = load_volume(find_series([tmp_path / "pri"])[0][0]).volume
    assert cur.frame_of_reference_uid != pri.frame_of_reference_uid
    prior_to_current, _ = register_rigid(pri, cur, "CT")
    # points across the body, given in the prior's frame, must land where they are now
    pts = np.array([[x, y, z] for x in (-80, 0, 80) for y in (-40, 40) for z in (-80, 0, 60)], float)
    in_prior = (motion @ np.c_[pts, np.ones(len(pts))].T).T
    back = (prior_to_current @ in_prior.T).T[:, :3]
    assert np.abs(back - pts).max() < 3.0, np.abs(back - pts).max()


def test_run_with_a_prior_tracks_lesions_and_labels_the_change(tmp_path: Path):
    """End to end with the reference model: every current lesion carries a change tag in the GSPS,
    lesions matched to the prior share its SEG Tracking UIDs, and all outputs pass dciodvfy."""
    ph = Phantom.random(5, n_lesions=0)
    big = lesion_in(ph, 1, (-30, 0, 0), 9.0)
    prior = dataclasses.replace(ph, lesions=(big,))
    current = dataclasses.replace(ph, lesions=(dataclasses.replace(big, radius_mm=13.0),))
    for name, p, date in (("prior", prior, "20250601"), ("current", current, "20251201")):
        write_axial_series(
            p,
            tmp_path / name,
            modality="MR",
            shape=(80, 256, 256),
            pixel_spacing=1.5,
            slice_spacing=3.0,
            patient=Patient(study_date=date, study_uid=f"1.2.3.8.{date}"),
            seed=3,
        )
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.cli",
            "run",
            str(tmp_path / "current"),
            "--prior",
            str(tmp_path / "prior"),
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    by_date = {}
    for d in out.iterdir():
        seg = pydicom.dcmread(d / "seg.dcm")
        by_date[seg.StudyDate] = d
    assert set(by_date) == {"20250601", "20251201"}

    def lesion_uids(d):
        seg = pydicom.dcmread(d / "seg.dcm")
        return {str(s.TrackingUID) for s in seg.SegmentSequence if str(s.SegmentLabel).startswith("Lesion")}

    before, now = lesion_uids(by_date["20250601"]), lesion_uids(by_date["20251201"])
    assert before and now and before & now  # the grown lesion at least is the same lesion
    labels = [
        str(t.UnformattedTextValue)
        for a in pydicom.dcmread(by_date["20251201"] / "gsps.dcm").GraphicAnnotationSequence
        for t in a.get("TextObjectSequence", [])
    ]
    assert labels and all(
        lbl.endswith(("NEW", "stable")) or lbl.split()[-1].endswith("%") for lbl in labels
    ), labels
    text = subprocess.run(
        ["dsrdump", "+Pl", str(by_date["20251201"] / "sr.dcm")], capture_output=True, text=True
    ).stdout
    assert "compared with prior series" in text and "rigid registration" in text
    for d in by_date.values():
        for kind in ("seg", "sr", "gsps"):
            v = subprocess.run(["dciodvfy", str(d / f"{kind}.dcm")], capture_output=True, text=True)
            assert not [ln for ln in v.stderr.splitlines() if ln.startswith("Error")], (kind, v.stderr)


def _truth_findings(series_dir: Path, truth, phantom: Phantom) -> Findings:
    """Findings from the phantom's ground truth (not the model): the liver, and lesion k is truth
    label k, each placed in its organ as the pipeline does."""
    from node.analysis.postprocess import locate
    from node.ingest.series import find_series
    from node.ingest.volume import load_volume

    sv = load_volume(find_series([series_dir])[0][0])
    assert np.array_equal(sv.volume.array, truth.image)  # masks below are on the loaded grid
    segments = [Segment(1, "Liver", "organ", ORGAN, LIVER, truth.tissue == 1, probability=0.95)]
    segments += [
        Segment(k + 1, f"Lesion {k}", "lesion", ALTERED, LESION, truth.lesion == k, probability=0.9)
        for k in range(1, len(phantom.lesions) + 1)
    ]
    for s in segments:
        measure(s, sv)
    locate(segments)
    return Findings(sv, ModelRef("phantom-fm", "1.0.0"), segments)


def _coded_groups(sr) -> dict[str, dict[str, object]]:
    """Tracking UID -> {concept meaning: code meaning or numeric value} of each measurement group."""
    out = {}
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeMeaning != "Imaging Measurements":
            continue
        for group in item.ContentSequence:
            values: dict[str, object] = {}
            for c in group.ContentSequence:
                name = c.ConceptNameCodeSequence[0].CodeMeaning
                if c.ValueType == "UIDREF":
                    values[name] = c.UID
                elif c.ValueType == "CODE":
                    values[name] = c.ConceptCodeSequence[0].CodeMeaning
                elif c.ValueType == "NUM":
                    values[name] = float(c.MeasuredValueSequence[0].NumericValue)
            out[values["Tracking Unique Identifier"]] = values
    return out


def test_new_grown_stable_resolved_are_categorised_and_coded_across_frames_of_reference(tmp_path: Path):
    """Ground-truth lesions (not the model): a prior and a current exam of one patient, the prior in
    another frame of reference (rotated and shifted). Registration must bring them together, each
    lesion must get its category, the SRs must carry it coded with the prior values, the lesion keeps
    its Tracking UID, and every object stays dciodvfy-clean."""
    from node.writers.gsps import write_gsps
    from node.writers.seg import write_seg
    from node.writers.sr import write_sr

    ph = Phantom.random(5, n_lesions=0)
    stable, grows = lesion_in(ph, 1, (-25, 5, 0), 9.0), lesion_in(ph, 1, (20, -5, 10), 6.0)
    goes, new = lesion_in(ph, 2, (0, 0, 0), 8.0), lesion_in(ph, 1, (0, 10, -25), 7.0)
    shape, a = (60, 160, 160), axial_affine((60, 160, 160), 2.5, 5.0, -20.0)
    exams = {
        "prior": (
            dataclasses.replace(ph, lesions=(stable, grows, goes)),
            rigid(7, (15, -25, 40)),
            "20250601",
        ),
        "current": (
            dataclasses.replace(ph, lesions=(stable, dataclasses.replace(grows, radius_mm=11.0), new)),
            np.eye(4),
            "20251201",
        ),
    }
    findings = {}
    for name, (phantom, motion, date) in exams.items():
        truth = phantom.sample(a, shape, "CT", noise=12.0, seed=1)
        patient = Patient(study_date=date, study_uid=f"1.2.3.10.{date}")
        written = write_grid(truth, motion @ a, tmp_path / name, patient=patient)
        findings[name] = _truth_findings(tmp_path / name, written.truth, phantom)
    prior_tp = time_point(findings["prior"])
    current_tp = track(findings["current"], prior_tp, time_point(findings["current"]))

    c = findings["current"].comparison
    assert c.how == "rigid registration" and c.interval_days == 183 and c.order == 2
    assert {ch.label: ch.status for ch in c.changes if ch.status != "resolved"} == {
        "Lesion 1": "stable",
        "Lesion 2": "increased",
        "Lesion 3": "new",
    }
    assert [ch.label for ch in c.changes if ch.status == "resolved"] == ["Lesion 3"]
    assert c.new == 1 and c.overall == "progression"
    prior_uid = {t.label: t.tracking_uid for t in prior_tp.lesions}
    now_uid = {t.label: t.tracking_uid for t in current_tp.lesions}
    assert now_uid["Lesion 1"] == prior_uid["Lesion 1"] and now_uid["Lesion 2"] == prior_uid["Lesion 2"]
    assert now_uid["Lesion 3"] not in prior_uid.values()

    out = {}
    for name, f in findings.items():
        seg = write_seg(f)
        objects = {"seg": seg, "sr": write_sr(f, seg), "gsps": write_gsps(f)}
        for kind, ds in objects.items():
            ds.save_as(tmp_path / f"{name}-{kind}.dcm", enforce_file_format=True)
            v = subprocess.run(
                ["dciodvfy", str(tmp_path / f"{name}-{kind}.dcm")], capture_output=True, text=True
            )
            assert not [ln for ln in v.stderr.splitlines() if ln.startswith("Error")], (name, kind, v.stderr)
        out[name] = objects
    groups = _coded_groups(out["current"]["sr"])
    grown = groups[prior_uid["Lesion 2"]]
    assert grown["Description of Change"] == "Increase in size"
    assert grown["Long axis at prior time point"] == pytest.approx(
        findings["prior"].lesions[1].longest_diameter_mm
    )
    assert grown["Change in long axis since prior"] > 20 and grown["Interval"] == 183
    assert groups[prior_uid["Lesion 1"]]["Description of Change"] == "No significant changes in the finding"
    assert groups[now_uid["Lesion 3"]]["Description of Change"] == "New finding"
    assert (
        groups[prior_uid["Lesion 3"]]["Description of Change"] == "Problem resolved"
    )  # the prior's lesion 3
    summary = next(g for g in groups.values() if "Current Response" in g)
    assert summary["Current Response"] == "Target Lesion Progressive Disease"
    assert summary["Number of new lesions"] == 1
    assert summary["Sum of long axes at prior time point"] == pytest.approx(c.sum_before_mm, abs=0.1)
    labels = {
        str(t.UnformattedTextValue)
        for a in out["current"]["gsps"].GraphicAnnotationSequence
        for t in a.get("TextObjectSequence", [])
    }
    assert {lbl.split()[-1] for lbl in labels} == {"stable", "NEW", f"{c.changes[1].diameter_change:+.0%}"}


@pytest.fixture(scope="module")
def liver_lesion(tmp_path_factory) -> Findings:
    ph = Phantom.random(5, n_lesions=0)
    ph = dataclasses.replace(ph, lesions=(lesion_in(ph, 1, (-20, 5, 0), 9.0),))
    shape, a = (60, 160, 160), axial_affine((60, 160, 160), 2.5, 5.0, -20.0)
    out = tmp_path_factory.mktemp("liver")
    written = write_grid(ph.sample(a, shape, "CT", noise=12.0, seed=1), a, out / "ct")
    return _truth_findings(out / "ct", written.truth, ph)


@pytest.mark.parametrize(
    "report, flagged",
    [
        ("No focal liver lesion. No pleural effusion.", ["No focal liver lesion"]),
        ("Liver lesion, unchanged. No pleural effusion.", []),  # no prior compared: nothing contradicts
        ("Lungs clear. No fracture.", []),  # the lesion is in the liver; fractures are not evaluated
        ("Possible small liver lesion.", []),  # hedged
    ],
)
def test_report_statements_the_image_contradicts_are_flagged(liver_lesion: Findings, report, flagged):
    from node.analysis.report_text import check_report

    assert liver_lesion.lesions[0].site == "Liver"
    found = check_report(report, liver_lesion)
    assert [d.statement.sentence for d in found] == flagged
    assert all(d.lesions == ("Lesion 1",) and "Lesion 1" in d.reason for d in found)


def test_discrepancy_is_a_coded_finding_in_the_sr(liver_lesion: Findings, tmp_path: Path):
    from node.analysis.report_text import check_report
    from node.writers.seg import write_seg
    from node.writers.sr import write_sr

    f = dataclasses.replace(liver_lesion, discrepancies=check_report("No liver lesion.", liver_lesion))
    seg = write_seg(f)
    sr = write_sr(f, seg)
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    v = subprocess.run(["dciodvfy", str(tmp_path / "sr.dcm")], capture_output=True, text=True)
    assert not [ln for ln in v.stderr.splitlines() if ln.startswith("Error")], v.stderr
    text = subprocess.run(["dsrdump", "+Pl", str(tmp_path / "sr.dcm")], capture_output=True, text=True).stdout
    assert '"Disagreement with prior findings")=(52988006,SCT,"Lesion")' in text
    assert "report statement: No liver lesion" in text
    # its evidence: the contradicting lesion's SEG segment, which carries the lesion's Tracking UID
    imaging = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    group = next(
        g for g in imaging.ContentSequence if any(getattr(i, "TextValue", "") == "Report discrepancy 1" for i in g.ContentSequence)
    )
    refs = [i.ReferencedSOPSequence[0] for i in group.ContentSequence if i.ValueType == "IMAGE"]
    assert [r.ReferencedSOPInstanceUID for r in refs] == [seg.SOPInstanceUID]
    segment = seg.SegmentSequence[int(refs[0].ReferencedSegmentNumber) - 1]
    assert segment.TrackingUID == f.tracking_uid(f.lesions[0])


def test_run_with_a_report_flags_what_the_image_contradicts(tmp_path: Path):
    confident_lesion_ct(tmp_path / "ct")
    (tmp_path / "report.txt").write_text(
        "FINDINGS: No focal lesion. No pleural effusion.\nIMPRESSION: Normal."
    )
    cli = [sys.executable, "-m", "node.cli", "run", str(tmp_path / "ct"), "--out", str(tmp_path / "out")]
    r = subprocess.run(
        [*cli, "--report", str(tmp_path / "report.txt"), "--no-progress"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "report discrepancy (series" in r.stdout and "report says no lesion;" in " ".join(r.stdout.split())
    (sr,) = (tmp_path / "out").glob("*/sr.dcm")
    text = subprocess.run(["dsrdump", "+Pl", str(sr)], capture_output=True, text=True).stdout
    assert "report statement: FINDINGS: No focal lesion" in text and "pleural" not in text
    r = subprocess.run([*cli, "--report", str(tmp_path / "missing.txt")], capture_output=True, text=True)
    assert (
        r.returncode == 2
        and r.stderr.strip()
        == f"error: {tmp_path / 'missing.txt'}: cannot read the report (No such file or directory)"
    )
