"""CLE cohorts (patients, biopsy sites, clips or frames, labels) and RCM mosaics imported from a manifest, and reader
studies whose cases are CLE frames (diagnostic?) or RCM mosaics (aspecific?), unaided and aided by the model's own
map (MLCAM-LICI's; CAM stitched over the mosaic)."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from core.data.io import read_image
from core.data.manifest import parse_frames, read_manifest
from core.data.synth_cle import make_cle_clip, write_clip
from core.settings import workspace_dir
from db import repo
from db.models import Clip, Label, Prediction, Specimen, SpecimenImage
from db.session import read_scope, session_scope
from services import studies
from services.importer import frame_code, import_manifest
from services.studies import ArmSpec, StudyError
from services.study_ai import missing_ai, prepare_study_ai
from tests.conftest import FRAMES_COHORT

FRAMES, SIZE, STEP = FRAMES_COHORT["frames_per_clip"], FRAMES_COHORT["size"], FRAMES_COHORT["step"]
PATIENTS, SITES = FRAMES_COHORT["patients"], FRAMES_COHORT["sites_per_patient"]


def _clip_seed(patient: int, site: int, seed: int = 0) -> int:
    return seed * 1000 + patient * 10 + site  # as write_cle_cohort draws them


def _counts() -> tuple[int, int, int]:
    with read_scope() as s:
        return tuple(s.scalar(select(func.count()).select_from(t)) for t in (Specimen, SpecimenImage, Clip))


# ------------------------------------------------------------------------------------------------ the manifest


def test_frames_cells_pick_single_frames_ranges_open_ends_and_steps() -> None:
    picked = parse_frames("3; 10-12, 20-/5 30")
    assert [i for i in range(40) if i in picked] == [3, 10, 11, 12, 20, 25, 30, 35]
    assert parse_frames("") is None and parse_frames("all") is None
    assert picked.beyond(21) == ["30"]  # 20-/5 starts before the end; 30 does not
    for bad, reason in (("5-2", "ends before"), ("a-b", "is not a frame"), ("3/0", "step"), ("-4", "is not")):
        with pytest.raises(ValueError, match=reason):
            parse_frames(bad)


def test_a_manifest_needs_a_label_column_and_frames_only_for_cle(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("patient_id,specimen_id,modality,path\nP,S,CLE,a.png\n")
    rows, errors = read_manifest(tmp_path / "m.csv")
    assert not rows and "no label column" in errors[0]
    (tmp_path / "m.csv").write_text(
        "patient_id,specimen_id,modality,path,diagnostic,frames\n"
        "P,S,FL,a.tif,1,0-3\n"  # frames of an FL image
        "P,T,CLE,c.mp4,maybe,\n"  # not a yes/no
        "P,U,CLE,c.mp4,1,0-3\n"
        "P,U,CLE,c.mp4,0,4-\n"  # the same specimen's other stretch: fine
        "P,U,CLE,c.mp4,0,\n"  # the whole clip again: a second image
    )
    rows, errors = read_manifest(tmp_path / "m.csv")
    assert [r.line for r in rows] == [4, 5]
    assert [e.split(": ", 1)[0] for e in errors] == ["m.csv line 2", "m.csv line 3", "m.csv line 6"]
    assert "CLE clips only" in errors[0] and "diagnostic 'maybe'" in errors[1] and "second CLE image" in errors[2]


# ------------------------------------------------------------------------------------------------ the import


def test_a_cle_cohort_becomes_one_specimen_per_picked_frame_with_its_site_and_label(workspace, frame_cohorts) -> None:
    cle, _ = frame_cohorts
    report = import_manifest(cle)
    assert not report.errors and report.clips == PATIENTS * SITES
    per_clip = len(range(0, FRAMES, STEP))  # every stretch starts its own step, so at least this many
    assert report.images >= PATIENTS * SITES * per_clip and report.specimens == report.images
    with read_scope() as s:
        rows = s.execute(
            select(Specimen.code, Specimen.site, Specimen.split, Label.diagnostic, SpecimenImage, Clip.original_name)
            .join(Label, Label.specimen_id == Specimen.id)
            .join(SpecimenImage, SpecimenImage.specimen_id == Specimen.id)
            .join(Clip, Clip.id == SpecimenImage.clip_id)
        ).all()
        assert len(rows) == report.images
        splits: dict[str, set[str]] = {}
        checked = 0
        for code, site, split, diagnostic, image, clip_name in rows:
            patient, site_number = int(code[5:7]), int(code[9])
            assert code == frame_code(f"CLE-P{patient:02d}-S{site_number}", image.frame)
            assert site == f"site {site_number}" and image.modality == "CLE"
            clip = make_cle_clip(FRAMES, SIZE, seed=_clip_seed(patient, site_number), fps=20.0)
            assert diagnostic == bool(clip.labels[image.frame])  # each stretch's label, frame by frame
            splits.setdefault(f"P{patient}", set()).add(split)
            if clip_name.endswith(".tif"):  # lossless: the stored frame is the clip's frame
                stored = read_image(workspace_dir() / image.path).array
                np.testing.assert_array_equal(stored, clip.frames[image.frame])
                checked += 1
        assert checked and all(len(found) == 1 for found in splits.values())  # a patient's frames in one split
        assert s.scalar(select(func.count()).select_from(Clip).where(Clip.user_id.is_(None))) == PATIENTS * SITES
        assert {c.n_frames for c in s.scalars(select(Clip))} == {FRAMES}
    before = _counts()
    again = import_manifest(cle)
    assert not again.errors and _counts() == before  # importing again updates, never duplicates


def test_refused_clip_rows_store_nothing_of_themselves_and_the_rest_is_imported(workspace, tmp_path: Path) -> None:
    clip = make_cle_clip(12, 32, seed=1)
    write_clip(clip.frames, tmp_path / "good.tif", fps=20.0)
    write_clip(clip.frames, tmp_path / "other.mp4", fps=20.0)
    (tmp_path / "broken.mp4").write_bytes((tmp_path / "other.mp4").read_bytes()[:600])
    (tmp_path / "manifest.csv").write_text(
        "patient_id,specimen_id,modality,path,diagnostic,frames,site\n"
        "P1,A,CLE,good.tif,0,0-5,s1\n"
        "P1,B,CLE,good.tif,1,5-8,s1\n"  # frame 5 is line 2's
        "P1,C,CLE,good.tif,1,10-20/2,s1\n"  # 10 is in the clip, 20 is not: the row is fine (a range may run on)
        "P1,D,CLE,good.tif,1,30,s1\n"  # past the end
        "P1,E,CLE,broken.mp4,1,,s2\n"  # a truncated video
        "P1,F,RCM,other.mp4,1,,s3\n"  # a clip that says it is a mosaic
    )
    report = import_manifest(tmp_path / "manifest.csv")
    by_line = {e.split(":", 1)[0]: e for e in report.errors}
    assert set(by_line) == {"line 3", "line 5", "line 6", "line 7"}, report.errors
    assert "also on line 2" in by_line["line 3"] and "past its end" in by_line["line 5"]
    assert "broken.mp4" in by_line["line 6"] and "imported as CLE" in by_line["line 7"]
    with read_scope() as s:
        codes = set(s.scalars(select(Specimen.code)))
        clips = s.scalars(select(Clip.original_name)).all()
    assert codes == {frame_code("A", i) for i in range(6)} | {frame_code("C", i) for i in (10,)}
    assert clips == ["good.tif"]  # the refused clips are not kept


def test_an_rcm_mosaic_is_aspecific_by_its_manifest_or_else_by_its_mask(
    workspace, frame_cohorts, tmp_path: Path
) -> None:
    _, rcm = frame_cohorts
    shutil.copytree(rcm.parent, tmp_path / "rcm")
    text = (tmp_path / "rcm" / "manifest.csv").read_text().splitlines()
    header, rows = text[0].split(","), [line.split(",") for line in text[1:]]
    where = header.index("aspecific")
    expected = {row[1]: row[where] == "1" for row in rows}
    unlabelled = [",".join(c for i, c in enumerate(line) if i != where) for line in [header, *rows]]
    assert "aspecific" not in unlabelled[0]
    unlabelled[0] += ",tumor"  # a label column, empty on every row: the masks decide
    (tmp_path / "rcm" / "manifest.csv").write_text("\n".join(unlabelled) + "\n")
    report = import_manifest(tmp_path / "rcm" / "manifest.csv")
    assert not report.errors and report.images == len(rows)
    with read_scope() as s:
        found = dict(s.execute(select(Specimen.code, Label.aspecific).join(Label)).tuples().all())
    assert found == expected and set(found.values()) == {True, False}


# ------------------------------------------------------------------------------------------------ studies


def _people(tag: str) -> tuple[int, list[int]]:
    with session_scope() as s:
        pi = repo.create_user(s, f"pi-{tag}", "pw-pi-123", "pi").id
        return pi, [repo.create_user(s, f"r{i}-{tag}", "pw-reader-1", "reader").id for i in range(2)]


def test_a_study_of_cle_frames_asks_diagnostic_and_shows_the_models_own_map(in_frames) -> None:
    tag = uuid.uuid4().hex[:8]
    pi, readers = _people(tag)
    with read_scope() as s:
        pool = studies.eligible_specimens(s, task="diagnostic", modalities=["CLE"], splits=("train", "val", "test"))
    assert set(pool["truth"]) == {0, 1} and pool["specimen"].str.contains("-f").all()
    cases = [int(i) for i in pool.groupby("truth").head(3)["specimen_id"]]
    arms = [
        ArmSpec("CLE", "CLE"),
        ArmSpec("CLE + AI", "CLE", model_id=in_frames["CLE"].id, show_probability=True, heatmap_method="default"),
    ]
    with session_scope() as s:
        study = studies.create_study(
            s, title=f"Frames {tag}", task="diagnostic", specimen_ids=cases, arms=arms, reader_ids=readers,
            created_by=pi,
        )  # fmt: skip
    assert study.labels == ("non-diagnostic", "diagnostic")
    assert study.arms[1].heatmap_method == "mlcam-lici"  # "default": the model's own map
    prepare_study_ai(study.id)  # other tests of the shared workspace may have computed some of these already
    assert missing_ai(study.id) == []
    for arm_number, arm in enumerate(study.arms, start=1):
        for _ in cases:
            with read_scope() as s:
                state = studies.reader_state(s, study.id, readers[0])
            case = state.case
            assert case is not None and case.modality == "CLE" and case.arm_number == arm_number
            assert (case.ai is None) == (arm_number == 1)  # the unaided arm shows no AI output
            if case.ai is not None:
                assert case.ai.heatmap_path and case.ai.probability is not None
            png = studies.case_png(case.image_path, "CLE", heatmap_path=case.ai.heatmap_path if case.ai else None)
            assert png.startswith(b"\x89PNG")
            result = studies.record_read(
                study_id=study.id, reader_id=readers[0], arm_id=arm.id, token=case.token, label=1, rating=3
            )
            assert result.status == "recorded", result.message
    with read_scope() as s:
        assert studies.reader_state(s, study.id, readers[0]).kind == "done"


def test_a_study_of_rcm_mosaics_asks_aspecific_with_the_map_stitched_over_each_mosaic(in_frames) -> None:
    tag = uuid.uuid4().hex[:8]
    pi, readers = _people(tag)
    model = in_frames["RCM"]
    with read_scope() as s:
        pool = studies.eligible_specimens(s, task="aspecific", modalities=["RCM"], splits=("train", "val", "test"))
    assert set(pool["truth"]) == {0, 1}
    cases = [int(i) for i in pool["specimen_id"]]

    def create(method: str) -> studies.StudyInfo:
        with session_scope() as s:
            return studies.create_study(
                s, title=f"Mosaics {method} {tag}", task="aspecific", specimen_ids=cases, reader_ids=readers,
                arms=[ArmSpec("RCM + AI", "RCM", model_id=model.id, show_decision=True, heatmap_method=method)],
            )  # fmt: skip

    with pytest.raises(StudyError, match="stitched from CAM or Score-CAM"):
        create("gradcam")
    with (
        pytest.raises(StudyError, match="reads RCM for aspecific, but the arm shows RCM for tumor"),
        session_scope() as s,
    ):
        studies.create_study(
            s, title=f"Wrong {tag}", task="tumor", specimen_ids=cases,
            arms=[ArmSpec("RCM + AI", "RCM", model_id=model.id, show_decision=True)],
        )  # fmt: skip
    study = create("default")
    assert study.arms[0].heatmap_method == "cam"
    prepare_study_ai(study.id)  # other tests of the shared workspace may have computed some of these already
    assert missing_ai(study.id) == []
    with read_scope() as s:
        stored = s.scalars(
            select(Prediction).join(SpecimenImage).where(
                Prediction.model_id == model.id, SpecimenImage.specimen_id.in_(cases)
            )
        ).all()  # fmt: skip
        assert len(stored) == len(cases) and all(p.heatmap_method == "cam" for p in stored)
        maps = [np.load(workspace_dir() / p.heatmap_path) for p in stored]
        case = studies.reader_state(s, study.id, readers[1]).case
    assert all(m.shape == (160, 160) for m in maps)  # the whole mosaic's map, not one window's
    assert case.ai is not None and case.ai.decision in ("benign", "aspecific") and case.ai.heatmap_path
    assert studies.case_png(case.image_path, "RCM", heatmap_path=case.ai.heatmap_path).startswith(b"\x89PNG")


def test_the_pi_sets_up_a_study_of_cle_frames_on_the_studies_page(in_frames) -> None:
    """The Studies page asks "diagnostic?" of CLE frames: the arms start as one CLE arm, the eligible frames are
    counted by truth, and the study is created with them."""
    from streamlit.testing.v1 import AppTest

    tag = uuid.uuid4().hex[:8]
    pi, readers = _people(tag)
    at = AppTest.from_file(str(Path(__file__).resolve().parents[2] / "pages" / "studies.py"), default_timeout=60)
    at.session_state["auth_user_id"] = pi
    at.run()
    at.selectbox(key="studies_task").set_value("diagnostic")
    at.multiselect(key="studies_splits").set_value(["train", "val", "test"])
    at.run()
    at.text_input(key="studies_title").input(f"Frames on the page {tag}")
    at.multiselect(key="studies_readers").set_value(readers)
    at.run()
    assert not at.exception
    with read_scope() as s:
        pool = studies.eligible_specimens(s, task="diagnostic", modalities=["CLE"], splits=("train", "val", "test"))
    counts = pool["truth"].value_counts()
    caption = f"{len(pool)} eligible specimens: {counts[1]} diagnostic, {counts[0]} non-diagnostic."
    assert caption in [c.value for c in at.caption]
    at.button(key="studies_create").click()
    at.run()
    assert not at.exception and any("created with" in s.value for s in at.success)
    with read_scope() as s:
        study = next(x for x in studies.list_studies(s) if x.title == f"Frames on the page {tag}")
    assert study.task == "diagnostic" and [(a.name, a.modality) for a in study.arms] == [("CLE", "CLE")]
    assert study.n_cases == len(pool) and set(study.reader_ids) == set(readers)
