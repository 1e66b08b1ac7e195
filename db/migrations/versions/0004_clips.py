"""Clips (issue 15): uploaded CLE clips and each model's triage of them (per-frame probabilities, top frames).

Revision ID: 0004_clips
Revises: 0003_jobs
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_clips"
down_revision = "0003_jobs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "clips",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("original_name", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("modality", sa.String(length=8), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("n_frames", sa.Integer(), nullable=False),
        sa.Column("fps", sa.Float(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("clips", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_clips_sha256"), ["sha256"], unique=False)
        batch_op.create_index(batch_op.f("ix_clips_user_id"), ["user_id"], unique=False)

    op.create_table(
        "clip_triages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("clip_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("n_frames", sa.Integer(), nullable=False),
        sa.Column("n_positive", sa.Integer(), nullable=False),
        sa.Column("max_probability", sa.Float(), nullable=False),
        sa.Column("probabilities_path", sa.String(length=512), nullable=False),
        sa.Column("heatmap_method", sa.String(length=32), nullable=True),
        sa.Column("top", sa.JSON(), nullable=False),
        sa.Column("device", sa.String(length=16), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["clip_id"], ["clips.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("clip_triages", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_clip_triages_clip_id"), ["clip_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_clip_triages_model_id"), ["model_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_clip_triages_user_id"), ["user_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("clip_triages", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_clip_triages_user_id"))
        batch_op.drop_index(batch_op.f("ix_clip_triages_model_id"))
        batch_op.drop_index(batch_op.f("ix_clip_triages_clip_id"))
    op.drop_table("clip_triages")
    with op.batch_alter_table("clips", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_clips_user_id"))
        batch_op.drop_index(batch_op.f("ix_clips_sha256"))
    op.drop_table("clips")
