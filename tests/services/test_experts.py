"""Heatmaps against the experts (issue 16): a regions study's readers draw every case, and the tiny MLCAM-LICI
model's maps are held against them beside the readers' leave-one-out baseline; maps are kept, not recomputed."""

from __future__ import annotations

import io
import shutil
import uuid

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, select

from core.data.io import read_image
from core.heatmaps.render import resize_map
from core.metrics.agreement import leave_one_out, staple
from core.metrics.localization import segmentation_scores
from core.settings import workspace_dir
from db import repo
from db.models import ArmCase, AuditEvent, Specimen, SpecimenImage, StudyCase
from db.session import read_scope, session_scope
from services import exports, studies
from services.predictions import cached_predictor
from services.studies import ArmSpec, StudyError

SIZE = (64, 64)  # the cohort's CLE frames, shown whole


def regions_study(
    n_readers: int = 3,
    *,
    layers=("region",),
    question: str = "regions",
    n_cases: int = 2,
    task: str = "diagnostic",
    modality: str = "CLE",
):
    """A PI, ``n_readers`` readers and a regions study over ``n_cases`` images of each truth (CLE frames)."""
    tag = uuid.uuid4().hex[:8]
    with session_scope() as s:
        pi = repo.create_user(s, f"pi-{tag}", "pw-pi-123", "pi").id
        readers = [repo.create_user(s, f"ex{i}-{tag}", "pw-reader-1", "reader").id for i in range(n_readers)]
        pool = studies.eligible_specimens(s, task=task, modalities=[modality], splits=("train", "val", "test"))
        cases = [int(i) for i in pool.groupby("truth").head(n_cases)["specimen_id"]]
        study = studies.create_study(
            s, title=f"Experts {tag}", task=task, specimen_ids=cases, reader_ids=readers, created_by=pi,
            arms=[ArmSpec(modality, modality)], question=question, layers=layers,
        )  # fmt: skip
    return study, pi, readers


