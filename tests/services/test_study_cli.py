"""``python -m core studies``: list, export (reads and truth) and import, with clear errors."""

from __future__ import annotations

import pandas as pd

from db import repo
from db.session import init_db, session_scope
from services import studies
from services.cli import main
from services.studies import ArmSpec


def _study():
    init_db()
    with session_scope() as s:
        reader = repo.create_user(s, "r1", "r1-password", "reader").id
        ids = []
        for i in range(6):
            sid = repo.add_specimen(s, "P1", f"S{i}", split="test", tumor=i % 2 == 0)
            repo.add_specimen_image(s, sid, "FL", f"images/{i}.png", f"{i:064d}", 8, 8)
            ids.append(sid)
        study = studies.create_study(
            s,
            title="CLI",
            task="tumor",
            specimen_ids=ids,
            arms=[ArmSpec("FL", "FL")],
            reader_ids=[reader],
        )
    return study, reader


def test_list_export_and_import(workspace, tmp_path, capsys):
    study, reader = _study()
    for _ in range(2):
        with session_scope() as s:
            case = studies.reader_state(s, study.id, reader).case
        studies.record_read(
            study_id=study.id, reader_id=reader, arm_id=case.arm_id, token=case.token, label=1, rating=4
        )
    assert main(["studies", "list"]) == 0
    assert "CLI" in capsys.readouterr().out
    out, truth = tmp_path / "reads.csv", tmp_path / "cases.csv"
    assert main(["studies", "export", str(study.id), "--out", str(out), "--cases", str(truth)]) == 0
    reads = pd.read_csv(out)
    assert len(reads) == 2 and set(reads["reader_id"]) == {"r1"} and set(reads["label"]) == {1}
    assert sorted(pd.read_csv(truth)["truth"]) == [0, 0, 0, 1, 1, 1]
    capsys.readouterr()
    assert main(["studies", "import", str(study.id), "--file", str(out)]) == 2  # the same reads again
    err = capsys.readouterr().err
    assert "line 2: 'r1' is an active reader account" in err and "error: nothing imported: 2 problem(s)" in err
    assert main(["studies", "import", str(study.id), "--file", str(out), "--as-active-readers"]) == 2
    err = capsys.readouterr().err
    assert "line 2: r1 already answered" in err and "active reader account" not in err
    paper = tmp_path / "paper.csv"
    paper.write_text("case_id,reader_id,arm,label,rating\nS0,paper,FL,0,2\n")
    assert main(["studies", "import", str(study.id), "--file", str(paper), "--create-readers"]) == 0
    assert "imported 1 reads; new inactive reader accounts: paper" in capsys.readouterr().out
    assert main(["studies", "export"]) == 2
    assert "needs the study id" in capsys.readouterr().err
    assert main(["studies", "export", "999", "--out", str(out)]) == 2
    assert "there is no study #999" in capsys.readouterr().err


def test_the_export_escapes_formulas_and_the_import_under_live_readers_is_explicit(workspace, tmp_path, capsys):
    study, reader = _study()
    for comment in ("=1+1", "@cmd"):
        with session_scope() as s:
            case = studies.reader_state(s, study.id, reader).case
        studies.record_read(
            study_id=study.id, reader_id=reader, arm_id=case.arm_id, token=case.token, label=1, rating=4,
            comment=comment,
        )  # fmt: skip
    out = tmp_path / "reads.csv"
    assert main(["studies", "export", str(study.id), "--out", str(out)]) == 0
    written = pd.read_csv(out, dtype=str)
    assert sorted(written["comment"]) == ["'=1+1", "'@cmd"]
    assert set(written["rating_scale"]) == {"five"} and set(written["score"]) == {"9.0"}
    assert main(["studies", "export", str(study.id), "--out", str(out), "--arm", "FL"]) == 2
    assert "add --predictions" in capsys.readouterr().err
    with session_scope() as s:
        eligible = studies.eligible_specimens(s, task="tumor", modalities=("FL",), splits=("test",))
        target = studies.create_study(
            s, title="Again", task="tumor", specimen_ids=[int(i) for i in eligible["specimen_id"]],
            arms=[ArmSpec("FL", "FL")], reader_ids=[],
        ).id  # fmt: skip
    assert main(["studies", "import", str(target), "--file", str(out)]) == 2
    assert "'r1' is an active reader account" in capsys.readouterr().err
    assert main(["studies", "import", str(target), "--file", str(out), "--as-active-readers"]) == 0
    assert "imported 2 reads" in capsys.readouterr().out
    with session_scope() as s:
        again = studies.export_reads(s, target)
    assert sorted(again["comment"]) == ["=1+1", "@cmd"]
