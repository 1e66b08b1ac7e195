"""Text from users is shown as text on every page (issue 13, item 5).

A private copy of the trained workspace gets markup in every field a user fills in: uploaded file names, a study's
title, instructions and arm names, usernames and display names (readers typed by the PI or created by a CSV import),
comments, model names and a model's training folder, reader ids and cells of CSVs uploaded on the Results page. Then
every page of every role (the role -> pages table is read from app/main.py, so a page added there is checked here
too) is rendered and driven to where those strings are shown, and every string of every element that Streamlit
renders as markdown (markdown, captions, alerts, headings, widget labels, radio and slider options, tab and expander
labels, progress texts, image captions, help) must hold the markup only escaped, and every Plotly label only as
entities. Select boxes and multiselects show their options as plain text in Streamlit 1.67 (tests/e2e checks that
in a browser) and are left out; data frames are plain text.
"""

from __future__ import annotations

import ast
import html
import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skimage.data
from streamlit.testing.v1 import AppTest

from core.settings import pointing_at
from db import repo
from db.models import utcnow
from db.session import session_scope
from services import studies
from services.diagnose import diagnose_files, load_predictor
from services.studies import ArmSpec
from tests.conftest import copy_workspace

ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "app" / "main.py"
MARKUP = (
    "![x](http://host/beacon.png) [Session expired](http://host/phish) <a href='http://host/a'>y</a> "
    ":red[z] :smile: $x^2$ www.host.example m@host.example"
)


def hostile(field: str) -> str:
    """``field``'s value: its name, then markup that must never render (an image, links, HTML, colour, emoji,
    maths, autolinks)."""
    return f"{field} {MARKUP}"


# Rendered markup: syntax still live after backslash escapes, and text Streamlit rewrites after parsing.
_SYNTAX = ("](http://host", "![x]", "[Session expired]", "<a href", ":red[z]", "$x^2$")
_REWRITTEN = re.compile(r"(https?://|www\.)host|@host|:smile:", re.IGNORECASE)
_ESCAPE = re.compile(r"\\[!-/:-@\[-`{-~]")
# String fields Streamlit renders as markdown, and the plain-text exceptions among them.
_MARKDOWN_FIELDS = {"body", "label", "text", "caption", "captions", "options", "help", "content"}
_PLAIN = {("Text", "body"), ("Json", "body"), ("Selectbox", "options"), ("MultiSelect", "options")}


def _role_pages() -> dict[str, list[str]]:
    """app/main.py's page scripts per role."""
    tables = {}
    for node in ast.parse(MAIN.read_text()).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        if isinstance(target, ast.Name) and target.id in ("_PAGES", "_ROLE_PAGES"):
            tables[target.id] = ast.literal_eval(node.value)
    return {role: [tables["_PAGES"][name][0] for name in names] for role, names in tables["_ROLE_PAGES"].items()}


def _walk(node) -> Iterator:
    yield node
    for child in getattr(node, "children", {}).values():
        yield from _walk(child)


def _strings(message) -> Iterator[tuple[str, str]]:
    """(where, text) of every string in ``message`` that is rendered as markdown, or as Plotly's HTML dialect."""
    kind = message.DESCRIPTOR.name
    for field, value in message.ListFields():
        values = list(value) if field.is_repeated else [value]
        if field.message_type is not None:
            for item in values:
                yield from _strings(item)
        elif kind == "PlotlyChart" and field.name == "spec":
            yield from (("plotly", text) for text in _json_strings(json.loads(value)))
        elif field.type == field.TYPE_STRING and field.name in _MARKDOWN_FIELDS and (kind, field.name) not in _PLAIN:
            yield from ((f"{kind}.{field.name}", text) for text in values)


def _json_strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _json_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_strings(item)


def _shown_as(where: str, text: str) -> tuple[str, bool]:
    """What the reader sees of ``text`` (escapes and invisible joiners gone), and whether any markup is live."""
    if where == "plotly":
        return html.unescape(text), "<a " in text or "<img" in text
    armed = _ESCAPE.sub("\0", text)
    parsed = _ESCAPE.sub(lambda m: m.group(0)[1], text)
    live = any(s in armed for s in _SYNTAX) or _REWRITTEN.search(parsed) is not None
    return parsed.replace("\u2060", ""), live


