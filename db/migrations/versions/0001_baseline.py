"""Baseline: the schema as it stood before migrations (every table of the first releases).

A database created before migrations existed is stamped at this revision, then upgraded.

Revision ID: 0001_baseline
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("architecture", sa.String(length=64), nullable=False),
        sa.Column("task", sa.String(length=16), nullable=False),
        sa.Column("modality", sa.String(length=8), nullable=False),
        sa.Column("image_size", sa.Integer(), nullable=False),
        sa.Column("checkpoint_path", sa.String(length=512), nullable=False),
        sa.Column("checkpoint_sha256", sa.String(length=64), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("threshold_policy", sa.String(length=32), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "patients",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("code"),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("display_name", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("password_hash", sa.String(length=256), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("role IN ('pi', 'clinician', 'reader')", name="ck_users_role"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("username"),
    )
    op.create_table(
        "model_evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("dataset", sa.JSON(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_model_evaluations_model_id"), "model_evaluations", ["model_id"], unique=False)
    op.create_table(
        "specimens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.Integer(), nullable=False),
        sa.Column("split", sa.String(length=8), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("split IS NULL OR split IN ('train', 'val', 'test')", name="ck_specimens_split"),
        sa.ForeignKeyConstraint(["patient_id"], ["patients.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("code"),
    )
    op.create_index(op.f("ix_specimens_patient_id"), "specimens", ["patient_id"], unique=False)
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("task", sa.String(length=16), nullable=False),
        sa.Column("rating_scale", sa.String(length=8), nullable=False),
        sa.Column("allow_revisions", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=8), nullable=False),
        sa.Column("simulated", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("frozen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("rating_scale IN ('five', 'hundred')", name="ck_studies_rating_scale"),
        sa.CheckConstraint("status IN ('open', 'closed')", name="ck_studies_status"),
        sa.ForeignKeyConstraint(["created_by"], ["users.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("title"),
    )
    op.create_table(
        "uploads",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("original_name", sa.String(length=255), nullable=False),
        sa.Column("modality", sa.String(length=8), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_uploads_sha256"), "uploads", ["sha256"], unique=False)
    op.create_index(op.f("ix_uploads_user_id"), "uploads", ["user_id"], unique=False)
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("username", sa.String(length=64), nullable=True),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_audit_log_action"), "audit_log", ["action"], unique=False)
    op.create_index(op.f("ix_audit_log_at"), "audit_log", ["at"], unique=False)
    op.create_index(op.f("ix_audit_log_study_id"), "audit_log", ["study_id"], unique=False)
    op.create_index(op.f("ix_audit_log_user_id"), "audit_log", ["user_id"], unique=False)
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("specimen_id", sa.Integer(), nullable=False),
        sa.Column("tumor", sa.Boolean(), nullable=True),
        sa.Column("grade", sa.String(length=8), nullable=True),
        sa.Column("ki67", sa.String(length=8), nullable=True),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.CheckConstraint("grade IS NULL OR grade IN ('DLGG', 'GBM')", name="ck_labels_grade"),
        sa.CheckConstraint("ki67 IS NULL OR ki67 IN ('<10', '>=10')", name="ck_labels_ki67"),
        sa.ForeignKeyConstraint(["specimen_id"], ["specimens.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("specimen_id"),
    )
    op.create_table(
        "specimen_images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("specimen_id", sa.Integer(), nullable=False),
        sa.Column("modality", sa.String(length=8), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("mask_path", sa.String(length=512), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("modality IN ('FL', 'WL', 'CLE', 'RCM')", name="ck_specimen_images_modality"),
        sa.ForeignKeyConstraint(["specimen_id"], ["specimens.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("specimen_id", "modality", name="uq_specimen_images_specimen_modality"),
    )
    op.create_index(op.f("ix_specimen_images_sha256"), "specimen_images", ["sha256"], unique=False)
    op.create_index(op.f("ix_specimen_images_specimen_id"), "specimen_images", ["specimen_id"], unique=False)
    op.create_table(
        "study_arms",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=8), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=True),
        sa.Column("show_probability", sa.Boolean(), nullable=False),
        sa.Column("show_decision", sa.Boolean(), nullable=False),
        sa.Column("heatmap_method", sa.String(length=32), nullable=True),
        sa.Column("washout_days", sa.Integer(), nullable=False),
        sa.CheckConstraint("modality IN ('FL', 'WL', 'CLE', 'RCM')", name="ck_study_arms_modality"),
        sa.CheckConstraint("washout_days >= 0", name="ck_study_arms_washout"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_id", "name", name="uq_study_arms_name"),
        sa.UniqueConstraint("study_id", "position", name="uq_study_arms_position"),
    )
    op.create_index(op.f("ix_study_arms_study_id"), "study_arms", ["study_id"], unique=False)
    op.create_table(
        "study_cases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("specimen_id", sa.Integer(), nullable=False),
        sa.Column("token", sa.String(length=32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("training", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["specimen_id"], ["specimens.id"], ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_id", "specimen_id", name="uq_study_cases_specimen"),
        sa.UniqueConstraint("token"),
    )
    op.create_index(op.f("ix_study_cases_study_id"), "study_cases", ["study_id"], unique=False)
    op.create_table(
        "study_readers",
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("invited_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("study_id", "user_id"),
    )
    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column("upload_id", sa.Integer(), nullable=True),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("decision", sa.Boolean(), nullable=False),
        sa.Column("heatmap_method", sa.String(length=32), nullable=True),
        sa.Column("heatmap_path", sa.String(length=512), nullable=True),
        sa.Column("device", sa.String(length=16), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("(image_id IS NULL) <> (upload_id IS NULL)", name="ck_predictions_exactly_one_target"),
        sa.ForeignKeyConstraint(["image_id"], ["specimen_images.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["upload_id"], ["uploads.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_predictions_image_id"), "predictions", ["image_id"], unique=False)
    op.create_index(op.f("ix_predictions_model_id"), "predictions", ["model_id"], unique=False)
    op.create_index(op.f("ix_predictions_upload_id"), "predictions", ["upload_id"], unique=False)
    op.create_table(
        "reads",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("arm_id", sa.Integer(), nullable=False),
        sa.Column("case_id", sa.Integer(), nullable=False),
        sa.Column("reader_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("label", sa.Integer(), nullable=False),
        sa.Column("rating", sa.Integer(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("shown_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.CheckConstraint("label IN (0, 1)", name="ck_reads_label"),
        sa.CheckConstraint("version >= 1", name="ck_reads_version"),
        sa.ForeignKeyConstraint(["arm_id"], ["study_arms.id"], ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["case_id"], ["study_cases.id"], ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["reader_id"], ["users.id"], ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("arm_id", "case_id", "reader_id", "version", name="uq_reads_version"),
    )
    op.create_index("ix_reads_reader_arm", "reads", ["reader_id", "arm_id"], unique=False)
    op.create_index(op.f("ix_reads_study_id"), "reads", ["study_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_reads_study_id"), table_name="reads")
    op.drop_index("ix_reads_reader_arm", table_name="reads")
    op.drop_table("reads")
    op.drop_index(op.f("ix_predictions_upload_id"), table_name="predictions")
    op.drop_index(op.f("ix_predictions_model_id"), table_name="predictions")
    op.drop_index(op.f("ix_predictions_image_id"), table_name="predictions")
    op.drop_table("predictions")
    op.drop_table("study_readers")
    op.drop_index(op.f("ix_study_cases_study_id"), table_name="study_cases")
    op.drop_table("study_cases")
    op.drop_index(op.f("ix_study_arms_study_id"), table_name="study_arms")
    op.drop_table("study_arms")
    op.drop_index(op.f("ix_specimen_images_specimen_id"), table_name="specimen_images")
    op.drop_index(op.f("ix_specimen_images_sha256"), table_name="specimen_images")
    op.drop_table("specimen_images")
    op.drop_table("labels")
    op.drop_index(op.f("ix_audit_log_user_id"), table_name="audit_log")
    op.drop_index(op.f("ix_audit_log_study_id"), table_name="audit_log")
    op.drop_index(op.f("ix_audit_log_at"), table_name="audit_log")
    op.drop_index(op.f("ix_audit_log_action"), table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_index(op.f("ix_uploads_user_id"), table_name="uploads")
    op.drop_index(op.f("ix_uploads_sha256"), table_name="uploads")
    op.drop_table("uploads")
    op.drop_table("studies")
    op.drop_index(op.f("ix_specimens_patient_id"), table_name="specimens")
    op.drop_table("specimens")
    op.drop_index(op.f("ix_model_evaluations_model_id"), table_name="model_evaluations")
    op.drop_table("model_evaluations")
    op.drop_table("users")
    op.drop_table("patients")
    op.drop_table("models")
