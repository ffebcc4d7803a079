"""Triage: an urgency score (0-100) and category (routine / priority / urgent) for a series.

Two sources, both scored by rules from the config (``triage:``), each rule adding points:

- **the request** (known when the series arrives, so it orders the job queue before inference):
  the requested procedure priority (STAT, HIGH), urgent terms in Reason for Study, Requested
  Procedure Description, Reason for the Requested Procedure or Admitting Diagnoses, and the
  patient's age;
- **the image** (known after inference): new and growing lesions against the prior, large
  lesions, and positive findings of the classification heads.

The defaults and why (points add up, capped at 100; 30 is priority, 60 urgent):

- STAT +40, HIGH +20: the referrer already said so; STAT alone is not urgent without a finding.
- urgent terms in the request +30: stroke, bleeding, trauma, embolism, dissection... the
  clinician suspects an emergency; with a STAT order it is urgent.
- a new lesion since the prior +35, a growing one +25: the change a reader must see first.
- a lesion of 30 mm or more +20 (RECIST: a mass), any positive finding +10.
- children under 16 +10: imaged for a reason, and they wait worst.

Stdlib only: the Orthanc plugin imports this module to score the request at arrival.
The reasons are PHI-free (rule names and lesion labels, never the request's text).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from node.identity import StrEnum


class Category(StrEnum):
    """Triage categories, least urgent first (their order is compared: a webhook's ``min_category``)."""

    ROUTINE = "routine"
    PRIORITY = "priority"
    URGENT = "urgent"

    def reaches(self, other: str) -> bool:
        return CATEGORIES.index(self) >= CATEGORIES.index(Category(other))


CATEGORIES = tuple(Category)

URGENT_TERMS = (
    r"\b(stroke|bleed\w*|h(a)?emorrhag\w*|trauma\w*|embol\w*|dissection|perforat\w*|obstruct\w*"
    r"|isch(a)?emi\w*|acute|sepsis|abscess|cord compression|pneumothorax|code stroke)\b"
)
# where a request says why it was made (keywords as Orthanc's simplified tags name them)
REQUEST_TEXT_TAGS = (
    "ReasonForStudy",
    "RequestedProcedureDescription",
    "ReasonForTheRequestedProcedure",
    "AdmittingDiagnosesDescription",
)


@dataclass(frozen=True)
class AgeRule:
    under_years: float = 16.0
    points: int = 10


@dataclass(frozen=True)
class SizeRule:
    min_mm: float = 30.0
    points: int = 20


@dataclass(frozen=True)
class TriageRules:
    """The ``triage:`` section of the config; every number is points on a 0-100 scale."""

    priority_at: int = 30
    urgent_at: int = 60
    request_priority: dict[str, int] = field(default_factory=lambda: {"STAT": 40, "HIGH": 20})
    urgent_terms: str = URGENT_TERMS  # a regular expression, searched case-insensitively
    urgent_terms_points: int = 30
    age: AgeRule = AgeRule()
    new_lesion: int = 35
    growing_lesion: int = 25
    large_lesion: SizeRule = SizeRule()
    positive_finding: int = 10

    def __post_init__(self) -> None:
        if not 0 < self.priority_at <= self.urgent_at <= 100:
            raise ValueError(
                f"need 0 < priority_at <= urgent_at <= 100, got {self.priority_at}, {self.urgent_at}"
            )
        try:
            re.compile(self.urgent_terms)
        except re.error as e:
            raise ValueError(f"urgent_terms is not a regular expression: {e}") from None

    @classmethod
    def from_dict(cls, d: Mapping) -> TriageRules:
        """From the config's JSON (the plugin has no pydantic to do it)."""
        d = dict(d)
        age, large = AgeRule(**d.pop("age", {})), SizeRule(**d.pop("large_lesion", {}))
        return cls(**d, age=age, large_lesion=large)

    def category(self, score: int) -> Category:
        if score >= self.urgent_at:
            return Category.URGENT
        return Category.PRIORITY if score >= self.priority_at else Category.ROUTINE


@dataclass(frozen=True)
class Urgency:
    score: int
    category: Category
    reasons: tuple[str, ...] = ()

    def line(self) -> str:
        why = f": {', '.join(self.reasons)}" if self.reasons else ""
        return f"{self.category} (score {self.score}){why}"


def request_points(tags: Mapping, rules: TriageRules) -> tuple[int, list[str]]:
    """Points from the request context in ``tags``: DICOM keyword -> value, sequences as lists of
    such mappings (Orthanc's simplified tags, or :func:`tags_of` a pydicom Dataset)."""
    flat = _flatten(tags)
    points, reasons = 0, []
    priority = str(flat.get("RequestedProcedurePriority", "")).strip().upper()
    if rules.request_priority.get(priority):
        points += rules.request_priority[priority]
        reasons.append(f"requested priority {priority}")
    text = " ".join(str(flat.get(k, "")) for k in REQUEST_TEXT_TAGS)
    if rules.urgent_terms_points and re.search(rules.urgent_terms, text, re.IGNORECASE):
        points += rules.urgent_terms_points
        reasons.append("urgent terms in the request")
    age = age_years(flat)
    if age is not None and age < rules.age.under_years and rules.age.points:
        points += rules.age.points
        reasons.append(f"patient under {rules.age.under_years:g} years")
    return points, reasons


def image_points(findings, rules: TriageRules) -> tuple[int, list[str]]:
    """Points from a :class:`~node.analysis.findings.Findings` (duck-typed: this module stays stdlib-only)."""
    points, reasons = 0, []
    changes = findings.comparison.changes if findings.comparison is not None else []
    new = [c.label for c in changes if c.status == "new"]
    grown = [c.label for c in changes if c.status == "increased"]
    if new and rules.new_lesion:
        points += rules.new_lesion
        reasons.append(f"new lesion ({', '.join(new)})")
    if grown and rules.growing_lesion:
        points += rules.growing_lesion
        reasons.append(f"growing lesion ({', '.join(grown)})")
    large = [s.label for s in findings.lesions if (s.longest_diameter_mm or 0) >= rules.large_lesion.min_mm]
    if large and rules.large_lesion.points:
        points += rules.large_lesion.points
        reasons.append(f"lesion of {rules.large_lesion.min_mm:g} mm or more ({', '.join(large)})")
    positive = [c.name.meaning for c in findings.classifications if c.positive]
    if positive and rules.positive_finding:
        points += rules.positive_finding
        reasons.append(f"positive finding ({', '.join(positive)})")
    return points, reasons


def assess(tags: Mapping, findings, rules: TriageRules) -> Urgency:
    """The urgency of a series from its request context and (when inferred) its findings."""
    points, reasons = request_points(tags, rules)
    if findings is not None:
        more, why = image_points(findings, rules)
        points, reasons = points + more, reasons + why
    score = min(100, max(0, points))
    return Urgency(score, rules.category(score), tuple(reasons))


def age_years(tags: Mapping) -> float | None:
    """PatientAge ("045Y", "006M", "010W", "003D"), else from PatientBirthDate and StudyDate."""
    m = re.fullmatch(r"(\d{3})([DWMY])", str(tags.get("PatientAge", "")).strip())
    if m:
        return int(m.group(1)) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[m.group(2)]
    try:
        born = datetime.strptime(str(tags.get("PatientBirthDate", "")), "%Y%m%d")
        seen = datetime.strptime(str(tags.get("StudyDate", "")), "%Y%m%d")
    except ValueError:
        return None
    return (seen - born).days / 365.25


def _flatten(tags: Mapping) -> dict:
    """Top-level values, plus those of the first item of any sequence (Request Attributes Sequence)
    that the top level lacks."""
    flat = {k: v for k, v in tags.items() if not isinstance(v, list)}
    for v in tags.values():
        if isinstance(v, list) and v and isinstance(v[0], Mapping):
            for k, inner in _flatten(v[0]).items():
                flat.setdefault(k, inner)
    return flat


def tags_of(ds) -> dict:
    """The keyword -> value mapping :func:`assess` reads, from a pydicom Dataset."""
    out = {}
    for elem in ds:
        if elem.keyword == "PixelData" or not elem.keyword:
            continue
        if elem.VR == "SQ":
            out[elem.keyword] = [tags_of(item) for item in elem.value]
        else:
            out[elem.keyword] = elem.value
    return out
