"""Blind reader studies in a real browser: two readers at once, a refresh mid-study, double submits, typed URLs of
pages a reader may not see, and nothing in what the browser receives that tells the specimen or the truth.

Each test makes its own readers (unique usernames) and its own small study straight in the database the server
reads, so tests do not see each other's reads. The server picks the case shown (the first unanswered one in the
reader's own order, ``core.reading.reader_order``), so the tests compute that order to know which case is on screen.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Locator, Page, expect
from sqlalchemy import select

from core.reading import reader_order
from core.settings import pointing_at
from db import repo
from db.models import ArmCase, Patient, Read, Specimen, SpecimenImage, StudyArm, StudyCase
from db.session import init_db, session_scope
from services import studies
from services.studies import ArmSpec
from tests.e2e.conftest import EXPECT_TIMEOUT_MS, Server, settled, sign_in

PASSWORD = "pw-reader-e2e"
DONE = "You have read every case of this study. Thank you."
NOT_ASSIGNED = "That study is not assigned to you."
SAVED = "Answer saved."
DUPLICATE = "This case was already answered; nothing was changed. Here is your next case."
EMPTY = "choose a diagnosis"
QUIET_MS = 1_000  # how long to watch for a second (unwanted) rerun after a double submit


@dataclass(frozen=True)
class Reader:
    id: int
    username: str


@dataclass(frozen=True)
class Setup:
    study_id: int
    title: str
    readers: tuple[Reader, ...]
    arms: tuple[tuple[int, str], ...]  # (arm id, name), in the order they are read
    case_ids: tuple[int, ...]

    def order(self, reader: Reader, arm: int) -> list[int]:
        """The case ids in the order ``reader`` gets them in arm number ``arm`` (1-based)."""
        return reader_order(list(self.case_ids), self.study_id, reader.id, self.arms[arm - 1][0])

    def every_read(self) -> list[tuple[int, int]]:
        """(arm id, case id) of every answer a reader owes."""
        return sorted((arm_id, case_id) for arm_id, _ in self.arms for case_id in self.case_ids)


def _db_url(workspace: Path) -> str:
    return f"sqlite:///{workspace / 'study.db'}"


def _study(
    workspace: Path,
    *,
    n_readers: int = 1,
    arms: tuple[str, ...] = ("FL", "WL"),
    n_cases: int = 3,
    specimen_ids: list[int] | None = None,
    arm_specs: tuple[ArmSpec, ...] | None = None,
    **options: object,
) -> Setup:
    """Fresh reader accounts and a study over ``n_cases`` test-split specimens (or ``specimen_ids``), one arm per
    modality in ``arms`` (or the given ``arm_specs``), every reader invited; ``options`` go to ``create_study``."""
    tag = uuid.uuid4().hex[:8]
    with pointing_at(workspace):
        init_db()
        with session_scope() as s:
            readers = tuple(
                Reader(u.id, u.username)
                for u in (repo.create_user(s, f"e2e-r{i}-{tag}", PASSWORD, "reader") for i in range(n_readers))
            )
            if specimen_ids is None:
                pool = studies.eligible_specimens(s, task="tumor", modalities=("FL", "WL"), splits=("test",))
                specimen_ids = [int(i) for i in pool["specimen_id"][:n_cases]]
            info = studies.create_study(
                s,
                title=f"E2E reading {tag}",
                task="tumor",
                specimen_ids=specimen_ids,
                arms=arm_specs or [ArmSpec(a, a) for a in arms],
                reader_ids=[r.id for r in readers],
                **options,
            )
            case_ids = tuple(s.scalars(select(StudyCase.id).where(StudyCase.study_id == info.id)))
    assert len(case_ids) == len(specimen_ids)
    return Setup(info.id, info.title, readers, tuple((a.id, a.name) for a in info.arms), case_ids)


def _reads(workspace: Path, reader: Reader) -> list[tuple[int, int, int, int, int | None]]:
    """The reader's reads as (arm id, case id, version, label, rating), in the order they were stored."""
    with session_scope(_db_url(workspace)) as s:
        rows = s.execute(
            select(Read.arm_id, Read.case_id, Read.version, Read.label, Read.rating)
            .where(Read.reader_id == reader.id)
            .order_by(Read.id)
        )
        return [tuple(r) for r in rows]


# --------------------------------------------------------------------------------------------------- browser


