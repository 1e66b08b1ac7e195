"""Read (reader): blind reading of the studies a reader is invited to, one case at a time.

The server decides which case is shown (the first unanswered one in this reader's own order) and checks every
answer again when it is stored; nothing typed into the URL or left in session state can reach another case, another
study, the truth or the AI output of an unaided arm. The answer form is bound to the case it was drawn for, so a
double click or a late second click can never answer the next case.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import threading

import plotly.graph_objects as go
import streamlit as st

from app.auth import require_role
from app.mask_canvas import mask_canvas
from app.widgets import picture
from core.reading import COLORMAPS, DEFAULT_COLORMAP
from core.text import md_escape
from db.models import utcnow
from services import studies
from services.studies import RATING_RANGES, ReaderCase, StudyError, StudyInfo

STUDY_KEY = "read_study"
REVISE_KEY = "read_revise"  # (arm id, token) of an answered case reopened for a correction
SHOWN_KEY = "read_shown"  # (arm id, token) -> when this session first showed the case
FLASH_KEY = "read_flash"
CANVAS_KEY = "read_canvas"  # (arm id, token, revising) -> the drawing so far and the start it was drawn from
_CONFIDENCE = {1: "1 · very unsure", 2: "2", 3: "3", 4: "4", 5: "5 · certain"}

user = require_role("reader")


def _choose_study(mine: list[StudyInfo]) -> StudyInfo | None:
    """The study to read: from the URL (``?study=ID``), the picker, or the only open one; but only ever one of the
    reader's own (anything else is refused and forgotten)."""
    by_id = {s.id: s for s in mine}

    def own(value: object) -> int | None:
        try:
            return int(value) if int(value) in by_id else None
        except (TypeError, ValueError):
            return None

    asked = st.query_params.get("study")
    if asked is not None and own(asked) is None:
        st.error("That study is not assigned to you. Choose one of your studies below.")
        del st.query_params["study"]
        asked = None
    if STUDY_KEY in st.session_state and own(st.session_state[STUDY_KEY]) is None:
        st.error("That study is not assigned to you. Choose one of your studies below.")
        del st.session_state[STUDY_KEY]
    if STUDY_KEY in st.session_state:
        pass  # the picker's choice wins over the URL, which follows it below
    elif asked is not None:  # a new session (a refresh, a bookmark): resume the study in the URL
        st.session_state[STUDY_KEY] = own(asked)
    else:
        candidates = [s.id for s in mine if s.status == "open"] or list(by_id)
        st.session_state[STUDY_KEY] = candidates[0] if len(candidates) == 1 else None
    picked = st.sidebar.selectbox(
        "Study",
        list(by_id),
        format_func=lambda i: f"{by_id[i].title}{'' if by_id[i].status == 'open' else ' (closed)'}",
        placeholder="Choose a study",
        key=STUDY_KEY,
    )
    if picked is None:
        return None
    if st.session_state.get("read_last_study") != picked:
        st.session_state.pop(REVISE_KEY, None)
        st.session_state["read_last_study"] = picked
    st.query_params["study"] = str(picked)
    return by_id[picked]


@st.cache_data(max_entries=64, show_spinner=False)
def _picture(path: str, modality: str, window: tuple[float, float], colormap: str, heatmap: str | None, alpha: float):
    return studies.case_png(path, modality, window=window, colormap=colormap, heatmap_path=heatmap, alpha=alpha)


def _display_settings(case: ReaderCase) -> tuple[tuple[float, float], str, str | None, float]:
    """Colormap and intensity window (single-channel modalities) and, in a heatmap arm, the overlay's switch and
    opacity: ``(window, colormap, heatmap path or None, opacity)``."""
    window, colormap, heatmap, alpha = (0.0, 1.0), DEFAULT_COLORMAP, None, 0.4
    if case.modality != "WL":
        colormap = st.selectbox("Colormap", COLORMAPS, index=COLORMAPS.index(DEFAULT_COLORMAP), key="read_colormap")
        window = st.slider("Intensity window", 0.0, 1.0, (0.0, 1.0), 0.01, key="read_window")
        if window[1] <= window[0]:
            window = (window[0], min(1.0, window[0] + 0.01)) if window[0] < 1.0 else (0.99, 1.0)
    if case.ai is not None and case.ai.heatmap_path and st.toggle("AI heatmap", value=True, key="read_heatmap_on"):
        heatmap = case.ai.heatmap_path
        alpha = st.slider("Heatmap opacity", 0.0, 1.0, 0.4, 0.05, key="read_heatmap_alpha")
    return tuple(window), colormap, heatmap, alpha


