"""Statements in a radiology report's free text about what the model evaluates, and the ones the image contradicts.

The model segments five organs (Liver, Spleen, Kidney, Lung, Bone) and focal lesions, and says whether a
lesion is present. :func:`statements` finds the report's sentences about those lesions ("no focal liver
lesion", "lungs clear", "stable splenic nodule"), with negation, hedging and interval change read
NegEx-style (Chapman et al. 2001): a pre-negation trigger ("no", "without", "free of") negates a lesion
term up to :data:`WINDOW` items after it, a post-negation trigger ("not seen", "ruled out") one up to
:data:`WINDOW` items before it, pseudo-negations ("no change", "not only") negate nothing, and a
termination term ("but", "however", "except") ends a trigger's scope. An organ named with a normal word
("lungs clear", "normal liver", "kidneys unremarkable") is an implicit "no lesion in that organ". A comma
ends a scope only between two self-contained findings ("no liver lesion, stable lung nodule"), not in a
list ("no lesion in the liver, spleen, or kidneys"); an exception ("normal except for a cyst") withdraws
the sentence's denials before it.
Sentences about anything else ("no pleural effusion", "no fracture", "adrenal nodule") give no statement.

Why no library: negspacy (NegEx) and medspacy (ConText) are spaCy pipeline components. They would add
spaCy and its compiled stack (thinc, blis, srsly, ...; medspacy also PyRuSH and QuickUMLS) to a node
whose reports need only a few trigger lists, plus a tokenizer/model to set up without a download at run
time and seconds of import on a 2-core CI box. The algorithm is small; the lists below are its spec.

:func:`discrepancies` flags certain (not hedged) statements that a confident lesion (probability >=
``min_probability`` and longest diameter >= ``min_diameter_mm``) contradicts:

- a negated statement ("no liver lesion", "lungs clear"; no site: "no focal lesion" = anywhere) by any
  confident lesion at its site (at any site when it names none). "No new lesion" / "no enlarging lesion"
  deny only that change: a confident lesion whose status is "new" / "increased" contradicts them;
- an "unchanged / stable" statement about lesions by a confident lesion at its site (any site when it
  names none) whose status is "new" or "increased".

Hedged statements ("possible", "cannot exclude") and positive ones ("liver lesion, unchanged" next to a
stable liver lesion) are never flagged. Reasons name only labels, organs and numbers: no report text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

WINDOW = 6  # NegEx scope, in items (a multi-word trigger or term counts once)

# Organ nouns place a lesion and, with a normal word, deny one there ("kidneys unremarkable").
ORGANS: dict[str, str] = {
    "liver": "Liver",
    "spleen": "Spleen",
    "kidney": "Kidney",
    "lung": "Lung",
    "bone": "Bone",
    "skeleton": "Bone",
    "osseous structure": "Bone",
    "bony structure": "Bone",
}
# Adjectives place a lesion ("hepatic lesion") but deny nothing: "renal arteries normal" is not about lesions.
SITE_ADJECTIVES: dict[str, str] = {
    "hepatic": "Liver",
    "splenic": "Spleen",
    "renal": "Kidney",
    "pulmonary": "Lung",
    "osseous": "Bone",
    "bony": "Bone",
    "skeletal": "Bone",
}
# Sites the model does not evaluate: a lesion placed only there gives no statement ("no adrenal nodule").
OTHER_SITES = (
    "adrenal", "pancreas", "pancreatic", "thyroid", "breast", "brain", "bowel", "colon", "colonic",
    "bladder", "prostate", "uterus", "uterine", "ovary", "ovarian", "gallbladder", "stomach", "gastric",
    "pleural", "mediastinal", "mediastinum", "nodal", "lymph node", "soft tissue", "subcutaneous", "skin",
)  # fmt: skip
LESION_TERMS = (
    "lesion", "mass", "nodule", "metastasis", "metastatic disease", "tumor", "tumour", "hypodensity",
)  # fmt: skip
NORMAL_TERMS = ("normal", "unremarkable", "clear", "within normal limits", "negative")
PRE_NEGATIONS = (
    "no", "not", "without", "neither", "nor", "negative for", "free of", "no evidence of", "no sign of",
    "no signs of", "absence of", "resolution of",
)  # fmt: skip
POST_NEGATIONS = (
    "ruled out", "absent", "not seen", "not identified", "not visualized", "not visible", "not demonstrated",
    "no longer seen", "no longer visible", "no longer identified", "resolved",
)  # fmt: skip
# Look like triggers but mean nothing here; the longest match wins, so the "not"/"normal" in them is inert.
PSEUDO_TRIGGERS = ("not only", "not necessarily", "not just", "normal in size", "normal size")
UNCERTAINTY = (
    "possible", "possibly", "probable", "probably", "likely", "unlikely", "questionable", "equivocal",
    "cannot exclude", "cannot be excluded", "not excluded", "cannot rule out", "cannot be ruled out",
    "not ruled out", "may represent", "may be", "might", "could represent", "could be", "suspicious for",
    "concerning for", "suggestive of", "?",
)  # fmt: skip
TERMINATIONS = ("but", "however", "although", "though", "whereas")
# Terminations that also qualify what came before: "kidneys normal except for a cyst" denies nothing.
EXCEPTIONS = ("except", "apart from", "aside from", "other than", "with the exception of")
CHANGES: dict[str, str] = {
    **dict.fromkeys(
        ("unchanged", "stable", "unaltered", "similar", "no change", "no interval change",
         "no significant change", "no significant interval change", "not changed", "not significantly changed",
         "no increase", "not increased", "no growth", "no interval growth"),
        "stable",
    ),
    **dict.fromkeys(("new", "newly"), "new"),
    **dict.fromkeys(
        ("enlarging", "increased", "increasing", "increase", "increased in size", "grown", "growing", "larger",
         "progressed", "progressing", "progression"),
        "increased",
    ),
    **dict.fromkeys(
        ("smaller", "decreased", "decreasing", "decrease", "regressed", "regressing", "regression", "reduced",
         "shrunk", "shrinking", "partially resolved"),
        "decreased",
    ),
}  # fmt: skip
NARROWING_CHANGES = ("new", "increased")  # "no new lesion" denies only new ones
_WHERE = {
    "Liver": "the liver",
    "Spleen": "the spleen",
    "Kidney": "the kidneys",
    "Lung": "the lungs",
    "Bone": "bone",
}


@dataclass(frozen=True)
class Statement:
    sentence: str  # the sentence as written in the report (stripped)
    site: str | None  # "Liver" | "Spleen" | "Kidney" | "Lung" | "Bone" | None (no site named)
    negated: bool  # the report says there is NO lesion (at site)
    uncertain: bool  # hedged ("possible", "cannot exclude")
    change: str | None  # "new" | "increased" | "decreased" | "stable" | None


@dataclass(frozen=True)
class LesionEvidence:
    label: str  # "Lesion 2"
    site: str | None
    diameter_mm: float
    probability: float  # mean model confidence in the lesion mask, 0..1
    status: str | None  # "new" | "increased" | "stable" | "decreased" | None (no prior compared)


@dataclass(frozen=True)
class Discrepancy:
    statement: Statement
    lesions: tuple[str, ...]  # labels of the lesions that contradict it
    reason: str  # one PHI-free line


Item = tuple[str, str | None]  # (kind, value): a matched phrase, or ("word", None)


def _plural(phrase: str) -> str:
    """English plural of a phrase's last word: metastasis -> metastases, mass -> masses, kidney -> kidneys."""
    for pattern, plural in ((r"sis$", "ses"), (r"(s|x)$", r"\1es"), (r"([^aeiou])y$", r"\1ies")):
        if re.search(pattern, phrase):
            return re.sub(pattern, plural, phrase)
    return phrase + "s"