class Screens:
    """Every screen a test went through: each one checked for live markup as it is added."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def add(self, at: AppTest) -> AppTest:
        assert not at.exception, at.exception
        live = []
        for node in _walk(at._tree):
            if getattr(node, "proto", None) is not None:
                for where, text in _strings(node.proto):
                    shown, armed = _shown_as(where, text)
                    self.seen.append(shown)
                    if armed:
                        live.append(f"{where}: {text!r}")
        assert not live, "user text rendered as markup:\n" + "\n".join(live)
        return at

    def showed(self, *values: str) -> None:
        """Each of ``values`` was shown, as its own characters, in some markdown or plot label."""
        missing = [v for v in values if not any(v in s for s in self.seen)]
        assert not missing, f"never shown: {missing}"


@dataclass(frozen=True)
class Hostile:
    root: Path
    users: dict[str, int]  # pi, clinician, reader (mid-study), waiting (arm 1 done, arm 2 in wash-out)
    study_id: int
    prediction_id: int
    wl_model: str


def _read_arm(study_id: int, reader_id: int, arm_number: int, now: datetime | None = None, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    while True:
        with session_scope() as s:
            state = studies.reader_state(s, study_id, reader_id, now=now)
        if state.kind != "case" or state.case.arm_number != arm_number:
            return
        studies.record_read(
            study_id=study_id, reader_id=reader_id, arm_id=state.case.arm_id, token=state.case.token,
            label=int(rng.integers(0, 2)), rating=int(rng.integers(1, 6)), comment=hostile("comment"), now=now,
        )  # fmt: skip


@pytest.fixture(scope="module")
def seeded(trained_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    root = tmp_path_factory.mktemp("hostile") / "ws"
    copy_workspace(trained_workspace, root)
    with pointing_at(root):
        tag = uuid.uuid4().hex[:6]
        with session_scope() as s:
            users = {
                role: repo.create_user(s, f"{role}-{tag}", "pw-hostile-1", role, display_name=hostile(role)).id
                for role in ("pi", "clinician")
            }
            readers = [
                repo.create_user(s, hostile(f"reader {i}"), "pw-hostile-1", "reader", display_name=hostile(f"name {i}"))
                for i in range(4)
            ]
            wl = repo.find_model(s, "tiny-WL")
            for name, modality in ((hostile("model"), "WL"), (hostile("spectral model"), "spectral")):
                repo.register_model(
                    s, name=name, architecture=wl.architecture, task=wl.task, modality=modality,
                    image_size=wl.image_size, checkpoint_path=wl.checkpoint_path,
                    checkpoint_sha256=wl.checkpoint_sha256, threshold=wl.threshold,
                    threshold_policy=wl.threshold_policy, metrics=wl.metrics,
                    config={**wl.config, "trained_on": hostile("training folder")},
                )  # fmt: skip
            model = repo.find_model(s, hostile("model"))
            cases = studies.eligible_specimens(
                s, task="tumor", modalities=("FL", "WL"), splits=("train", "val", "test")
            )
            study = studies.create_study(
                s, title=hostile("title"), description=hostile("instructions") + "\n\n" + hostile("second line"),
                task="tumor", specimen_ids=[int(i) for i in cases["specimen_id"]],
                arms=(ArmSpec(hostile("arm FL"), "FL"), ArmSpec(hostile("arm WL"), "WL", washout_days=1)),
                allow_revisions=True, reader_ids=[r.id for r in readers], created_by=users["pi"],
            )  # fmt: skip
        retina = os.path.join(skimage.data.data_dir, "retina.jpg")
        (outcome,) = diagnose_files(
            load_predictor(model), model, [(hostile("file") + ".jpg", retina)], user_id=users["clinician"]
        )
        later = utcnow() + timedelta(days=2)
        for number, reader in enumerate(readers[:2]):  # two readers finish both arms: Results has every panel
            _read_arm(study.id, reader.id, 1, seed=number)
            _read_arm(study.id, reader.id, 2, now=later, seed=number + 10)
        _read_arm(study.id, readers[2].id, 1)  # done with arm 1: arm 2 waits for its wash-out
        users |= {"reader": readers[3].id, "waiting": readers[2].id}
        yield Hostile(root, users, study.id, outcome.prediction_id, model.name)


@pytest.fixture
def hostile_ws(seeded: Hostile, monkeypatch: pytest.MonkeyPatch) -> Hostile:
    monkeypatch.setenv("IOAI_WORKSPACE", str(seeded.root))
    monkeypatch.setenv("IOAI_DATABASE_URL", f"sqlite:///{seeded.root / 'study.db'}")
    return seeded


def _page(user_id: int, script: str, screens: Screens, **state) -> AppTest:
    at = AppTest.from_file(str(MAIN), default_timeout=120)
    at.session_state["auth_user_id"] = user_id
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    return screens.add(at.switch_page(script).run())


def _model_id(name: str) -> int:
    with session_scope() as s:
        return repo.find_model(s, name).id


ROLE_PAGES = [(role, script) for role, scripts in _role_pages().items() for script in scripts]


@pytest.mark.parametrize(("role", "script"), ROLE_PAGES, ids=[f"{r}-{Path(s).stem}" for r, s in ROLE_PAGES])
def test_every_page_of_every_role_shows_user_text_as_text(hostile_ws, role, script):
    screens = Screens()
    _page(hostile_ws.users[role], script, screens)
    if script.endswith("home.py"):
        screens.showed(hostile("name 3") if role == "reader" else hostile(role))  # the display name


@pytest.mark.parametrize("role", ["clinician", "pi"])
def test_diagnose_shows_uploaded_file_names_model_names_and_refusals_as_text(hostile_ws, role):
    screens = Screens()
    at = _page(hostile_ws.users[role], "../pages/diagnose.py", screens)
    screens.showed(hostile("spectral model"))  # "not offered here" names models of other data
    at.radio(key="diagnose_modality").set_value("WL").run()
    assert at.selectbox(key="diagnose_model").value == _model_id(hostile_ws.wl_model)
    retina = Path(skimage.data.data_dir, "retina.jpg").read_bytes()
    at.file_uploader(key="diagnose_files").set_value(
        [(hostile("upload") + ".jpg", retina, "image/jpeg"), (hostile("broken") + ".png", b"not an image", "image/png")]
    )
    next(b for b in at.button if b.label == "Diagnose").click()
    screens.add(at.run())
    assert len(at.error) == 1 and at.dataframe
    screens.showed(hostile("upload") + ".jpg", hostile("broken") + ".png", hostile("model"))
    if role == "clinician":  # their earlier diagnosis, reopened from the history
        at.selectbox(key="diagnose_history_pick").set_value(hostile_ws.prediction_id)
        screens.add(at.run())
        screens.showed(hostile("file") + ".jpg")


def test_data_reopens_a_prediction_with_its_file_and_model_names_as_text(hostile_ws):
    screens = Screens()
    at = _page(hostile_ws.users["pi"], "../pages/data.py", screens)
    at.selectbox(key="data_open_pick").set_value(hostile_ws.prediction_id)
    screens.add(at.run())
    screens.showed(hostile("file") + ".jpg", hostile("model"))


def test_studies_show_titles_instructions_arms_errors_and_imported_readers_as_text(hostile_ws):
    screens = Screens()
    study = hostile_ws.study_id
    at = _page(hostile_ws.users["pi"], "../pages/studies.py", screens)
    at.selectbox(key="studies_pick").set_value(study)
    screens.add(at.run())
    screens.showed(hostile("title"), hostile("instructions"), hostile("second line"), hostile("arm FL"))
    at.text_input(key="studies_title").input(hostile("title"))  # taken: the refusal quotes it
    at.button(key="studies_create").click()
    screens.add(at.run())
    assert any("exists already" in e.value for e in at.error)
    at.text_input(key="studies_title").input(hostile("new title"))
    at.button(key="studies_create").click()
    screens.add(at.run())
    assert any("created with" in s.value for s in at.success)
    screens.showed(hostile("new title"))
    at.selectbox(key="studies_pick").set_value(study)
    screens.add(at.run())
    with session_scope() as s:
        codes = list(studies.export_cases(s, study)["case_id"])
    reads = pd.DataFrame(
        {"case_id": codes, "reader_id": hostile("imported reader"), "arm": hostile("arm FL"), "label": 1, "rating": 3}
    )
    at.file_uploader(key=f"studies_import_{study}").set_value(
        ("reads.csv", reads.to_csv(index=False).encode(), "text/csv")
    )
    at.checkbox(key=f"studies_import_create_{study}").check()
    screens.add(at.run())
    at.button(key=f"studies_import_go_{study}").click()
    screens.add(at.run())
    assert any("Imported" in s.value for s in at.success), [e.value for e in at.error]
    screens.showed(hostile("imported reader"))


def test_results_show_arm_names_readers_and_model_names_as_text(hostile_ws):
    screens = Screens()
    state = {"results_bootstrap": 100, "results_permutations": 100, "results_study": hostile_ws.study_id}
    _page(hostile_ws.users["pi"], "../pages/results.py", screens, **state)
    screens.showed(
        hostile("arm FL"), hostile("arm WL"), hostile("reader 0"), hostile("reader 2"), hostile("model")
    )  # tabs, legends, the unfinished readers, the WL arm's model


def test_results_of_uploaded_csvs_show_reader_ids_and_bad_cells_as_text(hostile_ws):
    screens = Screens()
    at = _page(hostile_ws.users["pi"], "../pages/results.py", screens)
    at.radio(key="results_source").set_value("Uploaded CSV files").run()
    rng = np.random.default_rng(3)
    cases = [f"c{i}" for i in range(30)]
    truth = rng.integers(0, 2, len(cases))
    predictions = pd.DataFrame(
        {"case_id": cases, "truth": truth, "score": np.clip(truth * 0.4 + rng.random(30) * 0.6, 0, 1)}
    )
    reads = pd.concat(
        pd.DataFrame({"case_id": cases, "reader_id": hostile(f"csv reader {r}"), "label": rng.integers(0, 2, 30),
                      "rating": rng.integers(1, 6, 30), "arm": hostile("csv arm")})
        for r in range(2)
    )  # fmt: skip
    at.file_uploader(key="results_p_csv").set_value(("p.csv", predictions.to_csv(index=False).encode(), "text/csv"))
    at.file_uploader(key="results_r_csv").set_value(("r.csv", reads.to_csv(index=False).encode(), "text/csv"))
    screens.add(at.run())
    screens.showed(hostile("csv reader 0"), hostile("csv arm"))
    bad = reads.assign(label=hostile("label"))
    at.file_uploader(key="results_r_csv").set_value(("r.csv", bad.to_csv(index=False).encode(), "text/csv"))
    screens.add(at.run())
    assert at.error
    screens.showed(hostile("label"))


def test_models_show_a_models_training_folder_as_text(hostile_ws):
    screens = Screens()
    at = _page(hostile_ws.users["pi"], "../pages/models.py", screens)
    at.selectbox(key="models_pick").set_value(_model_id(hostile_ws.wl_model))
    screens.add(at.run())
    screens.showed(hostile("training folder"))


def test_read_shows_instructions_and_arm_names_as_text(hostile_ws):
    screens = Screens()
    _page(hostile_ws.users["reader"], "../pages/read.py", screens)
    screens.showed(hostile("instructions"), hostile("second line"), hostile("arm FL"))  # a case of arm 1
    _page(hostile_ws.users["waiting"], "../pages/read.py", screens)
    screens.showed(hostile("arm WL"))  # arm 2 opens after its wash-out


def test_a_mosaic_file_name_is_shown_as_text(in_rcm):
    root, info = in_rcm
    screens = Screens()
    with session_scope() as s:
        clinician = repo.create_user(s, f"c-{uuid.uuid4().hex[:6]}", "pw-hostile-1", "clinician").id
    at = _page(clinician, "../pages/diagnose.py", screens)
    at.file_uploader(key="mosaic_file").set_value(
        (hostile("mosaic") + ".png", (root / "mosaic.png").read_bytes(), "image/png")
    )
    next(b for b in at.button if b.label == "Stitch heatmap").click()
    screens.add(at.run())
    assert at.success
    screens.showed(hostile("mosaic") + ".png")
    at.file_uploader(key="mosaic_file").set_value((hostile("not a mosaic") + ".png", b"nope", "image/png"))
    next(b for b in at.button if b.label == "Stitch heatmap").click()
    screens.add(at.run())
    assert at.error
    screens.showed(hostile("not a mosaic") + ".png")


def test_the_check_sees_markup_that_is_not_escaped():
    """The check itself: raw markup, escapes without joiners (autolinks) and raw Plotly HTML are caught."""
    from core.text import md_escape, plot_escape

    assert _shown_as("Markdown.body", hostile("x"))[1]
    assert _shown_as("Markdown.body", re.sub(r"([!-/:-@\[-`{-~])", r"\\\1", hostile("x")))[1]  # autolinks
    assert _shown_as("plotly", hostile("x"))[1]
    assert _shown_as("Markdown.body", md_escape(hostile("x"))) == (hostile("x"), False)
    assert _shown_as("plotly", plot_escape(hostile("x"))) == (hostile("x"), False)