def _show_image(case: ReaderCase, window: tuple[float, float], colormap: str, heatmap: str | None, alpha: float):
    """The case's image, large, with pan/zoom."""
    png = _picture(case.image_path, case.modality, window, colormap, heatmap, alpha)
    figure = go.Figure(go.Image(source="data:image/png;base64," + base64.b64encode(png).decode()))
    figure.update_layout(dragmode="pan", height=680, margin={"l": 0, "r": 0, "t": 0, "b": 0})
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False, scaleanchor="x")
    st.plotly_chart(
        figure, config={"scrollZoom": True, "displaylogo": False}, width="stretch", key=f"read_image_{_slot(case)}"
    )
    st.caption("Drag to pan, scroll to zoom, double-click to reset.")


def _show_ai(case: ReaderCase, study: StudyInfo) -> None:
    if case.ai is None:
        return
    parts = []
    if case.ai.probability is not None:
        parts.append(f"probability of {study.labels[1]} **{case.ai.probability:.2f}**")
    if case.ai.decision is not None:
        parts.append(f"decision **{case.ai.decision}**")
    if case.ai.heatmap_path:
        parts.append("heatmap over the image (warm colours: strongest evidence)")
    if parts:
        st.info("AI output: " + " · ".join(parts))
    else:
        st.warning("The AI output for this case is not ready yet; answer from the image alone or come back later.")


def _submit(study_id: int, arm_id: int, token: str, revise: bool, keys: dict[str, str]) -> None:
    """Form callback, bound to the case the form was drawn for (its arguments were fixed when it was drawn, on the
    server: the case's token never reaches the browser)."""
    label = st.session_state.get(keys["label"])
    shown = st.session_state.get(SHOWN_KEY, {}).get((arm_id, token))
    try:
        result = studies.record_read(
            study_id=study_id,
            reader_id=user.id,
            arm_id=arm_id,
            token=token,
            label=None if label is None else int(label),
            rating=st.session_state.get(keys["rating"]),
            comment=st.session_state.get(keys["comment"]),
            shown_at=shown,
            revise=revise,
        )
    except StudyError as error:
        st.session_state[FLASH_KEY] = ("error", str(error))
        return
    if revise:
        st.session_state.pop(REVISE_KEY, None)
        st.session_state[FLASH_KEY] = ("success", f"Correction saved (version {result.version}).")
    elif result.status == "duplicate" and st.session_state.get("read_last_saved") != (arm_id, token):
        st.session_state[FLASH_KEY] = ("info", result.message + " Here is your next case.")
    else:  # stored now, or by this session's own first click of a double click
        st.session_state["read_last_saved"] = (arm_id, token)
        st.session_state[FLASH_KEY] = ("success", "Answer saved.")


def _slot(case: ReaderCase, revise: bool = False) -> str:
    """What element keys (visible in the page as CSS classes) say about a case: only what the page shows anyway
    (study, arm number, "case k of n"), never its token or anything else that could match it across arms."""
    return f"{case.study_id}_{case.arm_number}_{case.k}_{int(revise)}"


def _keys(case: ReaderCase, revise: bool) -> dict[str, str]:
    return {name: f"read_{name}_{_slot(case, revise)}" for name in ("label", "rating", "comment")}


def _answer_form(case: ReaderCase, study: StudyInfo, revise: bool) -> None:
    keys = _keys(case, revise)
    previous = case.previous
    with st.form(f"read_form_{_slot(case, revise)}", border=True):
        st.radio(
            "Diagnosis",
            (0, 1),
            index=None if previous is None else previous[0],
            format_func=lambda i: study.labels[i],
            horizontal=True,
            key=keys["label"],
        )
        low, high = RATING_RANGES[study.rating_scale]
        if study.rating_scale == "five":
            st.radio(
                "Confidence",
                list(range(low, high + 1)),
                index=None if previous is None or previous[1] is None else previous[1] - low,
                format_func=lambda v: _CONFIDENCE[v],
                horizontal=True,
                key=keys["rating"],
            )
        else:
            st.slider(
                f"Confidence that this is {study.labels[1]} (0 = surely {study.labels[0]}, 100 = surely "
                f"{study.labels[1]})",
                low,
                high,
                50 if previous is None or previous[1] is None else previous[1],
                key=keys["rating"],
            )
        st.text_input(
            "Comment (optional)",
            value="" if previous is None else previous[2] or "",
            max_chars=studies.MAX_COMMENT,
            key=keys["comment"],
        )
        st.form_submit_button(
            "Save correction" if revise else "Submit answer",
            type="primary",
            shortcut="Ctrl+Enter",
            on_click=_submit,
            args=(study.id, case.arm_id, case.token, revise, keys),
        )
    st.caption("Keyboard: Tab and the arrow keys choose; Tab on to the comment box, then Ctrl+Enter (⌘+Enter) submits.")


