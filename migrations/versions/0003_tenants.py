"""tenants: API keys (hashes only), path owners and grants, the tenant of jobs and
datasets (and an upload's size), tenants' limits, the audit log

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("prefix"),
    )
    op.create_index(op.f("ix_api_keys_tenant"), "api_keys", ["tenant"], unique=False)
    op.create_table(
        "tenant_limits",
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("limits", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("tenant"),
    )
    op.create_table(
        "audit",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=True),
        sa.Column("tenant", sa.String(length=64), nullable=True),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("route", sa.String(length=200), nullable=False),
        sa.Column("target", sa.String(length=200), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_audit_tenant"), "audit", ["tenant"], unique=False)
    op.create_table(
        "path_owners",
        sa.Column("path_id", sa.String(length=80), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("path_id", "tenant"),
    )
    op.create_index(op.f("ix_path_owners_tenant"), "path_owners", ["tenant"], unique=False)
    op.create_table(
        "path_grants",
        sa.Column("path_id", sa.String(length=80), nullable=False),
        sa.Column("grantor", sa.String(length=64), nullable=False),
        sa.Column("grantee", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("path_id", "grantor", "grantee"),
    )
    op.create_index(op.f("ix_path_grants_grantee"), "path_grants", ["grantee"], unique=False)
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("tenant", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("bytes", sa.Integer(), nullable=True))
        batch.create_index(batch.f("ix_datasets_tenant"), ["tenant"], unique=False)
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("tenant", sa.String(length=64), nullable=True))
        batch.create_index(batch.f("ix_jobs_tenant"), ["tenant"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index(batch.f("ix_jobs_tenant"))
        batch.drop_column("tenant")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_index(batch.f("ix_datasets_tenant"))
        batch.drop_column("bytes")
        batch.drop_column("tenant")
    op.drop_index(op.f("ix_audit_tenant"), table_name="audit")
    op.drop_table("audit")
    op.drop_table("tenant_limits")
    op.drop_index(op.f("ix_path_grants_grantee"), table_name="path_grants")
    op.drop_table("path_grants")
    op.drop_index(op.f("ix_path_owners_tenant"), table_name="path_owners")
    op.drop_table("path_owners")
    op.drop_index(op.f("ix_api_keys_tenant"), table_name="api_keys")
    op.drop_table("api_keys")
