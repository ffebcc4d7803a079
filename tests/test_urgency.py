"""Triage rules: request context and findings -> score and category (pure logic)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from node.analysis.urgency import TriageRules, age_years, assess

RULES = TriageRules()


def findings(lesions=(), changes=None, positive=False):
    """A stand-in with the attributes :func:`assess` reads (labels, diameters, statuses)."""
    return SimpleNamespace(
        lesions=[
            SimpleNamespace(label=f"Lesion {k}", longest_diameter_mm=d) for k, d in enumerate(lesions, 1)
        ],
        comparison=None
        if changes is None
        else SimpleNamespace(
            changes=[SimpleNamespace(label=f"Lesion {k}", status=s) for k, s in enumerate(changes, 1)]
        ),
        classifications=[SimpleNamespace(name=SimpleNamespace(meaning="Lesion"), probability=0.9, positive=True)]
        if positive
        else [],
    )


def test_a_quiet_request_with_nothing_found_is_routine():
    u = assess({"StudyDate": "20260101", "PatientBirthDate": "19600101"}, findings(), RULES)
    assert (u.score, u.category, u.reasons) == (0, "routine", ())


def test_request_context_scores_priority_terms_and_age():
    tags = {
        "RequestedProcedurePriority": "STAT",
        "RequestAttributesSequence": [{"ReasonForTheRequestedProcedure": "Suspected acute stroke"}],
        "PatientAge": "008Y",
    }
    u = assess(tags, None, RULES)
    assert u.score == 40 + 30 + 10 and u.category == "urgent"
    assert u.reasons == ("requested priority STAT", "urgent terms in the request", "patient under 16 years")
    assert "stroke" not in u.line()  # the request's words never leave: PHI-free reasons


def test_new_and_growing_lesions_raise_the_category():
    assert assess({}, findings([12], ["stable"]), RULES).category == "routine"
    grown = assess({}, findings([12, 20], ["stable", "increased"]), RULES)
    assert (grown.score, grown.category) == (25, "routine")
    both = assess({}, findings([12, 34], ["new", "increased"], positive=True), RULES)
    assert both.score == 35 + 25 + 20 + 10 and both.category == "urgent"
    assert "new lesion (Lesion 1)" in both.reasons and "growing lesion (Lesion 2)" in both.reasons


def test_rules_from_the_config_change_the_outcome():
    strict = TriageRules(priority_at=20, urgent_at=30, new_lesion=50)
    assert assess({}, findings([12], ["new"]), strict).category == "urgent"
    assert assess({}, findings([12], ["new"]), RULES).category == "priority"
    assert assess({"RequestedProcedurePriority": "HIGH"}, None, TriageRules(request_priority={})).score == 0


@pytest.mark.parametrize(
    "tags, years",
    [
        ({"PatientAge": "045Y"}, 45),
        ({"PatientAge": "006M"}, 0.5),
        ({"PatientBirthDate": "20200101", "StudyDate": "20260101"}, 6.0),
        ({"PatientBirthDate": "", "StudyDate": "20260101"}, None),
    ],
)
def test_age(tags, years):
    assert age_years(tags) == (None if years is None else pytest.approx(years, abs=0.01))
