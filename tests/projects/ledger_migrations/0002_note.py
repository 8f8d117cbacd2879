"""Release 2: each entry gets a note; the entries there are keep theirs, with an empty one."""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade():
    op.add_column("entry", sa.Column("note", sa.String(200), nullable=False, server_default=""))


def downgrade():
    op.drop_column("entry", "note")
