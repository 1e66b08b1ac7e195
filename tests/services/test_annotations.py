"""Regions studies (issue 16): readers draw the regions that carry the diagnosis on CLE frames; the drawing is
checked against the case, stored with its read (append-only, hash-chained), corrected as a version, started from
the model's map only in an aided arm, and exported as ``<reader>/<case>.png`` for the agreement command."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from core.heatmaps.render import resize_map
from core.settings import workspace_dir
from db import repo
from db.chain import verify
from db.models import Annotation, AuditEvent, Read
from db.session import read_scope, session_scope
from services import studies
from services.studies import ArmSpec, StudyError
from services.study_ai import missing_ai, prepare_study_ai


def _study(models, *, layers=("region",), arms=None, n_cases=3, question="regions", **options):
    """A PI, two readers and a regions study over ``n_cases`` CLE frames of each truth."""
    tag = uuid.uuid4().hex[:8]
    with session_scope() as s:
        pi = repo.create_user(s, f"pi-{tag}", "pw-pi-123", "pi").id
        readers = [repo.create_user(s, f"r{i}-{tag}", "pw-reader-1", "reader").id for i in range(2)]
        pool = studies.eligible_specimens(s, task="diagnostic", modalities=["CLE"], splits=("train", "val", "test"))
        cases = [int(i) for i in pool.groupby("truth").head(n_cases)["specimen_id"]]
        study = studies.create_study(
            s, title=f"Regions {tag}", task="diagnostic", specimen_ids=cases, reader_ids=readers, created_by=pi,
            arms=arms or [ArmSpec("CLE", "CLE")], question=question, layers=layers, **options,
        )  # fmt: skip
    return study, pi, readers


def _served(study_id: int, reader: int):
    with read_scope() as s:
        return studies.reader_state(s, study_id, reader).case


def _disc(size: tuple[int, int], centre: tuple[int, int], radius: int) -> np.ndarray:
    yy, xx = np.mgrid[: size[0], : size[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _draw(study, reader: int, masks=None, empty=False, **options) -> studies.ReadResult:
    case = _served(study.id, reader)
    return studies.record_annotation(
        study_id=study.id, reader_id=reader, arm_id=case.arm_id, token=case.token, masks=masks or {}, empty=empty,
        **options,
    )  # fmt: skip


def _annotation_files() -> set[Path]:
    return set((workspace_dir() / "annotations").rglob("*.png"))


def test_a_reader_draws_every_case_or_says_no_region_and_each_drawing_is_stored_with_its_read(in_frames) -> None:
    study, _, (reader, _) = _study(in_frames)
    assert study.question == "regions" and study.layers == ("region",)
    drawn = {}
    for k in range(study.n_cases):
        case = _served(study.id, reader)
        assert case.layers == ("region",) and not case.starts_from_ai and case.ai is None
        size = studies.case_mask_size(study.id, reader, case.arm_id, case.token)
        assert size == (64, 64)  # CLE frames of the cohort, shown whole
        if k % 2:
            result = _draw(study, reader, empty=True)
            drawn[case.token] = None
        else:
            mask = _disc(size, (20 + k, 30), 6 + k)
            result = _draw(study, reader, {"region": mask}, shown_at=None)
            drawn[case.token] = mask
        assert result.status == "recorded", result.message
    with read_scope() as s:
        assert studies.reader_state(s, study.id, reader).kind == "done"
        rows = s.execute(select(Annotation, Read).join(Read, Read.id == Annotation.read_id)).all()
    mine = [(a, r) for a, r in rows if a.study_id == study.id]
    assert len(mine) == study.n_cases
    table = studies.latest_annotations(study.id)
    assert len(table) == study.n_cases and set(table["reader_id"]) == {reader}
    for annotation, read in mine:
        assert read.label == int(not annotation.empty) and read.rating is None and annotation.version == 1
        stored = studies.load_mask(annotation.layers["region"]["path"])
        assert stored.shape == (64, 64) and int(stored.sum()) == annotation.layers["region"]["pixels"]
        assert annotation.empty == (not stored.any())
    masks = [studies.load_mask(a.layers["region"]["path"]) for a, _ in mine]
    assert sorted(int(m.sum()) for m in masks) == sorted(int(m.sum()) if m is not None else 0 for m in drawn.values())


def test_refused_drawings_say_what_to_do_and_store_nothing(in_frames) -> None:
    study, _, (reader, other) = _study(in_frames)
    case = _served(study.id, reader)
    size = studies.case_mask_size(study.id, reader, case.arm_id, case.token)
    before = _annotation_files()
    refusals = [
        ({"region": np.ones((10, 10), bool)}, False, "reload the page"),  # another size: a forged or stale drawing
        ({"region": np.zeros(size, bool)}, False, "or press 'No region'"),  # nothing drawn, no "no region"
        ({"region": _disc(size, (30, 30), 5)}, True, "clear them"),  # "no region" with a region
        ({"tumour": _disc(size, (30, 30), 5)}, False, "no layer 'tumour'"),
    ]
    for masks, empty, message in refusals:
        with pytest.raises(StudyError, match=message):
            _draw(study, reader, masks, empty=empty)
    with pytest.raises(StudyError, match="not assigned"):  # a reader of another study, with a real token
        outsider = _study(in_frames)[2][0]
        studies.record_annotation(
            study_id=study.id, reader_id=outsider, arm_id=case.arm_id, token=case.token,
            masks={"region": _disc(size, (30, 30), 5)}, empty=False,
        )  # fmt: skip
    with pytest.raises(StudyError, match="use the drawing tools"):  # a bare label in a regions study
        studies.record_read(
            study_id=study.id, reader_id=reader, arm_id=case.arm_id, token=case.token, label=1, rating=3
        )
    label_study, _, (label_reader, _) = _study(in_frames, question="label")
    served = _served(label_study.id, label_reader)
    with pytest.raises(StudyError, match="not a drawing"):
        studies.record_annotation(
            study_id=label_study.id, reader_id=label_reader, arm_id=served.arm_id, token=served.token,
            masks={"region": _disc(size, (30, 30), 5)}, empty=False,
        )  # fmt: skip
    assert _annotation_files() == before
    with read_scope() as s:
        assert s.scalar(select(func.count()).select_from(Read).where(Read.study_id == study.id)) == 0
    assert other  # the second reader of the study was never involved


def test_a_double_submit_stores_one_drawing_and_a_correction_is_a_new_version(in_frames) -> None:
    study, _, (reader, _) = _study(in_frames, allow_revisions=True, n_cases=1)
    case = _served(study.id, reader)
    size = studies.case_mask_size(study.id, reader, case.arm_id, case.token)
    first = {"region": _disc(size, (20, 20), 8)}
    args = {"study_id": study.id, "reader_id": reader, "arm_id": case.arm_id, "token": case.token}
    assert studies.record_annotation(**args, masks=first, empty=False).status == "recorded"
    assert studies.record_annotation(**args, masks=first, empty=False).status == "duplicate"
    assert studies.own_masks(study.id, reader, case.arm_id, case.token)[0]["region"].sum() == first["region"].sum()
    second = {"region": _disc(size, (40, 40), 4)}
    revised = studies.record_annotation(**args, masks=second, empty=False, revise=True)
    assert revised.status == "revised" and revised.version == 2
    latest = studies.latest_annotations(study.id)
    mine = latest[latest["case_id"] == latest["case_id"].iloc[0]]
    assert list(mine["version"]) == [2] and int(mine["region_pixels"].iloc[0]) == int(second["region"].sum())
    with read_scope() as s:
        versions = s.scalars(select(Annotation.version).where(Annotation.study_id == study.id)).all()
        assert sorted(versions) == [1, 2]  # the first drawing is kept


def test_annotations_are_append_only_and_hash_chained(in_frames) -> None:
    study, _, (reader, _) = _study(in_frames, n_cases=1)
    case = _served(study.id, reader)
    size = studies.case_mask_size(study.id, reader, case.arm_id, case.token)
    _draw(study, reader, {"region": _disc(size, (30, 30), 9)})
    with session_scope() as s:
        reports = {r.table: r for r in verify(s)}
    assert reports["annotations"].ok and reports["annotations"].rows >= 1
    with pytest.raises(DBAPIError, match="append-only"), session_scope() as s:
        s.execute(text("UPDATE annotations SET empty = 1 WHERE study_id = :s"), {"s": study.id})


def test_two_layers_are_drawn_and_stored_apart(in_frames) -> None:
    study, _, (reader, _) = _study(in_frames, layers=("intermediate", "restrictive"), n_cases=1)
    case = _served(study.id, reader)
    assert case.layers == ("intermediate", "restrictive")
    size = studies.case_mask_size(study.id, reader, case.arm_id, case.token)
    outer, inner = _disc(size, (32, 32), 14), _disc(size, (32, 32), 4)
    assert _draw(study, reader, {"intermediate": outer, "restrictive": inner}).status == "recorded"
    row = studies.latest_annotations(study.id).iloc[0]
    assert row["intermediate_pixels"] == outer.sum() and row["restrictive_pixels"] == inner.sum()
    with pytest.raises(StudyError, match="1 to 2 layers"):
        _study(in_frames, layers=("a", "b", "c"))
    with pytest.raises(StudyError, match="lower-case words"):
        _study(in_frames, layers=("<b>x</b>",))


def test_an_aided_arm_starts_from_the_models_map_and_an_unaided_arm_never_sees_it(in_frames) -> None:
    model = in_frames["CLE"]
    arms = [
        ArmSpec("unaided", "CLE"),
        ArmSpec("AI start", "CLE", model_id=model.id, heatmap_method="default", start_threshold=0.5),
    ]
    study, _, (reader, _) = _study(in_frames, arms=arms, n_cases=1)
    assert study.arms[1].heatmap_method == "mlcam-lici" and study.arms[1].starts_from_ai
    prepare_study_ai(study.id)  # other tests of the shared workspace may have computed some of these already
    assert missing_ai(study.id) == []
    for _ in range(study.n_cases):  # the unaided arm first: no start, no AI
        case = _served(study.id, reader)
        assert case.arm_number == 1 and case.ai is None and not case.starts_from_ai
        assert studies.start_masks(study.id, reader, case.arm_id, case.token) is None
        _draw(study, reader, empty=True)
    case = _served(study.id, reader)
    assert case.arm_number == 2 and case.starts_from_ai
    start = studies.start_masks(study.id, reader, case.arm_id, case.token)
    size = studies.case_mask_size(study.id, reader, case.arm_id, case.token)
    heatmap = np.load(workspace_dir() / case.ai.heatmap_path)
    np.testing.assert_array_equal(start["region"], resize_map(heatmap, size) >= 0.5)
    result = _draw(study, reader, start if start["region"].any() else {}, empty=not start["region"].any(),
                   started_from_ai=True)  # fmt: skip
    assert result.status == "recorded"
    assert bool(studies.latest_annotations(study.id).query("arm == 'AI start'")["started_from_ai"].iloc[0])
    with pytest.raises(StudyError, match="only a regions study"):
        _study(in_frames, arms=arms, question="label")


def test_the_pi_exports_each_readers_masks_for_the_agreement_command(in_frames, tmp_path: Path) -> None:
    study, pi, readers = _study(in_frames, n_cases=1)
    expected = {}
    for number, reader in enumerate(readers):
        for _ in range(study.n_cases):
            case = _served(study.id, reader)
            size = studies.case_mask_size(study.id, reader, case.arm_id, case.token)
            mask = _disc(size, (30, 30 + number), 8 + number)
            _draw(study, reader, {"region": mask})
            expected.setdefault(reader, []).append(int(mask.sum()))
    summary = studies.export_masks(study.id, tmp_path / "masks", user_id=pi)
    assert summary["masks"] == 2 * study.n_cases and summary["arm"] == "CLE" and summary["layer"] == "region"
    for reader in readers:
        with read_scope() as s:
            username = repo.get_user(s, reader).username
        files = sorted((tmp_path / "masks" / username).glob("*.png"))
        assert len(files) == study.n_cases
        pixels = [np.asarray(PILImage.open(f)) for f in files]
        assert all(set(np.unique(p)) <= {0, 255} for p in pixels)
        assert sorted(int((p == 255).sum()) for p in pixels) == sorted(expected[reader])
    with read_scope() as s:
        assert s.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.action == "masks_exported", AuditEvent.study_id == study.id
        )) == 1  # fmt: skip
    with pytest.raises(StudyError, match="no arm 'WL'"):
        studies.export_masks(study.id, tmp_path / "x", user_id=pi, arm="WL")


def test_the_pi_sets_up_a_regions_study_with_two_layers_on_the_studies_page(in_frames) -> None:
    from streamlit.testing.v1 import AppTest

    tag = uuid.uuid4().hex[:8]
    with session_scope() as s:
        pi = repo.create_user(s, f"pi-{tag}", "pw-pi-123", "pi").id
    at = AppTest.from_file(str(Path(__file__).resolve().parents[2] / "pages" / "studies.py"), default_timeout=60)
    at.session_state["auth_user_id"] = pi
    at.run()
    at.selectbox(key="studies_task").set_value("diagnostic")
    at.radio(key="studies_question").set_value("regions")
    at.multiselect(key="studies_splits").set_value(["train", "val", "test"])
    at.run()
    at.text_input(key="studies_layers").input("Intermediate, restrictive")
    at.text_input(key="studies_title").input(f"Drawn on the page {tag}")
    at.button(key="studies_create").click()
    at.run()
    assert not at.exception and any("created with" in s.value for s in at.success)
    with read_scope() as s:
        study = next(x for x in studies.list_studies(s) if x.title == f"Drawn on the page {tag}")
    assert study.question == "regions" and study.layers == ("intermediate", "restrictive")
    shown = [m.value.replace("\\", "") for m in at.markdown]  # the page escapes markdown in what it shows
    assert any("readers draw the regions (intermediate, restrictive) for diagnostic" in m for m in shown)


def test_the_export_masks_command_feeds_the_agreement_command_and_writes_coco_rle(in_frames, tmp_path: Path) -> None:
    """`python -m core studies export-masks STUDY --out DIR` as contracted, then `python -m core agreement` on DIR:
    the two readers' Dice is the one of their drawings; the COCO file decodes to the same masks."""
    import json

    from core.metrics.agreement import rle_decode
    from services.cli import main as cli

    study, _, readers = _study(in_frames, n_cases=1)
    drawn = {}
    for number, reader in enumerate(readers):
        for _ in range(study.n_cases):
            case = _served(study.id, reader)
            size = studies.case_mask_size(study.id, reader, case.arm_id, case.token)
            mask = _disc(size, (32, 28 + 8 * number), 10)  # the second reader's disc is shifted
            _draw(study, reader, {"region": mask})
            drawn.setdefault(reader, []).append(mask)
    out, coco = tmp_path / "masks", tmp_path / "masks.coco.json"
    assert cli(["studies", "export-masks", str(study.id), "--out", str(out), "--coco", str(coco)]) == 0
    assert cli(["agreement", "--masks", str(out), "--out", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    (pair,) = report["pairwise"]
    a, b = drawn[readers[0]][0], drawn[readers[1]][0]
    assert pair["dice"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert pair["n_cases"] == study.n_cases
    document = json.loads(coco.read_text())
    assert len(document["annotations"]) == 2 * study.n_cases and document["categories"] == [{"id": 1, "name": "region"}]
    decoded = sorted(int(rle_decode(x["segmentation"]).sum()) for x in document["annotations"])
    assert decoded == sorted(int(m.sum()) for masks in drawn.values() for m in masks)
    assert cli(["studies", "export-masks", "999999", "--out", str(out)]) == 2
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(studies.masks_zip(study.id, user_id=None))) as archive:
        names = archive.namelist()
        assert json.loads(archive.read("masks.coco.json")) == document
    pngs = sorted(n for n in names if n.endswith(".png"))
    assert pngs == sorted(f"CLE/region/{p.parent.name}/{p.name}" for p in out.glob("*/*.png"))


def test_the_arms_are_compared_on_time_agreement_and_the_unaided_consensus(in_frames) -> None:
    """Two readers draw the same discs unaided and, starting from the AI, a shifted disc: the unaided arm agrees
    with its own consensus perfectly; the aided arm's Dice against it is that of the shifted disc."""
    model = in_frames["CLE"]
    arms = [
        ArmSpec("unaided", "CLE"),
        ArmSpec("AI start", "CLE", model_id=model.id, heatmap_method="default", start_threshold=0.5),
    ]
    study, _, readers = _study(in_frames, arms=arms, n_cases=1)
    prepare_study_ai(study.id)
    size = None
    for reader in readers:
        for arm_number in (1, 2):
            for _ in range(study.n_cases):
                case = _served(study.id, reader)
                assert case.arm_number == arm_number
                size = studies.case_mask_size(study.id, reader, case.arm_id, case.token)
                mask = _disc(size, (32, 32 + 6 * (arm_number - 1)), 10)
                _draw(study, reader, {"region": mask}, started_from_ai=arm_number == 2)
    table = studies.arm_comparison(study.id, n_boot=200).set_index("arm")
    unaided, aided = _disc(size, (32, 32), 10), _disc(size, (32, 38), 10)
    expected = 2 * (unaided & aided).sum() / (unaided.sum() + aided.sum())
    assert table.loc["unaided", "pairwise_dice"] == pytest.approx(1.0)
    assert table.loc["unaided", "dice_vs_reference"] == pytest.approx(1.0)
    assert table.loc["AI start", "dice_vs_reference"] == pytest.approx(expected)
    assert table.loc["AI start", "from_ai"] == 1.0 and table.loc["unaided", "from_ai"] == 0.0
    assert table.loc["AI start", "drawings"] == 2 * study.n_cases and table.loc["AI start", "readers"] == 2
