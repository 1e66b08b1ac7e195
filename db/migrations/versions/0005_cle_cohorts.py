"""CLE cohorts and studies of frames and mosaics (issue 15).

- ``specimens.site``: the biopsy site a CLE frame was taken at, within its patient.
- ``specimen_images.clip_id`` and ``specimen_images.frame``: a CLE frame imported from a clip names the clip (kept in
  ``clips``) and its 0-based frame index there.
- ``labels.diagnostic`` (a CLE frame shows diagnostic features, seed 000) and ``labels.aspecific`` (an RCM mosaic
  holds an aspecific region, seed 002): the truths of reader studies of frames and of mosaics.

Revision ID: 0005_cle_cohorts
Revises: 0004_clips
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_cle_cohorts"
down_revision = "0004_clips"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("specimens") as batch:
        batch.add_column(sa.Column("site", sa.String(length=64), nullable=True))
    with op.batch_alter_table("specimen_images") as batch:
        batch.add_column(sa.Column("clip_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("frame", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_specimen_images_clip_id_clips", "clips", ["clip_id"], ["id"], ondelete="SET NULL")
        batch.create_index(batch.f("ix_specimen_images_clip_id"), ["clip_id"], unique=False)
    with op.batch_alter_table("labels") as batch:
        batch.add_column(sa.Column("diagnostic", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("aspecific", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("labels") as batch:
        batch.drop_column("aspecific")
        batch.drop_column("diagnostic")
    with op.batch_alter_table("specimen_images") as batch:
        batch.drop_index(batch.f("ix_specimen_images_clip_id"))
        batch.drop_constraint("fk_specimen_images_clip_id_clips", type_="foreignkey")
        batch.drop_column("frame")
        batch.drop_column("clip_id")
    with op.batch_alter_table("specimens") as batch:
        batch.drop_column("site")