@pytest.fixture
def second_page(browser: Browser, streamlit_server: Server) -> Iterator[Page]:
    """Another browser context (its own cookies and Streamlit session), as a second reader's computer."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(EXPECT_TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def _sign_in(page: Page, username: str) -> None:
    sign_in(page, username, PASSWORD)


def _open(page: Page, server: Server, reader: Reader, path: str = "/read") -> None:
    """``path`` typed into the address bar (a new Streamlit session), then signed in as ``reader``."""
    page.goto(server.url + path)
    _sign_in(page, reader.username)


def _position(page: Page) -> Locator:
    """The line "Arm a of b: NAME · case k of n"."""
    # not one left from the run before (Streamlit dims it as stale until the new run ends): on the way into an aided
    # arm the new line is drawn at another place, and both stand on the page for a moment
    current = page.locator('[data-testid="stElementContainer"]:not([data-stale="true"])')
    return current.get_by_test_id("stMarkdownContainer").filter(has_text=re.compile(r"^Arm \d+ of \d+: .* · case "))


def _expect_case(page: Page, setup: Setup, arm: int, k: int) -> None:
    """Wait until the page shows case ``k`` of arm number ``arm`` (both 1-based), fully drawn."""
    n_arms, n = len(setup.arms), len(setup.case_ids)
    expect(_position(page)).to_have_text(f"Arm {arm} of {n_arms}: {setup.arms[arm - 1][1]} · case {k} of {n}")
    settled(page)
    expect(_image(page)).to_have_count(1)  # plotly.js loads lazily, after the run is over


def _expect_done(page: Page) -> None:
    expect(page.get_by_test_id("stAlertContentSuccess").filter(has_text=DONE)).to_have_text(DONE)
    settled(page)
    expect(_position(page)).to_have_count(0)
    expect(page.get_by_test_id("stForm")).to_have_count(0)


def _image(page: Page) -> Locator:
    """The case's picture: an SVG <image> inside the Plotly figure."""
    return page.get_by_test_id("stPlotlyChart").locator("image")


def _image_source(page: Page) -> str:
    source = _image(page).evaluate("img => img.getAttribute('href') || img.getAttribute('xlink:href')")
    assert source.startswith("data:image/png;base64,"), source[:80]
    return source


def _fill(page: Page, label: str, rating: str) -> None:
    """Choose a diagnosis and a confidence (inside the form: no rerun until it is submitted)."""
    form = page.get_by_test_id("stForm")
    form.get_by_test_id("stRadio").filter(has_text="Diagnosis").get_by_text(label, exact=True).click()
    form.get_by_test_id("stRadio").filter(has_text="Confidence").get_by_text(rating, exact=True).click()


def _submit(page: Page) -> Locator:
    return page.get_by_role("button", name="Submit answer")


def _answer(page: Page, setup: Setup, arm: int, k: int, label: str = "tumor", rating: str = "3") -> None:
    """Answer case ``k`` of arm ``arm`` and wait for the next case (or the end)."""
    _fill(page, label, rating)
    _submit(page).click()
    _expect_next(page, setup, arm, k)


def _expect_next(page: Page, setup: Setup, arm: int, k: int) -> None:
    """The page after case ``k`` of arm ``arm`` was answered."""
    if k < len(setup.case_ids):
        _expect_case(page, setup, arm, k + 1)
    elif arm < len(setup.arms):
        _expect_case(page, setup, arm + 1, 1)
    else:
        _expect_done(page)


def _steps(setup: Setup) -> list[tuple[int, int]]:
    """(arm, k) of every case a reader answers, in order."""
    return [(arm, k) for arm in range(1, len(setup.arms) + 1) for k in range(1, len(setup.case_ids) + 1)]


# ------------------------------------------------------------------------------------------------------ tests


def test_two_readers_read_the_same_study_at_the_same_time(
    page: Page, second_page: Page, streamlit_server: Server, trained_workspace: Path
) -> None:
    """Two sessions submit their answers back to back, case after case; each reader ends with exactly their own
    answers, one per case and arm."""
    setup = _study(trained_workspace, n_readers=2)
    pages = (page, second_page)
    answers = (("tumor", "5 · certain", 1, 5), ("non-tumor", "2", 0, 2))  # (label, rating shown, stored label, rating)
    for p in pages:
        p.goto(streamlit_server.url + "/read")
    for p, reader in zip(pages, setup.readers, strict=True):
        _sign_in(p, reader.username)
    for p in pages:
        _expect_case(p, setup, 1, 1)
    for arm, k in _steps(setup):
        for p, (label, rating, _, _) in zip(pages, answers, strict=True):
            _fill(p, label, rating)
        for p in pages:  # both reruns in flight together
            _submit(p).click()
        for p in pages:
            _expect_next(p, setup, arm, k)
            expect(p.get_by_test_id("stAlertContentSuccess").filter(has_text="Answer saved.")).to_be_visible()
    for reader, (_, _, label, rating) in zip(setup.readers, answers, strict=True):
        reads = _reads(trained_workspace, reader)
        assert sorted((arm, case) for arm, case, *_ in reads) == setup.every_read(), reads
        assert {(version, lab, rat) for _, _, version, lab, rat in reads} == {(1, label, rating)}, reads


