import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from db import repo
from db.models import Prediction
from db.session import get_engine, init_db, session_scope
from tests.conftest import signs_in
from tests.postgres import reset_database


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, workspace):
    """Every repository test runs on the embedded SQLite file and on a real PostgreSQL server, same code."""
    if request.param == "sqlite":
        url = f"sqlite:///{workspace / 'study.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
        reset_database(url)  # a clean schema per test
    init_db(url)
    return url


def test_sqlite_runs_with_wal_foreign_keys_and_busy_timeout(workspace):
    db_url = f"sqlite:///{workspace / 'study.db'}"
    init_db(db_url)
    with get_engine(db_url).connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() >= 5000


def test_passwords_are_hashed_and_checked(db_url):
    with session_scope(db_url) as s:
        repo.create_user(s, "ana", "s3cret-pass", "clinician", "Dr Ana")
    with session_scope(db_url) as s:
        stored = s.execute(text("SELECT password_hash FROM users WHERE username = 'ana'")).scalar()
        assert "s3cret" not in stored and stored.startswith("$argon2")
        assert signs_in(s, "ana", "s3cret-pass").role == "clinician"
        assert signs_in(s, "ana", "wrong") is None
        assert signs_in(s, "nobody", "s3cret-pass") is None
    with pytest.raises(ValueError, match="unknown role"), session_scope(db_url) as s:
        repo.create_user(s, "bob", "pw", "admin")


def test_failed_scope_rolls_back_everything(db_url):
    with pytest.raises(RuntimeError), session_scope(db_url) as s:
        repo.add_specimen(s, "P1", "P1-S1", split="train", tumor=True)
        raise RuntimeError("crash in the middle of a batch")
    with session_scope(db_url) as s:
        assert repo.table(s, "specimens").empty and repo.table(s, "patients").empty


def test_reimport_updates_instead_of_duplicating(db_url):
    with session_scope(db_url) as s:
        sid = repo.add_specimen(s, "P1", "P1-S1", split="train", tumor=True, grade="GBM", ki67=">=10")
        repo.add_specimen_image(s, sid, "FL", "images/aa/x.png", "a" * 64, 10, 20)
    with session_scope(db_url) as s:
        again = repo.add_specimen(s, "P1", "P1-S1", split="test", tumor=False)
        repo.add_specimen_image(s, again, "FL", "images/bb/y.png", "b" * 64, 10, 20)
        assert again == sid
    with session_scope(db_url) as s:
        specimens = repo.table(s, "specimens")
        assert len(specimens) == 1
        row = specimens.iloc[0]
        assert row["split"] == "test" and not row["tumor"] and row["fl_sha256"] == "b" * 64
        with pytest.raises(ValueError, match="another patient"):
            repo.add_specimen(s, "P2", "P1-S1")
        with pytest.raises(ValueError, match="split"):
            repo.add_specimen(s, "P1", "P1-S2", split="holdout")


def _model(s, name="m1"):
    return repo.register_model(
        s,
        name=name,
        architecture="tiny_cnn",
        task="tumor",
        modality="FL",
        image_size=32,
        checkpoint_path="models/m1/model.safetensors",
        checkpoint_sha256="c" * 64,
        threshold=0.4,
        threshold_policy="sens90",
        metrics={"val_auc": 0.9},
        config={},
    )


def test_models_uploads_and_predictions(db_url):
    with session_scope(db_url) as s:
        user = repo.create_user(s, "ana", "pw", "clinician")
        model = _model(s)
        with pytest.raises(ValueError, match="already registered"):
            _model(s)
        upload = repo.add_upload(
            s,
            user_id=user.id,
            original_name="a.png",
            modality="FL",
            path="images/a",
            sha256="d" * 64,
            height=5,
            width=6,
        )
        pid = repo.add_prediction(s, model_id=model.id, upload_id=upload, probability=0.5, threshold=0.4)
        with pytest.raises(ValueError, match="exactly one"):
            repo.add_prediction(s, model_id=model.id, probability=0.5, threshold=0.4)
    with session_scope(db_url) as s:
        assert repo.find_model(s, "m1").id == model.id == repo.find_model(s, str(model.id)).id
        assert repo.model_for(s, "tumor", "FL").name == "m1" and repo.model_for(s, "tumor", "WL") is None
        view = repo.prediction_view(s, pid)
        assert view["decision"] is True and view["name"] == "a.png" and view["user_id"] == user.id
        assert repo.recent_predictions(s, user_id=user.id)["image"].tolist() == ["a.png"]
        assert repo.table(s, "predictions")["image"].tolist() == ["a.png"]
        assert repo.table(s, "uploads")["user"].tolist() == ["ana"]


def test_database_refuses_a_prediction_without_target(db_url):
    with session_scope(db_url) as s:
        model = _model(s)
    with pytest.raises(IntegrityError), session_scope(db_url) as s:
        s.add(Prediction(model_id=model.id, probability=0.1, threshold=0.5, decision=False))
        s.flush()
