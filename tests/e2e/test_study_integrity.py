"""Issue 13, item 1, in a real browser: once the AI-aided arm opens, the unaided arm's answers can no longer be
reopened, and nothing in the page (element keys included) carries a case's token, so a reader cannot match a
specimen across arms."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Page, expect
from sqlalchemy import select

from core.settings import pointing_at
from db import repo
from db.models import ArmCase
from db.session import read_scope
from services.studies import ArmSpec
from services.study_ai import prepare_study_ai
from tests.e2e.conftest import Server
from tests.e2e.test_reading_flow import _answer, _expect_case, _open, _study

GO_BACK = "Go back to a case you answered"


def _first_revisable(page: Page) -> str | None:
    """The answered case the page first offers to reopen (None when it offers no going back). Cases are listed arm by
    arm, so while an earlier arm's cases were offered, one of them came first."""
    expander = page.get_by_test_id("stExpander").filter(has_text=GO_BACK)
    if expander.count() == 0:
        return None
    expander.locator("summary").click()
    shown = expander.get_by_role("combobox", name="Answered case")
    expect(shown).to_be_visible()
    value = shown.input_value()
    expander.locator("summary").click()
    return value


def test_the_unaided_arm_closes_to_corrections_when_the_aided_arm_opens(
    page: Page, streamlit_server: Server, trained_workspace: Path
) -> None:
    with pointing_at(trained_workspace), read_scope() as s:
        model = repo.find_model(s, "tiny-WL")
    arms = (ArmSpec("FL", "FL"), ArmSpec("WL + AI", "WL", model_id=model.id, show_probability=True))
    setup = _study(trained_workspace, n_cases=2, arm_specs=arms, allow_revisions=True)
    with pointing_at(trained_workspace):  # as the Studies page does when it creates an aided study
        prepare_study_ai(setup.study_id)
    (reader,) = setup.readers
    _open(page, streamlit_server, reader)
    _expect_case(page, setup, 1, 1)
    _answer(page, setup, 1, 1)
    assert _first_revisable(page) == "FL · case 1: tumor, confidence 3"  # inside the arm being read: allowed
    _answer(page, setup, 1, 2)
    expect(page.get_by_test_id("stAlertContentInfo").filter(has_text="AI output")).to_be_visible()
    assert _first_revisable(page) is None  # the aided arm is open: nothing of the unaided arm can be reopened
    _answer(page, setup, 2, 1, label="non-tumor", rating="2")
    assert _first_revisable(page) == "WL + AI · case 1: non-tumor, confidence 2"

    with pointing_at(trained_workspace), read_scope() as s:
        tokens = s.scalars(select(ArmCase.token).where(ArmCase.case_id.in_(setup.case_ids))).all()
    assert len(tokens) == 2 * len(setup.case_ids) == len(set(tokens))  # one per case and arm
    page_html = page.content()
    classes = " ".join(page.evaluate("[...document.querySelectorAll('[class*=\"st-key-\"]')].map(e => e.className)"))
    assert "st-key-read_" in classes
    for token in tokens:
        assert token not in page_html and token not in classes
