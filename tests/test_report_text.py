"""NegEx-style report statements and their contradictions with the image (pure logic, no model)."""

from __future__ import annotations

import pytest

from node.analysis.report_text import Discrepancy, LesionEvidence, Statement, discrepancies, statements


def lesion(site: str | None, status: str | None = None, p: float = 0.93, mm: float = 18.0, n: int = 2):
    return LesionEvidence(f"Lesion {n}", site, mm, p, status)


def flags(text: str, *lesions: LesionEvidence) -> list[Discrepancy]:
    return discrepancies(statements(text), list(lesions))


def only(text: str) -> Statement:
    (found,) = statements(text)
    return found


def test_no_focal_liver_lesion_against_confident_liver_lesion_is_flagged():
    s = only("No focal liver lesion.")
    assert (s.site, s.negated, s.uncertain, s.change) == ("Liver", True, False, None)
    (d,) = flags("No focal liver lesion.", lesion("Liver"))
    assert d.lesions == ("Lesion 2",)
    assert d.reason == "report says no lesion in the liver; the image shows Lesion 2 (18 mm, p=0.93) there"


def test_unchanged_liver_lesion_agrees_with_stable_lesion_and_contradicts_new_one():
    s = only("Liver lesion, unchanged.")
    assert (s.site, s.negated, s.change) == ("Liver", False, "stable")
    assert flags("Liver lesion, unchanged.", lesion("Liver", "stable")) == []
    (d,) = flags("Liver lesion, unchanged.", lesion("Liver", "new"))
    assert d.lesions == ("Lesion 2",) and "unchanged" in d.reason and "new" in d.reason
    assert [x.lesions for x in flags("Stable liver metastases.", lesion("Liver", "increased"))] == [
        ("Lesion 2",)
    ]


@pytest.mark.parametrize(
    "text",
    ["No pleural effusion.", "No fracture", "No free fluid.", "No lymphadenopathy.", "No adrenal nodule.",
     "Renal arteries normal.", "Liver normal in size."],
)  # fmt: skip
def test_findings_the_model_does_not_evaluate_give_no_statement(text: str):
    assert statements(text) == []


def test_lungs_clear_is_contradicted_by_lung_lesion_only():
    s = only("Lungs clear.")
    assert (s.site, s.negated) == ("Lung", True)
    assert [d.lesions for d in flags("Lungs clear.", lesion("Lung"))] == [("Lesion 2",)]
    assert flags("Lungs clear.", lesion("Liver")) == []


def test_hedged_statements_are_uncertain_and_never_flagged():
    found = statements("Possible small liver lesion, cannot exclude metastasis.")
    assert found and all(s.uncertain and not s.negated for s in found)
    assert "Liver" in {s.site for s in found}
    assert flags("Possible small liver lesion, cannot exclude metastasis.", lesion("Liver", "new")) == []
    s = only("Metastasis cannot be ruled out.")  # "ruled out" alone would negate
    assert (s.uncertain, s.negated) == (True, False)
    # hedged denials and hedged "unchanged" would be flagged if they were certain
    assert only("Probably no liver lesion.").negated and only("Probably no liver lesion.").uncertain
    assert flags("Probably no liver lesion.", lesion("Liver")) == []
    assert flags("Liver lesion, possibly unchanged.", lesion("Liver", "new")) == []


def test_only_confident_lesions_contradict():
    assert flags("No focal liver lesion.", lesion("Liver", p=0.5)) == []
    assert flags("No focal liver lesion.", lesion("Liver", mm=3.0)) == []
    assert flags("No focal liver lesion.", lesion("Liver", p=0.5), lesion("Liver", p=0.8, n=3))[
        0
    ].lesions == ("Lesion 3",)