def test_a_refresh_mid_study_resumes_at_the_first_unanswered_case(
    page: Page, streamlit_server: Server, trained_workspace: Path
) -> None:
    """A reload is a new session: sign in again, and the same case (same k, same picture) is back; in the end every
    case was answered once per arm, in the reader's order, none skipped."""
    setup = _study(trained_workspace)
    (reader,) = setup.readers
    _open(page, streamlit_server, reader)
    assert re.search(rf"/read\?study={setup.study_id}$", page.url), page.url
    _expect_case(page, setup, 1, 1)
    _answer(page, setup, 1, 1)
    _answer(page, setup, 1, 2)
    for arm, k in ((1, 3), (2, 2)):
        before = _image_source(page)
        page.reload()
        _sign_in(page, reader.username)
        _expect_case(page, setup, arm, k)
        assert _image_source(page) == before  # the very case that was on screen
        assert len(_reads(trained_workspace, reader)) == (arm - 1) * len(setup.case_ids) + k - 1
        _answer(page, setup, arm, k, label="non-tumor", rating="4")
        if arm == 1:
            _answer(page, setup, 2, 1)
    _answer(page, setup, 2, 3)
    reads = _reads(trained_workspace, reader)
    assert sorted((arm, case) for arm, case, *_ in reads) == setup.every_read(), reads
    assert all(version == 1 for _, _, version, *_ in reads), reads
    for arm, (arm_id, _) in enumerate(setup.arms, start=1):
        assert [case for a, case, *_ in reads if a == arm_id] == setup.order(reader, arm), reads


TWICE = ("dblclick", "two clicks", "two clicks in one task", "Ctrl+Enter twice")


def _submit_twice(page: Page, how: str) -> None:
    button = _submit(page)
    if how == "dblclick":
        button.dblclick()
    elif how == "two clicks":  # at one spot, as a hand does: the second lands on whatever is there by then
        box = button.bounding_box()
        spot = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.click(*spot)
        page.mouse.click(*spot)
    elif how == "two clicks in one task":  # the second surely leaves before the server answers the first
        button.evaluate("button => { button.click(); button.click(); }")
    else:  # from the comment box: with a radio option focused, Streamlit ignores the shortcut (see the caption)
        page.get_by_role("textbox", name="Comment (optional)").fill("pressed twice")
        page.keyboard.press("Control+Enter")
        page.keyboard.press("Control+Enter")


def test_a_double_submit_stores_one_answer_and_never_answers_the_next_case(
    page: Page, streamlit_server: Server, trained_workspace: Path
) -> None:
    """A double click, two quick clicks, two clicks in one browser task, and Ctrl+Enter twice each store exactly one
    answer, for the case on screen, and move on by exactly one case."""
    setup = _study(trained_workspace, arms=("FL",), n_cases=len(TWICE) + 1)
    (reader,) = setup.readers
    order = setup.order(reader, 1)
    arm_id = setup.arms[0][0]
    _open(page, streamlit_server, reader)
    _expect_case(page, setup, 1, 1)
    for k, way in enumerate(TWICE, start=1):
        _fill(page, "tumor", "4")
        _submit_twice(page, way)
        _expect_case(page, setup, 1, k + 1)
        page.wait_for_timeout(QUIET_MS)  # a late second submit would answer (or try to answer) case k + 1 now
        settled(page)
        expect(_position(page)).to_have_text(re.compile(rf" · case {k + 1} of {len(order)}$"))
        reads = _reads(trained_workspace, reader)
        assert reads == [(arm_id, case, 1, 1, 4) for case in order[:k]], (way, reads)
        # One message: the first submit's, or the second's (a duplicate, nothing changed). Playwright's second click()
        # waits for the button to be stable; should the next case's form be drawn by then, it reaches that empty form
        # (never seen on 2 cores), which is refused and stores nothing; the check above holds either way.
        messages = page.get_by_test_id("stAlert").all_inner_texts()
        allowed = (SAVED, DUPLICATE, EMPTY) if way == "two clicks" else (SAVED, DUPLICATE)
        assert len(messages) == 1 and messages[0] in allowed, (way, messages)