def _table() -> dict[tuple[str, ...], Item]:
    table: dict[tuple[str, ...], Item] = {}

    def add(kind: str, phrases: Iterable[str] | Mapping[str, str], plural: bool = False) -> None:
        pairs = phrases.items() if isinstance(phrases, Mapping) else ((p, None) for p in phrases)
        for phrase, value in pairs:
            for form in {phrase, _plural(phrase)} if plural else {phrase}:
                table[tuple(form.split())] = (kind, value)

    add("organ", ORGANS, plural=True)
    add("site", SITE_ADJECTIVES)
    add("other", OTHER_SITES, plural=True)
    add("lesion", LESION_TERMS, plural=True)
    add("normal", NORMAL_TERMS)
    add("pre", PRE_NEGATIONS)
    add("post", POST_NEGATIONS)
    add("uncertain", UNCERTAINTY)
    add("change", CHANGES)
    add("term", TERMINATIONS)
    add("term", dict.fromkeys(EXCEPTIONS, "exception"))
    add("pseudo", PSEUDO_TRIGGERS)
    add(",", (",",))
    return table


_PHRASES = _table()
_LONGEST = max(map(len, _PHRASES))
_TOKEN = re.compile(r"[a-z]+|\d+(?:\.\d+)?|[?,]")
# Split at ". ; ! newline", never inside a decimal ("1.5 cm"), and after "?" only before a capital.
_SENTENCE_END = re.compile(r"\.(?!\d)|(?<!\d)\.|[;!\n]|(?<=\?)\s+(?=[A-Z])")


def _items(sentence: str) -> list[Item]:
    """Tokens with the longest vocabulary phrase at each position folded into one item."""
    words, items, i = _TOKEN.findall(sentence.lower()), [], 0
    while i < len(words):
        for n in range(min(_LONGEST, len(words) - i), 0, -1):
            if hit := _PHRASES.get(tuple(words[i : i + n])):
                items.append(hit)
                i += n
                break
        else:
            items.append(("word", None))
            i += 1
    return items


def _says_something(segment: list[Item]) -> bool:
    kinds = {kind for kind, _ in segment}
    sited = bool(kinds & {"organ", "site"})
    return (sited and bool(kinds & {"lesion", "normal"})) or (
        "lesion" in kinds and bool(kinds & {"pre", "post", "uncertain", "change"})
    )


