"""API keys and the usage ledger.

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

from tokenmill.gateway.store import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _row_id():
    return sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True)


def upgrade() -> None:
    op.create_table(
        "gateway_api_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("prefix", sa.String(64), nullable=False),
        sa.Column("salt", sa.String(64), nullable=False),
        sa.Column("secret_hash", sa.String(128), nullable=False),
        sa.Column("allowed_models", sa.Text, nullable=False),
        sa.Column("requests_per_minute", sa.Integer, nullable=True),
        sa.Column("tokens_per_minute", sa.Integer, nullable=True),
        sa.Column("max_concurrent", sa.Integer, nullable=True),
        sa.Column("monthly_budget_usd", sa.Float, nullable=True),
        sa.Column("max_tokens", sa.Integer, nullable=True),
        sa.Column("allow_overflow", sa.Boolean, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("revoked_at", UTCDateTime, nullable=True),
    )
    op.create_table(
        "gateway_usage",
        _row_id(),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("route", sa.Text, nullable=False),
        sa.Column("upstream", sa.Text, nullable=True),
        sa.Column("tier", sa.Text, nullable=True),
        sa.Column("status_code", sa.Integer, nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("ttft_s", sa.Float, nullable=True),
        sa.Column("latency_s", sa.Float, nullable=False),
        sa.Column("cost_usd", sa.Float, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_gateway_usage_key_created", "gateway_usage", ["key_id", "created_at"])
    op.create_index("ix_gateway_usage_created", "gateway_usage", ["created_at"])
    op.create_index("ix_gateway_usage_request", "gateway_usage", ["request_id"])


def downgrade() -> None:
    op.drop_table("gateway_usage")
    op.drop_table("gateway_api_keys")