def test_pages_a_reader_may_not_see_are_refused_when_typed_in(
    page: Page, streamlit_server: Server, trained_workspace: Path
) -> None:
    """A reader typing the PI pages' URLs gets none of their content; a study they are not invited to, typed into
    ``?study=``, is refused and shows nothing of it (the reader's own study is shown instead)."""
    mine = _study(trained_workspace)
    theirs = _study(trained_workspace)
    (reader,) = mine.readers
    received = _capture(page)
    for path in ("/studies", "/data"):
        _open(page, streamlit_server, reader, path)
        # Streamlit's navigation has no such page for a reader: it shows Home instead, without a word (Home lists the
        # reader's own studies under "Your reader studies").
        expect(page.get_by_role("heading", name="Intraoperative imaging AI")).to_be_visible()
        expect(page.get_by_role("heading", name="Your reader studies", exact=True)).to_be_visible()
        for title in ("Reader studies", "Data", "New study"):
            expect(page.get_by_role("heading", name=title, exact=True)).to_have_count(0)
        expect(page.get_by_role("tab")).to_have_count(0)
        # one table: the reader's own progress in their one study (none of the Data page's tables)
        expect(page.get_by_test_id("stDataFrame")).to_have_count(1)
        expect(page.get_by_text(mine.title, exact=True)).to_be_visible()
        links = page.get_by_test_id("stSidebarNav").get_by_role("link")  # their text starts with the icon's name
        expect(links).to_have_text([re.compile(r"Home$"), re.compile(r"Read$"), re.compile(r"Account$")])
        assert theirs.title not in page.content()
    _open(page, streamlit_server, reader, f"/read?study={theirs.study_id}")
    expect(page.get_by_test_id("stAlertContentError")).to_contain_text(NOT_ASSIGNED)
    _expect_case(page, mine, 1, 1)
    expect(page).to_have_url(re.compile(rf"/read\?study={mine.study_id}$"))
    expect(page.get_by_role("combobox", name="Study")).to_have_value(mine.title)
    assert theirs.title not in page.content()
    # Nor did the server send anything of it: the Study picker's options (all of them travel with the page), and the
    # tokens of its cases, are nowhere in the websocket frames; the reader's own study is (case tokens never are).
    sent = "\n".join(received)
    assert mine.title in sent and _tokens(trained_workspace, mine)[0] not in sent
    assert theirs.title not in sent and not any(token in sent for token in _tokens(trained_workspace, theirs))
    assert _reads(trained_workspace, reader) == []


# Structure and text of the page, without Streamlit's and React's random ids, Plotly's inner drawing, the position
# line's numbers and the progress bar's value: what two cases' pages may differ in besides the picture and token.
_PAGE_OUTLINE = """root => {
    const kept = ["data-testid", "role", "aria-label", "aria-checked", "aria-selected", "type", "value",
                  "placeholder", "href", "title", "alt", "disabled", "class"];
    const lines = [];
    const walk = (el, depth) => {
        const pad = " ".repeat(depth);
        const testid = el.getAttribute("data-testid");
        if (testid === "stPlotlyChart") { lines.push(pad + "<plotly>"); return; }
        if (testid === "stProgress") { lines.push(pad + "<progress>"); return; }
        if (testid === "stMarkdownContainer" && /^Arm \\d+ of /.test(el.textContent)) {
            lines.push(pad + "position: " + el.textContent); return;
        }
        const attrs = kept.filter(a => el.hasAttribute(a)).map(a => `${a}=${JSON.stringify(el.getAttribute(a))}`);
        const text = [...el.childNodes].filter(n => n.nodeType === Node.TEXT_NODE)
            .map(n => n.textContent.trim()).filter(Boolean).join(" ");
        lines.push(`${pad}${el.tagName.toLowerCase()} ${attrs.join(" ")} ${JSON.stringify(text)}`);
        for (const child of el.children) walk(child, depth + 1);
    };
    walk(root, 0);
    return lines.join("\\n");
}"""


def _outline(page: Page) -> str:
    outline = page.get_by_test_id("stApp").evaluate(_PAGE_OUTLINE)
    outline = re.sub(r"stAppEmbeddingId-\w+", "stAppEmbeddingId-", outline)
    outline = re.sub(r"(read_[a-z]+)_\d+_\d+_\d+_\d", r"\1_<k>", outline)  # keys say "case k", no more
    return re.sub(r"case \d+ of", "case k of", outline)