def _clauses(items: list[Item]) -> Iterator[tuple[list[Item], bool]]:
    """Clauses split at termination terms, then at commas where both sides say something on their own.

    "No liver lesion, new lung nodule" is two clauses; "no mass, nodule, or lesion", "liver lesion,
    unchanged" and "liver, spleen and kidneys unremarkable" are one. Yields (clause, follows an exception).
    """
    exception, clause = False, []
    for item in [*items, ("term", None)]:
        if item[0] != "term":
            clause.append(item)
            continue
        segments: list[list[Item]] = [[]]
        for part in clause:
            if part[0] == ",":
                segments.append([])
            else:
                segments[-1].append(part)
        groups: list[list[Item]] = []
        anchored = False
        for segment in filter(None, segments):
            own = _says_something(segment)
            if not groups or (own and anchored):
                groups.append([])
                anchored = False
            groups[-1].extend(segment)
            anchored = anchored or own
        for n, group in enumerate(groups):
            yield group, exception and n == 0
        exception, clause = item[1] == "exception", []


def _clause_statements(sentence: str, items: list[Item]) -> list[Statement]:
    kinds = [kind for kind, _ in items]

    def negated(j: int) -> bool:
        return any(
            (kind == "pre" and 0 < j - i <= WINDOW) or (kind == "post" and 0 < i - j <= WINDOW)
            for i, kind in enumerate(kinds)
        )

    uncertain = "uncertain" in kinds
    change = next((value for kind, value in items if kind == "change"), None)
    lesions = [j for j, kind in enumerate(kinds) if kind == "lesion"]
    if lesions:
        sites = list(dict.fromkeys(value for kind, value in items if kind in ("organ", "site")))
        if not sites and "other" in kinds:
            return []  # a lesion only at organs the model does not evaluate
        denied = any(negated(j) for j in lesions)
        return [Statement(sentence, site, denied, uncertain, change) for site in sites or [None]]
    normals = [j for j, kind in enumerate(kinds) if kind == "normal" and not negated(j)]
    sites = dict.fromkeys(
        value
        for j, (kind, value) in enumerate(items)
        if kind == "organ" and any(abs(j - n) <= WINDOW for n in normals)
    )
    return [Statement(sentence, site, True, uncertain, change) for site in sites]


def statements(text: str) -> list[Statement]:
    """The report's statements about lesions at the organs the model evaluates, in reading order."""
    found: list[Statement] = []
    for raw in _SENTENCE_END.split(text):
        if not (sentence := raw.strip()):
            continue
        here: list[Statement] = []
        for clause, after_exception in _clauses(_items(sentence)):
            if after_exception:  # "no lesion except ...": the denial was qualified, so it is not a denial
                here = [s for s in here if not s.negated]
            here += _clause_statements(sentence, clause)
        found += dict.fromkeys(here)
    return found


def _describe(lesion: LesionEvidence, with_site: bool) -> str:
    status = f", {lesion.status}" if lesion.status else ""
    site = f" in {_WHERE.get(lesion.site, lesion.site.lower())}" if with_site and lesion.site else ""
    return f"{lesion.label} ({lesion.diameter_mm:.0f} mm, p={lesion.probability:.2f}{status}){site}"


def discrepancies(
    statements: list[Statement],
    lesions: list[LesionEvidence],
    min_probability: float = 0.8,
    min_diameter_mm: float = 5.0,
) -> list[Discrepancy]:
    """Certain statements that a confident lesion contradicts (rules in the module docstring)."""
    confident = [
        les for les in lesions if les.probability >= min_probability and les.diameter_mm >= min_diameter_mm
    ]
    found: list[Discrepancy] = []
    for s in statements:
        if s.uncertain:
            continue
        where = f" in {_WHERE.get(s.site, s.site.lower())}" if s.site else ""
        here = [les for les in confident if s.site is None or les.site == s.site]
        if s.negated:
            only = s.change if s.change in NARROWING_CHANGES else None
            hits = [les for les in here if only is None or les.status == only]
            claim = f"no {only + ' ' if only else ''}lesion{where}"
        elif s.change == "stable":
            hits = [les for les in here if les.status in ("new", "increased")]
            claim = f"the lesions{where} are unchanged"
        else:
            continue
        if hits:
            shown = ", ".join(_describe(les, with_site=s.site is None) for les in hits)
            reason = f"report says {claim}; the image shows {shown}{' there' if s.site else ''}"
            found.append(Discrepancy(s, tuple(les.label for les in hits), reason))
    return found


def check_report(text: str, findings) -> list[Discrepancy]:
    """The statements of ``text`` that a :class:`~node.analysis.findings.Findings`' lesions contradict."""
    # a resolved lesion carries the prior's label, which a current lesion may carry too
    changes = findings.comparison.changes if findings.comparison else []
    status = {c.label: c.status for c in changes if c.status != "resolved"}
    evidence = [
        LesionEvidence(
            s.label, s.site, s.longest_diameter_mm or 0.0, s.probability or 0.0, status.get(s.label)
        )
        for s in findings.lesions
    ]
    return discrepancies(statements(text), evidence)
