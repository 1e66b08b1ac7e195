"""Annotation studies (issue 16): readers draw the regions that carry the diagnosis.

- ``studies.question`` (``label``: answer a label, the studies so far; ``regions``: draw regions) and
  ``studies.layers`` (what readers draw, e.g. one ``region`` layer, or seed 000's ``intermediate`` and
  ``restrictive`` features).
- ``study_arms.start_threshold``: an AI-aided annotation arm starts each case from the model's heatmap at this level.
- ``annotations``: one row per read of a ``regions`` study with the reader's masks (files) per layer, append-only
  and hash-chained like ``reads``.

Revision ID: 0006_annotations
Revises: 0005_cle_cohorts
"""

import sqlalchemy as sa
from alembic import op

from db.chain import append_only_ddl

revision = "0006_annotations"
down_revision = "0005_cle_cohorts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("question", sa.String(length=8), nullable=False, server_default="label"))
        batch.add_column(sa.Column("layers", sa.JSON(), nullable=True))
        batch.create_check_constraint("ck_studies_question", "question IN ('label', 'regions')")
    op.execute("UPDATE studies SET layers = '[\"region\"]' WHERE layers IS NULL")
    with op.batch_alter_table("studies") as batch:
        batch.alter_column("layers", existing_type=sa.JSON(), nullable=False)
    with op.batch_alter_table("study_arms") as batch:
        batch.add_column(sa.Column("start_threshold", sa.Float(), nullable=True))
    op.create_table(
        "annotations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("read_id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("arm_id", sa.Integer(), nullable=False),
        sa.Column("case_id", sa.Integer(), nullable=False),
        sa.Column("reader_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("layers", sa.JSON(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("empty", sa.Boolean(), nullable=False),
        sa.Column("started_from_ai", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("row_hash", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["arm_id"], ["study_arms.id"], ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["case_id"], ["study_cases.id"], ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["read_id"], ["reads.id"], ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["reader_id"], ["users.id"], ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("read_id"),
    )
    op.create_index("ix_annotations_study_arm", "annotations", ["study_id", "arm_id"], unique=False)
    for statement in append_only_ddl(bind.dialect.name, "annotations"):
        op.execute(statement)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS annotations_no_update")
        op.execute("DROP TRIGGER IF EXISTS annotations_no_delete")
    op.drop_index("ix_annotations_study_arm", table_name="annotations")
    op.drop_table("annotations")
    with op.batch_alter_table("study_arms") as batch:
        batch.drop_column("start_threshold")
    with op.batch_alter_table("studies") as batch:
        batch.drop_constraint("ck_studies_question", type_="check")
        batch.drop_column("layers")
        batch.drop_column("question")