def test_termination_ends_negation_scope():
    assert [(s.site, s.negated, s.change) for s in statements("No liver lesion but a new lung nodule.")] == [
        ("Liver", True, None),
        ("Lung", False, "new"),
    ]
    # a comma between two self-contained findings ends the scope too
    assert [(s.site, s.negated) for s in statements("No liver lesion, stable lung nodule.")] == [
        ("Liver", True),
        ("Lung", False),
    ]
    found = flags("No liver lesion but a new lung nodule.", lesion("Lung", "new"))
    assert found == []


def test_decimal_does_not_split_the_sentence():
    s = only("1.5 cm lesion in the spleen, unchanged.")
    assert s.sentence == "1.5 cm lesion in the spleen, unchanged"
    assert (s.site, s.negated, s.change) == ("Spleen", False, "stable")
    assert [s.site for s in statements("1.5 cm lesion in the spleen. Lungs clear.")] == ["Spleen", "Lung"]


def test_pseudo_negation_no_change_is_stable_not_negated():
    s = only("No change in the liver lesion.")
    assert (s.site, s.negated, s.change) == ("Liver", False, "stable")
    assert flags("No change in the liver lesion.", lesion("Liver", "stable")) == []


def test_no_focal_lesion_without_site_means_anywhere():
    s = only("No focal lesion.")
    assert (s.site, s.negated) == (None, True)
    (d,) = flags("No focal lesion.", lesion("Kidney"), lesion(None, n=3))
    assert d.lesions == ("Lesion 2", "Lesion 3")
    assert "in the kidneys" in d.reason


def test_no_new_lesion_denies_only_new_ones():
    s = only("No new lesions.")
    assert (s.site, s.negated, s.change) == (None, True, "new")
    assert flags("No new lesions.", lesion("Liver", "stable")) == []
    assert flags("No new lesions.", lesion("Liver", None)) == []  # no prior compared: nothing to say
    assert flags("No new lesions.", lesion("Liver", "new"))[0].lesions == ("Lesion 2",)


def test_lists_and_plurals_carry_negation_to_every_site():
    sites = [(s.site, s.negated) for s in statements("No lesions in the liver, spleen, or kidneys.")]
    assert sites == [("Liver", True), ("Spleen", True), ("Kidney", True)]
    assert [s.site for s in statements("Liver, spleen and kidneys unremarkable.")] == [
        "Liver",
        "Spleen",
        "Kidney",
    ]
    assert [s.negated for s in statements("No mass, nodule, or lesion.")] == [True]
    assert only("No lytic or sclerotic bone lesions.").site == "Bone"


def test_post_negation_and_exception():
    s = only("The previously seen liver lesion is no longer seen.")
    assert (s.site, s.negated) == ("Liver", True)
    assert statements("Kidneys normal except for a simple cyst.") == []  # a qualified normal denies nothing
    assert statements("The liver is not normal.") == []


def test_change_vocabulary():
    changes = {
        "Enlarging liver lesion.": "increased",
        "Liver lesion has increased in size.": "increased",
        "Smaller splenic nodule.": "decreased",
        "Pulmonary nodule has regressed.": "decreased",
        "Newly seen renal mass.": "new",
        "No interval change in the hepatic metastases.": "stable",
    }
    assert {text: only(text).change for text in changes} == changes


def test_check_report_reads_a_lesion_status_not_a_resolved_namesake():
    """The prior's Lesion 1 resolved and a new Lesion 1 appeared: "unchanged" is contradicted."""
    from types import SimpleNamespace

    from node.analysis.report_text import check_report

    new = SimpleNamespace(label="Lesion 1", status="new")
    gone = SimpleNamespace(label="Lesion 1", status="resolved")  # the prior's label
    findings = SimpleNamespace(
        lesions=[SimpleNamespace(label="Lesion 1", site="Liver", longest_diameter_mm=18.0, probability=0.93)],
        comparison=SimpleNamespace(changes=[new, gone]),
    )
    (found,) = check_report("Liver lesion, unchanged.", findings)
    assert found.lesions == ("Lesion 1",) and "new" in found.reason
