"""Typed objects passed from inference to the DICOM writers.

The writers (:mod:`node.writers`) read only these objects and the source
series; they never see model tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import highdicom as hd
import numpy as np
from scipy import ndimage

from node.analysis.change import Comparison
from node.analysis.report_text import Discrepancy
from node.analysis.urgency import Urgency
from node.ingest.volume import SeriesVolume
from node.writers import uids


@dataclass(frozen=True)
class Concept:
    """A coded concept (value, scheme, meaning), e.g. ('10200004', 'SCT', 'Liver')."""

    value: str
    scheme: str
    meaning: str

    def coded(self) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(self.value, self.scheme, self.meaning)


@dataclass(frozen=True)
class BoxMask:
    """A boolean mask on the volume grid, kept as its bounding box and the mask inside it.

    TotalSegmentator's 117 structures as whole-volume masks of a 512x512x600 CT would take 18 GB;
    their boxes take a few hundred MB. ``np.asarray`` gives the whole mask (tests, small volumes).
    """

    shape: tuple[int, int, int]  # the volume's (slices, rows, cols)
    box: tuple[slice, slice, slice]
    crop: np.ndarray  # bool, the mask inside ``box``

    @classmethod
    def of(cls, mask: np.ndarray) -> BoxMask:
        mask = np.asarray(mask, bool)
        if mask.ndim != 3:
            raise ValueError(f"Segment.mask must be 3D (slices, rows, cols), got shape {mask.shape}.")
        found = ndimage.find_objects(mask.view(np.uint8))
        box = found[0] if found else (slice(0, 0),) * 3
        return cls(tuple(mask.shape), box, mask[box].copy())

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        full = np.zeros(self.shape, bool)
        full[self.box] = self.crop
        return full if dtype is None else full.astype(dtype)

    def plane(self, index: int) -> np.ndarray:
        """Volume slice ``index`` of the mask, whole."""
        out = np.zeros(self.shape[1:], bool)
        z = self.box[0]
        if z.start <= index < z.stop:
            out[self.box[1:]] = self.crop[index - z.start]
        return out

    def within(self, box: tuple[slice, ...]) -> np.ndarray:
        """The mask cut to another ``box`` of the volume."""
        out = np.zeros(tuple(b.stop - b.start for b in box), bool)
        inter = tuple(
            slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(self.box, box, strict=True)
        )
        if all(i.start < i.stop for i in inter):
            out[
                tuple(slice(i.start - b.start, i.stop - b.start) for i, b in zip(inter, box, strict=True))
            ] = self.crop[
                tuple(
                    slice(i.start - a.start, i.stop - a.start) for i, a in zip(inter, self.box, strict=True)
                )
            ]
        return out

    def areas(self) -> np.ndarray:
        """Voxels per volume slice (every slice of the volume)."""
        out = np.zeros(self.shape[0], np.int64)
        out[self.box[0]] = self.crop.sum(axis=(1, 2))
        return out

    @property
    def slices(self) -> list[int]:
        """Indices of the volume slices the mask crosses."""
        return [int(i) + self.box[0].start for i in np.flatnonzero(self.crop.any(axis=(1, 2)))]


@dataclass
class Segment:
    """One SEG segment on the source grid, with its measurements."""

    number: int  # 1-based segment number in the SEG
    label: str  # e.g. "Liver", "Lesion 2"
    kind: Literal["organ", "lesion"]
    category: Concept  # SNOMED CT segmented property category
    type: Concept  # SNOMED CT segmented property type
    mask: BoxMask  # on SeriesVolume.volume's grid (a whole bool array given is boxed)
    probability: float | None = None  # mean model confidence inside the mask
    volume_ml: float = 0.0
    mean: float = 0.0  # modality units (HU for CT)
    maximum: float = 0.0
    # lesions only: longest in-plane diameter and where it lies (for SR and GSPS)
    longest_diameter_mm: float | None = None
    diameter_slice: int | None = None  # index along the volume's slice axis
    diameter_endpoints: tuple[tuple[float, float], tuple[float, float]] | None = None  # (row, col) pairs
    # set when matched to a prior lesion (that lesion's UID), or when several models' findings are
    # merged (the UID its own model gives it, so a merge renumbering the segments changes none)
    tracking_uid: str | None = None
    site: str | None = None  # lesions: the label of the organ segment it lies in ("Liver")
    modifier: Concept | None = None  # of the type, e.g. laterality
    model: ModelRef | None = None  # the model that found it, where a series went through several

    def __post_init__(self) -> None:
        if not isinstance(self.mask, BoxMask):
            self.mask = BoxMask.of(self.mask)

    @property
    def slices(self) -> list[int]:
        """Indices of the volume slices this segment crosses."""
        return self.mask.slices


@dataclass
class Classification:
    """A study/series-level classification head's result."""

    head: str
    name: Concept  # what is evaluated, e.g. ('52988006','SCT','Lesion') presence
    value: Concept  # the coded answer, e.g. Present / Absent, or the most probable class
    probability: float  # of the positive class, or of the most probable class
    positive: bool = False  # a finding a reader should see (not "absent", not a "no finding" class)
    classes: tuple[tuple[Concept, float], ...] = ()  # multi-class heads: every class and its probability
    model: ModelRef | None = None  # the model whose head it is, where a series went through several


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    runtime: str = "onnxruntime-cpu"

    @classmethod
    def combined(cls, refs: list[ModelRef]) -> ModelRef:
        """The models of one series' results together: what names the documents (and seeds their
        UIDs); each segment and classification names its own model."""
        if len(refs) == 1:
            return refs[0]

        def joined(values) -> str:
            return "+".join(dict.fromkeys(values))[:64]  # LO

        return cls(joined(r.name for r in refs), joined(r.version for r in refs), joined(r.runtime for r in refs))


@dataclass
class Findings:
    """Everything the writers need for one source series."""

    series: SeriesVolume
    model: ModelRef
    segments: list[Segment]
    classifications: list[Classification] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was done to unusual input, for the SR
    comparison: Comparison | None = None  # against the most relevant prior, when there is one
    prior_unavailable: str | None = None  # a prior was looked for and none could be used: why
    urgency: Urgency | None = None  # triage of the series: request context and findings
    discrepancies: list[Discrepancy] = field(default_factory=list)  # report statements the image contradicts
    # P(lesion) x 255 on the volume grid (uint8), the evidence behind every lesion: a Parametric Map
    lesion_probability: np.ndarray | None = None
    # a head version in shadow (never written): its agreement with the active version (Dice over the
    # labels, or 1 - |p - p'| for a classification), by (model name, head name)
    shadow_agreement: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def lesions(self) -> list[Segment]:
        return [s for s in self.segments if s.kind == "lesion"]

    def tracking_uid(self, segment: Segment) -> str:
        """Shared by the SEG segment, its SR group and GSPS outlines; a lesion matched to a prior keeps
        the prior's UID (``segment.tracking_uid``), so it is the same in every report of the patient."""
        if segment.tracking_uid:
            return segment.tracking_uid
        m = self.model
        return uids.tracking_uid(self.series.series_uid, m.name, m.version, segment.number)
