"""Study integrity (issue 13): per-arm case tokens, sign-in throttling and account state, append-only hash-chained
reads and audit log.

- ``study_arm_cases``: every study case gets its own random token in each arm (existing studies included), and
  ``study_cases.token``, one token shared by every arm, is dropped.
- ``users.must_change_password`` and ``users.credentials_changed_at``; ``sign_in_attempts``.
- ``reads.row_hash`` and ``audit_log.row_hash``: existing rows are chained in id order (``db.chain``), then the
  column becomes required and triggers refuse every UPDATE and DELETE of both tables.
- ``ix_reads_reader_arm`` also holds the case, so a reader's answered cases come from the index alone.

Revision ID: 0002_study_integrity
Revises: 0001_baseline
"""

import secrets

import sqlalchemy as sa
from alembic import op

from db.chain import CHAINED, GENESIS, append_only_ddl, chain_rows, row_hash

_CHAINED_HERE = ("audit_log", "reads")  # the tables chained at this revision (db.chain.CHAINED grew later)

revision = "0002_study_integrity"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("must_change_password", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("credentials_changed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "sign_in_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("client", sa.String(length=64), nullable=False),
        sa.Column("success", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_sign_in_attempts_client_at", "sign_in_attempts", ["client", "at"], unique=False)
    op.create_index("ix_sign_in_attempts_username_at", "sign_in_attempts", ["username", "at"], unique=False)

    op.create_table(
        "study_arm_cases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("arm_id", sa.Integer(), nullable=False),
        sa.Column("case_id", sa.Integer(), nullable=False),
        sa.Column("token", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(["arm_id"], ["study_arms.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["case_id"], ["study_cases.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("arm_id", "case_id", name="uq_study_arm_cases_arm_case"),
        sa.UniqueConstraint("token"),
    )
    op.create_index(op.f("ix_study_arm_cases_arm_id"), "study_arm_cases", ["arm_id"], unique=False)
    op.create_index(op.f("ix_study_arm_cases_case_id"), "study_arm_cases", ["case_id"], unique=False)
    pairs = bind.execute(
        sa.text(
            "SELECT a.id, c.id FROM study_arms a JOIN study_cases c ON c.study_id = a.study_id "
            "WHERE NOT c.training ORDER BY a.id, c.id"
        )
    ).all()
    if pairs:
        tokens = sa.table("study_arm_cases", sa.column("arm_id"), sa.column("case_id"), sa.column("token"))
        op.bulk_insert(
            tokens, [{"arm_id": arm, "case_id": case, "token": secrets.token_urlsafe(12)} for arm, case in pairs]
        )
    with op.batch_alter_table("study_cases") as batch:
        batch.drop_column("token")

    for name in _CHAINED_HERE:
        with op.batch_alter_table(name) as batch:
            batch.add_column(sa.Column("row_hash", sa.String(length=64), nullable=True))
        _chain_existing(bind, name)
        with op.batch_alter_table(name) as batch:
            batch.alter_column("row_hash", existing_type=sa.String(length=64), nullable=False)
        if name == "reads":  # the reading page's hottest query (a reader's answered cases) from the index alone
            op.drop_index("ix_reads_reader_arm", table_name="reads")
            op.create_index("ix_reads_reader_arm", "reads", ["reader_id", "arm_id", "case_id"], unique=False)
        for statement in append_only_ddl(bind.dialect.name, name):
            op.execute(statement)


def _chain_existing(bind: sa.Connection, name: str) -> None:
    """Link every existing row of ``name`` in id order, as ``db.chain`` does for new ones."""
    table = CHAINED[name].__table__
    previous, links = GENESIS, []
    for values in chain_rows(bind, name):
        previous = row_hash(previous, table, values)
        links.append({"row_id": values["id"], "link": previous})
    if links:
        target = sa.table(name, sa.column("id"), sa.column("row_hash"))
        bind.execute(
            target.update().where(target.c.id == sa.bindparam("row_id")).values(row_hash=sa.bindparam("link")),
            links,
        )


def downgrade() -> None:
    bind = op.get_bind()
    for name in _CHAINED_HERE:
        if bind.dialect.name == "sqlite":
            op.execute(f"DROP TRIGGER IF EXISTS {name}_no_update")
            op.execute(f"DROP TRIGGER IF EXISTS {name}_no_delete")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {name}_append_only ON {name}")
            op.execute(f"DROP TRIGGER IF EXISTS {name}_no_truncate ON {name}")
        with op.batch_alter_table(name) as batch:
            batch.drop_column("row_hash")
    op.drop_index("ix_reads_reader_arm", table_name="reads")
    op.create_index("ix_reads_reader_arm", "reads", ["reader_id", "arm_id"], unique=False)
    with op.batch_alter_table("study_cases") as batch:
        batch.add_column(sa.Column("token", sa.String(length=32), nullable=True))
    cases = sa.table("study_cases", sa.column("id"), sa.column("token"))
    ids = [row[0] for row in bind.execute(sa.select(cases.c.id))]
    if ids:
        bind.execute(
            cases.update().where(cases.c.id == sa.bindparam("case")).values(token=sa.bindparam("new")),
            [{"case": i, "new": secrets.token_urlsafe(12)} for i in ids],
        )
    with op.batch_alter_table("study_cases") as batch:
        batch.alter_column("token", existing_type=sa.String(length=32), nullable=False)
        batch.create_unique_constraint("uq_study_cases_token", ["token"])
    op.drop_table("study_arm_cases")
    op.drop_table("sign_in_attempts")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("credentials_changed_at")
        batch.drop_column("must_change_password")
