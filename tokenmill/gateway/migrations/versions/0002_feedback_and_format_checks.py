"""Response-format checks on usage rows, and thumbs up/down feedback.

Rows written before this revision were never checked: `format_checked` is false
for them and `format_ok` null.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

from tokenmill.gateway.store import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("gateway_usage") as batch:
        batch.add_column(sa.Column("format_checked", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("format_ok", sa.Boolean, nullable=True))
    op.create_table(
        "gateway_feedback",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("score", sa.SmallInteger, nullable=False),
        sa.Column("comment", sa.Text, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_gateway_feedback_request", "gateway_feedback", ["request_id"])


def downgrade() -> None:
    op.drop_table("gateway_feedback")
    with op.batch_alter_table("gateway_usage") as batch:
        batch.drop_column("format_ok")
        batch.drop_column("format_checked")