def _drawing(case: ReaderCase, png: bytes, revise: bool):
    """The mask editor on the case (a regions study): its start is the reader's own previous drawing when correcting,
    else the model's thresholded map in an arm that starts from the AI, else empty; a change of the display settings
    (a new picture) carries the drawing so far over as the new start."""
    memo = st.session_state.setdefault(CANVAS_KEY, {})
    slot = (case.arm_id, case.token, revise)
    digest = hashlib.sha256(png).hexdigest()
    entry = memo.get(slot)
    if entry is None:
        start, no_region, from_ai = None, False, False
        if revise:
            own = studies.own_masks(case.study_id, user.id, case.arm_id, case.token)
            if own is not None:
                start, no_region = own
        elif case.starts_from_ai:
            start = studies.start_masks(case.study_id, user.id, case.arm_id, case.token)
            from_ai = start is not None
        entry = memo[slot] = {"image": digest, "start": start, "no_region": no_region, "drawn": None, "ai": from_ai}
    elif entry["image"] != digest:
        if entry["drawn"] is not None:
            entry["start"], entry["no_region"] = entry["drawn"]
        entry["image"] = digest
    state = mask_canvas(
        png,
        key=f"read_mask_{_slot(case, revise)}",
        layers=case.layers,
        start=entry["start"],
        start_no_region=entry["no_region"],
    )
    if state.error:
        st.error(md_escape(f"Your last stroke could not be read ({state.error}); draw it again."))
    elif state.version > 0:
        entry["drawn"] = (dict(state.masks), state.no_region)
    return state, entry["ai"]


def _will_save(state) -> str:
    """What the button would store now, as the server has it (the reader sees their last stroke arrived)."""
    if state.masks is None:
        return "The drawing could not be read; draw it again."
    if state.no_region:
        return "Will be saved: no region."
    pixels = sum(int(mask.sum()) for mask in state.masks.values())
    return f"Will be saved: {pixels:,} px of region." if pixels else "Nothing drawn yet."


def _submit_drawing(case: ReaderCase, state, from_ai: bool, revise: bool) -> None:
    """Store the drawing of the case it was drawn on (the button is keyed to the case's place, so a double click
    can never submit it for the next case)."""
    if state.masks is None:
        st.session_state[FLASH_KEY] = ("error", "The drawing could not be read; draw it again.")
        return
    try:
        result = studies.record_annotation(
            study_id=case.study_id,
            reader_id=user.id,
            arm_id=case.arm_id,
            token=case.token,
            masks=state.masks,
            empty=state.no_region,
            shown_at=st.session_state.get(SHOWN_KEY, {}).get((case.arm_id, case.token)),
            started_from_ai=from_ai,
            revise=revise,
        )
    except StudyError as error:
        st.session_state[FLASH_KEY] = ("error", str(error))
        return
    st.session_state.get(CANVAS_KEY, {}).pop((case.arm_id, case.token, revise), None)
    if revise:
        st.session_state.pop(REVISE_KEY, None)
        st.session_state[FLASH_KEY] = ("success", f"Correction saved (version {result.version}).")
    elif result.status == "duplicate":
        st.session_state[FLASH_KEY] = ("info", result.message + " Here is your next case.")
    else:
        st.session_state[FLASH_KEY] = ("success", "Drawing saved.")


def _render_ahead(study_id: int, colormap: str) -> None:
    """Render this reader's next cases in the background (kept in the case cache), so the next one is served from
    disk instead of being decoded, rendered and encoded while the reader waits."""
    upcoming = studies.upcoming_images(study_id, user.id)

    def work() -> None:
        for path, modality in upcoming:
            with contextlib.suppress(Exception):  # a failure here only means the case renders when it is shown
                studies.case_png(path, modality, colormap=colormap)

    if upcoming:
        threading.Thread(target=work, name="read-ahead", daemon=True).start()


def _note_shown(case: ReaderCase) -> None:
    """Remember when this session first showed the case (the read's start), and audit the view once."""
    shown = st.session_state.setdefault(SHOWN_KEY, {})
    if (case.arm_id, case.token) not in shown:
        shown[(case.arm_id, case.token)] = utcnow()
        studies.note_case_shown(case.study_id, user.id, case.arm_id, case.token)