def disc(centre: tuple[int, int], radius: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[: size[0], : size[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def drawing(codes: list[str], code: str, number: int, size: tuple[int, int] = SIZE) -> np.ndarray | None:
    """What reader ``number`` draws on a case: a disc per case, a pixel or two off the others' (on a 64 px frame;
    scaled to larger images); the last case (by code) is one where nobody sees a region."""
    k = codes.index(code)
    if k == len(codes) - 1:
        return None
    scale = size[0] / SIZE[0]
    centre = (round(scale * (20 + 4 * k)) + number, round(scale * (26 + 3 * k)) - number)
    return disc(centre, round(scale * (7 + k % 3)) + number % 2, size)


def draw_all(study, readers: list[int], *, limit: dict[int, int] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Every reader draws every case (``limit``: reader -> how many); returns the drawn masks by username and code."""
    with read_scope() as s:
        code_of = dict(
            s.execute(
                select(ArmCase.token, Specimen.code)
                .join(StudyCase, StudyCase.id == ArmCase.case_id)
                .join(Specimen, Specimen.id == StudyCase.specimen_id)
                .where(StudyCase.study_id == study.id)
            ).all()
        )
        names = {r: repo.get_user(s, r).username for r in readers}
    codes = sorted(set(code_of.values()))
    drawn: dict[str, dict[str, np.ndarray]] = {}
    for number, reader in enumerate(readers):
        for _ in range((limit or {}).get(reader, study.n_cases)):
            with read_scope() as s:
                case = studies.reader_state(s, study.id, reader).case
            size = studies.case_mask_size(study.id, reader, case.arm_id, case.token)
            mask = drawing(codes, code_of[case.token], number, size)
            layers = {} if mask is None else {study.layers[0]: mask}
            if mask is not None and len(study.layers) == 2:  # restrictive: the part near the frame's centre
                layers[study.layers[1]] = mask & disc((size[0] // 2, size[1] // 2), size[0] // 3, size)
            result = studies.record_annotation(
                study_id=study.id, reader_id=reader, arm_id=case.arm_id, token=case.token, masks=layers,
                empty=mask is None,
            )  # fmt: skip
            assert result.status == "recorded", result.message
            drawn.setdefault(names[reader], {})[code_of[case.token]] = np.zeros(size, bool) if mask is None else mask
    return drawn


def test_the_models_maps_stand_beside_the_readers_leave_one_out_baseline(in_frames) -> None:
    model = in_frames["CLE"]
    study, pi, readers = regions_study(layers=("intermediate", "restrictive"))
    drawn = draw_all(study, readers)
    codes = sorted(next(iter(drawn.values())))
    shutil.rmtree(workspace_dir() / "expert-maps", ignore_errors=True)  # kept maps are safe to delete
    progress = []
    report = studies.heatmaps_vs_experts(
        study.id, models=["tiny-MLCAM"], methods=["own"], progress=lambda d, t: progress.append((d, t)), n_boot=200
    )
    assert report.arm == "CLE" and report.layer == "intermediate" and report.readers == sorted(drawn)
    assert progress[-1] == (len(codes), len(codes))  # one map per case, none kept before
    assert report.thresholds == [0.03, 0.2]  # MLCAM-LICI's, from its localisation study (seed 000)
    table = report.table.set_index("row")
    assert list(table["kind"]) == ["model"] + ["reader"] * 3
    row = table.iloc[0]
    assert row["method"] == "mlcam-lici" and row["own map"] and row["operating threshold"] == 0.03
    assert {"mean_acc @0.03", "mean_iu @0.03", "fw_iu @0.03", "mean_iu @0.2", "pixel_auc", "best_dice"} <= set(table)

    # cases: the last one has no region in anyone's drawing: it counts only in the no-region columns
    region = codes[:-1]
    assert report.report["cases"] == {"region": region, "empty": codes[-1:], "incomplete": []}
    assert (table["n_cases"] == len(region)).all() and (table["no-region cases"] == 1).all()
    assert (table.loc[report.readers, "no-region cleared"] == 1.0).all()

    # the readers' Dice and IoU are agreement.leave_one_out's on the region cases
    masks = {r: {c: drawn[r][c] for c in region} for r in drawn}
    for loo in leave_one_out(masks, n_boot=200):
        assert table.loc[loo["reader"], "dice"] == pytest.approx(loo["dice"])
        assert table.loc[loo["reader"], "iou"] == pytest.approx(loo["iou"])
        assert table.loc[loo["reader"], "reference"] == "STAPLE of the other 2 readers"

    # the kept maps are the model's heatmaps of the right images at the mask size, and the model's Table 2 figures
    # are computed from them against the STAPLE consensus of all readers
    consensus = staple(drawn).consensus
    with read_scope() as s:
        images = dict(
            s.execute(
                select(Specimen.code, SpecimenImage.sha256)
                .join(SpecimenImage, SpecimenImage.specimen_id == Specimen.id)
                .where(Specimen.code.in_(codes), SpecimenImage.modality == "CLE")
            ).all()
        )
        paths = dict(
            s.execute(
                select(Specimen.code, SpecimenImage.path)
                .join(SpecimenImage, SpecimenImage.specimen_id == Specimen.id)
                .where(Specimen.code.in_(codes), SpecimenImage.modality == "CLE")
            ).all()
        )
    kept = {c: np.load(workspace_dir() / studies.expert_map_path(images[c], model, "mlcam-lici", SIZE)) for c in codes}
    (fresh,) = cached_predictor(model).diagnose([read_image(workspace_dir() / paths[codes[0]])], heatmap="mlcam-lici")
    np.testing.assert_allclose(kept[codes[0]], resize_map(fresh.heatmap, SIZE), atol=1e-6)
    labels = [consensus[c].astype(np.int8) for c in region]
    for t in (0.03, 0.2):
        expected = segmentation_scores([kept[c] for c in region], labels, t)
        assert row[f"mean_iu @{t:g}"] == pytest.approx(expected["mean_iu"])
        assert row[f"fw_iu @{t:g}"] == pytest.approx(expected["fw_iu"])
    verdict = report.report["models"][0]["range"]["dice"]
    low, high = table.loc[report.readers, "dice"].min(), table.loc[report.readers, "dice"].max()
    assert (verdict["low"], verdict["high"]) == pytest.approx((low, high))
    assert (
        row["experts' range (Dice)"]
        == verdict["verdict"]
        == ("below" if row["dice"] < low else "above" if row["dice"] > high else "within")
    )
    assert report.answer == {row.name: verdict["verdict"] != "below"}

    # the agreement report: a pair per two readers, a STAPLE sensitivity per reader
    assert len(report.pairwise) == 3 and report.pairwise["n_cases"].eq(len(region)).all()
    assert list(report.staple["reader"]) == report.readers and report.staple["sensitivity"].between(0, 1).all()

    # the second look computes nothing, and the restrictive layer is scored at MLCAM-LICI's 0.2
    assert studies.prepare_expert_maps(study.id, models=["tiny-MLCAM"], methods=["own"]) == 0
    restrictive = studies.heatmaps_vs_experts(study.id, layer="restrictive", models=["tiny-MLCAM"], methods=["own"])
    assert restrictive.table["operating threshold"].iloc[0] == 0.2

    # the CSV exports are escaped and audited
    data = exports.experts_csv(report, "table", user_id=pi)
    assert list(pd.read_csv(io.BytesIO(data))["row"]) == list(table.index)
    assert len(pd.read_csv(io.BytesIO(exports.experts_csv(report, "pairwise", user_id=pi)))) == 3
    with read_scope() as s:
        audited = s.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.action == "experts_exported", AuditEvent.study_id == study.id)
        )
    assert audited == 2
    with pytest.raises(ValueError, match="unknown table"):
        exports.experts_csv(report, "masks", user_id=pi)


def test_every_method_that_applies_is_a_row_and_a_grad_cam_row_is_scored_at_the_same_thresholds(in_frames) -> None:
    study, _, readers = regions_study(n_readers=2, n_cases=1)
    draw_all(study, readers)
    rows = studies.expert_map_rows(study.id, models=["tiny-MLCAM"])
    methods = [r.method for r in rows]
    assert "mlcam-lici" in methods and "gradcam" in methods and [r.own for r in rows].count(True) == 1
    report = studies.heatmaps_vs_experts(study.id, models=["tiny-MLCAM"], methods=["gradcam", "own"], n_boot=50)
    table = report.table
    assert list(table.loc[table["kind"] == "model", "method"]) == [m for m in methods if m in ("gradcam", "mlcam-lici")]
    assert table.loc[table["kind"] == "model", "mean_iu @0.2"].notna().all()
    assert list(table.loc[table["kind"] == "reader", "reference"]) == sorted(report.readers, reverse=True)


def test_a_mosaic_patch_classifier_has_its_map_stitched_over_each_mosaic(in_frames) -> None:
    model = in_frames["RCM"]
    study, _, readers = regions_study(n_readers=2, n_cases=1, task="aspecific", modality="RCM")
    drawn = draw_all(study, readers)
    report = studies.heatmaps_vs_experts(study.id, models=["tiny-RCM"], n_boot=50)
    rows = report.table[report.table["kind"] == "model"]
    assert set(rows["method"]) == {"cam", "gradcam"}  # what the fast stitcher computes
    assert list(rows["operating threshold"]) == [0.5, 0.5] and report.thresholds == [0.5]
    assert rows["pixel_auc"].between(0, 1).all()
    with read_scope() as s:
        shas = s.scalars(
            select(SpecimenImage.sha256)
            .join(StudyCase, StudyCase.specimen_id == SpecimenImage.specimen_id)
            .where(StudyCase.study_id == study.id, SpecimenImage.modality == "RCM")
        ).all()
    size = next(iter(next(iter(drawn.values())).values())).shape
    for sha in shas:
        kept = np.load(workspace_dir() / studies.expert_map_path(sha, model, "cam", size))
        assert kept.shape == size and 0.0 <= kept.min() <= kept.max() <= 1.0


def test_a_comparison_needs_two_finished_readers_and_a_regions_study(in_frames) -> None:
    study, _, readers = regions_study(n_readers=2, n_cases=1)
    draw_all(study, readers, limit={readers[1]: 1})
    with pytest.raises(StudyError, match="two readers or more who drew every case"):
        studies.heatmaps_vs_experts(study.id, models=["tiny-MLCAM"], methods=["own"])
    assert studies.prepare_expert_maps(study.id, models=["tiny-MLCAM"], methods=["own"]) == 0
    label_study, _, _ = regions_study(n_readers=2, question="label", n_cases=1)
    with pytest.raises(StudyError, match="only a regions study"):
        studies.heatmaps_vs_experts(label_study.id)
    with pytest.raises(StudyError, match="no layer 'tumour'"):
        studies.heatmaps_vs_experts(study.id, layer="tumour")
