"""One series end to end, shared by ``pacs-node run``/``demo`` and the worker:
volume (:mod:`node.ingest`) -> backbone once and every head (:mod:`node.model`) -> findings,
comparison with the prior, report check, urgency (:mod:`node.analysis`) -> SEG, SR, GSPS and,
when the model gives a lesion probability, a Parametric Map (:mod:`node.writers`) on disk.

A series' objects are written into a hidden temporary folder and moved into place only when
all of them were written, so a failure never leaves half a result behind.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset

from node.analysis.change import TimePoint
from node.analysis.findings import Findings, ModelRef
from node.analysis.longitudinal import time_point, track
from node.analysis.postprocess import merge, to_findings
from node.analysis.report_text import check_report
from node.analysis.urgency import TriageRules, assess, tags_of
from node.errors import InputError, ModelError, ServiceUnavailable
from node.identity import ModelRun, OutputKind, Stage
from node.ingest.series import SourceSeries
from node.ingest.volume import SeriesVolume, load_volume
from node.model.feature_cache import KEPT, FeatureCache
from node.model.inference import predict
from node.model.manifest import ModelSpec
from node.model.runtimes import Runtime
from node.timing import Stopwatch
from node.writers.gsps import write_gsps
from node.writers.pmap import write_probability_map
from node.writers.seg import write_seg
from node.writers.sr import write_outlines, write_sr

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Written:
    """One object on disk: ``<out>/<series UID>/<kind>.dcm``."""

    kind: OutputKind
    path: Path
    sop_uid: str


@dataclass
class SeriesResult:
    series_uid: str
    modality: str = ""
    slices: int = 0
    outputs: list[Written] = field(default_factory=list)
    findings: Findings | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    parts: dict[str, float] = field(default_factory=dict)  # inside inference: backbone, head_<name>
    time_point: TimePoint | None = None  # what a later series of the patient is compared with
    models: list[ModelRun] = field(default_factory=list)  # each model's part, failed ones with why
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def files(self) -> list[Path]:
        return [w.path for w in self.outputs]

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


@dataclass(frozen=True)
class Engine:
    """A loaded model and the runtime that runs it."""

    model: ModelSpec
    runtime: Runtime

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.model.name, self.model.version, self.runtime.name)

    @property
    def key(self) -> str:
        """Its name and version, as jobs and metrics name it."""
        return f"{self.model.name} {self.model.version}"


class Pipeline:
    """Holds the loaded models and their runtimes; processes one series at a time."""

    def __init__(
        self, model: ModelSpec, runtime: Runtime, triage: TriageRules | None = None, features: FeatureCache | None = None
    ):
        self.engines = [Engine(model, runtime)]
        self.triage = triage or TriageRules()
        self.features = features  # where each series' backbone features are kept, to train heads on
        if features is not None:
            runtime.keep(*KEPT, max_bytes=features.max_entry_bytes)

    @classmethod
    def of(
        cls, engines: Sequence[Engine], triage: TriageRules | None = None, features: FeatureCache | None = None
    ) -> Pipeline:
        """Several models: a series goes through those :meth:`process` is given (all by default)."""
        pipeline = cls(engines[0].model, engines[0].runtime, triage, features)
        pipeline.engines = list(engines)
        for e in pipeline.engines if features is not None else ():
            e.runtime.keep(*KEPT, max_bytes=features.max_entry_bytes)
        return pipeline

    @property
    def model(self) -> ModelSpec:  # the first (usually the only) model
        return self.engines[0].model

    @property
    def runtime(self) -> Runtime:
        return self.engines[0].runtime

    def load(self, series: SourceSeries, clock: Stopwatch, engines: Sequence[Engine] | None = None) -> SeriesVolume:
        """The series' volume, built once for every model (each checks its modalities itself)."""
        engines = engines or self.engines
        modalities = list(dict.fromkeys(m for e in engines for m in e.model.modalities))
        name = engines[0].model.name if len(engines) == 1 else None
        with clock(Stage.LOAD):
            return load_volume(series, modalities, model_name=name)

    def process(
        self,
        series: SourceSeries,
        out_dir: Path,
        progress: Callable[[int], None] | None = None,
        volume: SeriesVolume | None = None,
        prior: TimePoint | None = None,
        report: str | None = None,
        prior_unavailable: str | None = None,
        clock: Stopwatch | None = None,
        engines: Sequence[Engine] | None = None,
    ) -> SeriesResult:
        """Run one series end to end; an :class:`~node.errors.InputError` names what is wrong with the series.

        ``prior``: the time point to compare with; ``report``: the study's report text, checked
        against the image (contradictions are flagged in the SR, the report is never changed);
        ``prior_unavailable``: a prior was looked for and none could be used, and why (the SR says it);
        ``clock``: times the stages (``clock.current`` names the stage an error happened in);
        ``engines``: the models to run (routing chose them; default all). Their results go into one
        SEG, one SR, one GSPS, each segment and classification naming its model; a model that fails
        is named with its reason in ``result.models`` and the others' results are kept. Only when
        every model failed does the series fail, with the first model's error."""
        clock = clock or Stopwatch()
        engines = engines or self.engines
        result = SeriesResult(series.series_uid, series.modality)
        volume = volume or self.load(series, clock, engines)
        result.slices = volume.volume.shape[0]
        parts, first_error = [], None
        for engine in engines:
            try:
                parts.append(self._infer(engine, volume, clock, progress, len(engines), self.features))
                result.models.append(ModelRun(engine.key))
            except Exception as e:
                if len(engines) == 1 or isinstance(e, ServiceUnavailable):
                    raise  # a server down: the whole series again later, not without this model
                first_error = first_error or e
                result.models.append(ModelRun(engine.key, _one_line(e)))
                log.info("model %s failed: %s", engine.model.name, _one_line(e))
                if not isinstance(e, (InputError, ModelError)):
                    log.debug("model %s", engine.model.name, exc_info=True)
        if not parts:
            raise first_error
        findings = merge(parts)
        findings.notes += [f"model {r.model} failed: {r.error}" for r in result.models if r.error]
        with clock(Stage.MEASURE):
            result.time_point = time_point(findings)
        findings.prior_unavailable = prior_unavailable
        if prior is not None:
            with clock(Stage.COMPARE):
                result.time_point = track(findings, prior, result.time_point)
        if report:
            findings.discrepancies = check_report(report, findings)
        findings.urgency = assess(tags_of(volume.first_dataset), findings, self.triage)
        objects = {}
        if findings.segments:  # a model of classification heads only has nothing to segment or outline
            with clock(Stage.ENCODE_SEG):
                objects[OutputKind.SEG] = write_seg(findings)
        with clock(Stage.ENCODE_SR):
            objects[OutputKind.SR] = write_sr(findings, objects.get(OutputKind.SEG))
        if findings.segments:
            with clock(Stage.ENCODE_SR):
                objects[OutputKind.OUTLINES] = write_outlines(findings, objects[OutputKind.SEG])
            with clock(Stage.ENCODE_GSPS):
                objects[OutputKind.GSPS] = write_gsps(findings)
        if findings.lesion_probability is not None:
            with clock(Stage.ENCODE_PMAP):
                objects[OutputKind.PMAP] = write_probability_map(findings)
        with clock(Stage.WRITE):
            paths = _write_atomically(out_dir, series.series_uid, objects)
        result.outputs = [Written(k, paths[k], str(ds.SOPInstanceUID)) for k, ds in objects.items()]
        result.findings = findings
        result.seconds, result.parts = dict(clock.seconds), dict(clock.parts)
        return result

    @staticmethod
    def _infer(
        engine: Engine,
        volume: SeriesVolume,
        clock: Stopwatch,
        progress: Callable[[int], None] | None,
        n: int,
        features: FeatureCache | None = None,
    ) -> Findings:
        """One model's findings on the volume (the caller names the model of any error); its backbone
        features into ``features``, where kept."""
        model = engine.model
        if volume.modality.upper() not in {m.upper() for m in model.modalities}:
            raise InputError(f"it takes {', '.join(model.modalities)}, not {volume.modality}")
        share = (lambda k: progress(k / n)) if progress and n > 1 else progress  # one bar for all models
        prediction = predict(volume, model, engine.runtime, clock, share)
        if features is not None and prediction.features is not None:
            try:
                features.put(model.name, model.base_version, volume.series_uid, prediction.features)
            except OSError as e:  # an optional cache (a full disk): the series' results still go out
                log.warning("model %s: features not kept: %s", model.name, e.strerror or type(e).__name__)
        with clock(Stage.MEASURE):
            return to_findings(volume, model, prediction, engine.runtime.name)


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, (InputError, ModelError)) else f"internal error: {type(e).__name__}: {text}"


def _write_atomically(
    out_dir: Path, series_uid: str, objects: dict[OutputKind, Dataset]
) -> dict[OutputKind, Path]:
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
    return {kind: final / f"{kind}.dcm" for kind in objects}