def _tokens(workspace: Path, setup: Setup) -> list[str]:
    """The study's case tokens in its first arm, the first case of its first reader first."""
    with session_scope(_db_url(workspace)) as s:
        tokens = dict(s.execute(select(ArmCase.case_id, ArmCase.token).where(ArmCase.arm_id == setup.arms[0][0])).all())
    first = setup.order(setup.readers[0], 1)
    return [tokens[i] for i in first]


def _secrets(workspace: Path, case_id: int) -> tuple[str, dict[str, str]]:
    """What must never reach the reader: the case's token (in the FL arm), specimen and patient code, the stored FL
    image's path, file name and sha256."""
    with session_scope(_db_url(workspace)) as s:
        token, code, patient, path, sha = s.execute(
            select(ArmCase.token, Specimen.code, Patient.code, SpecimenImage.path, SpecimenImage.sha256)
            .join(StudyCase, ArmCase.case_id == StudyCase.id)
            .join(StudyArm, ArmCase.arm_id == StudyArm.id)
            .join(Specimen, StudyCase.specimen_id == Specimen.id)
            .join(Patient, Specimen.patient_id == Patient.id)
            .join(SpecimenImage, SpecimenImage.specimen_id == Specimen.id)
            .where(StudyCase.id == case_id, SpecimenImage.modality == "FL", StudyArm.modality == "FL")
        ).one()
    return {"token": token, "specimen": code, "patient": patient, "path": path, "file": Path(path).name, "sha256": sha}


def _without_pictures(text: str) -> str:
    """``text`` with inline PNGs cut out (their base64 could hold a short code by chance); Plotly's JSON writes "/"
    as \\u002f."""
    text = text.replace("\\u002f", "/")
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:image/png;base64,<png>", text)


def _leaks(text: str, secrets: dict[str, str]) -> list[str]:
    text = _without_pictures(text)
    return [
        name
        for name, value in secrets.items()
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(value)}(?![A-Za-z0-9])", text)
    ]


def test_the_browser_never_receives_the_specimen_or_its_truth(
    page: Page, streamlit_server: Server, trained_workspace: Path
) -> None:
    """Neither the page nor anything the server sent over the websocket (or HTTP) holds the shown case's specimen
    code, patient code, stored path or sha256; a tumor case's page and a non-tumor case's page are the same apart
    from the picture and the position; the case's token is nowhere either (element keys included)."""
    with session_scope(_db_url(trained_workspace)) as s:
        pool = studies.eligible_specimens(s, task="tumor", modalities=("FL", "WL"), splits=("test",))
    specimen_ids = [int(pool.loc[pool["truth"] == truth, "specimen_id"].iloc[0]) for truth in (0, 1)]
    setup = _study(trained_workspace, arms=("FL",), specimen_ids=specimen_ids)
    (reader,) = setup.readers

    received = _capture(page)

    outlines = []
    for k, case_id in enumerate(setup.order(reader, 1), start=1):
        secrets = _secrets(trained_workspace, case_id)
        _open(page, streamlit_server, reader, f"/read?study={setup.study_id}")  # each case as a new session shows it
        _expect_case(page, setup, 1, k)
        content = page.content()
        assert _leaks(content, secrets) == [], secrets
        outlines.append(_outline(page))
        _answer(page, setup, 1, k, label="non-tumor", rating="1 · very unsure")
        assert _leaks(page.content(), secrets) == [], secrets
    everything = "\n".join(received)
    # What was captured is what the page shows: the pictures and the signed-in reader's name are in it.
    assert "data:image/png;base64,<png>" in _without_pictures(everything) and reader.username in everything
    for case_id in setup.case_ids:
        assert _leaks(everything, _secrets(trained_workspace, case_id)) == []
    assert "Truth" not in everything and "truth" not in everything
    assert outlines[0] == outlines[1]


def _capture(page: Page) -> list[str]:
    """From now on, every websocket frame the page receives and every HTTP response body but Streamlit's static
    files, as text."""
    received: list[str] = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda f: received.append(_as_text(f))))
    page.on("response", lambda r: received.append(_body(r)))
    return received


def _as_text(frame: str | bytes) -> str:
    return frame.decode("latin-1") if isinstance(frame, bytes) else frame


def _body(response) -> str:
    if "/static/" in response.url:
        return ""  # Streamlit's own JavaScript and CSS
    try:
        return response.body().decode("latin-1")
    except Exception:  # redirects and aborted requests have no body
        return ""
