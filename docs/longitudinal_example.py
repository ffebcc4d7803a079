"""The README's longitudinal example, made again: a CT phantom and its follow-up six months later (one
liver lesion grown, one unchanged, one new), run through the reference model with the prior and a report
that says nothing changed; the follow-up's GSPS drawn into ``docs/longitudinal-gsps.png``.

    .venv/bin/python docs/longitudinal_example.py /tmp/longitudinal
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom

from node.synthetic.dicom import Patient, write_axial_series
from node.synthetic.phantom import Lesion, Phantom

LIVER = 1
REPORT = "Known liver lesion, unchanged. No new lesions."


def lesion(phantom: Phantom, offset: tuple[float, float, float], radius_mm: float) -> Lesion:
    liver = next(e.center for k, e in phantom.organs if k == LIVER)
    return Lesion(tuple(float(v) for v in np.add(liver, offset)), radius_mm, LIVER, 100.0, 1400.0)


def main(work: Path) -> None:
    ph = Phantom.random(11, n_lesions=0)
    grows, stays = lesion(ph, (-30, 0, 0), 10.0), lesion(ph, (25, -5, 25), 10.0)
    new = lesion(ph, (0, 20, 0), 6.5)  # in the grown lesion's slices: the picture shows both
    exams = {
        "prior": (dataclasses.replace(ph, lesions=(grows, stays)), "20250601"),
        "current": (dataclasses.replace(ph, lesions=(dataclasses.replace(grows, radius_mm=14.0), stays, new)), "20251201"),
    }  # fmt: skip
    for name, (phantom, date) in exams.items():
        write_axial_series(
            phantom, work / name, shape=(80, 256, 256), slice_spacing=3.0, seed=3,
            patient=Patient(study_date=date, study_uid=f"1.2.3.11.{date}"),
        )  # fmt: skip
    (work / "report.txt").write_text(REPORT + "\n")
    out = work / "results"
    run = [sys.executable, "-m", "node.cli", "run", str(work / "current"), "--prior", str(work / "prior")]
    subprocess.run([*run, "--report", str(work / "report.txt"), "--out", str(out), "--no-progress"], check=True)
    current = next(d for d in out.iterdir() if pydicom.dcmread(d / "seg.dcm").StudyDate == "20251201")
    gsps = pydicom.dcmread(current / "gsps.dcm")
    shown = next(  # the image Lesion 1 is labelled on
        a.ReferencedImageSequence[0].ReferencedSOPInstanceUID
        for a in gsps.GraphicAnnotationSequence
        if any(t.UnformattedTextValue.startswith("Lesion 1,") for t in a.get("TextObjectSequence", []))
    )
    png = Path(__file__).parent / "longitudinal-gsps.png"
    render = [sys.executable, "-m", "node.cli", "render", str(current / "gsps.dcm"), "--sop", shown]
    subprocess.run([*render, "--images", str(work / "current"), "--out", str(png)], check=True)
    print(subprocess.run(["dsrdump", "+Pl", str(current / "sr.dcm")], capture_output=True, text=True).stdout)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
