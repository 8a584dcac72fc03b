"""distributed mode: blob chunks (the database blob store: nothing on a shared disk) and path
deletions (replicas follow them to drop deleted paths from their caches)

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blob_chunks",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("digest", "seq"),
    )
    op.create_table(
        "path_deletions",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("path_id", sa.String(length=80), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )


def downgrade() -> None:
    op.drop_table("path_deletions")
    op.drop_table("blob_chunks")