def _training(study: StudyInfo) -> None:
    cases = studies.training_cases(study.id, user.id)
    st.subheader("Training cases")
    st.write(
        f"Before reading, look at these {len(cases)} cases with their truth; they are not part of the study and "
        "nothing you do here is recorded as an answer."
    )
    for column, (path, modality, truth) in zip(st.columns(min(4, len(cases))) * len(cases), cases, strict=False):
        with column:
            picture(_picture(path, modality, (0.0, 1.0), DEFAULT_COLORMAP, None, 0.0), f"Truth: {truth}")
    if st.button("I have reviewed the training cases: start reading", type="primary"):
        studies.complete_training(study.id, user.id)
        st.rerun()


def _revision_picker(study: StudyInfo) -> tuple[int, str] | None:
    if not study.allow_revisions:
        st.session_state.pop(REVISE_KEY, None)
        return None
    answered = studies.revisable_cases(study.id, user.id)
    if answered:
        with st.expander("Go back to a case you answered"):
            labels = {(arm_id, token): f"{arm} · case {k}: {words}" for arm_id, arm, token, k, words in answered}
            choice = st.selectbox("Answered case", list(labels), format_func=labels.get, key="read_revise_pick")
            if st.button("Open it to correct", key="read_revise_open"):
                st.session_state[REVISE_KEY] = choice
    return st.session_state.get(REVISE_KEY)


st.title("Read")
mine = studies.reader_studies(user.id)
if not mine:
    st.info("No reader study is assigned to you yet. Your study coordinator will invite you when one opens.")
    st.stop()
study = _choose_study(mine)
if study is None:
    st.stop()
if study.description:
    st.caption(md_escape(study.description, multiline=True))
flash = st.session_state.pop(FLASH_KEY, None)
if flash:
    getattr(st, flash[0])(md_escape(flash[1]))

revising = _revision_picker(study)
try:
    if revising:
        state = studies.ReaderState("case", case=studies.case_for_revision(study.id, user.id, *revising))
    else:
        state = studies.reader_state(study.id, user.id)
except StudyError as error:
    st.session_state.pop(REVISE_KEY, None)
    st.error(md_escape(error))
    st.stop()

if state.kind == "training":
    _training(study)
elif state.kind != "case":
    say = st.success if state.kind == "done" else st.info if state.kind == "washout" else st.warning
    say(md_escape(state.message))
else:
    case = state.case
    _note_shown(case)
    if revising:
        st.warning(
            f"Correcting your answer to case {case.k} of {case.n} ({md_escape(case.arm_name)}). The old answer is kept."
        )
        if st.button("Back to reading without changing it", key="read_revise_cancel"):
            st.session_state.pop(REVISE_KEY, None)
            st.rerun()
    st.markdown(
        f"**Arm {case.arm_number} of {case.n_arms}: {md_escape(case.arm_name)}** · case **{case.k}** of **{case.n}**"
    )
    st.progress((case.k - 1) / case.n)
    if case.ai is not None and case.ai.model_name == "":
        from services.study_ai import ensure_case_ai

        with st.spinner("Preparing the AI output for this case..."):
            ensure_case_ai(study.id, case.arm_id, case.token)
        st.rerun()
    image_column, answer_column = st.columns([3, 1], gap="medium")
    with answer_column:  # drawn first: the picture depends on the display settings below the form
        _show_ai(case, study)
        if not case.layers:
            _answer_form(case, study, revise=bool(revising))
        with st.expander("Display", expanded=case.modality != "WL"):
            settings = _display_settings(case)
    if case.layers:  # a regions study: the reader draws the regions that carry the diagnosis
        with image_column:
            layers = " and ".join(f"**{md_escape(layer)}**" for layer in case.layers)
            st.markdown(
                f"Draw the regions that carry the diagnosis ({layers}), or press **No region** if there is none."
            )
            drawing, from_ai = _drawing(case, _picture(case.image_path, case.modality, *settings), bool(revising))
        with answer_column:
            if from_ai:
                st.caption("The drawing starts from the AI's map: correct it, or submit it as it is if you agree.")
            st.caption(_will_save(drawing))
            if st.button(
                "Save correction" if revising else "Submit drawing", type="primary", key=f"read_draw_{_slot(case)}"
            ):
                _submit_drawing(case, drawing, from_ai, bool(revising))
                st.rerun()
    else:
        with image_column:
            _show_image(case, *settings)
    if not revising:
        _render_ahead(study.id, st.session_state.get("read_colormap", DEFAULT_COLORMAP))
