"""The offline pipeline for one series: volume -> inference -> findings -> SEG + SR + GSPS on disk.

Outputs of a series are written into a hidden temporary folder and moved
into place only when all three objects were written, so a failure never
leaves half a result behind.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from node.errors import InputError, ModelError
from node.findings import Findings
from node.inference import predict
from node.longitudinal import TimePoint, time_point, track
from node.model_repo import ModelSpec
from node.postprocess import to_findings
from node.report_text import check_report
from node.runtimes import Runtime
from node.series import SourceSeries
from node.timing import Stopwatch
from node.urgency import TriageRules, assess, tags_of
from node.volume import SeriesVolume, load_volume
from node.writers import write_gsps, write_probability_map, write_seg, write_sr

log = logging.getLogger(__name__)


@dataclass
class SeriesResult:
    series_uid: str
    modality: str = ""
    slices: int = 0
    files: list[Path] = field(default_factory=list)
    findings: Findings | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    parts: dict[str, float] = field(default_factory=dict)  # inside inference: backbone, head_<name>
    time_point: TimePoint | None = None  # what a later series of the patient is compared with
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def summary(self) -> str:
        """One PHI-free line: what was found."""
        if not self.findings:
            return ""
        f = self.findings
        organs = [s.label for s in f.segments if s.kind == "organ"]
        lesions = [f"{s.label} {s.longest_diameter_mm:.0f} mm" for s in f.lesions if s.longest_diameter_mm]
        classes = [
            f"{c.name.meaning} {c.value.meaning.lower()} (p={c.probability:.2f})" for c in f.classifications
        ]
        compared = [f.comparison.summary()] if f.comparison else []
        flags = [f"{len(f.discrepancies)} report discrepancies"] if f.discrepancies else []
        return "; ".join(
            x
            for x in (", ".join(organs), ", ".join(lesions) or "no lesion", *classes, *compared, *flags)
            if x
        )


class Pipeline:
    """Holds the loaded model and runtime; processes one series at a time."""

    def __init__(self, model: ModelSpec, runtime: Runtime, triage: TriageRules | None = None):
        if model.input.kind != "slice2d":
            raise ModelError(
                f"model {model.name}: {model.input.kind} (3D sliding-window) backbones are described by the "
                "manifest but not implemented in this version"
            )
        self.model = model
        self.runtime = runtime
        self.triage = triage or TriageRules()

    def load(self, series: SourceSeries, clock: Stopwatch) -> SeriesVolume:
        with clock("load"):
            return load_volume(series, self.model.modalities, model_name=self.model.name)

    def process(
        self,
        series: SourceSeries,
        out_dir: Path,
        progress: Callable[[int], None] | None = None,
        volume: SeriesVolume | None = None,
        prior: TimePoint | None = None,
        report: str | None = None,
        prior_unavailable: str | None = None,
    ) -> SeriesResult:
        """Run one series end to end. User-fixable problems become ``result.error``; bugs propagate.

        ``prior``: the time point to compare with; ``report``: the study's report text, checked
        against the image (contradictions are flagged in the SR, the report is never changed);
        ``prior_unavailable``: a prior was looked for and none could be used, and why (the SR says it)."""
        clock = Stopwatch()
        result = SeriesResult(series.series_uid, series.modality)
        try:
            volume = volume or self.load(series, clock)
        except InputError as e:
            result.error = str(e)
            return result
        result.slices = volume.volume.shape[0]
        prediction = predict(volume, self.model, self.runtime, clock, progress)
        with clock("measure"):
            findings = to_findings(volume, self.model, prediction, self.runtime.name)
            result.time_point = time_point(findings)
        findings.prior_unavailable = prior_unavailable
        if prior is not None:
            with clock("compare"):
                result.time_point = track(findings, prior, result.time_point)
        if report:
            findings.discrepancies = check_report(report, findings)
        findings.urgency = assess(tags_of(volume.first_dataset), findings, self.triage)
        with clock("encode_seg"):
            seg = write_seg(findings)
        with clock("encode_sr"):
            sr = write_sr(findings, seg)
        with clock("encode_gsps"):
            gsps = write_gsps(findings)
        objects = {"seg": seg, "sr": sr, "gsps": gsps}
        if findings.lesion_probability is not None:
            with clock("encode_pmap"):
                objects["pmap"] = write_probability_map(findings)
        with clock("write"):
            result.files = _write_atomically(out_dir, series.series_uid, objects)
        result.findings = findings
        result.seconds, result.parts = dict(clock.seconds), dict(clock.parts)
        return result


def _write_atomically(out_dir: Path, series_uid: str, objects: dict) -> list[Path]:
    """Write ``out_dir/<series_uid>/<kind>.dcm`` all or nothing; a re-run replaces the old results."""
    final = out_dir / series_uid
    tmp = out_dir / f".partial-{series_uid}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for kind, ds in objects.items():
            ds.save_as(tmp / f"{kind}.dcm", enforce_file_format=True)
        if final.exists():
            old = out_dir / f".old-{series_uid}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [final / f"{kind}.dcm" for kind in objects]
