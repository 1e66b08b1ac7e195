"""Text from users is shown as text in a real browser (issue 13, item 5): a specimen image uploaded under a file name
that is markdown for an image and a phishing link, then seen on Diagnose (the result and the history) and on the
Data page, and a reader's display name among the Studies page's options; a study whose title, instructions and
arm names are markup, read by a reader whose display name is markup.

Nothing of the markup may become an element (no ``img`` or ``a`` pointing at the host, no maths), and its characters
are on screen. md_escape adds invisible word joiners (U+2060) that keep Streamlit from turning ``http://``, ``www.``
or ``:smile:`` into links and pictures; the text compared here is the page's text without those joiners.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import skimage.data
from playwright.sync_api import Page, expect

from core.settings import pointing_at
from db import repo
from db.session import init_db, session_scope
from services import studies
from services.studies import ArmSpec
from tests.e2e.conftest import Server, settled, sign_in

MARKUP = "![x](http://host/beacon.png) [Session expired](http://host/phish)"
MORE = "<a href='http://host/a'>y</a> :red[z] :smile: $x^2$ www.host.example m@host.example"
PASSWORD = "pw-user-text-e2e"
MODEL_TIMEOUT_MS = 60_000  # the first diagnosis loads the model and computes Grad-CAM on 2 CPU cores


def _sign_in(page: Page, username: str) -> None:
    sign_in(page, username, PASSWORD)


def _user(workspace: Path, role: str, display_name: str = "") -> tuple[int, str]:
    """A fresh account in the server's database: (id, username)."""
    username = f"e2e-text-{role}-{uuid.uuid4().hex[:8]}"
    with pointing_at(workspace):
        init_db()
        with session_scope() as s:
            return repo.create_user(s, username, PASSWORD, role, display_name=display_name).id, username


def _shown_as_text(page: Page, *values: str) -> None:
    """No element made from markup, and each of ``values`` on screen as its own characters."""
    settled(page)
    assert page.locator("img[src*='host']").count() == 0
    assert page.locator("a[href*='host']").count() == 0
    assert page.locator(".katex").count() == 0
    text = page.locator("body").inner_text().replace("\u2060", "")
    for value in values:
        assert value in text, (value, text)


def test_an_uploaded_file_name_is_text_on_diagnose_and_data(
    page: Page, streamlit_server: Server, trained_workspace: Path
) -> None:
    name = f"{MARKUP}.jpg"
    _, pi = _user(trained_workspace, "pi")
    _, reader = _user(trained_workspace, "reader", display_name=MARKUP)
    page.goto(streamlit_server.url + "/diagnose")
    _sign_in(page, pi)
    page.get_by_test_id("stRadio").get_by_text("WL", exact=True).click()
    settled(page)
    uploader = page.get_by_test_id("stFileUploader")
    uploader.locator("input[type=file]").set_input_files(
        [
            {"name": name, "mimeType": "image/jpeg", "buffer": Path(skimage.data.data_dir, "retina.jpg").read_bytes()},
            {"name": f"{MARKUP} {MORE}.png", "mimeType": "image/png", "buffer": b"not an image"},
        ]
    )
    expect(uploader.get_by_role("button", name=f"Remove {name}")).to_be_visible()  # names shown shortened
    page.get_by_role("button", name="Diagnose").click()
    expect(page.get_by_test_id("stAlertContentError")).to_be_visible(timeout=MODEL_TIMEOUT_MS)
    expect(page.get_by_role("heading", name="Result", exact=True)).to_be_visible()
    _shown_as_text(page, f"{MARKUP} {MORE}.png was not diagnosed", f"{name} · model")

    page.reload()  # a new session: the history is open, on this user's newest diagnosis
    _sign_in(page, pi)
    expect(page.get_by_text("Your earlier diagnoses")).to_be_visible()
    _shown_as_text(page, f"{name} · model")

    page.get_by_test_id("stSidebarNavItems").get_by_role("link", name="Data", exact=True).click()
    expect(page.get_by_role("heading", name="Data")).to_be_visible()
    picker = page.get_by_test_id("stSelectbox").filter(has_text="Prediction")
    picker.click()
    page.get_by_role("option").filter(has_text=f" · {name}").first.click()
    settled(page)
    expect(picker.get_by_role("combobox")).to_have_value(re.compile(re.escape(f" · {name}") + "$"))  # plain text
    _shown_as_text(page, f"{name} · model")

    page.get_by_test_id("stSidebarNavItems").get_by_role("link", name="Studies", exact=True).click()
    expect(page.get_by_role("heading", name="Reader studies")).to_be_visible()
    settled(page)
    page.get_by_role("tab", name="New study").click()
    page.get_by_role("combobox", name="Readers").press_sequentially(reader.rsplit("-", 1)[1])  # opens, filters
    option = page.get_by_role("option").filter(has_text=reader)
    expect(option).to_have_text(f"{MARKUP} ({reader})")  # multiselect options are plain text too
    _shown_as_text(page)


def test_a_studys_title_instructions_and_arms_are_text_for_its_reader(
    page: Page, streamlit_server: Server, trained_workspace: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    reader, username = _user(trained_workspace, "reader", display_name=f"{MARKUP} {MORE}")
    title, arm = f"{MARKUP} {tag}", f"{MARKUP} arm"
    with pointing_at(trained_workspace), session_scope() as s:
        pool = studies.eligible_specimens(s, task="tumor", modalities=("FL",), splits=("test",))
        studies.create_study(
            s, title=title, description=f"{MARKUP}\n{MORE}", task="tumor",
            specimen_ids=[int(i) for i in pool["specimen_id"][:2]], arms=[ArmSpec(arm, "FL")], reader_ids=[reader],
        )  # fmt: skip
    page.goto(streamlit_server.url + "/read")
    _sign_in(page, username)
    expect(page.get_by_text(re.compile(r"case \d+ of \d+"))).to_be_visible()
    _shown_as_text(page, MARKUP, MORE, f"Arm 1 of 1: {arm}", f"{MARKUP} {MORE}")  # instructions, arm, display name
    expect(page.get_by_test_id("stSidebar").get_by_role("combobox")).to_have_value(title)  # plain text
